"""`/v1/jobs`: submit (multipart upload or JSON), list, read, cancel, and the SSE event stream."""
from __future__ import annotations

import asyncio
import re
import shutil
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from cluster.errors import InputTooLarge, LipsyncError
from cluster.schemas import JOB_ID_HEADER, JOB_ID_PATTERN, JobAccepted, JobCreate, JobPage, JobState, JobView
from service.auth import require_token
from service.backend import Backend, get_backend
from service.errors import ApiProblem, error_responses, only_query
from service.uploads import Upload, json_body

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)],
                   responses=error_responses())

MULTIPART_JOB = {"type": "object", "required": ["audio"], "properties": {
    "audio": {"type": "string", "format": "binary"}, "video": {"type": "string", "format": "binary"},
    "avatar_id": {"type": "string"}, "id": {"type": "string"}, "sync_mode": {"type": "string"},
    "model": {"type": "string"}, "crf": {"type": "integer"}, "callback_url": {"type": "string"}}}


@router.post("", status_code=202, response_model=JobAccepted,
             summary="Submit a job (multipart upload, or JSON with URLs/paths)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {
                     "schema": JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")},
                 "multipart/form-data": {"schema": MULTIPART_JOB}}}})
async def submit_job(request: Request, backend: Backend = Depends(get_backend)) -> JSONResponse:
    settings = backend.settings
    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    if multipart:  # the queue's bound before the files are read (not after a large upload), unless the job is
        # known by the id given ahead of them (the SDK's header): a retry of an accepted job is answered as it
        await _admit_unless_known(backend, request.headers.get(JOB_ID_HEADER))
    tmpdir = backend.tmpdir()
    try:
        staged: dict[str, str] = {}
        sources: dict[str, str] = {}
        if multipart:
            declared = request.headers.get("content-length")
            if declared and re.fullmatch(r"[0-9]{1,19}", declared) and \
                    int(declared) > 2 * settings.max_upload_bytes + (1 << 20):
                # (no field: the declared length cannot tell which file; the page showed "body: request body ...")
                raise InputTooLarge(f"the upload of {declared} bytes is over the limit for its files "
                                    f"({settings.max_upload_bytes} bytes each, LIPSYNC_MAX_UPLOAD_BYTES): one of "
                                    f"them at least is larger; send a smaller file, or a path or URL the service "
                                    f"reads")
            up = Upload(tmpdir, settings.max_upload_bytes)
            await up.read(request)
            fields = dict(up.fields)
            for name in ("audio", "video"):
                if name in up.files:
                    fields[name] = up.files[name][1]
            try:
                body = JobCreate.model_validate({k: v for k, v in fields.items() if v != ""})
            except ValidationError as e:
                raise RequestValidationError(e.errors()) from None
            ahead = request.headers.get(JOB_ID_HEADER)
            if ahead is not None and ahead != body.id:  # (the queue's bound was left to the job it names)
                form = f"the form's id is {body.id!r}" if body.id is not None else "the form has no id field"
                raise ApiProblem(422, "input.invalid", f"{JOB_ID_HEADER} names job {ahead[:100]!r}, {form}: "
                                 f"send the same id in both, or no {JOB_ID_HEADER}", "id")
            request.state.inputs = {"audio": body.audio, "video": body.video, "avatar_id": body.avatar_id}
            # what can be refused is refused before the files travel to the job manager
            await backend.refuse_what_cannot_succeed(body.video, body.avatar_id, body.model, body.callback_url,
                                                     stored_too=False)
            for name in ("audio", "video"):
                if name in up.files:
                    path, fname = up.files[name]
                    staged[name] = await backend.gateway.upload(path, fname)
                    sources[staged[name]] = fname  # errors name the client's file, not the ref
        else:
            body = await json_body(request, JobCreate, multipart_too=True)
            request.state.inputs = {"audio": body.audio, "video": body.video, "avatar_id": body.avatar_id}
            await backend.refuse_what_cannot_succeed(body.video, body.avatar_id, body.model, body.callback_url)
            await _admit_unless_known(backend, body.id)
        st = await backend.create_job(body.id, body.audio, body.video, body.avatar_id, body.sync_mode, body.model,
                                      tmpdir, staged, crf=body.crf, sources=sources)
        try:
            await backend.register_callback(st.id, body.callback_url)
        except LipsyncError as e:  # the job runs: say so, and how to get its callback registered
            e.message = (f"job {st.id} was accepted, but its callback could not be registered ({e.message}); "
                         f"send the same request with id {st.id} again to register it")
            e.job_id = e.job_id or st.id
            raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    accepted = JobAccepted(id=st.id, state=st.state, watch_url=backend.watch_url(st.id))
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/v1/jobs/{st.id}"})


