"""A job's media: the output mp4 (`/v1/jobs/{id}/result`, Range and ETag)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from cluster.schemas import ApiError
from service.auth import require_token
from service.backend import Backend, get_backend
from service.errors import ERROR_CODES

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)],
                   responses={c: {"model": ApiError} for c in ERROR_CODES})


@router.head("/{job_id}/result", include_in_schema=False)
async def job_result_head(job_id: str, request: Request, backend: Backend = Depends(get_backend)) -> Response:
    return await backend.result_response(request, job_id)


@router.get("/{job_id}/result", response_class=StreamingResponse,
            responses={200: {"content": {"video/mp4": {}}}, 206: {"content": {"video/mp4": {}}}},
            summary="The output mp4 (Range, ETag); 409 until the job has succeeded")
async def job_result(job_id: str, request: Request, backend: Backend = Depends(get_backend)) -> Response:
    return await backend.result_response(request, job_id)
