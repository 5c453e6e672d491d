"""A latency-only model for scaling measurements: `latency:<ms_per_frame>[:<size>]`.

It answers like a model on a remote accelerator: each batch takes `ms_per_frame` per frame of
wall time, slept (no CPU used), and the crops come back unchanged (the identity contract). With
it, the scaling benchmark measures the runtime's own overhead and parallelism, not this
machine's cores.
"""
from __future__ import annotations

import time

import numpy as np

from cluster.errors import ModelInferenceError, ModelLoadError
from cluster.schemas import LATENCY_MODEL

SPEC = LATENCY_MODEL


def is_latency_spec(spec: str) -> bool:
    return bool(SPEC.match(spec.strip()))


class LatencyModel:
    """Sleeps `ms_per_frame` per frame of a batch; returns the crops it was given."""

    def __init__(self, ms_per_frame: float, size: int = 96) -> None:
        if size < 32:
            raise ModelLoadError(f"latency model size must be >= 32 pixels, got {size}")
        self.ms_per_frame = float(ms_per_frame)
        self.size = int(size)
        self.path = f"latency:{ms_per_frame:g}:{size}"
        self.batch_fixed = None
        self.providers = ["none (latency-only)"]
        self.crop = "aligned"       # identity contract: any crop comes back as it went in
        self.precision = "none"

    @classmethod
    def from_spec(cls, spec: str) -> LatencyModel:
        m = SPEC.match(spec.strip())
        if not m:
            raise ModelLoadError(f"latency model spec {spec!r} must look like 'latency:<ms_per_frame>[:<size>]'",
                                 path=spec)
        return cls(float(m.group(1)), int(m.group(2) or 96))

    def generate(self, mel_windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (self.size, self.size, 3) or crops.dtype != np.uint8:
            raise ModelInferenceError(f"model {self.path}: crops must be uint8 [B,{self.size},{self.size},3], "
                                      f"got {crops.dtype} {list(crops.shape)}", path=self.path)
        time.sleep(len(crops) * self.ms_per_frame / 1000.0)
        return crops.copy()

    def warmup(self, batch_size: int | None = None) -> float:
        return 0.0
