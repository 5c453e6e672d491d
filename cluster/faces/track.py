"""The subject's face track over a template: one face followed across frames, gaps filled, smoothed.

`build_track` links per-frame detections into tracks (IoU / centre distance), picks the subject
(the track with the largest face area summed over its frames: big and present most of the time;
a smaller face in the background never takes over; later fragments of the same face, after it was
lost for a while, are joined), fills the frames where the subject was not
detected by interpolating its neighbours (holding the first/last value at the ends), and smooths
the landmarks in time with a zero-phase One-Euro filter (forward then backward pass): heavy
smoothing while the head is still, little while it moves, so crops do not jitter and do not lag.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from cluster.errors import InputUnreadable, NoFace
from cluster.faces.mtcnn import FaceDetection
from cluster.fsutil import atomic_writer

# Linking: a detection continues a track when it overlaps the track's last box this much, or its
# centre lies within this fraction of the box side from the track's last centre.
_LINK_IOU = 0.3
_LINK_CENTRE = 0.5
_MAX_GAP_FRAMES = 50  # a track not seen for longer than this stops accepting detections
# A gap of at most this many frames between two frames where the subject was detected is the
# detector missing a face that is there (blur, a hand): the mouth is drawn where the track puts it
# (interpolated). A longer gap, or the frames before the first or after the last detection, is the
# face gone (out of the picture, turned away, a cut): those frames are shown as they are. Two frames
# (80 ms at 25 fps): between keyframes the detector tracks the face and detects again where tracking
# loses it, so a face that is there is rarely missed longer; a cut of 3 to 6 frames to a shot
# without the face got a mouth floating on it at 6.
MAX_FILLED_GAP_FRAMES = 2
_MIN_FRAGMENT_FRAMES = 3  # a later fragment of the subject's face must be seen this often to join
_SIZE_RATIO = (0.67, 1.5)  # ... and have a similar face size

# One-Euro parameters in face-size units per second (face size = the track's median box side).
_MIN_CUTOFF_HZ = 0.4
_BETA = 6.0
_D_CUTOFF_HZ = 1.0


@dataclass(eq=False)
class FaceTrack:
    """Per-frame subject face: smoothed 5-point landmarks, boxes, and which frames were detected."""
    landmarks: np.ndarray  # [T,5,2] float32 (smoothed)
    boxes: np.ndarray      # [T,4] float32 (x1,y1,x2,y2)
    detected: np.ndarray   # [T] bool: the subject was detected in this frame (else interpolated)

    @functools.cached_property
    def shown(self) -> np.ndarray:
        """[T] bool: the frames whose mouth is drawn (`MAX_FILLED_GAP_FRAMES`): detected, or in a
        short gap between two detected frames; never where the face is gone."""
        shown = self.detected.astype(bool).copy()
        found = np.flatnonzero(shown)
        for a, b in zip(found[:-1], found[1:]):
            if 1 < b - a <= MAX_FILLED_GAP_FRAMES + 1:
                shown[a + 1:b] = True
        return shown

    def __len__(self) -> int:
        return int(self.landmarks.shape[0])

    def save(self, path: str | os.PathLike) -> None:
        """Write as .npz via a temporary file and an atomic rename."""
        with atomic_writer(path) as f:
            np.savez(f, landmarks=self.landmarks.astype(np.float32), boxes=self.boxes.astype(np.float32),
                     detected=self.detected.astype(bool))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaceTrack":
        """Read a track written by `save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                track = cls(landmarks=z["landmarks"].astype(np.float32), boxes=z["boxes"].astype(np.float32),
                            detected=z["detected"].astype(bool))
        except (OSError, KeyError, ValueError) as exc:
            raise InputUnreadable(f"cannot read the face track {path}: {exc}", cause=repr(exc), path=str(path)) from exc
        n = len(track.landmarks)
        if track.landmarks.shape != (n, 5, 2) or track.boxes.shape != (n, 4) or track.detected.shape != (n,):
            raise InputUnreadable(f"face track {path} has inconsistent shapes: landmarks {track.landmarks.shape}, "
                                  f"boxes {track.boxes.shape}, detected {track.detected.shape}", path=str(path))
        return track


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _link(detections: list[list[FaceDetection]]) -> list[dict[int, FaceDetection]]:
    """Greedy frame-to-frame association; returns tracks as {frame index: detection}."""
    tracks: list[dict[int, FaceDetection]] = []
    last: dict[int, tuple[int, np.ndarray]] = {}  # active tracks: (frame, box) of the latest detection
    for t, dets in enumerate(detections):
        for k in [k for k, (lt, _) in last.items() if t - lt > _MAX_GAP_FRAMES]:
            del last[k]
        pairs = []
        for k, (_, lb) in last.items():
            side = math.sqrt(max((lb[2] - lb[0]) * (lb[3] - lb[1]), 1e-6))
            lc = (lb[:2] + lb[2:]) / 2
            for j, d in enumerate(dets):
                iou = _iou(lb, d.box)
                dist = float(np.linalg.norm((d.box[:2] + d.box[2:]) / 2 - lc)) / side
                if iou >= _LINK_IOU or dist <= _LINK_CENTRE:
                    pairs.append((iou - dist, k, j))
        used_tracks, used_dets = set(), set()
        for _, k, j in sorted(pairs, reverse=True):
            if k in used_tracks or j in used_dets:
                continue
            used_tracks.add(k)
            used_dets.add(j)
            tracks[k][t] = dets[j]
            last[k] = (t, dets[j].box)
        for j, d in enumerate(dets):
            if j not in used_dets:
                last[len(tracks)] = (t, d.box)
                tracks.append({t: d})
    return tracks


def _median_size(track: dict[int, FaceDetection]) -> float:
    return float(np.median([d.size for d in track.values()]))


def _choose_subject(tracks: list[dict[int, FaceDetection]]) -> dict[int, FaceDetection]:
    """The track with the largest summed face area, joined by the fragments of the same face.

    A fragment (the face lost for longer than the linking gap, e.g. the head turned away) joins
    when it never overlaps the subject in time and its face size is similar.
    """
    order = sorted(tracks, key=lambda tr: -sum(d.size ** 2 for d in tr.values()))
    subject = dict(order[0])
    size = _median_size(subject)
    for other in order[1:]:
        if len(other) < _MIN_FRAGMENT_FRAMES or subject.keys() & other.keys():
            continue
        if _SIZE_RATIO[0] <= _median_size(other) / size <= _SIZE_RATIO[1]:
            subject.update(other)
    return subject


def _fill(frames: np.ndarray, values: np.ndarray, total: int) -> np.ndarray:
    """Linear interpolation of values [k, ...] known at `frames` to all `total` frames, edge-hold."""
    flat = values.reshape(len(frames), -1)
    grid = np.arange(total)
    out = np.stack([np.interp(grid, frames, flat[:, c]) for c in range(flat.shape[1])], axis=1)
    return out.reshape((total,) + values.shape[1:])


def smooth_one_euro(x: np.ndarray, fps: float, scale: float, min_cutoff: float = _MIN_CUTOFF_HZ,
                    beta: float = _BETA, d_cutoff: float = _D_CUTOFF_HZ) -> np.ndarray:
    """Zero-phase One-Euro filter of a [T, ...] signal along time (forward, then backward pass).

    `scale` converts the signal's units to the units `beta` is given in (here: face sizes), so the
    same parameters serve small and large faces. The cutoff rises with the speed of the whole
    signal (mean over its components), so all points of a face are filtered alike.
    """
    if len(x) < 3:
        return x.astype(np.float64).copy()

    def one_pass(sig: np.ndarray) -> np.ndarray:
        te = 1.0 / fps

        def alpha(cutoff):
            tau = 1.0 / (2 * math.pi * cutoff)
            return 1.0 / (1.0 + tau / te)

        a_d = alpha(d_cutoff)
        out = np.empty_like(sig)
        prev, dprev = sig[0].copy(), 0.0
        out[0] = prev
        for t in range(1, len(sig)):
            speed = float(np.mean(np.abs(sig[t] - prev))) / te / scale
            dprev = a_d * speed + (1 - a_d) * dprev
            a = alpha(min_cutoff + beta * dprev)
            prev = a * sig[t] + (1 - a) * prev
            out[t] = prev
        return out

    sig = x.reshape(len(x), -1).astype(np.float64)
    # odd (point-symmetric) extension at both ends, as filtfilt does: a motion in progress at the
    # first/last frame continues instead of being pulled towards a held value
    pad = min(len(sig) - 1, max(3, int(round(fps))))
    head = 2 * sig[0] - sig[pad:0:-1]
    tail = 2 * sig[-1] - sig[-2:-pad - 2:-1]
    ext = np.concatenate([head, sig, tail])
    fwd = one_pass(ext)
    both = one_pass(fwd[::-1])[::-1]
    return both[pad:pad + len(sig)].reshape(x.shape)


def build_track(detections: list[list[FaceDetection]], frame_size: tuple[int, int], min_face_fraction: float,
                path_for_errors: str = "", *, fps: float = 25.0) -> FaceTrack:
    """Pick the subject among per-frame detections and return its filled, smoothed track.

    Raises NoFace when the subject is present in fewer than `min_face_fraction` of the frames.
    `frame_size` is (w, h). `fps` sets the time scale of the smoothing.
    """
    total = len(detections)
    where = f" in {path_for_errors}" if path_for_errors else ""
    if total == 0:
        raise NoFace(f"no frames to detect a face in{where}", path=path_for_errors or None)
    tracks = _link(detections)
    if not tracks:
        raise NoFace(f"no face found{where}" + ("" if total == 1 else f": {total} of {total} frames had no face"),
                     path=path_for_errors or None)
    subject = _choose_subject(tracks)
    found = len(subject)
    if found < min_face_fraction * total or found == 0:
        raise NoFace(f"too few frames with a face{where}: {total - found} of {total} frames had no face "
                     f"(at least {min_face_fraction:.0%} of frames must show the face)",
                     path=path_for_errors or None)

    frames = np.array(sorted(subject), dtype=np.float64)
    landmarks = _fill(frames, np.stack([subject[int(t)].landmarks for t in frames]).astype(np.float64), total)
    boxes = _fill(frames, np.stack([subject[int(t)].box for t in frames]).astype(np.float64), total)
    detected = np.zeros(total, dtype=bool)
    detected[frames.astype(np.int64)] = True

    face_size = float(np.median(np.sqrt(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1).clip(min=1.0))))
    landmarks = smooth_one_euro(landmarks, fps=fps, scale=face_size)
    boxes = smooth_one_euro(boxes, fps=fps, scale=face_size)
    # landmarks of a face at the frame edge may lie outside the frame (that is right: clipping
    # would distort the alignment); only absurd values are bounded
    w, h = frame_size
    landmarks[..., 0] = landmarks[..., 0].clip(-w, 2 * w)
    landmarks[..., 1] = landmarks[..., 1].clip(-h, 2 * h)
    return FaceTrack(landmarks=landmarks.astype(np.float32), boxes=boxes.astype(np.float32), detected=detected)
