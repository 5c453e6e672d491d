"""Lip-sync models: the ONNX adapter (Wav2Lip contract), the built-in procedural model, the
choice of onnxruntime execution providers, crop recipes and the model directory listing."""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Sequence

import numpy as np

from cluster.config import Settings, get_settings
from cluster.errors import InputError, LipsyncError, ModelInferenceError, ModelLoadError
from cluster.models.adapter import CROP_METADATA_KEY, CROP_RECIPES, LipSyncModel, default_crop
from cluster.models.builtin import build_builtin_model, builtin_model_path
from cluster.models.providers import (
    DeviceFacts,
    active_providers,
    device_facts,
    device_ordinals,
    provider_name,
    select_providers,
    uses_gpu,
)
from cluster.schemas import BUILTIN_MODEL, LATENCY_MODEL, is_builtin_model, is_named_model

__all__ = ["LipSyncModel", "ReplicatedModel", "load_model", "load_model_on_devices", "is_named_model",
           "build_builtin_model", "builtin_model_path", "select_providers", "active_providers", "crop_recipe",
           "CROP_RECIPES", "CROP_METADATA_KEY", "list_models", "crop_for_spec"]


#: Crop sizes of the built-in model that can be asked for (`builtin:S`, where its mouth warp does not fold):
#: Wav2Lip-class models use 96-384
BUILTIN_SIZES = (32, 512)


#: The latency test model's largest crop size (its crops are held in memory batch by batch)
LATENCY_MAX_SIZE = 999


def named_model_problem(spec: str) -> str | None:
    """What is wrong with a named model's crop size (`builtin:S`, `latency:<ms>:S`), else None: the
    built-in one takes sizes in `BUILTIN_SIZES` whose mouth warp does not fold, the latency one 32 or more."""
    m, lat = BUILTIN_MODEL.match(spec.strip()), LATENCY_MODEL.match(spec.strip())
    if m is not None and m.group(1):
        size = int(m.group(1))
        lo, hi = BUILTIN_SIZES
        if not lo <= size <= hi:  # (the ends that work: 512 itself folds, and a probe was told "32-512")
            first = next(n for n in range(lo, hi + 1) if not _builtin_warp_folds(n))
            last = next(n for n in range(hi, lo - 1, -1) if not _builtin_warp_folds(n))
            return f"the built-in model's crop size must be {first}-{last} pixels, got {size}"
        if _builtin_warp_folds(size):
            near = [n for n in (next((n for n in range(size - 1, lo - 1, -1) if not _builtin_warp_folds(n)), None),
                                next((n for n in range(size + 1, hi + 1) if not _builtin_warp_folds(n)), None)) if n]
            return (f"the built-in model's mouth warp folds at a crop size of {size} pixels: choose another"
                    + (f" (the nearest that work: {' or '.join(map(str, near))})" if near else ""))
    elif lat is not None and lat.group(2) and not 32 <= int(lat.group(2)) <= LATENCY_MAX_SIZE:
        return f"the latency model's crop size must be 32-{LATENCY_MAX_SIZE} pixels, got {lat.group(2)}"
    return None


def check_named_model(spec: str | None) -> None:
    """`InputError` (`input.invalid`, field `model`) for a named model of a crop size that cannot work
    (`named_model_problem`); nothing for any other spec, or none."""
    if spec and (problem := named_model_problem(spec)) is not None:
        raise InputError(f"model {spec!r}: {problem}", path="model")


@functools.cache  # one bool for each of the ~480 sizes there are; 0.05-0.7 s of CPU to find out
def _builtin_warp_folds(size: int) -> bool:
    from cluster.models.builtin import _check_fields, warp_fields

    try:
        _check_fields(warp_fields(size), size)
    except AssertionError:
        return True
    return False


def resolve_model_path(spec: str, settings: Settings) -> str:
    """The .onnx path for a model spec ('builtin[:S]' is generated and cached)."""
    m = BUILTIN_MODEL.match(spec)
    if m:
        size = int(m.group(1) or 256)
        if size < 32:
            raise ModelLoadError(f"built-in model size must be >= 32 pixels, got {spec!r}")
        return str(builtin_model_path(settings, size))
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file {path} does not exist (expected 'builtin' or a path to an .onnx file)",
                             path=path)
    return path


