"""Live sessions on Ray: one actor per session (its state, its compositing, its encoder), and a
registry that admits them.

- `LiveSessionActor` (named `lipsync-live-<id>`, detached, on the job manager's node: it writes
  the session's stream under the storage root) runs `cluster.live.session.LiveSession`. Its
  compositing is its own for its lifetime (it never waits behind a job's chunk on a compositor);
  its model batches go to the model workers' live lane (`ModelWorker.infer_live`, a concurrency
  group of its own: never queued behind job batches). A worker that dies or does not answer
  within `live_batch_timeout_s` costs one batch shown without the model; its speech is rendered
  on the next frames, and the next batch goes to another live worker (or the restarted one).
  The session's state lives here, not in a Serve replica, and what must outlive this process
  (the speech received, the stream published, the resume point) in its journal on disk
  (`cluster.live.journal`). A second actor of the same class stands by (named
  `lipsync-standby-<id>`, `LIPSYNC_LIVE_STANDBY`): the session loaded and its render path run
  once, it waits on the journal's lock, which the kernel frees the moment the running actor dies,
  and takes the session over at once: the playlist goes on (a new encoder epoch after an
  `#EXT-X-DISCONTINUITY`), the speech not yet published is rendered. Ray restarts the dead one
  (`LIPSYNC_LIVE_MAX_RESTARTS`), which finds the lock taken and becomes the new standby (or, with
  no standby, finds it free and resumes the session itself). A takeover that cannot resume leaves
  the session `failed`, saying why; past the restarts the ingress reads the journal and answers
  `failed` too. The ingress reaches both through `SessionActors`.
- `LiveRegistry` (named `lipsync-live-sessions`, detached): admission (`LIPSYNC_MAX_LIVE_SESSIONS`,
  and the running sessions' measured render load: `cluster.live.admission`), creation (with the
  standby) and lookup, one at a time.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import ray

from actors import ORCHESTRATOR_NAME
from cluster.config import Settings
from cluster.errors import InputNotFound, LipsyncError, MediaError, ModelLoadError, RenderTimeout, WorkerLost

log = logging.getLogger("lipsync.live")

SESSION_PREFIX = "lipsync-live-"
STANDBY_PREFIX = "lipsync-standby-"
REGISTRY_NAME = "lipsync-live-sessions"
HLS_FILES = ("live.m3u8", "init.mp4")


def session_actor_name(session_id: str) -> str:
    return SESSION_PREFIX + session_id


def standby_actor_name(session_id: str) -> str:
    return STANDBY_PREFIX + session_id


def session_dir(settings: Settings, session_id: str) -> Path:
    return settings.dir("sessions") / session_id


def _process_started() -> float:
    """When this process started (wall clock)."""
    import psutil

    return round(psutil.Process().create_time(), 3)


def _import_resampler() -> None:
    import scipy.signal  # noqa: F401


class LiveWorkers:
    """The model workers a session sends its batches to: the live ones the job manager knows,
    listed again (in the background: never in the render thread's way) every 30 s and after a
    failure; the one that answered last is used first. A worker that failed is on probation until
    it answers again: a batch waits for it `PROBATION_TIMEOUT_S` at most (a restarting worker
    must not hold the stream a second at each try), and the pause before the next try doubles
    with each failure in a row (0.5 s to 2 s); batches meanwhile go out without the model."""

    PROBATION_TIMEOUT_S = 0.5
    LONGEST_PAUSE_S = 2.0

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.names: list[str] = []
        self.handles: dict[str, object] = {}
        self.refreshed = 0.0
        self.retry_at = 0.0  # after a failure, batches go without the model until then
        self.failures = 0  # in a row
        self.probation: set[str] = set()
        self._listing = threading.Lock()

    def refresh_soon(self) -> None:
        """List the workers again in a thread of its own (one listing at a time)."""
        if not self._listing.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the manager restarting: the next batch asks again
                log.warning("cannot list the model workers: %r", e)
                self.refreshed = time.monotonic() - 25.0  # again in 5 s
            finally:
                self._listing.release()

        threading.Thread(target=run, name="live-list-workers", daemon=True).start()

    def timeout(self, name: str) -> float:
        normal = self.s.live_batch_timeout_s
        return min(normal, self.PROBATION_TIMEOUT_S) if name in self.probation else normal

    def answered(self, name: str) -> None:
        self.probation.discard(name)
        self.failures = 0

    def refresh(self) -> None:
        manager = ray.get_actor(ORCHESTRATOR_NAME, namespace=self.s.namespace)
        snapshot = ray.get(manager.workers.remote(), timeout=self.s.actor_call_timeout_s)
        live = [m["name"] for m in snapshot.get("models", []) if m.get("health") == "live"]
        current = self.names[:1] if self.names and self.names[0] in live else []
        self.names = current + [n for n in live if n not in current]
        self.refreshed = time.monotonic()

    def handle(self, name: str):
        if name not in self.handles:
            self.handles[name] = ray.get_actor(name, namespace=self.s.namespace)
        return self.handles[name]

    def failed(self, name: str) -> None:
        """Put `name` last, on probation, and forget its handle (Ray may restart it under the same
        name); pause the model calls (longer after each failure in a row); list the workers again."""
        self.handles.pop(name, None)
        if name in self.names:
            self.names.remove(name)
            self.names.append(name)
        self.probation.add(name)
        self.retry_at = time.monotonic() + min(self.LONGEST_PAUSE_S, 0.5 * 2 ** self.failures)
        self.failures += 1
        self.refreshed = 0.0


#: An audio socket that sent (or connected) within this long holds its session: a second socket, or a
#: POST of audio, is refused; one silent longer is taken over (a dead replica's, a lost connection's).
SOCKET_HOLD_S = 10.0


def socket_holds(held: tuple[str, float] | None, other_than: str | None, now: float) -> bool:
    """Whether the audio socket `held` ((lease, last heard), or None) holds its session against lease
    `other_than`: heard within `SOCKET_HOLD_S`, and its ingress process (named in its lease after a "|",
    `cluster.owners.process_identity`) not known to be gone. A replica killed mid-speech held its socket
    for the whole 10 s: its client's reconnect, through the replica Serve started instead, was refused
    (4409) until then (a probe: 10.1 s without speech, on one machine)."""
    if held is None or held[0] == other_than or now - held[1] >= SOCKET_HOLD_S:
        return False
    from cluster.owners import identity_gone

    return not identity_gone(held[0].partition("|")[2] or None)


def lost_socket_gap(held: tuple[str, float] | None, lease: str, now: float) -> float | None:
    """How long the speech of a sender waited whose socket `held` ((lease, last heard)) was lost, never closed (a
    closed one detaches), when socket `lease` takes the session over at `now`; None where none was lost (none
    held it, it is the same socket again, or a POST held it)."""
    if held is None or held[0] in (lease, "post"):
        return None
    return max(0.0, now - held[1])


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=32)
class LiveSessionActor:
    def __init__(self, session_id: str, settings: Settings) -> None:
        self._born, self._born_wall = time.monotonic(), time.time()
        self._socket: tuple[str, float] | None = None  # (lease, last heard) of the socket holding its audio
        # the encoder's first write needs scipy's resampler (16/24 kHz -> 48 kHz): seconds of import on
        # a busy node, so it is imported beside the rest of the start, not in front of the first segment
        threading.Thread(target=_import_resampler, name="live-import", daemon=True).start()
        from actors import metrics
        from cluster.live.journal import SessionJournal
        from cluster.threads import actor_thread_plan

        logging.basicConfig(level=logging.INFO)
        metrics.install(f"live-session-{session_id}", settings.log_format)  # LIPSYNC_LOG_FORMAT
        # its thread pools (OpenCV, the template's decoder) at one thread, as an actor of one Ray CPU
        # (it asks for none): a live batch is a few frames' face regions, which threads sized to the
        # machine only contend over (render load 0.47-0.49 with OpenCV's default 2 threads, 0.35-0.41
        # with 1, in one process on 2 cores)
        self.threads = actor_thread_plan(1, settings.size_threads)
        self.id, self.s = session_id, settings
        self.session = None
        self.workers = LiveWorkers(settings)
        self.model = settings.model
        self.created = time.time()
        self.journal = SessionJournal(session_dir(settings, session_id))
        self.final: dict | None = None  # the final view of an ended session (from the journal)
        self.lost: dict | None = None  # why a restart could not resume the session
        self.lost_at: float | None = None  # when (monotonic): the registry removes it after live_keep_ended_s
        self._spare = None  # a standby's warm LiveSession, not yet restored
        if self.journal.begun():
            # the session's standby, or this actor restarted by Ray: it takes the session over as soon
            # as no other process runs it (never raising here: Ray would not retry)
            threading.Thread(target=self._stand_by, name=f"live-standby-{session_id}", daemon=True).start()

    # --- start --------------------------------------------------------------------------------
    def begin(self, avatar_id: str, model: str | None, sample_rate: int, max_seconds: float | None,
              rtmp=None, segment_seconds: float | None = None) -> dict:
        """Load the avatar, learn the model's crop size from a worker, start the loop and the
        encoder. Typed errors: InputNotFound (avatar), ModelLoadError."""
        from cluster.faces.avatar import load_avatar
        from cluster.live.session import LiveSession
        from cluster.models import crop_for_spec
        from cluster.schemas import is_builtin_model

        s = self.s
        if not self.journal.take():
            raise RuntimeError(f"live session {self.id} is run by another process")
        self.model = model or s.model
        avatar = load_avatar(avatar_id, s)
        info = self._describe(self.model)
        crop = crop_for_spec(self.model, None, s) if is_builtin_model(self.model) else info["crop"]
        self.session = LiveSession(self.id, template_path=avatar.template_path, track_path=avatar.track_path,
                                   model=self.model, model_size=int(info["size"]), crop=crop,
                                   generate=self._generate, sample_rate=sample_rate,
                                   out_dir=session_dir(s, self.id), settings=s, max_seconds=max_seconds,
                                   rtmp=rtmp, journal=self.journal, segment_seconds=segment_seconds)
        self.avatar_id = avatar_id
        self.journal.save_meta({"avatar_id": avatar_id, "model": self.model, "size": int(info["size"]), "crop": crop,
                                "sample_rate": sample_rate, "max_seconds": max_seconds, "created": self.created,
                                "segment_seconds": segment_seconds, "fps": str(self.session.fps),
                                "started_wall": time.time(), "rtmp": dataclasses.asdict(rtmp) if rtmp else None})
        try:
            self.session.start()
        except BaseException:
            self.journal.forget()  # it never began: no restart resumes it, no view reports it lost
            raise
        return self.view()

    # --- standing by, taking over -----------------------------------------------------------------
    def _stand_by(self) -> None:
        """Get ready (the session loaded, its render path warmed, the model workers listed), then
        wait until no process runs the session (its `active.lock` free: the one that ran it died)
        and take it over from the journal. A session that ends meanwhile is served from its journal."""
        steps = {"process_started": _process_started(), "init": round(self._born_wall, 3)}
        try:
            self._spare = self._load_session()
            self._spare.warm()
            self._list_workers()
        except Exception as e:  # noqa: BLE001 - the takeover loads the session again (and says why then)
            log.warning("session %s: the standby could not get ready: %r", self.id, e)
            self._spare = None
        steps["ready"] = round(time.time(), 3)
        self.journal.mark_standby(os.getpid())
        checked = 0.0
        while not self.journal.take():
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if self.journal.final() is not None:  # it ended: nothing to take over
                    self._stored()
                    return
            time.sleep(0.02)
        steps["took_over"] = round(time.time(), 3)
        self.journal.clear_standby(os.getpid())
        try:
            self._resume(steps)
        except Exception as e:  # noqa: BLE001 - the session ends failed, saying why
            log.exception("session %s: the restarted actor cannot resume", self.id)
            cause = e.to_info().message if isinstance(e, LipsyncError) else repr(e)
            self.lost_at = time.monotonic()
            self.lost = {"code": "session.restart_failed", "stage": "live",
                         "message": f"live session {self.id}: its actor restarted but could not resume "
                                    f"the session ({cause})"[:2000]}
            try:  # its end, journalled: the ingress tells it once this actor has left (live_keep_ended_s)
                self.journal.save_final({**lost_session_view(self.s, self.id, self.lost), "ended_wall": time.time()})
            except Exception:  # noqa: BLE001 - the actor still answers with it while it stays
                log.exception("session %s: its end could not be journalled", self.id)

    def _stored(self) -> None:
        meta = self.journal.meta()
        self.avatar_id, self.model, self.created = meta["avatar_id"], meta["model"], meta["created"]
        self.final = self.journal.final()

    def _load_session(self):
        """The session as its journal began it (not yet restored): avatar, renderer, encoder settings."""
        from cluster.faces.avatar import load_avatar
        from cluster.live.session import LiveSession
        from cluster.netguard import RtmpTarget

        meta = self.journal.meta()
        avatar = load_avatar(meta["avatar_id"], self.s)
        rtmp = RtmpTarget(**meta["rtmp"]) if meta.get("rtmp") else None
        return LiveSession(self.id, template_path=avatar.template_path, track_path=avatar.track_path,
                           model=meta["model"], model_size=int(meta["size"]), crop=meta["crop"],
                           generate=self._generate, sample_rate=int(meta["sample_rate"]),
                           out_dir=session_dir(self.s, self.id), settings=self.s,
                           max_seconds=meta.get("max_seconds"), rtmp=rtmp, journal=self.journal,
                           segment_seconds=meta.get("segment_seconds"))

    def _resume(self, steps: dict) -> None:
        """The process that ran the session died (this actor is its standby, or Ray restarted
        it): the session goes on from its journal."""
        t0 = time.monotonic()
        self._stored()
        if self.final is not None:  # it had ended: serve its view and recording
            return
        session, self._spare = self._spare or self._load_session(), None
        steps["session_loaded"] = round(time.time(), 3)
        stop = session.restore()
        session.restart_timeline.update(steps)
        if not self.workers.names:
            # the model workers are listed beside the first batches, not before them: until the list is
            # in, batches go out without the model (their speech is rendered on the next frames), so the
            # stream moves again as soon as the encoder runs
            self.workers.retry_at = time.monotonic() + self.s.actor_call_timeout_s
            threading.Thread(target=self._list_workers, name=f"live-workers-{self.id}", daemon=True).start()
        self.session = session
        self.session.start()
        log.info("session %s resumed in %.2f s (this process up %.2f s before)", self.id, time.monotonic() - t0,
                 t0 - self._born)
        if stop is not None:  # it was being ended: end it (in the background)
            threading.Thread(target=self.session.stop, args=(stop,), daemon=True).start()

    def _describe(self, model: str) -> dict:
        deadline = time.monotonic() + self.s.model_load_timeout_s
        last = "no live model worker"
        while time.monotonic() < deadline:
            self.workers.refresh()
            for name in self.workers.names:
                try:
                    return ray.get(self.workers.handle(name).describe.remote(model),
                                   timeout=max(1.0, deadline - time.monotonic()))
                except LipsyncError:
                    raise
                except Exception as e:  # noqa: BLE001 - a dead or stalled worker: try the next
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, LipsyncError):
                        raise cause from None
                    last = f"{name}: {e!r}"[:500]
                    self.workers.failed(name)
            time.sleep(0.5)
        raise ModelLoadError(f"model {model!r} was not ready on any worker within "
                             f"{self.s.model_load_timeout_s:.0f} s ({last})", path=model)

    def _list_workers(self) -> None:
        try:
            self.workers.refresh()
            if self.workers.names:
                self.workers.handle(self.workers.names[0])
        except Exception as e:  # noqa: BLE001 - the batches ask again (and say why) when it failed
            log.warning("session %s: cannot list the model workers yet: %r", self.id, e)
        finally:
            self.workers.retry_at = 0.0

    # --- the model, through the live lane ---------------------------------------------------------
    def _generate(self, mel: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """One batch on the first live worker's live lane, within `live_batch_timeout_s` (a worker
        on probation: `LiveWorkers.PROBATION_TIMEOUT_S`); raises WorkerLost otherwise (the session
        shows the batch without the model and renders its speech on the next frames). Never waits
        longer than the deadline; never lists the workers in the render thread's way."""
        if time.monotonic() < self.workers.retry_at:  # a worker just failed: no waiting on it meanwhile
            raise WorkerLost("model workers unavailable (retrying shortly)", stage="live")
        if not self.workers.names or time.monotonic() - self.workers.refreshed > 30.0:
            self.workers.refresh_soon()
        if not self.workers.names:
            raise WorkerLost("no live model worker known (listing them)", stage="live")
        name = self.workers.names[0]
        try:
            meta_ref, out_ref = self.workers.handle(name).infer_live.remote(self.model, mel, crops)
            generated = ray.get(out_ref, timeout=self.workers.timeout(name))
        except Exception as e:  # noqa: BLE001 - died, stalled, raised: the next batch tries another
            self.workers.failed(name)
            cause = getattr(e, "cause", None)
            raise WorkerLost(f"model worker {name}: {type(cause or e).__name__}: {cause or e}"[:500],
                             stage="live") from e
        self.workers.answered(name)
        return generated

    # --- audio in --------------------------------------------------------------------------------
    def append(self, pcm: bytes, offset: int | None = None, lease: str | None = None) -> dict:
        """`pcm` at byte `offset` of the speech; from an audio socket (`lease`) only while that socket
        holds the session (else `socket_taken`: a newer socket took it over, and these bytes, sent
        from this socket's stale offset, would be dropped as already had)."""
        session = self._live()
        if lease is not None:
            held = self._socket
            if held is not None and held[0] != lease:
                return {"accepted": False, "socket_taken": True, "offset": session.speech.bytes_received,
                        "buffered_s": 0.0, "state": session.state}
            self._socket = (lease, time.monotonic())  # held, and fresh (after a restart: taken back)
        elif self._socket_held():  # POST beside an open socket: the socket's next bytes would be skipped as had
            return {"accepted": False, "socket_held": True, "offset": session.speech.bytes_received,
                    "buffered_s": 0.0, "state": session.state}
        elif self._socket is not None:  # a socket silent for SOCKET_HOLD_S: the POST takes the session
            self._socket = ("post", time.monotonic())  # over, and that socket is told (4409) when it sends again
        return session.append(pcm, offset)

    def _socket_held(self, other_than: str | None = None) -> bool:
        """An audio socket (other than lease `other_than`) holds the session: it sent or connected in
        the last `SOCKET_HOLD_S`."""
        return socket_holds(self._socket, other_than, time.monotonic())

    def end_speech(self) -> bool:
        return self._live().end_speech()

    def finish(self) -> None:
        self._live().finish()

    def stop(self, reason: str = "deleted", timeout: float = 60.0) -> dict:
        session = self._live()
        if not session.ended:
            session.stop(reason, timeout=timeout)
        return self.view()

    def _live(self):
        from cluster.live import SessionEnded, SessionStandby

        if self.session is None:
            if self.lost is not None or self.final is not None:
                raise SessionEnded(f"live session {self.id} has "
                                   + (f"failed: {self.lost['message']}" if self.lost else "ended"))
            if self.journal.begun():
                raise SessionStandby(f"live session {self.id}: this actor stands by; another runs the session")
            raise RuntimeError("session not begun")
        return self.session

    # --- files ---------------------------------------------------------------------------
    def read_hls(self, name: str) -> bytes | None:
        """A file of the live stream (the published playlist, the init segment, a segment), or None."""
        return read_hls_file(self.s, self.id, name, over=self.session is None and (self.lost or self.final) is not None)

    # --- state ------------------------------------------------------------------------------------
    def view(self) -> dict:
        if self.session is None and (self.final is not None or self.lost is not None):
            return self._stored_view()
        session = self._live()
        stats = session.stats()
        recording_bytes = session.recording.stat().st_size if session.recording is not None else None
        return {**stats, "avatar_id": getattr(self, "avatar_id", None), "model": self.model, "created": self.created,
                "recording_bytes": recording_bytes,
                "standby": "ready" if not session.ended and self.journal.standby_ready() else None}

    def _stored_view(self) -> dict:
        """The view of a session this process did not run: ended before the restart (its final
        view), or one the restart could not resume (failed, and why)."""
        if self.final is not None:
            return ended_session_view(self.s, self.id)
        return lost_session_view(self.s, self.id, self.lost)

    def state(self) -> str:
        if self.session is None:
            return "failed" if self.lost else (self.final or {}).get("state", "starting")
        return self.session.state

    def load(self) -> dict:
        """What admission needs: {ended_for, render_load, cores}. A standby refuses (SessionStandby)."""
        if self.session is None and self.final is None and self.lost is None:
            self._live()
        import psutil

        from cluster.resources import available_memory_bytes, usable_cpus

        cores = usable_cpus()  # the container's (a pod's limit), not the host's
        memory = psutil.Process().memory_info().rss  # this actor's process, with its standby's below
        standby = self.journal.standby_pid() if self.journal is not None else None
        if standby is not None:
            try:
                memory += psutil.Process(standby).memory_info().rss
            except psutil.Error:
                pass
        return {"ended_for": self.ended_for(), "cores": cores,
                "render_load": self.session.render_load() if self.session is not None else None,
                "memory_bytes": memory if self.session is not None else None,
                "available_bytes": available_memory_bytes()}

    def _final_written(self) -> float:
        from cluster.live.journal import FINAL_FILE

        try:
            return (self.journal.dir / FINAL_FILE).stat().st_mtime
        except OSError:
            return self._born_wall

    def ended_for(self) -> float | None:
        """Seconds since the session ended, None while it runs."""
        session = self.session
        if session is None:
            if self.final is not None:  # when it ended; a final view without the time: when it was written
                ended = self.final.get("ended_wall") or self._final_written()
                return time.time() - float(ended)
            if self.lost_at is not None:  # a takeover that failed ended the session then
                return time.monotonic() - self.lost_at
            return None
        if not session.ended:
            return None
        return time.monotonic() - session.ended_at

    # --- the audio socket: one at a time ------------------------------------------------------------
    def attach(self, lease: str) -> bool:
        """Take the session's audio socket for `lease`; False while another socket holds it
        (one whose holder went silent for 10 s, e.g. a dead replica, is taken over)."""
        session = self._live()  # a standby refuses (SessionStandby): the socket is the running actor's
        if self._socket_held(other_than=lease):
            return False
        lost, self._socket = self._socket, (lease, time.monotonic())
        if (gap := lost_socket_gap(lost, lease, time.monotonic())) is not None:
            session.sender_lost(gap)
        return True

    def touch(self, lease: str) -> None:
        held = self._socket
        if held is None or held[0] == lease:  # after a restart the open socket takes its lease back
            self._socket = (lease, time.monotonic())

    def detach(self, lease: str) -> None:
        held = self._socket
        if held is not None and held[0] == lease:
            self._socket = None


