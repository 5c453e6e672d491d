"""Quality metrics of rendered lip-sync video, shared by tests and benchmarks.

Frames are uint8 (or float) arrays [n,H,W,3]; `matrices` [n,2,3] are the frame -> crop
similarity transforms of the aligned crops of side `size` (as `cluster.faces.align` makes them).
Regions defined in the canonical crop (`cluster.faces.canonical`) are brought to frame space with
the inverse of each matrix.

- `mouth_motion`: how much the mouth region changed from the template, per frame.
- `pearson`, `best_lag`: how that motion follows the speech energy, and with which delay.
- `psnr_outside_mask`: that nothing outside the paste mask changed.
- `seam_score`: whether the paste-back leaves a visible edge.
- `lip_texture_ratio`, `lip_sharpness`, `chin_motion`: detail and jaw motion (issue 10, 22).
- `opening_shape`: width and height of the opened mouth's dark inside (mouth shapes by sound).
- `closure_frames`: the near-silent frames just before a syllable (where /m b p/ close the lips).
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from cluster.faces import canonical
from cluster.faces.align import paste_mask


# --- masks in frame space ---------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _mouth_region_crop(size: int) -> np.ndarray:
    """Indicator of canonical.MOUTH_REGION at pixel centres of an S x S crop, float32 [S,S]."""
    cx, cy, rx, ry = canonical.MOUTH_REGION
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = np.meshgrid(c, c)
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0
    out = inside.astype(np.float32)
    out.setflags(write=False)
    return out


def _to_frame(crop_map: np.ndarray, matrix: np.ndarray, frame_shape) -> np.ndarray:
    """A crop-space map [S,S] warped to frame space [H,W] (bilinear, 0 outside the crop)."""
    h, w = int(frame_shape[0]), int(frame_shape[1])
    return cv2.warpAffine(np.ascontiguousarray(crop_map, dtype=np.float32), np.asarray(matrix, np.float64),
                          (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def frame_paste_mask(frame_shape, matrix: np.ndarray, size: int) -> np.ndarray:
    """The feathered lower-face paste mask (`cluster.faces.align.paste_mask`, built from
    canonical.LOWER_FACE_MASK + MASK_FEATHER) in frame space: float32 [H,W] in [0,1]."""
    return _to_frame(paste_mask(int(size)), matrix, frame_shape)


def frame_mouth_region(frame_shape, matrix: np.ndarray, size: int) -> np.ndarray:
    """canonical.MOUTH_REGION in frame space as a weight map float32 [H,W] in [0,1]."""
    return _to_frame(_mouth_region_crop(int(size)), matrix, frame_shape)


def _check(frames: np.ndarray, matrices: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    matrices = np.asarray(matrices)
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"{name} must be [n,H,W,3], got {frames.shape}")
    if matrices.shape != (frames.shape[0], 2, 3):
        raise ValueError(f"matrices must be [{frames.shape[0]},2,3] for {name} {frames.shape}, got {matrices.shape}")
    return frames, matrices


# --- metrics ------------------------------------------------------------------------------------
def mouth_motion(output_frames: np.ndarray, template_frames: np.ndarray, matrices: np.ndarray,
                 size: int) -> np.ndarray:
    """Mean absolute change (levels, averaged over channels) between output and template inside
    the mouth region of each frame: float64 [n]; NaN for a frame whose mouth region lies outside
    the frame."""
    out, matrices = _check(output_frames, matrices, "output_frames")
    tmpl = np.asarray(template_frames)
    if tmpl.shape != out.shape:
        raise ValueError(f"template_frames {tmpl.shape} and output_frames {out.shape} differ in shape")
    result = np.full(out.shape[0], np.nan)
    for i in range(out.shape[0]):
        w = frame_mouth_region(out.shape[1:3], matrices[i], size)
        total = float(w.sum())
        if total <= 0:
            continue
        diff = np.abs(out[i].astype(np.float32) - tmpl[i].astype(np.float32)).mean(axis=2)
        result[i] = float((diff * w).sum()) / total
    return result


def pearson(a, b) -> float:
    """Pearson correlation of two equal-length 1-D series; NaN when either is constant or
    shorter than 2 (the correlation is undefined)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson needs equal lengths, got {a.size} and {b.size}")
    if a.size < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    if denom == 0.0:
        return math.nan
    return float(a @ b) / denom


