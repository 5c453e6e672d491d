"""`/healthz` (the process is up) and `/readyz` (the job manager and its workers), both public: a
kubelet's or load balancer's probe carries no token, and neither says more than counts."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from cluster.errors import LipsyncError
from cluster.schemas import ApiError
from service.backend import Backend, get_backend
from service.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"ok": True}


@router.get("/readyz", summary="Job manager reachable and model workers loaded (503 until then)",
            responses={503: {"model": ApiError}})
async def readyz(backend: Backend = Depends(get_backend)) -> JSONResponse:
    retry = {"Retry-After": str(backend.settings.retry_after_s)}
    try:
        state = await backend.gateway.ready(timeout=2.0)
    except (LipsyncError, asyncio.TimeoutError) as e:
        return error_response(503, "service.not_ready", f"job manager not ready: {e}", None, retry)
    live = [m for m in state.get("models", []) if m.get("health") == "live"]
    comps = [m for m in state.get("compositors", []) if m.get("health") == "live"]
    if not live or not comps:
        return error_response(503, "service.not_ready", f"{len(live)} live model workers, {len(comps)} live "
                              f"compositors", None, retry)
    return JSONResponse({"ok": True, "model_workers": len(live), "compositors": len(comps)})
