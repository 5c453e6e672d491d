"""Encoding BGR frames to an H.264 mp4 segment.

Frames are converted to yuv420p in this process with OpenCV's BT.601 conversion (the inverse of the
one `decode.frame_to_bgr` uses, so unchanged pixels round-trip: about 30 % less encoder CPU than
swscale's accurate BGR path). Then, for libx264 (`Settings.encode_in_process`, the default),
PyAV's libx264 encodes them in this process, on an encoder thread the process keeps (one per
segment encoded at once; libx264 runs without the GIL, so the caller's next batch is prepared
meanwhile): no ffmpeg process started per segment, about 90 ms of CPU less per 50-frame 720p
segment. Otherwise (h264_nvenc, `encode_in_process` false, or a PyAV without libx264) an ffmpeg
child reads them from a pipe. Both write the same stream: the same libx264 options and thread
type, so the same parameter sets, time base, keyframes and pictures.

Segments of one job share encoder, size, frame rate, pixel format and GOP settings and start with
an IDR frame (closed GOPs), so `finalize_output` can concatenate them by stream copy.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import select
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from cluster.config import Settings, get_settings
from cluster.errors import EncodeError
from cluster.media.ffmpeg import FFmpeg, ffmpeg_binary, ffmpeg_has_encoder, file_url, stderr_summary, wait_exit
from cluster.media.yuv import batch_problem, i420_shape

log = logging.getLogger("lipsync.encode")

#: Bytes handed to the pipe per write call.
WRITE_CHUNK_BYTES = 1 << 20


def segment_gop(settings: Settings, fps: Fraction) -> int:
    """Frames per closed GOP of rendered segments: about two seconds."""
    return max(settings.gop_frames, round(2 * fps))


def x264_threads() -> int | None:
    """The encoder's threads from this process's thread plan (`cluster.threads.current()`: an
    actor's Ray CPUs); None without a plan: the encoder's default (1.5 per core)."""
    from cluster.threads import current

    plan = current()
    return plan.x264 if plan else None


@functools.cache
def pyav_has_libx264() -> bool:
    """Whether this process's PyAV can encode with libx264 (PyPI's wheels can; a PyAV built against
    another FFmpeg may not: its segments then go to an ffmpeg child, as before)."""
    import av

    if "libx264" in av.codecs_available:
        return True
    log.warning("PyAV %s has no libx264 encoder: segments are encoded by ffmpeg children", av.__version__)
    return False


#: x264 parameters of segments beyond the preset: closed GOPs (segments are concatenated) and no
#: scene-cut search (segments start with an IDR frame every ~2 s anyway; a talking head has no
#: cuts, and a template with one still encodes right: the frame after it is a P-frame of mostly
#: intra blocks). At `superfast`, 720p, one thread: the same bytes for the bench template, 1-15 %
#: less CPU per frame.
X264_PARAMS = "open-gop=0:scenecut=0"

#: From this many pixels a frame (848x480), segments take the preset's B-frames in a fixed pattern
#: (`b-adapt=0`) instead of x264's per-frame search for it. On the bench template, `superfast`, one
#: thread: at 848x480, 960x544, 720p and 1080p the same bytes and PSNR as the search (it picked
#: the same pattern) for 4-24 % less x264 CPU per frame (720p 7.1 -> 6.0 ms, 1080p 17.7 -> 13.4
#: ms; a fast pan at 720p came out 4 % smaller at the same PSNR), and x264 is over half of a
#: compositor's CPU. Below it the search picks fewer B-frames: at 320x240 the fixed pattern gave
#: 44 % fewer bytes and 0.9 dB less, past `tests/test_lipsync_quality.py`'s silent-mouth bound.
FIXED_BFRAMES_FROM_PIXELS = 848 * 480


def x264_params(width: int, height: int) -> str:
    """libx264's `x264-params` of a segment of `width` x `height` frames."""
    fixed = width * height >= FIXED_BFRAMES_FROM_PIXELS
    return f"{X264_PARAMS}:b-adapt=0" if fixed else X264_PARAMS


def x264_options(settings: Settings, width: int, height: int) -> dict[str, str]:
    """libx264's options for segments: the same in this process and in an ffmpeg child, so both
    write the same stream (the GOP, `segment_gop`, is shared with NVENC's)."""
    return {"preset": settings.preset, "crf": str(settings.crf), "x264-params": x264_params(width, height)}


COLOR_OPTIONS = ("color_primaries", "color_trc", "colorspace")


