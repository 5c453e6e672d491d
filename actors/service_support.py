"""The Serve ingress's handle on the job manager: async calls by name, each with a deadline.

Also the service's sidecar actor (callbacks, retention, avatars). Nothing here imports the
service package or `serve_app` (they import this).

The ingress is stateless: every call looks the named job manager up (creating it when the
cluster has none yet) and awaits the answer under `actor_call_timeout_s`. Input bytes reach the
manager in parts through Ray (`upload_begin` / `upload_part` / `upload_finish`) and output bytes
come back the same way (`read_output`), so the ingress may run on any node.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, TaskCancelledError

from actors import ORCHESTRATOR_NAME, actor_restarted, gcs_lookup, raise_if_cancelled, task_cause
from cluster.config import Settings
from cluster.errors import LipsyncError, RenderError
from cluster.schemas import HlsIndex, JobState, JobStatus, RenderRequest

log = logging.getLogger("lipsync.service")


def keep_replica_grpc_on_loopback() -> None:
    """In a Serve replica of an embedded Ray (started private by `actors.runtime.start_embedded_ray`,
    whose processes inherit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): bind the replica's
    inter-deployment gRPC server to loopback. Ray 2.60 binds it to every interface by a literal
    address, whatever the node's IP, in ray/serve/_private/replica.py, `Replica._on_initialized`:
        self._internal_grpc_port = add_port_to_grpc_server(self._server, "[::]:0")
    That runs after the deployment's constructor, which imports this module (the ingress's gateway
    lives here); a replica of a joined cluster, or any other process, is left alone."""
    replica = sys.modules.get("ray.serve._private.replica")
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0" or replica is None:
        return
    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "loopback_only", False):
        return

    def add_port_to_grpc_server(server, address: str):
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):  # noqa: S104 - the wildcard addresses replaced
            address = f"127.0.0.1:{port}"
        return add_port(server, address)

    add_port_to_grpc_server.loopback_only = True
    replica.add_port_to_grpc_server = add_port_to_grpc_server


keep_replica_grpc_on_loopback()


class ManagerUnavailable(RenderError):
    """The job manager did not answer in time (HTTP 503)."""
    code = "service.unavailable"


class AdmissionUnanswered(ManagerUnavailable):
    """A submission the job manager did not answer in time: `unanswered` says what did not come, `fate`
    what became of the job ("may still be admitted" under an id the client chose, else "was not
    admitted"); a batch says what to send again in its own words from them."""

    def __init__(self, message: str, *, unanswered: str, fate: str, **context) -> None:
        super().__init__(message, **context)
        self.unanswered, self.fate = unanswered, fate


class ManagerGateway:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._handle = None

    # --- plumbing --------------------------------------------------------------------------
    def _lookup_manager(self):
        try:
            return ray.get_actor(ORCHESTRATOR_NAME, namespace=self.s.namespace)
        except ValueError:
            from actors.orchestrator import create_job_manager

            return create_job_manager(self.s)

    async def _manager(self, deadline: float):
        """The job manager's handle, kept: looked up (a GCS round trip, which Ray lets take 60 s while its
        GCS restarts) in a thread within the call's deadline, never on the event loop, where it held every
        request of this replica, its health checks and open streams with it."""
        if self._handle is None:
            self._handle = await gcs_lookup(self._lookup_manager, timeout=max(0.1, deadline - time.monotonic()))
        return self._handle

    async def call(self, method: str, *args, timeout: float | None = None, **kwargs):
        """Await one job-manager method; typed errors come back as themselves, a manager that
        does not answer within the deadline (restarting, overloaded) as ManagerUnavailable."""
        timeout = timeout or self.s.actor_call_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            if "within_s" in kwargs:  # the callee is told what is left of this wait, at each attempt
                kwargs["within_s"] = max(0.0, deadline - time.monotonic() - 1.0)
            try:
                ref = getattr(await self._manager(deadline), method).remote(*args, **kwargs)
                return await asyncio.wait_for(ref, timeout=max(0.1, deadline - time.monotonic()))
            except (RayTaskError, TaskCancelledError) as e:
                await raise_if_cancelled(e)  # (the request was: its client went away)
                cause = task_cause(e)
                if isinstance(cause, LipsyncError):
                    raise cause from None
                raise RenderError(f"job manager {method} failed: {type(cause).__name__}: {cause}",
                                  cause=repr(cause)[:2000]) from e
            except (RayActorError, GetTimeoutError, asyncio.TimeoutError) as e:
                if isinstance(e, RayActorError):  # gone for good (replaced): looked up again; a slow one is kept
                    self._handle = None
                if time.monotonic() >= deadline:
                    raise ManagerUnavailable(f"the job manager did not answer {method} within {timeout:.0f} s "
                                             f"({type(e).__name__})", cause=str(e)[:1000]) from e
                await asyncio.sleep(0.3)

    # --- data plane -------------------------------------------------------------------------
    async def upload(self, path: str | Path, filename: str) -> str:
        """Send a node-local file to the manager's storage in parts; the stored input's reference."""
        part = self.s.transfer_part_bytes
        digest = hashlib.sha256()
        upload_id = await self.call("upload_begin", filename)
        try:
            with open(path, "rb") as f:
                offset = 0

                def read_part() -> bytes:
                    data = f.read(part)
                    digest.update(data)
                    return data

                while True:
                    data = await asyncio.to_thread(read_part)
                    if not data:
                        break
                    # `call` sends a part again when an answer is late: the offset makes that harmless
                    await self.call("upload_part", upload_id, data, offset)
                    offset += len(data)
            stored = await self.call("upload_finish", upload_id, digest.hexdigest())
        except BaseException:
            try:
                await self.call("upload_abort", upload_id, timeout=5)
            except Exception as e:  # the upload is cleaned by retention anyway
                log.warning("upload_abort %s: %r", upload_id, e)
            raise
        return stored.ref

    async def submit(self, job_id: str, request: RenderRequest, id_chosen: bool = True) -> JobStatus:
        """Admit a job, within the service's queue bound (checked by the job manager as it admits).
        The 503 of an admission that outlasts this wait names the job's id, under which a retry is the
        same job. `id_chosen`: the client chose the id; an admission that ends late is still stored, and
        its client's retry with the id gets it (the manager waits for it, then answers the job). An id
        minted here (`id_chosen` false) the client only learns from that 503: the manager is told how
        long this waits, and does not store an admission that ends later (`AdmissionTooLate`), or a job
        would render that its client was told was not admitted; a retry with the id is then an
        admission whose id was chosen."""
        timeout = self.s.admission_timeout_s()
        late = {} if id_chosen else {"within_s": timeout}
        try:
            return await self.call("submit", job_id, request, None, self.s.max_queued_jobs, timeout=timeout, **late)
        except ManagerUnavailable as e:  # the id the caller may not have chosen: a retry with it is this job
            fate = "may still be admitted" if id_chosen else "was not admitted"
            raise AdmissionUnanswered(f"{e.message}; job {job_id} {fate}: submit it again with the id {job_id!r} "
                                      f"(the same id is the same job)", unanswered=e.message, fate=fate,
                                      job_id=job_id, stage="admit", cause=e.cause) from e.__cause__

    async def get(self, job_id: str) -> JobStatus:
        return await self.call("get", job_id)

    async def wait(self, job_id: str, window: float) -> JobStatus:
        """The job's status once it ends, or after `window` seconds (the manager's long poll)."""
        return await self.call("wait", job_id, window, timeout=window + self.s.actor_call_timeout_s)

    async def list_jobs(self, states: list[JobState] | None = None, limit: int = 100,
                        offset: int = 0, before: str | None = None) -> list[JobStatus]:
        return await self.call("list_jobs", states, limit, offset, before)

    async def cancel(self, job_id: str) -> JobStatus:
        return await self.call("cancel", job_id)

    async def purge(self, job_id: str) -> JobStatus:
        return await self.call("purge", job_id)

    async def read_output(self, job_id: str, offset: int, length: int) -> bytes:
        return await self.call("read_output", job_id, offset, length)

    async def hls_index(self, job_id: str) -> HlsIndex:
        return await self.call("hls_index", job_id)

    async def wait_hls(self, job_id: str, known: int, window: float) -> None:
        """Until the job has published more than `known` HLS segments or ended, or `window` seconds."""
        await self.call("wait_hls", job_id, known, window, timeout=window + self.s.actor_call_timeout_s)

    async def read_hls(self, job_id: str, name: str, offset: int, length: int) -> bytes:
        return await self.call("read_hls", job_id, name, offset, length)

    async def ready(self, timeout: float) -> dict:
        return await self.call("ready", timeout, timeout=timeout + 5)

    async def unfinished_count(self, bound: int) -> int:
        """How many jobs are not terminal yet (counted up to `bound` + 1)."""
        states = [s for s in JobState if not s.terminal]
        return len(await self.list_jobs(states, bound + 1, 0))



# --- callbacks ---------------------------------------------------------------------------------------
SIDECAR_NAME = "lipsync-service-sidecar"


async def watch_manager(settings: Settings, name: str = ORCHESTRATOR_NAME) -> None:
    """Kill a job manager that has answered nothing for `stall_timeout_s` (a process stopped or deadlocked,
    its event loop blocked): Ray restarts it and it resumes its jobs from the store. A probe's SIGSTOPped
    manager was never replaced: every API call waited 30 s, then answered 503, for as long as it was stopped.
    Never dies (the service's sidecar runs it for as long as it lives)."""
    from cluster.scheduling import SilenceWatch

    async def answer(ref):
        return await ref

    every = min(10.0, settings.stall_timeout_s / 4)
    watch = SilenceWatch(settings.stall_timeout_s, time.monotonic())
    ping = handle = None  # one ping out at a time: its answer counts whenever it comes (a busy manager
    while True:           # queues it behind its long polls: late, not silent)
        await asyncio.sleep(every)
        try:
            if ping is None:
                handle = await asyncio.to_thread(ray.get_actor, name, namespace=settings.namespace)
                ping = asyncio.ensure_future(answer(handle.ping.remote()))
            done, _ = await asyncio.wait({ping}, timeout=every)
            if done:
                ping, last = None, ping
                last.result()  # (raises what the call met)
                watch.heard(time.monotonic())
            elif watch.silent(time.monotonic()):
                log.error("the job manager has answered nothing for %.0f s (stopped, deadlocked?): killed for "
                          "Ray to restart it; its jobs resume from the store", settings.stall_timeout_s)
                ping.cancel()
                ping = None
                await asyncio.to_thread(ray.kill, handle, no_restart=False)
        except (ValueError, RayActorError):  # none yet, dead or restarting: Ray's to bring back, no silence
            ping = None
            watch.heard(time.monotonic())
        except Exception:  # noqa: BLE001 - (a slow GCS, a failed kill): said, and the watch goes on
            log.exception("watching the job manager failed")
            ping = None


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)
class ServiceSidecar:
    """The service's helper next to the job manager (it reads the storage root): watches jobs that
    carry a callback_url and POSTs their final status when they end; runs the retention sweeps
    (`LIPSYNC_RETENTION_DAYS`); prepares avatars (`POST /v1/avatars`).

    Delivery records live in SQLite under the storage root, so pending callbacks survive a
    restart (created at `lipsync serve` start, it resumes them). A failing callback is retried
    with backoff and recorded; it never touches the job."""

    def __init__(self, settings: Settings) -> None:
        from actors import metrics
        from cluster.callbacks import CallbackStore

        logging.basicConfig(level=logging.INFO)
        metrics.install("service-sidecar", settings.log_format)  # LIPSYNC_LOG_FORMAT: its lines as the others'
        self.s = settings
        self.store = CallbackStore(settings.storage_root / "callbacks.sqlite3")
        self.gw = ManagerGateway(settings)
        self._tasks: dict[str, asyncio.Task] = {}
        self._preparing = 0  # avatar preparations running (threads: one the client gave up on still counts)
        for job_id, url, tried in self.store.pending():  # counted on: a restart does not start them anew
            self._watch(job_id, url, tried)
        if settings.retention_days > 0 or settings.record_retention_days > 0:
            self._retention = asyncio.get_event_loop().create_task(self._retain())
        self._manager_watch = asyncio.get_event_loop().create_task(watch_manager(self.s))

    async def _retain(self) -> None:
        """Retention sweeps (`cluster.retention.sweep_periodically`)."""
        from cluster.jobstore import JobStore
        from cluster.retention import sweep_periodically

        await sweep_periodically(self.s, JobStore(self.s.db_path, must_exist=actor_restarted()), self.store)

    def _watch(self, job_id: str, url: str, tried: int = 0) -> None:
        if job_id not in self._tasks or self._tasks[job_id].done():
            task = asyncio.get_event_loop().create_task(self._run(job_id, url, tried))
            self._tasks[job_id] = task
            task.add_done_callback(lambda done, j=job_id: self._forget(j, done))

    def _forget(self, job_id: str, task: asyncio.Task) -> None:
        """Drop a delivery's task once it ends (the sidecar lives as long as the service: one task kept per
        job with a callback grew its memory without bound); its record stays in the store."""
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]

    async def register(self, job_id: str, url: str) -> bool:
        added = self.store.add(job_id, url)
        if added:
            self._watch(job_id, url)
        return added

    def record(self, job_id: str) -> dict | None:
        return self.store.get(job_id)

    # avatars ---------------------------------------------------------------------------------------
    async def prepare_avatar(self, video_ref: str, source: str | None = None) -> dict:
        """Prepare (or find, by content hash) the avatar of an uploaded template; its summary. Errors
        name `source` (the client's file name or URL), not this node's stored copy."""
        from cluster.errors import LipsyncError, TooManyPreparations
        from cluster.faces.avatar import prepare_avatar, stored_avatar_for
        from cluster.inputs import name_of_upload_ref, upload_ref_path

        path = upload_ref_path(video_ref, self.s)
        if source:  # a reference to a stored upload: the name its bytes came under
            source = name_of_upload_ref(source, path, self.s) or source
        cached = await asyncio.to_thread(stored_avatar_for, str(path), self.s)
        if cached is not None:  # prepared already: no preparation slot taken
            return await asyncio.to_thread(self._named_summary, cached, source)
        if self._preparing >= self.s.max_avatar_preparations:  # each holds a template's frames and a detector
            raise TooManyPreparations(f"{self._preparing} avatars are being prepared (LIPSYNC_MAX_AVATAR_PREPARATIONS"
                                      f"={self.s.max_avatar_preparations}); retry later")
        self._preparing += 1
        try:
            avatar = await asyncio.to_thread(prepare_avatar, str(path), self.s)
        except LipsyncError as e:
            if source and e.code != "service.busy":
                e.naming({str(path): source, video_ref: source}).path = "video"
            raise
        finally:
            self._preparing -= 1
        return await asyncio.to_thread(self._named_summary, avatar, source)

    def _named_summary(self, avatar, source: str | None) -> dict:
        """The summary of an avatar just prepared or found, named after `source` unless it has a name."""
        from cluster.faces.avatar import name_avatar

        name_avatar(avatar.id, source, self.s)
        return avatar_summary(avatar, self.s)

    def _summary(self, avatar_id: str) -> dict:
        """What `GET /v1/avatars` shows of one avatar: a look, not a use (listing every avatar renewed them
        all, so retention never removed one while the page's Avatars tab was opened now and then)."""
        from cluster.faces.avatar import load_avatar

        return avatar_summary(load_avatar(avatar_id, self.s, use=False), self.s)

    async def get_avatar(self, avatar_id: str) -> dict:
        return await asyncio.to_thread(self._summary, avatar_id)

    async def check_model(self, model: str) -> None:
        """`cluster.render.check_model` on the storage root's node: an unknown model name, typed."""
        from cluster.render import check_model

        check_model(model, self.s)

    async def list_avatars(self, limit: int, offset: int) -> list[dict]:
        from cluster.faces.avatar import AVATAR_FILE

        root = self.s.dir("avatars")
        ids = sorted(p.parent.name for p in root.glob(f"*/{AVATAR_FILE}"))[offset:offset + limit]
        out = []
        for avatar_id in ids:
            try:
                out.append(await asyncio.to_thread(self._summary, avatar_id))
            except LipsyncError:  # incomplete or damaged: not listed
                continue
        return out

    async def _run(self, job_id: str, url: str, tried: int = 0) -> None:
        """Watch the job to its end, then POST its view: `callback_attempts` deliveries in all, `tried` of
        them before a restart, the waits between them doubling (`cluster.callbacks.retry_delay_s`)."""
        from cluster.callbacks import SIGNATURE_HEADER, deliver, sign
        from cluster.netguard import post_json
        from cluster.views import job_view

        try:
            # a job ends within job_timeout_s of its (re)start by a job manager, which counts anew after
            # a manager restart: the watch lasts that long after the job last changed, not after now
            deadline = time.monotonic() + self.s.job_timeout_s + 60
            seen = None
            while True:
                try:
                    st = await self.gw.get(job_id)
                    if st.state.terminal:
                        break
                    if st.updated_at != seen:
                        seen, deadline = st.updated_at, time.monotonic() + self.s.job_timeout_s + 60
                except LipsyncError as e:  # manager restarting: keep watching until the deadline
                    log.warning("callback watch of %s: %s", job_id, e)
                if time.monotonic() > deadline:
                    self.store.attempt(job_id, "the job did not end before the callback deadline", final=True)
                    return
                await asyncio.sleep(1.0)
            # the job's view as GET answers it, without its callback (this delivery) and watch_url (a signed
            # URL is a credential, not handed to a third party; GET gives it): keys absent, not null
            body = job_view(st, storage_root=str(self.s.storage_root)).model_dump_json(
                exclude={"callback", "watch_url"}).encode()
            headers = {"Content-Type": "application/json", "X-Lipsync-Job": job_id}
            if (key := self.s.callback_key()) is not None:
                headers[SIGNATURE_HEADER] = sign(body, key)
            await deliver(job_id, url, functools.partial(asyncio.to_thread, post_json, url, body, headers,
                                                         timeout_s=self.s.callback_timeout_s,
                                                         allow_private=self.s.allow_private_urls),
                          self.store, attempts=self.s.callback_attempts, tried=tried)
        except Exception as e:  # recorded, never raised into the job
            log.exception("callback of job %s failed", job_id)
            self.store.attempt(job_id, f"internal error: {e!r}", final=True)


def avatar_summary(avatar, settings: Settings) -> dict:
    """What `AvatarView` shows of a stored avatar (its name read from the storage root)."""
    from cluster.faces.avatar import avatar_name

    v = avatar.info.video
    return {"id": avatar.id, "name": avatar_name(avatar.id, settings), "frames": avatar.frame_count,
            "width": v.width if v else None, "height": v.height if v else None, "fps": float(v.fps) if v else None,
            "duration": v.duration if v else None}


def service_sidecar(settings: Settings):
    """The named notifier (created on first use, detached) on the job manager's node: it reads and
    writes the storage root (callbacks, retention, avatars); anywhere else it would open a store
    of its own on that node's disk."""
    from actors.orchestrator import storage_node_placement

    try:
        return ray.get_actor(SIDECAR_NAME, namespace=settings.namespace)
    except ValueError:
        return ServiceSidecar.options(name=SIDECAR_NAME, namespace=settings.namespace, lifetime="detached",
                                      get_if_exists=True, **storage_node_placement(settings)).remote(settings)
