"""Live sessions on Ray: one actor per session (its state, its compositing, its encoder), and a
registry that admits them.

- `LiveSessionActor` (named `lipsync-live-<id>`, detached, on the job manager's node: it writes
  the session's stream under the storage root) runs `cluster.live.session.LiveSession`. Its
  compositing is its own for its lifetime (it never waits behind a job's chunk on a compositor);
  its model batches go to the model workers' live lane (`ModelWorker.infer_live`, a concurrency
  group of its own: never queued behind job batches). A worker that dies or does not answer
  within `live_batch_timeout_s` costs one batch shown without the model; its speech is rendered
  on the next frames, and the next batch goes to another live worker (or the restarted one).
  The session's state lives here, not in a Serve replica.
- `LiveRegistry` (named `lipsync-live-sessions`, detached): admission (`LIPSYNC_MAX_LIVE_SESSIONS`),
  creation and lookup, one at a time.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import ray

from actors import ORCHESTRATOR_NAME
from cluster.config import Settings
from cluster.errors import InputNotFound, LipsyncError, ModelLoadError, WorkerLost

log = logging.getLogger("lipsync.live")

SESSION_PREFIX = "lipsync-live-"
REGISTRY_NAME = "lipsync-live-sessions"
HLS_FILES = ("live.m3u8", "init.mp4")


def session_actor_name(session_id: str) -> str:
    return SESSION_PREFIX + session_id


def session_dir(settings: Settings, session_id: str) -> Path:
    return settings.dir("sessions") / session_id


class LiveWorkers:
    """The model workers a session sends its batches to: the live ones the job manager knows,
    refreshed when one fails; the one that answered last is used first."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.names: list[str] = []
        self.handles: dict[str, object] = {}
        self.refreshed = 0.0
        self.retry_at = 0.0  # after a failure, batches go without the model until then

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
        """Put `name` last and forget its handle (Ray may restart it under the same name)."""
        self.handles.pop(name, None)
        if name in self.names:
            self.names.remove(name)
            self.names.append(name)


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=32)
class LiveSessionActor:
    def __init__(self, session_id: str, settings: Settings) -> None:
        logging.basicConfig(level=logging.INFO)
        self.id, self.s = session_id, settings
        self.session = None
        self.workers = LiveWorkers(settings)
        self.model = settings.model
        self.created = time.time()
        self._exit_timer: threading.Timer | None = None

    # --- start --------------------------------------------------------------------------------
    def begin(self, avatar_id: str, model: str | None, sample_rate: int, max_seconds: float | None,
              rtmp=None) -> dict:
        """Load the avatar, learn the model's crop size from a worker, start the loop and the
        encoder. Typed errors: InputNotFound (avatar), ModelLoadError."""
        from cluster.faces.avatar import load_avatar
        from cluster.live.session import LiveSession
        from cluster.models import crop_for_spec

        s = self.s
        self.model = model or s.model
        avatar = load_avatar(avatar_id, s)
        info = self._describe(self.model)
        crop = crop_for_spec(self.model, None, s) if self.model.startswith("builtin") else info["crop"]
        self.session = LiveSession(self.id, template_path=avatar.template_path, track_path=avatar.track_path,
                                   model=self.model, model_size=int(info["size"]), crop=crop,
                                   generate=self._generate, sample_rate=sample_rate,
                                   out_dir=session_dir(s, self.id), settings=s, max_seconds=max_seconds,
                                   rtmp=rtmp)
        self.avatar_id = avatar_id
        self.session.start()
        return self.view()

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

    # --- the model, through the live lane ---------------------------------------------------------
    def _generate(self, mel: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """One batch on the first live worker's live lane, within `live_batch_timeout_s`; raises
        WorkerLost otherwise (the session shows the batch without the model and renders its
        speech on the next frames). Never waits longer than the deadline."""
        if time.monotonic() < self.workers.retry_at:  # a worker just failed: no waiting on it meanwhile
            raise WorkerLost("model workers unavailable (retrying shortly)", stage="live")
        if not self.workers.names or time.monotonic() - self.workers.refreshed > 30.0:
            try:
                self.workers.refresh()
            except Exception as e:  # noqa: BLE001 - the manager restarting: this batch goes without the model
                raise WorkerLost(f"cannot list model workers: {e!r}"[:500], stage="live") from e
        if not self.workers.names:
            raise WorkerLost("no live model worker", stage="live")
        name = self.workers.names[0]
        try:
            meta_ref, out_ref = self.workers.handle(name).infer_live.remote(self.model, mel, crops)
            return ray.get(out_ref, timeout=self.s.live_batch_timeout_s)
        except Exception as e:  # noqa: BLE001 - died, stalled, raised: the next batch tries another
            self.workers.failed(name)
            self.workers.refreshed = 0.0  # ask the manager again next time
            self.workers.retry_at = time.monotonic() + 0.5
            cause = getattr(e, "cause", None)
            raise WorkerLost(f"model worker {name}: {type(cause or e).__name__}: {cause or e}"[:500],
                             stage="live") from e

    # --- audio in --------------------------------------------------------------------------------
    def append(self, pcm: bytes, offset: int | None = None) -> dict:
        return self._live().append(pcm, offset)

    def end_speech(self) -> bool:
        return self._live().end_speech()

    def finish(self) -> None:
        self._live().finish()

    def stop(self, reason: str = "deleted") -> dict:
        session = self._live()
        if not session.ended:
            session.stop(reason, timeout=60.0)
        return self.view()

    def _live(self):
        if self.session is None:
            raise RuntimeError("session not begun")
        return self.session

    # --- files ---------------------------------------------------------------------------
    def read_hls(self, name: str) -> bytes | None:
        """A file of the live stream (the published playlist, the init segment, a segment), or None."""
        from cluster.live.encoder import SEGMENT_NAME

        if name not in HLS_FILES and not SEGMENT_NAME.match(name):
            return None
        try:
            return (session_dir(self.s, self.id) / "hls" / name).read_bytes()
        except OSError:
            return None

    def read_recording(self, offset: int, length: int) -> bytes:
        session = self._live()
        if session.recording is None:
            return b""
        with open(session.recording, "rb") as f:
            f.seek(offset)
            return f.read(length)

    # --- state ------------------------------------------------------------------------------------
    def view(self) -> dict:
        session = self._live()
        stats = session.stats()
        recording_bytes = session.recording.stat().st_size if session.recording is not None else None
        return {**stats, "avatar_id": getattr(self, "avatar_id", None), "model": self.model, "created": self.created,
                "recording_bytes": recording_bytes}

    def state(self) -> str:
        return self.session.state if self.session is not None else "starting"

    def ended_for(self) -> float | None:
        """Seconds since the session ended, None while it runs."""
        session = self.session
        if session is None or not session.ended:
            return None
        return time.monotonic() - session.ended_at

    # --- the audio socket: one at a time ------------------------------------------------------------
    def attach(self, lease: str) -> bool:
        """Take the session's audio socket for `lease`; False while another socket holds it
        (one whose holder went silent for 10 s, e.g. a dead replica, is taken over)."""
        now = time.monotonic()
        held = getattr(self, "_socket", None)
        if held is not None and held[0] != lease and now - held[1] < 10.0:
            return False
        self._socket = (lease, now)
        return True

    def touch(self, lease: str) -> None:
        held = getattr(self, "_socket", None)
        if held is not None and held[0] == lease:
            self._socket = (lease, time.monotonic())

    def detach(self, lease: str) -> None:
        held = getattr(self, "_socket", None)
        if held is not None and held[0] == lease:
            self._socket = None


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=64)
class LiveRegistry:
    """Admits and finds sessions. Creation is serialised (a lock), so two requests never both
    take the last place."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._lock = threading.Lock()

    def _sessions(self) -> dict[str, object]:
        from ray.util import list_named_actors

        out = {}
        for entry in list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else entry
            ns = entry.get("namespace") if isinstance(entry, dict) else self.s.namespace
            if ns == self.s.namespace and name.startswith(SESSION_PREFIX):
                out[name[len(SESSION_PREFIX):]] = name
        return out

    def running(self) -> list[str]:
        """Ids of sessions not yet ended. Sessions ended longer than `live_keep_ended_s` ago
        (their recording served that long) are removed here."""
        ids = []
        for session_id, name in self._sessions().items():
            try:
                handle = ray.get_actor(name, namespace=self.s.namespace)
                ended_for = ray.get(handle.ended_for.remote(), timeout=5.0)
            except Exception:  # noqa: BLE001 - gone or stuck: not running
                continue
            if ended_for is None:
                ids.append(session_id)
            elif ended_for > self.s.live_keep_ended_s:
                ray.kill(handle, no_restart=True)
        return ids

    def create(self, session_id: str, avatar_id: str, model: str | None, sample_rate: int,
               max_seconds: float | None, rtmp_url: str | None = None) -> dict:
        from cluster.live import AvatarNotReady, LiveCapacity, avatar_state
        from cluster.netguard import vet_rtmp_url

        # an RTMP output is an outbound connection: the input URLs' guard, its address pinned for ffmpeg
        rtmp = vet_rtmp_url(rtmp_url, allow_private=self.s.allow_private_urls) if rtmp_url else None
        with self._lock:
            state = avatar_state(avatar_id, self.s)
            if state == "unknown":
                raise InputNotFound(f"avatar {avatar_id} does not exist (prepare it with POST /v1/avatars)",
                                    code="avatar.not_found", path="avatar_id")
            if state == "preparing":
                raise AvatarNotReady(f"avatar {avatar_id} is still being prepared; retry when it is ready",
                                     path="avatar_id")
            running = self.running()
            if len(running) >= self.s.max_live_sessions:
                raise LiveCapacity(f"{len(running)} live sessions are running (LIPSYNC_MAX_LIVE_SESSIONS="
                                   f"{self.s.max_live_sessions}); retry later")
            actor = create_session_actor(self.s, session_id)
            try:
                return ray.get(actor.begin.remote(avatar_id, model, sample_rate, max_seconds, rtmp),
                               timeout=self.s.model_load_timeout_s + 30)
            except Exception as e:
                ray.kill(actor, no_restart=True)
                cause = getattr(e, "cause", None)
                if isinstance(cause, LipsyncError):
                    raise cause from None
                raise


def create_session_actor(settings: Settings, session_id: str):
    """The detached session actor, on the job manager's node (the storage root's)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.orchestrator import head_node_id

    opts = dict(name=session_actor_name(session_id), namespace=settings.namespace, lifetime="detached")
    if settings.manager_resource:
        opts["resources"] = {settings.manager_resource: 0.01}
    else:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head_node_id(), soft=False)
    return LiveSessionActor.options(**opts).remote(session_id, settings)


def live_registry(settings: Settings):
    """The registry actor (created on first use)."""
    return LiveRegistry.options(name=REGISTRY_NAME, namespace=settings.namespace, lifetime="detached",
                                get_if_exists=True).remote(settings)


def session_actor(settings: Settings, session_id: str):
    """The session's actor; raises SessionNotFound."""
    from cluster.live import SessionNotFound

    try:
        return ray.get_actor(session_actor_name(session_id), namespace=settings.namespace)
    except ValueError:
        raise SessionNotFound(f"no live session {session_id}", path="session_id") from None
