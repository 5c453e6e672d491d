"""Random-access frame reading from a normalised (CFR, short closed GOP) template with PyAV."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation

from cluster.config import Settings, get_settings
from cluster.errors import MediaError
from cluster.media.ffmpeg import file_url
from cluster.media.probe import count_packets
from cluster.media.yuv import from_av_frame, i420_shape

# Full-chroma, accurately rounded yuv420p -> BGR: the default swscale path darkens frames by
# about a level and smears chroma, which shows as a difference outside the paste mask.
_EXACT_RGB = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT


def frame_to_bgr(frame: av.VideoFrame, dst: np.ndarray | None = None) -> np.ndarray:
    """A decoded frame as BGR uint8 [H, W, 3].

    yuv420p (every normalised template) goes through OpenCV's BT.601 conversion: about 4x cheaper
    than swscale's accurate path, and its chroma (one value per 2x2 block) survives the encoder's
    2x2 chroma averaging exactly, so unchanged pixels round-trip. Other formats use swscale.
    `dst` ([H, W, 3] uint8, contiguous): written in place and returned.
    """
    if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
        bgr = cv2.cvtColor(frame.to_ndarray(format="yuv420p"), cv2.COLOR_YUV2BGR_I420, dst=dst)
    else:
        bgr = frame.to_ndarray(format="bgr24", interpolation=_EXACT_RGB)
    if dst is not None and bgr is not dst:  # cv2 allocates anew, silently, for a dst that does not fit
        dst[...] = bgr  # (a frame of another size raises here rather than leave dst unwritten)
    return bgr if dst is None else dst


def size_decoder_threads(stream) -> None:
    """libavcodec's decoder threads for `stream`: this process's thread plan (an actor's Ray CPUs,
    `cluster.threads`), else the library's default (one per core, frame and slice threads)."""
    from cluster.threads import current

    plan = current()
    stream.thread_type = "AUTO"
    if plan is not None:
        stream.codec_context.thread_count = plan.decoder


