"""Face crops and paste-back, per crop recipe.

Two recipes (`CROP_RECIPES`), both expressed as one affine matrix per frame (frame -> crop), so
cutting and pasting are the same code:
- `aligned`: `alignment_matrices`, the similarity transform onto the canonical 5 points (the
  built-in model's geometry); paste mask `canonical.LOWER_FACE_MASK`;
- `wav2lip`: `box_matrices` of `wav2lip_boxes`, the face track's detector box (smoothed over
  time) with the bottom pad, stretched to S x S as Wav2Lip's inference did; paste mask
  `canonical.WAV2LIP_LOWER_FACE_MASK` (mouth and jaw, in the regenerated lower half).
`crop_matrices` picks by recipe.

`alignment_matrices` gives, per frame, the similarity transform (frame -> crop) that puts the
5 landmarks onto `canonical.canonical_points(S)` (least-squares closed form, deterministic).
`cut_crops` cuts S x S crops with it; `paste_back` warps generated crops back into the frames
inside the feathered lower-face mask (`paste_mask`), touching only the mask's bounding box.

Paste-back details:
- colour match: the generated crop's per-channel mean/std in the mask's feather ring is matched
  to the original crop's there (model colour drift would otherwise show as a seam);
- detail keep: where the generated crop is the original crop moved (a warp: lips and jaw that
  moved) or unchanged, the frame's own high frequencies are kept, moved the same way at the
  frame's resolution: the motion is estimated as a dense optical flow (DIS) from the generated
  crop to the original one, and the frame's detail layer (the frame minus the original crop
  brought back to it: everything finer than the crop, the texture the crop round trip loses) is
  moved along it by whole frame pixels (nearest: sampling between pixels would halve the finest
  grain) and added to the generated crop brought back. So skin and lips keep their texture while
  they move, even when the crop is much smaller than the face. Where the model made new content
  (an open mouth's inside: differing from the moved original by more than `_DETAIL_LOW` levels
  once both are smoothed) the generated pixels are used. A generated crop identical to the
  original pastes back to the original frame exactly (no flow);
- pixels outside the mask (weight 0) are bit-identical to the input frame.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

from cluster.faces import canonical
from cluster.media import yuv

_BORDER_TAPER = 1.0  # fraction of MASK_FEATHER over which the mask is forced to 0 at the crop edge
_DETAIL_LOW, _DETAIL_HIGH = 40.0, 100.0  # |generated - moved original| (levels, smoothed): keep the frame's
# detail below, none above. New content (an opened mouth's inside) differs by 100 levels and more;
# skin and lips moved by a flow that is a pixel off differ by tens in the crop's fine texture
_STD_RATIO_LIMITS = (0.8, 1.25)
_FLOW_MARGIN = 16  # crop pixels around the changed pixels' box on which the flow is computed
_FLOW_MIN_CHANGE = 1.0  # |generated - original| (levels) below which a pixel did not change (no flow)
CROP_RECIPES = ("wav2lip", "aligned")
_MASKS = {"aligned": canonical.LOWER_FACE_MASK, "wav2lip": canonical.WAV2LIP_LOWER_FACE_MASK}


def wav2lip_boxes(boxes: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Detector boxes [n,4] (x1,y1,x2,y2) padded by `canonical.WAV2LIP_PADS` and clipped to the
    frame (w, h), as Wav2Lip's inference did: float64 [n,4]."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    top, bottom, left, right = canonical.WAV2LIP_PADS
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    fw, fh = frame_size
    out = np.stack([b[:, 0] - left * w, b[:, 1] - top * h, b[:, 2] + right * w, b[:, 3] + bottom * h], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, fw)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, fh)
    return out


def box_matrices(boxes: np.ndarray, size: int) -> np.ndarray:
    """Axis-aligned transforms frame -> crop [n,2,3] float32 mapping each box [n,4] onto the
    S x S crop (pixel edges onto edges: x1 -> -0.5, x2 -> S - 0.5, as cv2.resize of the box)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx = size / np.maximum(b[:, 2] - b[:, 0], 1e-6)
    sy = size / np.maximum(b[:, 3] - b[:, 1], 1e-6)
    m = np.zeros((len(b), 2, 3), dtype=np.float64)
    m[:, 0, 0], m[:, 0, 2] = sx, -0.5 - (b[:, 0] - 0.5) * sx
    m[:, 1, 1], m[:, 1, 2] = sy, -0.5 - (b[:, 1] - 0.5) * sy
    return m.astype(np.float32)


