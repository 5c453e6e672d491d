"""The Ray Serve deployment of the service: `lipsync-ingress`, a FastAPI ingress built by
`service.app.create_app` on the job manager's gateway. `serve_app.py` (the entry point that
`serve run serve_app:app` and the RayService config name) exposes `build_app` and `app` from here."""
from __future__ import annotations

import logging

from cluster.config import Settings


def _deployment():
    from ray import serve

    # a replica that died is found (and another started) within the health check's period: at 10 s a probe's
    # killed replica left the API and its live sessions' sockets without an answer for 9-10 s
    @serve.deployment(name="lipsync-ingress", ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=200, health_check_period_s=2)
    @serve.ingress()
    class Ingress:
        def __init__(self, settings: dict | None = None) -> None:
            from actors import metrics

            logging.basicConfig(level=logging.INFO)
            self.settings = Settings(**(settings or {}))
            from service.errors import QuietProxyLoss

            metrics.install("lipsync-ingress", self.settings.log_format)  # JSON logs with actor and node
            logging.getLogger("ray.serve").addFilter(QuietProxyLoss())
            if warning := self.settings.live_token_warning():  # (a RayService has no `lipsync serve` to say it)
                logging.getLogger("lipsync.service").warning("%s", warning)

        def __serve_build_asgi_app__(self):
            from actors.service_support import ManagerGateway
            from service.app import create_app

            return create_app(self.settings, ManagerGateway(self.settings))

    return Ingress


def build_app(args: dict | None = None):
    """A Serve application; `args` override LIPSYNC_* settings (a Serve config's `args`)."""
    settings = Settings(**(args or {}))
    # replicas get what this process was given (the args, its LIPSYNC_* environment) and read the rest
    # from their own environment: Serve's build task may run on another node than the replicas, and a
    # default dumped here (no API token on that node) would override the replicas' own (the head's)
    overrides = settings.overrides(only_set=True)
    options: dict = {"num_replicas": settings.serve_replicas}
    if settings.manager_resource:  # on the job manager's node, as the docs and the KubeRay manifest place it
        options["ray_actor_options"] = {"num_cpus": 0, "resources": {settings.manager_resource: 0.01}}
    return _deployment().options(**options).bind(overrides)
