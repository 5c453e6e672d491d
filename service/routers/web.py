"""The web page: `GET /` and its static files under `/static/`, public (no token).

The page (service/static: plain HTML + JS, no build step) calls the API with the token the person
typed, as `Authorization: Bearer`; the page itself holds nothing secret. Cache policy: the page,
`app.js` and `style.css` are revalidated on every load (`no-cache` with an ETag, so a new release
shows at once); vendored files carry their version in the path and are cached for a year.
"""
from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# JavaScript as RFC 9239 names it, whatever the host's mime.types says.
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")

# The page loads only its own files; the player's media are `blob:` URLs (Media Source Extensions)
# and hls.js runs its demuxer in a worker made from a `blob:` URL.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "media-src 'self' blob:; worker-src 'self' blob:; connect-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the player's URLs carry signed tokens
    "X-Content-Type-Options": "nosniff",
}
IMMUTABLE = "public, max-age=31536000, immutable"


class StaticAssets(StaticFiles):
    """service/static with the page's cache policy (a missing file is the app's 404 error body)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = IMMUTABLE if path.startswith("vendor/") else "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


router = APIRouter(include_in_schema=False)
router.mount("/static", StaticAssets(directory=STATIC_DIR), name="static")


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    """The page: submit a job, watch it while it renders, download it; recent jobs; avatars."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
