"""`/v1/uploads`: a file stored for later requests (a batch takes JSON: its local files come this way)."""
from __future__ import annotations

import shutil

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from cluster.errors import InputError
from cluster.schemas import UploadedFile
from service.auth import require_token
from service.backend import Backend, get_backend
from service.errors import ApiProblem, error_responses
from service.uploads import Upload

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], dependencies=[Depends(require_token)],
                   responses=error_responses(400, 401, 413, 415, 422, 503, 507))


@router.post("", status_code=201, response_model=UploadedFile,
             summary="Store one file (multipart `file`); its `ref` is an input of later jobs and batches",
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"],
                 "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
async def upload_file(request: Request, backend: Backend = Depends(get_backend)) -> JSONResponse:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        said = f"a body of type {ctype!r}" if ctype else "a body without a Content-Type"
        raise ApiProblem(415, "input.content_type", f"{said}: this route takes multipart/form-data, the file in "
                         "the field 'file'", "file")
    tmpdir = backend.tmpdir()
    try:
        up = Upload(tmpdir, backend.settings.max_upload_bytes)
        await up.read(request)
        if set(up.files) != {"file"} or up.fields:
            raise InputError("one multipart field is taken: 'file', the file to store", path="file")
        path, name = up.files["file"]
        size = path.stat().st_size
        if size == 0:
            raise InputError(f"file {name} is empty", path="file")
        ref = await backend.gateway.upload(path, name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return JSONResponse(UploadedFile(ref=ref, name=name, size=size).model_dump(), status_code=201)
