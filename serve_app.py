"""The HTTP service's Ray Serve entry point (`serve_app:app`): one deployment, `lipsync-ingress`,
whose FastAPI app is built by `service.app.create_app` (routers per resource under `service/`).

The ingress is stateless: it streams uploads to a node-local temporary file, sends them to the
job manager through Ray in parts, submits, and returns `202`; it never awaits a render. Status,
events and results are read from the named job manager. It runs on any node.

    serve run serve_app:app                    # settings from LIPSYNC_* env
    lipsync serve --port 8000                  # embedded Ray head (or RAY_ADDRESS) + this app

A Serve config file may name `serve_app:app` or the builder `serve_app:build_app` (its `args`
override LIPSYNC_* settings, e.g. `{"max_queued_jobs": 32}`).
"""
from __future__ import annotations

from service.deployment import build_app  # noqa: F401  (the builder a Serve config may name)


def __getattr__(name: str):
    if name == "app":  # built on first use so that importing this module stays cheap
        return build_app()
    raise AttributeError(name)
