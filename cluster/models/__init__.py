"""Lip-sync models: the ONNX adapter (Wav2Lip contract), the built-in procedural model and the
choice of onnxruntime execution providers."""
from __future__ import annotations

import os
import re

from cluster.config import Settings, get_settings
from cluster.errors import ModelLoadError
from cluster.models.adapter import LipSyncModel
from cluster.models.builtin import build_builtin_model, builtin_model_path
from cluster.models.providers import active_providers, select_providers

__all__ = ["LipSyncModel", "load_model", "is_named_model", "build_builtin_model", "builtin_model_path",
           "select_providers", "active_providers"]

_BUILTIN = re.compile(r"^builtin(?:[:\-](\d+))?$")


def is_named_model(spec: str) -> bool:
    """Whether `spec` names a model that is not a file: `builtin[:S]` or `latency:<ms>[:S]`."""
    from cluster.models.latency import is_latency_spec

    return bool(_BUILTIN.match(spec.strip())) or is_latency_spec(spec)


def load_model(spec: str | None = None, settings: Settings | None = None,
               providers: list | None = None) -> LipSyncModel:
    """Load the model named by `spec` (default `settings.model`): "builtin" (the built-in
    procedural model at S=256; "builtin:96" / "builtin:384" for other sizes, generated and
    cached under the storage root) or a path to a Wav2Lip-class .onnx file.

    Raises ModelLoadError naming the path when the file is missing or unreadable, and
    ModelContractError when the model does not fit the contract.
    """
    s = settings or get_settings()
    spec = (spec if spec is not None else s.model).strip()
    if spec.startswith("latency:"):  # benchmarks: sleeps per frame, no CPU (cluster/models/latency.py)
        from cluster.models.latency import LatencyModel

        return LatencyModel.from_spec(spec)
    m = _BUILTIN.match(spec)
    if m:
        size = int(m.group(1) or 256)
        if size < 32:
            raise ModelLoadError(f"built-in model size must be >= 32 pixels, got {spec!r}")
        return LipSyncModel.load(builtin_model_path(s, size), providers=providers, threads=s.model_threads)
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file {path} does not exist (expected 'builtin' or a path to an .onnx file)",
                             path=path)
    return LipSyncModel.load(path, providers=providers, threads=s.model_threads)
