"""Model worker: one process owns one GPU (or a CPU slot) and the models loaded on it."""
from __future__ import annotations

import collections
import logging
import os
import time

import numpy as np
import ray

from actors import metrics
from cluster.config import Settings
from cluster.errors import LipsyncError, ModelLoadError

log = logging.getLogger("lipsync.worker")

@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"control": 1})
class ModelWorker:
    """Loads the default model once (and warms it up) in `__init__`; other models a job asks for
    are loaded on first use and kept (least recently used out first, the default never).

    A load failure does not raise from `__init__` (Ray would not restart such an actor, and the
    error would surface only as a dead handle): it is kept and reported by `info`/`describe`,
    and every `infer` on that model raises it, so each job fails with `model.load_failed`.
    `info` runs in its own concurrency group: it answers while a batch runs, so only a process
    that is really stuck stops answering it.
    """

    def __init__(self, default_model: str, settings: Settings, name: str) -> None:
        self.name, self.default_model, self.settings = name, default_model, settings
        metrics.install(name, settings.log_format)
        self.models: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.errors: dict[str, tuple[LipsyncError, float]] = {}
        self.frames = 0
        self.busy_s = 0.0
        try:
            self._model(default_model)
        except Exception as e:  # kept in self.errors and reported by info(); never kill __init__
            log.error("model worker %s: %s", name, e)

    def _model(self, spec: str):
        if spec in self.models:
            self.models.move_to_end(spec)
            return self.models[spec]
        if spec in self.errors:
            err, at = self.errors[spec]
            if time.monotonic() - at < self.settings.model_retry_s:
                raise err  # retried after model_retry_s: a transient failure must not poison a worker
        try:
            from cluster.models import load_model
            from cluster.models.providers import select_providers

            gpu_ids = ray.get_gpu_ids()
            model = load_model(spec, self.settings, providers=select_providers(gpu_ids))
            model.warmup(self.settings.batch_size)  # the real batch size: arenas sized once
        except LipsyncError as e:
            self.errors[spec] = (e, time.monotonic())
            raise
        except Exception as e:  # a broken model file can raise anything from onnxruntime
            err = ModelLoadError(f"cannot load model {spec!r}: {e}", cause=repr(e), path=spec)
            self.errors[spec] = (err, time.monotonic())
            raise err from e
        self.errors.pop(spec, None)
        log.info("model worker %s: model %s S=%d providers=%s gpus=%s", self.name, spec, model.size,
                 model.providers, gpu_ids)
        self.models[spec] = model
        for old in [k for k in self.models if k != self.default_model][: max(0, len(self.models) -
                                                                              self.settings.models_per_worker)]:
            del self.models[old]
            log.info("model worker %s: unloaded %s", self.name, old)
        return model

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        out = {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
               "gpus": [str(g) for g in ray.get_gpu_ids()], "frames": self.frames,
               "fps": round(self.frames / self.busy_s, 2) if self.busy_s else None,
               "models": list(self.models), "settings": self.settings.fingerprint()}
        model = self.models.get(self.default_model)
        if model is None:
            err = self.errors.get(self.default_model, (ModelLoadError("the default model is not loaded"), 0))[0]
            return {**out, "ready": False, "error": err.to_info().model_dump()}
        return {**out, "ready": True, "size": model.size, "providers": list(model.providers)}

    def describe(self, spec: str) -> dict:
        """Load `spec` if needed; its crop size and providers (raises ModelLoadError/ModelContractError)."""
        model = self._model(spec)
        return {"size": model.size, "providers": list(model.providers)}

    @ray.method(num_returns=2)
    def infer(self, spec: str, mel: np.ndarray, crops: np.ndarray):
        """(meta, generated crops): `meta` is small, so the job manager can await it without
        pulling the frame data; the crops go straight to the compositor that asked."""
        model = self._model(spec)
        t0 = time.perf_counter()
        out = model.generate(mel, crops)
        dt = time.perf_counter() - t0
        self.frames += len(out)
        self.busy_s += dt
        metrics.record_batch(self.name, metrics.device_name(), len(out), dt)
        return {"frames": len(out), "seconds": dt, "worker": self.name}, out