def best_lag(a, b, max_lag: int = 5) -> int:
    """The lag (frames, |lag| <= max_lag) at which `a` correlates best with `b`.

    Sign: a positive lag L means `a` lags `b` by L frames, i.e. a[t] ~ b[t - L] (with a = mouth
    motion and b = speech energy, L > 0 means the mouth moves after the voice). Ties go to the
    smallest |lag|; lags whose correlation is undefined (constant overlap) are skipped, and 0 is
    returned when none is defined.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"best_lag needs equal lengths, got {a.size} and {b.size}")
    n = a.size
    best, best_r = 0, -math.inf
    for lag in sorted(range(-max_lag, max_lag + 1), key=lambda k: (abs(k), k)):
        if n - abs(lag) < 3:
            continue
        r = pearson(a[lag:], b[:n - lag]) if lag >= 0 else pearson(a[:n + lag], b[-lag:])
        if not math.isnan(r) and r > best_r + 1e-12:
            best, best_r = lag, r
    return best


def psnr_outside_mask(output_frames: np.ndarray, template_frames: np.ndarray, matrices: np.ndarray,
                      size: int, mask_threshold: float = 0.0) -> float:
    """PSNR (dB, peak 255) between output and template over the pixels whose paste-mask weight
    is <= `mask_threshold` (0: exactly the pixels paste-back must not touch). Infinite when they
    are identical; NaN when no pixel qualifies."""
    out, matrices = _check(output_frames, matrices, "output_frames")
    tmpl = np.asarray(template_frames)
    if tmpl.shape != out.shape:
        raise ValueError(f"template_frames {tmpl.shape} and output_frames {out.shape} differ in shape")
    sq_sum, count = 0.0, 0
    for i in range(out.shape[0]):
        outside = frame_paste_mask(out.shape[1:3], matrices[i], size) <= mask_threshold
        d = out[i][outside].astype(np.float64) - tmpl[i][outside].astype(np.float64)
        sq_sum += float((d * d).sum())
        count += d.size
    if count == 0:
        return math.nan
    mse = sq_sum / count
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _gradient_magnitude(frame: np.ndarray) -> np.ndarray:
    gray = frame.astype(np.float32)
    gray = gray.mean(axis=2) if gray.ndim == 3 else gray
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    return cv2.magnitude(gx, gy)


_SEAM_MARGIN_PX = 2
_MIN_BAND_PIXELS = 16


def _edge_bands(mask: np.ndarray) -> list[np.ndarray]:
    """1-pixel-wide bands that follow the paste mask's edge, from 2 px outside the mask (weight
    0) through the feather to 2 px inside its full-weight part: pixels at signed distance
    [k, k+1) from the mask's outer edge (positive inside)."""
    touched = (mask > 0).astype(np.uint8)
    if not touched.any() or touched.all():
        return []
    inside = cv2.distanceTransform(touched, cv2.DIST_L2, 5)
    outside = cv2.distanceTransform(1 - touched, cv2.DIST_L2, 5)
    signed = np.where(touched > 0, inside - 0.5, 0.5 - outside)
    partial = (mask > 0) & (mask < 0.999)
    width = float(signed[partial].max()) if partial.any() else 0.0
    return [(signed >= k) & (signed < k + 1) for k in range(-_SEAM_MARGIN_PX, int(math.ceil(width)) + _SEAM_MARGIN_PX)]