def crop_matrices(landmarks: np.ndarray, boxes: np.ndarray, size: int, recipe: str,
                  frame_size: tuple[int, int]) -> np.ndarray:
    """Frame -> crop matrices [n,2,3] for the crop `recipe` from a face track's landmarks [n,5,2]
    and boxes [n,4] (frame_size (w, h) clips the wav2lip box)."""
    if recipe == "aligned":
        return alignment_matrices(landmarks, size)
    if recipe == "wav2lip":
        return box_matrices(wav2lip_boxes(boxes, frame_size), size)
    raise ValueError(f"unknown crop recipe {recipe!r} (expected one of {list(CROP_RECIPES)})")


def alignment_matrices(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Similarity transforms frame -> crop [n,2,3] float32 mapping landmarks [n,5,2] onto the canonical points.

    Least-squares similarity (rotation, uniform scale, translation; no reflection) in closed form.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must be [n,5,2], got {pts.shape}")
    dst = canonical.canonical_points(size).astype(np.float64)
    z = pts[..., 0] + 1j * pts[..., 1]              # [n,5]
    w = dst[:, 0] + 1j * dst[:, 1]                  # [5]
    zc = z - z.mean(axis=1, keepdims=True)
    wc = w - w.mean()
    denom = np.sum(np.abs(zc) ** 2, axis=1)
    a = np.sum(np.conj(zc) * wc[None, :], axis=1) / np.maximum(denom, 1e-12)  # scale * e^{i angle}
    b = w.mean() - a * z.mean(axis=1)
    m = np.empty((len(pts), 2, 3), dtype=np.float64)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = a.real, -a.imag, b.real
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = a.imag, a.real, b.imag
    return m.astype(np.float32)


def _invert(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(m.astype(np.float64))


def _bbox_in_frame(m: np.ndarray, crop_rect: tuple[float, float, float, float], w: int, h: int,
                   margin: float) -> tuple[int, int, int, int] | None:
    """Frame-pixel box (x0,y0,x1,y1), clipped, holding the preimage of crop_rect (crop coords) plus margin."""
    u0, v0, u1, v1 = crop_rect
    corners = np.array([[u0, v0, 1], [u1, v0, 1], [u0, v1, 1], [u1, v1, 1]], dtype=np.float64)
    p = corners @ _invert(m).T
    x0 = max(int(np.floor(p[:, 0].min() - margin)), 0)
    y0 = max(int(np.floor(p[:, 1].min() - margin)), 0)
    x1 = min(int(np.ceil(p[:, 0].max() + margin)) + 1, w)
    y1 = min(int(np.ceil(p[:, 1].max() + margin)) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _shift(m: np.ndarray, x0: float, y0: float) -> np.ndarray:
    """The transform of `m` applied to a sub-image whose origin is frame pixel (x0, y0)."""
    out = m.astype(np.float64).copy()
    out[:, 2] += out[:, :2] @ np.array([x0, y0])
    return out


#: The smallest factor by which `cut_crops` pre-scales a face region bilinearly; below it, by INTER_AREA.
#: The 720p bench face (0.82) gets crops within 55 dB of INTER_AREA's at a seventh of its cost
#: (2.2 -> 0.3 ms a frame, 7 % more frames/s in `bench/bench_quality.py --size 1280x720`), its lip
#: texture ratio 0.80 -> 0.79; stripes at the frame's finest frequency keep 1.3x the amplitude
#: INTER_AREA leaves them. At 0.5 the 1080p face (0.55) lost more (lip texture 0.92 -> 0.91,
#: below that case's target), so it keeps INTER_AREA.
PRESCALE_LINEAR_MIN = 0.75


def cut_crops(frames: np.ndarray, matrices: np.ndarray, size: int) -> np.ndarray:
    """Aligned S x S crops [n,S,S,3] uint8 from frames [n,H,W,3] with frame->crop matrices [n,2,3].

    Strong downscales are done in two steps (a resize of the face region to 1.5 crop pixels per
    crop pixel, then a bilinear warp) so crops of large faces are not aliased; edges replicate the
    frame border. The resize is bilinear where it shrinks little (`PRESCALE_LINEAR_MIN`), INTER_AREA
    where it shrinks more.
    """
    frames = np.asarray(frames)
    out = np.empty((frames.shape[0], size, size, frames.shape[3]), dtype=np.uint8)
    for i in range(frames.shape[0]):
        _cut_crop(frames[i], matrices[i].astype(np.float64), size, out[i])
    return out


def cut_crops_yuv(frames: np.ndarray, matrices: np.ndarray, size: int) -> np.ndarray:
    """`cut_crops` of I420 frames [n, H * 3 // 2, W] (`cluster.media.yuv`): each crop is cut from its
    face region converted to BGR, not from the whole frame (the region reaches every pixel the crop
    reads, or the frame's edge, so the crop is the one `cut_crops` cuts from the converted frame)."""
    n = frames.shape[0]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    if n == 0:
        return out
    w, h = yuv.frame_size(frames[0])
    for i in range(n):
        m = matrices[i].astype(np.float64)
        box = _bbox_in_frame(m, (-1, -1, size, size), w, h, margin=_crop_margin(_crop_scale(m)))
        if box is None:
            _cut_crop(yuv.to_bgr(frames[i]), m, size, out[i])
            continue
        box = yuv.even_box(box, w, h)
        _cut_crop(yuv.region_to_bgr(frames[i], box), _shift(m, box[0], box[1]), size, out[i])
    return out


def _crop_scale(m: np.ndarray) -> float:
    """Crop pixels per frame pixel of the frame->crop matrix `m`."""
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def _crop_margin(scale: float) -> float:
    """Frame pixels around a crop's footprint that its warp (and pre-scale) may read, at `scale`."""
    return 2.0 / max(scale, 1e-6) + 2


def _cut_crop(frame: np.ndarray, m: np.ndarray, size: int, out: np.ndarray) -> None:
    """One crop of `cut_crops` into `out` [S,S,3] from `frame` [H,W,3] with the frame->crop matrix `m`."""
    h, w = frame.shape[:2]
    scale = _crop_scale(m)
    box = _bbox_in_frame(m, (-1, -1, size, size), w, h, margin=_crop_margin(scale))
    if box is None or scale >= 0.67:
        cv2.warpAffine(frame, m, (size, size), dst=out, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return
    x0, y0, x1, y1 = box
    k = 1.5 * scale
    rw, rh = x1 - x0, y1 - y0
    nw, nh = max(1, round(rw * k)), max(1, round(rh * k))
    shrink = min(nw / rw, nh / rh)
    small = cv2.resize(frame[y0:y1, x0:x1], (nw, nh),
                       interpolation=cv2.INTER_LINEAR if shrink >= PRESCALE_LINEAR_MIN else cv2.INTER_AREA)
    kx, ky = nw / rw, nh / rh
    # small-image pixel q -> frame pixel p (pixel-centre convention of cv2.resize)
    q_to_p = np.array([[1 / kx, 0, 0.5 / kx - 0.5 + x0], [0, 1 / ky, 0.5 / ky - 0.5 + y0], [0, 0, 1]])
    cv2.warpAffine(small, m @ q_to_p, (size, size), dst=out, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _smootherstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * x * (x * (x * 6 - 15) + 10)


@functools.lru_cache(maxsize=8)
def _paste_mask_cached(size: int, recipe: str = "aligned") -> np.ndarray:
    cx, cy, rx, ry = _MASKS[recipe]
    feather = canonical.MASK_FEATHER
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = np.meshgrid(c, c)
    dx, dy = x - cx, y - cy
    r = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    grad = np.sqrt((dx / rx ** 2) ** 2 + (dy / ry ** 2) ** 2) / np.maximum(r, 1e-9)
    dist_outside = np.where(r > 1, (r - 1) / np.maximum(grad, 1e-9), 0.0)  # first-order distance to the ellipse
    # the mask must reach 0 before the crop edge, else the crop border shows as a seam; taking the
    # minimum of the two linear ramps before one smootherstep keeps the slope bounded
    edge = np.minimum(np.minimum(x, 1 - x), np.minimum(y, 1 - y)) - 0.5 / size
    ramp = np.minimum(1.0 - dist_outside / feather, edge / (feather * _BORDER_TAPER))
    weight = _smootherstep(ramp)
    weight[weight < 1e-4] = 0.0
    out = weight.astype(np.float32)
    out.setflags(write=False)
    return out


def paste_mask(size: int, recipe: str = "aligned") -> np.ndarray:
    """The feathered lower-face mask [S,S] float32 in crop space of `recipe`: 1 inside its
    lower-face ellipse, smooth fall to 0."""
    if recipe not in _MASKS:
        raise ValueError(f"unknown crop recipe {recipe!r} (expected one of {list(CROP_RECIPES)})")
    return _paste_mask_cached(int(size), recipe).copy()


def _channel_max(a: np.ndarray) -> np.ndarray:
    """Per-pixel maximum over the last axis of [..., 3] (a reduction along a 3-wide axis is slow in numpy)."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


@functools.lru_cache(maxsize=8)
def _mask_geometry(size: int, recipe: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, tuple]:
    """(mask, mask > 0, feather ring as uint8, ring pixel count, mask's bounding rect in crop coords)."""
    mask = _paste_mask_cached(size, recipe)
    inside = mask > 0
    ring = (inside & (mask < 1)).astype(np.uint8)
    rows, cols = np.nonzero(mask)
    crop_rect = (cols.min() - 1.0, rows.min() - 1.0, cols.max() + 1.0, rows.max() + 1.0)
    return mask, inside, ring, int(ring.sum()), crop_rect


def _match_colour(generated: np.ndarray, original: np.ndarray, ring: np.ndarray, ring_pixels: int) -> np.ndarray:
    """Generated crop (float32) with its per-channel mean/std in `ring` (uint8 mask) matched to the original's."""
    if ring_pixels < 16:
        return generated
    mg, sg = (v.ravel() for v in cv2.meanStdDev(generated, mask=ring))
    mo, so = (v.ravel() for v in cv2.meanStdDev(original, mask=ring))
    ratio = np.where(sg > 1e-3, so / np.maximum(sg, 1e-3), 1.0)
    ratio = np.clip(ratio, *_STD_RATIO_LIMITS)
    # per-channel scale and offset as rows as long as the image's (a broadcast over a 3-wide last
    # axis runs numpy's inner loop 3 elements at a time: several times slower, same result)
    h, w = generated.shape[:2]
    rows = generated.reshape(h, w * 3)
    out = rows * np.tile(ratio.astype(np.float32), w)
    out += np.tile((mo - mg * ratio).astype(np.float32), w)
    return out.reshape(h, w, 3)


def _optical_flow() -> "cv2.DISOpticalFlow":
    """A new DIS optical flow object for one call. Not one kept per process: OpenCV's DIS keeps state
    between `calc` calls (a call on a small box changed the next, larger one's flow by up to 3 px), so
    a reused object made paste-back depend on what the process had pasted before: a chunk rendered
    again on another compositor after a fault came out different (docs/RELIABILITY.md). Creating
    one costs about 0.01 ms.

    DIS down to half the crop's resolution (finest scale 1, not the fast preset's 2): flow accurate to
    about a pixel on the moved lips (at scale 2 the frame's detail landed a few pixels off the lips it
    belongs to: lip texture ratio 0.89 instead of 0.93-1.0 on a textured 1080p face), on the changed
    box only (about 2.5x cheaper than the whole crop)."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
    dis.setFinestScale(1)
    return dis


def _motion(generated: np.ndarray, original: np.ndarray,
            inside: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Dense flow [S,S,2] float32 (crop pixels) with generated(x) ~ original(x + flow(x)), computed
    on the box around the pixels the model changed (inside the paste mask, `inside`), widened by
    `_FLOW_MARGIN`, and kept only near those pixels (0 elsewhere), with that box (r0, r1, c0, c1)
    outside which the flow is 0; None when nothing changed. A function of its inputs only
    (`_optical_flow`)."""
    changed = (_channel_max(cv2.absdiff(generated, original)) > _FLOW_MIN_CHANGE) & inside
    if not changed.any():
        return None
    size = generated.shape[0]
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    r0, r1 = max(0, rows[0] - _FLOW_MARGIN), min(size, rows[-1] + 1 + _FLOW_MARGIN)
    c0, c1 = max(0, cols[0] - _FLOW_MARGIN), min(size, cols[-1] + 1 + _FLOW_MARGIN)
    g = cv2.cvtColor(np.ascontiguousarray(generated[r0:r1, c0:c1]), cv2.COLOR_BGR2GRAY)
    o = cv2.cvtColor(np.ascontiguousarray(original[r0:r1, c0:c1]), cv2.COLOR_BGR2GRAY)
    box_flow = _optical_flow().calc(g, o, None)
    near = np.clip(_near(changed, rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)[r0:r1, c0:c1], 0.0, 1.0)
    box_flow[..., 0] *= near
    box_flow[..., 1] *= near
    flow = np.zeros((size, size, 2), np.float32)
    flow[r0:r1, c0:c1] = box_flow
    return flow, (r0, r1, c0, c1)


def _near(changed: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """How near each crop pixel is to a changed one (`changed` [S,S] bool, all inside rows r0:r1,
    columns c0:c1): the changed pixels dilated by 2 and blurred, float32 [S,S]. Computed on that box
    widened by the reach of both filters twice, clipped to the crop, and 0 elsewhere: past the
    box's edge the whole-crop result is 0, and the filters' borders there read only 0s, so every
    value is the one the whole crop would give."""
    size = changed.shape[0]
    sigma = size / 128.0
    radius = (int(round(sigma * 4 * 2 + 1)) | 1) // 2  # cv2.GaussianBlur's kernel for float32 images
    reach = 2 * (2 + radius)
    r0, r1, c0, c1 = max(r0 - reach, 0), min(r1 + reach, size), max(c0 - reach, 0), min(c1 + reach, size)
    near = np.zeros(changed.shape, np.float32)
    dilated = cv2.dilate(changed[r0:r1, c0:c1].astype(np.float32), np.ones((5, 5), np.uint8))
    near[r0:r1, c0:c1] = cv2.GaussianBlur(dilated, (0, 0), sigma)
    return near


def _moved_crop(crop: np.ndarray, flow: np.ndarray, flow_box: tuple[int, int, int, int],
                rect: tuple[int, int, int, int], unmoved: np.ndarray) -> np.ndarray:
    """The crop `crop` [S,S,3] sampled at x + flow(x) (bilinear, border replicated) for the pixels x
    of `rect` (r0, r1, c0, c1), float32; `unmoved` is the crop's float32 pixels of that rect. Sampled
    only where the flow's box `flow_box` (0 outside) meets the rect: elsewhere the flow is 0 and
    bilinear sampling at a whole pixel gives the pixel itself, which `unmoved` holds."""
    r0, r1, c0, c1 = rect
    f0, f1, g0, g1 = max(r0, flow_box[0]), min(r1, flow_box[1]), max(c0, flow_box[2]), min(c1, flow_box[3])
    if f1 <= f0 or g1 <= g0:
        return unmoved
    map_x = flow[f0:f1, g0:g1, 0] + np.arange(g0, g1, dtype=np.float32)[None, :]
    map_y = flow[f0:f1, g0:g1, 1] + np.arange(f0, f1, dtype=np.float32)[:, None]
    moved = unmoved.copy()
    moved[f0 - r0:f1 - r0, g0 - c0:g1 - c0] = cv2.remap(crop.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                                                        borderMode=cv2.BORDER_REPLICATE)
    return moved


def _move_detail(detail: np.ndarray, flow: np.ndarray, flow_box: tuple[int, int, int, int],
                 m_roi: np.ndarray) -> np.ndarray:
    """The detail layer `detail` [h,w,3] of a frame region, each pixel p taken from the nearest
    pixel to p + A^-1 flow(p), where flow(p) is the crop-pixel `flow` [S,S,2] brought to the region
    (whose region->crop matrix is `m_roi`) and A the matrix's linear part: the crop's motion at the
    frame's resolution. Nearest, not bilinear: bilinear sampling between pixels averages neighbours
    and halves the finest texture (grain, pores, 1-px wrinkles); a shift rounded to whole pixels
    keeps it (the detail is high-pass, so the half-pixel rounding does not show as steps).

    Computed on the region's pixels that can see the flow's box `flow_box` (crop rows r0:r1,
    columns c0:c1, 0 outside): elsewhere the flow brought over is 0 and every pixel keeps its own.
    Changes `detail` in place and returns it."""
    h, w = detail.shape[:2]
    r0, r1, c0, c1 = flow_box
    box = _bbox_in_frame(m_roi, (c0 - 1.0, r0 - 1.0, float(c1), float(r1)), w, h, margin=1.0)
    if box is None:
        return detail
    x0, y0, x1, y1 = box
    flow_roi = cv2.warpAffine(flow, _shift(m_roi, x0, y0), (x1 - x0, y1 - y0),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
    a_inv = np.linalg.inv(m_roi[:, :2]).astype(np.float32)
    fx, fy = flow_roi[..., 0], flow_roi[..., 1]
    map_x = fx * a_inv[0, 0] + fy * a_inv[0, 1]
    map_x += np.arange(x0, x1, dtype=np.float32)[None, :]
    map_y = fx * a_inv[1, 0] + fy * a_inv[1, 1]
    map_y += np.arange(y0, y1, dtype=np.float32)[:, None]
    moved = cv2.remap(detail, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
    detail[y0:y1, x0:x1] = moved
    return detail


def _content_change(generated: np.ndarray, moved_original: np.ndarray, blur_sigma: float) -> np.ndarray:
    """How much the generated crop differs from the original moved along the estimated motion,
    per pixel (levels, the largest channel): both smoothed first by `blur_sigma`, so texture the
    flow placed a pixel off does not count as new content (it would throw the texture away),
    then the difference smoothed once more. Large where the model made new content."""
    g = cv2.GaussianBlur(generated, (0, 0), blur_sigma)
    o = cv2.GaussianBlur(moved_original, (0, 0), blur_sigma)
    return cv2.GaussianBlur(_channel_max(cv2.absdiff(g, o)), (0, 0), blur_sigma)


def _detail_blur_sigma(size: int) -> float:
    """Sigma (crop pixels) of the blurs that smooth the detail-keep map (1 px at S=256: wider keeps the
    frame's texture off a band of lips around the opening)."""
    return max(0.5, size / 256.0)


@functools.lru_cache(maxsize=8)
def _work_rect(size: int, recipe: str) -> tuple[int, int, int, int]:
    """Crop rows r0:r1, columns c0:c1 that paste-back computes on in crop space: the mask's
    bounding rect, widened by the reach of the detail map's blur (and bilinear sampling), so
    every value the mask can weigh is the same as if the whole crop were computed."""
    _, _, _, _, (u0, v0, u1, v1) = _mask_geometry(size, recipe)
    # cv2.GaussianBlur's kernel radius for float32 is about 4 sigma, and the keep map blurs twice
    reach = int(np.ceil(8.0 * _detail_blur_sigma(size))) + 3
    return (max(int(v0) - reach, 0), min(int(v1) + reach + 1, size),
            max(int(u0) - reach, 0), min(int(u1) + reach + 1, size))


def paste_back(frames: np.ndarray, generated: np.ndarray, matrices: np.ndarray, size: int,
               original_crops: np.ndarray | None = None, recipe: str = "aligned", inplace: bool = False,
               shown: np.ndarray | None = None) -> np.ndarray:
    """Blend generated crops [n,S,S,3] into frames [n,H,W,3] inside the feathered lower-face mask
    of the crop `recipe` (the matrices must be that recipe's). `shown` ([n] bool, `FaceTrack.shown`):
    only those frames are blended into; the others (the face is gone) stay as they are.

    `original_crops` are the crops the model was given (as cut by `cut_crops`); when None they
    are cut here. Returns new frames (`inplace`: `frames` itself, changed); pixels outside the
    mask are the input's, bit for bit.
    """
    frames = np.asarray(frames)
    n, h, w = frames.shape[:3]
    if original_crops is None:
        original_crops = cut_crops(frames, matrices, size)
    out = frames if inplace else frames.copy()
    for i, (x0, y0, x1, y1), _, blended in _blends(n, w, h, generated, matrices, size, original_crops, recipe,
                                                  lambda i, b: frames[i, b[1]:b[3], b[0]:b[2]], shown=shown):
        out[i, y0:y1, x0:x1] = blended
    return out


def paste_back_yuv(frames: np.ndarray, generated: np.ndarray, matrices: np.ndarray, size: int,
                   original_crops: np.ndarray | None = None, recipe: str = "aligned",
                   shown: np.ndarray | None = None) -> np.ndarray:
    """`paste_back` into I420 frames [n, H * 3 // 2, W] (`cluster.media.yuv`), in place: only the
    region each blend touches is converted to BGR (widened to even corners, so it converts exactly
    as the whole frame would), and only the pixels the blend weighs are written back (a pixel's
    luma, its 2x2 block's chroma); every other pixel keeps its bytes; frames not `shown` keep all
    theirs. Returns `frames`."""
    n = frames.shape[0]
    if n == 0:
        return frames
    w, h = yuv.frame_size(frames[0])
    if original_crops is None:
        original_crops = cut_crops_yuv(frames, matrices, size)
    for i, box, weight, blended in _blends(n, w, h, generated, matrices, size, original_crops, recipe,
                                           lambda i, b: yuv.region_to_bgr(frames[i], b), even=True, shown=shown):
        yuv.region_from_bgr(frames[i], box, blended.astype(np.uint8), changed=weight > 0)
    return frames


def _colour_and_alpha(bgra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The colour [h,w,3] and 4th channel [h,w] of a float32 4-channel image, each contiguous."""
    return cv2.cvtColor(bgra, cv2.COLOR_BGRA2BGR), cv2.extractChannel(bgra, 3)


def _blends(n: int, w: int, h: int, generated: np.ndarray, matrices: np.ndarray, size: int,
            original_crops: np.ndarray, recipe: str, region_of, even: bool = False,
            shown: np.ndarray | None = None):
    """Paste-back's work, frame by frame: yields (i, box, weight, blended) with `blended` the float32
    BGR pixels (whole levels, 0..255) of frame i's region `box` (x0, y0, x1, y1), computed from the
    region's pixels `region_of(i, box)` (uint8 BGR), and `weight` [h, w] the blend's weight there
    (0: the pixel is the region's own); `even`: boxes widened to even corners."""
    if generated.shape[:3] != (n, size, size):
        raise ValueError(f"generated crops must be [{n},{size},{size},3], got {generated.shape}")
    if recipe not in _MASKS:
        raise ValueError(f"unknown crop recipe {recipe!r} (expected one of {list(CROP_RECIPES)})")
    mask, inside, ring, ring_pixels, crop_rect = _mask_geometry(int(size), recipe)
    # crop-space work is done on the rect the mask can weigh, not on the whole crop
    r0, r1, c0, c1 = _work_rect(int(size), recipe)
    mask_r, ring_r = mask[r0:r1, c0:c1], ring[r0:r1, c0:c1]
    blur_sigma = _detail_blur_sigma(size)
    for i in range(n):
        if shown is not None and not shown[i]:  # the face is gone from this frame
            continue
        m = matrices[i].astype(np.float64)
        box = _bbox_in_frame(m, crop_rect, w, h, margin=1.0)
        if box is None:
            continue
        if even:  # the widened border's weight is 0: those pixels come out as they went in
            box = yuv.even_box(box, w, h)
        x0, y0, x1, y1 = box
        m_roi = _shift(m, x0, y0)
        m_rect = m_roi.copy()  # the same map read from the rect: crop coordinates less its origin
        m_rect[:, 2] -= (c0, r0)
        dsize = (x1 - x0, y1 - y0)

        def back(img, m_rect=m_rect, dsize=dsize):  # rect pixels -> the frame region
            return cv2.warpAffine(img, m_rect, dsize, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE)

        orig = original_crops[i, r0:r1, c0:c1].astype(np.float32)
        gen = _match_colour(generated[i, r0:r1, c0:c1].astype(np.float32), orig, ring_r, ring_pixels)
        roi = region_of(i, box).astype(np.float32)
        motion = _motion(generated[i], original_crops[i], inside)
        moved_orig = orig if motion is None else _moved_crop(original_crops[i], *motion, (r0, r1, c0, c1), orig)
        change = _content_change(gen, moved_orig, blur_sigma)
        np.subtract(_DETAIL_HIGH, change, out=change)
        np.multiply(change, 1.0 / (_DETAIL_HIGH - _DETAIL_LOW), out=change)
        keep = np.clip(change, 0.0, 1.0, out=change)  # how much of the frame's own detail to keep
        # two 4-channel warps: the mask is 0 along the rect's edge, so replicating the border there
        # is the same as a constant 0
        gen_w, weight = _colour_and_alpha(back(cv2.merge((gen, mask_r))))
        orig_w, keep_w = _colour_and_alpha(back(cv2.merge((orig, keep))))
        # the frame's detail above the crop's resolution (what the crop round trip loses), moved
        # with the model's motion by whole frame pixels: resampling between pixels would blur it
        detail = np.subtract(roi, orig_w)
        if motion is not None:
            detail = _move_detail(detail, *motion, m_roi)
        # blended = roi + weight * (generated + keep * detail - roi), computed in place in that order
        # on contiguous 3-channel arrays (the weights repeated per channel: numpy runs a broadcast
        # over a 3-wide last axis 3 elements at a time)
        blended = detail
        blended *= cv2.cvtColor(keep_w, cv2.COLOR_GRAY2BGR)
        blended += gen_w
        blended -= roi
        blended *= cv2.cvtColor(weight, cv2.COLOR_GRAY2BGR)
        blended += roi
        np.rint(blended, out=blended)
        np.clip(blended, 0, 255, out=blended)
        yield i, box, weight, blended
