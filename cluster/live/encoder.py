"""The persistent encoder of a live session: one ffmpeg process for the session's whole life.

Raw frames (yuv420p, converted here as `cluster.media.encode` does) go to its stdin and the
session's PCM (speech as received, silence while idle) through a named pipe, both timed by their
counts (frames at the template's rate, samples at the session's rate), so they stay in sync.
x264 runs with `-tune zerolatency` (no lookahead, no B-frames) and a keyframe every
`gop` frames; the HLS muxer cuts a fMP4 segment at each keyframe, so every segment is `gop`
frames (<= `live_segment_seconds`), `#EXT-X-TARGETDURATION` is 1, and the playlist is a sliding
window of the last `live_playlist_segments`. Segments stay on disk: at the end they are the
session's recording (init + segments, remuxed to one mp4 and verified).
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import re
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from cluster.config import Settings, get_settings
from cluster.errors import EncodeError
from cluster.media.encode import color_args
from cluster.media.ffmpeg import (
    FFmpeg,
    ffmpeg_binary,
    ffmpeg_has_encoder,
    file_url,
    input_args,
    run_ffmpeg,
    stderr_summary,
)
from cluster.media.yuv import batch_problem
from cluster.netguard import RtmpTarget

log = logging.getLogger("lipsync.live")

PLAYLIST = "index.m3u8"  # what ffmpeg writes
PUBLISHED = "live.m3u8"  # what is served: the same with a valid #EXT-X-TARGETDURATION
INIT = "init.mp4"
SEGMENT_PATTERN = "seg_%06d.m4s"
SEGMENT_NAME = re.compile(r"^seg_\d{6}\.m4s$")
INIT_NAME = re.compile(r"^init(-\d+)?\.mp4$")


def epoch_names(epoch: int) -> tuple[str, str]:
    """(ffmpeg's playlist, init segment) of encoder epoch `epoch` (0: the session's first encoder;
    each restart of the session's actor starts the next)."""
    return (PLAYLIST, INIT) if epoch == 0 else (f"index-{epoch}.m3u8", f"init-{epoch}.mp4")
#: The rate the encoder is fed: ffmpeg reads raw PCM in packets of 1024 samples and AAC delays by
#: about 2048, so 48 kHz holds the audio (and the muxer, which interleaves) 3x shorter than 16 kHz.
AUDIO_RATE = 48000


def gop_frames(fps: Fraction, segment_seconds: float) -> int:
    """Frames per segment (= per GOP): the most that fit in `segment_seconds`, at least 1."""
    return max(1, int(Fraction(segment_seconds) * Fraction(fps)))


def live_encoder_args(settings: Settings, fps: Fraction, gop: int) -> list[str]:
    """H.264 for a live stream: closed GOPs of exactly `gop` frames, no lookahead, no B-frames."""
    enc = settings.video_encoder
    if not ffmpeg_has_encoder(enc, settings):
        raise EncodeError(f"ffmpeg ({ffmpeg_binary(settings)}) has no {enc} encoder; set "
                          f"LIPSYNC_VIDEO_ENCODER=libx264", stage="encode")
    if enc == "h264_nvenc":
        codec = ["-c:v", "h264_nvenc", "-preset", "p1", "-tune", "ull", "-rc", "vbr", "-cq",
                 str(settings.live_crf), "-b:v", "0", "-bf", "0"]
    else:
        codec = ["-c:v", "libx264", "-preset", settings.live_preset, "-tune", "zerolatency",
                 "-crf", str(settings.live_crf), "-x264-params", "open-gop=0:scenecut=0"]
    # no output -r: its fps filter would hold each frame until the next one arrives
    return [*codec, "-pix_fmt", "yuv420p", "-g", str(gop), "-keyint_min", str(gop)]


class LiveEncoder:
    """One ffmpeg writing `<out_dir>/index.m3u8`, `init.mp4` and `seg_NNNNNN.m4s`.

    `write(frames, pcm)` queues a batch (never blocks on ffmpeg: two writer threads feed its
    stdin and the audio pipe); `close()` ends both inputs and waits for ffmpeg to finish the last
    segment and the final playlist (`#EXT-X-ENDLIST`)."""

    def __init__(self, out_dir: str | os.PathLike, width: int, height: int, fps: Fraction, sample_rate: int,
                 settings: Settings | None = None, rtmp: RtmpTarget | None = None, epoch: int = 0,
                 start_number: int = 0, start_frame: int = 0, color: list[int] | None = None) -> None:
        self.settings = s = settings or get_settings()
        self.out_dir = Path(out_dir)
        # a restarted session's encoder (epoch > 0) writes its own playlist and init segment,
        # numbers its segments on from `start_number` and its timestamps from output frame
        # `start_frame` (see `LivePlaylist`; players' demuxers that ignore a discontinuity see
        # timestamps that go on)
        self.epoch = int(epoch)
        self.playlist, self.init = epoch_names(self.epoch)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.width, self.height, self.fps, self.rate = int(width), int(height), Fraction(fps), int(sample_rate)
        self.gop = gop_frames(self.fps, s.live_segment_seconds)
        self.frames_written = 0
        self.samples_written = 0
        self.error: str | None = None
        self._fifo = self.out_dir / f"audio-{self.epoch}.fifo"
        if self._fifo.exists():
            self._fifo.unlink()
        os.mkfifo(self._fifo, 0o600)
        hls_time = (self.gop - 0.5) / float(self.fps)  # a cut at every keyframe, never between two
        args = ["-loglevel", "error",
                "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{self.width}x{self.height}",
                "-framerate", f"{self.fps.numerator}/{self.fps.denominator}", *color_args(color), "-i", "pipe:0",
                "-f", "s16le", "-ar", str(AUDIO_RATE), "-ac", "1",
                *input_args(self._fifo),
                "-map", "0:v", "-map", "1:a", *live_encoder_args(s, self.fps, self.gop), *color_args(color),
                "-c:a", "aac", "-b:a", "96k"]
        if start_frame:
            args += ["-output_ts_offset", f"{start_frame / float(self.fps):.6f}"]
        # ffmpeg's own list is longer than the published window (`LivePlaylist`), so that a watcher
        # that was held up for a while still sees every segment it has not published yet
        hls = {"hls_time": f"{hls_time:.4f}", "hls_list_size": str(s.live_playlist_segments + 32),
               "start_number": str(int(start_number)),
               "hls_segment_type": "fmp4", "hls_fmp4_init_filename": self.init,
               "hls_segment_filename": SEGMENT_PATTERN, "hls_flags": "independent_segments+temp_file"}
        self.rtmp = rtmp
        self.rtmp_error: str | None = None
        self._pusher: FFmpeg | None = None
        if rtmp is None:
            args += ["-f", "hls", *[a for k, v in hls.items() for a in (f"-{k}", v)], self.playlist]
        else:
            # the same packets to the HLS files and, as FLV on stdout, to the RTMP pusher (`_start_pusher`);
            # the FLV branch runs behind its own queue (fifo) that drops packets rather than hold the HLS
            # branch when the pusher is slow, and is dropped (onfail=ignore) when the pusher is gone
            slave = ":".join(f"{k}={v}" for k, v in hls.items())
            args += ["-flags", "+global_header", "-f", "tee",
                     f"[f=hls:{slave}]{self.playlist}|[f=flv:onfail=ignore:use_fifo=1:"
                     f"fifo_options=drop_pkts_on_overflow=1]pipe\\:1"]
        # run in out_dir: every name ffmpeg writes is relative (nothing for the tee muxer to escape)
        self._run = FFmpeg(args, settings=s, stage="live-encode", path=str(self.out_dir), stdin=True,
                           stdout=rtmp is not None, error=EncodeError, timeout_error=EncodeError, cwd=self.out_dir)
        depth = max(4, int(2 * float(self.fps)))  # batches queued before write() pushes back
        self._video: queue.Queue = queue.Queue(maxsize=depth)
        self._audio: queue.Queue = queue.Queue(maxsize=depth)
        self._threads: list[threading.Thread] = []
        try:  # a start that fails half-way leaves no ffmpeg, fifo or thread behind (its caller holds nothing)
            if rtmp is not None:
                self._start_pusher(rtmp)
            from cluster.live.speech import StreamResampler

            self._upsample = StreamResampler(self.rate, AUDIO_RATE)
            for target, name in ((self._feed_video, "live-video"), (self._feed_audio, "live-audio")):
                self._threads.append(threading.Thread(target=target, name=name, daemon=True))
                self._threads[-1].start()
        except BaseException:
            self.kill()
            self._run.close()
            raise

    # --- RTMP --------------------------------------------------------------------------------
    def _start_pusher(self, rtmp: RtmpTarget) -> None:
        """A second ffmpeg that copies the encoder's FLV (its stdout, read directly) to the RTMP
        server: the network protocols are whitelisted for this output only, the connection goes to
        the vetted address. It failing never stops the session's HLS (the tee drops its branch)."""
        protocols = "tcp,rtmp" if rtmp.scheme == "rtmp" else "tcp,tls,rtmps"
        args = ["-loglevel", "error", "-f", "flv", *input_args("pipe:0"), "-map", "0", "-c", "copy",
                "-protocol_whitelist", protocols, "-rtmp_tcurl", rtmp.tc_url, "-rtmp_live", "live",
                # a server that stops reading fails the push within 10 s (never holds the encoder's end)
                "-rw_timeout", "10000000",
                "-f", "flv", rtmp.connect_url]
        encoder_out = self._run.proc.stdout
        try:
            self._pusher = FFmpeg(args, settings=self.settings, stage="live-rtmp", path=rtmp.shown,
                                  stdin=encoder_out, error=EncodeError, timeout_error=EncodeError)
        except EncodeError as e:
            self.rtmp_error = e.message
        finally:
            encoder_out.close()  # the pusher's alone: when it ends, the encoder's FLV branch sees EPIPE

    def _redact(self, text: str) -> str:
        """ffmpeg's words without the stream key (it names the URL it could not open)."""
        path = "/" + self.rtmp.connect_url.split("://", 1)[1].split("/", 1)[1]
        return text.replace(self.rtmp.connect_url, self.rtmp.shown).replace(path, "/…")

    def rtmp_state(self) -> tuple[str | None, str | None]:
        """("pushing" | "failed" | "ended" | None without RTMP, why it failed)."""
        if self.rtmp is None:
            return None, None
        if self.rtmp_error is None and self._pusher is not None:
            code = self._pusher.proc.poll()
            if code is None:
                return "pushing", None
            if code == 0 and self._run.proc.poll() is not None:
                return "ended", None
            why = stderr_summary(self._pusher.stderr_tail()) or "no message"
            self.rtmp_error = f"the RTMP push to {self.rtmp.shown} stopped (exit code {code}): {self._redact(why)}"
        return "failed", self.rtmp_error

    # --- feeding ---------------------------------------------------------------------------
    def _feed_video(self) -> None:
        stdin = self._run.proc.stdin
        try:
            while (item := self._video.get()) is not None:
                stdin.write(item)
                stdin.flush()
        except (OSError, ValueError) as e:
            self.error = self.error or f"video pipe: {e}"
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def _feed_audio(self) -> None:
        fd = self._open_fifo()
        if fd is None:
            return
        try:
            while (item := self._audio.get()) is not None:
                view = memoryview(item)
                while view:
                    view = view[os.write(fd, view):]
        except OSError as e:
            self.error = self.error or f"audio pipe: {e}"
        finally:
            os.close(fd)

    def _open_fifo(self) -> int | None:
        """The audio pipe's write end, once ffmpeg opened its read end (bounded wait)."""
        deadline = time.monotonic() + self.settings.probe_timeout_s
        while time.monotonic() < deadline:
            try:
                fd = os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno == errno.ENOENT:  # removed by `kill` (the encoder is gone): nothing to feed
                    self.error = self.error or "the audio pipe was removed (the encoder was killed)"
                    return None
                if e.errno != errno.ENXIO:
                    raise
                if self._run.proc.poll() is not None:
                    break
                time.sleep(0.01)
                continue
            os.set_blocking(fd, True)
            return fd
        self.error = self.error or "ffmpeg never opened the audio pipe"
        return None

    def write(self, frames: np.ndarray, pcm: np.ndarray, timeout: float = 10.0) -> None:
        """Queue `frames` ([n, H * 3 // 2, W] uint8 I420, `cluster.media.yuv`) and their audio (int16 at
        the session's rate)."""
        if self._run.proc.poll() is not None or self.error:
            raise EncodeError(f"live encoder for {self.out_dir} stopped: {self.error or self._run.stderr_tail()}",
                              stage="live-encode", path=str(self.out_dir), cause=self._run.stderr_tail())
        frames = np.asarray(frames)
        problem = batch_problem(frames, self.width, self.height)
        if problem:
            raise EncodeError(f"live encoder for {self.out_dir}: {problem}", stage="live-encode",
                              path=str(self.out_dir))
        try:
            self._video.put(np.ascontiguousarray(frames).tobytes(), timeout=timeout)
            self._audio.put(self._pcm48(np.asarray(pcm, dtype=np.int16)), timeout=timeout)
        except queue.Full:
            raise EncodeError(f"live encoder for {self.out_dir} took no input for {timeout:g} s",
                              stage="live-encode", path=str(self.out_dir), cause=self._run.stderr_tail()) from None
        self.frames_written += len(frames)
        self.samples_written += len(pcm)

    def _pcm48(self, pcm: np.ndarray, final: bool = False) -> bytes:
        wav = self._upsample.flush() if final else self._upsample.push(pcm.astype(np.float32) / np.float32(32768.0))
        return (np.clip(np.round(wav * 32768.0), -32768, 32767)).astype("<i2").tobytes()

    def alive(self) -> bool:
        return self._run.proc.poll() is None and not self.error

    def close(self, timeout: float = 30.0) -> int:
        """End both inputs and wait for ffmpeg (its last segment, `#EXT-X-ENDLIST`); exit code. An ffmpeg
        that takes no input for `timeout` is killed, and the inputs' ends are then handed over without
        waiting again (each of the three waited its `timeout` on a queue its dead feeder no longer read)."""
        killed = False

        def put(q: queue.Queue, item) -> None:
            nonlocal killed
            try:
                if killed:
                    q.put_nowait(item)
                else:
                    q.put(item, timeout=timeout)
            except queue.Full:
                if not killed:
                    self._run.kill()
                    killed = True

        put(self._audio, self._pcm48(np.zeros(0, np.int16), final=True))
        put(self._video, None)
        put(self._audio, None)
        for t in self._threads:
            t.join(timeout)
        try:
            try:
                code = self._run.wait(timeout)
            finally:
                self._fifo.unlink(missing_ok=True)
                self._close_pusher(timeout)
            self._run.check("live encoding")
        finally:  # its stderr file, read by check: released on a failed close too (one descriptor a session)
            self._run.close()
        return code

    def _close_pusher(self, timeout: float) -> None:
        """The pusher ends at the encoder's end of file (its last packets sent); killed past `timeout`."""
        if self._pusher is None:
            return
        self.rtmp_state()  # a failure before the end is told as such
        try:
            self._pusher.wait(timeout)
        except EncodeError as e:
            self.rtmp_error = self.rtmp_error or e.message
        self.rtmp_state()
        self._pusher.close()

    def kill(self) -> None:
        """Kill ffmpeg (and the RTMP pusher); the feeding threads end: an idle one is handed its end,
        a busy one's write fails on the dead pipe."""
        self._run.kill()
        if self._pusher is not None:
            self._pusher.kill()
        for q in (self._video, self._audio):
            try:
                q.put_nowait(None)
            except queue.Full:
                pass
        self._fifo.unlink(missing_ok=True)


# --- the playlist as published ---------------------------------------------------------------
def read_playlist(path: str | os.PathLike) -> tuple[int, list[tuple[str, float]], bool]:
    """(media sequence, [(segment name, seconds)], ended) of a live playlist file."""
    return parse_playlist(Path(path).read_text())


def parse_playlist(text: str) -> tuple[int, list[tuple[str, float]], bool]:
    """(media sequence, [(segment name, seconds)], ended) of a live playlist."""
    seq = 0
    segments: list[tuple[str, float]] = []
    duration = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            seq = int(line.split(":", 1)[1])
        elif line.startswith("#EXTINF:"):
            duration = float(line.split(":", 1)[1].split(",")[0])
        elif line and not line.startswith("#") and duration is not None:
            segments.append((line, duration))
            duration = None
    return seq, segments, "#EXT-X-ENDLIST" in text


_PART = re.compile(r'^#EXT-X-PART:DURATION=([0-9.]+),URI="([^"]+)"')


def ended_playlist(text: str) -> str:
    """The live playlist `text` as it reads once its session is over, whatever ended it: with
    `#EXT-X-ENDLIST`, and its in-progress segment (listed by its part alone) listed whole. A session
    whose actor died for good, or whose service stopped while it ran, left its playlist as it was:
    players followed it for ever."""
    if "#EXT-X-ENDLIST" in text:
        return text
    lines = text.rstrip("\n").splitlines()
    if lines and (m := _PART.match(lines[-1].strip())):
        lines += [f"#EXTINF:{float(m.group(1)):.6f},", m.group(2)]
    return "\n".join([*lines, "#EXT-X-ENDLIST"]) + "\n"


def playlist_has(text: str, msn: int, part: int | None) -> bool | None:
    """LL-HLS blocking playlist reload (`?_HLS_msn=N[&_HLS_part=M]`): does the live playlist `text`
    hold media segment `msn` whole (no `part`) or partial segment `part` of segment `msn` or a later
    one (segments count in media sequence numbers, parts from 0 in each)? True once it has ended.
    None when `msn` is more than two segments past the last one listed (a request to refuse)."""
    seq, whole, parts, ended = 0, 0, 0, "#EXT-X-ENDLIST" in text
    for line in text.splitlines():
        if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            seq = int(line.split(":", 1)[1])
        elif line.startswith("#EXT-X-PART:"):
            parts += 1
        elif line and not line.startswith("#"):
            whole += 1
            last_parts, parts = parts, 0
    if ended:
        return True
    last_whole = seq + whole - 1
    # the last part listed: of the in-progress segment after the whole ones, else of the last whole one
    last_part = (seq + whole, parts - 1) if parts else (last_whole, max(0, last_parts - 1) if whole else -1)
    if msn > last_part[0] + 2:
        return None
    if part is None:
        return last_whole >= msn
    return last_part >= (msn, part)


def program_date_time(wall: float) -> str:
    """`wall` (seconds since the epoch) as an `#EXT-X-PROGRAM-DATE-TIME` value (UTC, milliseconds)."""
    import datetime as dt

    return dt.datetime.fromtimestamp(wall, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LivePlaylist:
    """The published live playlist (`live.m3u8`), over every encoder epoch of the session.

    `poll(encoder)` reads the current encoder's own playlist; each segment not seen before is
    appended to `entries` (and handed to `on_segment`, which makes it durable) and the published
    playlist is rewritten: a sliding window of `window` segments, `#EXT-X-TARGETDURATION` the
    smallest integer >= every segment (ffmpeg rounds 0.48 s down to 0, which players refuse), media
    sequence numbers that keep increasing across epochs, and `#EXT-X-DISCONTINUITY` plus the
    epoch's own `#EXT-X-MAP` where a restarted encoder's segments begin (its timestamps start
    again at 0), counted in `#EXT-X-DISCONTINUITY-SEQUENCE` once they slide out of the window.
    A segment whose entry has `pdt` (a session's segment showing speech) carries it as
    `#EXT-X-PROGRAM-DATE-TIME`: the wall clock when the speech its first frame shows arrived, so a
    player's position as a date (hls.js `playingDate`) subtracted from the time it is shown is the
    delay from speech in to picture out; segments without speech carry none (players extrapolate).

    Low-latency HLS (`part_target`, the session's segment length): each segment is one GOP, a
    keyframe first, and is also listed as one independent partial segment (`#EXT-X-PART`) while it
    is within three target durations of the end; `#EXT-X-PART-INF` and `PART-HOLD-BACK` (three
    parts) announce them. The newest segment is listed as the in-progress segment, by its part alone,
    as LL-HLS playlists end; it gets its `#EXTINF` when the next one is published (or the stream
    ends). A low-latency player (hls.js `lowLatencyMode`) may then play a part behind the edge, not a
    whole target duration (hls.js keeps its live position <= edge - PART-TARGET, else edge -
    TARGETDURATION: with 1-s target durations it stayed 1 s behind); other players see each segment
    once the next is published."""

    def __init__(self, out_dir: str | os.PathLike, window: int, entries: list[dict] | None = None,
                 on_segment=None, part_target: float | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.window = int(window)
        self.part_target = part_target
        self.entries: list[dict] = list(entries or [])
        self.on_segment = on_segment
        self._known = {e["name"] for e in self.entries}
        self.ended = False

    def poll(self, playlist: str, epoch: int, init: str, fps: Fraction, final: bool = False) -> list[dict]:
        """New segments of the epoch's playlist `playlist` (published), [] when none."""
        try:
            _seq, segments, ended = read_playlist(self.out_dir / playlist)
        except (OSError, ValueError):
            return []
        new = []
        for name, seconds in segments:
            if name in self._known:
                continue
            entry = {"name": name, "seconds": seconds, "frames": round(seconds * float(fps)), "epoch": epoch,
                     "init": init}
            if self.on_segment is not None:
                self.on_segment(entry)  # durable before it is served
            self._known.add(name)
            self.entries.append(entry)
            new.append(entry)
        if new or (final and ended and not self.ended):
            self.ended = self.ended or (final and ended)
            self.write()
        return new

    def text(self) -> str:
        import math

        first = max(0, len(self.entries) - self.window)
        shown = self.entries[first:]
        target = max(1, math.ceil(max((e["seconds"] for e in shown), default=1.0) - 1e-6))
        disc = sum(1 for i in range(1, first + 1) if self.entries[i]["epoch"] != self.entries[i - 1]["epoch"])
        lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{target}",
                 f"#EXT-X-MEDIA-SEQUENCE:{first}", f"#EXT-X-DISCONTINUITY-SEQUENCE:{disc}",
                 "#EXT-X-INDEPENDENT-SEGMENTS"]
        parted = 0  # the last segments, within 3 target durations of the end, are also listed as parts
        if self.part_target:
            part = max(self.part_target, *(e["seconds"] for e in shown)) if shown else self.part_target
            lines[3:3] = [f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={3 * part:.3f}",
                          f"#EXT-X-PART-INF:PART-TARGET={part:.3f}"]
            total = 0.0
            for e in reversed(shown):
                total += e["seconds"]
                if total > 3 * target:
                    break
                parted += 1
        previous = None
        for i, e in enumerate(shown):
            if previous is not None and e["epoch"] != previous["epoch"]:
                lines.append("#EXT-X-DISCONTINUITY")
            if previous is None or e["init"] != previous["init"]:
                lines.append(f'#EXT-X-MAP:URI="{e["init"]}"')
            if e.get("pdt"):  # the arrival of the speech its first frame shows (LiveSession._speech_arrival)
                lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{program_date_time(e['pdt'])}")
            if i >= len(shown) - parted:  # one part, the whole segment (a keyframe starts it)
                lines.append(f'#EXT-X-PART:DURATION={e["seconds"]:.6f},URI="{e["name"]}",INDEPENDENT=YES')
                if i == len(shown) - 1 and not self.ended:
                    break  # the newest: listed as the stream's in-progress segment, its one part (see above)
            lines += [f"#EXTINF:{e['seconds']:.6f},", e["name"]]
            previous = e
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        from cluster.fsutil import write_atomic

        write_atomic(self.out_dir / PUBLISHED, self.text(), sync_dir=False)  # rewritten with every segment


# --- the recording ---------------------------------------------------------------------------
def make_recording(out_dir: str | os.PathLike, dest: str | os.PathLike, entries: list[dict], fps: Fraction,
                   settings: Settings | None = None) -> float:
    """Join the published segments `entries` (`LivePlaylist.entries`, in order) into one mp4 at
    `dest` and verify it: a video and an audio stream, exactly their frames, audio as long as the
    video (within a frame and an AAC frame). One encoder epoch: its init segment and segments,
    stream copy. Several (the session's actor restarted): each epoch joined as above, then the
    epochs concatenated (video copied; the audio encoded once more across the joins, so that its
    timestamps run on without a gap or an overlap at a restart). Returns its duration in seconds."""
    from itertools import groupby

    from cluster.fsutil import atomic_writer
    from cluster.media.finalize import verify_output

    s = settings or get_settings()
    out_dir, dest = Path(out_dir), Path(dest)
    if not entries:
        raise EncodeError(f"live session in {out_dir} published no segment: no recording", stage="live-recording",
                          path=str(dest))
    parts = []
    for epoch, group in groupby(entries, key=lambda e: e["epoch"]):
        group = list(group)
        joined = out_dir / f"recording-{epoch}.fmp4"
        with atomic_writer(joined) as f:
            for name in [group[0]["init"], *(e["name"] for e in group)]:
                f.write((out_dir / name).read_bytes())
        parts.append(joined)
    tmp = dest.with_name(f".{dest.stem}.tmp.mp4")
    try:
        if len(parts) == 1:
            inputs, codecs = input_args(parts[0]), ["-map", "0", "-c", "copy"]
        else:
            listing = out_dir / "recording.concat"
            # each epoch lasts its frames (its audio runs an AAC frame longer): the next starts there
            durations = [sum(e["frames"] for e in g) / float(fps)
                         for _, g in groupby(entries, key=lambda e: e["epoch"])]
            listing.write_text("".join(f"file '{p.name}'\nduration {d:.6f}\n" for p, d in zip(parts, durations)))
            inputs = ["-f", "concat", "-safe", "0", *input_args(listing)]
            # the last epoch's audio runs past its video by its AAC padding: the whole is cut at the video's end
            codecs = ["-map", "0:v", "-map", "0:a", "-c:v", "copy", "-c:a", "aac", "-b:a", "96k",
                      "-af", "aresample=async=1:first_pts=0",
                      "-t", f"{sum(e['frames'] for e in entries) / float(fps):.6f}"]
        run_ffmpeg(["-loglevel", "error", *inputs, *codecs, "-movflags", "+faststart", "-f", "mp4", file_url(tmp)],
                   timeout=s.ffmpeg_timeout_s, settings=s, stage="live-recording", path=str(dest))
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
        (out_dir / "recording.concat").unlink(missing_ok=True)
    frames = sum(e["frames"] for e in entries)
    seconds = frames / float(fps)
    try:
        verify_output(str(tmp), frames_expected=frames, fps=fps, audio_duration=seconds, settings=s)
        os.replace(tmp, dest)
    finally:  # a recording that failed verification leaves nothing behind
        tmp.unlink(missing_ok=True)
    return seconds
