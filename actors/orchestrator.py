"""The job manager: one named, detached, async actor that owns the job table and the storage root.

It is a thin shell over three parts, each in its own module:
- `actors.supervision.Supervisor`: the model workers and compositors, and their health;
- `actors.dispatch.Dispatcher`: queued chunks to compositors, model batches to workers (object
  refs only, never frame data);
- `actors.jobs.JobMachine`: the job state machine, persisted in SQLite under the storage root,
  so a restarted manager resumes its unfinished jobs from their completed segments.

Only this actor's node reads and writes the storage root: clients send input bytes
(`upload_*`) and receive output bytes (`read_output`) through Ray.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import ray

from actors import MAX_WAIT_S, ORCHESTRATOR_NAME, actor_restarted, metrics
from actors.dispatch import Dispatcher
from actors.jobs import JobMachine
from actors.supervision import Supervisor, TaskSet
from cluster import code_version, heap
from cluster.config import Settings
from cluster.errors import (
    AdmissionTooLate,
    HlsNotPublished,
    InputsGone,
    JobAbandoned,
    JobConflict,
    JobNotFinished,
    JobNotReady,
    LipsyncError,
    OutputExpired,
    OutputPathInUse,
    PlacementError,
    QueueFull,
    RenderError,
)
from cluster.inputs import UploadStore
from cluster.jobstore import JobStore
from cluster.owners import identity_gone
from cluster.render import admit_on_manager, job_dir
from cluster.schemas import HlsIndex, JobState, JobStatus, RenderRequest, StoredInput, utcnow

log = logging.getLogger("lipsync.orchestrator")


def request_key(request: RenderRequest) -> str:
    """A digest of what a request asks for (not of where its inputs were stored)."""
    # (not its batch's size, compared on its own in `_resubmitted`: the keys of jobs stored before it was
    # recorded stay the same, so a batch partly admitted then is admitted on when sent again)
    return hashlib.sha256(json.dumps(request.model_dump(mode="json", exclude={"sources", "batch_size", "avatar_name"}),
                                     sort_keys=True).encode()).hexdigest()


#: Waits before a resumption that failed at the manager's boot is tried again (`JobManager._resume_later`)
RESUME_RETRY_FIRST_S = 5.0
RESUME_RETRY_MAX_S = 60.0

#: A request's fields by the API's names (`RenderRequest.loop` is the API's `sync_mode`)
_API_NAMES = {"loop": "sync_mode"}


def request_differences(request: RenderRequest, had: RenderRequest | None) -> str:
    """What a resubmitted `request` asks for that the job admitted as `had` does not, in the API's terms
    ("crf 20, not 18"), for `job.conflict`: "already exists with other inputs or options" left a user
    to guess which. The inputs are compared as the user gave them (the job keeps stored copies)."""
    if had is None:
        return "the job's request is no longer known"
    said = []
    for name in ("avatar_id", "model", "crop", "loop", "chunk_seconds", "crf"):
        new, old = getattr(request, name), getattr(had, name)
        if new != old:
            if name == "loop":  # the API's values: `forward` is its sync_mode `loop`
                new, old = ("loop" if v == "forward" else v for v in (new, old))
            said.append(f"{_API_NAMES.get(name, name)} {new if new is not None else 'unset'}, "
                        f"not {old if old is not None else 'unset'}")
    for name in ("audio", "video"):
        new, old = getattr(request, name), getattr(had, name)
        if (new is None) != (old is None) or (new is not None and not _given_before(new, old, had)):
            said.append(f"another {name}" if new is not None and old is not None else
                        f"{name} {'given' if new is not None else 'not given'} now, "
                        f"{'given' if old is not None else 'not given'} then")
    return "; ".join(said) or "the output path or the way an input was given differs"


def _given_before(value: str, stored: str, had: RenderRequest) -> bool:
    """Whether an input sent as `value` is the one job `had` stored as `stored`, as far as its request says:
    the path or reference sent then (`had.sources` maps the stored copy and the resolved path to it, and a
    form's reference to the client's file), or the stored upload `value` references."""
    if value in (stored, had.sources.get(stored)) or value in had.sources:
        return True
    return value.startswith("upload:") and any(Path(k).name == value[len("upload:"):] for k in had.sources)


def changed_server_input(request: RenderRequest, had: RenderRequest | None, settings: Settings) -> str | None:
    """Which server-path input of a resubmitted `request` no longer holds what job `had` copied from it at its
    admission (said as the input and how), or None. The request's key names paths, not contents: a file
    replaced under the same path and sent again under the same id was answered the old job and its video.
    Upload references are their contents' digests already; a copy retention removed cannot be compared."""
    from cluster.inputs import is_upload_ref, resolve_input_path, same_content

    for name in ("audio", "video"):
        given, copy = getattr(request, name), getattr(had, name, None) if had is not None else None
        if given is None or copy is None or is_upload_ref(given) or not os.path.isfile(copy):
            continue
        try:
            path = resolve_input_path(given, settings)
        except LipsyncError:  # gone since (a retry after the user cleaned up): the job has its copy
            continue
        if not same_content(path, Path(copy)):
            return f"the {name} file {given} has changed since the job was submitted (send it under a new id)"
    return None


