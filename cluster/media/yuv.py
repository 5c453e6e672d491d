"""Frames kept as the decoder gives them and the encoder takes them: yuv420p, I420 layout.

A render keeps its frames as `[n, H * 3 // 2, W]` uint8 arrays (the Y plane's H rows, then the U
and the V plane's (H/2) x (W/2) values, as OpenCV's `COLOR_YUV2BGR_I420` reads them), half the
bytes of BGR, and converts to BGR only the regions it works on: the face region a crop is cut from
and the region paste-back blends into. OpenCV's I420 conversions give each 2x2 block one chroma
value, so a region whose corners lie on even pixel coordinates converts exactly as the same pixels
of the whole frame would (`tests/test_media.py` checks it), and pixels outside every region stay the
decoder's bytes, untouched (a whole-frame BGR round trip moved the rare colours outside the BGR
gamut).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import av

#: A box in frame pixels: (x0, y0, x1, y1), x1 and y1 exclusive.
Box = tuple[int, int, int, int]


def i420_shape(width: int, height: int) -> tuple[int, int]:
    """The array shape of one I420 frame of `width` x `height` (both even)."""
    return height * 3 // 2, width


def frame_size(frame: np.ndarray) -> tuple[int, int]:
    """(width, height) of an I420 frame `[H * 3 // 2, W]`."""
    return frame.shape[1], frame.shape[0] * 2 // 3


def planes(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of an I420 frame's Y [H, W], U and V [H/2, W/2] planes. The chroma planes are cut from
    the bytes after the Y plane, not from whole rows of the frame's width: where H/2 is odd (854,
    362, ...) the U plane ends in the middle of a row."""
    w, h = frame_size(frame)
    n = (h // 2) * (w // 2)
    if not frame.flags.c_contiguous:  # its chroma would be a copy, and writes into it lost
        raise ValueError("an I420 frame must be C-contiguous")
    chroma = frame[h:].reshape(-1)
    return frame[:h], chroma[:n].reshape(h // 2, w // 2), chroma[n:2 * n].reshape(h // 2, w // 2)


def even_box(box: Box, width: int, height: int) -> Box:
    """`box` widened to even corners (a region that converts exactly) and clipped to the frame."""
    x0, y0, x1, y1 = box
    return max(x0 - x0 % 2, 0), max(y0 - y0 % 2, 0), min(x1 + x1 % 2, width), min(y1 + y1 % 2, height)


def _region_planes(frame: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y, U and V samples of an I420 frame's region `box` (even corners)."""
    x0, y0, x1, y1 = box
    if (x0 | y0 | x1 | y1) & 1:
        raise ValueError(f"region {box} must have even corners")
    y, u, v = planes(frame)
    cy, cx = slice(y0 // 2, y1 // 2), slice(x0 // 2, x1 // 2)
    return y[y0:y1, x0:x1], u[cy, cx], v[cy, cx]


def region_to_bgr(frame: np.ndarray, box: Box) -> np.ndarray:
    """The BGR pixels [y1 - y0, x1 - x0, 3] of an I420 frame's region `box` (even corners)."""
    y, u, v = _region_planes(frame, box)
    h, w = y.shape
    packed = np.empty((h * 3 // 2, w), np.uint8)
    packed[:h] = y
    chroma = packed[h:].reshape(2, h // 2, w // 2)
    chroma[0], chroma[1] = u, v
    return cv2.cvtColor(packed, cv2.COLOR_YUV2BGR_I420)


def region_from_bgr(frame: np.ndarray, box: Box, bgr: np.ndarray, changed: np.ndarray | None = None) -> None:
    """Write BGR pixels `bgr` [y1 - y0, x1 - x0, 3] into an I420 frame's region `box` (even corners).
    With `changed` ([y1 - y0, x1 - x0] bool), only those pixels' luma and the chroma of
    the 2x2 blocks holding one are written: the others keep their bytes (BGR -> I420 does not give back
    every yuv value exactly: colours outside BGR's gamut move by a few levels)."""
    y, u, v = _region_planes(frame, box)
    h, w = y.shape
    packed = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2YUV_I420)
    chroma = packed[h:].reshape(2, h // 2, w // 2)
    if changed is None:
        y[...], u[...], v[...] = packed[:h], chroma[0], chroma[1]
        return
    np.copyto(y, packed[:h], where=changed)
    blocks = changed[0::2, 0::2] | changed[0::2, 1::2] | changed[1::2, 0::2] | changed[1::2, 1::2]
    np.copyto(u, chroma[0], where=blocks)
    np.copyto(v, chroma[1], where=blocks)


def batch_problem(frames: np.ndarray, width: int, height: int) -> str | None:
    """What is wrong with `frames` as a batch of I420 frames of `width` x `height`; None when nothing."""
    shape = i420_shape(width, height)
    if frames.ndim == 3 and frames.dtype == np.uint8 and frames.shape[1:] == shape:
        return None
    return f"expected I420 frames [n, {shape[0]}, {shape[1]}] uint8, got {list(frames.shape)} {frames.dtype}"


def to_bgr(frame: np.ndarray) -> np.ndarray:
    """A whole I420 frame as BGR [H, W, 3]."""
    return cv2.cvtColor(frame, cv2.COLOR_YUV2BGR_I420)


def from_av_frame(frame: av.VideoFrame, dst: np.ndarray) -> np.ndarray:
    """Copy a decoded frame into `dst` (`[H * 3 // 2, W]` uint8) as I420: a yuv420p frame's planes
    as they are, another format through swscale."""
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    y, u, v = planes(dst)
    for plane, into in zip(frame.planes, (y, u, v)):
        rows, cols = into.shape
        if (plane.height, plane.width) != (rows, cols):
            raise ValueError(f"frame plane {plane.width}x{plane.height} does not fit {cols}x{rows}")
        rows_of_plane = np.frombuffer(plane, np.uint8, count=plane.line_size * rows).reshape(rows, plane.line_size)
        into[...] = rows_of_plane[:, :cols]
    return dst
