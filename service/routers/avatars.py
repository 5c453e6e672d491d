"""`/v1/avatars`: prepare a template once (face track, crops), read and list prepared avatars."""
from __future__ import annotations

import shutil

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from cluster.errors import InputNotFound
from cluster.schemas import AvatarCreate, AvatarView
from service.auth import require_token
from service.backend import Backend, get_backend
from service.errors import ApiProblem, error_responses, only_query
from service.uploads import Upload, json_body

router = APIRouter(prefix="/v1/avatars", tags=["avatars"], dependencies=[Depends(require_token)],
                   responses=error_responses())


@router.post("", status_code=201, response_model=AvatarView,
             summary="Prepare a template once (multipart `video` or JSON {video})",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": AvatarCreate.model_json_schema()},
                 "multipart/form-data": {"schema": {"type": "object", "required": ["video"], "properties": {
                     "video": {"type": "string", "format": "binary"}}}}}}})
async def create_avatar(request: Request, backend: Backend = Depends(get_backend)) -> JSONResponse:
    settings = backend.settings
    tmpdir = backend.tmpdir()
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            up = Upload(tmpdir, settings.max_upload_bytes)
            await up.read(request)
            if "video" not in up.files:
                raise ApiProblem(422, "input.invalid", "multipart field 'video' (a file) is required", "video")
            path, source = up.files["video"]
            ref = await backend.gateway.upload(path, source)
        else:
            body = await json_body(request, AvatarCreate, multipart_too=True)
            request.state.inputs = {"video": body.video}
            ref, source = await backend.stage_input(body.video, "video", tmpdir), body.video
            if not ref.startswith("upload:"):  # a server path: stored through the manager first
                raise ApiProblem(422, "input.invalid", "avatars are prepared from an upload or a URL", "video")
        summary = await backend.sidecar("prepare_avatar", ref, source, timeout=settings.chunk_timeout_s)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return JSONResponse(AvatarView(**summary).model_dump(mode="json"), status_code=201)


@router.get("/{avatar_id}", response_model=AvatarView, summary="A prepared avatar")
async def get_avatar(avatar_id: str, backend: Backend = Depends(get_backend)) -> AvatarView:
    try:
        return AvatarView(**await backend.sidecar("get_avatar", avatar_id))
    except InputNotFound as e:
        raise ApiProblem(404, "avatar.not_found", e.message, "avatar_id") from None


@router.get("", response_model=list[AvatarView], summary="Prepared avatars",
            dependencies=[only_query("limit", "offset")])
async def list_avatars(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**53),
                       backend: Backend = Depends(get_backend)) -> list[AvatarView]:
    return [AvatarView(**a) for a in await backend.sidecar("list_avatars", limit, offset)]
