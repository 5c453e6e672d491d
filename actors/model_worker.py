"""Model worker: one process owns the GPUs Ray assigned it (or a CPU slot) and the models loaded
on them. Its life is a few named steps, as in vLLM's worker: `init_device` (which device: the
GPUs Ray assigned, the providers that really run there), `load_model`, `warm_up` (one batch at
the real batch size, so a TensorRT engine is built before the worker reports ready),
`execute` (`infer`) and `check_health` (`info`). The logic lives in `cluster.models`."""
from __future__ import annotations

import collections
import logging
import os
import threading
import time

import numpy as np
import ray

from actors import metrics
from cluster.config import Settings
from cluster.errors import LipsyncError, ModelLoadError
from cluster.threads import actor_thread_plan, applied_threads

log = logging.getLogger("lipsync.worker")


@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"control": 1, "live": 1})
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
        # the job lane, the live lane and `info` run in three threads: `models` and the counters are read and
        # changed under `_lock` (held briefly); `_load_lock` lets one thread load a model at a time, so two
        # lanes asking for one new model load it once
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        # OpenCV/OpenBLAS now, onnxruntime's intra-op threads at load: from this actor's Ray CPUs
        self.threads = actor_thread_plan(ray.get_runtime_context().get_assigned_resources().get("CPU"),
                                         settings.size_threads)
        self.init_device()
        try:
            self._model(default_model)
        except Exception as e:  # kept in self.errors and reported by info(); never kill __init__
            log.error("model worker %s: %s", name, e)

    # --- lifecycle steps ----------------------------------------------------------------------
    def init_device(self) -> None:
        """The GPUs Ray assigned to this actor and what can really run on them."""
        from cluster.models.providers import CPU, DeviceFacts, device_facts

        self.gpu_ids = list(ray.get_gpu_ids())
        try:
            self.facts = device_facts()
        except Exception as e:  # never kill __init__: without facts the worker runs on the CPU
            log.error("model worker %s: cannot probe devices (%r); using the CPU", self.name, e)
            self.facts = DeviceFacts(available=(CPU,))

    def load_model(self, spec: str):
        """`spec` on every assigned GPU (one session each), else on the CPU."""
        from cluster.models import load_model_on_devices

        return load_model_on_devices(self.model_file(spec), self.settings, self.gpu_ids, self.facts)

    def model_file(self, spec: str) -> str:
        """Where this node reads the model `spec` from. Named models (`builtin`, `latency:`) are
        generated here. A model file lives on the job manager's node: a worker there loads it in
        place; a worker on another node (no shared disk) fetches it once through Ray into its
        node-local cache, by content hash, so a stale file of the same name is never used."""
        from actors import ORCHESTRATOR_NAME
        from actors.calls import outcome_sync
        from cluster.models import is_named_model
        from cluster.nodecache import cached_file

        if is_named_model(spec):
            return spec
        s = self.settings
        manager = ray.get_actor(ORCHESTRATOR_NAME, namespace=s.namespace)
        answer = outcome_sync(manager.model_blob.remote(spec), s.actor_call_timeout_s * 2)
        if not answer.ok:
            raise answer.typed(ModelLoadError, f"cannot ask the job manager for model file {spec}", path=spec)
        blob = answer.value
        if blob["node"] == ray.get_runtime_context().get_node_id():
            return spec

        def fetch(offset: int, length: int) -> bytes:
            part = outcome_sync(manager.read_blob.remote(blob["sha256"], offset, length), s.actor_call_timeout_s * 2)
            if not part.ok:
                raise part.typed(ModelLoadError, f"fetching model file {spec} from the job manager", path=spec)
            return part.value

        path = cached_file(s.node_cache_dir, blob["sha256"], blob["suffix"], fetch, s.transfer_part_bytes,
                           s.node_cache_bytes)
        log.info("model worker %s: model file %s fetched from the job manager's node into %s", self.name, spec, path)
        return str(path)

    def warm_up(self, model) -> float:
        """One batch at the real batch size: arenas sized and any TensorRT engine built now."""
        return model.warmup(self.settings.batch_size)

    def _loaded(self, spec: str):
        with self._lock:
            model = self.models.get(spec)
            if model is not None:
                self.models.move_to_end(spec)
            return model

    def _model(self, spec: str):
        if (model := self._loaded(spec)) is not None:
            return model
        with self._load_lock:
            if (model := self._loaded(spec)) is not None:  # the other lane loaded it meanwhile
                return model
            return self._load(spec)

    def _load(self, spec: str):
        if spec in self.errors:
            err, at = self.errors[spec]
            if time.monotonic() - at < self.settings.model_retry_s:
                raise err  # retried after model_retry_s: a transient failure must not poison a worker
        try:
            model = self.load_model(spec)
            warm_s = self.warm_up(model)
        except LipsyncError as e:
            self.errors[spec] = (e, time.monotonic())
            raise
        except Exception as e:  # a broken model file can raise anything from onnxruntime
            err = ModelLoadError(f"cannot load model {spec!r}: {e}", cause=repr(e), path=spec)
            self.errors[spec] = (err, time.monotonic())
            raise err from e
        self.errors.pop(spec, None)
        log.info("model worker %s: model %s S=%d crop=%s %s providers=%s gpus=%s warm-up %.2f s", self.name,
                 spec, model.size, model.crop, model.precision, model.providers, self.gpu_ids, warm_s)
        with self._lock:
            self.models[spec] = model
            # least recently used first; never the default, nor the model just loaded (with room for one
            # other model, evicting it would reload it at every batch)
            evictable = [k for k in self.models if k not in (self.default_model, spec)]
            unloaded = evictable[: max(0, len(self.models) - self.settings.models_per_worker)]
            for old in unloaded:
                del self.models[old]
        for old in unloaded:
            log.info("model worker %s: unloaded %s", self.name, old)
        return model

    @ray.method(concurrency_group="control")
    def check_health(self) -> dict:
        """Liveness and readiness: whether the default model is loaded, on which providers."""
        with self._lock:  # a snapshot: a lane may load, evict or count meanwhile
            models, frames, busy_s = dict(self.models), self.frames, self.busy_s
        out = {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
               "gpus": [str(g) for g in self.gpu_ids], "frames": frames, "busy_s": round(busy_s, 3),
               "fps": round(frames / busy_s, 2) if busy_s else None,
               "models": list(models), "settings": self.settings.fingerprint(),
               "threads": {**applied_threads(), "onnx_intra_op": {
                   k: m.intra_op_threads for k, m in models.items() if hasattr(m, "intra_op_threads")}}}
        model = models.get(self.default_model)
        if model is None:
            err = self.errors.get(self.default_model, (ModelLoadError("the default model is not loaded"), 0))[0]
            return {**out, "ready": False, "error": err.to_info().model_dump()}
        return {**out, "ready": True, "size": model.size, "crop": model.crop, "precision": model.precision,
                "providers": list(model.providers)}

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        """`check_health` under the name the runtime calls."""
        return self.check_health()

    def describe(self, spec: str) -> dict:
        """Load `spec` if needed; its crop size, crop recipe, precision and providers (raises
        ModelLoadError/ModelContractError)."""
        model = self._model(spec)
        return {"size": model.size, "crop": model.crop, "precision": model.precision,
                "providers": list(model.providers)}

    @ray.method(num_returns=2)
    def execute(self, spec: str, mel: np.ndarray, crops: np.ndarray):
        """(meta, generated crops): `meta` is small, so the job manager can await it without
        pulling the frame data; the crops go straight to the compositor that asked."""
        model = self._model(spec)
        t0 = time.perf_counter()
        out = model.generate(mel, crops)
        dt = time.perf_counter() - t0
        with self._lock:
            self.frames += len(out)
            self.busy_s += dt
        metrics.record_batch(self.name, metrics.device_name(), len(out), dt)
        return {"frames": len(out), "seconds": dt, "worker": self.name}, out

    @ray.method(num_returns=2)
    def infer(self, spec: str, mel: np.ndarray, crops: np.ndarray):
        """`execute` under the name the runtime calls."""
        return self.execute(spec, mel, crops)

    @ray.method(num_returns=2, concurrency_group="live")
    def infer_live(self, spec: str, mel: np.ndarray, crops: np.ndarray):
        """`execute` in the live lane: a live session's (small) batch runs at once in the lane's
        own thread instead of queueing behind job batches, which keep their lane and progress
        meanwhile (one live batch at a time: the live share of the worker is bounded). The lane's
        thread runs at `live_nice` (where permitted)."""
        if not getattr(self, "_live_lane_niced", False):
            from cluster.live.session import raise_priority

            raise_priority(self.settings.live_nice)
            self._live_lane_niced = True
        return self.execute(spec, mel, crops)
