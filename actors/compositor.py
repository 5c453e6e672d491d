"""Compositor: a CPU actor that prepares jobs, renders chunks and finalises outputs.

Full frames stay inside this process; only crops and mel windows go to the model workers,
through the object store, by way of the job manager's `dispatch`.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import ray

from actors import ORCHESTRATOR_NAME, metrics
from actors.calls import Kind, UnreadAnswers, outcome_sync
from cluster import logs, stopping
from cluster.config import Settings
from cluster.errors import LipsyncError, WorkerLost
from cluster.nodecache import entries as cache_entries
from cluster.render import ChunkResult, JobPlan, finalize_job, localized, prepare_job, render_chunk, write_job_mel
from cluster.schemas import Chunk, MediaInfo, RenderRequest
from cluster.threads import actor_thread_plan, applied_threads

log = logging.getLogger("lipsync.compositor")


@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"control": 1})
class Compositor:
    def __init__(self, settings: Settings, name: str) -> None:
        self.settings, self.name = settings, name
        metrics.install(name, settings.log_format)
        # every thread pool of this process (OpenCV, OpenBLAS, and the decoders, encoders and
        # detector created later) sized from this actor's Ray CPUs (cluster/threads.py)
        self.threads = actor_thread_plan(ray.get_runtime_context().get_assigned_resources().get("CPU"),
                                         settings.size_threads)
        self._detector = None
        # chunks rendered by this process and where their render thread waited (issue 19)
        self.rendered = {"chunks": 0, "frames": 0, "seconds": 0.0, "waited_model_s": 0.0, "waited_encoder_s": 0.0,
                         "most_at_once": 0}
        # calls run on `chunks_per_compositor` threads at once: what they share is changed under this
        self._lock = threading.Lock()
        self._rendering = 0

    @ray.method(concurrency_group="control")  # answers while a chunk renders
    def info(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "settings": self.settings.fingerprint(), "cached_files": cache_entries(self._cache_root()),
                "threads": applied_threads(), "rendered": self._rendered()}

    def _rendered(self) -> dict:
        with self._lock:
            return dict(self.rendered)

    def prepare(self, job_id: str, request: RenderRequest, model_size: int, output_path: str | None = None) -> JobPlan:
        from cluster.faces.mtcnn import MTCNNDetector

        logs.set_context(job_id=job_id)
        with self._lock:
            if self._detector is None:
                self._detector = MTCNNDetector()  # intra-op threads: this actor's thread plan
        with stopping.work_of(job_id):
            return prepare_job(job_id, request, self.settings, model_size=model_size, detector=self._detector,
                               output_path=output_path, defer_mel=True)

    def write_mel(self, plan: JobPlan, request: RenderRequest) -> None:
        """The job's whole mel spectrogram, while its first chunk renders from the head (`write_job_mel`)."""
        logs.set_context(job_id=plan.job_id)
        with stopping.work_of(plan.job_id):
            write_job_mel(plan, request, self.settings)

    @ray.method(concurrency_group="control")  # answers while the step runs
    def stop_job(self, job_id: str, why: str) -> int:
        """Stop job `job_id`'s step running here (prepare, mel, finalise): it has ended (`cluster.stopping`).
        How many of its processes were killed."""
        killed = stopping.stop(job_id, why)
        if killed:
            log.info("job %s %s: its step's %d ffmpeg process(es) killed", job_id, why, killed,
                     extra={"job_id": job_id})
        return killed

    def render_chunk(self, plan: JobPlan, chunk: Chunk, token: str, shared_storage: bool = True) -> ChunkResult:
        """Render one chunk. Without `shared_storage` (this node is not the job manager's), the
        prepared files come from the node-local cache and the segment's bytes go back in the result."""
        logs.set_context(job_id=plan.job_id, chunk=chunk.index)
        manager = ray.get_actor(ORCHESTRATOR_NAME, namespace=self.settings.namespace)
        if not shared_storage:
            plan = self._localized(plan, manager)
        s = self.settings  # the longest a dispatch may legitimately take, plus slack
        timeout = s.max_batch_attempts * (s.stall_timeout_s + s.model_load_timeout_s
                                          + s.batch_timeout_s * s.max_inflight_per_worker) + 30

        unread = UnreadAnswers()  # batches whose answer the chunk has not read (it ended before: cancelled, failed)

        def generate(mel: np.ndarray, crops: np.ndarray):
            """Submit the batch now; render_chunk calls the returned function for the result after it
            has prepared and submitted the next batch (model and compositor work at the same time)."""
            refs = [ray.put(mel), ray.put(crops)]
            where = dict(stage="render", chunk=chunk.index, job_id=plan.job_id)
            dispatched = manager.dispatch.remote(plan.job_id, chunk.index, token, plan.model, refs)
            unread.add(dispatched)

            def result() -> np.ndarray:
                unread.read(dispatched)
                routed = outcome_sync(dispatched, timeout)
                if routed.ok:
                    generated = outcome_sync(routed.value[0], self.settings.batch_timeout_s)
                    if generated.ok:
                        metrics.record_object_store_bytes(mel.nbytes + crops.nbytes + generated.value.nbytes, len(mel))
                        return generated.value
                    routed = generated
                if routed.kind == Kind.raised and isinstance(routed.cause, LipsyncError):
                    raise routed.cause
                if routed.kind == Kind.raised:
                    raise routed.error
                raise routed.typed(WorkerLost, f"batch of chunk {chunk.index} was lost", **where)

            return result

        with self._lock:
            self._rendering += 1
            self.rendered["most_at_once"] = max(self.rendered["most_at_once"], self._rendering)
        try:
            result = render_chunk(plan, chunk, generate, self.settings)
        finally:
            with self._lock:
                self._rendering -= 1
            unread.drop()  # (an attempt the job no longer wants: StaleAttempt, read when it comes)
        with self._lock:
            for key, value in (("chunks", 1), ("frames", result.frames), ("seconds", result.seconds),
                               ("waited_model_s", result.waited_model_s),
                               ("waited_encoder_s", result.waited_encoder_s)):
                self.rendered[key] += value
        metrics.record_compositor_chunk(result.seconds, result.waited_model_s, result.waited_encoder_s)
        if not shared_storage:
            segment = Path(result.segment)
            result = result.model_copy(update={"data": segment.read_bytes()})
            segment.unlink(missing_ok=True)
        return result

    def _cache_root(self) -> Path:
        return self.settings.node_cache_dir

    def _localized(self, plan: JobPlan, manager) -> JobPlan:
        s = self.settings

        def fetcher(sha256: str):
            def fetch(offset: int, length: int) -> bytes:
                answer = outcome_sync(manager.read_blob.remote(sha256, offset, length), s.actor_call_timeout_s * 2)
                if answer.ok:
                    return answer.value
                if answer.kind == Kind.raised and isinstance(answer.cause, LipsyncError):
                    raise answer.cause
                raise answer.typed(WorkerLost, f"fetching {sha256[:12]} for job {plan.job_id} from the job manager",
                                   stage="render", job_id=plan.job_id)
            return fetch
        return localized(plan, self._cache_root(), fetcher, s.transfer_part_bytes, s.node_cache_bytes)

    def finalize(self, plan: JobPlan) -> MediaInfo:
        """Build and verify the output under its pending name; the job manager commits it."""
        logs.set_context(job_id=plan.job_id)
        with stopping.work_of(plan.job_id):
            return finalize_job(plan, self.settings, commit=False)
