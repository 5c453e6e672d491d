"""Scheduling and dispatch: queued chunks to free compositors (round-robin across jobs), model
batches to the least-loaded live model worker, job-level steps (prepare, finalise) to some
compositor. Outcomes of chunks go back to the job state machine (`actors.jobs.JobMachine`).

Only object refs pass through here, never frame data.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, Iterator

import ray

from actors import metrics
from actors.calls import Kind, Outcome, outcome
from actors.jobs import STEP_HERE, StaleAttempt
from actors.supervision import Supervisor, TaskSet
from cluster import logs, stopping
from cluster.config import Settings
from cluster.errors import (
    ChunkFailed,
    JobCancelled,
    LipsyncError,
    ModelError,
    ModelLoadError,
    RenderError,
    RenderTimeout,
    WorkerLost,
)
from cluster.resources import as_typed
from cluster.scheduling import FairQueue, Health, Member
from cluster.schemas import Chunk

if TYPE_CHECKING:
    from actors.jobs import JobMachine, JobRuntime

log = logging.getLogger("lipsync.dispatch")


@contextlib.contextmanager
def _step_running(job: JobRuntime, where) -> Iterator[None]:
    """`job.step_on` is `where` (a compositor, or STEP_HERE) while the block runs its job-level step: where
    `Dispatcher.stop_step` asks, should the job end early. Kept where the block is cancelled (the job's deadline):
    the job's end, which comes next, stops the step there."""
    job.step_on = where
    try:
        yield
    except asyncio.CancelledError:
        raise
    except BaseException:
        job.step_on = None
        raise
    job.step_on = None


class Dispatcher:
    def __init__(self, settings: Settings, pool: Supervisor, tasks: TaskSet, work: asyncio.Event) -> None:
        self.s = settings
        self.pool = pool
        self.tasks = tasks
        self.work = work
        self.queue: FairQueue[Chunk] = FairQueue()
        self.machine: JobMachine | None = None  # set by the job manager once both exist
        self._sizes: dict[str, int] = {}
        self.node_id = ray.get_runtime_context().get_node_id()  # the job manager's node: the storage root's
        self._detector = None  # for a prepare run here, when no compositor shares this node
        self._steps_waiting = 0  # job-level steps waiting for a compositor on this node: they go first

    def on_this_node(self, member: Member) -> bool:
        return member.info.get("node") == self.node_id

    # --- chunks to compositors ---------------------------------------------------------------
    async def run_scheduler(self) -> None:
        """Hand queued chunks, round-robin across jobs, to free compositors. Never dies."""
        while True:
            try:
                await self._schedule_once()
            except Exception:
                log.exception("scheduler step failed; going on")
                await asyncio.sleep(1.0)

    async def _schedule_once(self) -> None:
        if not len(self.queue):
            self.work.clear()
            try:
                await asyncio.wait_for(self.work.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            return
        member = await self.pool.compositors.acquire(timeout=1.0, where=self._free_for_chunks)
        if member is None:
            return
        item = self.queue.pop()
        if item is None:
            await self.pool.compositors.release(member)
            return
        job_id, chunk = item
        self.tasks.spawn(self._run_chunk(job_id, chunk, member))

    def _free_for_chunks(self, member: Member) -> bool:
        """Chunks go to any compositor, except one on this node while a job-level step waits for
        it: a prepare or finalize gates a whole job, and under a stream of jobs a compositor here
        that always takes the next chunk would starve them (each waits a chunk at most instead)."""
        return not (self._steps_waiting and self.on_this_node(member))

    async def _run_chunk(self, job_id: str, chunk: Chunk, member: Member) -> None:
        logs.bind(job_id=job_id, chunk=chunk.index)
        machine = self.machine
        job = machine.jobs.get(job_id)
        ok = False
        try:
            if job is None or job.finished:
                return
            token = job.tokens[chunk.index] = uuid.uuid4().hex[:12]
            job.inflight_frames[chunk.index] = 0
            # Ray's own task name (`Compositor.render_chunk`): Ray keeps state per task name, so
            # names unique to each call grew with a job's length (docs/PERFORMANCE.md, an hour of
            # speech); the job and chunk are in the compositor's log context instead
            ref = member.handle.render_chunk.remote(job.plan_for(chunk), chunk, token, self.on_this_node(member))
            job.activity[chunk.index] = [0, time.monotonic()]
            if chunk.index == 0:
                job.first_sent.set()  # the job's whole mel may be written now (JobMachine._write_mel)
            answer, frozen = await self._await_chunk(ref, job, chunk, member)
            what = f"job {job_id} chunk {chunk.index}"
            if answer.kind == Kind.died:
                await self.pool.lost(self.pool.compositors, member, f"died rendering {what}")
                machine.retry(job, chunk, answer.typed(WorkerLost, f"compositor {member.name} died"), lost=True)
            elif answer.kind == Kind.stalled:
                why = (f"chunk {chunk.index}: its compositor asked the model for nothing for "
                       f"{self.s.stall_timeout_s:.0f} s (frozen?)" if frozen
                       else f"chunk {chunk.index} took over {self.s.chunk_timeout_s:.0f} s")
                await self.pool.lost(self.pool.compositors, member, why, kill=True)
                machine.retry(job, chunk, RenderTimeout(why))
            elif answer.kind == Kind.raised:
                err = answer.typed(ChunkFailed, f"chunk {chunk.index} of job {job_id} failed")
                machine.retry(job, chunk, err, lost=isinstance(err, WorkerLost))
            elif answer.kind == Kind.lost:  # e.g. the result was lost with its node: render it again
                machine.retry(job, chunk, answer.typed(WorkerLost, f"chunk {chunk.index} result lost"), lost=True)
            else:
                ok = True
                await machine.chunk_done(job, chunk, answer.value)
        except Exception as e:
            log.exception("chunk %s of job %s: %s", chunk.index, job_id,
                          "failed" if isinstance(e, LipsyncError) else "internal error")
            if job is not None and not job.finished:  # a typed error, or a full disk while the chunk was
                # recorded, ends the job as itself (`resource.disk`); anything else as an internal error
                err = as_typed(e, "render", job_id) or RenderError(f"internal error on chunk {chunk.index}: {e!r}",
                                                                   cause=repr(e))
                machine.fail(job_id, err.with_context(chunk=chunk.index))
        finally:
            if job is not None:
                job.activity.pop(chunk.index, None)
            await self.pool.compositors.release(member, ok=ok)
            self.work.set()

    async def _await_chunk(self, ref, job: JobRuntime, chunk: Chunk, member: Member) -> tuple[Outcome, bool]:
        """(the chunk's outcome within `chunk_timeout_s`, whether it was cut short as frozen): `stalled` once its
        compositor has sent no batch and got none back for `stall_timeout_s` while none of its batches is at the
        model, and its process does not answer `info` either (a process stopped or hung: a probe's SIGSTOPped
        compositor held its chunk, and the job, for the whole 15-minute chunk deadline while the other compositor
        sat idle). A process that answers is working on something else (another chunk, a template fetched from
        another node, a segment's encode): waited for (a review: those were killed)."""
        waiting = asyncio.ensure_future(outcome(ref, timeout=self.s.chunk_timeout_s))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=min(5.0, self.s.stall_timeout_s / 4))
                if done:
                    return waiting.result(), False
                seen = job.activity.get(chunk.index)
                if seen is None or seen[0] or time.monotonic() - seen[1] <= self.s.stall_timeout_s:
                    continue
                alive = await outcome(member.handle.info.remote(), timeout=min(10.0, self.s.stall_timeout_s / 2))
                if waiting.done():
                    return waiting.result(), False
                if not alive.ok:
                    return Outcome(Kind.stalled), True
                seen[1] = time.monotonic()  # it answers: slow, not frozen (looked at again after as long)
                log.info("job %s chunk %d: no batch for %.0f s, but %s answers: waiting on", job.id, chunk.index,
                         self.s.stall_timeout_s, member.name)
        finally:
            waiting.cancel()

    # --- batches to model workers ------------------------------------------------------------
    async def dispatch(self, job_id: str, chunk_index: int, token: str, model: str, refs: list) -> list:
        """Run one batch (refs: [mel, crops]) on the least-loaded live worker; returns [ref of output].

        Worker death or a stall (no answer within batch_timeout_s per batch queued ahead on that
        worker) re-dispatches the same refs to another worker, up to max_batch_attempts; a model
        exception is raised to the caller.
        """
        job = self.machine.jobs.get(job_id)
        if job is None or job.finished or job.tokens.get(chunk_index) != token:
            raise StaleAttempt(f"job {job_id} chunk {chunk_index}: this attempt is no longer wanted",
                               job_id=job_id, chunk=chunk_index)
        mel_ref, crops_ref = refs
        where = dict(job_id=job_id, chunk=chunk_index, stage="render")
        seen = job.activity.setdefault(chunk_index, [0, time.monotonic()])  # its compositor is not frozen
        seen[0] += 1
        try:
            return await self._dispatch(job, chunk_index, model, mel_ref, crops_ref, where)
        finally:
            seen[0] -= 1
            seen[1] = time.monotonic()

    async def _dispatch(self, job: JobRuntime, chunk_index: int, model: str, mel_ref, crops_ref, where: dict) -> list:
        job_id, table = job.id, self.pool.models
        last = "no attempt"
        for _ in range(self.s.max_batch_attempts):
            member = await table.acquire(timeout=self.s.stall_timeout_s)
            if member is None:
                if table.all_failed():
                    raise self.pool.load_error()
                raise WorkerLost(f"no live model worker for {model!r} within {self.s.stall_timeout_s:.0f} s "
                                 f"(last problem: {last})", **where)
            ok = False
            try:
                if model not in member.info.get("models", ()):  # load it under the load deadline, not a batch's
                    step = f"loading {model!r}"
                    answer = await outcome(member.handle.describe.remote(model), timeout=self.s.model_load_timeout_s)
                    if answer.ok:
                        member.info = {**member.info, "models": [*member.info.get("models", ()), model]}
                if model in member.info.get("models", ()):
                    step = "a batch"
                    queued = max(1, member.inflight)  # batches ahead of this one on that worker, this one included
                    meta_ref, out_ref = member.handle.infer.remote(model, mel_ref, crops_ref)
                    answer = await outcome(meta_ref, timeout=self.s.batch_timeout_s * queued)
                if answer.kind in (Kind.stalled, Kind.died):
                    last = answer.describe(member.name, step)
                    metrics.record_redispatch("batch", answer.kind.value)
                    await self.pool.lost(table, member, last, kill=answer.kind == Kind.stalled)
                    continue
                if answer.kind == Kind.raised:
                    raise answer.typed(ModelError, f"model worker {member.name} failed on job {job_id} "
                                                   f"chunk {chunk_index}", **where)
                if answer.kind == Kind.lost:  # the batch's inputs are gone (their owner died): redo the chunk
                    raise answer.typed(WorkerLost, f"job {job_id} chunk {chunk_index}: batch inputs lost", **where)
                ok = True
            finally:
                await table.release(member, ok=ok)
            job.inflight_frames[chunk_index] = job.inflight_frames.get(chunk_index, 0) + int(answer.value["frames"])
            return [out_ref]
        raise WorkerLost(f"job {job_id} chunk {chunk_index}: batch lost {self.s.max_batch_attempts} times "
                         f"(last: {last})", **where)

    async def model_size(self, model: str) -> int:
        """The crop size S of `model`, asked of a live worker (which loads the model if needed)."""
        if model in self._sizes:
            return self._sizes[model]
        table = self.pool.models
        deadline = time.monotonic() + self.s.model_load_timeout_s
        while time.monotonic() < deadline:
            if table.all_failed():
                raise self.pool.load_error()
            live = table.live()
            if not live:
                await asyncio.sleep(0.2)
                continue
            member = min(live, key=lambda x: x.inflight)
            answer = await outcome(member.handle.describe.remote(model),
                                   timeout=max(1.0, deadline - time.monotonic()))
            if answer.kind == Kind.raised:
                raise answer.typed(ModelLoadError, f"cannot load model {model!r}").with_context(path=model)
            if not answer.ok:
                await self.pool.lost(table, member, answer.describe(member.name, f"describe({model!r})"),
                                     kill=answer.kind == Kind.stalled)
                continue
            member.info = {**member.info, "models": [*member.info.get("models", ()), model]}
            self._sizes[model] = int(answer.value["size"])
            return self._sizes[model]
        raise RenderTimeout(f"model {model!r} was not ready on any worker within {self.s.model_load_timeout_s:.0f} s")

    # --- job-level steps -----------------------------------------------------------------------
    async def run_step(self, method: str, job: JobRuntime, *args, timeout: float | None = None):
        """Run a job-level step (prepare, finalize: they read and write the storage root) on a
        compositor on this node; a lost compositor means another one runs it. Where no
        compositor shares this node (e.g. a head node with no CPUs for actors), or none here has
        been live for `stall_timeout_s`, it runs here, in a thread."""
        timeout = timeout or self.s.chunk_timeout_s
        table = self.pool.compositors
        settle_by = time.monotonic() + self.s.stall_timeout_s
        while time.monotonic() < settle_by:  # until a compositor here is live, or where each one is is known
            members = list(table.members.values())
            if any(m.health == Health.live and self.on_this_node(m) for m in members) or \
                    not any(m.health == Health.starting for m in members):
                break
            await asyncio.sleep(0.2)
        last = "none"
        for _ in range(self.s.max_chunk_attempts + 1):
            self._not_ended(job, method)
            if not any(self.on_this_node(m) for m in table.members.values()):
                return await self._run_here(method, job, args, timeout)
            member = await self._acquire_here(method, job, timeout)
            if member is None:  # no compositor here is live: the step runs in this process
                self._not_ended(job, method)
                return await self._run_here(method, job, args, timeout)
            if job.finished:  # ended while it waited for a compositor (busy with other jobs' steps): not run
                await table.release(member)
                self._not_ended(job, method)
            try:
                with _step_running(job, member):
                    ref = getattr(member.handle, method).remote(*args)
                    answer = await outcome(ref, timeout=timeout)
            finally:
                await table.release(member)
            if answer.ok:
                return answer.value
            if answer.kind == Kind.raised:
                raise answer.typed(RenderError, f"{method} failed")
            if answer.kind == Kind.stalled:
                last = f"{member.name}: {method} took over {timeout:.0f} s"
                await self.pool.lost(table, member, last, kill=True)
            else:
                last = answer.describe(member.name, method)
                await self.pool.lost(table, member, last)
        raise WorkerLost(f"{method} of job {job.id}: compositor lost {self.s.max_chunk_attempts + 1} times; "
                         f"last: {last}", cause=last)

    @staticmethod
    def _not_ended(job: JobRuntime, method: str) -> None:
        """`JobCancelled` for a job that has ended (cancelled, failed) before its step `method` ran: the step is not
        started (its end stops only a step that runs)."""
        if job.finished:
            raise JobCancelled(f"job {job.id} has ended: its {method} is not run", job_id=job.id, stage=method)

    async def _acquire_here(self, method: str, job: JobRuntime, timeout: float) -> Member | None:
        """A compositor of this node for a job-level step (first in line: see `_free_for_chunks`).
        One that is live but busy is waited for, up to the step's own deadline (a stream of jobs
        on an overloaded machine queues prepares behind each other; they are not stalled). None
        when none here has been live for `stall_timeout_s` (e.g. its restart waits for a CPU that
        another actor took): the caller then runs the step in this process instead of failing."""
        table = self.pool.compositors
        give_up = time.monotonic() + timeout
        self._steps_waiting += 1
        try:
            while True:
                member = await table.acquire(timeout=self.s.stall_timeout_s, where=self.on_this_node)
                if member is not None:
                    return member
                here = [m for m in table.members.values() if self.on_this_node(m)]
                state = ", ".join(f"{m.name} {m.health.value}" + (" (busy)" if m.inflight else "")
                                  for m in here) or "none there"
                if not any(m.health == Health.live for m in here):
                    log.warning("job %s: no compositor on this node has been live for %.0f s (%s): %s runs in the "
                                "job manager", job.id, self.s.stall_timeout_s, state, method)
                    return None
                if time.monotonic() > give_up:
                    raise RenderTimeout(f"{method} of job {job.id} waited {timeout:.0f} s for a compositor on the "
                                        f"job manager's node ({state})", job_id=job.id, stage=method)
        finally:
            self._steps_waiting -= 1

    async def _run_here(self, method: str, job: JobRuntime, args: tuple, timeout: float):
        from cluster.render import finalize_job, prepare_job, write_job_mel

        # a thread cannot be stopped: its ffmpeg children are, no later than the step's deadline, so a
        # step that timed out (its job failed) does not go on writing for `ffmpeg_timeout_s` after it
        s = self.s.model_copy(update={"ffmpeg_timeout_s": min(self.s.ffmpeg_timeout_s, timeout)})
        if method == "prepare":
            if self._detector is None:
                from cluster.faces.mtcnn import MTCNNDetector

                self._detector = MTCNNDetector()
            job_id, request, model_size, output_path = args
            call = lambda: prepare_job(job_id, request, s, model_size=model_size, detector=self._detector,  # noqa: E731
                                       output_path=output_path, defer_mel=True)
        elif method == "write_mel":
            plan, request = args
            call = lambda: write_job_mel(plan, request, s)  # noqa: E731
        elif method == "finalize":
            (plan,) = args
            call = lambda: finalize_job(plan, s, commit=False)  # noqa: E731
        else:
            raise ValueError(method)
        def of_the_job():
            with stopping.work_of(job.id):
                return call()

        try:
            with _step_running(job, STEP_HERE):
                return await asyncio.wait_for(asyncio.to_thread(of_the_job), timeout)
        except asyncio.TimeoutError:
            stopping.stop(job.id, f"took over {timeout:.0f} s in its {method}")  # (the thread leaves at its next check)
            raise RenderTimeout(f"{method} of job {job.id} took over {timeout:.0f} s") from None

    async def stop_step(self, job: JobRuntime, why: str) -> None:
        """Stop the job-level step of `job` (prepare, mel, finalise) where it runs, its job having ended early
        (`cluster.stopping`): it went on to its end, holding a compositor (a hostile template's ffmpeg grew to
        9 GB after its cancel). A compositor that does not answer in time is left to the step's own deadline."""
        member = job.step_on
        if member is None:
            return
        if member is STEP_HERE:
            stopping.stop(job.id, why)
            return
        answer = await outcome(member.handle.stop_job.remote(job.id, why), timeout=self.s.actor_call_timeout_s)
        if not answer.ok:
            log.warning("job %s: its step on %s was not stopped: %s", job.id, member.name,
                        answer.describe(member.name, "stop_job"), extra={"job_id": job.id})
