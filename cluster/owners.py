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


def identity_gone(identity: str | None) -> bool:
    """True when `identity` names an embedded run on this host whose process no longer exists.
    Anything else (a cluster deployment, another host, no owner) is not known to be gone."""
    import psutil

    if not identity or not identity.startswith(EMBEDDED_PREFIX):
        return False
    try:
        host, pid, started = identity[len(EMBEDDED_PREFIX):].rsplit(":", 2)
        pid_n, started_f = int(pid), float(started)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(pid_n).create_time() - started_f) > 0.05
    except psutil.NoSuchProcess:
        return True


def identity_alive(identity: str | None) -> bool:
    """True when `identity` names an embedded run on this host whose process still runs: a run known to be
    rendering its jobs. Anything else (a cluster deployment, another host, a process gone) is not known to."""
    if not identity or not identity.startswith(EMBEDDED_PREFIX):
        return False
    try:
        host = identity[len(EMBEDDED_PREFIX):].rsplit(":", 2)[0]
    except ValueError:
        return False
    return host == socket.gethostname() and not identity_gone(identity)
