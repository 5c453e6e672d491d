"""Measurements taken in plain Python (no Ray here), reported to whoever listens.

Code in `cluster/` says what happened (`emit("avatar_cache", result="hit")`) or times a step
(`with timed("stage_seconds", stage="detect"): ...`); a Ray process turns that into Prometheus
metrics by installing `actors.metrics` as a listener. Without a listener (tests, `--local`) an
event costs one function call. A listener that raises is logged and never breaks the caller.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

Listener = Callable[[str, float, dict], None]

log = logging.getLogger("lipsync.telemetry")
_listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Register `listener(name, value, tags)` once (a second registration is ignored)."""
    if listener not in _listeners:
        _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def emit(name: str, value: float = 1.0, **tags: object) -> None:
    """Report `value` of the measurement `name` with `tags` (stringified) to every listener."""
    if not _listeners:
        return
    str_tags = {k: str(v) for k, v in tags.items()}
    for listener in list(_listeners):
        try:
            listener(name, float(value), str_tags)
        except Exception:  # a broken metrics exporter must never fail a render
            log.exception("telemetry listener %r failed on %s", listener, name)


@contextlib.contextmanager
def timed(name: str, **tags: object) -> Iterator[None]:
    """Emit the wall time of the block as `name` (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        emit(name, time.perf_counter() - start, **tags)
