"""A job's audio encoded to AAC once, progressively, ahead of the video.

One encoder over the whole audio (per-segment encoding would add the encoder's priming samples
and a click at every segment boundary): its packets are what both the HLS segments and the final
mp4 carry. `AacTrack.encode` runs in a thread and makes packets available as it goes
(`wait_until`), so a job's first segment does not wait for the whole audio to be encoded; the
finished track is saved as an `.m4a` (`save`) for the final mp4 and for a restarted job manager
(`load`). The encoder is deterministic: encoding the same audio again gives the same packets.

The packets are kept in an unnamed file (`PacketFile`), not in memory: an hour of speech is
about 70 MB of AAC at 160 kb/s, which the job manager held for the whole job (and whose heap it
kept afterwards). Only their timestamps and offsets stay in memory (16 bytes a packet); each
chunk's packaging reads just the packets of its own time range (`between`).

Packet timestamps are in samples on the encoder's timeline: the first packet starts at
`-priming` (the encoder's delay, 1024 samples), the audio's first sample is at 0.
"""
from __future__ import annotations

import bisect
import logging
import os
import tempfile
import threading
import time
from array import array
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from cluster.errors import EncodeError, MediaError
from cluster.media.ffmpeg import file_url

log = logging.getLogger("lipsync.aac")

#: AAC-LC sample rates an `.m4a`'s 16-bit sample-rate field and every player take; others are resampled.
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
FRAME = 1024


def _decoded_frames(container, stream, path: str):
    """The audio frames of `stream`, a packet that does not decode skipped (logged), as ffmpeg's
    own decode of the job's audio skips it: an mp3 with a corrupt stretch renders (the speech
    features came from that decode) and its AAC track must not fail the job's stream over it."""
    bad = 0
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            bad += 1
            if bad == 1:
                log.warning("%s: an audio packet at %s does not decode; skipped as ffmpeg skips it", path,
                            packet.pts)
    if bad > 1:
        log.warning("%s: %d audio packets did not decode and were skipped", path, bad)


def _bitrate(text: str | int) -> int:
    text = str(text).strip().lower()
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


#: `OutputLevel`: once a file's samples have gone beyond full scale, each frame's peak is brought to at most this
#: (a gain, not a bend of the waveform: a hot 5.1 file bent under 0.9 decoded from its AAC at 1.23, the flattened
#: waves' own overshoot); the gain comes back over LIMIT_RELEASE_S
LIMIT_PEAK = 0.7
LIMIT_RELEASE_S = 1.0
#: How fast `OutputLevel` follows a file's DC offset (seconds)
DC_FOLLOW_S = 2.0


class OutputLevel:
    """What the job's AAC track does to the file's samples before they are encoded, frame by frame in order (so
    every encode of a file gives the same samples): nothing for a file within full scale without a DC offset (every
    usual one: bit for bit as given). A file with a DC offset (`dc_block`: the plan found one, `model_dc`) has it
    taken off, followed per channel from its first frame on (its AAC rang past full scale at the offset's step: a
    peak of 0.96 decoded at 1.29). From a file's first sample beyond full scale on (a float file mastered hot, a 5.1
    file mixed down to stereo: swresample's matrix is not normalised), each frame's peak is brought under
    `LIMIT_PEAK` by a gain that comes back over `LIMIT_RELEASE_S` (its AAC clipped on every player: 3.3 and 2.05)."""

    def __init__(self, rate: int, dc_block: bool = False) -> None:
        self.rate, self.dc_block = rate, dc_block
        self.dc: np.ndarray | None = None  # per channel, as followed so far
        self.engaged = False
        self.gain = 1.0

    def __call__(self, frame, layout: str):
        data = frame.to_ndarray().astype(np.float64)
        n = data.shape[1] if data.ndim == 2 else 0
        if not n:
            return frame
        changed = False
        if self.dc_block:
            mean = data.mean(axis=1, keepdims=True)
            self.dc = mean if self.dc is None else self.dc + (mean - self.dc) * min(1.0, n / (self.rate * DC_FOLLOW_S))
            data -= self.dc
            changed = True
        peak = float(np.abs(data).max())
        self.engaged = self.engaged or peak > 1.0
        if self.engaged:
            target = min(1.0, LIMIT_PEAK / peak) if peak > 0 else 1.0
            self.gain = target if target < self.gain else min(target, self.gain + n / (self.rate * LIMIT_RELEASE_S))
            if self.gain < 1.0:
                data *= self.gain
                changed = True
        if not changed:
            return frame
        out = av.AudioFrame.from_ndarray(np.ascontiguousarray(data, dtype=np.float32), format="fltp", layout=layout)
        out.sample_rate, out.pts = frame.sample_rate, frame.pts
        if frame.time_base is not None:
            out.time_base = frame.time_base
        return out


