"""A live session's render loop, in plain Python: speech in, frames and audio to the encoder at
real-time pace, latency and stall figures out.

`LiveRenderer` renders a planned batch exactly as a batch job renders its frames
(`cluster.render.render_chunk`: the same template reader, crop matrices, crops, model input and
paste-back). `LiveSession` runs the clock: output frame `f` is due `f / fps` after the start;
each batch of `live_batch_frames` is planned `live_lead_s` before its first frame is due, so
speech that arrives is on the next batch, not behind frames rendered ahead.

Latency of a chunk of audio = from its arrival (`append`) to the publication of the live
segment holding its last frame (the playlist listing it). A stall = the playlist not advancing for
longer than `STALL_S` while the session runs.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from cluster.config import Settings, get_settings
from cluster.errors import LipsyncError
from cluster.live.encoder import LiveEncoder, make_recording, publish_playlist
from cluster.live.schedule import FrameBatch, LiveScheduler
from cluster.live.speech import SpeechInput, model_columns
from cluster.netguard import RtmpTarget

log = logging.getLogger("lipsync.live")

STALL_S = 1.0
GenerateFn = Callable[[np.ndarray, np.ndarray], "np.ndarray | Callable[[], np.ndarray]"]


class LiveRenderer:
    """Template frames + face track of a prepared avatar; renders `FrameBatch`es."""

    def __init__(self, template_path: str, track_path: str, model_size: int, crop: str,
                 settings: Settings | None = None) -> None:
        from cluster.faces.track import FaceTrack
        from cluster.media.decode import TemplateReader

        self.settings = settings or get_settings()
        self.size, self.crop = int(model_size), crop
        self.track = FaceTrack.load(track_path)
        self.reader = TemplateReader(template_path, self.settings)
        self.width, self.height, self.fps = self.reader.width, self.reader.height, self.reader.fps
        self.frame_count = self.reader.frame_count

    def render(self, batch: FrameBatch, generate: GenerateFn) -> tuple[np.ndarray, BaseException | None]:
        """(frames [n,H,W,3] BGR, None) with the model's mouths pasted in; on any failure of the
        model (`generate` raising), (the template frames as decoded, the error)."""
        from cluster.faces.align import crop_matrices, cut_crops, paste_back

        idx = batch.template_index
        frames = self.reader.read(idx)
        matrices = crop_matrices(self.track.landmarks[idx], self.track.boxes[idx], self.size, self.crop,
                                 (self.width, self.height))
        crops = cut_crops(frames, matrices, self.size)
        try:
            generated = generate(batch.mel, crops)
            if callable(generated):
                generated = generated()
        except Exception as e:  # the model is away: the stream goes on with template frames
            return frames, e
        return paste_back(frames, generated, matrices, self.size, original_crops=crops, recipe=self.crop,
                          inplace=True), None

    def close(self) -> None:
        self.reader.close()


def raise_priority(nice: int) -> bool:
    """Set the calling thread's nice value (Linux: per thread; threads and processes it starts
    afterwards inherit it). False when not permitted (below 0 needs CAP_SYS_NICE)."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        return True
    except (OSError, AttributeError) as e:
        log.info("cannot set nice %d for the live render thread: %s", nice, e)
        return False


def percentile(values, q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 4) if len(values) else None