def seam_score(output_frames: np.ndarray, matrices: np.ndarray, size: int) -> float:
    """How visible the paste-back edge is: the mean gradient magnitude along the paste mask's
    edge ring divided by the mean gradient magnitude of the face (the whole crop square) in the
    same frame, averaged over frames.

    The ring (the feather, plus 2 px on either side) is cut into 1-pixel bands that follow the
    mask's edge; a frame's value is that of its band with the highest median gradient: a seam runs
    along a band and raises most of its pixels, while the content's own edges (a jaw line, a
    collar) cross the bands and raise few, so the median sees the seam and not the content.
    Natural content gives about 0.5-1; a hard pasted edge of a few tens of levels gives
    several times more. Edges elsewhere (e.g. a pasted crop rectangle far outside the mask) are
    not measured. NaN when no frame has a ring and a face inside the frame.
    """
    out, matrices = _check(output_frames, matrices, "output_frames")
    face_square = np.ones((int(size), int(size)), np.float32)
    ratios = []
    for i in range(out.shape[0]):
        mask = frame_paste_mask(out.shape[1:3], matrices[i], size)
        face = _to_frame(face_square, matrices[i], out.shape[1:3]) > 0.5
        bands = [b for b in _edge_bands(mask) if b.sum() >= _MIN_BAND_PIXELS]
        if not bands or not face.any():
            continue
        grad = _gradient_magnitude(out[i])
        face_mean = float(grad[face].mean())
        if face_mean <= 0:
            continue
        ratios.append(max(float(np.median(grad[b])) for b in bands) / face_mean)
    return float(np.mean(ratios)) if ratios else math.nan


# --- jaw and lip detail (issue 10) ---------------------------------------------------------------
LIPS_BOX: tuple[float, float, float, float] = (0.36, 0.67, 0.64, 0.78)
"""The lips in the canonical crop (x0, y0, x1, y1, normalised): where sharpness is measured."""
CHIN_BOX: tuple[float, float, float, float] = (0.42, 0.85, 0.58, 0.89)
"""The chin, below the lower lip and everything a mouth-only warp touches: moves only when the jaw opens."""


def _frame_box(matrix: np.ndarray, box: tuple[float, float, float, float], size: int,
               frame_shape) -> tuple[int, int, int, int] | None:
    """The frame-pixel bounding box (x0, y0, x1, y1), clipped, of a normalised crop box."""
    x0, y0, x1, y1 = (v * size for v in box)
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    pts = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) @ inv[:, :2].T + inv[:, 2]
    h, w = int(frame_shape[0]), int(frame_shape[1])
    a0, b0 = max(int(np.floor(pts[:, 0].min())), 0), max(int(np.floor(pts[:, 1].min())), 0)
    a1, b1 = min(int(np.ceil(pts[:, 0].max())), w), min(int(np.ceil(pts[:, 1].max())), h)
    return (a0, b0, a1, b1) if a1 - a0 >= 3 and b1 - b0 >= 3 else None


def chin_motion(output_frames: np.ndarray, template_frames: np.ndarray, matrices: np.ndarray,
                size: int) -> np.ndarray:
    """Mean absolute change (levels) between output and template in `CHIN_BOX` per frame:
    float64 [n] (NaN where the box is outside the frame). A jaw that opens moves the chin."""
    out, matrices = _check(output_frames, matrices, "output_frames")
    tmpl = np.asarray(template_frames)
    result = np.full(out.shape[0], np.nan)
    for i in range(out.shape[0]):
        b = _frame_box(matrices[i], CHIN_BOX, size, out.shape[1:3])
        if b is not None:
            x0, y0, x1, y1 = b
            result[i] = float(np.abs(out[i, y0:y1, x0:x1].astype(np.float32) - tmpl[i, y0:y1, x0:x1]).mean())
    return result


def lip_sharpness(frames: np.ndarray, matrices: np.ndarray, size: int) -> np.ndarray:
    """Variance of the Laplacian of the grey image over `LIPS_BOX`, per frame: float64 [n].
    Divide the output's by the template's to see whether the lips lost detail (an opened
    mouth's dark inside adds edges of its own: `lip_texture_ratio` leaves it out)."""
    frames, matrices = _check(frames, matrices, "frames")
    result = np.full(frames.shape[0], np.nan)
    for i in range(frames.shape[0]):
        b = _frame_box(matrices[i], LIPS_BOX, size, frames.shape[1:3])
        if b is not None:
            x0, y0, x1, y1 = b
            grey = cv2.cvtColor(np.ascontiguousarray(frames[i, y0:y1, x0:x1]), cv2.COLOR_BGR2GRAY)
            result[i] = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    return result


_MOUTH_INSIDE_DARKER = 30  # grey levels


