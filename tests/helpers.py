"""Small helpers shared by the tests."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def decode_all(path: str) -> np.ndarray:
    """Every video frame of a file as one BGR array."""
    from cluster.media.decode import iter_frames

    return np.concatenate(list(iter_frames(path, 32)))
