"""A live session's render loop, in plain Python: speech in, frames and audio to the encoder at
real-time pace, latency and stall figures out.

`LiveRenderer` renders a planned batch exactly as a batch job renders its frames
(`cluster.render.render_chunk`: the same template reader, crop matrices, crops, model input and
paste-back). `LiveSession` runs the clock: output frame `f` is due `f / fps` after the start;
each batch of `live_batch_frames` is planned `live_lead_s` before its first frame is due, so
speech that arrives is on the next batch, not behind frames rendered ahead.

Latency of a chunk of audio = from its arrival (`append`) to the publication of the live
segment holding its last frame (the playlist listing it). A stall = the playlist not advancing for
longer than `STALL_S`, or two of the session's segments where they are longer (`stall_after_s`: one 6 s
segment after another is no stall), while the session runs.
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
from cluster.live import SessionOffsetGap
from cluster.live.encoder import LiveEncoder, LivePlaylist, make_recording
from cluster.live.journal import SessionJournal
from cluster.live.schedule import FrameBatch, LiveScheduler
from cluster.live.speech import SpeechInput, model_columns
from cluster.netguard import RtmpTarget

log = logging.getLogger("lipsync.live")


def _error_info(exc: BaseException, stage: str) -> dict:
    """A session's error from any exception: ours as it is, a full disk as `resource.disk`,
    anything else as `live.internal`; each with the stage it happened in."""
    from cluster.resources import as_typed

    typed = as_typed(exc, stage)
    if typed is not None:
        return typed.with_context(stage=stage).to_info().model_dump()
    path = getattr(exc, "filename2", None) or getattr(exc, "filename", None)  # an OSError's files
    return {"code": "live.internal", "message": f"{stage}: {type(exc).__name__}: {exc}"[:2000], "stage": stage,
            "path": str(path) if path is not None else None}


STALL_S = 1.0
LOAD_WINDOW_BATCHES = 50  # the render load is measured over the last this many batches
LOAD_MIN_BATCHES = 10  # ...once at least this many were rendered
RESTART_GRACE_S = 2.0  # see LiveSession.restore
GenerateFn = Callable[[np.ndarray, np.ndarray], "np.ndarray | Callable[[], np.ndarray]"]


class _CatchingUp(Exception):
    """The batch is rendered without the model (see `LiveSession._run`)."""


def _catching_up(mel: np.ndarray, crops: np.ndarray) -> np.ndarray:
    raise _CatchingUp


class LiveRenderer:
    """Template frames + face track of a prepared avatar; renders `FrameBatch`es."""

    def __init__(self, template_path: str, track_path: str, model_size: int, crop: str,
                 settings: Settings | None = None) -> None:
        from cluster.faces.track import FaceTrack
        from cluster.media.framecache import TemplateFrames

        self.settings = settings or get_settings()
        self.size, self.crop = int(model_size), crop
        self.track = FaceTrack.load(track_path)
        self.reader = TemplateFrames(template_path, self.settings)
        self.width, self.height, self.fps = self.reader.width, self.reader.height, self.reader.fps
        self.frame_count = self.reader.frame_count
        from cluster.media.probe import read_media_info

        # the template's colour tags, carried to the stream as a job's output carries them
        self.color = read_media_info(template_path, self.settings).video.color

    def render(self, batch: FrameBatch, generate: GenerateFn) -> tuple[np.ndarray, BaseException | None]:
        """(frames [n, H * 3 // 2, W] I420, `cluster.media.yuv`, None) with the model's mouths pasted
        in; on any failure of the model (`generate` raising), (the template frames as decoded, the
        error)."""
        from cluster.faces.align import crop_matrices, cut_crops_yuv, paste_back_yuv

        idx = batch.template_index
        frames = self.reader.read_yuv(idx)
        matrices = crop_matrices(self.track.landmarks[idx], self.track.boxes[idx], self.size, self.crop,
                                 (self.width, self.height))
        crops = cut_crops_yuv(frames, matrices, self.size)
        try:
            generated = generate(batch.mel, crops)
            if callable(generated):
                generated = generated()
        except Exception as e:  # the model is away: the stream goes on with template frames
            return frames, e
        return paste_back_yuv(frames, generated, matrices, self.size, original_crops=crops, recipe=self.crop,
                              shown=self.track.shown[idx]), None

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


def session_settings(s: Settings, segment_seconds: float | None) -> Settings:
    """The settings a session runs with: its own longest segment (`SessionCreate.segment_seconds`).
    The playlist keeps its count of segments (`LIVE_PLAYLIST_SEGMENTS`), so shorter segments make a
    shorter window: hls.js starts that much nearer the live edge (with 0.25-s segments, a 16-segment
    window put it 1.7 s behind, the 8-segment one 1.0 s; docs/PERFORMANCE.md)."""
    if not segment_seconds or segment_seconds == s.live_segment_seconds:
        return s
    return s.model_copy(update={"live_segment_seconds": float(segment_seconds)})


class LiveSession:
    """One session: `append` PCM, `end_speech`, `stop`; `stats()` at any time.

    `generate` is where the model is reached (in-process here, a model worker's live lane in the
    cluster, `actors.live`). `on_frames(batch, frames, ok)` sees every batch (I420 frames) before
    encoding."""

    def __init__(self, session_id: str, *, template_path: str, track_path: str, model: str, model_size: int,
                 crop: str, generate: GenerateFn, sample_rate: int, out_dir: str | Path,
                 settings: Settings | None = None, max_seconds: float | None = None,
                 on_frames: Callable[[FrameBatch, np.ndarray, bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, rtmp: RtmpTarget | None = None,
                 journal: SessionJournal | None = None, segment_seconds: float | None = None) -> None:
        self.id = session_id
        self.journal = journal  # speech and publication made durable (a restarted actor resumes: `restore`)
        self.rtmp = rtmp  # the stream pushed there too (vetted by cluster.netguard.vet_rtmp_url)
        self.s = s = session_settings(settings or get_settings(), segment_seconds)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.generate = generate
        self.on_frames = on_frames
        self.clock = clock
        self.max_seconds = min(max_seconds or s.live_max_seconds, s.live_max_seconds)
        self.renderer = LiveRenderer(template_path, track_path, model_size, crop, s)
        self.fps = Fraction(self.renderer.fps)
        self.columns = model_columns(model)
        self.speech = SpeechInput(sample_rate, self.fps, self.columns, denoise=s.denoise_model_input, conditioned=True)
        self.scheduler = LiveScheduler(self.speech, self.renderer.frame_count, self.fps,
                                       # at most half the buffer: a rebuffer the buffer cannot hold would wait
                                       # for the flush (the end of the utterance) each time
                                       rebuffer_frames=round(min(self.s.live_rebuffer_seconds,
                                                                 self.s.live_buffer_seconds / 2) * float(self.fps)),
                                       catch_up=s.live_catch_up, silence_dbfs=s.live_silence_dbfs)
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
        self._busy: collections.deque = collections.deque(maxlen=LOAD_WINDOW_BATCHES)  # (frames, seconds)
        self.encoder_delays: list[float] = []  # a segment's publication - its closing frame's write
        self.latencies: list[float] = []
        self.published_frames = 0
        self.segments_published = 0
        self.stalls = 0
        self.stall_after_s = max(STALL_S, 2 * s.live_segment_seconds)  # (the module's docstring)
        self.longest_gap_s = 0.0
        self._last_publication: float | None = None
        self._lock = threading.Lock()
        self.playlist = LivePlaylist(self.out_dir / "hls", s.live_playlist_segments,
                                     on_segment=self._segment_published if journal is not None else None,
                                     part_target=s.live_segment_seconds)
        self.epoch = 0  # the encoder's: each restart of the session's actor starts the next
        self.restarts = 0
        self.restart_gap_s: float | None = None  # the playlist's stand-still across the last restart
        self._elapsed_before = 0.0  # seconds the session ran before this process
        self._frames_before = 0  # output frames published before this process
        self._last_published_wall: float | None = None
        self._last_pdt = 0.0  # the last segment's #EXT-X-PROGRAM-DATE-TIME (`_speech_arrival`)
        # after a restart: when each step of the resume happened (wall clock), for the figures
        self.restart_timeline: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name=f"live-{session_id}", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name=f"live-watch-{session_id}", daemon=True)

    # --- control -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Start the render thread (which starts the encoder, at its priority) and the watcher."""
        self._thread.start()
        if not self._started.wait(timeout):
            self._stop.set()  # it ends (journalled) whenever it gets going: not a session that never streams
            raise RuntimeError(f"session {self.id}: the render thread did not start in {timeout:g} s")
        if self.error is not None:
            self._thread.join(timeout)
            raise LipsyncError(self.error["message"], code=self.error["code"], stage="live")
        self._watcher.start()

    @property
    def ended(self) -> bool:
        return self.state in ("ended", "failed")

    @property
    def closing(self) -> bool:
        """Ending or ended: nothing more is noted in its journal."""
        return self.state in ("ending", "ended", "failed")

    def buffered_seconds(self) -> float:
        return self.scheduler.pending_speech_frames() / float(self.fps)

    def append(self, pcm: bytes, offset: int | None = None) -> dict:
        """Add PCM s16le at the session's rate. `offset`: the stream byte offset of `pcm`'s first
        byte (idempotent: bytes already received are skipped; a gap is refused). Returns
        {offset, accepted, buffered_s}: not accepted when the buffer of unrendered speech is full
        (the sender must wait) or the session has ended; `offset` is the stream's offset after what
        was taken: the buffer takes what it has room for (`LIPSYNC_LIVE_BUFFER_SECONDS`), the
        sender offers the rest again from there."""
        with self._lock:
            received = self.speech.bytes_received
            if self.state not in ("live", "starting"):  # ended first: no "resend from offset N" to a session
                return {"offset": received, "accepted": False, "buffered_s": 0.0, "state": self.state,
                        "reason": self.reason, "max_seconds": self.max_seconds}
            if offset is not None:
                if offset > received:
                    raise SessionOffsetGap(f"offset {offset} is past the {received} bytes received (a gap): "
                                           f"send again from offset {received}", path="offset")
                skip = received - offset
                if skip % 2:
                    raise SessionOffsetGap(f"offset {offset} is not on a sample boundary (2-byte samples): send "
                                           f"again from offset {received}", path="offset")
                pcm = pcm[skip:] if skip < len(pcm) else b""
            if not pcm:
                return {"offset": received, "accepted": True, "buffered_s": self.buffered_seconds(),
                        "state": self.state}
            buffered = self.buffered_seconds()
            room = int((self.s.live_buffer_seconds - buffered) * self.speech.rate) * 2  # whole samples
            if room <= 0:
                return {"offset": received, "accepted": False, "buffered_s": buffered, "state": self.state}
            pcm = pcm[:room]  # what the buffer has room for: the sender offers the rest again (from `offset`)
            now = self.clock()
            if self.journal is not None:  # on disk before it is acknowledged
                try:
                    self.journal.write_audio(bytes(pcm))
                except OSError as e:  # a full disk: the session fails with its cause, its socket told (not a
                    from cluster.resources import as_typed  # raw OSError: the client reconnected 311 times)

                    typed = as_typed(e, "live-journal")
                    if typed is None:
                        raise
                    if not self.closing:  # (an append racing the end: the end stands as it is)
                        self.error = self.error or typed.to_info().model_dump()
                        self.reason = self.reason or "failed"
                        self._stop.set()
                    raise typed from e
            utt, end16 = self.speech.append(bytes(pcm))
            self.last_audio = now
            self._chunks.append((now, utt, end16))
            return {"offset": self.speech.bytes_received, "accepted": True, "buffered_s": self.buffered_seconds(),
                    "state": self.state}

    def sender_lost(self, seconds: float) -> None:
        """The sender's audio socket was lost (never closed: a killed ingress replica, a dropped connection) and
        a new one took its place `seconds` after it was last heard: the speech it sends now waited that long,
        through no pace of its own. Owed as a takeover's stand-still is (`LiveScheduler.add_debt`), and won back
        from the pauses of the waiting speech; where the utterance had ended, nothing waited."""
        fps = float(self.scheduler.fps)
        with self.speech.lock:  # (the render thread's plan and rollback change the debt under it too)
            utterances = self.speech.utterances
            if self.closing or not utterances or utterances[-1].ended:
                return
            self.scheduler.add_debt(round(max(0.0, seconds) * fps), hold_s=RESTART_GRACE_S)

    def end_speech(self) -> bool:
        """The end of an utterance: its tail renders now (with the batch path's end padding). Nothing
        once the session is ending or has ended (its journal is closed: nothing is noted after its end)."""
        with self.speech.lock:  # noted before any batch can plan the tail
            if self.closing:
                return False
            ended = self.speech.end()
            if ended and self.journal is not None:
                self.journal.note({"end": self.speech.bytes_received})
        return ended

    def finish(self) -> None:
        """End the speech and the session once everything received has been rendered (nothing once
        it is ending or has ended)."""
        if self.closing:
            return
        self.end_speech()
        if self.journal is not None and not self._drain:
            self.journal.note({"finish": True})
        self._drain = True

    def stop(self, reason: str = "deleted", timeout: float = 60.0) -> None:
        """End now (speech not yet rendered is not rendered), finish the stream and the recording."""
        if self.journal is not None and not self._stop.is_set():
            self.journal.note({"stop": reason})
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
            # (waiting for its rebuffer: only while it cannot be met, not an utterance queued behind another
            # with its frames ready: ended early, it was cut in two mid-word)
            if open_utt is not None and now - self.last_audio > self.s.live_flush_after_s \
                    and (open_utt.scheduled >= open_utt.ready_frames()
                         or open_utt.rebuffering
                         and open_utt.ready_frames() - open_utt.scheduled < sched.rebuffer_frames):
                self.end_speech()  # the sender paused mid-window: render the tail now
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
                                       self.speech.rate, self.s, rtmp=self.rtmp, epoch=self.epoch,
                                       start_number=len(self.playlist.entries), start_frame=self._frames_before,
                                       color=self.renderer.color)
        except Exception as e:  # e.g. its audio pipe could not be made: the session fails with the cause
            log.exception("session %s: its encoder did not start", self.id)
            self.error = _error_info(e, "live-encoder")
            try:
                self._finish()  # ended, journalled: a takeover's registry sees it end, its standby stops waiting
            finally:
                self._started.set()
            return
        self.state = "live"
        self._mark("encoder_started")
        now = self.clock()
        self.started = now - self._elapsed_before  # max_seconds counts from the session's start
        # the next frame (after a restart: not 0) is due now; after a restart, the whole first segment is:
        # the stream stood still while the actor came back, its first segment is rendered at once
        ahead = self.encoder.gop if self.restarts else 0
        t0 = now - (self.scheduler.next_frame + ahead) / float(fps)
        # ...and without the model up to the frame that closes it (the next segment's keyframe): the
        # playlist moves again as soon as template frames can be encoded; the speech planned there is
        # put back and rendered, with the model, on the frames after
        catch_up_end = self.scheduler.next_frame + ahead if self.restarts else -1
        if self.restarts and self._last_published_wall is not None:  # the stand-still delayed the waiting speech
            # (held while the speech sent meanwhile comes again from the service: its first batches come first)
            self.scheduler.add_debt(round(max(0.0, time.time() - self._last_published_wall) * float(fps)),
                                    hold_s=RESTART_GRACE_S)
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
                busy_from = time.perf_counter()
                batch = self.scheduler.plan(batch_frames)
                catching_up = batch.first <= catch_up_end
                frames, err = self.renderer.render(batch, _catching_up if catching_up else self.generate)
                if err is None:
                    audio = self.scheduler.commit(batch)
                    self._rendered_batch(batch)
                else:  # its speech is put back and rendered on the next frames
                    # (a takeover's frames before the one due at its start fill the stand-still's stream time)
                    audio = self.scheduler.rollback(batch, owed_from=max(0, catch_up_end - batch.first)
                                                    if catching_up else 0)
                    if not catching_up:
                        self.model_faults += 1
                        self.last_fault = f"{type(err).__name__}: {err}"[:500]
                        log.warning("session %s: batch at frame %d shown without the model: %s", self.id,
                                    batch.first, self.last_fault)
                if self.on_frames is not None:
                    self.on_frames(batch, frames, err is None)
                self.encoder.write(frames, audio)
                self._busy.append((len(batch), time.perf_counter() - busy_from))
                self._mark("first_batch_written")
                self._written.append((batch.first + len(batch), self.clock()))
        except Exception as e:  # the session ends with the truth: failed, and why
            log.exception("session %s failed", self.id)
            self.error = _error_info(e, "live")
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
        """Close the encoder, publish the last segments and join the recording; whatever fails on
        the way (a full disk, an ffmpeg that hangs) the session ends `failed` with its cause, and
        its end is journalled: it never stays `ending`."""
        ok = self.error is None
        self.state = "ending"
        try:
            try:
                if self.encoder is not None:
                    self.encoder.close(timeout=max(30.0, self.s.probe_timeout_s))
            except Exception as e:
                log.exception("session %s: closing its encoder failed", self.id)
                ok = False
                self.error = self.error or _error_info(e, "live-encoder")
            finally:
                self.renderer.close()
            self._stop.set()
            if self._watcher.is_alive():
                self._watcher.join(5.0)
            self._poll_playlist(final=True)
            if ok or self.playlist.entries:  # a failed session's recording holds what it had published
                dest = self.out_dir / "recording.mp4"
                self.recording_seconds = make_recording(self.out_dir / "hls", dest, self.playlist.entries,
                                                        self.fps, self.s)
                self.recording = dest
        except Exception as e:
            log.exception("session %s: its recording failed", self.id)
            ok = False
            self.error = self.error or _error_info(e, "live-recording")
        finally:
            self.ended_at = self.clock()
            self.state = "ended" if ok and self.error is None else "failed"  # (an error set while it ended counts)
            if self.journal is not None:
                try:
                    self.journal.save_final({**self.stats(), "ended_wall": time.time()})
                    if ok and self.recording is not None:  # the recording holds its speech now
                        self.journal.drop_audio()
                except OSError as e:  # a full disk: its end is not journalled (said), the session still ends
                    log.error("session %s: its end (%s) could not be journalled: %s", self.id, self.state, e)
                finally:
                    self.journal.close()
            log.info("session %s %s (%s): %s", self.id, self.state, self.reason, self.stats())

    # --- publication -----------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self._poll_playlist()

    def _poll_playlist(self, final: bool = False) -> None:
        encoder = self.encoder
        if encoder is None:
            return
        try:
            published = self.playlist.poll(encoder.playlist, encoder.epoch, encoder.init, self.fps, final)
        except OSError as e:
            log.warning("session %s: cannot publish the playlist: %s", self.id, e)
            published = []
        now = self.clock()
        new = len(published)
        self.published_frames += sum(e["frames"] for e in published)
        if not new:
            if self._last_publication is not None and self.state == "live":
                gap = now - self._last_publication
                self.longest_gap_s = max(self.longest_gap_s, gap)
            return
        if self._last_publication is None and self._last_published_wall is not None:
            # the first publication after a restart: the stand-still, from the last one before it
            self._mark("first_published")
            gap = time.time() - self._last_published_wall
            self.restart_gap_s = round(gap, 3)
            self.longest_gap_s = max(self.longest_gap_s, gap)
            if gap > self.stall_after_s:
                self.stalls += 1
        if self._last_publication is not None:
            gap = now - self._last_publication
            self.longest_gap_s = max(self.longest_gap_s, gap)
            if gap > self.stall_after_s and self.state == "live":
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

    def warm(self) -> None:
        """Run the render path once off the record (a scratch schedule of idle frames, pasted back;
        nothing encoded or published), so that a standby that takes the session over renders its
        first batch with warm code: imports, the template's decoder, the crop, paste-back, colour
        and resampling steps."""
        from cluster.live.encoder import AUDIO_RATE
        from cluster.live.speech import StreamResampler

        scratch = LiveScheduler(SpeechInput(self.speech.rate, self.fps, self.columns), self.renderer.frame_count,
                                self.fps)
        batch = scratch.plan(self.s.live_batch_frames)
        frames, err = self.renderer.render(batch, lambda mel, crops: crops)
        if err is not None:
            raise err
        StreamResampler(self.speech.rate, AUDIO_RATE).push(np.zeros(self.speech.rate // 10, np.float32))

    # --- durability (cluster.live.journal) ---------------------------------------------------------
    def _segment_published(self, entry: dict) -> None:
        """A new segment, made durable before it is served: with the point a restarted session
        resumes from (the output frames published and the last speech frame among them)."""
        end = (self.playlist.entries[-1]["end_frame"] if self.playlist.entries else 0) + entry["frames"]
        entry.update(end_frame=end, mark=self.scheduler.published(end), at=time.time(),
                     pdt=self._speech_arrival(end - entry["frames"], end),
                     figures={"stalls": self.stalls, "longest_gap_s": round(self.longest_gap_s, 3),
                              "model_faults": self.model_faults, "speech_underruns": self.scheduler.underruns})
        self.journal.publish(entry)

    def _speech_arrival(self, first: int, end: int) -> float | None:
        """The playlist's `#EXT-X-PROGRAM-DATE-TIME` of the segment of output frames [first, end):
        the wall-clock arrival of the speech its first frame shows. Each chunk whose last frame is
        in the segment gives its arrival less its frame's distance from `first` at the frame rate;
        the median of those. None for a segment without such a chunk (idle; after a restart). Never before
        the last one given: a median a few ms earlier than the previous segment's (a docs probe saw 17 ms)
        put the playlist's clock backwards, which players take as a discontinuity."""
        fps = float(self.fps)
        marks = sorted(arrival - (frame - first) / fps for arrival, frame in list(self._rendered)
                       if first <= frame < end)
        if not marks:
            return None
        pdt = max(round(time.time() - (self.clock() - marks[len(marks) // 2]), 3), self._last_pdt)
        self._last_pdt = pdt
        return pdt

    def restore(self) -> str | None:
        """Before `start`, in a restarted actor: the speech received (replayed from the journal,
        utterances cut where they were), the stream published (the playlist goes on from its
        entries, the next encoder epoch numbers its segments after them), and the render position
        after the last published speech frame; so speech that was rendered but not published when
        the actor died is rendered again. Returns the stop reason if the session was being ended."""
        from cluster.fsutil import sweep_temporaries

        j = self.journal
        # what the dead process's writes cut short (the playlist, the journal's files): this process,
        # holding the journal, is their only writer now
        for directory in (self.out_dir, self.playlist.out_dir):
            for stale in sweep_temporaries(directory):
                log.info("session %s: removed %s, left by the process that ran it before", self.id, stale)
        pcm = j.audio()
        stop = None
        pos = 0
        for event in j.events():
            if "end" in event:
                end = min(int(event["end"]), len(pcm))
                if end > pos:
                    self.speech.append(pcm[pos:end])
                    pos = end
                self.speech.end()
            elif event.get("finish"):
                self._drain = True
            elif "stop" in event:
                stop = stop or str(event["stop"])
            elif "restart" in event:
                self.restarts += 1
        if pos < len(pcm):
            self.speech.append(pcm[pos:])
        self.restarts += 1
        self.epoch = self.restarts
        j.note({"restart": time.time()})
        entries = j.published()
        self.playlist.entries = entries
        self.playlist._known = {e["name"] for e in entries}
        if entries:
            last = entries[-1]
            self._frames_before = self.published_frames = int(last["end_frame"])
            self.segments_published = len(entries)
            self.scheduler.resume(self._frames_before, last.get("mark"))
            self._last_published_wall = float(last["at"])
            self._last_pdt = max((float(e.get("pdt") or 0.0) for e in entries), default=0.0)
            self.restart_timeline["last_published"] = round(self._last_published_wall, 3)
            figures = last.get("figures") or {}
            self.stalls = int(figures.get("stalls", 0))
            self.longest_gap_s = float(figures.get("longest_gap_s", 0.0))
            self.model_faults = int(figures.get("model_faults", 0))
            self.scheduler.underruns = int(figures.get("speech_underruns", 0))
        # the service repeats the appends the dead actor did not answer once this one is up: until
        # then the open utterance is not taken for paused (its tail is not flushed early)
        self.last_audio = self.clock() + RESTART_GRACE_S
        meta = j.meta()
        self._elapsed_before = max(0.0, time.time() - float(meta.get("started_wall", time.time())))
        log.info("session %s restored (restart %d): %d bytes of speech, %d segments published, resuming at "
                 "frame %d", self.id, self.restarts, len(pcm), len(entries), self.scheduler.next_frame)
        return stop

    # --- figures ---------------------------------------------------------------------------------
    def _mark(self, step: str) -> None:
        """Note when a step of a restarted session's resume happened (once each)."""
        if self.restarts and step not in self.restart_timeline:
            self.restart_timeline[step] = round(time.time(), 3)

    def render_load(self) -> float | None:
        """Seconds of rendering (compositing, the model's answer, handing the batch to the encoder)
        per second of stream over the last `LOAD_WINDOW_BATCHES` batches: what the session takes of
        the node (1.0 = one core busy all the time, or a session that cannot keep real time); None
        until `LOAD_MIN_BATCHES` were rendered."""
        busy = list(self._busy)
        if len(busy) < LOAD_MIN_BATCHES:
            return None
        frames = sum(n for n, _ in busy)
        return round(sum(t for _, t in busy) / (frames / float(self.fps)), 4)

    def stats(self) -> dict:
        fps = float(self.fps)
        rate = self.speech.rate
        with self.speech.lock:
            # speech as received, and the part of it that is in the output (a tail padded to a whole
            # frame counts its received samples only: a sender's pause that splits an utterance
            # pads each part, and the padding is not speech)
            received = sum(u.pcm_n for u in self.speech.utterances) / rate
            rendered = sum(min(u.pcm_taken, u.pcm_n) for u in self.speech.utterances) / rate
        lat = list(self.latencies)
        return {
            "id": self.id, "state": self.state, "reason": self.reason, "error": self.error,
            "max_seconds": self.max_seconds,
            "sample_rate": self.speech.rate, "fps": fps,
            "bytes_received": self.speech.bytes_received,
            "seconds_received": round(received, 3),
            "seconds_rendered": round(rendered, 3),
            "seconds_skipped": round(self.scheduler.skipped_frames / fps, 3),
            "segment_seconds": self.s.live_segment_seconds,
            "seconds_streamed": round((self._frames_before + (self.encoder.frames_written if self.encoder else 0))
                                      / fps, 3),
            "buffered_seconds": round(self.buffered_seconds(), 3),
            "segments_published": self.segments_published,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "latency_max_s": round(max(lat), 4) if lat else None, "latency_samples": len(lat),
            "encoder_delay_p50_s": percentile(list(self.encoder_delays), 50),
            "stalls": self.stalls, "longest_gap_s": round(self.longest_gap_s, 3),
            "speech_underruns": self.scheduler.underruns,
            "model_faults": self.model_faults, "last_fault": self.last_fault,
            "render_load": self.render_load(),
            "restarts": self.restarts, "restart_gap_s": self.restart_gap_s,
            "restart_timeline": dict(self.restart_timeline) or None,
            "recording_seconds": self.recording_seconds,
            **self._rtmp_stats(),
        }

    def _rtmp_stats(self) -> dict:
        if self.rtmp is None:
            return {}
        state, error = self.encoder.rtmp_state() if self.encoder is not None else ("starting", None)
        return {"rtmp_url": self.rtmp.shown, "rtmp_state": state, "rtmp_error": error}