def lip_texture_ratio(output_frames: np.ndarray, template_frames: np.ndarray, matrices: np.ndarray,
                      size: int) -> np.ndarray:
    """Output over template variance of the Laplacian over `LIPS_BOX`, per frame, taken only over
    lips and skin: pixels where the output is much darker than the template (an opened mouth's
    inside, whose edges would count as detail) and 2 px around them are left out of both."""
    out, matrices = _check(output_frames, matrices, "output_frames")
    tmpl = np.asarray(template_frames)
    result = np.full(out.shape[0], np.nan)
    for i in range(out.shape[0]):
        b = _frame_box(matrices[i], LIPS_BOX, size, out.shape[1:3])
        if b is None:
            continue
        g_out, g_tmpl, inside = _gray_and_darker(out[i], tmpl[i], b)
        keep = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
        if keep.sum() >= 16:
            lap_t = cv2.Laplacian(g_tmpl, cv2.CV_64F)[keep].var()
            if lap_t > 0:
                result[i] = float(cv2.Laplacian(g_out, cv2.CV_64F)[keep].var() / lap_t)
    return result


def _gray_and_darker(out_frame: np.ndarray, template_frame: np.ndarray,
                     box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The output's and the template's grey crops of `box` (x0, y0, x1, y1) and the mask of the
    pixels much darker in the output (an opened mouth's inside)."""
    x0, y0, x1, y1 = box
    g_out, g_tmpl = (cv2.cvtColor(np.ascontiguousarray(f[y0:y1, x0:x1]), cv2.COLOR_BGR2GRAY)
                     for f in (out_frame, template_frame))
    return g_out, g_tmpl, (g_tmpl.astype(np.int16) - g_out) > _MOUTH_INSIDE_DARKER


OPENING_BOX: tuple[float, float, float, float] = (0.25, 0.62, 0.75, 0.86)
"""Where an opened mouth's inside can lie in the canonical crop (x0, y0, x1, y1, normalised)."""


_OPENING_DARK = 0.55
"""An opened mouth's inside is darker than this fraction of the template's median grey level
around the mouth (`OPENING_BOX`), besides being much darker than the template at that pixel."""


def opening_shape(output_frames: np.ndarray, template_frames: np.ndarray, matrices: np.ndarray,
                  size: int) -> np.ndarray:
    """Width and height (frame pixels) of the opened mouth per frame: float64 [n,2]. The opening
    is the largest connected patch of pixels of `OPENING_BOX` much darker in the output than in the
    template (as in `lip_texture_ratio`) and dark in themselves (below `_OPENING_DARK` of the
    template's median there: not lips, shadows or blurred teeth that merely got darker); width: the
    columns it spans, height: its tallest column. NaN for a frame with fewer than 8 such pixels (a
    closed mouth) or whose box is outside the frame."""
    out, matrices = _check(output_frames, matrices, "output_frames")
    tmpl = np.asarray(template_frames)
    result = np.full((out.shape[0], 2), np.nan)
    for i in range(out.shape[0]):
        b = _frame_box(matrices[i], OPENING_BOX, size, out.shape[1:3])
        if b is None:
            continue
        g_out, g_tmpl, darker = _gray_and_darker(out[i], tmpl[i], b)
        dark = darker & (g_out < _OPENING_DARK * float(np.median(g_tmpl)))
        dark = cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
        count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
        if count < 2:
            continue
        k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if stats[k, cv2.CC_STAT_AREA] >= 8:
            patch = labels == k
            result[i] = (stats[k, cv2.CC_STAT_WIDTH], patch.sum(axis=0).max())
    return result


def closure_frames(energy: np.ndarray, quiet: float = 0.03, loud_next: float = 0.25) -> np.ndarray:
    """Boolean mask of the frames whose own speech energy is below `quiet` of the peak while the
    next frame's is above `loud_next` of it: the closure just before a syllable starts, what
    /m b p/ look like in the audio (a short near-silence, then the release)."""
    energy = np.asarray(energy, dtype=np.float64)
    peak = float(energy.max()) if energy.size else 0.0
    following = np.r_[energy[1:], 0.0]
    return (energy < quiet * peak) & (following > loud_next * peak)


def loudest(energy: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """Boolean mask of the loudest `fraction` of frames."""
    energy = np.asarray(energy, dtype=np.float64)
    k = max(1, int(round(fraction * energy.size)))
    return energy >= np.sort(energy)[-k]
