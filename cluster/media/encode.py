"""Encoding BGR frames to an H.264 mp4 segment through an ffmpeg pipe.

Frames are converted to yuv420p in this process with OpenCV's BT.601 conversion (the inverse of the
one `decode.frame_to_bgr` uses, so unchanged pixels round-trip) and piped as yuv420p: half the
bytes of BGR, and about 30 % less encoder CPU than swscale's accurate BGR path in ffmpeg.

Segments of one job share encoder, size, frame rate, pixel format and GOP settings and start with
an IDR frame (closed GOPs), so `finalize_output` can concatenate them by stream copy.
"""
from __future__ import annotations

import os
import select
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from cluster.config import Settings, get_settings
from cluster.errors import EncodeError
from cluster.media.ffmpeg import FFmpeg, ffmpeg_binary, ffmpeg_has_encoder, file_url, stderr_summary, wait_exit

#: Bytes handed to the pipe per write call.
WRITE_CHUNK_BYTES = 1 << 20


def encoder_args(settings: Settings, fps: Fraction, threads: int | None = None) -> list[str]:
    """Video codec arguments shared by every segment of a job (H.264, yuv420p, closed GOPs of
    about two seconds; every segment starts with an IDR frame). `threads`: the encoder's threads
    (`-threads`, x264's frame threads and lookahead), default this process's thread plan
    (`cluster.threads.current()`: an actor's Ray CPUs); None without a plan: the encoder's
    default (1.5 per core)."""
    if threads is None:
        from cluster.threads import current

        plan = current()
        threads = plan.x264 if plan else None
    gop = str(max(settings.gop_frames, round(2 * fps)))
    enc = settings.video_encoder
    if not ffmpeg_has_encoder(enc, settings):
        raise EncodeError(f"ffmpeg ({ffmpeg_binary(settings)}) has no {enc} encoder; set "
                          f"LIPSYNC_VIDEO_ENCODER=libx264", stage="encode")
    if enc == "libx264":
        codec = ["-c:v", "libx264", "-preset", settings.preset, "-crf", str(settings.crf),
                 "-x264-params", "open-gop=0"]
    elif enc == "h264_nvenc":
        codec = ["-c:v", "h264_nvenc", "-preset", "p4", "-rc", "vbr", "-cq", str(settings.crf),
                 "-b:v", "0"]
    else:
        raise EncodeError(f"unsupported video encoder {enc!r} (expected libx264 or h264_nvenc)",
                          stage="encode")
    if threads:
        codec += ["-threads", str(int(threads))]
    # accurate_rnd: BGR -> yuv420p without swscale's ~2-level darkening (frames must round-trip).
    return [*codec, "-sws_flags", "accurate_rnd+full_chroma_int", "-pix_fmt", "yuv420p", "-g", gop,
            "-keyint_min", gop,
            "-r", f"{fps.numerator}/{fps.denominator}"]