class PacketFile:
    """Packets `(pts, bytes)` appended in pts order to an unnamed file (in `directory`, removed
    when closed); read back by pts range. Not thread-safe by itself: `AacTrack` calls it under
    its lock."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".aac-packets.")
        self._pts = array("q")
        self._ends = array("q")  # byte offset where each packet ends (the next one starts)

    def __len__(self) -> int:
        return len(self._pts)

    @property
    def closed(self) -> bool:
        return self._file.closed

    @property
    def last_pts(self) -> int | None:
        return self._pts[-1] if self._pts else None

    @property
    def first_pts(self) -> int | None:
        return self._pts[0] if self._pts else None

    def append(self, packets: list[tuple[int, bytes]]) -> None:
        if not packets:
            return
        start = self._ends[-1] if self._ends else 0
        data = b"".join(d for _, d in packets)
        written = 0
        while written < len(data):  # pwrite may write less than asked
            written += os.pwrite(self._file.fileno(), data[written:], start + written)
        end = start
        for pts, d in packets:
            end += len(d)
            self._pts.append(pts)
            self._ends.append(end)

    def read(self, first: int, stop: int) -> list[tuple[int, bytes]]:
        """Packets `first`..`stop - 1` (indices), in one read."""
        if stop <= first:
            return []
        lo = self._ends[first - 1] if first else 0
        data = os.pread(self._file.fileno(), self._ends[stop - 1] - lo, lo)
        out, at = [], 0
        for i in range(first, stop):
            n = self._ends[i] - lo - at
            out.append((self._pts[i], data[at:at + n]))
            at += n
        return out

    def index_range(self, lo: int | None, hi: int | None) -> tuple[int, int]:
        """Indices of the packets with `lo <= pts < hi` (None: no bound)."""
        first = 0 if lo is None else bisect.bisect_left(self._pts, lo)
        stop = len(self._pts) if hi is None else bisect.bisect_left(self._pts, hi)
        return first, max(first, stop)

    def close(self) -> None:
        self._file.close()


class AacTrack:
    """The AAC packets of one audio file cut to `duration` seconds, in a `PacketFile` (in
    `spill_dir`, the system's temporary directory by default): `between` reads them by time.
    `close` drops them.

    `hold_after_s`: `encode` pauses once its packets reach that time, until `allow_until` moves the
    limit on, `release` lifts it (or `stop`; a pause lasts at most `hold_max_s` seconds, then the
    limit is gone): a job's first segment needs only its own audio, and encoding the whole audio at
    once would compete with the rendering of the first segments for the CPU."""

    def __init__(self, audio_path: str, duration: float, bitrate: str | int = "160k",
                 hold_after_s: float | None = None, hold_max_s: float = 60.0,
                 spill_dir: str | Path | None = None, dc_block: bool = False) -> None:
        self.audio_path, self.duration, self.bitrate = str(audio_path), float(duration), _bitrate(bitrate)
        self.dc_block = dc_block  # the file has a DC offset (`OutputLevel`)
        self._hold_after_s, self._hold_max_s = hold_after_s, float(hold_max_s)
        self._packets = PacketFile(spill_dir)
        self.sample_rate = 0
        self.channels = 0
        self.asc = b""
        self.priming = FRAME
        self.done = False
        self.error: Exception | None = None
        self._stopped = False
        self._cond = threading.Condition()

    def stop(self) -> None:
        """Stop an `encode` in progress (the job ended): it returns soon, unfinished."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop any `encode` and drop the packets (their file); reading them raises afterwards."""
        with self._cond:
            self._stopped = True
            self._packets.close()
            self._cond.notify_all()

    @property
    def packet_count(self) -> int:
        with self._cond:
            return len(self._packets)

    @property
    def last_pts(self) -> int | None:
        """The timestamp of the newest packet (None before the first)."""
        with self._cond:
            return self._packets.last_pts

    def release(self) -> None:
        """Let a held `encode` (see `hold_after_s`) go on to the end."""
        with self._cond:
            self._hold_after_s = None
            self._cond.notify_all()

    def allow_until(self, seconds: float) -> None:
        """Let a held `encode` go on up to `seconds` (never moves the limit back; none stays none)."""
        with self._cond:
            if self._hold_after_s is not None and seconds > self._hold_after_s:
                self._hold_after_s = float(seconds)
                self._cond.notify_all()

    def _reached_limit(self) -> bool:
        last = self._packets.last_pts
        return self._hold_after_s is not None and last is not None and last >= self._hold_after_s * self.sample_rate

    def _hold(self) -> None:
        """Pause (bounded) while the packets have reached the limit (`hold_after_s`)."""
        with self._cond:
            if not self._reached_limit():
                return
            deadline = time.monotonic() + self._hold_max_s
            while self._reached_limit() and not self._stopped and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(min(left, 1.0))
            if self._reached_limit():  # nobody moved it on in time: no limit any more
                self._hold_after_s = None

    # --- producing ---------------------------------------------------------------------------
    def encode(self) -> "AacTrack":
        """Encode the whole audio (call in a thread); packets become visible as they are made."""
        try:
            self._encode()
        except Exception as e:
            with self._cond:
                self.error = e if isinstance(e, MediaError) else EncodeError(
                    f"AAC encoding of {self.audio_path} failed: {e}", path=self.audio_path, stage="encode",
                    cause=repr(e))
                self._cond.notify_all()
            raise self.error from None
        return self

    def _encode(self) -> None:
        from cluster.media.probe import speech_stream

        index = speech_stream(self.audio_path)  # the track the mel features follow
        with av.open(file_url(self.audio_path), options={"protocol_whitelist": "file"}) as inp:
            stream = inp.streams.audio[index]
            rate = stream.codec_context.sample_rate or 48000
            rate = rate if rate in AAC_RATES else 48000
            channels = min(2, stream.codec_context.channels or 1)
            layout = "stereo" if channels == 2 else "mono"
            encoder = av.CodecContext.create("aac", "w")
            encoder.sample_rate, encoder.layout, encoder.format = rate, layout, "fltp"
            encoder.bit_rate = self.bitrate
            encoder.time_base = Fraction(1, rate)
            encoder.open()
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate, frame_size=FRAME)
            with self._cond:
                self.sample_rate, self.channels = rate, channels
                self.asc = bytes(encoder.extradata or b"")
                self.priming = encoder.delay if getattr(encoder, "delay", None) else FRAME
                self._cond.notify_all()
            total = round(self.duration * rate)
            fed = 0

            def feed(frame) -> None:
                nonlocal fed
                if frame is not None:
                    n = min(frame.samples, total - fed)
                    if n <= 0:
                        return
                    if n < frame.samples:
                        data = frame.to_ndarray()[:, :n]
                        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="fltp", layout=layout)
                        frame.sample_rate = rate
                    frame.pts, frame.time_base = fed, Fraction(1, rate)
                    fed += n
                out = [(p.pts, bytes(p)) for p in encoder.encode(frame)]
                if out:
                    with self._cond:
                        if self._packets.closed:  # closed meanwhile (the job ended): nothing to keep
                            return
                        self._packets.append(out)
                        self._cond.notify_all()

            level = OutputLevel(rate, self.dc_block)
            for frame in _decoded_frames(inp, stream, self.audio_path):
                self._hold()
                if self._stopped:
                    return
                for part in resampler.resample(frame):
                    feed(level(part, layout))
                if fed >= total:
                    break
            for part in resampler.resample(None):
                feed(level(part, layout))
            if fed < total:  # the file holds less than it said: pad with silence to the planned length
                while fed < total:
                    n = min(FRAME, total - fed)
                    silence = av.AudioFrame.from_ndarray(np.zeros((channels, n), np.float32), format="fltp",
                                                         layout=layout)
                    silence.sample_rate = rate
                    feed(silence)
            feed(None)
        with self._cond:
            self.done = True
            self._cond.notify_all()

    # --- consuming -----------------------------------------------------------------------------
    def wait_until(self, sample: int, timeout: float) -> None:
        """Block until every packet starting before `sample` exists (or the track is done)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.done and self.error is None and not ((last := self._packets.last_pts) is not None
                                                                and last >= sample):
                if self._stopped:
                    raise EncodeError(f"AAC encoding of {self.audio_path} was stopped", stage="encode")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EncodeError(f"AAC encoding of {self.audio_path} did not reach sample {sample} within "
                                      f"{timeout:.0f} s", path=self.audio_path, stage="encode")
                self._cond.wait(min(left, 1.0))
            if self.error is not None:
                raise self.error

    def wait_format(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.sample_rate and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EncodeError(f"AAC encoding of {self.audio_path} did not start within {timeout:.0f} s",
                                      path=self.audio_path, stage="encode")
                self._cond.wait(min(left, 1.0))
            if self.error is not None:
                raise self.error

    def between(self, lo: int | None, hi: int | None, upto: int | None = None) -> list[tuple[int, bytes]]:
        """The packets `(pts, bytes)` with `lo <= pts < hi` (None: no bound) among the first `upto`
        (`packet_count` at some earlier moment; None: all made so far)."""
        with self._cond:
            if self._packets.closed:
                raise EncodeError(f"AAC track of {self.audio_path} was closed", stage="encode")
            first, stop = self._packets.index_range(lo, hi)
            return self._packets.read(first, stop if upto is None else min(stop, upto))

    def _blocks(self, size: int = 4096):
        """Every packet, `size` at a time."""
        with self._cond:
            count = len(self._packets)
        for first in range(0, count, size):
            with self._cond:
                block = self._packets.read(first, min(count, first + size))
            yield from block

    # --- the finished track as a file ------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the finished track as an `.m4a` (the same packets; the muxer's edit list trims the
        priming, and the encoder's padding after the last real sample: the last packet lasts only the
        samples it holds, so the file, and the mp4 its packets are copied into, lasts the speech's
        exact length) to `path`, atomically."""
        from cluster.fsutil import atomic_writer

        if not self.done:
            raise EncodeError(f"AAC track of {self.audio_path} is not finished", stage="encode")
        with atomic_writer(path) as f:  # the muxer writes through the file's descriptor, by the file protocol
            with av.open(file_url(f"/proc/self/fd/{f.fileno()}"), "w", format="ipod",
                         options={"protocol_whitelist": "file"}) as out:
                stream = out.add_stream("aac", rate=self.sample_rate,
                                        layout="stereo" if self.channels == 2 else "mono")
                stream.bit_rate = self.bitrate
                total = round(self.duration * self.sample_rate)  # the real samples (the encoder's 0 on)
                for pts, data in self._blocks():
                    packet = av.Packet(data)
                    packet.pts = packet.dts = pts
                    packet.duration = max(1, min(FRAME, total - pts))
                    packet.time_base = Fraction(1, self.sample_rate)
                    packet.stream = stream
                    out.mux(packet)

    @classmethod
    def load(cls, path: str | Path, audio_path: str, duration: float, bitrate: str | int,
             spill_dir: str | Path | None = None) -> "AacTrack":
        """A finished track saved by `save` (its packets copied block by block into the track's file)."""
        track = cls(audio_path, duration, bitrate, spill_dir=spill_dir)
        try:
            with av.open(file_url(str(path)), options={"protocol_whitelist": "file"}) as inp:
                stream = inp.streams.audio[0]
                track.sample_rate = stream.codec_context.sample_rate
                track.channels = stream.codec_context.channels
                track.asc = bytes(stream.codec_context.extradata or b"")
                scale = Fraction(stream.time_base) * track.sample_rate
                block: list[tuple[int, bytes]] = []
                for p in inp.demux(stream):
                    if p.size:
                        block.append((int(p.pts * scale), bytes(p)))
                    if len(block) >= 4096:
                        track._packets.append(block)
                        block = []
                track._packets.append(block)
            if not len(track._packets):
                raise MediaError(f"saved AAC track {path} holds no packets", path=str(path))
        except BaseException:
            track.close()
            raise
        track.priming = -track._packets.first_pts
        track.done = True
        return track
