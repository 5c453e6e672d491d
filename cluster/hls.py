"""Progressive output: every job as an HLS stream (fMP4) from its first verified chunk.

Layout under the job's directory (kept until retention removes the job):

    hls/audio.m4a           the job's AAC, encoded once (cluster.media.aac); the final mp4 copies it
    hls/init.mp4            ftyp + moov (H.264 + AAC); init-<chunk>.mp4 if a chunk's SPS/PPS differ
    hls/<chunk>-<part>.m4s  one fragment per part: a chunk cut at its 2 s IDR frames, video + audio
    hls/<chunk>.json        the chunk's marker, written last: its parts are published

A chunk is packaged once its segment is verified (frame count) and every chunk before it is
packaged: the published segments are always a contiguous prefix. Every file is written once: the
first verified write wins, a late retry never replaces it (`write_once`).

The timeline: video frame F of the job is presented at `(F + shift_frames) / fps` and decoded
from `F / fps` (each fragment's `tfdt` is its first frame: composition offsets stay >= 0 with
B-frames); the audio's first sample is presented with the video's first frame, so the encoder's
priming packet starts `priming` samples earlier, at or after 0. No edit lists: players such as
hls.js ignore them. Each AAC packet goes, whole, to the part in whose time range it starts.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from cluster.config import Settings
from cluster.errors import HlsNotPublished, LipsyncError, OutputVerificationError
from cluster.fsutil import sweep_temporaries, temporary_name
from cluster.media import fmp4
from cluster.media.aac import AacTrack
from cluster.schemas import HlsIndex, HlsSegment

log = logging.getLogger("lipsync.hls")

HLS_DIR = "hls"
AUDIO_FILE = "audio.m4a"
INIT_FILE = "init.mp4"
PLAYLIST = "index.m3u8"
#: Names a client may ask for: the init segment(s) and media segments.
FILE_NAME = re.compile(r"init(-\d{5})?\.mp4|\d{5}-\d{3}\.m4s")
MIN_SHIFT_FRAMES = 4  # > the encoder's B-frame reorder delay (x264 presets: at most 2)
AUDIO_LEAD_S = 20.0  # once the first segment is out, the AAC is encoded this far ahead of the next chunk's end


def hls_dir(job_dir: str | Path) -> Path:
    return Path(job_dir) / HLS_DIR


def stream_published(job_dir: str | Path) -> bool:
    """Whether the job in `job_dir` has a stream to play: its first chunk's marker is published (none before its
    first segment, none once its files are removed). The playlist itself is made on request (`hls_index`)."""
    return (hls_dir(job_dir) / f"{0:05d}.json").is_file()


def stage_file(path: Path, data: bytes, sync: bool = True) -> Path:
    """`data` in a temporary file next to `path`, on disk (fsynced; without `sync` the caller
    calls `sync_files` before publishing): `link_once` publishes it."""
    tmp = temporary_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    return tmp


def sync_files(paths: list[Path]) -> None:
    """fsync files written one after another: the first sync commits the journal with all their
    data (ext4 ordered mode), so the others cost little (one write-and-sync each waits for the disk
    every time)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def link_once(tmp: Path, path: Path) -> bool:
    """Give the staged file `tmp` the name `path` unless that exists (a reader sees all of it or
    nothing), then drop `tmp`; True when this call published it. The first write wins."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def write_once(path: Path, data: bytes) -> bool:
    """Write `data` to `path` unless it exists (see `link_once`)."""
    return link_once(stage_file(path, data), path)


# --- the plan: parts and the timeline -------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    chunk: int
    part: int
    start: int   # first frame (job's numbering)
    frames: int

    @property
    def name(self) -> str:
        return f"{self.chunk:05d}-{self.part:03d}.m4s"


def gop_frames(settings: Settings, fps: Fraction) -> int:
    """The IDR interval of rendered segments (`cluster.media.encode.segment_gop`)."""
    from cluster.media.encode import segment_gop

    return segment_gop(settings, fps)


def plan_parts(chunks, gop: int) -> list[Part]:
    """Each chunk cut at its IDR frames (every `gop` frames from its start)."""
    parts = []
    for chunk in chunks:
        for k, start in enumerate(range(chunk.start, chunk.stop, gop)):
            parts.append(Part(chunk.index, k, start, min(gop, chunk.stop - start)))
    return parts


def target_duration(parts: list[Part], fps: Fraction) -> int:
    return max(1, math.ceil(max((p.frames for p in parts), default=1) / fps - Fraction(1, 1000)))


@dataclass(frozen=True)
class Timeline:
    fps: Fraction
    timescale: int        # video
    frame_ticks: int      # one frame in video ticks
    shift_frames: int     # the presentation shift (B-frames, AAC priming), in frames
    sample_rate: int
    audio_shift: int      # the same shift in audio samples

    @classmethod
    def of(cls, fps: Fraction, sample_rate: int, priming: int) -> "Timeline":
        fps = Fraction(fps)
        scale = 90000 if (90000 * fps.denominator) % fps.numerator == 0 else fps.numerator
        ticks = scale * fps.denominator // fps.numerator
        shift = max(MIN_SHIFT_FRAMES, math.ceil(Fraction(priming) * fps / sample_rate))
        return cls(fps, scale, ticks, shift, sample_rate, round(Fraction(shift) / fps * sample_rate))

    def boundary(self, frame: int) -> int:
        """The audio sample (encoder timeline, first real sample 0) where video frame `frame` starts."""
        return math.floor(Fraction(frame) / self.fps * self.sample_rate)


# --- packaging one chunk ---------------------------------------------------------------------------
@dataclass
class VideoPacket:
    data: bytes
    frame: int  # presentation index within the chunk
    keyframe: bool


def read_chunk_video(path: str, fps: Fraction) -> tuple[bytes, int, int, list[VideoPacket]]:
    """(avcC, width, height, packets in decode order) of a rendered chunk segment."""
    import av

    from cluster.media.ffmpeg import file_url

    with av.open(file_url(path), options={"protocol_whitelist": "file"}) as container:
        stream = container.streams.video[0]
        raw = [(p.pts, bool(p.is_keyframe), bytes(p)) for p in container.demux(stream) if p.size]
        avcc = bytes(stream.codec_context.extradata or b"")
        width, height = stream.codec_context.width, stream.codec_context.height
        base = min(pts for pts, _, _ in raw) if raw else 0
        tb = Fraction(stream.time_base)
    packets = [VideoPacket(data, round((pts - base) * tb * fps), key) for pts, key, data in raw]
    return avcc, width, height, packets


def package_chunk(plan, chunk, parts: list[Part], sequence0: int, track: AacTrack, timeline: Timeline,
                  frames_total: int, audio_timeout: float) -> tuple[bytes, list[tuple[Part, bytes]]]:
    """(the chunk's avcC, [(part, media segment bytes)]) of one verified chunk segment."""
    path = plan.segment_path(chunk.index)
    avcc, width, height, packets = read_chunk_video(path, timeline.fps)
    if len(packets) != chunk.frames or sorted(p.frame for p in packets) != list(range(chunk.frames)):
        raise OutputVerificationError(f"job {plan.job_id}: segment {path} of chunk {chunk.index} holds "
                                      f"{len(packets)} frames, expected {chunk.frames}", path=path, stage="hls")
    delay = max(i - p.frame for i, p in enumerate(packets))
    if delay > timeline.shift_frames:
        raise OutputVerificationError(f"job {plan.job_id}: chunk {chunk.index} reorders {delay} frames, more than "
                                      f"the HLS timeline allows ({timeline.shift_frames})", path=path, stage="hls")
    track.wait_until(timeline.boundary(chunk.stop), audio_timeout)
    upto = track.packet_count  # the packets made by now: only this chunk's are read (`between`)
    out = []
    at = 0  # decode index into packets
    for n, part in enumerate(parts):
        first = part.start - chunk.start
        if not (packets[at].keyframe and packets[at].frame == first):
            raise OutputVerificationError(f"job {plan.job_id}: chunk {chunk.index} has no IDR frame at frame "
                                          f"{part.start} to cut part {part.part} at", path=path, stage="hls")
        video = fmp4.Run(fmp4.VIDEO_TRACK, part.start * timeline.frame_ticks)
        stop = at + part.frames
        for i in range(at, stop):
            p = packets[i]
            offset = (p.frame - i + timeline.shift_frames) * timeline.frame_ticks  # presented - decoded
            video.add(p.data, timeline.frame_ticks, fmp4.SYNC_SAMPLE if p.keyframe else fmp4.NON_SYNC_SAMPLE, offset)
        at = stop
        lo = timeline.boundary(part.start) if part.start > 0 else None
        hi = timeline.boundary(part.start + part.frames) if part.start + part.frames < frames_total else None
        mine = track.between(lo, hi, upto)
        sound = fmp4.Run(fmp4.AUDIO_TRACK, timeline.audio_shift + mine[0][0] if mine else 0)
        for _, data in mine:
            sound.add(data, 1024)
        out.append((part, fmp4.media_segment(sequence0 + n + 1, [video, sound])))
    return avcc, out


# --- the publisher: one per running job -------------------------------------------------------------
class HlsPublisher:
    """Encodes a job's AAC (a thread, from `start`) and packages its chunks in order as they are
    verified (`chunk_done`), in one worker thread; `drain` waits until everything is published
    and the audio saved for the final mp4; `close` stops publishing (no file appears after it)."""

    def __init__(self, plan, settings: Settings, on_publish: Callable[[], None] | None = None) -> None:
        self.plan, self.settings = plan, settings
        self.on_publish = on_publish  # called (in the worker thread) after each chunk is published
        self.dir = hls_dir(plan.job_dir)
        self.parts = plan_parts(plan.chunks, gop_frames(settings, plan.fps))
        self._lock = threading.Lock()       # file writes vs close
        self._cond = threading.Condition()  # done chunks, progress
        self._done: set[int] = set()
        self._closed = False
        self.next_chunk = 0
        self.error: Exception | None = None
        self.track: AacTrack | None = None
        self._threads: list[threading.Thread] = []

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> "HlsPublisher":
        self.dir.mkdir(parents=True, exist_ok=True)
        # files a publisher killed mid-write left staged (`stage_file`, the saved AAC): never published, never read
        sweep_temporaries(self.dir)
        self.next_chunk = len(published_chunks(self.dir, len(self.plan.chunks)))
        saved = self.dir / AUDIO_FILE
        if saved.exists():
            try:
                self.track = AacTrack.load(saved, self.plan.audio_path, self.plan.audio_duration,
                                           self.settings.audio_bitrate, spill_dir=self.dir)
            except Exception as e:  # damaged: encoded again (the encoder is deterministic)
                log.warning("job %s: saved audio %s unreadable (%r); encoding again", self.plan.job_id, saved, e)
                saved.unlink(missing_ok=True)
        if self.track is None:  # the first chunk's audio first; the rest as the chunks are published
            first = self.plan.chunks[0]
            hold = float(Fraction(first.stop) / self.plan.fps) if self.next_chunk == 0 else None
            self.track = AacTrack(self.plan.audio_path, self.plan.audio_duration, self.settings.audio_bitrate,
                                  hold_after_s=hold, hold_max_s=self.settings.chunk_timeout_s, spill_dir=self.dir,
                                  dc_block=bool(self.plan.model_dc))
            self._spawn(self._encode_audio, "aac")
        self._spawn(self._publish_loop, "hls")
        return self

    def _spawn(self, target, what: str) -> None:
        thread = threading.Thread(target=target, name=f"{what}-{self.plan.job_id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _encode_audio(self) -> None:
        track = self.track
        try:
            track.encode()
            if not track.done:  # stopped: the job ended
                return
            track.save(self.dir / AUDIO_FILE)  # the final mp4 needs it even when HLS has stopped
            with self._cond:
                self._cond.notify_all()
        except Exception as e:
            if self._closed:  # the job ended meanwhile (its packets are dropped): nothing is missing
                return
            log.error("job %s: AAC encoding failed: %r", self.plan.job_id, e)
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        if not isinstance(e, LipsyncError):
            e = OutputVerificationError(f"job {self.plan.job_id}: HLS publishing failed: {e!r}", stage="hls",
                                        job_id=self.plan.job_id, cause=repr(e))
        with self._cond:
            if self.error is None:
                self.error = e
            self._cond.notify_all()
        if (track := self.track) is not None:
            track.release()  # the final mp4 still needs the whole track

    @property
    def published_segments(self) -> int:
        """Media segments published so far (the parts of the published chunks)."""
        return sum(1 for p in self.parts if p.chunk < self.next_chunk)

    def chunk_done(self, index: int) -> None:
        with self._cond:
            if index >= self.next_chunk:
                self._done.add(index)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop publishing: once this returns no chunk is published any more. Blocks at most for
        the renames of one chunk's files (their bytes are staged on disk before the lock); drops
        the audio packets (their file) and stops their encoding."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with self._lock:
            pass
        if self.track is not None:
            self.track.close()
            self.track = None

    def drain(self, timeout: float) -> None:
        """Wait until every chunk is published and the audio is saved; raises what stopped them.
        Returns at once when the publisher was closed (the job ended: nothing more is published)."""
        deadline = time.monotonic() + timeout
        if (track := self.track) is not None:
            track.release()
        with self._cond:
            while self.error is None and not self._closed and not (self.next_chunk >= len(self.plan.chunks)
                                                                   and (self.dir / AUDIO_FILE).exists()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OutputVerificationError(f"job {self.plan.job_id}: HLS publishing did not finish within "
                                                  f"{timeout:.0f} s", stage="hls")
                self._cond.wait(min(left, 0.5))
            if self.error is not None:
                raise self.error

    # the worker -------------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        try:
            self._publish_all()
        except Exception as e:
            if self._closed:  # the job ended meanwhile: nothing is missing
                return
            log.error("job %s: HLS publishing stopped at chunk %d: %r", self.plan.job_id, self.next_chunk, e)
            self._fail(e)

    def _publish_all(self) -> None:
        plan, s, track = self.plan, self.settings, self.track
        track.wait_format(s.chunk_timeout_s)
        timeline = Timeline.of(plan.fps, track.sample_rate, track.priming)
        while True:
            with self._cond:
                while not self._closed and self.next_chunk < len(plan.chunks) and self.next_chunk not in self._done:
                    self._cond.wait(1.0)
                if self._closed or self.next_chunk >= len(plan.chunks):
                    return
                index = self.next_chunk
            chunk = plan.chunks[index]
            if index > 0:  # (the first chunk's audio is allowed from the start)
                track.allow_until(self._end_s(index) + AUDIO_LEAD_S)
            parts = [p for p in self.parts if p.chunk == index]
            sequence0 = self.parts.index(parts[0])
            avcc, segments = package_chunk(plan, chunk, parts, sequence0, track, timeline, plan.frames_total,
                                           s.chunk_timeout_s)
            init = self._init_for(track, timeline, avcc, index)
            marker = {"chunk": index, "init": init, "parts": [
                {"name": p.name, "start": float(Fraction(p.start) / plan.fps),
                 "duration": float(Fraction(p.frames) / plan.fps)} for p, _ in segments]}
            staged = [(stage_file(self.dir / part.name, data, sync=False), self.dir / part.name)
                      for part, data in segments]
            staged.append((stage_file(self.dir / f"{index:05d}.json", json.dumps(marker).encode(), sync=False),
                           self.dir / f"{index:05d}.json"))  # the marker last: it publishes the chunk
            sync_files([tmp for tmp, _ in staged])
            with self._lock:
                for tmp, path in staged:
                    if self._closed:
                        tmp.unlink(missing_ok=True)
                    else:
                        link_once(tmp, path)
                if self._closed:
                    return
            with self._cond:
                self.next_chunk = index + 1
                self._done.discard(index)  # published: only chunks ahead are remembered
                self._cond.notify_all()
            # the audio of the next chunks, ahead of them; not the whole at once, which would compete
            # with their rendering (`drain` lets it go on to the end)
            track.allow_until(self._end_s(min(index + 1, len(plan.chunks) - 1)) + AUDIO_LEAD_S)
            if self.on_publish is not None:
                self.on_publish()

    def _end_s(self, index: int) -> float:
        return float(Fraction(self.plan.chunks[index].stop) / self.plan.fps)

    def _init_for(self, track: AacTrack, timeline: Timeline, avcc: bytes, index: int) -> str:
        """The init segment for a chunk with this avcC: init.mp4 when it is the same as the first
        chunk's (or this is the first), else its own `init-<chunk>.mp4` (EXT-X-MAP before it).
        Written before the chunk's marker, so it exists once the chunk is listed."""
        audio = fmp4.AudioTrack(track.sample_rate, track.channels, track.asc, track.bitrate)
        video = fmp4.VideoTrack(self.plan.width, self.plan.height, timeline.timescale, avcc)
        key = self.dir / "init.avcc"
        write_once(key, avcc)
        name = INIT_FILE if key.read_bytes() == avcc else f"init-{index:05d}.mp4"
        write_once(self.dir / name, fmp4.init_segment(video, audio))
        return name


# --- reading what is published ------------------------------------------------------------------------
def published_chunks(directory: Path, chunk_count: int) -> list[dict]:
    """The markers of the contiguous published prefix of a job's chunks."""
    out = []
    for index in range(chunk_count):
        try:
            out.append(json.loads((directory / f"{index:05d}.json").read_text()))
        except (OSError, ValueError):
            break
    return out


def hls_index(job_id: str, plan, state, settings: Settings) -> HlsIndex:
    """What the playlist lists for a job: its published segments, and whether it has ended."""
    segments: list[HlsSegment] = []
    target = 2
    if plan is not None:
        parts = plan_parts(plan.chunks, gop_frames(settings, plan.fps))
        target = target_duration(parts, plan.fps)
        for marker in published_chunks(hls_dir(plan.job_dir), len(plan.chunks)):
            for p in marker["parts"]:
                segments.append(HlsSegment(index=len(segments), name=p["name"], start=p["start"],
                                           duration=p["duration"], init=marker["init"]))
    return HlsIndex(job_id=job_id, state=state, ended=state.terminal, target_duration=target, segments=segments)


def render_playlist(index: HlsIndex, query: str = "") -> str:
    """The m3u8 text: an EVENT playlist, `#EXT-X-ENDLIST` once the job has ended (whatever was
    published by then); `query` (e.g. `?token=...`) is appended to every URI."""
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{index.target_duration}",
             "#EXT-X-MEDIA-SEQUENCE:0", "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-INDEPENDENT-SEGMENTS"]
    current = None
    for seg in index.segments:
        if seg.init != current:
            lines.append(f'#EXT-X-MAP:URI="{seg.init}{query}"')
            current = seg.init
        lines += [f"#EXTINF:{seg.duration:.6f},", f"{seg.name}{query}"]
    if index.ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def read_published(plan, name: str, offset: int, length: int) -> bytes:
    """Bytes of a published HLS file of a job (init segment or media segment)."""
    directory = hls_dir(plan.job_dir)
    listed = {INIT_FILE}
    for marker in published_chunks(directory, len(plan.chunks)):
        listed.add(marker["init"])
        listed.update(p["name"] for p in marker["parts"])
    if not FILE_NAME.fullmatch(name) or name not in listed or not (directory / name).is_file():
        raise HlsNotPublished(f"job {plan.job_id} has no published HLS file {name} (its playlist lists what is)",
                              job_id=plan.job_id)
    with open(directory / name, "rb") as f:
        f.seek(max(0, offset))
        return f.read(max(0, length))


# --- signed watch URLs ----------------------------------------------------------------------------
WATCH_KEY_LABEL = b"lipsync watch url v1"


def watch_key(api_token: str) -> bytes:
    """The key that signs watch URLs: derived from the API token for this purpose only (callbacks
    are signed with another)."""
    return hmac.new(api_token.encode(), WATCH_KEY_LABEL, hashlib.sha256).digest()


def watch_expiry(now: float, ttl_s: int) -> int:
    """When a watch URL signed at `now` expires: `ttl_s` later, rounded up to a step of the TTL or an
    hour, the shorter, so that the URL stays the same between polls (and lasts no more than twice a
    short TTL: rounded to the hour, a 60 s TTL lasted up to an hour)."""
    step = max(1, min(3600, int(ttl_s)))
    return math.ceil((now + ttl_s) / step) * step


def sign_watch(key: bytes, job_id: str, expires: int) -> str:
    """`<expires>.<signature>`: HMAC-SHA256 over the job id and the expiry (unix seconds)."""
    mac = hmac.new(key, f"{job_id}\n{int(expires)}".encode(), hashlib.sha256).hexdigest()
    return f"{int(expires)}.{mac}"


#: what `sign_watch` makes: unix seconds, a dot, 64 lowercase hex digits
_WATCH_TOKEN = re.compile(r"[0-9]{1,12}\.[0-9a-f]{64}")


def check_watch(key: bytes, job_id: str, token: str, now: float | None = None) -> bool:
    """Whether `token` is `sign_watch`'s for `job_id` and not expired; False for anything else
    (a token of another shape is refused before it is parsed: never an exception)."""
    if not isinstance(token, str) or not _WATCH_TOKEN.fullmatch(token):
        return False
    expires = int(token.partition(".")[0])
    if expires < (now if now is not None else time.time()):
        return False
    return hmac.compare_digest(sign_watch(key, job_id, expires).encode(), token.encode())