class LiveSession:
    """One session: `append` PCM, `end_speech`, `stop`; `stats()` at any time.

    `generate` is where the model is reached (in-process here, a model worker's live lane in the
    cluster, `actors.live`). `on_frames(batch, frames, ok)` sees every batch before encoding."""

    def __init__(self, session_id: str, *, template_path: str, track_path: str, model: str, model_size: int,
                 crop: str, generate: GenerateFn, sample_rate: int, out_dir: str | Path,
                 settings: Settings | None = None, max_seconds: float | None = None,
                 on_frames: Callable[[FrameBatch, np.ndarray, bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, rtmp: RtmpTarget | None = None) -> None:
        self.id = session_id
        self.rtmp = rtmp  # the stream pushed there too (vetted by cluster.netguard.vet_rtmp_url)
        self.s = s = settings or get_settings()
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.generate = generate
        self.on_frames = on_frames
        self.clock = clock
        self.max_seconds = min(max_seconds or s.live_max_seconds, s.live_max_seconds)
        self.renderer = LiveRenderer(template_path, track_path, model_size, crop, s)
        self.fps = Fraction(self.renderer.fps)
        self.speech = SpeechInput(sample_rate, self.fps, model_columns(model))
        self.scheduler = LiveScheduler(self.speech, self.renderer.frame_count, self.fps)
        self.encoder: LiveEncoder | None = None
        self.state = "starting"
        self.reason: str | None = None  # why it ended
        self.error: dict | None = None
        self.created = clock()
        self.started: float | None = None
        self.last_audio = clock()
        self.model_faults = 0
        self.last_fault: str | None = None
        self.recording: Path | None = None
        self.recording_seconds: float | None = None
        self._stop = threading.Event()
        self._started = threading.Event()
        self.prioritised = False
        self._drain = False  # end once every received utterance has been rendered
        self._chunks: collections.deque = collections.deque()  # (arrival, utterance, last 16 kHz sample)
        self._rendered: collections.deque = collections.deque()  # (arrival, output frame)
        self._written: collections.deque = collections.deque()  # (first output frame of a batch, when written)
        self.encoder_delays: list[float] = []  # a segment's publication - its closing frame's write
        self.latencies: list[float] = []
        self.published_frames = 0
        self.segments_published = 0
        self.stalls = 0
        self.longest_gap_s = 0.0
        self._last_publication: float | None = None
        self._seen_segments: set[int] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"live-{session_id}", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name=f"live-watch-{session_id}", daemon=True)

    # --- control -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Start the render thread (which starts the encoder, at its priority) and the watcher."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"session {self.id}: the render thread did not start in {timeout:g} s")
        if self.error is not None:
            self._thread.join(timeout)
            raise LipsyncError(self.error["message"], code=self.error["code"], stage="live")
        self._watcher.start()

    @property
    def ended(self) -> bool:
        return self.state in ("ended", "failed")

    def buffered_seconds(self) -> float:
        return self.scheduler.pending_speech_frames() / float(self.fps)

    def append(self, pcm: bytes, offset: int | None = None) -> dict:
        """Add PCM s16le at the session's rate. `offset`: the stream byte offset of `pcm`'s first
        byte (idempotent: bytes already received are skipped; a gap is refused). Returns
        {offset, accepted, buffered_s}: not accepted when the buffer of unrendered speech is full
        (the sender must wait) or the session has ended."""
        with self._lock:
            received = self.speech.bytes_received
            if offset is not None:
                if offset > received:
                    raise ValueError(f"offset {offset} is past the {received} bytes received (a gap)")
                skip = received - offset
                if skip % 2:
                    raise ValueError(f"offset {offset} is not on a sample boundary")
                pcm = pcm[skip:] if skip < len(pcm) else b""
            if self.state not in ("live", "starting"):
                return {"offset": received, "accepted": False, "buffered_s": 0.0, "state": self.state}
            if not pcm:
                return {"offset": received, "accepted": True, "buffered_s": self.buffered_seconds(),
                        "state": self.state}
            buffered = self.buffered_seconds()
            if buffered >= self.s.live_buffer_seconds:
                return {"offset": received, "accepted": False, "buffered_s": buffered, "state": self.state}
            now = self.clock()
            utt, end16 = self.speech.append(bytes(pcm))
            self.last_audio = now
            self._chunks.append((now, utt, end16))
            return {"offset": self.speech.bytes_received, "accepted": True, "buffered_s": self.buffered_seconds(),
                    "state": self.state}

    def end_speech(self) -> bool:
        """The end of an utterance: its tail renders now (with the batch path's end padding)."""
        return self.speech.end()

    def finish(self) -> None:
        """End the speech and the session once everything received has been rendered."""
        self.end_speech()
        self._drain = True

    def stop(self, reason: str = "deleted", timeout: float = 60.0) -> None:
        """End now (speech not yet rendered is not rendered), finish the stream and the recording."""
        self.reason = self.reason or reason
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the loop ------------------------------------------------------------------------------
    def _housekeeping(self, now: float) -> str | None:
        """Why the session should end now, if it should."""
        sched = self.scheduler
        with self.speech.lock:
            utts = self.speech.utterances
            open_utt = utts[-1] if utts and not utts[-1].ended else None
            if open_utt is not None and now - self.last_audio > self.s.live_flush_after_s \
                    and open_utt.scheduled >= open_utt.ready_frames():
                self.speech.end()  # the sender paused mid-window: render the tail now
        pending = sched.pending_speech_frames()
        if self._drain and pending == 0:
            return "finished"
        if now - self.started > self.max_seconds:
            return "max_seconds"
        if pending == 0 and now - self.last_audio > self.s.live_idle_timeout_s:
            return "idle_timeout"
        return None

    def _run(self) -> None:
        s, fps = self.s, self.fps
        batch_frames = s.live_batch_frames
        self.prioritised = raise_priority(s.live_nice)
        try:
            self.encoder = LiveEncoder(self.out_dir / "hls", self.renderer.width, self.renderer.height, self.fps,
                                       self.speech.rate, self.s, rtmp=self.rtmp)
        except LipsyncError as e:
            self.error = e.to_info().model_dump()
            self.state = "failed"
            self.renderer.close()
            self._started.set()
            return
        self.state = "live"
        self.started = t0 = self.clock()
        self._started.set()
        try:
            while not self._stop.is_set():
                due = t0 + self.scheduler.next_frame / float(fps) - s.live_lead_s
                wait = due - self.clock()
                if wait > 0 and self._stop.wait(wait):
                    break
                why = self._housekeeping(self.clock())
                if why is not None:
                    self.reason = self.reason or why
                    break
                batch = self.scheduler.plan(batch_frames)
                frames, err = self.renderer.render(batch, self.generate)
                if err is None:
                    audio = self.scheduler.commit(batch)
                    self._rendered_batch(batch)
                else:
                    audio = self.scheduler.rollback(batch)
                    self.model_faults += 1
                    self.last_fault = f"{type(err).__name__}: {err}"[:500]
                    log.warning("session %s: batch at frame %d shown without the model: %s", self.id, batch.first,
                                self.last_fault)
                if self.on_frames is not None:
                    self.on_frames(batch, frames, err is None)
                self.encoder.write(frames, audio)
                self._written.append((batch.first + len(batch), self.clock()))
        except Exception as e:  # the session ends with the truth: failed, and why
            log.exception("session %s failed", self.id)
            self.error = (e.to_info().model_dump() if isinstance(e, LipsyncError)
                          else {"code": "live.internal", "message": repr(e)[:2000]})
            self.reason = self.reason or "failed"
        finally:
            self._finish()

    def _rendered_batch(self, batch: FrameBatch) -> None:
        """Chunks whose last speech frame is in this batch: now waiting for their segment."""
        utts = self.speech.utterances
        for offset, slot in enumerate(batch.speech):
            if slot is None:
                continue
            u_index, k = slot
            while self._chunks and self._chunks[0][1] <= u_index:
                arrival, cu, end16 = self._chunks[0]
                u = utts[cu]
                last = u.frame_of_sample(max(0, end16 - 1))
                total = u.total_frames()
                if total is not None:
                    last = min(last, total - 1)
                if cu == u_index and last > k:
                    break
                self._chunks.popleft()
                self._rendered.append((arrival, batch.first + offset))

    def _finish(self) -> None:
        ok = self.error is None
        self.state = "ending"
        try:
            if self.encoder is not None:
                self.encoder.close(timeout=max(30.0, self.s.probe_timeout_s))
        except LipsyncError as e:
            ok = False
            self.error = self.error or e.to_info().model_dump()
        finally:
            self.renderer.close()
        self._stop.set()
        self._watcher.join(5.0)
        self._poll_playlist()
        if ok:
            try:
                dest = self.out_dir / "recording.mp4"
                self.recording_seconds = make_recording(self.out_dir / "hls", dest, self.encoder.frames_written,
                                                        self.fps, self.s)
                self.recording = dest
            except LipsyncError as e:
                ok = False
                self.error = e.to_info().model_dump()
        self.ended_at = self.clock()
        self.state = "ended" if ok else "failed"
        log.info("session %s %s (%s): %s", self.id, self.state, self.reason, self.stats())

    # --- publication -----------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self._poll_playlist()

    def _poll_playlist(self) -> None:
        try:
            published = publish_playlist(self.out_dir / "hls")
        except (OSError, ValueError) as e:
            log.warning("session %s: cannot publish the playlist: %s", self.id, e)
            published = None
        now = self.clock()
        if published is None:
            if self._last_publication is not None and self.state == "live":
                self.longest_gap_s = max(self.longest_gap_s, now - self._last_publication)
            return
        seq, segments, _ = published
        new = 0
        for i, (_name, seconds) in enumerate(segments):
            if seq + i not in self._seen_segments:
                self._seen_segments.add(seq + i)
                self.published_frames += round(seconds * float(self.fps))
                new += 1
        if not new:
            if self._last_publication is not None and self.state == "live":
                gap = now - self._last_publication
                self.longest_gap_s = max(self.longest_gap_s, gap)
            return
        if self._last_publication is not None:
            gap = now - self._last_publication
            self.longest_gap_s = max(self.longest_gap_s, gap)
            if gap > STALL_S and self.state == "live":
                self.stalls += 1
        self._last_publication = now
        self.segments_published += new
        while self._written and self._written[0][0] <= self.published_frames:
            end, at = self._written.popleft()
            if end == self.published_frames:  # the batch that completed the last published segment
                self.encoder_delays.append(now - at)
        while self._rendered and self._rendered[0][1] < self.published_frames:
            arrival, _frame = self._rendered.popleft()
            self.latencies.append(now - arrival)

    # --- figures ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        fps = float(self.fps)
        utts = list(self.speech.utterances)
        received = sum(u.n for u in utts) / 16000.0
        lat = list(self.latencies)
        return {
            "id": self.id, "state": self.state, "reason": self.reason, "error": self.error,
            "sample_rate": self.speech.rate, "fps": fps,
            "bytes_received": self.speech.bytes_received,
            "seconds_received": round(received, 3),
            "seconds_rendered": round(self.scheduler.speech_frames_done / fps, 3),
            "seconds_streamed": round((self.encoder.frames_written if self.encoder else 0) / fps, 3),
            "buffered_seconds": round(self.buffered_seconds(), 3),
            "segments_published": self.segments_published,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "latency_max_s": round(max(lat), 4) if lat else None, "latency_samples": len(lat),
            "encoder_delay_p50_s": percentile(list(self.encoder_delays), 50),
            "stalls": self.stalls, "longest_gap_s": round(self.longest_gap_s, 3),
            "model_faults": self.model_faults, "last_fault": self.last_fault,
            "recording_seconds": self.recording_seconds,
            **self._rtmp_stats(),
        }

    def _rtmp_stats(self) -> dict:
        if self.rtmp is None:
            return {}
        state, error = self.encoder.rtmp_state() if self.encoder is not None else ("starting", None)
        return {"rtmp_url": self.rtmp.shown, "rtmp_state": state, "rtmp_error": error}
