"""A job's media: the output mp4 (`/v1/jobs/{id}/result`, Range and ETag) and its HLS stream
(`/v1/jobs/{id}/hls/index.m3u8`, `init.mp4`, `.m4s` segments), from its first verified chunk."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from cluster.hls import FILE_NAME, render_playlist
from service.auth import require_token, require_watch_access
from service.backend import Backend, get_backend
from service.errors import ApiProblem, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)],
                   responses=error_responses())


@router.head("/{job_id}/result", include_in_schema=False)
async def job_result_head(job_id: str, request: Request, backend: Backend = Depends(get_backend)) -> Response:
    return await backend.result_response(request, job_id)


@router.get("/{job_id}/result", response_class=StreamingResponse,
            responses={200: {"content": {"video/mp4": {}}}, 206: {"content": {"video/mp4": {}}},
                       **error_responses(410, 416)},
            summary="The output mp4 (Range, ETag); 409 until the job has succeeded")
async def job_result(job_id: str, request: Request, backend: Backend = Depends(get_backend)) -> Response:
    return await backend.result_response(request, job_id)


# --- the job's HLS stream (cluster.hls): playable while the job renders -------------------------------
hls_router = APIRouter(prefix="/v1/jobs/{job_id}/hls", tags=["hls"],
                       responses=error_responses(401, 404, 410, 422, 503))
IMMUTABLE = "private, max-age=31536000, immutable"  # a published segment never changes
#: How long a job's playlist request waits for the job's first segment (under hls.js's 10 s manifest timeout);
#: then the playlist as it is (a player that asks again waits again)
FIRST_PLAYLIST_WAIT_S = 8.0


def _stream_headers(request: Request, signed: str) -> dict[str, str]:
    """CORS for the service's own origin (its web page) only; no Referer leaks a signed URL."""
    headers = {}
    origin = request.headers.get("origin")
    if origin and origin == f"{request.url.scheme}://{request.headers.get('host', '')}":
        headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})
    if signed:
        headers["Referrer-Policy"] = "no-referrer"
    return headers


@hls_router.head("/index.m3u8", include_in_schema=False)  # a player or CDN probing first
@hls_router.get("/index.m3u8", response_class=Response,
                responses={200: {"content": {"application/vnd.apple.mpegurl": {}}}},
                summary="The job's HLS playlist: EVENT while it renders, ENDLIST once it has ended")
async def hls_playlist(job_id: str, request: Request, signed: str = Depends(require_watch_access),
                       backend: Backend = Depends(get_backend)) -> Response:
    index = await backend.gateway.hls_index(job_id)  # 404 for an unknown job
    if not index.segments and not index.ended:
        # a job's first segment comes seconds after its 202 (longer behind other jobs), and players give up on a
        # playlist without one (ffmpeg: "Empty segment"; hls.js after 10 s): the request waits for it, bounded
        loop = asyncio.get_running_loop()
        give_up = loop.time() + FIRST_PLAYLIST_WAIT_S
        while not index.segments and not index.ended and (left := give_up - loop.time()) > 0:
            await backend.gateway.wait_hls(job_id, 0, min(left, 1.0))
            index = await backend.gateway.hls_index(job_id)
    return Response(render_playlist(index, signed), media_type="application/vnd.apple.mpegurl",
                    headers={"Cache-Control": "no-cache", **_stream_headers(request, signed)})


@hls_router.head("/{name}", include_in_schema=False)  # a player or CDN probing first
@hls_router.get("/{name}", response_class=Response,
                responses={200: {"content": {"video/mp4": {}, "video/iso.segment": {}}}},
                summary="An init segment (init.mp4) or media segment (.m4s) of the job's HLS stream")
async def hls_file(job_id: str, name: str, request: Request, signed: str = Depends(require_watch_access),
                   backend: Backend = Depends(get_backend)) -> Response:
    if not FILE_NAME.fullmatch(name):
        await backend.gateway.hls_index(job_id)  # an unknown job is job.not_found, whatever the name
        raise ApiProblem(404, "hls.not_published",
                         f"no HLS file {name!r} (init.mp4, init-<chunk>.mp4 or <chunk>-<part>.m4s)", None)
    part = backend.settings.transfer_part_bytes
    data = bytearray()
    while True:
        block = await backend.gateway.read_hls(job_id, name, len(data), part)
        data += block
        if len(block) < part:
            break
    media_type = "video/mp4" if name.endswith(".mp4") else "video/iso.segment"
    return Response(bytes(data), media_type=media_type,
                    headers={"Cache-Control": IMMUTABLE, **_stream_headers(request, signed)})
