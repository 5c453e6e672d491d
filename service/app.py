"""The app factory: the FastAPI app of the service on a job-manager gateway, built from one
router per resource. The API routers each require the bearer token (`service.auth.require_token`,
when `LIPSYNC_API_TOKEN` is set); public routers (health's `/healthz` and `/readyz`, the web page) don't."""
from __future__ import annotations

from fastapi import FastAPI

from cluster.config import Settings
from cluster.hls import watch_key
from service.backend import Backend
from service.errors import install_exception_handlers, openapi_with_one_error_body
from service.routers import avatars, batches, compat, health, jobs, media, sessions, uploads, web


def create_app(settings: Settings, gateway) -> FastAPI:
    """The FastAPI app of the service, on `gateway` (the job manager's async handle,
    `actors.service_support.ManagerGateway`)."""
    app = FastAPI(title="lipsync-cluster", version="0.1.0",
                  description="Lip-sync rendering jobs: submit audio + a template video, poll or stream "
                              "status, download the mp4. Bearer-token auth when LIPSYNC_API_TOKEN is set.")
    app.state.settings = settings
    app.state.backend = Backend(settings, gateway)
    app.state.api_token = settings.api_token.get_secret_value().encode() if settings.api_token else None
    app.state.watch_key = watch_key(settings.api_token.get_secret_value()) if settings.api_token else None
    install_exception_handlers(app)

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(media.router)
    app.include_router(media.hls_router)  # the bearer token or a signed ?token= (players send no header)
    app.include_router(avatars.router)
    app.include_router(batches.router)
    app.include_router(uploads.router)
    app.include_router(web.router)  # public: the page `/` and its files `/static/...`
    app.include_router(sessions.router)
    app.include_router(sessions.public_router)  # the socket and the stream: the session's own token
    app.include_router(compat.router)  # the last HTTP routes: its result route matches `<any prefix>temp/<code>-r.mp4`
    app.include_router(sessions.unknown_socket_router)  # (WebSocket paths only)
    app.openapi = lambda: openapi_with_one_error_body(app)
    return app
