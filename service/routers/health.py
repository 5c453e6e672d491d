"""`/healthz` (the process is up) and `/readyz` (the job manager and its workers), both public: a
kubelet's or load balancer's probe carries no token, and neither says more than counts."""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from cluster.errors import LipsyncError, StorageLost, StoreTooNew
from cluster.schemas import ApiError
from service.backend import Backend, get_backend
from service.errors import error_response

router = APIRouter(tags=["health"])
log = logging.getLogger("lipsync.service")


# HEAD too: uptime monitors probe with it (a 405 read as the service being down); not in the description twice
# (one route of both methods gave two operations of one id: FastAPI's "Duplicate Operation ID" warning)
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"ok": True}


READY_CACHE_S = 2.0  # probes (public) ask the job manager at most this often per replica


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", summary="Job manager reachable and model workers loaded (503 until then)",
            responses={503: {"model": ApiError}})
async def readyz(request: Request, backend: Backend = Depends(get_backend)) -> JSONResponse:
    now = time.monotonic()
    cached = getattr(request.app.state, "readyz", None)
    if cached is None or now - cached[0] > READY_CACHE_S:
        cached = (now, await _readiness(backend))
        request.app.state.readyz = cached
    status, body = cached[1]
    if status != 200:
        code, message = body
        return error_response(status, code, message, None,  # (no wait mends a lost store: no Retry-After)
                              None if code in STORE_REFUSED else {"Retry-After": str(backend.settings.retry_after_s)})
    return JSONResponse(body)


#: Why the job manager takes no work, by code, in words that name no path (the route is public): no wait mends these
STORE_REFUSED = {
    StorageLost.code: "the job store was removed or replaced under this service: it takes no work until it is "
                      "restarted on a storage root that holds its store",
    StoreTooNew.code: "the job store was written by a newer version of the service: it takes no work; serve it "
                      "with that version or a later one",
}


async def _readiness(backend: Backend) -> tuple[int, dict | tuple[str, str]]:
    """(200, counts) or (503, (code, why)), in words that name no internals (the route is public): a job
    store lost under the service (`service.storage_lost`) is said, for it will not pass by waiting."""
    try:
        state = await backend.gateway.ready(timeout=2.0)
    except (LipsyncError, asyncio.TimeoutError) as e:
        log.info("readiness: the job manager is not ready: %s", e)
        code = getattr(e, "code", None)
        if code in STORE_REFUSED:
            return 503, (code, STORE_REFUSED[code])
        return 503, ("service.not_ready", "the job manager is not ready")
    live = [m for m in state.get("models", []) if m.get("health") == "live"]
    comps = [m for m in state.get("compositors", []) if m.get("health") == "live"]
    if not live or not comps:
        return 503, ("service.not_ready", f"{len(live)} live model workers, {len(comps)} live compositors")
    return 200, {"ok": True, "model_workers": len(live), "compositors": len(comps)}