def color_args(color: list[int] | None) -> list[str]:
    """ffmpeg options tagging frames (as input options of a raw pipe: the encoder takes the frames' tags)
    or an encoder's VUI with colour tags [primaries, transfer, matrix] (`VideoStreamInfo.color`)."""
    return [arg for option, code in zip(COLOR_OPTIONS, color or ()) for arg in (f"-{option}", str(int(code)))]


def encoder_args(settings: Settings, fps: Fraction, width: int, height: int, threads: int | None = None,
                 color: list[int] | None = None) -> list[str]:
    """Video codec arguments shared by every segment of a job (H.264, yuv420p, closed GOPs of
    about two seconds; every segment starts with an IDR frame). `threads`: the encoder's threads
    (`-threads`, x264's frame threads and lookahead), default this process's thread plan
    (`cluster.threads.current()`: an actor's Ray CPUs); None without a plan: the encoder's
    default (1.5 per core)."""
    if threads is None:
        threads = x264_threads()
    gop = str(segment_gop(settings, fps))
    enc = settings.video_encoder
    if not ffmpeg_has_encoder(enc, settings):
        raise EncodeError(f"ffmpeg ({ffmpeg_binary(settings)}) has no {enc} encoder; set "
                          f"LIPSYNC_VIDEO_ENCODER=libx264", stage="encode")
    if enc == "libx264":
        codec = ["-c:v", "libx264"]
        for key, value in x264_options(settings, width, height).items():
            codec += [f"-{key}", value]
    elif enc == "h264_nvenc":
        codec = ["-c:v", "h264_nvenc", "-preset", "p4", "-rc", "vbr", "-cq", str(settings.crf),
                 "-b:v", "0"]
    else:
        raise EncodeError(f"unsupported video encoder {enc!r} (expected libx264 or h264_nvenc)",
                          stage="encode")
    if threads:
        codec += ["-threads", str(int(threads))]
    codec += color_args(color)  # the template's colour tags, as the child's VUI
    # accurate_rnd: BGR -> yuv420p without swscale's ~2-level darkening (frames must round-trip).
    return [*codec, "-sws_flags", "accurate_rnd+full_chroma_int", "-pix_fmt", "yuv420p", "-g", gop,
            "-keyint_min", gop,
            "-r", f"{fps.numerator}/{fps.denominator}"]