async def _admit_unless_known(backend: Backend, job_id: str | None) -> None:
    """The queue's bound (429), not for an id already accepted: a client's retry of a submission whose
    answer it lost is answered with its job (or `job.conflict`), full queue or not. A JSON request is
    checked once it is known to be valid (a bad one is told what is wrong with it, not to come back)."""
    if not await backend.known(job_id):
        await backend.admit_or_429()


@router.get("", response_model=JobPage, summary="List jobs, newest first",
            dependencies=[only_query("state", "limit", "offset", "before")])
async def list_jobs(state: list[JobState] | None = Query(None), limit: int = Query(50, ge=1, le=500),
                    offset: int = Query(0, ge=0, le=2**53),
                    before: str | None = Query(None, pattern=JOB_ID_PATTERN, description=(
                        "only jobs older than this one: the next page is `before=<next_before>`, which jobs "
                        "submitted meanwhile do not shift (as they shift an offset)")),
                    backend: Backend = Depends(get_backend)) -> JobPage:
    jobs = await backend.gateway.list_jobs(state or None, limit + 1, offset, before)
    more = len(jobs) > limit
    return JobPage(jobs=[backend.view(j) for j in jobs[:limit]], next_offset=offset + limit if more else None,
                   next_before=jobs[limit - 1].id if more else None)


@router.get("/{job_id}", response_model=JobView,
            summary="A job's state, stage, progress, timings, error and output")
async def get_job(job_id: str, backend: Backend = Depends(get_backend)) -> JobView:
    st, callback = await asyncio.gather(backend.gateway.get(job_id), backend.callback_of(job_id))
    return backend.view(st).model_copy(update={"callback": callback})


@router.delete("/{job_id}", response_model=JobView, summary="Cancel a job (a finished job is left as it is)")
async def cancel_job(job_id: str, backend: Backend = Depends(get_backend)) -> JobView:
    return backend.view(await backend.gateway.cancel(job_id))


@router.delete("/{job_id}/files", response_model=JobView, responses=error_responses(409),
               summary="Remove a finished job's files now (output, stream, inputs), as retention does; its record "
                       "stays (a succeeded job then reads `expired`); 409 while it runs")
async def purge_job(job_id: str, backend: Backend = Depends(get_backend)) -> JobView:
    return backend.view(await backend.gateway.purge(job_id))


@router.get("/{job_id}/events", response_class=StreamingResponse,
            summary="Server-Sent Events: one `status` event (a JobView) per change, until a terminal state; "
                    "with ?segments=1 also one `segment` event per published HLS segment")
async def job_events(job_id: str, request: Request, segments: bool = Query(
        False, description="also send `segment` events (an HlsSegment each); off by default, because SDKs "
                           "that read every `data:` line as a JobView predate them"),
        backend: Backend = Depends(get_backend)) -> StreamingResponse:
    gateway, settings = backend.gateway, backend.settings
    release = backend.open_event_stream()  # 429 past the replica's bound, counted from here
    try:
        first = await gateway.get(job_id)  # 404 before the stream starts
    except BaseException:
        release()
        raise
    base = f"/v1/jobs/{job_id}/hls/"

    async def events() -> AsyncIterator[bytes]:
        st, last, last_sent = first, None, time.monotonic()
        deadline = time.monotonic() + settings.job_timeout_s
        sent_segments = 0
        while True:
            view = backend.view(st)
            if segments:  # before the status: a terminal status is the stream's last event
                index = await gateway.hls_index(job_id)
                query = backend.watch_query(job_id)
                for seg in index.segments[sent_segments:]:
                    seg.url, seg.init_url = f"{base}{seg.name}{query}", f"{base}{seg.init}{query}"
                    yield f"event: segment\ndata: {seg.model_dump_json()}\n\n".encode()
                sent_segments = max(sent_segments, len(index.segments))
            key = (view.state, view.frames_done, view.frames_total, view.stage, view.jobs_ahead, view.waiting_for)
            if key != last:
                last, last_sent = key, time.monotonic()
                yield f"event: status\ndata: {view.model_dump_json()}\n\n".encode()
            if view.state.terminal or time.monotonic() > deadline:
                return
            if time.monotonic() - last_sent > 15:
                last_sent = time.monotonic()
                yield b": keep-alive\n\n"
            if await request.is_disconnected():
                return
            if segments:  # at once when a segment is published or the job ends
                await gateway.wait_hls(job_id, sent_segments, 0.25)
                st = await gateway.get(job_id)  # the state before the index (top): an ended playlist never grows
            else:
                st = await gateway.wait(job_id, 0.5)  # at once when the job ends

    return ReleasingStreamingResponse(events(), release, media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ReleasingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `release` once it is over, however it ends: its body done, the
    client gone (Starlette then stops the body, or the next send fails), or never started."""

    def __init__(self, content, release, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        from actors import raise_if_cancelled

        try:
            await super().__call__(scope, receive, send)
        except Exception as e:  # Serve's own wait for the client's disconnect, cancelled as it went: not a failure
            await raise_if_cancelled(e)
            raise
        finally:
            self.release()
