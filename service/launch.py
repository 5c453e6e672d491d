"""`lipsync serve`: start (or join) Ray, the job manager and the Serve app (`service.deployment`) on one
port, and take them down again. The CLI's `serve` command calls these."""
from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable

import ray

from cluster.config import Settings
from cluster.errors import RenderError

log = logging.getLogger("lipsync.service")


def start_service(settings: Settings, host: str, port: int, *, address: str | None = None,
                  num_cpus: int | None = None, num_gpus: int | None = None, dashboard: bool = False,
                  dashboard_port: int | None = None, ray_temp_dir: str | None = None,
                  ready_timeout_s: float = 300.0, on_ray_started: Callable[[], None] | None = None,
                  stop: threading.Event | None = None) -> dict:
    """Start (or join) Ray, the job manager and the Serve app on host:port; the URLs, when ready.

    `on_ray_started` runs as soon as Ray is up (e.g. to install signal handlers: Ray's own
    replaces any installed before). When `stop` is set meanwhile, the start ends early with
    `ready: False`; the caller then takes down what was started (`stop_service`)."""
    from ray import serve

    from actors.runtime import Runtime, _check_reachable, embedded_cpus
    from actors.service_support import service_sidecar
    from service.deployment import build_app

    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = dict(namespace=settings.namespace, log_to_driver=False)
    try:
        if address:
            _check_reachable(address, settings.actor_call_timeout_s)
            ctx = ray.init(address=address, **kwargs)
        else:
            ctx = ray.init(address="local", num_cpus=num_cpus or embedded_cpus(settings), num_gpus=num_gpus,
                           include_dashboard=dashboard,
                           dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                           _temp_dir=ray_temp_dir, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = " (a cluster with token authentication also needs its token: RAY_AUTH_TOKEN)" if address else ""
        raise RenderError(f"cannot start or join Ray: {e}{hint}", stage="connect", cause=repr(e)) from e
    if on_ray_started is not None:
        on_ray_started()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    dash = getattr(ctx, "dashboard_url", None) or ""
    urls = {"api": url, "docs": url + "/docs", "dashboard": f"http://{dash}" if dash else None,
            "embedded": not address, "ready": False}
    stopped = lambda: stop is not None and stop.is_set()  # noqa: E731
    rt = Runtime(settings)
    rt.manager()  # the named job manager exists before the first request; it resumes unfinished jobs
    service_sidecar(settings)  # resumes pending callbacks
    if stopped():
        return urls
    serve.start(http_options={"host": host, "port": port})
    overrides = settings.model_dump(mode="json")
    if settings.api_token is not None:
        overrides["api_token"] = settings.api_token.get_secret_value()
    if stopped():
        return urls
    serve.run(build_app(overrides), name="lipsync", route_prefix="/", blocking=False)
    deadline = time.monotonic() + ready_timeout_s
    while not stopped():
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:  # noqa: S310 (our own loopback URL)
                if r.status == 200:
                    return {**urls, "ready": True}
        except OSError as e:
            if time.monotonic() > deadline:
                raise RenderError(f"the service did not answer on {url} within {ready_timeout_s:.0f} s: {e}",
                                  stage="serve") from e
        time.sleep(0.3)
    return urls


def stop_service(embedded: bool) -> None:
    """Take the app down; an embedded Ray goes with it (unfinished jobs resume on the next start)."""
    from ray import serve

    try:
        if embedded:
            serve.shutdown()
        else:
            serve.delete("lipsync")
    except Exception as e:  # shutting down anyway
        log.warning("serve shutdown: %r", e)
    ray.shutdown()


