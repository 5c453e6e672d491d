"""Driver side of the cluster: join or start Ray, reach the job manager, submit and wait.

`Runtime.render(...)` is the Python API behind `lipsync render`; tests and benchmarks use it too.
Calls to the job manager survive its restart: they are retried until their deadline.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors import ORCHESTRATOR_NAME, task_cause
from cluster.config import Settings, get_settings
from cluster.errors import LipsyncError, RenderError, RenderTimeout
from cluster.render import admit, new_job_id
from cluster.schemas import JobStatus, RenderRequest

log = logging.getLogger("lipsync.runtime")


def connect(settings: Settings, address: str | None = None, num_cpus: int | None = None,
            num_gpus: int | None = None) -> None:
    """Join `address` (or `RAY_ADDRESS`), else start an embedded Ray for this process.

    Ray 2.60 enables token authentication by default: an embedded Ray generates its token, and
    joining a cluster needs its token (`RAY_AUTH_TOKEN` or the token file), as Ray documents.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(namespace=settings.namespace, log_to_driver=False, include_dashboard=False)
    if address:
        _check_reachable(address, settings.actor_call_timeout_s)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "an embedded Ray"
        hint = " (a cluster with token authentication also needs its token: RAY_AUTH_TOKEN)" if address else ""
        raise RenderError(f"cannot start or join {where}: {e}{hint}", stage="connect", cause=repr(e)) from e


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast, with the address in the message, when nothing listens at a host:port address
    (ray.init itself keeps retrying such an address for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout, 10.0)).close()
    except OSError as e:
        raise RenderError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS): {e}", stage="connect",
                          cause=repr(e)) from e


class Runtime:
    """A handle on the cluster's job manager (created on first use, named and detached)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()

    def manager(self):
        from actors.orchestrator import create_job_manager

        try:
            return ray.get_actor(ORCHESTRATOR_NAME, namespace=self.settings.namespace)
        except ValueError:
            return create_job_manager(self.settings)

    def call(self, method: str, *args, timeout: float | None = None, **kwargs):
        """Call the job manager, retrying while it restarts, until `timeout` (default actor_call_timeout_s)."""
        deadline = time.monotonic() + (timeout or self.settings.actor_call_timeout_s)
        while True:
            left = deadline - time.monotonic()
            try:
                return ray.get(getattr(self.manager(), method).remote(*args, **kwargs), timeout=max(left, 0.1))
            except RayTaskError as e:  # the manager raised: surface our typed error as itself
                cause = task_cause(e)
                if isinstance(cause, LipsyncError):
                    raise cause from None
                raise
            except (RayActorError, GetTimeoutError) as e:
                if time.monotonic() >= deadline:
                    raise RenderTimeout(f"the job manager did not answer {method} within the deadline: "
                                        f"{type(e).__name__}", cause=str(e)[:2000]) from e
                time.sleep(0.5)

    def ready(self, timeout: float = 120.0) -> dict:
        return self.call("ready", timeout, timeout=timeout + 5)

    def submit(self, request: RenderRequest, job_id: str | None = None) -> JobStatus:
        """Admit (probe + store inputs, typed errors for bad input) here, then hand to the manager."""
        job_id = job_id or new_job_id()
        admitted = admit(job_id, request, self.settings)
        return self.call("submit", job_id, admitted)

    def status(self, job_id: str) -> JobStatus:
        return self.call("get", job_id)

    def cancel(self, job_id: str) -> JobStatus:
        return self.call("cancel", job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.25,
             on_status: Callable[[JobStatus], None] | None = None) -> JobStatus:
        """Poll until the job is terminal; raises RenderTimeout past `timeout` (default job_timeout_s)."""
        deadline = time.monotonic() + (timeout or self.settings.job_timeout_s)
        while True:
            st = self.call("get", job_id, timeout=max(self.settings.actor_call_timeout_s, 60.0))
            if on_status is not None:
                on_status(st)
            if st.state.terminal:
                return st
            if time.monotonic() > deadline:
                raise RenderTimeout(f"job {job_id} still {st.state.value} after the deadline", job_id=job_id)
            time.sleep(poll_s)

    def render(self, request: RenderRequest, timeout: float | None = None,
               on_status: Callable[[JobStatus], None] | None = None) -> JobStatus:
        st = self.submit(request)
        return self.wait(st.id, timeout=timeout, on_status=on_status)

    def workers(self) -> dict:
        return self.call("workers")
