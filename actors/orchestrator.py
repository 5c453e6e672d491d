"""The job manager: one named, detached, async actor that owns the job table and schedules work.

It moves object refs only, never frame data: compositors send crop batches as refs to
`dispatch`, which hands them to the least-loaded live model worker (a bounded number in flight
per worker) and returns the ref of the generated crops. State lives in SQLite under the storage
root, so a restarted manager resumes unfinished jobs from their completed segments.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from actors import ORCHESTRATOR_NAME, task_cause
from actors.compositor import Compositor
from actors.model_worker import ModelWorker
from cluster.config import Settings
from cluster.errors import (ChunkFailed, InputError, InputsGone, JobCancelled, LipsyncError, ModelContractError,
                            ModelError, ModelLoadError, RenderError, RenderTimeout, WorkerLost)
from cluster.jobstore import JobStore
from cluster.render import JobPlan, check_plan_files, commit_output, discard_output
from cluster.scheduling import FairQueue, Health, Member, WorkerTable
from cluster.schemas import Chunk, ErrorInfo, JobState, JobStatus, RenderRequest

log = logging.getLogger("lipsync.orchestrator")

NOT_RETRYABLE = (InputError, InputsGone, ModelLoadError, ModelContractError, JobCancelled)


class StaleAttempt(JobCancelled):
    code = "render.stale_attempt"


@dataclass
class JobRuntime:
    """In-memory state of a job this manager is running (rebuilt from SQLite after a restart)."""
    id: str
    plan: JobPlan | None = None
    stage: str = "prepare"
    done: dict[int, int] = field(default_factory=dict)          # chunk -> frames (segment written)
    inflight_frames: dict[int, int] = field(default_factory=dict)  # chunk -> frames generated so far
    attempts: dict[int, int] = field(default_factory=dict)      # chunk -> failed attempts
    losses: dict[int, int] = field(default_factory=dict)        # chunk -> attempts lost with a process
    tokens: dict[int, str] = field(default_factory=dict)        # chunk -> token of the live attempt
    finished: bool = False
    committing: bool = False  # past the point of no return: the verified output is being renamed
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    reported: int = 0
    capacity_seen: float = field(default_factory=time.monotonic)  # last time workers were there


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)
class JobManager:
    def __init__(self, settings: Settings) -> None:
        logging.basicConfig(level=logging.INFO)
        self.s = settings
        self.store = JobStore(settings.db_path)
        self.models = WorkerTable(settings.max_inflight_per_worker)
        self._sizes: dict[str, int] = {}
        self.compositors = WorkerTable(max_inflight=1)
        self.queue: FairQueue[Chunk] = FairQueue()
        self.jobs: dict[str, JobRuntime] = {}
        self._work = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._booted = asyncio.Event()
        self._boot_error: str | None = None
        self._factories: dict[str, functools.partial] = {}
        self._spawn(self._boot())

    # --- plumbing --------------------------------------------------------------------------
    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("background task failed: %r", t.exception(), exc_info=t.exception())

    def _resources(self) -> tuple[float, float]:
        res = ray.cluster_resources()
        return float(res.get("CPU", 1)), float(res.get("GPU", 0))

    def _create_worker(self, name: str, gpus: float):
        opts = dict(name=name, namespace=self.s.namespace, lifetime="detached", get_if_exists=True, num_cpus=1)
        if gpus:
            opts["num_gpus"] = self.s.worker_gpus
        return ModelWorker.options(**opts).remote(self.s.model, self.s, name)

    def _create_compositor(self, name: str):
        return Compositor.options(name=name, namespace=self.s.namespace, lifetime="detached",
                                  get_if_exists=True, num_cpus=1).remote(self.s, name)

    async def _boot(self) -> None:
        """Create (or re-attach to) the detached workers, resume unfinished jobs, start scheduling."""
        try:
            cpus, gpus = self._resources()
            n_workers = self.s.model_workers or (max(1, int(gpus // self.s.worker_gpus)) if gpus else 1)
            n_comp = self.s.compositors or max(1, min(int(cpus) - n_workers, 8))
            members = [(self.models, f"lipsync-model-worker-{i}", functools.partial(
                self._create_worker, f"lipsync-model-worker-{i}", gpus), self.s.model_load_timeout_s)
                for i in range(n_workers)]
            members += [(self.compositors, f"lipsync-compositor-{i}", functools.partial(
                self._create_compositor, f"lipsync-compositor-{i}"), self.s.actor_call_timeout_s)
                for i in range(n_comp)]
            for table, name, factory, timeout in members:
                self._factories[name] = factory
                self._spawn(self._probe(table, table.add(name, factory()), timeout))
        except Exception as e:
            self._boot_error = f"cannot start the workers: {e!r}"
            log.exception("job manager boot failed")
        self._spawn(self._scheduler())
        for job_id in self.store.unfinished_ids():
            log.info("resuming job %s", job_id)
            self._start_job(job_id)
        self._booted.set()

    def _alive(self, name: str) -> bool:
        """Whether a named actor still exists (alive or restarting); a dead one has lost its name."""
        try:
            ray.get_actor(name, namespace=self.s.namespace)
            return True
        except ValueError:
            return False

    async def _replace(self, m: Member, why: str, kill: bool = False) -> None:
        """Create a member anew under its name (dead for good, or built with other settings)."""
        log.warning("replacing %s: %s", m.name, why)
        if kill:
            ray.kill(m.handle, no_restart=True)
            for _ in range(100):
                if not self._alive(m.name):
                    break
                await asyncio.sleep(0.1)
        m.handle = self._factories[m.name]()
        m.error = why

    async def _probe(self, table: WorkerTable, m: Member, first_timeout: float) -> None:
        """Ask a member for `info` until it answers live. A member that stays silent past the
        deadline is killed (Ray restarts it); one dead for good, or built with other settings, is
        replaced; one whose model cannot load is `failed`, and its load is retried now and then."""
        deadline = time.monotonic() + first_timeout
        while True:
            try:
                info = await asyncio.wait_for(m.handle.info.remote(),
                                              timeout=min(10.0, max(1.0, deadline - time.monotonic())))
            except (RayError, asyncio.TimeoutError) as e:
                if isinstance(e, RayActorError) and not self._alive(m.name):
                    await self._replace(m, f"died for good: {e}")
                    deadline = time.monotonic() + first_timeout
                elif time.monotonic() > deadline:
                    log.error("%s gave no answer within %.0f s (%r): killing it for a restart", m.name,
                              first_timeout, e)
                    try:
                        ray.kill(m.handle, no_restart=False)
                    except Exception as kill_error:
                        log.warning("kill %s: %r", m.name, kill_error)
                    deadline = time.monotonic() + first_timeout
                await asyncio.sleep(0.5)
                continue
            if info.get("settings") != self.s.fingerprint():
                await self._replace(m, "it was built with other settings", kill=True)
                deadline = time.monotonic() + first_timeout
                continue
            if info.get("ready", True):
                await table.set_health(m, Health.live, info=info)
                log.info("%s live: %s", m.name, info)
                self._work.set()
                return
            await table.set_health(m, Health.failed, info=info, error=info.get("error"))
            self._work.set()
            await asyncio.sleep(self.s.model_retry_s)  # then try the load again: it may have been transient
            try:
                await asyncio.wait_for(m.handle.describe.remote(self.s.model), timeout=self.s.model_load_timeout_s)
            except (RayError, asyncio.TimeoutError) as e:
                log.warning("%s still cannot load %s: %s", m.name, self.s.model, e)
            deadline = time.monotonic() + first_timeout

    async def _lost(self, table: WorkerTable, m: Member, why: str, kill: bool = False) -> None:
        """Take a member out of rotation (killing it first where it is stuck) and probe it back."""
        if kill:
            try:
                ray.kill(m.handle, no_restart=False)
            except Exception as e:  # already gone: Ray restarts it, or the probe replaces it
                log.warning("kill %s: %r", m.name, e)
        if m.health == Health.lost:
            return
        log.warning("%s lost (%s)%s", m.name, why, "; killed it for a restart" if kill else "")
        await table.set_health(m, Health.lost)
        timeout = self.s.model_load_timeout_s if table is self.models else self.s.actor_call_timeout_s
        self._spawn(self._probe(table, m, timeout))

    # --- public API --------------------------------------------------------------------------
    async def ready(self, timeout: float = 60.0) -> dict:
        """Wait (bounded) until every model worker and compositor has answered once; their state."""
        await asyncio.wait_for(self._booted.wait(), timeout)
        deadline = time.monotonic() + timeout
        tables = (self.models, self.compositors)
        while time.monotonic() < deadline:  # every member answered once (live, or failed to load)
            if all(m.health != Health.starting for t in tables for m in t.members.values()):
                break
            await asyncio.sleep(0.2)
        return self.workers()

    def workers(self) -> dict:
        return {"models": self.models.snapshot(), "compositors": self.compositors.snapshot()}

    async def refresh(self, timeout: float = 10.0) -> dict:
        """Ask every live member for fresh `info` (pid, node, frames served), then `workers()`."""
        async def one(table: WorkerTable, m: Member) -> None:
            try:
                m.info = await asyncio.wait_for(m.handle.info.remote(), timeout)
            except (RayError, asyncio.TimeoutError) as e:  # reported, not acted on: probes do that
                m.info = {**m.info, "stale": f"no answer to info: {type(e).__name__}"}
        tables = [self.models, self.compositors]
        await asyncio.gather(*(one(t, m) for t in tables for m in t.live()))
        return self.workers()

    async def submit(self, job_id: str, request: RenderRequest) -> JobStatus:
        """Accept an admitted request (inputs already stored under the storage root). Idempotent."""
        await asyncio.wait_for(self._booted.wait(), self.s.actor_call_timeout_s)
        if self._boot_error:
            raise RenderError(f"the job manager cannot run jobs: {self._boot_error}", stage="admit")
        status, created = self.store.create(job_id, request)
        if created:
            log.info("job %s accepted", job_id)
            self._start_job(job_id)
        return self.get(job_id)

    def get(self, job_id: str) -> JobStatus:
        st = self.store.get(job_id)
        rt = self.jobs.get(job_id)
        if rt is not None and not st.state.terminal:
            live = sum(rt.done.values()) + sum(rt.inflight_frames.values())
            rt.reported = min(st.frames_total, max(rt.reported, live, st.frames_done))
            st.frames_done = rt.reported
        return st

    def list_jobs(self, states: list[JobState] | None = None, limit: int = 100, offset: int = 0) -> list[JobStatus]:
        return [self.get(j.id) for j in self.store.list(states, limit, offset)]

    async def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job; one already committing its verified output finishes as succeeded."""
        rt = self.jobs.get(job_id)
        if rt is not None and rt.committing:
            await asyncio.wait_for(rt.all_done.wait(), self.s.actor_call_timeout_s)
        st = self.store.get(job_id)
        if not st.state.terminal:
            self._finish(job_id, JobState.cancelled,
                         ErrorInfo(code=JobCancelled.code, message=f"job {job_id} was cancelled", stage="cancel"))
        return self.get(job_id)

    async def dispatch(self, job_id: str, chunk_index: int, token: str, model: str, refs: list) -> list:
        """Run one batch (refs: [mel, crops]) on the least-loaded live worker; returns [ref of output].

        Worker death or a stall (no answer within batch_timeout_s per batch queued ahead on that
        worker) re-dispatches the same refs to another worker, up to max_batch_attempts; a model
        exception is raised to the caller.
        """
        rt = self.jobs.get(job_id)
        if rt is None or rt.finished or rt.tokens.get(chunk_index) != token:
            raise StaleAttempt(f"job {job_id} chunk {chunk_index}: this attempt is no longer wanted",
                               job_id=job_id, chunk=chunk_index)
        pool = self.models
        mel_ref, crops_ref = refs
        last = "no attempt"
        for attempt in range(self.s.max_batch_attempts):
            m = await pool.acquire(timeout=self.s.stall_timeout_s)
            if m is None:
                if pool.all_failed():
                    raise self._load_error()
                raise WorkerLost(f"no live model worker for {model!r} within {self.s.stall_timeout_s:.0f} s "
                                 f"(last problem: {last})", job_id=job_id, chunk=chunk_index, stage="render")
            ok = False
            try:
                if model not in m.info.get("models", ()):  # load it under the load deadline, not a batch's
                    step = f"loading {model!r}"
                    await asyncio.wait_for(m.handle.describe.remote(model), timeout=self.s.model_load_timeout_s)
                    m.info = {**m.info, "models": [*m.info.get("models", ()), model]}
                step = "a batch"
                queued = max(1, m.inflight)  # batches ahead of this one on that worker, this one included
                meta_ref, out_ref = m.handle.infer.options(name=f"infer job={job_id} chunk={chunk_index}").remote(
                    model, mel_ref, crops_ref)
                meta = await asyncio.wait_for(meta_ref, timeout=self.s.batch_timeout_s * queued)
                ok = True
            except asyncio.TimeoutError:
                last = f"{m.name} gave no answer to {step} in time"
                await self._lost(pool, m, last, kill=True)
                continue
            except RayActorError as e:
                last = f"{m.name} died during {step}: {type(e).__name__}"
                await self._lost(pool, m, last)
                continue
            except RayTaskError as e:
                cause = task_cause(e)
                if isinstance(cause, LipsyncError):
                    raise cause.with_context(job_id=job_id, chunk=chunk_index, stage="render")
                raise ModelError(f"model worker {m.name} failed on job {job_id} chunk {chunk_index}: {cause}",
                                 cause=str(cause)[:4000], job_id=job_id, chunk=chunk_index, stage="render")
            except RayError as e:  # the batch's inputs are gone (their owner died): redo the chunk
                raise WorkerLost(f"job {job_id} chunk {chunk_index}: batch inputs lost: {type(e).__name__}",
                                 cause=str(e)[:2000], job_id=job_id, chunk=chunk_index, stage="render")
            finally:
                await pool.release(m, ok=ok)
            rt.inflight_frames[chunk_index] = rt.inflight_frames.get(chunk_index, 0) + int(meta["frames"])
            return [out_ref]
        raise WorkerLost(f"job {job_id} chunk {chunk_index}: batch lost {self.s.max_batch_attempts} times "
                         f"(last: {last})", job_id=job_id, chunk=chunk_index, stage="render")

    # --- jobs --------------------------------------------------------------------------------
    def _load_error(self) -> ModelLoadError:
        err = next((m.error for m in self.models.members.values() if isinstance(m.error, dict)), None) or {}
        return ModelLoadError(f"no model worker can serve: the default model {self.s.model!r} cannot be "
                              f"loaded: {err.get('message')}", stage="prepare", cause=err.get("cause"),
                              path=err.get("path"))

    def _start_job(self, job_id: str) -> None:
        if job_id in self.jobs and not self.jobs[job_id].finished:
            return
        self.jobs[job_id] = JobRuntime(job_id)
        self._spawn(self._run_job(job_id))

    def _finish(self, job_id: str, state: JobState, error: ErrorInfo | None = None, output: str | None = None) -> None:
        """Persist a terminal state (first one wins), then stop the job's work."""
        st = self.store.get(job_id)
        if not st.state.terminal:
            self.store.transition(job_id, state, error=error, output=output)
            log.info("job %s %s%s", job_id, state.value, f": {error.code}: {error.message}" if error else "")
        rt = self.jobs.get(job_id)
        if rt is not None:
            rt.finished = True
            rt.all_done.set()
            if state != JobState.succeeded and rt.plan is not None:
                discard_output(rt.plan)
        self.queue.drop(job_id)

    def _fail(self, job_id: str, err: LipsyncError) -> None:
        rt = self.jobs.get(job_id)
        err.with_context(job_id=job_id, stage=rt.stage if rt else None)
        self._finish(job_id, JobState.failed, err.to_info())

    async def _run_job(self, job_id: str) -> None:
        rt = self.jobs[job_id]
        try:
            await asyncio.wait_for(self._drive(rt), timeout=self.s.job_timeout_s)
        except asyncio.TimeoutError:
            self._fail(job_id, RenderTimeout(f"job {job_id} did not finish within {self.s.job_timeout_s:.0f} s"))
        except LipsyncError as e:
            self._fail(job_id, e)
        except Exception as e:
            log.exception("job %s: internal error", job_id)
            self._fail(job_id, RenderError(f"job {job_id}: internal error in {rt.stage}: {e!r}", cause=repr(e)))

    async def _drive(self, rt: JobRuntime) -> None:
        st = self.store.get(rt.id)
        request = st.request
        model = request.model or self.s.model
        if st.state == JobState.queued:
            self.store.transition(rt.id, JobState.preparing)
            st = self.store.get(rt.id)
        if st.state == JobState.preparing or self.store.plan(rt.id) is None:
            rt.stage = "prepare"
            size = await self._model_size(model)
            rt.plan = await self._on_compositor("prepare", rt, rt.id, request, size)
            self.store.set_plan(rt.id, rt.plan.model_dump(mode="json"), rt.plan.frames_total, len(rt.plan.chunks))
            if rt.finished:
                return
            if st.state == JobState.preparing:
                self.store.transition(rt.id, JobState.rendering)
        else:
            rt.stage = "render" if st.state == JobState.rendering else "finalize"
            rt.plan = JobPlan.model_validate(self.store.plan(rt.id))
            await asyncio.to_thread(check_plan_files, rt.plan)  # resumed: gone inputs fail precisely
        st = self.store.get(rt.id)
        if st.state == JobState.rendering:
            rt.stage = "render"
            recorded = self.store.done_chunks(rt.id)
            for chunk in rt.plan.chunks:
                seg = recorded.get(chunk.index)
                if seg is not None and Path(seg).exists():
                    rt.done[chunk.index] = chunk.frames
                else:
                    if seg is not None:
                        self.store.forget_chunk(rt.id, chunk.index)
                    self.queue.push(rt.id, chunk)
            if len(rt.done) == len(rt.plan.chunks):
                rt.all_done.set()
            self._work.set()
            await self._watch(rt)
            if rt.finished:
                return
            self.store.transition(rt.id, JobState.finalizing)
        rt.stage = "finalize"
        await self._on_compositor("finalize", rt, rt.plan)
        if rt.finished:  # cancelled or failed meanwhile: the verified output is not published
            await asyncio.to_thread(discard_output, rt.plan)
            return
        rt.committing = True
        await asyncio.to_thread(commit_output, rt.plan, self.s)
        self._finish(rt.id, JobState.succeeded, output=rt.plan.output_path)

    async def _watch(self, rt: JobRuntime) -> None:
        """Wait for every chunk; fail the job when the cluster has had no live compositor or no live
        model worker for stall_timeout_s (each chunk is bounded by chunk_timeout_s on its own)."""
        while not rt.all_done.is_set():
            try:
                await asyncio.wait_for(rt.all_done.wait(), timeout=min(5.0, self.s.stall_timeout_s))
                return
            except asyncio.TimeoutError:
                pass
            if self.models.live() and self.compositors.live():
                rt.capacity_seen = time.monotonic()
            elif time.monotonic() - rt.capacity_seen > self.s.stall_timeout_s:
                raise WorkerLost(
                    f"job {rt.id}: no live {'model worker' if not self.models.live() else 'compositor'} for "
                    f"{self.s.stall_timeout_s:.0f} s; model workers {self.models.snapshot()}, "
                    f"compositors {self.compositors.snapshot()}", job_id=rt.id, stage="render")

    async def _model_size(self, model: str) -> int:
        """The crop size S of `model`, asked of a live worker (which loads the model if needed)."""
        if model in self._sizes:
            return self._sizes[model]
        deadline = time.monotonic() + self.s.model_load_timeout_s
        while time.monotonic() < deadline:
            if self.models.all_failed():
                raise self._load_error()
            live = self.models.live()
            if not live:
                await asyncio.sleep(0.2)
                continue
            m = min(live, key=lambda x: x.inflight)
            try:
                desc = await asyncio.wait_for(m.handle.describe.remote(model),
                                              timeout=max(1.0, deadline - time.monotonic()))
            except RayTaskError as e:
                cause = task_cause(e)
                if isinstance(cause, LipsyncError):
                    raise cause
                raise ModelLoadError(f"cannot load model {model!r}: {cause}", cause=str(cause)[:4000], path=model)
            except (RayError, asyncio.TimeoutError) as e:
                await self._lost(self.models, m, f"no answer to describe({model!r}): {type(e).__name__}",
                                 kill=isinstance(e, asyncio.TimeoutError))
                continue
            m.info = {**m.info, "models": [*m.info.get("models", ()), model]}
            self._sizes[model] = int(desc["size"])
            return self._sizes[model]
        raise RenderTimeout(f"model {model!r} was not ready on any worker within {self.s.model_load_timeout_s:.0f} s")

    async def _on_compositor(self, method: str, rt: JobRuntime, *args):
        """Run a job-level step on some compositor; a lost compositor means another one runs it."""
        last = "none"
        for attempt in range(self.s.max_chunk_attempts + 1):
            m = await self.compositors.acquire(timeout=self.s.stall_timeout_s)
            if m is None:
                raise WorkerLost(f"no live compositor within {self.s.stall_timeout_s:.0f} s for {method} "
                                 f"(last problem: {last})", cause=last)
            ref = getattr(m.handle, method).options(name=f"{method} job={rt.id}").remote(*args)
            try:
                return await asyncio.wait_for(ref, timeout=self.s.chunk_timeout_s)
            except RayActorError as e:
                last = f"{m.name} died during {method}: {type(e).__name__}: {e}"[:2000]
                await self._lost(self.compositors, m, last)
            except asyncio.TimeoutError:
                last = f"{m.name}: {method} took over {self.s.chunk_timeout_s:.0f} s"
                await self._lost(self.compositors, m, last, kill=True)
            except RayTaskError as e:
                cause = task_cause(e)
                if isinstance(cause, LipsyncError):
                    raise cause
                raise RenderError(f"{method} failed: {cause}", cause=str(cause)[:4000])
            finally:
                await self.compositors.release(m)
        raise WorkerLost(f"{method} of job {rt.id}: compositor lost {self.s.max_chunk_attempts + 1} times; "
                         f"last: {last}", cause=last)

    # --- chunks ------------------------------------------------------------------------------
    async def _scheduler(self) -> None:
        """Hand queued chunks, round-robin across jobs, to free compositors. Never dies."""
        while True:
            try:
                await self._schedule_once()
            except Exception:
                log.exception("scheduler step failed; going on")
                await asyncio.sleep(1.0)

    async def _schedule_once(self) -> None:
        if not len(self.queue):
            self._work.clear()
            try:
                await asyncio.wait_for(self._work.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            return
        m = await self.compositors.acquire(timeout=1.0)
        if m is None:
            return
        item = self.queue.pop()
        if item is None:
            await self.compositors.release(m)
            return
        job_id, chunk = item
        self._spawn(self._run_chunk(job_id, chunk, m))

    async def _run_chunk(self, job_id: str, chunk: Chunk, m: Member) -> None:
        rt = self.jobs.get(job_id)
        ok = False
        try:
            if rt is None or rt.finished:
                return
            token = rt.tokens[chunk.index] = uuid.uuid4().hex[:12]
            rt.inflight_frames[chunk.index] = 0
            ref = m.handle.render_chunk.options(name=f"render job={job_id} chunk={chunk.index}").remote(
                rt.plan, chunk, token)
            try:
                res = await asyncio.wait_for(ref, timeout=self.s.chunk_timeout_s)
            except RayActorError as e:
                await self._lost(self.compositors, m, f"died rendering job {job_id} chunk {chunk.index}")
                self._retry(rt, chunk, WorkerLost(f"compositor {m.name} died: {type(e).__name__}",
                                                  cause=str(e)[:2000]), lost=True)
                return
            except asyncio.TimeoutError:
                await self._lost(self.compositors, m, f"chunk {chunk.index} took over {self.s.chunk_timeout_s:.0f} s",
                                 kill=True)
                self._retry(rt, chunk, RenderTimeout(f"chunk {chunk.index} took over {self.s.chunk_timeout_s:.0f} s"))
                return
            except RayTaskError as e:
                cause = task_cause(e)
                if not isinstance(cause, LipsyncError):
                    cause = ChunkFailed(f"chunk {chunk.index} of job {job_id} failed: {cause}", cause=str(cause)[:4000])
                self._retry(rt, chunk, cause, lost=isinstance(cause, WorkerLost))
                return
            except RayError as e:  # e.g. the result was lost with its node: render the chunk again
                self._retry(rt, chunk, WorkerLost(f"chunk {chunk.index} result lost: {type(e).__name__}",
                                                  cause=str(e)[:2000]), lost=True)
                return
            ok = True
            if rt.finished:
                return
            self.store.chunk_done(job_id, chunk.index, res.frames, res.segment)
            rt.done[chunk.index] = res.frames
            rt.inflight_frames.pop(chunk.index, None)
            if len(rt.done) == len(rt.plan.chunks):
                rt.all_done.set()
        except Exception as e:
            log.exception("chunk %s of job %s: internal error", chunk.index, job_id)
            if rt is not None and not rt.finished:
                self._fail(job_id, RenderError(f"internal error on chunk {chunk.index}: {e!r}", chunk=chunk.index))
        finally:
            await self.compositors.release(m, ok=ok)
            self._work.set()

    def _retry(self, rt: JobRuntime, chunk: Chunk, err: LipsyncError, lost: bool = False) -> None:
        """Queue a failed chunk again, or fail the job when it failed too often or cannot succeed."""
        if rt.finished or isinstance(err, StaleAttempt):
            return
        rt.inflight_frames.pop(chunk.index, None)
        err.with_context(job_id=rt.id, chunk=chunk.index, stage="render")
        if isinstance(err, NOT_RETRYABLE):
            self._fail(rt.id, err)
            return
        book = rt.losses if lost else rt.attempts
        book[chunk.index] = book.get(chunk.index, 0) + 1
        limit = self.s.max_chunk_attempts * (3 if lost else 1)
        log.warning("job %s chunk %d attempt failed (%d/%d): %s: %s", rt.id, chunk.index, book[chunk.index],
                    limit, err.code, err)
        if book[chunk.index] >= limit:
            self._fail(rt.id, ChunkFailed(
                f"chunk {chunk.index} of job {rt.id} failed {book[chunk.index]} times; last error "
                f"{err.code}: {err.message}", job_id=rt.id, chunk=chunk.index, stage="render",
                cause=err.cause or err.message))
            return
        self.queue.push(rt.id, chunk, front=True)
        self._work.set()


def create_job_manager(settings: Settings):
    """Get or create the named, detached job manager, preferring this (the head) node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return JobManager.options(
        name=ORCHESTRATOR_NAME, namespace=settings.namespace, lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
    ).remote(settings)