def default_owner(settings: Settings) -> str:
    """The owner of jobs admitted by a long-lived deployment (a cluster's job manager)."""
    return f"cluster:{settings.namespace}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)
class JobManager:
    def __init__(self, settings: Settings, owner: str | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        metrics.install(ORCHESTRATOR_NAME, settings.log_format)
        heap.pin_mmap_threshold(settings.manager_mmap_threshold_bytes)
        self.s = settings
        self.owner = owner or default_owner(settings)
        code_version()  # (hashed now, from the files this process imported: not from a later upgrade's)
        # restarted by Ray: the store its predecessor kept must be there (not a new, empty one in its place)
        self.store = JobStore(settings.db_path, must_exist=actor_restarted())
        # jobs being admitted now (`submit`), each set when its admission ends: they count in the queue bound
        self._admitting: dict[str, asyncio.Event] = {}
        self.uploads = UploadStore(settings)
        self._model_hashes: dict[tuple, str] = {}  # (path, size, mtime) -> sha256 of a model file
        self.tasks = TaskSet()
        work = asyncio.Event()
        self.pool = Supervisor(settings, self.tasks, work)
        self.dispatcher = Dispatcher(settings, self.pool, self.tasks, work)
        self.machine = JobMachine(settings, self.store, self.pool, self.dispatcher, self.tasks, self.owner)
        self.dispatcher.machine = self.machine
        self._booted = asyncio.Event()
        self._boot_error: LipsyncError | None = None  # the pool's start (cleared once the pool starts later)
        self._store_error: LipsyncError | None = None  # reading the unfinished jobs at boot (kept: not resumed)
        self.tasks.spawn(self._boot())

    async def _boot(self) -> None:
        """Create (or re-attach to) the detached workers, resume this owner's unfinished jobs, end
        the abandoned ones of embedded runs that are gone, start scheduling."""
        try:
            await self.pool.start()
        except LipsyncError as e:  # e.g. PlacementError: every submit says why, at once, until
            self._boot_error = e  # the reconciler finds the cluster can hold the pool
            log.error("job manager cannot start its workers: %s", e)
        except Exception as e:
            self._boot_error = RenderError(f"the job manager cannot start its workers: {e!r}", cause=repr(e))
            log.exception("job manager boot failed")
        self.tasks.spawn(self.dispatcher.run_scheduler())
        self.tasks.spawn(self.pool.run_reconciler(lambda: len(self.dispatcher.queue), self._pool_started))
        self.tasks.spawn(metrics.publish_gauges(lambda: len(self.dispatcher.queue), self.store.count_by_state))
        self.tasks.spawn(self._expire_uploads())
        try:
            if failed := self._resume_unfinished():
                self.tasks.spawn(self._resume_later(failed))
        except Exception as e:  # the store cannot be read: every submit says why (it waited 30 s for a boot)
            self._store_error = e if isinstance(e, LipsyncError) else RenderError(
                f"the job manager cannot read its unfinished jobs: {type(e).__name__}: {e}", stage="boot",
                cause=repr(e))
            log.exception("job manager boot: reading the unfinished jobs failed")
        finally:
            self._booted.set()

    def _resume_unfinished(self, only: set[str] | None = None) -> set[str]:
        """Resume this owner's unfinished jobs (of `only`, where given), end the abandoned ones; a job whose
        resumption fails (a full disk as it is claimed) is said with its cause, the others go on. The ids of
        those that failed (`_resume_later` tries them again)."""
        failed: set[str] = set()
        for job_id, owner, client in self.store.unfinished_owners():
            if only is not None and job_id not in only:
                continue
            try:
                if owner is None and client is None and self.store.claim_unowned(job_id, self.owner):
                    owner = self.owner  # admitted by a version before owners: resumed by the first manager up
                if owner == self.owner:
                    log.info("resuming job %s", job_id)
                    self.machine.start(job_id)
                elif identity_gone(owner) or identity_gone(client):
                    self._abandon(job_id, owner, client)
            except Exception as e:
                if only is None:  # at the boot: with its traceback; a retry's failure in a line
                    log.exception("job %s: its resumption at the job manager's start failed (tried again later)",
                                  job_id, extra={"job_id": job_id})
                else:
                    log.warning("job %s: its resumption failed again: %s: %s (tried again later)", job_id,
                                type(e).__name__, e, extra={"job_id": job_id})
                failed.add(job_id)
        return failed

    async def _resume_later(self, failed: set[str]) -> None:
        """Try the resumptions that failed at boot again, 5 s after it and then at doubling waits up to a minute,
        until each has been made or its job has ended (by a cancel, or another manager): they were left
        unfinished, read `rendering` by nobody, until the next start of the manager."""
        wait = RESUME_RETRY_FIRST_S
        while failed:
            await asyncio.sleep(wait)
            wait = min(wait * 2, RESUME_RETRY_MAX_S)
            try:
                failed = self._resume_unfinished(only=failed)
            except Exception as e:  # noqa: BLE001 - the store still unreadable: tried again at the next wait
                log.warning("the unfinished jobs %s could not be read to resume them: %r (tried again in %.0f s)",
                            sorted(failed), e, wait)

    def _pool_started(self) -> None:
        """The pool's start, refused at boot (the cluster could not hold it), succeeded later."""
        self._boot_error = None

    def _abandon(self, job_id: str, owner: str | None, client: str | None) -> None:
        from cluster.views import STAGES

        try:  # the stage it had reached when its run went (a killed render was rendering, not admitting)
            stage = STAGES[self.store.get(job_id).state]
        except Exception:  # noqa: BLE001 - the abandonment is told whatever the row says
            stage = "admit"
        err = JobAbandoned(f"job {job_id} was abandoned: the run that admitted it ({client or owner}) is gone "
                           f"(it was at {stage})", job_id=job_id, stage=stage)
        if self.store.end(job_id, JobState.failed, error=err.to_info()):  # unless it ended meanwhile
            log.warning("job %s: %s", job_id, err)

    async def _wait_booted(self) -> None:
        await asyncio.wait_for(self._booted.wait(), self.s.actor_call_timeout_s)
        if self._store_error is not None:
            raise self._store_error
        if self._boot_error is not None:
            raise self._boot_error

    # --- workers -------------------------------------------------------------------------------
    async def ready(self, timeout: float = 60.0) -> dict:
        """Wait (bounded) until every model worker and compositor has answered once; their state.
        `StorageLost` when the job store was removed or replaced under this process (readiness fails)."""
        self.store.check_present()
        await asyncio.wait_for(self._booted.wait(), timeout)
        if self._store_error is not None:  # its unfinished jobs could not be read: it takes no work
            raise self._store_error
        deadline = asyncio.get_event_loop().time() + timeout
        while asyncio.get_event_loop().time() < deadline and not self.pool.settled():
            await asyncio.sleep(0.2)
        return self.workers()

    async def ping(self) -> bool:
        """An answer from this process's event loop (the sidecar's watch: `actors.service_support.watch_manager`)."""
        return True

    def workers(self) -> dict:
        return {**self.pool.snapshot(), "manager": {"node": self.dispatcher.node_id, "pid": os.getpid(),
                                                    "storage_root": str(self.s.storage_root),
                                                    "code": code_version()}}

    async def refresh(self, timeout: float = 10.0) -> dict:
        await self.pool.refresh(timeout)
        return self.workers()

    # --- data plane: bytes in ----------------------------------------------------------------
    async def _expire_uploads(self) -> None:
        """Drop uploads whose client died mid-way (no part for upload_idle_timeout_s). Never dies."""
        period = min(60.0, max(1.0, self.s.upload_idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                removed = await asyncio.to_thread(self.uploads.expire)
                if removed:
                    log.warning("removed %d upload(s) idle for over %.0f s", removed, self.s.upload_idle_timeout_s)
            except Exception:
                log.exception("expiring idle uploads failed; trying again later")

    async def upload_begin(self, filename: str) -> str:
        return await asyncio.to_thread(self.uploads.begin, filename)

    async def upload_part(self, upload_id: str, data: bytes, offset: int | None = None) -> int:
        return await asyncio.to_thread(self.uploads.part, upload_id, data, offset)

    async def upload_finish(self, upload_id: str, sha256: str | None = None) -> StoredInput:
        return await asyncio.to_thread(self.uploads.finish, upload_id, sha256)

    async def upload_abort(self, upload_id: str) -> None:
        await asyncio.to_thread(self.uploads.abort, upload_id)

    # --- jobs ------------------------------------------------------------------------------------
    async def submit(self, job_id: str, request: RenderRequest, owner: str | None = None,
                     max_unfinished: int | None = None, within_s: float | None = None) -> JobStatus:
        """Admit a request (inputs: upload references or paths under input_roots) on this node, in
        a thread, and start it. Idempotent: the same id with the same request is the same job; the
        same id with another request raises `job.conflict`. `max_unfinished` (the service's
        `LIPSYNC_MAX_QUEUED_JOBS`): `QueueFull` when that many jobs are unfinished or being admitted,
        counted here, in one step with this admission's start (the ingress's own check comes before
        the inputs travel, and a burst of requests could all pass it). `within_s`: how long the caller
        waits for the answer, given for an id the caller minted (`ManagerGateway.submit`); an admission
        that ends later is not stored (`AdmissionTooLate`): its client was answered that it was not
        admitted, and a job it never heard of would render. Without it a late admission is stored: the
        client chose the id, and its retry with it is answered this job."""
        answer_by = time.monotonic() + within_s if within_s is not None else None
        await self._wait_booted()
        key = request_key(request)
        if self.store.exists(job_id):
            return await self._resubmitted(job_id, key, request)
        while (admitting := self._admitting.get(job_id)) is not None:
            # the same id being admitted (a client's retry of a submission its gateway gave up on): that
            # admission's outcome, not a second one beside it (bounded: the gateway's own wait ends sooner)
            try:
                await asyncio.wait_for(admitting.wait(), timeout=self.s.ffmpeg_timeout_s)
            except asyncio.TimeoutError:
                raise AdmissionTooLate(f"job {job_id} is still being admitted after {self.s.ffmpeg_timeout_s:.0f} s: "
                                       f"ask again later", job_id=job_id, stage="admit") from None
            if self.store.exists(job_id):
                return await self._resubmitted(job_id, key, request)
        if request.output is not None:
            other = self.store.job_writing_to(str(Path(request.output).expanduser().resolve()))
            if other is not None:
                raise OutputPathInUse(f"job {other} is already writing {request.output}; choose another output "
                                      f"path or wait for it to finish", path=request.output, stage="admit")
        if max_unfinished is not None:
            n = len(self.store.unfinished_ids()) + len(self._admitting)
            if n >= max_unfinished:
                raise QueueFull.at(n, max_unfinished).with_context(job_id=job_id, stage="admit")
        admitted_at = utcnow()
        self._admitting[job_id] = asyncio.Event()
        try:
            # a directory of this id without a row (an admission that was refused late, or killed before it
            # stored its row) holds no job: its input copies would be taken for this request's
            await asyncio.to_thread(shutil.rmtree, job_dir(job_id, self.s), True)
            admitted = await asyncio.to_thread(admit_on_manager, job_id, request, self.s)
            if answer_by is not None and time.monotonic() > answer_by:
                raise AdmissionTooLate(f"job {job_id}'s admission took longer than its caller waited "
                                       f"({within_s:.0f} s): not stored", job_id=job_id, stage="admit")
            _, created = self.store.create(job_id, admitted, owner=self.owner, client=owner, request_key=key,
                                           admitted_at=admitted_at)
        except BaseException:
            try:
                known = self.store.exists(job_id)  # admitted by a concurrent submission of the same id
            except Exception:  # noqa: BLE001 - the store's own failure is what is raised below
                known = False
            if not known:  # not admitted: nothing is promised to it, and nothing of it is kept
                from cluster.resources import RESERVATIONS  # not a global of this actor class (Ray pickles it)

                RESERVATIONS.release(job_id)
                shutil.rmtree(job_dir(job_id, self.s), ignore_errors=True)
            raise
        finally:
            self._admitting.pop(job_id).set()
        if not created:  # the same id was admitted concurrently
            return await self._resubmitted(job_id, key, request)
        log.info("job %s accepted", job_id, extra={"job_id": job_id})
        self.machine.start(job_id)
        return self.get(job_id)

    async def _resubmitted(self, job_id: str, key: str, request: RenderRequest) -> JobStatus:
        stored = self.store.request_key(job_id)
        if stored is not None and stored != key:
            had = self.store.get(job_id).request
            raise JobConflict(f"job {job_id} already exists with other inputs or options: "
                              f"{request_differences(request, had)} (send it under a new id)", job_id=job_id,
                              stage="admit")
        had = self.store.get(job_id).request
        changed = await asyncio.to_thread(changed_server_input, request, had, self.s)
        if changed is not None:
            raise JobConflict(f"job {job_id} already exists with other inputs: {changed}", job_id=job_id,
                              stage="admit")
        if request.batch_size is not None:  # the first job of a batch: the same batch has as many audios
            if had is not None and had.batch_size is not None and had.batch_size != request.batch_size:
                raise JobConflict(f"batch job {job_id} was submitted in a batch of {had.batch_size} audios, not "
                                  f"{request.batch_size}", job_id=job_id, stage="admit")
        return self.get(job_id)

    def get(self, job_id: str) -> JobStatus:
        from cluster.hls import stream_published
        from cluster.render import job_dir

        st = self.machine.status(job_id)
        if st.state == JobState.succeeded and st.output:
            try:
                st.output_bytes = os.path.getsize(st.output)
            except OSError:
                st.output_bytes = None
        if st.state.terminal:  # a watch_url is given only to a stream there is (purged with its output elsewhere)
            st.stream_gone = not stream_published(job_dir(job_id, self.s))
        return st

    async def wait(self, job_id: str, timeout: float) -> JobStatus:
        """The job's status as soon as it is terminal, or after `timeout` seconds (at most
        `MAX_WAIT_S`): a long poll, so a waiting client learns of the end when it happens rather than
        at its next poll. Unknown jobs raise as `get` does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout, 0.0), MAX_WAIT_S)
        while True:
            st = self.get(job_id)
            remaining = deadline - loop.time()
            if st.state.terminal or remaining <= 0:
                return st
            await self.machine.wait_end(job_id, remaining)

    def list_jobs(self, states: list[JobState] | None = None, limit: int = 100, offset: int = 0,
                  before: str | None = None) -> list[JobStatus]:
        return [self.get(j.id) for j in self.store.list(states, limit, offset, before)]

    async def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job; one already committing its verified output finishes as succeeded."""
        await self.machine.cancel(job_id)
        return self.get(job_id)

    async def purge(self, job_id: str) -> JobStatus:
        """Remove a finished job's files now, as retention does after LIPSYNC_RETENTION_DAYS (its row stays: a
        succeeded job then reads `expired`); an unfinished job is refused (`job.not_finished`: cancel it first)."""
        from cluster.retention import remove_job_files

        st = self.store.get(job_id)
        if not st.state.terminal:
            raise JobNotFinished(f"job {job_id} is {st.state.value}: its files are removed once it has ended (cancel "
                                 f"it first: DELETE /v1/jobs/{job_id})", job_id=job_id)
        if await asyncio.to_thread(remove_job_files, st, self.s.storage_root.resolve(), self.store):
            log.info("job %s: its files were removed on request", job_id, extra={"job_id": job_id})
        return self.get(job_id)

    async def dispatch(self, job_id: str, chunk_index: int, token: str, model: str, refs: list) -> list:
        """Run one batch for a compositor (see `Dispatcher.dispatch`)."""
        return await self.dispatcher.dispatch(job_id, chunk_index, token, model, refs)

    async def read_blob(self, sha256: str, offset: int, length: int) -> bytes:
        """Bytes of a prepared file of a running job (by content hash), for a node-local cache."""
        path = self.machine.blobs.get(sha256)
        if path is None:
            raise InputsGone(f"no prepared file with sha256 {sha256} is held by the job manager", stage="render")
        length = max(0, min(int(length), self.s.transfer_part_bytes))

        def read() -> bytes:
            with open(path, "rb") as f:
                f.seek(max(0, int(offset)))
                return f.read(length)
        return await asyncio.to_thread(read)

    async def model_blob(self, spec: str) -> dict:
        """A model file on this node, by content hash, registered so that model workers on other
        nodes (which do not see the storage root) fetch it into their node cache with `read_blob`.
        Answers `node` too: a worker on this node loads the file in place."""
        from cluster.errors import ModelLoadError
        from cluster.fsutil import file_sha256

        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist on the job manager's node "
                                 "(expected 'builtin' or an .onnx file there)", path=str(path))
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        sha = self._model_hashes.get(key)
        if sha is None:
            from cluster.models.adapter import external_data_files

            # workers on other nodes receive the one file: weights kept beside it would be missing there
            # (it would load on this node only, and fail on the others as if at random)
            external = await asyncio.to_thread(external_data_files, str(path))
            if external:
                raise ModelLoadError(
                    f"model file {path} keeps its weights in other files ({', '.join(external)}); save it as one "
                    f"file to use it on every node: onnx.save(onnx.load(p), p, save_as_external_data=False)",
                    path=str(path))
            sha = self._model_hashes[key] = await asyncio.to_thread(file_sha256, path)
        self.machine.blobs[sha] = str(path)
        return {"sha256": sha, "suffix": path.suffix or ".onnx", "node": ray.get_runtime_context().get_node_id()}

    # --- data plane: bytes out ---------------------------------------------------------------
    async def read_output(self, job_id: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes (at most transfer_part_bytes) of a succeeded job's committed output."""
        st = self.store.get(job_id)
        if st.state != JobState.succeeded or not st.output:
            raise JobNotReady(f"job {job_id} is {st.state.value}: its output can be read once it has succeeded",
                              job_id=job_id)
        length = max(0, min(int(length), self.s.transfer_part_bytes))

        def read() -> bytes:
            with open(st.output, "rb") as f:
                f.seek(max(0, int(offset)))
                return f.read(length)
        try:
            return await asyncio.to_thread(read)
        except FileNotFoundError as e:
            raise self._expired(job_id, "output file", st.output) from e
        except OSError as e:
            raise LipsyncError(f"job {job_id}: its output file cannot be read: {e.strerror or type(e).__name__}",
                               code="output.unreadable",
                               job_id=job_id, path=st.output, cause=repr(e)) from e


    # --- progressive output: the job's HLS stream -------------------------------------------------
    def _plan(self, job_id: str):
        from cluster.render import JobPlan

        job = self.machine.jobs.get(job_id)
        if job is not None and job.plan is not None:
            return job.plan
        raw = self.store.plan(job_id)
        return JobPlan.model_validate(raw) if raw else None

    async def hls_index(self, job_id: str) -> HlsIndex:
        """What the job's playlist lists now (cluster.hls); unknown jobs raise `job.not_found`."""
        from cluster.hls import hls_index

        st = self.store.get(job_id)  # the state first: a playlist that has ended never grows
        plan = self._plan(job_id)
        self._check_stream_kept(st, plan)  # not an empty playlist that has ended
        return await asyncio.to_thread(hls_index, job_id, plan, st.state, self.s)

    def _check_stream_kept(self, st: JobStatus, plan) -> None:
        """`output.expired` for an ended job whose stream (its directory) was removed (retention, a purge): a
        cancelled or failed one answered an empty playlist that had ended."""
        from cluster.render import job_dir

        directory = plan.job_dir if plan is not None else str(job_dir(st.id, self.s))  # (none: ended before its plan)
        if st.state.terminal and not os.path.isdir(directory):
            raise self._expired(st.id, "stream", directory, st.state)

    def _expired(self, job_id: str, what: str, path: str, state: JobState = JobState.succeeded) -> OutputExpired:
        """`output.expired` (410) of an ended job whose `what` is gone (its message reaches API clients: the
        server's `path` stays in the error's path, for the operator's log)."""
        days = self.s.retention_days
        return OutputExpired(f"job {job_id} {state.value}, and its {what} no longer exists"
                             + (f" (retention removes a job's files after {days:g} days, LIPSYNC_RETENTION_DAYS)"
                                if days > 0 else " (it was removed)") + "; submit the job again for a new one",
                             job_id=job_id, path=path)

    async def wait_hls(self, job_id: str, known: int, timeout: float) -> None:
        """A long poll for a job's segments: returns once it has published more than `known` HLS
        segments or has ended, or after `timeout` seconds (at most `MAX_WAIT_S`). Unknown jobs raise."""
        self.store.get(job_id)
        await self.machine.wait_published(job_id, int(known), min(max(timeout, 0.0), MAX_WAIT_S))

    async def read_hls(self, job_id: str, name: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes (at most transfer_part_bytes) of a published HLS file of the job."""
        from cluster.hls import read_published

        st = self.store.get(job_id)
        plan = self._plan(job_id)
        if plan is None:
            why = (f"it ended {st.state.value} before it was planned" if st.state.terminal
                   else "yet: it is being prepared")
            raise HlsNotPublished(f"job {job_id} has no published HLS file {name} ({why})", job_id=job_id)
        self._check_stream_kept(st, plan)
        length = max(0, min(int(length), self.s.transfer_part_bytes))
        return await asyncio.to_thread(read_published, plan, name, int(offset), length)


def head_node_id() -> str:
    """The id of the cluster's head node (where the storage root lives), else this process's node."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


def storage_node_placement(settings: Settings) -> dict:
    """Actor options that place an actor on the storage root's node: the custom resource
    `LIPSYNC_MANAGER_RESOURCE` (e.g. lipsync_head on KubeRay's head pod, where the storage claim
    is) when set, else the head node (hard affinity)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if settings.manager_resource:
        if settings.manager_resource not in ray.cluster_resources():
            raise PlacementError(f"the job manager needs the custom resource {settings.manager_resource!r} "
                                 f"(LIPSYNC_MANAGER_RESOURCE), which no node of the cluster offers")
        return {"resources": {settings.manager_resource: 0.01}}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(head_node_id(), soft=False)}


def create_job_manager(settings: Settings, owner: str | None = None):
    """Get or create the named, detached job manager on the head node, where the storage root
    lives (it needs no CPU, so a head that keeps its CPUs from actors still takes it; a soft
    affinity let Ray place it on a worker node, whose disk then held the jobs)."""
    opts = dict(name=ORCHESTRATOR_NAME, namespace=settings.namespace, lifetime="detached", get_if_exists=True,
                **storage_node_placement(settings))
    return JobManager.options(**opts).remote(settings, owner)
