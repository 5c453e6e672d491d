"""Model worker: one process owns one GPU (or a CPU slot) and its loaded model."""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import ray

from cluster.config import Settings
from cluster.errors import LipsyncError, ModelLoadError

log = logging.getLogger("lipsync.worker")


@ray.remote(max_restarts=-1, max_task_retries=0)
class ModelWorker:
    """Loads the model once (and warms it up); `infer` runs crop batches through it.

    A load failure does not raise from `__init__` (Ray would not restart such an actor, and the
    error would surface only as a dead handle): it is kept and reported by `info`, and every
    `infer` raises it, so each job fails with the precise `model.load_failed` message.
    """

    def __init__(self, model_spec: str, settings: Settings, name: str) -> None:
        from cluster.models import load_model
        from cluster.models.providers import select_providers

        self.name, self.model_spec, self.settings = name, model_spec, settings
        self.model = None
        self.load_error: LipsyncError | None = None
        self.frames = 0
        self.busy_s = 0.0
        gpu_ids = ray.get_gpu_ids()
        try:
            self.model = load_model(model_spec, settings, providers=select_providers(gpu_ids))
            self.model.warmup(settings.batch_size)  # the real batch size: arenas sized once
        except LipsyncError as e:
            self.load_error = e
        except Exception as e:  # a broken model file can raise anything from onnxruntime
            self.load_error = ModelLoadError(f"cannot load model {model_spec!r}: {e}", cause=repr(e),
                                             path=model_spec)
        if self.load_error is not None:
            log.error("model worker %s: %s", name, self.load_error)
        else:
            log.info("model worker %s: model %s S=%d providers=%s gpus=%s", name, model_spec,
                     self.model.size, self.model.providers, gpu_ids)

    def info(self) -> dict:
        out = {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
               "gpus": [str(g) for g in ray.get_gpu_ids()], "frames": self.frames,
               "fps": round(self.frames / self.busy_s, 2) if self.busy_s else None}
        if self.load_error is not None:
            return {**out, "ready": False, "error": self.load_error.to_info().model_dump()}
        return {**out, "ready": True, "size": self.model.size, "providers": list(self.model.providers)}

    @ray.method(num_returns=2)
    def infer(self, mel: np.ndarray, crops: np.ndarray):
        """(meta, generated crops): `meta` is small, so the job manager can await it without
        pulling the frame data; the crops go straight to the compositor that asked."""
        if self.load_error is not None:
            raise self.load_error
        t0 = time.perf_counter()
        out = self.model.generate(mel, crops)
        dt = time.perf_counter() - t0
        self.frames += len(out)
        self.busy_s += dt
        return {"frames": len(out), "seconds": dt, "worker": self.name}, out