#: The longest a session's creation waits for the one before it (`LiveRegistry.create`).
CREATE_LOCK_WAIT_S = 25.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=64)
class LiveRegistry:
    """Admits and finds sessions. Creation is serialised (a lock), so two requests never both
    take the last place."""

    def __init__(self, settings: Settings) -> None:
        from actors import metrics

        metrics.install("live-registry", settings.log_format)  # LIPSYNC_LOG_FORMAT
        self.s = settings
        self._lock = threading.Lock()
        # ended sessions' actors go `live_keep_ended_s` after their end whether or not another
        # session is created meanwhile (`running` removes them; it ran only at a creation): two idle
        # processes of ~250 MB each per ended session otherwise (the ingress serves it from disk after)
        threading.Thread(target=self._reap_ended, name="live-reaper", daemon=True).start()

    def _reap_ended(self) -> None:
        period = min(60.0, max(1.0, self.s.live_keep_ended_s / 2))
        while True:
            time.sleep(period)
            try:
                self.running()
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("removing ended live sessions failed; trying again in %.0f s", period)

    def _sessions(self) -> dict[str, list[str]]:
        """Session id -> the names of its actors (the one that began it, its standby)."""
        from ray.util import list_named_actors

        out: dict[str, list[str]] = {}
        for entry in list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else entry
            ns = entry.get("namespace") if isinstance(entry, dict) else self.s.namespace
            for prefix in (SESSION_PREFIX, STANDBY_PREFIX):  # (the registry's own name starts as a session's)
                if ns == self.s.namespace and name.startswith(prefix) and name != REGISTRY_NAME:
                    out.setdefault(name[len(prefix):], []).append(name)
        return out

    def stop_all(self, reason: str, timeout: float) -> dict[str, str]:
        """End every running session now (`LiveSessionActor.stop`: its stream ended, its recording made),
        within `timeout` for all: the service stops. Session id -> its state then ("ended"; else why not: a
        session that did not end in time reads `failed` after the service's next start, as one cut off)."""
        calls = {}
        for session_id, names in self._sessions().items():
            for name in names:  # the one running it ends it; a standby refuses (SessionStandby)
                try:
                    actor = ray.get_actor(name, namespace=self.s.namespace)
                    calls[actor.stop.remote(reason, max(0.5, timeout - 1.0))] = session_id
                except ValueError:  # gone meanwhile
                    continue
        ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=timeout) if calls else ([], [])
        out = {session_id: "not ended in time" for session_id in calls.values()}
        for ref in ready:
            try:
                out[calls[ref]] = ray.get(ref, timeout=1.0)["state"]
            except Exception as e:  # noqa: BLE001 - a standby's refusal, or an actor gone: its partner says
                if out[calls[ref]] == "not ended in time":
                    out[calls[ref]] = f"{type(e).__name__}"
        for session_id, state in out.items():
            log.info("live session %s at the service's stop: %s", session_id, state)
        return out

    def running(self) -> dict[str, dict]:
        """Sessions not yet ended: id -> {render_load, cores, memory_bytes, available_bytes}
        (`LiveSessionActor.load`). Sessions ended longer than `live_keep_ended_s` ago (their
        recording served that long) are removed here, with their standby."""
        out = {}
        for session_id, names in self._sessions().items():
            for name in names:  # the one running it answers; a standby refuses
                try:
                    figures = ray.get(ray.get_actor(name, namespace=self.s.namespace).load.remote(), timeout=5.0)
                    break
                except Exception:  # noqa: BLE001 - gone, stuck or standing by: ask its partner
                    continue
            else:  # none answered (restarting, taking over, stuck): running unless its journal ended it
                if self._journal_running(session_id):
                    out[session_id] = {"render_load": None, "cores": None, "memory_bytes": None,
                                       "available_bytes": None}  # counted, at the defaults: it may come back
                continue
            ended_for = figures.pop("ended_for")
            if ended_for is None:
                out[session_id] = figures
            elif ended_for > self.s.live_keep_ended_s:
                for name in names:
                    try:
                        ray.kill(ray.get_actor(name, namespace=self.s.namespace), no_restart=True)
                    except ValueError:
                        continue
        return out

    # --- ended sessions, from their directories (their actors have left: live_keep_ended_s) --------
    # The registry lives on the storage root's node with the sessions' actors: an ingress on any node
    # reads what an ended session left through these (it may have no storage root of its own).
    def stored_view(self, session_id: str) -> dict | None:
        """The view of a session whose actors have left, from its journal: ended (its final view) or
        lost (it never ended: `failed`, and why); None when no session of that id began here."""
        from cluster.live.journal import SessionJournal

        try:
            if not SessionJournal(session_dir(self.s, session_id)).begun():
                return None
            return ended_session_view(self.s, session_id) or lost_session_view(self.s, session_id)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged or half-removed journal: not told
            log.warning("session %s: its journal cannot be read (%r): answered as unknown", session_id, e)
            return None

    def read_hls(self, session_id: str, name: str) -> bytes | None:
        """A file of the stream of a session whose actors have left: it is over (ended, or failed)."""
        return read_hls_file(self.s, session_id, name, over=True)

    def read_recording(self, session_id: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a session's recording (b"" past its end or without one)."""
        try:
            with open(session_dir(self.s, session_id) / "recording.mp4", "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            return b""

    def join_recording(self, session_id: str) -> int | None:
        """The size of the recording of a failed session whose actors have left, joined from its published
        segments on first request (`lost_session_recording`); None when it published none."""
        try:
            path = lost_session_recording(self.s, session_id)
        except OSError as e:  # a published segment's file missing or unreadable: typed, with its cause
            raise MediaError(f"live session {session_id}: its recording could not be joined: {e}",
                             stage="live-recording", cause=repr(e)) from None
        return path.stat().st_size if path is not None else None

    def _journal_running(self, session_id: str) -> bool:
        from cluster.live.journal import SessionJournal

        journal = SessionJournal(session_dir(self.s, session_id))
        try:
            return journal.begun() and journal.final() is None
        except OSError:
            return True  # unreadable: counted, rather than a session too many admitted

    def admission(self, running: dict[str, dict] | None = None):
        """Would one more session fit (`cluster.live.admission`), from the running ones' figures."""
        from cluster.live.admission import decide_admission
        from cluster.resources import usable_cpus

        running = self.running() if running is None else running
        cores = self.s.live_node_cpus or max((f["cores"] or 0 for f in running.values()), default=0) \
            or usable_cpus()
        # the node's available memory as the sessions' actors see it (they all run on the job manager's node)
        available = min((f["available_bytes"] for f in running.values() if f.get("available_bytes")), default=None)
        return decide_admission([f["render_load"] for f in running.values()], float(cores), self.s.live_cpu_share,
                                self.s.live_session_load, memories=[f.get("memory_bytes") for f in running.values()],
                                available=available, reserve=self.s.live_memory_reserve_mb * (1 << 20),
                                default_memory=self.s.live_session_memory_mb * (1 << 20))

    def create(self, session_id: str, avatar_id: str, model: str | None, sample_rate: int,
               max_seconds: float | None, rtmp_url: str | None = None, segment_seconds: float | None = None,
               within_s: float | None = None) -> dict:
        """Start a session. `within_s`: how long its caller waits for the answer; every wait here (the
        lock, the session's `begin`) ends before then, and a session that did not begin by then is
        killed: none is started after its request was answered 503 (one nobody would know the id of,
        holding a slot until its idle timeout)."""
        from cluster.live import LiveCapacity
        from cluster.netguard import vet_rtmp_url

        answer_by = time.monotonic() + (within_s if within_s is not None else self.s.model_load_timeout_s + 55)
        # an RTMP output is an outbound connection: the input URLs' guard, its address pinned for ffmpeg
        rtmp = vet_rtmp_url(rtmp_url, allow_private=self.s.allow_private_urls) if rtmp_url else None
        if not self._lock.acquire(timeout=max(0.0, min(CREATE_LOCK_WAIT_S, answer_by - time.monotonic() - 5))):
            raise LiveCapacity(f"another live session has been starting for over {CREATE_LOCK_WAIT_S:.0f} s "
                               f"(its model loading); retry later")
        try:
            return self._create_locked(session_id, avatar_id, model, sample_rate, max_seconds, rtmp,
                                       segment_seconds, answer_by)
        finally:
            self._lock.release()

    def _create_locked(self, session_id: str, avatar_id: str, model: str | None, sample_rate: int,
                       max_seconds: float | None, rtmp, segment_seconds: float | None, answer_by: float) -> dict:
        from cluster.live import AvatarNotReady, LiveCapacity, avatar_state

        if model is not None:  # an unknown name: the service's names, before any actor starts
            from cluster.render import check_model

            check_model(model, self.s)
        state = avatar_state(avatar_id, self.s)
        if state == "unknown":
            from cluster.faces.avatar import no_such_avatar

            raise InputNotFound(no_such_avatar(avatar_id), code="avatar.not_found", path="avatar_id")
        if state == "preparing":
            raise AvatarNotReady(f"avatar {avatar_id} is still being prepared; retry when it is ready",
                                 path="avatar_id")
        running = self.running()
        if len(running) >= self.s.max_live_sessions:
            are = "live session is" if len(running) == 1 else "live sessions are"
            raise LiveCapacity(f"{len(running)} {are} running (LIPSYNC_MAX_LIVE_SESSIONS={self.s.max_live_sessions}); "
                               f"retry later")
        admission = self.admission(running)
        if not admission.admitted:
            raise LiveCapacity(f"{admission.message}; retry later")
        begin_within = min(self.s.model_load_timeout_s + 30, answer_by - time.monotonic())
        if begin_within < 5:
            raise LiveCapacity("the service took too long to admit this live session (its checks of the running "
                               "sessions); retry later")
        actor = create_session_actor(self.s, session_id)
        try:
            view = ray.get(actor.begin.remote(avatar_id, model, sample_rate, max_seconds, rtmp, segment_seconds),
                           timeout=begin_within)
        except Exception as e:
            ray.kill(actor, no_restart=True)
            cause = getattr(e, "cause", None)
            if isinstance(cause, LipsyncError):
                raise cause from None
            why = (f"did not start within {begin_within:.0f} s"
                   if isinstance(e, ray.exceptions.GetTimeoutError) else f"could not start: {cause or e!r}")
            log.error("live session %s %s", session_id, why)
            raise LipsyncError(f"live session {session_id} {why}", code="session.start_failed",
                               cause=repr(cause or e)) from None
        if self.s.live_standby:  # it gets ready beside the session and takes it over if its actor dies
            try:
                create_session_actor(self.s, session_id, standby=True)
            except Exception as e:  # noqa: BLE001 - the session runs on; Ray's restart is its fallback
                log.warning("session %s: no standby (%r); a restart of its actor resumes it instead",
                            session_id, e)
        return view


def _on_storage_node(settings: Settings, opts: dict) -> dict:
    """`opts` placing a detached actor on the job manager's node: the storage root's, where the sessions'
    journals, their locks and their files are (`actors.orchestrator.storage_node_placement`)."""
    from actors.orchestrator import storage_node_placement

    return {**opts, **storage_node_placement(settings)}


def create_session_actor(settings: Settings, session_id: str, standby: bool = False):
    """The detached session actor (or its standby), on the job manager's node."""
    name = standby_actor_name(session_id) if standby else session_actor_name(session_id)
    opts = _on_storage_node(settings, dict(name=name, namespace=settings.namespace, lifetime="detached"))
    return LiveSessionActor.options(max_restarts=settings.live_max_restarts, **opts).remote(session_id, settings)


def live_registry(settings: Settings):
    """The registry actor (created on first use, on the job manager's node: it reads the sessions' journals).
    An existing one is found by name, without asking the cluster where to place it (a GCS round trip
    that the ingress would otherwise make for every ended session's request)."""
    try:
        return ray.get_actor(REGISTRY_NAME, namespace=settings.namespace)
    except ValueError:  # none yet
        return LiveRegistry.options(**_on_storage_node(settings, dict(
            name=REGISTRY_NAME, namespace=settings.namespace, lifetime="detached", get_if_exists=True))).remote(
                settings)


class SessionActors:
    """The service's handle on a session: its actor and its standby, either of which may be the
    one running it (the other answers `SessionStandby`). Calls go to `current`. After a death
    (`failed`) the other is tried; after a standby's refusal (`standing_by`) the other is tried
    unless it died lately (Ray restarting it would hold the call until it is back, and it would
    only stand by then): its partner is taking the session over and is asked again. The one that
    answered last (`answered`) is where the next handle of this process starts.
    Attribute access forwards to `current` (`actors.touch.remote(...)`)."""

    _last_good: dict[str, object] = {}  # session id -> the actor id that answered last (this process)
    _died: dict[object, float] = {}  # actor id -> when a call met it dead (monotonic)
    _died_lock = threading.Lock()  # (failovers run in lookup threads: `gcs_lookup`)
    _known: dict[str, tuple[float, list]] = {}  # session id -> (when looked up, handles): a player polls often
    KNOWN_S = 10.0

    def __init__(self, settings: Settings, session_id: str, handles: list | None = None) -> None:
        """`handles`: the session's actors as `known` gave them, else looked up now (or as known lately)."""
        self.s, self.id = settings, session_id
        self.handles = handles or self.known(session_id) or self._lookup()
        good = self._last_good.get(session_id)
        self.current = next((h for h in self.handles if h._actor_id == good), self.handles[0])

    @classmethod
    def known(cls, session_id: str) -> list | None:
        """The session's actors as this process looked them up lately (a handle made with them asks the GCS
        nothing), else None."""
        known = cls._known.get(session_id)
        return known[1] if known is not None and time.monotonic() - known[0] < cls.KNOWN_S else None

    def _lookup(self) -> list:
        from cluster.live import SessionNotFound

        handles = []
        for name in (session_actor_name(self.id), standby_actor_name(self.id)):
            try:
                handles.append(ray.get_actor(name, namespace=self.s.namespace))
            except ValueError:
                continue
        if not handles:
            self._known.pop(self.id, None)
            raise SessionNotFound(f"no live session {self.id}", path="session_id")
        if len(self._known) > 10000:
            self._known.clear()
        self._known[self.id] = (time.monotonic(), handles)
        return handles

    def _other(self):
        self.handles = handles = self._lookup()
        others = [h for h in handles if h._actor_id != self.current._actor_id]
        return others[0] if others else handles[0]

    def partner(self):
        """The other actor of the session (as looked up last), None when it has only one."""
        return next((h for h in self.handles if h._actor_id != self.current._actor_id), None)

    def answered(self) -> None:
        if len(self._last_good) > 10000:
            self._last_good.clear()
        self._last_good[self.id] = self.current._actor_id

    def failed(self) -> None:
        """A call met `current` dead or restarting: turn to the other (SessionNotFound if none is left)."""
        now = time.monotonic()
        with self._died_lock:  # (requests fail over in threads at once: a purge raced another's, a probe)
            for actor_id, at in list(self._died.items()):
                if now - at > self.s.live_restart_wait_s:
                    del self._died[actor_id]
            self._died[self.current._actor_id] = now
        self.current = self._other()

    def standing_by(self) -> None:
        """`current` stands by: turn to the other, unless that one died lately."""
        other = self._other()
        died = self._died.get(other._actor_id)
        if died is None or time.monotonic() - died > self.s.live_restart_wait_s:
            self.current = other

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("s", "id", "current", "handles"):
            raise AttributeError(name)
        return getattr(self.current, name)


def session_actor(settings: Settings, session_id: str):
    """The session's actor (the one that began it); raises SessionNotFound."""
    from cluster.live import SessionNotFound

    try:
        return ray.get_actor(session_actor_name(session_id), namespace=settings.namespace)
    except ValueError:
        raise SessionNotFound(f"no live session {session_id}", path="session_id") from None


def read_hls_file(settings: Settings, session_id: str, name: str, over: bool = False) -> bytes | None:
    """A file of a session's stream (the published playlist, an init segment, a segment) from its
    directory, or None: what its actor serves, and the ingress once the actors of an ended session are gone.
    `over`: the session has ended or failed, so its playlist is served ended (`ended_playlist`)."""
    from cluster.live.encoder import INIT_NAME, PUBLISHED, SEGMENT_NAME, ended_playlist

    # init.mp4, or init-<epoch>.mp4 of the encoder a restart or a takeover started
    if name not in HLS_FILES and not SEGMENT_NAME.match(name) and not INIT_NAME.match(name):
        return None
    try:
        data = (session_dir(settings, session_id) / "hls" / name).read_bytes()
    except OSError:
        return None
    return ended_playlist(data.decode()).encode() if over and name == PUBLISHED else data


def ended_session_view(settings: Settings, session_id: str) -> dict | None:
    """The view of an ended session from its journal (its final view, as it was when it ended), with
    its recording's size when it has one; None when the journal holds no end. Served by the ingress
    once the session's actors are gone (`LIPSYNC_LIVE_KEEP_ENDED_S` after its end), until retention."""
    from cluster.live.journal import SessionJournal

    journal = SessionJournal(session_dir(settings, session_id))
    final = journal.final()
    if final is None:
        return None
    meta = journal.meta()
    path = journal.dir / "recording.mp4"
    # a failed session's recording may be joined after its end (`lost_session_recording`)
    size = path.stat().st_size if (final.get("recording_seconds") or final.get("state") == "failed") \
        and path.is_file() else None
    return {**final, "avatar_id": meta.get("avatar_id"), "model": meta.get("model"), "created": meta.get("created"),
            "recording_bytes": size}


def lost_session_view(settings: Settings, session_id: str, lost: dict | None = None) -> dict:
    """The truthful view of a session whose actor is gone for good (Ray's restarts exhausted) or
    whose restart could not resume it, from its journal: `failed`, with what it had received and
    published, and an error naming the stage and the session."""
    from cluster.live.journal import SessionJournal

    journal = SessionJournal(session_dir(settings, session_id))
    meta = journal.meta()
    published = journal.published()
    events = journal.events()
    audio = journal.dir / "audio.pcm"
    received = audio.stat().st_size if audio.is_file() else 0
    rate = int(meta["sample_rate"])
    restarts = sum(1 for e in events if "restart" in e)
    why = (f"died and was not restarted (LIPSYNC_LIVE_MAX_RESTARTS={settings.live_max_restarts}, {restarts} "
           f"restart(s) used)" if restarts >= settings.live_max_restarts else
           f"is gone: the service or its Ray stopped while the session ran ({restarts} restart(s) used)")
    error = lost or {"code": "session.actor_lost", "stage": "live",
                     "message": f"live session {session_id}: its actor ({session_actor_name(session_id)}) {why}; "
                                f"its stream stopped after {len(published)} segments"}
    last = published[-1] if published else {}
    fps = float(_journal_fps(meta, published))
    streamed = round(last.get("end_frame", 0) / fps, 3)
    mark = last.get("mark") or [0, 0, 0, 0]  # the last speech frame published: [.., .., .., speech frames done]
    # speech published (what was rendered and not yet published died with it): the stream's pauses are not
    # speech, so not its seconds (they read more than the speech received)
    figures = last.get("figures") or {}  # as they were at its last segment (its latencies are not journalled)
    skipped = int(mark[4]) if len(mark) > 4 else 0  # pauses left out by then to catch up: handled speech too
    rendered = round((int(mark[3]) + skipped) / fps, 3)
    # the speech kept for a restart, or at least what was published of it (a session whose end was written
    # let its copy go: the recording holds that speech)
    received = max(received, int(rendered * rate) * 2)
    seconds_received = round(received / 2 / rate, 3)
    rendered = min(rendered, seconds_received)
    recording = journal.dir / "recording.mp4"
    size = recording.stat().st_size if recording.is_file() else None
    return {"id": session_id, "state": "failed", "reason": "failed", "error": error,
            "avatar_id": meta.get("avatar_id"), "model": meta.get("model"), "created": meta.get("created"),
            "sample_rate": rate, "bytes_received": received, "seconds_received": seconds_received,
            "seconds_rendered": rendered, "seconds_skipped": round(skipped / fps, 3), "seconds_streamed": streamed,
            "segments_published": len(published),
            "stalls": int(figures.get("stalls", 0)), "longest_gap_s": float(figures.get("longest_gap_s", 0.0)),
            "model_faults": int(figures.get("model_faults", 0)),
            "speech_underruns": int(figures.get("speech_underruns", 0)),
            # its recording is joined from the published segments on the first request (`join_recording`)
            "restarts": restarts, "recording_bytes": size, "recording_seconds": streamed if published else None}


def _journal_fps(meta: dict, published: list[dict]) -> Fraction:
    """A journalled session's frame rate: its meta's (sessions since 2026-12-06), else its segments'."""
    if meta.get("fps"):
        return Fraction(meta["fps"])
    last = published[-1] if published else {}
    if last.get("seconds"):
        return Fraction(last["frames"] / last["seconds"]).limit_denominator(1001)
    return Fraction(25)


LOST_RECORDING_WAIT_S = 300.0  # how long a request waits while another process joins the same recording


def lost_session_recording(settings: Settings, session_id: str) -> Path | None:
    """The recording of a session whose actor is gone for good (`lost_session_view`): its published
    segments joined and verified as an ended session's are (`make_recording`), made once on first
    request under the session directory's lock (two ingress replicas asked at once make it once);
    None when it published nothing."""
    from cluster.fsutil import lock_within
    from cluster.live.encoder import make_recording
    from cluster.live.journal import SessionJournal

    journal = SessionJournal(session_dir(settings, session_id))
    dest = journal.dir / "recording.mp4"
    with open(journal.dir / "recording.lock", "a+") as lock:
        if not lock_within(lock, LOST_RECORDING_WAIT_S):  # another process may be joining it
            raise RenderTimeout(f"live session {session_id}: its recording is being made by another process for "
                                f"over {LOST_RECORDING_WAIT_S:g} s", stage="live-recording", path=str(dest))
        if dest.is_file():
            return dest
        failed = journal.dir / "recording.failed"  # a join that failed: told again, not run again each request
        if failed.is_file():
            raise MediaError(failed.read_text(errors="replace")[:2000], stage="live-recording", path=str(dest))
        published = journal.published()
        if not published:
            return None
        try:
            make_recording(journal.dir / "hls", dest, published, _journal_fps(journal.meta(), published), settings)
        except (LipsyncError, OSError) as e:
            message = e.message if isinstance(e, LipsyncError) else f"{type(e).__name__}: {e}"
            failed.write_text(f"live session {session_id}: its recording could not be joined: {message}")
            raise
        return dest