def load_model(spec: str | None = None, settings: Settings | None = None,
               providers: list | None = None, pad_batch: int | None = None) -> LipSyncModel:
    """Load the model named by `spec` (default `settings.model`): "builtin" (the built-in
    procedural model at S=256; "builtin:96" / "builtin:384" for other sizes, generated and
    cached under the storage root) or a path to a Wav2Lip-class .onnx file.

    `providers` default: `select_providers(settings=...)`. On a GPU provider every batch is
    padded to `pad_batch` (default `settings.batch_size`): one shape, so no engine rebuild and
    no arena growth.
    Raises ModelLoadError naming the path when the file is missing or unreadable, and
    ModelContractError when the model does not fit the contract.
    """
    s = settings or get_settings()
    spec = (spec if spec is not None else s.model).strip()
    if spec.startswith("latency:"):  # benchmarks: sleeps per frame, no CPU (cluster/models/latency.py)
        from cluster.models.latency import LatencyModel

        return LatencyModel.from_spec(spec)
    path = resolve_model_path(spec, s)
    providers = list(providers) if providers is not None else select_providers(settings=s)
    from cluster.threads import current

    threads = model_intra_op_threads(s, current(), providers, light=is_builtin_model(spec))
    return LipSyncModel.load(path, providers=providers, threads=threads,
                             pad_batch=(pad_batch or s.batch_size) if uses_gpu(providers) else None)


def model_intra_op_threads(settings: Settings, plan, providers: Sequence, light: bool = False) -> int:
    """onnxruntime's intra-op threads for a model session (0: onnxruntime's default, every core):
    `settings.model_threads` when set; else the process's thread plan (a model worker's Ray CPUs,
    `cluster.threads`) with a GPU provider (its CPU threads only feed the GPU) or for a `light`
    model (the built-in one, under 1 ms a crop); a network on the CPU provider gets the default,
    because there it is the CPU work the compositors wait for, and every core speeds it up (idle
    intra-op threads sleep, `allow_spinning=0`). On 2 cores the Wav2Lip-sized model's warm service
    ran 1.46x the frames/s with 2 threads than with 1; the built-in model's 0.99x, and live sessions
    waited longer (p95 0.97 s against 0.62 s) (docs/PERFORMANCE.md)."""
    if settings.model_threads:
        return int(settings.model_threads)
    if plan is not None and (light or uses_gpu(providers)):
        return plan.onnx_intra_op
    return 0


def crop_recipe(model: LipSyncModel, override: str | None = None, settings: Settings | None = None) -> str:
    """The crop recipe for a job: the job's `override`, else `LIPSYNC_CROP`, else the model's own
    (its `lipsync.crop` metadata, else the default for its S)."""
    s = settings or get_settings()
    for choice in (override, s.crop):
        if choice:
            if choice not in CROP_RECIPES:
                raise ModelLoadError(f"unknown crop recipe {choice!r} (expected one of {list(CROP_RECIPES)})")
            return choice
    return model.crop


def crop_for_spec(spec: str, override: str | None = None, settings: Settings | None = None) -> str:
    """`crop_recipe` for a model named by spec, read from the file's metadata and S without
    starting a session (the built-in model: 'aligned')."""
    s = settings or get_settings()
    if override or s.crop:
        return override or s.crop
    if is_named_model(spec):  # the built-in model (and the latency-only one) use the aligned crop
        return "aligned"
    import onnx

    from cluster.models.adapter import contract_from_file

    path = resolve_model_path(spec.strip(), s)
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    crop = props.get(CROP_METADATA_KEY, "").strip().lower()
    return crop if crop in CROP_RECIPES else default_crop(contract_from_file(path).size)


