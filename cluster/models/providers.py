"""Which onnxruntime execution providers a model session uses, and their options.

onnxruntime-gpu lists CUDA and TensorRT in `get_available_providers()` whenever it was built with
them, even on a machine without a GPU, and Ray sets `CUDA_VISIBLE_DEVICES` in GPU actors even when
the GPUs are only logical. So the choice is made from `DeviceFacts`, what is really usable: the
CUDA driver loads and reports visible devices (`cuInit` + `cuDeviceGetCount` through ctypes, which
honours `CUDA_VISIBLE_DEVICES`), the provider is available, and for TensorRT its runtime library
loads. The facts can be injected, so the choice is tested on machines without a GPU.

The choice (`select_providers`):
- `LIPSYNC_PROVIDERS` (e.g. `cuda,cpu`, `tensorrt,cuda,cpu`, `cpu`) chooses explicitly; a GPU
  provider named there that cannot run here is left out (logged), CPU is always last;
- default: CUDA when a CUDA device really exists (and the caller was assigned a GPU), else CPU.
  TensorRT is never chosen by default: it builds an engine per input shape, minutes per model.
- the device is the one Ray assigned (`device_ordinals`), not always 0;
- a worker with a fraction of a GPU (`LIPSYNC_WORKER_GPUS` < 1) gets `gpu_mem_limit` = that
  fraction of the device's memory, so workers sharing a GPU cannot starve each other;
- TensorRT gets batch profiles (min 1, opt and max the batch size; the adapter pads every batch
  to that size, so one engine serves all) and an engine + timing cache under the storage root.
  Profiles need the model's input names and crop size: `tensorrt_profiles` fills them in once the
  contract is known (`LipSyncModel.load` does it).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from cluster.config import Settings, get_settings
from cluster.errors import ModelLoadError

log = logging.getLogger("lipsync.models")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT}
GPU_PROVIDERS = (TENSORRT, CUDA)

_TENSORRT_LIBS = ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")
_logged_choices: set[tuple] = set()


@dataclass(frozen=True)
class DeviceFacts:
    """What this process can really run on. `device_memory`: bytes per visible device ordinal."""
    available: tuple[str, ...]
    cuda_devices: int = 0
    tensorrt_runtime: bool = False
    device_memory: tuple[int, ...] = field(default=())


def _libcuda():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        log.debug("no CUDA driver: %s", exc)
        return None
    rc = lib.cuInit(0)
    if rc != 0:  # e.g. 100 CUDA_ERROR_NO_DEVICE
        log.debug("cuInit failed with CUresult %d", rc)
        return None
    return lib


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices this process can really use (0 when the driver is missing, fails
    to initialise, or `CUDA_VISIBLE_DEVICES` hides every device). Cached per process."""
    lib = _libcuda()
    if lib is None:
        return 0
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        log.debug("cuDeviceGetCount failed with CUresult %d", rc)
        return 0
    return int(count.value)


@functools.lru_cache(maxsize=1)
def cuda_device_memory() -> tuple[int, ...]:
    """Total memory in bytes of each visible CUDA device (empty without a usable device)."""
    lib = _libcuda()
    out = []
    for ordinal in range(cuda_device_count()):
        dev, total = ctypes.c_int(0), ctypes.c_size_t(0)
        if lib.cuDeviceGet(ctypes.byref(dev), ordinal) != 0 or lib.cuDeviceTotalMem_v2(ctypes.byref(total), dev) != 0:
            return tuple(out)
        out.append(int(total.value))
    return tuple(out)


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


def device_facts() -> DeviceFacts:
    """The facts of this process (cached probes)."""
    import onnxruntime as ort

    n = cuda_device_count()
    return DeviceFacts(available=tuple(ort.get_available_providers()), cuda_devices=n,
                       tensorrt_runtime=n > 0 and tensorrt_runtime_present(),
                       device_memory=cuda_device_memory() if n else ())


