"""Who owns a job: the deployment that admitted it. An embedded run (`lipsync render` with its own
Ray) is named after its process, so a later run can tell that it is gone and end its jobs as
`job.abandoned` instead of rendering them.
"""
from __future__ import annotations

import os
import socket

EMBEDDED_PREFIX = "embedded:"


def process_identity(pid: int | None = None) -> str:
    """`embedded:<host>:<pid>:<start time>` of this process (the start time tells a reused pid apart)."""
    import psutil

    proc = psutil.Process(pid or os.getpid())
    return f"{EMBEDDED_PREFIX}{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"


def _process_here(identity: str | None) -> tuple[int, float] | None:
    """(pid, start time) of the process `identity` names when it is an embedded run of this host; None for
    anything else (a cluster deployment, another host, no owner, a malformed name)."""
    if not identity or not identity.startswith(EMBEDDED_PREFIX):
        return None
    try:
        host, pid, started = identity[len(EMBEDDED_PREFIX):].rsplit(":", 2)
        return (int(pid), float(started)) if host == socket.gethostname() else None
    except ValueError:
        return None


def _runs(pid: int, started: float) -> bool:
    """Whether process `pid` is still the one started at `started` (not gone, not a pid used again)."""
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) <= 0.05
    except psutil.NoSuchProcess:
        return False


def identity_gone(identity: str | None) -> bool:
    """True when `identity` names an embedded run on this host whose process no longer exists.
    Anything else (a cluster deployment, another host, no owner) is not known to be gone."""
    process = _process_here(identity)
    return process is not None and not _runs(*process)


def identity_alive(identity: str | None) -> bool:
    """True when `identity` names an embedded run on this host whose process still runs: a run known to be
    rendering its jobs. Anything else (a cluster deployment, another host, a process gone) is not known to."""
    process = _process_here(identity)
    return process is not None and _runs(*process)
