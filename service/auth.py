"""The bearer token (`LIPSYNC_API_TOKEN`): a dependency each API router declares, so routes that
are public (`/healthz`, the web page and its static files) are simply routers without it.

    router = APIRouter(dependencies=[Depends(require_token)])
"""
from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import ApiProblem


def api_token(request: Request) -> bytes | None:
    """The configured token's bytes, or None when the service runs without one."""
    return request.app.state.api_token


def bearer_token_ok(request: Request) -> bool:
    token = api_token(request)
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def require_token(request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <LIPSYNC_API_TOKEN>` (when one is set)."""
    if not bearer_token_ok(request):
        raise ApiProblem(401, "auth.invalid_token", "missing or wrong bearer token (Authorization: Bearer ...)",
                         None, headers={"WWW-Authenticate": "Bearer"})