class SegmentEncoder:
    """Context manager feeding `[n, H, W, 3]` uint8 BGR frames to ffmpeg, which writes an H.264
    mp4 segment to `path`. `close()` returns the number of frames written. On an exception
    inside the `with` block the encoder is killed and reaped and the partial file removed."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: Fraction,
                 settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.path = str(path)
        self.width, self.height, self.fps = int(width), int(height), Fraction(fps)
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise EncodeError(f"segment {self.path}: frame size {width}x{height} must be positive "
                              f"and even (yuv420p)", path=self.path, stage="encode")
        self.frames_written = 0
        self._closed = False
        self._yuv: np.ndarray | None = None  # the yuv420p batch buffer, reused between writes
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        args = ["-loglevel", "error",
                "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{self.width}x{self.height}",
                "-framerate", f"{self.fps.numerator}/{self.fps.denominator}", "-i", "pipe:0",
                "-an", *encoder_args(self.settings, self.fps),
                "-movflags", "+faststart", "-f", "mp4", file_url(self.path)]
        self._run = FFmpeg(args, settings=self.settings, stage="encode", path=self.path, stdin=True,
                           error=EncodeError, timeout_error=EncodeError)
        self._proc = self._run.proc
        self._stdin_fd = self._proc.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)

    def _stderr_text(self) -> str:
        return self._run.stderr_tail()

    def _fail(self, what: str, grace: float = 0.0) -> EncodeError:
        """Kill (after `grace` seconds for it to exit by itself) and reap ffmpeg, remove the
        partial file; an EncodeError carrying the exit code and stderr. The encoder is closed."""
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        code = self._proc.poll()
        self._kill()
        if code is not None:
            what += f" (ffmpeg exit code {code})"
        tail = self._stderr_text()
        self._closed = True
        self._run.close()
        Path(self.path).unlink(missing_ok=True)
        return EncodeError(f"encoding segment {self.path} failed: {what}: {stderr_summary(tail)}",
                           path=self.path, stage="encode", cause=tail)

    def write(self, frames: np.ndarray) -> None:
        """Append frames `[n, H, W, 3]` uint8 BGR (or one `[H, W, 3]` frame). A write that makes no
        progress for `stall_timeout_s`, or to an encoder that died, raises EncodeError."""
        if self._closed:
            raise EncodeError(f"segment {self.path} is already closed", path=self.path,
                              stage="encode")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise EncodeError(f"segment {self.path}: expected frames [n, {self.height}, "
                              f"{self.width}, 3] uint8, got {list(frames.shape)} {frames.dtype}",
                              path=self.path, stage="encode")
        n = frames.shape[0]
        if self._yuv is None or self._yuv.shape[0] < n:
            self._yuv = np.empty((n, self.height * 3 // 2, self.width), np.uint8)
        for k in range(n):
            cv2.cvtColor(frames[k], cv2.COLOR_BGR2YUV_I420, dst=self._yuv[k])
        data = memoryview(self._yuv[:n]).cast("B")
        stall = self.settings.stall_timeout_s
        offset = 0
        deadline = time.monotonic() + stall
        while offset < len(data):
            if self._proc.poll() is not None:
                raise self._fail(f"ffmpeg exited after {self.frames_written} frames")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"ffmpeg accepted no data for {stall:g} s")
            _, ready, _ = select.select([], [self._stdin_fd], [], min(remaining, 1.0))
            if not ready:
                continue
            try:
                offset += os.write(self._stdin_fd, data[offset:offset + WRITE_CHUNK_BYTES])
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError) as exc:
                raise self._fail(f"writing to ffmpeg failed after {self.frames_written} frames "
                                 f"({exc.strerror or exc})", grace=5.0) from None
            deadline = time.monotonic() + stall
        self.frames_written += frames.shape[0]

    def close(self) -> int:
        """Finish the segment; returns the frames written. Waits up to `ffmpeg_timeout_s` and
        raises EncodeError (stderr tail in `cause`) on a timeout or a nonzero exit."""
        if self._closed:
            return self.frames_written
        self._closed = True
        try:
            try:
                self._proc.stdin.close()
            except OSError:
                pass  # a dead encoder; its exit code and stderr explain it below
            try:
                code = wait_exit(self._proc, self.settings.ffmpeg_timeout_s)
            except subprocess.TimeoutExpired:
                limit = self.settings.ffmpeg_timeout_s
                raise self._fail(f"ffmpeg did not finish within {limit:g} s") from None
            if code != 0:
                raise self._fail("ffmpeg failed")
            if self.frames_written == 0:
                raise EncodeError(f"segment {self.path} has no frames", path=self.path,
                                  stage="encode")
            return self.frames_written
        except BaseException:
            Path(self.path).unlink(missing_ok=True)
            raise
        finally:
            self._run.close()

    def _kill(self) -> None:
        self._run.kill()

    def abort(self) -> None:
        """Kill and reap ffmpeg and remove the partial file (idempotent)."""
        if not self._closed:
            self._closed = True
            self._kill()
            self._run.close()
        Path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> "SegmentEncoder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
