"""The job state machine: queued -> preparing -> rendering -> finalizing -> succeeded, or failed /
cancelled from any non-terminal state. Every move is written to the job store before it is
reported; a restarted job manager rebuilds `JobRuntime`s from the store and resumes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from actors import metrics
from actors.supervision import Supervisor, TaskSet
from cluster import logs
from cluster.config import Settings
from cluster.errors import (
    ChunkFailed,
    JobCancelled,
    JobRunElsewhere,
    LipsyncError,
    RenderError,
    RenderTimeout,
    WorkerLost,
)
from cluster.fsutil import write_atomic
from cluster.hls import HlsPublisher
from cluster.jobstore import JobStore
from cluster.owners import identity_alive
from cluster.render import (
    BLOB_FIELDS,
    ChunkResult,
    JobPlan,
    check_plan_files,
    commit_output,
    discard_output,
    discard_segments,
    output_path_for,
    plan_for_chunk,
    prepare_deadline,
    with_blobs,
    with_planned_model,
)
from cluster.resources import RESERVATIONS, as_typed
from cluster.schemas import Chunk, ErrorInfo, JobState, JobStatus

if TYPE_CHECKING:
    from actors.dispatch import Dispatcher

log = logging.getLogger("lipsync.jobs")


async def started_in_thread(start, close):
    """`await asyncio.to_thread(start)`, whose result is closed (`close()`) when this wait is cancelled
    (a job's deadline, its cancel) before `start` returns: the thread runs on and would leave what it
    started (a publisher's threads and audio track) running with nobody holding it."""
    started = asyncio.ensure_future(asyncio.to_thread(start))

    def after(done: asyncio.Future) -> None:
        if done.cancelled():
            return
        if (e := done.exception()) is not None:
            log.warning("%s failed after its wait was cancelled: %r", getattr(start, "__qualname__", start), e)
            return
        close()

    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(after)
        raise


class StaleAttempt(JobCancelled):
    """A chunk attempt the job no longer wants (the job ended, or the chunk was handed out again)."""
    code = "render.stale_attempt"


#: `JobRuntime.step_on` of a step that runs in the job manager's own process (`Dispatcher._run_here`)
STEP_HERE = "the job manager"


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
    # chunk -> (batches of it at the model now, when it last sent or got one): a compositor that asks for
    # nothing while none of its batches is out is frozen (`Dispatcher._await_chunk`)
    activity: dict[int, list] = field(default_factory=dict)
    hls: HlsPublisher | None = None  # the job's AAC and HLS segments, published as chunks are verified
    first_plan: JobPlan | None = None  # the first chunk's plan (the mel head) while the whole mel is written
    first_sent: asyncio.Event = field(default_factory=asyncio.Event)  # the first chunk went to a compositor
    published: asyncio.Event = field(default_factory=asyncio.Event)  # replaced once set: a segment was published
    finished: bool = False
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # commit + `succeeded`, or cancel: never both
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # a terminal state is stored (`finish`)
    reported: int = 0
    capacity_seen: float = field(default_factory=time.monotonic)  # last time workers were there
    step_on: object = None  # the compositor (a Member) running its job-level step now, STEP_HERE, or None

    def plan_for(self, chunk: Chunk) -> JobPlan:
        """The plan `chunk` renders with (`cluster.render.plan_for_chunk`), listing that chunk only:
        what each render call carries does not grow with the job's length (an hour's whole plan
        lists 1800 chunks, 90 KB pickled, sent with every chunk)."""
        plan = self.first_plan if chunk.index == 0 and self.first_plan is not None else self.plan
        return plan.model_copy(update={"chunks": [chunk]})


class JobMachine:
    def __init__(self, settings: Settings, store: JobStore, pool: Supervisor, dispatcher: Dispatcher,
                 tasks: TaskSet, owner: str) -> None:
        self.s = settings
        self.owner = owner  # the deployment this manager is (`JobManager.owner`): it runs that owner's jobs
        self.store = store
        self.pool = pool
        self.dispatcher = dispatcher
        self.tasks = tasks
        self.jobs: dict[str, JobRuntime] = {}
        self.blobs: dict[str, str] = {}  # sha256 -> path of a prepared file nodes may fetch (read_blob)
        self._blob_users: dict[str, set[str]] = {}  # sha256 of a job's prepared file -> the running jobs with it
        self._job_blobs: dict[str, set[str]] = {}  # a running job -> the sha256 of the files it registered

    def _register(self, plan: JobPlan) -> None:
        if plan.job_id not in self.jobs:  # it ended meanwhile (cancelled while it prepared): nothing to serve
            return
        for role, sha in plan.blobs.items():
            self.blobs[sha] = getattr(plan, BLOB_FIELDS[role])
            self._blob_users.setdefault(sha, set()).add(plan.job_id)
            self._job_blobs.setdefault(plan.job_id, set()).add(sha)

    def _unregister(self, job_id: str) -> None:
        """Its prepared files are no longer served once no running job has them (a manager's lifetime
        of jobs kept every entry)."""
        for sha in self._job_blobs.pop(job_id, ()):
            users = self._blob_users.get(sha, set())
            users.discard(job_id)
            if not users:
                self._blob_users.pop(sha, None)
                self.blobs.pop(sha, None)

    # --- reading -----------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        st = self.store.get(job_id)
        job = self.jobs.get(job_id)
        if job is not None and not st.state.terminal:
            live = sum(job.done.values()) + sum(job.inflight_frames.values())
            job.reported = min(st.frames_total, max(job.reported, live, st.frames_done))
            st.frames_done = job.reported
            if st.state == JobState.rendering and not job.done and not job.inflight_frames:
                st.jobs_ahead = self.dispatcher.queue.position(job_id)  # waiting for its first compositor
            if st.state == JobState.rendering:
                st.waiting_for = self._lacking(job)
        return st

    def _lacking(self, job: JobRuntime) -> str | None:
        """What a rendering job waits for while the pool has no live model worker or compositor (a node lost, a
        worker restarting): said in its view (it read `rendering` for the whole wait, a probe), None otherwise."""
        models, compositors = self.pool.models, self.pool.compositors
        if models.live() and compositors.live():
            return None
        kind, table = ("model worker", models) if not models.live() else ("compositor", compositors)
        # since the last one went (the job's own sight of capacity lags by up to its watch's 5 s); as times of
        # day, so that the words stay the same while it waits (an event stream sends them once)
        last_lost = max((m.lost_at for m in table.members.values()), default=0.0)
        since, fails_at = max(job.capacity_seen, last_lost), job.capacity_seen + self.s.stall_timeout_s

        def clock(at: float) -> str:
            return time.strftime("%H:%M:%S UTC", time.gmtime(time.time() - (time.monotonic() - at)))

        return (f"no live {kind} since {clock(since)} ({table.summary()}); the job fails if none is back by about "
                f"{clock(fails_at)} (LIPSYNC_STALL_TIMEOUT_S, {self.s.stall_timeout_s:g} s)")

    @staticmethod
    def _published(job: JobRuntime) -> None:
        """Wake whoever waits for the job's next segment (`wait_published`)."""
        event, job.published = job.published, asyncio.Event()
        event.set()

    async def wait_published(self, job_id: str, known: int, timeout: float) -> None:
        """Return once the job has published more than `known` HLS segments or has ended, or after
        `timeout` seconds (a job not running here is looked at again every 0.25 s, as `wait_end`)."""
        job = self.jobs.get(job_id)
        if job is None or job.finished:
            await asyncio.sleep(min(0.25, timeout))
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while not job.finished and (job.hls is None or job.hls.published_segments <= known):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(job.published.wait(), left)
            except asyncio.TimeoutError:
                return

    async def wait_end(self, job_id: str, timeout: float) -> None:
        """Return once `job_id` has ended here, or after `timeout` seconds, whichever is first (a job
        not running on this manager, e.g. one being resumed after a restart, is looked at again
        every 0.25 s)."""
        job = self.jobs.get(job_id)
        if job is None or job.finished:
            await asyncio.sleep(min(0.25, timeout))
            return
        try:
            await asyncio.wait_for(job.ended.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # --- moves -------------------------------------------------------------------------------
    def start(self, job_id: str) -> None:
        if job_id in self.jobs and not self.jobs[job_id].finished:
            return
        self.jobs[job_id] = JobRuntime(job_id)
        self.tasks.spawn(self._run(job_id))

    def finish(self, job_id: str, state: JobState, error: ErrorInfo | None = None, output: str | None = None) -> None:
        """Persist a terminal state (first one wins), then stop the job's work. Never reads the
        stored request: a job whose row no longer validates still ends."""
        job = self.jobs.get(job_id)
        if job is not None and job.hls is not None:
            job.hls.close()  # before the end is stored: a playlist with ENDLIST never grows
        if job is not None and job.reported and state != JobState.succeeded:
            try:  # the progress it last showed (frames of chunks in flight too): a view never goes back
                self.store.set_frames_done(job_id, job.reported)
            except Exception as e:  # noqa: BLE001 - a figure; the end below is what must be stored
                log.warning("job %s: its last progress (%d frames) was not stored: %r", job_id, job.reported, e)
        ended = self.store.end(job_id, state, error=error, output=output)
        RESERVATIONS.release(job_id)
        if job is not None and job.step_on is not None and not job.finished and state != JobState.succeeded:
            # its step (prepare, mel, finalise) stopped where it runs: it went on to its end for nobody
            self.tasks.spawn(self.dispatcher.stop_step(job, f"was {state.value}"))
        if job is not None:
            job.finished = True
            job.all_done.set()
            job.ended.set()
            if ended and state != JobState.succeeded and job.plan is not None:
                try:  # its half-made output: a storage root gone read-only (or any OSError) must not cut the end short
                    discard_output(job.plan)
                except OSError as e:
                    log.warning("job %s: its unfinished output was not removed: %s", job_id, e,
                                extra={"job_id": job_id})
                self.tasks.spawn(asyncio.to_thread(discard_segments, job.plan, self.s))  # (many files: not here)
        if job is not None:
            self._published(job)  # a segment waiter learns of the end at once
            if self.jobs.get(job_id) is job:  # its state is in the store now: the runtime (plan, chunk
                del self.jobs[job_id]  # books, publisher) is not kept for the manager's lifetime
            self._unregister(job_id)
        if ended:
            # a failure is a warning, with its stage and code as fields (a log shipper filters on them)
            log.log(logging.WARNING if state == JobState.failed else logging.INFO, "job %s %s%s", job_id, state.value,
                    f": {error.code}: {error.message}" + (f" (cause: {error.cause})" if error.cause else "")
                    if error else "", extra={"job_id": job_id, "stage": error.stage if error else None,
                                             "code": error.code if error else None})
            try:
                metrics.record_job_end(self.store.get(job_id))
            except Exception:  # a metric must never keep a job from ending
                log.exception("job %s: recording its end in the metrics failed", job_id)
        self.dispatcher.queue.drop(job_id)

    def fail(self, job_id: str, err: LipsyncError) -> None:
        job = self.jobs.get(job_id)
        err.with_context(job_id=job_id, stage=job.stage if job else None)
        self.finish(job_id, JobState.failed, err.to_info())

    async def cancel(self, job_id: str) -> None:
        """Cancel a job. Commit (rename + `succeeded`) and cancel exclude each other: a job whose
        verified output is being committed ends succeeded, and a cancelled job publishes nothing."""
        job = self.jobs.get(job_id)
        if job is None:
            runner = self.store.runner_of(job_id)
            if runner is not None and runner != self.owner and identity_alive(runner):
                # ended in the shared store while its run renders on and commits its file: refused (a run not
                # known to be alive, on another host or a cluster's, is cancelled as before: else a job whose
                # run died where this one cannot see would hold its queue place and output path for good)
                raise JobRunElsewhere(f"job {job_id} is run by another live run that shares this storage root "
                                      f"({runner}), not by this service: stop it there (Ctrl-C that `lipsync "
                                      f"render`), or let it finish", job_id=job_id)
            self._cancel_now(job_id)
            return
        try:
            await asyncio.wait_for(job.commit_lock.acquire(), self.s.actor_call_timeout_s)
        except asyncio.TimeoutError:
            raise RenderTimeout(f"job {job_id}: its output commit did not finish within "
                                f"{self.s.actor_call_timeout_s:.0f} s; cancel again", job_id=job_id) from None
        try:
            self._cancel_now(job_id)
        finally:
            job.commit_lock.release()

    def _cancel_now(self, job_id: str) -> None:
        self.finish(job_id, JobState.cancelled,
                    ErrorInfo(code=JobCancelled.code, message=f"job {job_id} was cancelled", stage="cancel"))

    async def _run(self, job_id: str) -> None:
        logs.bind(job_id=job_id)  # every line of this job's task carries its id
        job = self.jobs[job_id]
        try:
            if await asyncio.wait_for(self._drive(job), timeout=self.s.job_timeout_s):
                await self._commit(job)  # past the deadline's reach: a commit is never cut in half
        except asyncio.TimeoutError:
            self.fail(job_id, RenderTimeout(f"job {job_id} did not finish within {self.s.job_timeout_s:.0f} s"))
        except Exception as e:
            typed = as_typed(e, job.stage, job_id)  # a full disk (e.g. at the commit) as `resource.disk`
            if typed is None:
                log.exception("job %s: internal error", job_id)
                typed = RenderError(f"job {job_id}: internal error in {job.stage}: {e!r}", cause=repr(e))
            self.fail(job_id, typed)

    async def _drive(self, job: JobRuntime) -> bool:
        """Prepare, render and finalize `job`; True when its verified output waits to be committed."""
        st = self.store.get(job.id)
        request = self.store.request(job.id)  # JobCorrupt when the stored row no longer validates
        model = request.model or self.s.model
        if st.state == JobState.queued:
            self.store.transition(job.id, JobState.preparing)
            st = self.store.get(job.id)
        if st.state == JobState.preparing or self.store.plan(job.id) is None:
            job.stage = "prepare"
            self.store.stage_started(job.id, "prepare")
            size = await self.dispatcher.model_size(model)
            if job.finished:  # cancelled while the model loaded: do not prepare
                return False
            # The output is committed under the storage root (this node), never at a client's
            # path: clients fetch it through the job manager.
            output = str(output_path_for(job.id, self.s))
            timeout = await asyncio.to_thread(prepare_deadline, request, self.s)
            plan = await self.dispatcher.run_step("prepare", job, job.id, request, size, output, timeout=timeout)
            job.plan = await asyncio.to_thread(with_blobs, plan)
            self._register(job.plan)
            if job.finished:  # cancelled while it prepared: its row stays as the cancel left it
                return False
            self.store.set_plan(job.id, job.plan.model_dump(mode="json"), job.plan.frames_total, len(job.plan.chunks))
            self.store.stage_ended(job.id, "prepare")
            if st.state == JobState.preparing:
                self.store.transition(job.id, JobState.rendering)
            RESERVATIONS.release(job.id)  # what it writes from now on shows in the free space
        else:
            job.stage = "render" if st.state == JobState.rendering else "finalize"
            job.plan = with_planned_model(JobPlan.model_validate(self.store.plan(job.id)), self.s)
            await asyncio.to_thread(check_plan_files, job.plan)  # resumed: gone inputs fail precisely
            if not job.plan.blobs:  # planned by an older version
                job.plan = await asyncio.to_thread(with_blobs, job.plan)
            self._register(job.plan)
        st = self.store.get(job.id)
        loop = asyncio.get_running_loop()
        publisher = HlsPublisher(job.plan, self.s, on_publish=lambda: loop.call_soon_threadsafe(self._published, job))
        job.hls = await started_in_thread(publisher.start, publisher.close)
        if job.finished:
            job.hls.close()
            return False
        if st.state == JobState.rendering:
            job.stage = "render"
            self.store.stage_started(job.id, "render")
            recorded = self.store.done_chunks(job.id)
            todo = []
            for chunk in job.plan.chunks:
                seg = recorded.get(chunk.index)
                if seg is None and Path(job.plan.segment_path(chunk.index)).exists():
                    # rendered and verified before the manager died, not recorded yet: a segment
                    # has its final name only once its frames were counted (`render_chunk`)
                    seg = job.plan.segment_path(chunk.index)
                    self.store.chunk_done(job.id, chunk.index, chunk.frames, seg)
                    log.info("job %s: chunk %d adopted from %s (rendered before the restart)", job.id, chunk.index, seg)
                if seg is not None and Path(seg).exists():
                    job.done[chunk.index] = chunk.frames
                else:
                    if seg is not None:
                        self.store.forget_chunk(job.id, chunk.index)
                    todo.append(chunk)
            for index in job.done:
                job.hls.chunk_done(index)
            if len(job.done) == len(job.plan.chunks):
                job.all_done.set()
            if job.plan.mel_pending:  # the first chunk goes now, from the mel head; the others once the mel is whole
                first = [c for c in todo if c.index == 0]
                await self._write_mel(job, request, first)
                if job.finished:
                    return False
                todo = [c for c in todo if c.index != 0]
            for chunk in todo:
                self.dispatcher.queue.push(job.id, chunk)
            self.dispatcher.work.set()
            await self._watch(job)
            if job.finished:
                return False
            self.store.stage_ended(job.id, "render")
            self.store.transition(job.id, JobState.finalizing)
        job.stage = "finalize"
        self.store.stage_started(job.id, "finalize")
        await self._drain_hls(job)
        if job.finished:  # cancelled while its stream was drained: nothing to finalize
            return False
        await self.dispatcher.run_step("finalize", job, job.plan)
        return True

    async def _commit(self, job: JobRuntime) -> None:
        """Publish the verified output and end the job `succeeded`: one step that neither a cancel nor
        the job's deadline can split (a cancel waits for it; the deadline does not reach it)."""
        async with job.commit_lock:
            if job.finished:  # cancelled or failed meanwhile: the verified output is not published
                await asyncio.to_thread(discard_output, job.plan)
                return
            await asyncio.to_thread(commit_output, job.plan, self.s)
            self.finish(job.id, JobState.succeeded, output=job.plan.output_path)

    async def _write_mel(self, job: JobRuntime, request, first: list[Chunk]) -> None:
        """Queue the first chunk (`first`, unless it is rendered already) with the plan that reads
        the mel head, wait (bounded) until a compositor has it, then have the whole mel written on
        a compositor of this node (`write_job_mel`) and store the plan with its hash: what a job's
        first segment waits for does not grow with the length of its audio."""
        job.first_plan = await asyncio.to_thread(plan_for_chunk, job.plan, job.plan.chunks[0])
        self._register(job.first_plan)
        for chunk in first:
            self.dispatcher.queue.push(job.id, chunk)
            self.dispatcher.work.set()
            loop = asyncio.get_running_loop()
            give_up = loop.time() + self.s.chunk_timeout_s  # all compositors busy: the mel goes anyway
            while not (job.first_sent.is_set() or job.finished) and loop.time() < give_up:
                try:
                    await asyncio.wait_for(job.first_sent.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
        if job.finished:
            return
        self.store.stage_started(job.id, "features")
        timeout = await asyncio.to_thread(prepare_deadline, request, self.s)
        await self.dispatcher.run_step("write_mel", job, job.plan, request, timeout=timeout)
        job.plan = await asyncio.to_thread(with_blobs, job.plan)
        self._register(job.plan)
        self.store.set_plan(job.id, job.plan.model_dump(mode="json"), job.plan.frames_total, len(job.plan.chunks))
        job.first_plan = None
        self.store.stage_ended(job.id, "features")

    async def _drain_hls(self, job: JobRuntime) -> None:
        """Wait until every chunk is published as HLS and the job's AAC is saved (the final mp4
        copies it). HLS publishing that failed is logged, not the job's failure: the final mp4 is
        built without it (finalize encodes the AAC itself if needed)."""
        for index in range(len(job.plan.chunks)):
            job.hls.chunk_done(index)  # resumed in finalizing: every chunk is done
        try:
            await asyncio.to_thread(job.hls.drain, self.s.chunk_timeout_s)
        except LipsyncError as e:
            log.error("job %s: HLS publishing stopped: %s: %s", job.id, e.code, e.message)

    async def _watch(self, job: JobRuntime) -> None:
        """Wait for every chunk; fail the job when the cluster has had no live compositor or no live
        model worker for stall_timeout_s (each chunk is bounded by chunk_timeout_s on its own)."""
        models, compositors = self.pool.models, self.pool.compositors
        while not job.all_done.is_set():
            try:
                await asyncio.wait_for(job.all_done.wait(), timeout=min(5.0, self.s.stall_timeout_s))
                return
            except asyncio.TimeoutError:
                pass
            if models.live() and compositors.live():
                job.capacity_seen = time.monotonic()
            elif time.monotonic() - job.capacity_seen > self.s.stall_timeout_s:
                log.warning("job %s: no live capacity for %.0f s: model workers %s; compositors %s", job.id,
                            self.s.stall_timeout_s, models.summary(), compositors.summary(),
                            extra={"job_id": job.id})
                log.debug("job %s: the pool at its stall: model workers %s, compositors %s", job.id,
                          models.snapshot(), compositors.snapshot(), extra={"job_id": job.id})  # the whole record
                raise WorkerLost(
                    f"job {job.id}: no live {'model worker' if not models.live() else 'compositor'} for "
                    f"{self.s.stall_timeout_s:.0f} s (model workers: {models.summary()}; compositors: "
                    f"{compositors.summary()})", job_id=job.id, stage="render")

    # --- chunk outcomes (from the dispatcher) ---------------------------------------------------
    async def chunk_done(self, job: JobRuntime, chunk: Chunk, result: ChunkResult) -> None:
        if job.finished:
            return
        if result.data is not None:  # rendered on another node: its segment joins the storage root here
            segment = job.plan.segment_path(chunk.index)
            await asyncio.to_thread(write_atomic, segment, result.data)
            result = result.model_copy(update={"segment": segment, "data": None})
            if job.finished:
                return
        self.store.chunk_done(job.id, chunk.index, result.frames, result.segment)
        job.done[chunk.index] = result.frames
        job.tokens.pop(chunk.index, None)  # committed: any attempt still running is stale
        if job.hls is not None:
            job.hls.chunk_done(chunk.index)
        job.inflight_frames.pop(chunk.index, None)
        if len(job.done) == len(job.plan.chunks):
            job.all_done.set()

    def retry(self, job: JobRuntime, chunk: Chunk, err: LipsyncError, lost: bool = False) -> None:
        """Queue a failed chunk again, or fail the job when it failed too often or cannot succeed."""
        if job.finished or isinstance(err, StaleAttempt):
            return
        job.inflight_frames.pop(chunk.index, None)
        err.with_context(job_id=job.id, chunk=chunk.index, stage="render")
        if not err.retryable:
            self.fail(job.id, err)
            return
        book = job.losses if lost else job.attempts
        book[chunk.index] = book.get(chunk.index, 0) + 1
        limit = self.s.max_chunk_attempts * (3 if lost else 1)
        log.warning("job %s chunk %d attempt failed (%d/%d): %s: %s", job.id, chunk.index, book[chunk.index],
                    limit, err.code, err)
        if book[chunk.index] >= limit:
            self.fail(job.id, ChunkFailed(
                f"chunk {chunk.index} of job {job.id} failed {book[chunk.index]} times; last error "
                f"{err.code}: {err.message}", job_id=job.id, chunk=chunk.index, stage="render",
                cause=err.cause or err.message))
            return
        metrics.record_redispatch("chunk", "lost" if lost else "failed")
        self.dispatcher.queue.push(job.id, chunk, front=True)
        self.dispatcher.work.set()