class SegmentEncoder:
    """Context manager encoding `[n, H, W, 3]` uint8 BGR frames into the H.264 mp4 segment `path`
    (in this process or through an ffmpeg child, see the module). `close()` returns the number
    of frames written. On an exception inside the `with` block the encoder is stopped and the
    partial file removed. Every wait is bounded: a write that makes no progress for
    `stall_timeout_s` and a close that takes longer than `ffmpeg_timeout_s` raise EncodeError."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: Fraction,
                 settings: Settings | None = None, color: list[int] | None = None) -> None:
        self.settings = settings or get_settings()
        self.path = str(path)
        self.width, self.height, self.fps = int(width), int(height), Fraction(fps)
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise EncodeError(f"segment {self.path}: frame size {width}x{height} must be positive "
                              f"and even (yuv420p)", path=self.path, stage="encode")
        self.frames_written = 0
        self._closed = False
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        in_process = (self.settings.encode_in_process and self.settings.video_encoder == "libx264"
                      and pyav_has_libx264())
        sink = _LibavSink if in_process else _FFmpegSink  # no reference back to this object: no cycle
        self._sink: _LibavSink | _FFmpegSink = sink(self.path, self.width, self.height, self.fps, self.settings, color)

    @property
    def waited_s(self) -> float:
        """Seconds the writer spent waiting for the encoder (a free buffer, the pipe, the finish)."""
        return self._sink.waited_s

    def write(self, frames: np.ndarray) -> None:
        """Append frames `[n, H, W, 3]` uint8 BGR (or one `[H, W, 3]` frame). A write that makes no
        progress for `stall_timeout_s`, or to an encoder that failed, raises EncodeError."""
        self._check_open()
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise EncodeError(f"segment {self.path}: expected frames [n, {self.height}, "
                              f"{self.width}, 3] uint8, got {list(frames.shape)} {frames.dtype}",
                              path=self.path, stage="encode")
        n = frames.shape[0]

        def convert_and_send() -> None:
            yuv = self._sink.buffer(n)
            for k in range(n):
                cv2.cvtColor(frames[k], cv2.COLOR_BGR2YUV_I420, dst=yuv[k])
            self._sink.send(yuv, n)

        self._deliver(n, convert_and_send)

    def write_yuv(self, frames: np.ndarray) -> None:
        """Append I420 frames `[n, H * 3 // 2, W]` uint8 (`cluster.media.yuv`) as they are, without a
        conversion or a copy: the encoder reads them until it has encoded them, so the caller gives
        them up (it must not change them). Otherwise as `write`."""
        self._check_open()
        problem = batch_problem(frames, self.width, self.height)
        if problem:
            raise EncodeError(f"segment {self.path}: {problem}", path=self.path, stage="encode")
        n = frames.shape[0]
        self._deliver(n, lambda: self._sink.send_owned(np.ascontiguousarray(frames), n))

    def _check_open(self) -> None:
        if self._closed:
            raise EncodeError(f"segment {self.path} is already closed", path=self.path, stage="encode")

    def _deliver(self, n: int, send) -> None:
        """Run `send` (which hands n frames to the sink) and count them; a sink that failed is closed."""
        try:
            send()
        except EncodeError:
            self._closed = True  # the sink is stopped and the partial file removed
            raise
        self.frames_written += n

    def close(self) -> int:
        """Finish the segment; returns the frames written. Waits up to `ffmpeg_timeout_s` and
        raises EncodeError (the encoder's error output in `cause`) on a timeout or a failure."""
        if self._closed:
            return self.frames_written
        self._closed = True
        try:
            self._sink.finish()
            if self.frames_written == 0:
                raise EncodeError(f"segment {self.path} has no frames", path=self.path,
                                  stage="encode")
            return self.frames_written
        except BaseException:
            self._sink.stop()
            Path(self.path).unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        """Stop the encoder and remove the partial file (idempotent)."""
        self._closed = True
        self._sink.stop()
        Path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> "SegmentEncoder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class _EncoderThreads:
    """The process's libx264 threads, each kept for the process's life and lent to one segment
    encoder at a time: as many as segments were ever encoded at once here (one, unless a compositor
    renders several chunks at once, `Settings.chunks_per_compositor`), so those encode side by side.
    Kept, because libx264's frame buffers then always come from the same glibc arenas: a thread per
    segment drew a different arena each time (Ray's own threads use up glibc's arena limit, after
    which new threads take arenas in turn), each of which kept the freed buffers, and a
    compositor's PSS doubled to ~570 MiB over a job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[concurrent.futures.ThreadPoolExecutor] = []
        self.made = 0

    def lend(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.made += 1
            return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"x264-{self.made}")

    def take_back(self, thread: concurrent.futures.ThreadPoolExecutor) -> None:
        with self._lock:
            self._free.append(thread)


_encoder_threads = _EncoderThreads()


class _LibavSink:
    """libx264 through PyAV in this process, on an encoder thread of the process's (lent for the
    segment, `_EncoderThreads`): the writer fills one yuv420p buffer while the thread encodes the
    other (two buffers; a buffer is filled again only once the batch that used it is encoded)."""

    def __init__(self, path: str, width: int, height: int, fps: Fraction, settings: Settings,
                 color: list[int] | None = None) -> None:
        import av

        self.path, self.width, self.height, self.settings = path, width, height, settings
        self.frames_sent = 0
        self.waited_s = 0.0
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()  # each holds a buffer
        self._pts = 0
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._open = True
        gop = segment_gop(settings, fps)
        options = {**x264_options(settings, width, height), "g": str(gop), "keyint_min": str(gop)}
        try:
            self._container = av.open(file_url(path), "w", format="mp4",
                                      options={"movflags": "+faststart", "protocol_whitelist": "file"})
        except av.FFmpegError as exc:
            raise EncodeError(f"encoding segment {path} failed: cannot create it: {exc}",
                              path=path, stage="encode", cause=str(exc)) from None
        try:
            stream = self._container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = options
            # x264's frame threads, as ffmpeg gives it (PyAV's default, slice threads, cuts each
            # frame into slices: another bitstream than the child's for the same frames)
            stream.codec_context.thread_type = "FRAME"
            threads = x264_threads()
            if threads:
                stream.codec_context.thread_count = threads
            for option, code in zip(COLOR_OPTIONS, color or ()):  # the template's colour tags (VUI)
                setattr(stream.codec_context, option, int(code))
            with _libav_errors():  # the error names libx264's own complaint
                stream.codec_context.open()
        except av.FFmpegError as exc:
            self._container.close()
            Path(path).unlink(missing_ok=True)
            raise EncodeError(f"encoding segment {path} failed: libx264 could not start: {exc}",
                              path=path, stage="encode", cause=str(exc)) from None
        self._stream = stream
        self._thread: concurrent.futures.ThreadPoolExecutor | None = _encoder_threads.lend()
        self._last_task: concurrent.futures.Future | None = None

    # --- on the encoder thread ---------------------------------------------------------------
    def _encode(self, yuv: np.ndarray, n: int) -> np.ndarray:
        import av

        if self._error is None:
            try:
                for k in range(n):
                    if self._stopping.is_set():
                        break
                    frame = av.VideoFrame.from_ndarray(yuv[k], format="yuv420p")
                    frame.pts = self._pts
                    self._pts += 1
                    for packet in self._stream.encode(frame):
                        self._container.mux(packet)
            except BaseException as exc:  # the writer's next call reports it
                self._error = exc
        return yuv

    def _close(self, flush: bool) -> None:
        if not self._open:
            return
        self._open = False
        try:
            if flush and self._error is None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
            self._container.close()
        except BaseException as exc:
            if flush and self._error is None:
                self._error = exc
            else:  # a failed or aborted segment's file, removed by the writer
                log.debug("closing the unfinished segment %s", self.path, exc_info=True)

    # --- on the writer's thread --------------------------------------------------------------
    def _wait(self, future: concurrent.futures.Future, limit: float, what: str):
        t = time.monotonic()
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            raise self._failed(f"{what} within {limit:g} s") from None
        finally:
            self.waited_s += time.monotonic() - t

    def buffer(self, n: int) -> np.ndarray:
        """A yuv420p buffer for `n` frames that the encoder thread is done with."""
        shape = i420_shape(self.width, self.height)
        if len(self._pending) < 2:  # the first two batches: a buffer each
            return np.empty((n, *shape), np.uint8)
        buf = self._wait(self._pending.popleft(), self.settings.stall_timeout_s, "libx264 took no frames")
        if self._error is not None:
            raise self._failed("libx264 failed")
        return buf if buf.shape[0] >= n else np.empty((n, *shape), np.uint8)

    def send(self, yuv: np.ndarray, n: int) -> None:
        if self._error is not None:
            raise self._failed("libx264 failed")
        self._pending.append(self._submit(self._encode, yuv, n))
        self.frames_sent += n

    def send_owned(self, yuv: np.ndarray, n: int) -> None:
        """`send` frames the caller gave up (`SegmentEncoder.write_yuv`): no buffer of this sink's,
        and at most two batches queued, as with the buffers. A batch is let go once encoded."""
        while self._pending and (self._pending[0].done() or len(self._pending) >= 2):
            self._wait(self._pending.popleft(), self.settings.stall_timeout_s, "libx264 took no frames")
        if self._error is not None:
            raise self._failed("libx264 failed")

        def encode() -> None:  # not `submit(self._encode, ...)`: its future would keep the batch it
            self._encode(yuv, n)  # returns (for `buffer`'s reuse) until popped; this one keeps nothing

        self._pending.append(self._submit(encode))
        self.frames_sent += n

    def _failed(self, what: str) -> EncodeError:
        exc = self._error
        self.stop()
        Path(self.path).unlink(missing_ok=True)
        if exc is not None:
            what = f"{what}: {exc}"
        return EncodeError(f"encoding segment {self.path} failed after {self.frames_sent} frames: {what}",
                           path=self.path, stage="encode", cause=str(exc) if exc else what)

    def finish(self) -> None:
        done = self._submit(self._close, True)
        self._wait(done, self.settings.ffmpeg_timeout_s, "libx264 did not finish")
        self._give_back_thread()
        self._pending.clear()
        if self._error is not None:
            raise self._failed("libx264 failed")

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        self._last_task = self._thread.submit(fn, *args)
        return self._last_task

    def _give_back_thread(self) -> None:
        """The encoder thread back to the process's, once this segment's last task has run on it
        (one still running, e.g. a flush that did not end in time, is not lent again: a new
        thread serves the next segment)."""
        if self._thread is not None:
            if self._last_task is None or self._last_task.done():
                _encoder_threads.take_back(self._thread)
            else:
                log.warning("segment %s: its encoder thread is still busy; it is not lent again", self.path)
            self._thread = None

    def stop(self) -> None:
        """Stop encoding (after the frame being encoded) and close the file (idempotent)."""
        self._stopping.set()
        self._pending.clear()
        if self._open and self._thread is not None:
            done = self._submit(self._close, False)
            try:
                done.result(timeout=self.settings.stall_timeout_s)
            except concurrent.futures.TimeoutError:
                log.warning("segment %s: the encoder thread did not stop within %g s", self.path,
                            self.settings.stall_timeout_s)
                self._thread = None
                return
        self._give_back_thread()


#: libav's log level is the process's: one opening at a time sets and restores it (a compositor
#: rendering two chunks at once opens two encoders at once)
_libav_log_lock = threading.Lock()


@contextlib.contextmanager
def _libav_errors():
    """Within: libav's error messages are kept (PyAV then adds the last one to its exceptions)."""
    import av.logging

    if not _libav_log_lock.acquire(timeout=30.0):  # held only while a codec opens
        raise EncodeError("another libx264 encoder of this process did not open within 30 s", stage="encode")
    try:
        level = av.logging.get_level()
        av.logging.set_level(av.logging.ERROR)
        try:
            with av.logging.Capture():
                yield
        finally:
            av.logging.set_level(level)
    finally:
        _libav_log_lock.release()