def parse_providers(text: str) -> list[str]:
    """'tensorrt,cuda,cpu' -> onnxruntime provider names, CPU appended when missing.

    Raises ModelLoadError for an unknown name (the setting is LIPSYNC_PROVIDERS)."""
    names = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part not in PROVIDER_NAMES:
            raise ModelLoadError(f"LIPSYNC_PROVIDERS: unknown provider {part!r} in {text!r} "
                                 f"(expected a comma-separated list of {sorted(PROVIDER_NAMES)})")
        if PROVIDER_NAMES[part] not in names:
            names.append(PROVIDER_NAMES[part])
    if CPU not in names:
        names.append(CPU)
    return names[:names.index(CPU) + 1]


#: CUDA provider options `LIPSYNC_CUDA_OPTIONS` may set (onnxruntime's names); others are refused.
CUDA_OPTION_NAMES = ("prefer_nhwc", "cudnn_conv_algo_search", "cudnn_conv_use_max_workspace",
                     "cudnn_conv1d_pad_to_nc1d", "do_copy_in_default_stream", "arena_extend_strategy",
                     "enable_cuda_graph", "use_tf32", "tunable_op_enable", "tunable_op_tuning_enable")


def parse_cuda_options(text: str) -> dict[str, str]:
    """'prefer_nhwc=1,cudnn_conv_algo_search=EXHAUSTIVE' -> {name: value} for the CUDA provider.

    Raises ModelLoadError for a malformed pair or a name not in `CUDA_OPTION_NAMES` (the setting
    is LIPSYNC_CUDA_OPTIONS): a misspelt option must not be silently ignored."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = (x.strip() for x in part.partition("="))
        if not sep or not name or not value:
            raise ModelLoadError(f"LIPSYNC_CUDA_OPTIONS: {part!r} in {text!r} is not key=value")
        if name not in CUDA_OPTION_NAMES:
            raise ModelLoadError(f"LIPSYNC_CUDA_OPTIONS: unknown CUDA provider option {name!r} "
                                 f"(expected one of {list(CUDA_OPTION_NAMES)})")
        out[name] = value
    return out


def device_ordinals(gpu_ids: Sequence[Any] | None, visible: str | None = None) -> list[int]:
    """CUDA device ordinals (as this process sees them) of the GPUs Ray assigned.

    Ray sets `CUDA_VISIBLE_DEVICES` to the assigned ids, so the k-th assigned GPU is ordinal k;
    when the variable does not list them (Ray told not to set it), the id is the ordinal.
    None or [] (no assignment known): ordinal 0."""
    if not gpu_ids:
        return [0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    listed = [v.strip() for v in (visible or "").split(",") if v.strip()]
    out = []
    for k, g in enumerate(gpu_ids):
        g = str(g)
        out.append(listed.index(g) if g in listed else (k if listed else int(float(g))))
    return out


def select_providers(gpu_ids: Sequence[Any] | None = None, settings: Settings | None = None,
                     facts: DeviceFacts | None = None, device_index: int = 0) -> list:
    """Execution providers (with options) for one model session, best first, CPU last.

    `gpu_ids`: the GPUs assigned to the caller (`ray.get_gpu_ids()`); [] means none assigned
    (CPU only), None means "decide from the machine". `device_index` picks which of them (a
    worker with 2 GPUs loads one session per GPU). `facts` default: `device_facts()`.
    The choice is logged once per process (logger "lipsync.models").
    """
    s = settings or get_settings()
    facts = facts or device_facts()
    wanted = parse_providers(s.providers) if s.providers.strip() else [CUDA, CPU]
    explicit = bool(s.providers.strip())
    providers: list = []
    notes = []
    if gpu_ids is not None and len(gpu_ids) == 0:
        notes.append("no GPU assigned")
    elif facts.cuda_devices == 0:
        notes.append("no usable CUDA device")
    elif (ordinal := device_ordinals(gpu_ids)[device_index]) >= facts.cuda_devices:
        notes.append(f"assigned GPU ordinal {ordinal} is not among the {facts.cuda_devices} visible CUDA device(s)")
    else:
        notes.append(f"{facts.cuda_devices} CUDA device(s) visible, using ordinal {ordinal}")
        cuda_opts: dict = {**parse_cuda_options(s.cuda_options), "device_id": ordinal}
        if s.worker_gpus < 1 and ordinal < len(facts.device_memory):
            cuda_opts["gpu_mem_limit"] = int(facts.device_memory[ordinal] * s.worker_gpus)
        for name in wanted:
            if name == CPU:
                break
            if name not in facts.available:
                notes.append(f"{name} not offered by onnxruntime")
            elif name == TENSORRT and not facts.tensorrt_runtime:
                notes.append("TensorRT runtime (libnvinfer) not found")
            elif name == TENSORRT:
                cache = s.dir("models") / "tensorrt"
                providers.append((TENSORRT, {"device_id": ordinal, "trt_engine_cache_enable": True,
                                             "trt_engine_cache_path": str(cache),
                                             "trt_timing_cache_enable": True,
                                             "trt_timing_cache_path": str(cache),
                                             "trt_fp16_enable": False}))
            else:
                providers.append((CUDA, dict(cuda_opts)))
    if explicit and not providers and any(n != CPU for n in wanted):
        notes.append(f"LIPSYNC_PROVIDERS={s.providers!r} asked for a GPU")
    providers.append(CPU)
    key = (tuple(provider_name(p) for p in providers), tuple(notes))
    if key not in _logged_choices:
        _logged_choices.add(key)
        # a GPU the user named and did not get is a warning: the models run on the CPU, many times slower
        gpu_refused = explicit and not uses_gpu(providers) and any(n != CPU for n in wanted)
        log.log(logging.WARNING if gpu_refused else logging.INFO, "onnxruntime providers: %s (%s; gpu_ids=%s)",
                list(key[0]), "; ".join(notes), None if gpu_ids is None else list(gpu_ids))
    return providers


def provider_name(p) -> str:
    return p if isinstance(p, str) else p[0]


def uses_gpu(providers: Sequence) -> bool:
    return any(provider_name(p) in GPU_PROVIDERS for p in providers)


def tensorrt_profiles(providers: Sequence, mel_name: str, face_name: str, size: int, batch: int) -> list:
    """The providers with TensorRT's shape profiles filled in: min batch 1, opt and max `batch`
    (the adapter pads every batch to `batch`, so the engine is built once, at warm-up)."""
    def shapes(b: int) -> str:
        return f"{mel_name}:{b}x1x80x16,{face_name}:{b}x6x{size}x{size}"

    out = []
    for p in providers:
        if provider_name(p) == TENSORRT:
            opts = dict(p[1]) if not isinstance(p, str) else {}
            opts.setdefault("trt_profile_min_shapes", shapes(1))
            opts.setdefault("trt_profile_opt_shapes", shapes(batch))
            opts.setdefault("trt_profile_max_shapes", shapes(batch))
            p = (TENSORRT, opts)
        out.append(p)
    return out


def tensorrt_cache_of_model(providers: Sequence, model_key: str) -> list:
    """The providers with TensorRT's engine and timing caches in a directory of this model's own
    (`model_key`: its content hash): onnxruntime names a cached engine after the graph's names, not
    its weights, so a retrained model saved under the same name would otherwise get the old engine."""
    out = []
    for p in providers:
        if provider_name(p) == TENSORRT and not isinstance(p, str):
            opts = dict(p[1])
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                if opts.get(key):
                    opts[key] = os.path.join(opts[key], model_key)
                    os.makedirs(opts[key], exist_ok=True)
            p = (TENSORRT, opts)
        out.append(p)
    return out


def active_providers(session) -> list[str]:
    """The providers an onnxruntime session really uses (it drops ones that failed to start)."""
    return list(session.get_providers())
