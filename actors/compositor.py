"""Compositor: a CPU actor that prepares jobs, renders chunks and finalises outputs.

Full frames stay inside this process; only crops and mel windows go to the model workers,
through the object store, by way of the job manager's `dispatch`.
"""
from __future__ import annotations

import os

import numpy as np
import ray

from actors import ORCHESTRATOR_NAME, task_cause
from cluster.config import Settings
from cluster.errors import LipsyncError, WorkerLost
from cluster.render import ChunkResult, JobPlan, finalize_job, prepare_job, render_chunk
from cluster.schemas import Chunk, MediaInfo, RenderRequest


@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"control": 1})
class Compositor:
    def __init__(self, settings: Settings, name: str) -> None:
        self.settings, self.name = settings, name
        self._detector = None

    @ray.method(concurrency_group="control")  # answers while a chunk renders
    def info(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "settings": self.settings.fingerprint()}

    def prepare(self, job_id: str, request: RenderRequest, model_size: int) -> JobPlan:
        from cluster.faces.mtcnn import MTCNNDetector

        if self._detector is None:
            self._detector = MTCNNDetector()
        return prepare_job(job_id, request, self.settings, model_size=model_size, detector=self._detector)

    def render_chunk(self, plan: JobPlan, chunk: Chunk, token: str) -> ChunkResult:
        manager = ray.get_actor(ORCHESTRATOR_NAME, namespace=self.settings.namespace)
        s = self.settings  # the longest a dispatch may legitimately take, plus slack
        timeout = s.max_batch_attempts * (s.stall_timeout_s + s.model_load_timeout_s
                                          + s.batch_timeout_s * s.max_inflight_per_worker) + 30

        def generate(mel: np.ndarray, crops: np.ndarray) -> np.ndarray:
            refs = [ray.put(mel), ray.put(crops)]
            try:
                (out_ref,) = ray.get(manager.dispatch.remote(plan.job_id, chunk.index, token, plan.model, refs),
                                     timeout=timeout)
                return ray.get(out_ref, timeout=self.settings.batch_timeout_s)
            except ray.exceptions.RayTaskError as e:
                cause = task_cause(e)
                if isinstance(cause, LipsyncError):
                    raise cause
                raise
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                    ray.exceptions.ObjectLostError) as e:
                raise WorkerLost(f"batch of chunk {chunk.index} was lost: {type(e).__name__}",
                                 cause=str(e)[:2000], stage="render", chunk=chunk.index) from e

        return render_chunk(plan, chunk, generate, self.settings)

    def finalize(self, plan: JobPlan) -> MediaInfo:
        """Build and verify the output under its pending name; the job manager commits it."""
        return finalize_job(plan, self.settings, commit=False)