class _FFmpegSink:
    """An ffmpeg child encoding the yuv420p frames it reads from a pipe."""

    def __init__(self, path: str, width: int, height: int, fps: Fraction, settings: Settings,
                 color: list[int] | None = None) -> None:
        self.path, self.width, self.height, self.settings = path, width, height, settings
        self.frames_sent = 0
        self.waited_s = 0.0
        self._yuv: np.ndarray | None = None  # the yuv420p batch buffer, reused between writes
        args = ["-loglevel", "error",
                "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}",
                "-framerate", f"{fps.numerator}/{fps.denominator}",
                *color_args(color),  # the frames' own tags (ffmpeg's encoder takes the frames', not only its options)
                "-i", "pipe:0",
                "-an", *encoder_args(settings, fps, width, height, color=color),
                "-movflags", "+faststart", "-f", "mp4", file_url(path)]
        self._run = FFmpeg(args, settings=settings, stage="encode", path=path, stdin=True,
                           error=EncodeError, timeout_error=EncodeError)
        self._proc = self._run.proc
        self._stdin_fd = self._proc.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)
        self._done = False

    def buffer(self, n: int) -> np.ndarray:
        if self._yuv is None or self._yuv.shape[0] < n:
            self._yuv = np.empty((n, *i420_shape(self.width, self.height)), np.uint8)
        return self._yuv

    def _fail(self, what: str, grace: float = 0.0) -> EncodeError:
        """Kill (after `grace` seconds for it to exit by itself) and reap ffmpeg, remove the
        partial file; an EncodeError carrying the exit code and stderr. The encoder is closed."""
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        code = self._proc.poll()
        self._run.kill()
        if code is not None:
            what += f" (ffmpeg exit code {code})"
        tail = self._run.stderr_tail()
        self._done = True
        self._run.close()
        Path(self.path).unlink(missing_ok=True)
        return EncodeError(f"encoding segment {self.path} failed: {what}: {stderr_summary(tail)}",
                           path=self.path, stage="encode", cause=tail)

    def send(self, yuv: np.ndarray, n: int) -> None:
        data = memoryview(yuv[:n]).cast("B")
        stall = self.settings.stall_timeout_s
        offset = 0
        deadline = time.monotonic() + stall
        writable = select.poll()  # (select.select refuses descriptors past 1023: a busy worker's pipe can be one)
        writable.register(self._stdin_fd, select.POLLOUT)
        while offset < len(data):
            if self._proc.poll() is not None:
                raise self._fail(f"ffmpeg exited after {self.frames_sent} frames")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"ffmpeg accepted no data for {stall:g} s")
            t = time.monotonic()
            ready = writable.poll(min(remaining, 1.0) * 1000)
            self.waited_s += time.monotonic() - t
            if not ready:
                continue
            try:
                offset += os.write(self._stdin_fd, data[offset:offset + WRITE_CHUNK_BYTES])
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError) as exc:
                raise self._fail(f"writing to ffmpeg failed after {self.frames_sent} frames "
                                 f"({exc.strerror or exc})", grace=5.0) from None
            deadline = time.monotonic() + stall
        self.frames_sent += n

    send_owned = send  # written to the pipe before it returns: nothing kept

    def finish(self) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass  # a dead encoder; its exit code and stderr explain it below
        t = time.monotonic()
        try:
            code = wait_exit(self._proc, self.settings.ffmpeg_timeout_s)
        except subprocess.TimeoutExpired:
            limit = self.settings.ffmpeg_timeout_s
            raise self._fail(f"ffmpeg did not finish within {limit:g} s") from None
        finally:
            self.waited_s += time.monotonic() - t
        if code != 0:
            raise self._fail("ffmpeg failed")
        self._done = True
        self._run.close()

    def stop(self) -> None:
        """Kill and reap ffmpeg (idempotent)."""
        if not self._done:
            self._done = True
            self._run.kill()
            self._run.close()
