"""The bearer token (`LIPSYNC_API_TOKEN`): a dependency each API router declares, so routes that
are public (`/healthz`, `/readyz`, the web page and its static files) are simply routers without it.

    router = APIRouter(dependencies=[Depends(require_token)])

A job's HLS stream is for players, which cannot send a header: its routes take either the bearer
token or a signed, expiring `?token=` for that job (`require_watch_access`, cluster.hls).
"""
from __future__ import annotations

import hmac

from fastapi import Query, Request

from cluster.hls import check_watch
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


#: The compatibility envelope's code of a request without the token (an HTTP 401 too)
COMPAT_UNAUTHORIZED = 10401


def require_token_compat(request: Request) -> None:
    """`require_token` for the compatibility API: its 401 in the envelope its clients parse (they read a numeric
    `code` and `msg`; the API's error body broke them)."""
    try:
        require_token(request)
    except ApiProblem as e:
        e.envelope = COMPAT_UNAUTHORIZED
        raise


def require_watch_access(job_id: str, request: Request, token: str | None = Query(
        None, description="the signed token of the job's watch_url (instead of the bearer token)")) -> str:
    """The query the HLS URIs of this answer carry: `?token=...` when the request came with a valid
    signed token for this job, "" with the bearer token (or none configured); else 401. A token
    that is given must be valid: a wrong or expired one is refused even next to a header."""
    if token is not None:
        key = request.app.state.watch_key
        if key is not None and check_watch(key, job_id, token):
            return f"?token={token}"
        if key is not None:
            raise ApiProblem(401, "auth.invalid_signature", "the watch URL's token is wrong or has expired; "
                             "ask the job again for a fresh watch_url", None)
    if not bearer_token_ok(request):
        raise ApiProblem(401, "auth.invalid_token", "missing or wrong bearer token (Authorization: Bearer ...) "
                         "or signed ?token=", None, headers={"WWW-Authenticate": "Bearer"})
    return ""