def _runs(sorted_unique: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs [(first, last), ...] of a sorted array of unique ints."""
    if sorted_unique.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [sorted_unique.size - 1]))
    return [(int(sorted_unique[a]), int(sorted_unique[b])) for a, b in zip(starts, ends)]


class TemplateReader:
    """Reads template frames by index as BGR (`read`) or I420 (`read_yuv`) uint8 arrays, keeping the
    container open.

    Frame `i` has pts `first_pts + round(i / fps / time_base)`. `read` decodes each contiguous
    run of the requested indices once: it seeks (backward, to the keyframe) only when the run
    starts behind the decoder or more than a GOP ahead of it, so consecutive batches decode
    sequentially without seeking. `seeks` counts the seeks made.
    """

    def __init__(self, path: str | os.PathLike, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.path = str(path)
        self.seeks = 0
        self._frames: Iterator[av.VideoFrame] | None = None
        self._pending: av.VideoFrame | None = None  # decoded, not yet consumed
        self._next_index: int | None = None  # index of the frame the decoder yields next
        self._first_pts = 0
        try:
            self._container = av.open(file_url(self.path), options={"protocol_whitelist": "file"},
                                      timeout=self.settings.probe_timeout_s)
        except (av.error.FFmpegError, OSError) as exc:
            raise MediaError(f"cannot open template {self.path}: {exc}", path=self.path,
                             stage="decode", cause=str(exc)) from exc
        try:
            self._open_stream()
        except BaseException:
            self.close()
            raise

    def _open_stream(self) -> None:
        if not self._container.streams.video:
            raise MediaError(f"template {self.path} has no video stream", path=self.path,
                             stage="decode")
        self._stream = stream = self._container.streams.video[0]
        size_decoder_threads(stream)
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise MediaError(f"template {self.path} has no frame rate", path=self.path,
                             stage="decode")
        self.fps = Fraction(rate.numerator, rate.denominator)
        self.width, self.height = stream.codec_context.width, stream.codec_context.height
        self.time_base = Fraction(stream.time_base.numerator, stream.time_base.denominator)
        try:  # exact, by demuxing (cheap); header counts include frames an edit list cuts
            self.frame_count = count_packets(self._container, stream)
            self._container.seek(0)
        except av.error.FFmpegError as exc:
            raise MediaError(f"cannot index template {self.path}: {exc}", path=self.path,
                             stage="decode", cause=str(exc)) from exc
        self._frames = self._container.decode(stream)
        first = self._next_frame()
        if first is None:
            raise MediaError(f"template {self.path} has no decodable frame", path=self.path,
                             stage="decode")
        self._first_pts = first.pts or 0  # frame 0's pts: the offset of the index <-> pts map
        self._pending = first
        self._next_index = 0

    # --- index <-> pts ------------------------------------------------------------------
    def pts_of(self, index: int) -> int:
        """The presentation timestamp (stream time base) of frame `index`."""
        return self._first_pts + round(index / self.fps / self.time_base)

    def index_of(self, pts: int) -> int:
        """The frame index of presentation timestamp `pts`."""
        return round((pts - self._first_pts) * self.time_base * self.fps)

    # --- decoding -------------------------------------------------------------------------
    def _next_frame(self) -> av.VideoFrame | None:
        try:
            return next(self._frames)
        except StopIteration:
            return None
        except av.error.FFmpegError as exc:
            raise MediaError(f"decoding template {self.path} failed near frame {self._next_index}: "
                             f"{exc}", path=self.path, stage="decode", cause=str(exc)) from exc

    def _seek(self, index: int) -> None:
        if self._frames is not None:
            self._frames.close()
        self._pending = None
        try:
            self._container.seek(self.pts_of(index), stream=self._stream, backward=True,
                                 any_frame=False)
        except av.error.FFmpegError as exc:
            raise MediaError(f"seeking template {self.path} to frame {index} failed: {exc}",
                             path=self.path, stage="decode", cause=str(exc)) from exc
        self.seeks += 1
        self._frames = self._container.decode(self._stream)
        self._next_index = None

    def _decode_run(self, first: int, last: int, out: dict[int, np.ndarray], convert) -> None:
        """Decode frames first..last into `out[index]` (preallocated arrays) with `convert(frame, dst)`."""
        ahead = self._next_index
        if ahead is None or first < ahead or first - ahead > self.settings.gop_frames:
            self._seek(first)
            if self._decode_until(first, last, out, convert):
                return
            # the seek landed after `first` (no keyframe before it in the index): from the start
            self._seek(0)
        if not self._decode_until(first, last, out, convert):
            raise MediaError(f"template {self.path}: decoding frame {first} went past it without "
                             f"producing it", path=self.path, stage="decode")

    def _decode_until(self, first: int, last: int, out: dict[int, np.ndarray], convert) -> bool:
        """Decode forward keeping frames first..last; False when the decoder starts past `first`."""
        started = False
        while True:
            if self._pending is not None:
                frame, self._pending = self._pending, None
            else:
                frame = self._next_frame()
            if frame is None:
                raise MediaError(f"template {self.path} ended before frame {last} "
                                 f"(frame count {self.frame_count}): file truncated?",
                                 path=self.path, stage="decode")
            index = self.index_of(frame.pts) if frame.pts is not None else (self._next_index or 0)
            self._next_index = index + 1
            if not started and index > first:
                return False
            started = True
            if index >= first:
                convert(frame, out[index])
            if index >= last:
                return True

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Frames `indices` (any order, repeats allowed) as `[len(indices), H, W, 3]` uint8 BGR.
        Raises `ValueError` for an index outside `[0, frame_count)`."""
        return self._read(indices, (self.height, self.width, 3), lambda frame, dst: frame_to_bgr(frame, dst=dst))

    def read_yuv(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Frames `indices` as `[len(indices), H * 3 // 2, W]` uint8 I420 (`cluster.media.yuv`): the
        decoder's own bytes, half of BGR's, no conversion. Otherwise as `read`."""
        return self._read(indices, i420_shape(self.width, self.height), from_av_frame)

    def _read(self, indices: Sequence[int] | np.ndarray, shape: tuple[int, ...], convert) -> np.ndarray:
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size == 0:
            return np.empty((0, *shape), np.uint8)
        if wanted.min() < 0 or wanted.max() >= self.frame_count:
            bad = wanted[(wanted < 0) | (wanted >= self.frame_count)][0]
            raise ValueError(f"frame index {bad} outside template {self.path} "
                             f"(0..{self.frame_count - 1})")
        unique, first_pos = np.unique(wanted, return_index=True)
        out = np.empty((wanted.size, *shape), np.uint8)
        # each distinct frame is decoded straight into its first place in `out`; repeats copied after
        place = dict(zip(unique.tolist(), first_pos.tolist()))
        for first, last in _runs(unique):
            self._decode_run(first, last, {i: out[place[i]] for i in range(first, last + 1)}, convert)
        for k, i in enumerate(wanted.tolist()):
            if k != place[i]:
                out[k] = out[place[i]]
        return out

    def close(self) -> None:
        """Close the container (idempotent)."""
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        self._pending = None
        self._container.close()

    def __enter__(self) -> "TemplateReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_frames(path: str | os.PathLike, batch_size: int,
                settings: Settings | None = None, only: set[int] | None = None) -> Iterator[np.ndarray]:
    """All frames of a video in order, as `[<=batch_size, H, W, 3]` uint8 BGR batches (`only`: just the frames of
    those indices, decoded in order as the others are, but only they converted)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    s = settings or get_settings()
    try:
        container = av.open(file_url(path), options={"protocol_whitelist": "file"},
                            timeout=s.probe_timeout_s)
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"cannot open video {path}: {exc}", path=str(path), stage="decode",
                         cause=str(exc)) from exc
    with container:
        if not container.streams.video:
            raise MediaError(f"{path} has no video stream", path=str(path), stage="decode")
        stream = container.streams.video[0]
        size_decoder_threads(stream)
        batch: list[np.ndarray] = []
        try:
            for index, frame in enumerate(container.decode(stream)):
                if only is not None and index not in only:
                    continue
                batch.append(frame_to_bgr(frame))
                if len(batch) == batch_size:
                    yield np.stack(batch)
                    batch = []
        except av.error.FFmpegError as exc:
            raise MediaError(f"decoding {path} failed: {exc}", path=str(path), stage="decode",
                             cause=str(exc)) from exc
        if batch:
            yield np.stack(batch)
