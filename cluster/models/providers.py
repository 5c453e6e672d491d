"""Which onnxruntime execution providers a model session should use.

onnxruntime-gpu lists CUDA and TensorRT in `get_available_providers()` whenever it was built with
them, even on a machine without a GPU, and Ray sets `CUDA_VISIBLE_DEVICES` in GPU actors even when
the GPUs are only logical. So the choice is made from what is really usable: the CUDA driver
loads and reports at least one visible device (`cuInit` + `cuDeviceGetCount` through ctypes, which
honours `CUDA_VISIBLE_DEVICES`), and the provider is available. TensorRT comes first where its
runtime library is present too, then CUDA, always CPU last. Device ids are 0: Ray remaps the
visible devices of an actor so that its own GPU is device 0.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any, Sequence

from cluster.config import Settings, get_settings

log = logging.getLogger("lipsync.models")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

_TENSORRT_LIBS = ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")
_logged_choices: set[tuple] = set()


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices this process can really use (0 when the driver is missing, fails
    to initialise, or `CUDA_VISIBLE_DEVICES` hides every device). Cached per process."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        log.debug("no CUDA driver: %s", exc)
        return 0
    rc = libcuda.cuInit(0)
    if rc != 0:  # e.g. 100 CUDA_ERROR_NO_DEVICE
        log.debug("cuInit failed with CUresult %d", rc)
        return 0
    count = ctypes.c_int(0)
    rc = libcuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        log.debug("cuDeviceGetCount failed with CUresult %d", rc)
        return 0
    return int(count.value)


@functools.lru_cache(maxsize=1)
def tensorrt_runtime_present() -> bool:
    """Whether the TensorRT runtime library (libnvinfer) can be loaded."""
    for name in _TENSORRT_LIBS:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def select_providers(gpu_ids: Sequence[Any] | None = None,
                     settings: Settings | None = None) -> list[str | tuple[str, dict]]:
    """Execution providers for a model session, best first, always ending with CPU.

    `gpu_ids` are the GPUs assigned to the caller (e.g. `ray.get_gpu_ids()`): an empty list means
    "no GPU assigned" and gives CPU only; None means "decide from the machine". A GPU provider is
    chosen only when a CUDA device really exists and onnxruntime offers the provider. TensorRT
    engines are cached under `settings.dir("models")/tensorrt` so only the first load of a model
    pays for the engine build. The choice is logged once per process (logger "lipsync.models").
    """
    available = _available()
    providers: list[str | tuple[str, dict]] = []
    reason: str
    if gpu_ids is not None and len(gpu_ids) == 0:
        reason = "no GPU assigned"
    else:
        n_devices = cuda_device_count()
        if n_devices == 0:
            reason = "no usable CUDA device"
        else:
            reason = f"{n_devices} CUDA device(s) visible"
            if TENSORRT in available and tensorrt_runtime_present():
                cache = (settings or get_settings()).dir("models") / "tensorrt"
                cache.mkdir(parents=True, exist_ok=True)
                providers.append((TENSORRT, {"device_id": 0, "trt_engine_cache_enable": True,
                                             "trt_engine_cache_path": str(cache),
                                             "trt_timing_cache_enable": True,
                                             "trt_timing_cache_path": str(cache)}))
            if CUDA in available:
                providers.append((CUDA, {"device_id": 0}))
            if not providers:
                reason += f", but onnxruntime offers no GPU provider (available: {available})"
    providers.append(CPU)
    key = (tuple(p if isinstance(p, str) else p[0] for p in providers), reason)
    if key not in _logged_choices:
        _logged_choices.add(key)
        log.info("onnxruntime providers: %s (%s; gpu_ids=%s)", list(key[0]), reason,
                 None if gpu_ids is None else list(gpu_ids))
    return providers


def active_providers(session) -> list[str]:
    """The providers an onnxruntime session really uses (it drops ones that failed to start)."""
    return list(session.get_providers())