class ReplicatedModel:
    """One model loaded once per GPU a worker was given; a batch is split across the replicas
    and run in threads (onnxruntime releases the GIL). Same interface as LipSyncModel."""

    def __init__(self, replicas: Sequence[LipSyncModel], timeout_s: float) -> None:
        if not replicas:
            raise ValueError("ReplicatedModel needs at least one replica")
        self.replicas = list(replicas)
        self.timeout_s = timeout_s  # a batch's share on one replica (the worker's batch deadline)
        self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="replica")

    def __getattr__(self, name):  # size, crop, precision, path, metadata, ...: the first replica's
        if name == "replicas":
            raise AttributeError(name)
        return getattr(self.replicas[0], name)

    @property
    def providers(self) -> list[str]:
        return self.replicas[0].providers

    def generate(self, mel_windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
        n, k = len(crops), len(self.replicas)
        if k == 1 or n < 2:
            return self.replicas[0].generate(mel_windows, crops)
        bounds = np.linspace(0, n, min(k, n) + 1).round().astype(int)
        futures = [self._pool.submit(r.generate, mel_windows[a:b], crops[a:b])
                   for r, a, b in zip(self.replicas, bounds[:-1], bounds[1:])]
        try:
            return np.concatenate([f.result(timeout=self.timeout_s) for f in futures])
        except FuturesTimeout:
            raise ModelInferenceError(f"a replica of {self.replicas[0].path} did not answer its share of a batch of "
                                      f"{n} within {self.timeout_s:g} s (LIPSYNC_BATCH_TIMEOUT_S)") from None

    def warmup(self, batch_size: int | None = None) -> float:
        return max(r.warmup(batch_size) for r in self.replicas)


def load_model_on_devices(spec: str, settings: Settings, gpu_ids: Sequence | None,
                          facts: DeviceFacts | None = None) -> LipSyncModel | ReplicatedModel:
    """The model on every GPU in `gpu_ids` (the GPUs Ray assigned; [] = none: CPU), one session
    per device; a single session when there is one device or none usable."""
    facts = facts or device_facts()
    first = select_providers(gpu_ids, settings, facts, device_index=0)
    if not uses_gpu(first) or not gpu_ids or len(gpu_ids) < 2:
        return load_model(spec, settings, providers=first)
    k = len(device_ordinals(gpu_ids))
    share = -(-settings.batch_size // k)  # ReplicatedModel gives each replica at most this many
    replicas = [load_model(spec, settings, providers=select_providers(gpu_ids, settings, facts, device_index=i),
                           pad_batch=share) for i in range(k)]
    return ReplicatedModel(replicas, timeout_s=settings.batch_timeout_s)


def list_models(settings: Settings | None = None, facts: DeviceFacts | None = None) -> list[dict]:
    """The models a job can name: 'builtin' and every .onnx file directly in the model directory
    (`settings.dir("models")`, generated built-in files left out), each with its contract (S,
    batch), crop recipe (and where it comes from), precision and the providers it would run on
    here. A file that does not load is listed with its error."""
    s = settings or get_settings()
    facts = facts or device_facts()
    providers = select_providers(None, s, facts)
    names = [provider_name(p) for p in providers]
    specs = ["builtin"] + sorted(str(p) for p in Path(s.dir("models")).glob("*.onnx")
                                 if not p.name.startswith("builtin-"))
    rows = []
    for spec in specs:
        # `name`: what a job or a session names it (`model: tiny96`); `model`: its file (or builtin)
        row: dict = {"name": Path(spec).stem if spec.endswith(".onnx") else spec, "model": spec, "device": names[0]}
        try:
            m = LipSyncModel.load(resolve_model_path(spec, s), providers=[provider_name(providers[-1])])
        except LipsyncError as e:
            rows.append({**row, "error": f"{e.code}: {e.message}"})
            continue
        row.update(size=m.size, batch=m.batch_fixed or "dynamic", precision=m.precision,
                   crop=crop_recipe(m, None, s),
                   crop_from=("LIPSYNC_CROP" if s.crop else "metadata" if CROP_METADATA_KEY in m.metadata
                              else f"default for S={m.size}"),
                   providers=names)
        rows.append(row)
    return rows
