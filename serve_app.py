"""The HTTP service: a Ray Serve application with a FastAPI ingress (`serve_app:app`).

The ingress is stateless: it streams uploads to a node-local temporary file, sends them to the
job manager through Ray in parts, submits, and returns `202`; it never awaits a render. Status,
events and results are read from the named job manager. It runs on any node.

    serve run serve_app:app                    # settings from LIPSYNC_* env
    lipsync serve --port 8000                  # embedded Ray head (or RAY_ADDRESS) + this app

A Serve config file may name `serve_app:app` or the builder `serve_app:build_app` (its `args`
override LIPSYNC_* settings, e.g. `{"max_queued_jobs": 32}`).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from cluster.config import Settings
from cluster.errors import InputError, InputNotFound, InputTooLarge, JobNotFound, LipsyncError
from cluster.netguard import download, is_url
from cluster.render import new_job_id
from cluster.schemas import (
    JOB_ID_PATTERN,
    ApiError,
    AvatarCreate,
    AvatarView,
    BatchCreate,
    BatchView,
    CompatData,
    CompatEnvelope,
    CompatSubmit,
    JobAccepted,
    JobCreate,
    JobPage,
    JobState,
    JobStatus,
    JobView,
    RenderRequest,
)
from cluster.views import job_view

log = logging.getLogger("lipsync.service")

SYNC_TO_LOOP = {"pingpong": "pingpong", "loop": "forward", "cut_off": "cut_off", "silence": "silence",
                "remap": "remap"}
_ID_RE = re.compile(JOB_ID_PATTERN)


# --- errors ------------------------------------------------------------------------------------
class ApiProblem(Exception):
    """An HTTP error answer with the API's error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


class QueueFull(LipsyncError):
    code = "service.busy"


def http_status(err: LipsyncError) -> int:
    code = err.code
    if code == "input.too_large":
        return 413
    if code == "input.not_found" and err.path in ("audio", "video", "avatar_id"):
        return 400
    if code.startswith("input.") or code.startswith("model.invalid"):
        return 400
    if code in ("job.not_found", "avatar.not_found"):
        return 404
    if code in ("job.conflict", "job.not_ready", "job.not_succeeded"):
        return 409
    if code == "service.busy":
        return 429
    if code in ("service.unavailable", "render.timeout"):
        return 503
    return 500


def _field_of(err: LipsyncError, values: dict[str, str | None]) -> str | None:
    if err.path in values or err.path in ("audio", "video", "avatar_id", "file", "body", "callback_url"):
        return err.path
    for name, value in values.items():
        if value and (err.path == value or (value in err.message)):
            return name
    return None


def _error_response(status: int, code: str, message: str, field: str | None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status,
                        headers=headers)


# --- multipart upload, streamed to disk -------------------------------------------------------
class Upload:
    """A multipart body parsed as it arrives: file parts go to files in `tmpdir` (each bounded by
    `max_bytes` while streaming), small text parts to `fields`."""

    TEXT_LIMIT = 16 * 1024

    def __init__(self, tmpdir: Path, max_bytes: int) -> None:
        self.tmpdir, self.max_bytes = tmpdir, max_bytes
        self.files: dict[str, tuple[Path, str]] = {}  # field -> (path, client filename)
        self.fields: dict[str, str] = {}

    async def read(self, request: Request) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        _, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiProblem(400, "input.invalid", "multipart body without a boundary", "body")
        state: dict[str, Any] = {"headers": {}, "hname": b"", "hvalue": b""}
        problem: list[Exception] = []

        def on_header_field(data, start, end):
            state["hname"] += data[start:end]

        def on_header_value(data, start, end):
            state["hvalue"] += data[start:end]

        def on_header_end():
            state["headers"][state["hname"].decode("latin-1").lower()] = state["hvalue"].decode("utf-8", "replace")
            state["hname"], state["hvalue"] = b"", b""

        def on_headers_finished():
            _, p = parse_options_header(state["headers"].get("content-disposition", ""))
            name = p.get(b"name", b"").decode("utf-8", "replace")
            filename = p.get(b"filename")
            state["name"], state["size"] = name, 0
            if filename is not None and name in ("audio", "video", "file"):
                fname = Path(filename.decode("utf-8", "replace")).name or name
                path = self.tmpdir / f"{name}{Path(fname).suffix.lower()[:12]}"
                state["file"] = open(path, "wb")
                self.files[name] = (path, fname)
            else:
                state["file"], state["text"] = None, bytearray()

        def on_part_data(data, start, end):
            if problem:
                return
            n = end - start
            state["size"] += n
            if state["file"] is not None:
                if state["size"] > self.max_bytes:
                    problem.append(InputTooLarge(f"{state['name']}: upload is larger than the limit of "
                                                 f"{self.max_bytes} bytes (LIPSYNC_MAX_UPLOAD_BYTES)",
                                                 path=state["name"]))
                    return
                state["file"].write(data[start:end])
            else:
                if state["size"] > self.TEXT_LIMIT:
                    problem.append(InputError(f"{state['name']}: form field longer than {self.TEXT_LIMIT} bytes",
                                              path=state["name"]))
                    return
                state["text"] += data[start:end]

        def on_part_end():
            if state.get("file") is not None:
                state["file"].close()
            elif "text" in state and state.get("name"):
                self.fields[state["name"]] = bytes(state["text"]).decode("utf-8", "replace")
            state["headers"] = {}
            state.pop("text", None)
            state["file"] = None

        parser = MultipartParser(boundary, dict(
            on_header_field=on_header_field, on_header_value=on_header_value, on_header_end=on_header_end,
            on_headers_finished=on_headers_finished, on_part_data=on_part_data, on_part_end=on_part_end))
        try:
            async for block in request.stream():
                parser.write(block)
                if problem:
                    raise problem[0]
            parser.finalize()
        except LipsyncError:
            raise
        except Exception as e:
            raise ApiProblem(400, "input.invalid", f"malformed multipart body: {e}", "body") from e
        finally:
            if state.get("file") is not None and not state["file"].closed:
                state["file"].close()


# --- the service ----------------------------------------------------------------------------------
class Service:
    """Route logic; `gateway` is the job manager's async handle (actors.service_support)."""

    def __init__(self, settings: Settings, gateway) -> None:
        self.s = settings
        self.gw = gateway
        self.tmp_root = Path(tempfile.gettempdir()) / f"lipsync-ingress-{os.getuid()}"
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        self._compat_progress: OrderedDict[str, int] = OrderedDict()
        self._token = settings.api_token.get_secret_value().encode() if settings.api_token else None

    # auth -----------------------------------------------------------------------------------
    def check_token(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiProblem(401, "auth.invalid_token", "missing or wrong bearer token (Authorization: Bearer ...)",
                             None, headers={"WWW-Authenticate": "Bearer"})

    # admission ---------------------------------------------------------------------------------
    async def admit_or_429(self) -> None:
        n = await self.gw.unfinished_count(self.s.max_queued_jobs)
        if n >= self.s.max_queued_jobs:
            raise QueueFull(f"the job queue is full ({n} unfinished jobs, LIPSYNC_MAX_QUEUED_JOBS="
                            f"{self.s.max_queued_jobs}); retry later")

    def tmpdir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="req-", dir=self.tmp_root))

    async def stage_input(self, value: str, field: str, tmpdir: Path) -> str:
        """A URL (downloaded under the address guard), an upload of this ingress, or a server path:
        what the job manager's `submit` takes."""
        if is_url(value):
            dest = tmpdir / f"{field}-url{_suffix_of(value)}"
            await asyncio.to_thread(download, value, dest, max_bytes=self.s.max_upload_bytes,
                                    timeout_s=self.s.url_timeout_s, max_redirects=self.s.url_max_redirects,
                                    allow_private=self.s.allow_private_urls, field=field)
            return await self.gw.upload(dest, dest.name)
        compat_upload = self.compat_upload_path(value)
        if compat_upload is not None:
            return await self.gw.upload(compat_upload, compat_upload.name)
        # A server path: the job manager resolves it against the input roots on its own node
        # (cluster.inputs.resolve_input_path: symlinks and '..' first, then the roots).
        return value

    def resolve_model(self, model: str | None) -> str | None:
        if model is None or model.startswith("builtin"):
            return model
        path = self.s.storage_root / "models" / (model if model.endswith(".onnx") else model + ".onnx")
        return str(path)

    async def create_job(self, job_id: str | None, audio: str | Path, video: str | Path | None,
                         avatar_id: str | None, sync_mode: str, model: str | None, tmpdir: Path,
                         staged: dict[str, str] | None = None, crf: int | None = None,
                         sources: dict[str, str] | None = None) -> JobStatus:
        if sync_mode not in SYNC_TO_LOOP:
            raise ApiProblem(422, "input.unsupported", f"sync_mode {sync_mode!r} is not supported by this server "
                             f"(supported: {', '.join(SYNC_TO_LOOP)})", "sync_mode")
        if video is None and avatar_id is None:
            raise ApiProblem(422, "input.invalid", "a job needs a video (or an avatar_id)", "video")
        staged = dict(staged or {})
        if "audio" not in staged:
            staged["audio"] = await self.stage_input(str(audio), "audio", tmpdir)
        if video is not None and "video" not in staged:
            staged["video"] = await self.stage_input(str(video), "video", tmpdir)
        request = RenderRequest(audio=staged["audio"], video=staged.get("video"), avatar_id=avatar_id,
                                model=self.resolve_model(model), loop=SYNC_TO_LOOP[sync_mode], crf=crf,
                                sources=dict(sources or {}))
        return await self.gw.submit(job_id or new_job_id(), request)

    # callbacks -------------------------------------------------------------------------------------
    async def check_callback(self, url: str | None) -> None:
        """Refuse a callback URL the address guard would refuse at delivery (400, field callback_url)."""
        if url is None:
            return
        from cluster.netguard import check_url

        await asyncio.to_thread(check_url, url, allow_private=self.s.allow_private_urls, field="callback_url")

    async def register_callback(self, job_id: str, url: str | None) -> None:
        if url is None:
            return
        from actors.service_support import service_sidecar

        ref = service_sidecar(self.s).register.remote(job_id, url)
        await asyncio.wait_for(ref, timeout=self.s.actor_call_timeout_s)

    # results ------------------------------------------------------------------------------------
    async def succeeded(self, job_id: str) -> tuple[JobStatus, int]:
        st = await self.gw.get(job_id)
        if st.state != JobState.succeeded:
            raise ApiProblem(409, "job.not_ready", f"job {job_id} is {st.state.value}; its result exists once "
                             f"it has succeeded", None)
        size = st.output_bytes
        if size is None:
            raise ApiProblem(500, "output.missing", f"job {job_id} reports no output size", None)
        return st, size

    async def stream_output(self, job_id: str, start: int, stop: int) -> AsyncIterator[bytes]:
        part = min(self.s.transfer_part_bytes, 1 << 20)
        pos = start
        while pos < stop:
            data = await self.gw.read_output(job_id, pos, min(part, stop - pos))
            if not data:
                raise RuntimeError(f"job {job_id}: output ended at byte {pos}, expected {stop}")
            pos += len(data)
            yield data

    async def result_response(self, request: Request, job_id: str, filename: str | None = None) -> Response:
        st, size = await self.succeeded(job_id)
        etag = f'"{job_id}-{size}-{int(st.updated_at.timestamp())}"'
        headers = {"Accept-Ranges": "bytes", "ETag": etag,
                   "Content-Disposition": f'attachment; filename="{filename or job_id + ".mp4"}"'}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        start, stop, status = 0, size, 200
        rng = request.headers.get("range")
        if rng and (request.headers.get("if-range") in (None, etag)):
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m is None or (not m.group(1) and not m.group(2)):
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start, stop = max(0, size - int(m.group(2))), size
            if start >= size or stop <= start:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        headers["Content-Length"] = str(stop - start)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="video/mp4")
        return StreamingResponse(self.stream_output(job_id, start, stop), status_code=status, headers=headers,
                                 media_type="video/mp4")

    # compat -------------------------------------------------------------------------------------
    def upload_dir(self) -> Path:
        base = self.s.compat_data_dir or (self.tmp_root / "compat")
        d = Path(base) / "upload"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def compat_upload_path(self, value: str) -> Path | None:
        """A file `POST /upload` stored (and only such a file), else None."""
        d = self.upload_dir().resolve()
        try:
            p = Path(os.path.realpath(value))
        except (OSError, ValueError):
            return None
        if p.parent == d and re.fullmatch(r"[0-9a-f]{32}\.[A-Za-z0-9]{1,8}|[0-9a-f]{32}", p.name) and p.is_file():
            return p
        return None

    def compat_result_path(self, code: str) -> str:
        if self.s.compat_data_dir is not None:
            return str(Path(self.s.compat_data_dir) / "temp" / f"{code}-r.mp4")
        return f"/temp/{code}-r.mp4"

    async def publish_compat(self, code: str, size: int) -> None:
        """Copy the verified output to <compat_data_dir>/temp/<code>-r.mp4 (atomically, checked length)."""
        from cluster.fsutil import atomic_writer

        dest = Path(self.s.compat_data_dir) / "temp" / f"{code}-r.mp4"
        if dest.is_file() and dest.stat().st_size == size:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with atomic_writer(dest) as f:
            async for data in self.stream_output(code, 0, size):
                await asyncio.to_thread(f.write, data)
                written += len(data)
            if written != size:
                raise RuntimeError(f"published {written} bytes of {size}")

    def compat_progress(self, st: JobStatus) -> int:
        now = time.time()
        age = max(0.0, now - st.updated_at.timestamp())
        creep = 1 - math.exp(-age / 20.0)
        if st.state == JobState.queued:
            p = 1 + 3 * creep
        elif st.state == JobState.preparing:
            p = 5 + 9 * creep
        elif st.state == JobState.rendering:
            frac = (st.frames_done / st.frames_total) if st.frames_total else 0.0
            p = 15 + 80 * frac
        elif st.state == JobState.finalizing:
            p = 95 + 4 * creep
        else:
            p = 0
        p = min(99, int(p))
        prev = self._compat_progress.get(st.id, 0)
        p = max(p, prev)
        self._compat_progress[st.id] = p
        self._compat_progress.move_to_end(st.id)
        while len(self._compat_progress) > 10000:
            self._compat_progress.popitem(last=False)
        return p


def _suffix_of(url: str) -> str:
    from urllib.parse import urlsplit

    suffix = Path(urlsplit(url).path).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix or "") else ""


def envelope(code: int, success: bool, msg: str, data: CompatData | None = None) -> JSONResponse:
    return JSONResponse(CompatEnvelope(code=code, success=success, msg=msg, data=data).model_dump(mode="json"))


# --- the FastAPI app ---------------------------------------------------------------------------------
def create_app(settings: Settings, gateway) -> FastAPI:
    """The FastAPI app of the service, on `gateway` (the job manager's handle)."""
    svc = Service(settings, gateway)
    app = FastAPI(title="lipsync-cluster", version="0.1.0",
                  description="Lip-sync rendering jobs: submit audio + a template video, poll or stream "
                              "status, download the mp4. Bearer-token auth when LIPSYNC_API_TOKEN is set.")
    app.state.service = svc
    auth = [Depends(svc.check_token)]
    err_responses = {c: {"model": ApiError} for c in (400, 401, 404, 409, 413, 422, 429, 503)}

    @app.exception_handler(ApiProblem)
    async def _problem(request: Request, e: ApiProblem):
        return _error_response(e.status, e.code, e.message, e.field, e.headers)

    @app.exception_handler(LipsyncError)
    async def _lipsync(request: Request, e: LipsyncError):
        status = http_status(e)
        headers = {"Retry-After": str(settings.retry_after_s)} if status in (429, 503) else None
        field = getattr(e, "field", None) or _field_of(e, getattr(request.state, "inputs", {}))
        if status >= 500:
            log.error("%s %s: %s: %s", request.method, request.url.path, e.code, e.message)
        return _error_response(status, e.code, e.message, field, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        return _error_response(422, "input.invalid", f"{'.'.join(loc) or 'request'}: {first.get('msg')}",
                               ".".join(loc) or None)

    # --- health -----------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz", tags=["health"], summary="Job manager reachable and model workers loaded (503 until then)",
             dependencies=auth, responses={503: {"model": ApiError}})
    async def readyz() -> JSONResponse:
        try:
            state = await gateway.ready(timeout=2.0)
        except (LipsyncError, asyncio.TimeoutError) as e:
            return _error_response(503, "service.not_ready", f"job manager not ready: {e}", None,
                                   {"Retry-After": str(settings.retry_after_s)})
        live = [m for m in state.get("models", []) if m.get("health") == "live"]
        comps = [m for m in state.get("compositors", []) if m.get("health") == "live"]
        if not live or not comps:
            return _error_response(503, "service.not_ready", f"{len(live)} live model workers, {len(comps)} live "
                                   f"compositors", None, {"Retry-After": str(settings.retry_after_s)})
        return JSONResponse({"ok": True, "model_workers": len(live), "compositors": len(comps)})

    # --- jobs -----------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=202, response_model=JobAccepted, tags=["jobs"], dependencies=auth,
              responses=err_responses, summary="Submit a job (multipart upload, or JSON with URLs/paths)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {
                      "schema": JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")},
                  "multipart/form-data": {"schema": {"type": "object", "required": ["audio"], "properties": {
                      "audio": {"type": "string", "format": "binary"}, "video": {"type": "string", "format": "binary"},
                      "avatar_id": {"type": "string"}, "id": {"type": "string"}, "sync_mode": {"type": "string"},
                      "model": {"type": "string"}, "crf": {"type": "integer"},
                      "callback_url": {"type": "string"}}}}}}})
    async def submit_job(request: Request) -> JSONResponse:
        await svc.admit_or_429()
        ctype = request.headers.get("content-type", "")
        tmpdir = svc.tmpdir()
        try:
            staged: dict[str, str] = {}
            sources: dict[str, str] = {}
            if ctype.startswith("multipart/form-data"):
                declared = request.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > 2 * settings.max_upload_bytes + (1 << 20):
                    raise InputTooLarge(f"request body of {declared} bytes exceeds the upload limit "
                                        f"({settings.max_upload_bytes} bytes per file)", path="body")
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
                request.state.inputs = {"audio": body.audio, "video": body.video}
                for name in ("audio", "video"):
                    if name in up.files:
                        path, fname = up.files[name]
                        staged[name] = await gateway.upload(path, fname)
                        sources[staged[name]] = fname  # errors name the client's file, not the ref
            else:
                try:
                    raw = await request.body()
                    body = JobCreate.model_validate_json(raw)
                except ValidationError as e:
                    raise RequestValidationError(e.errors()) from None
                request.state.inputs = {"audio": body.audio, "video": body.video}
            await svc.check_callback(body.callback_url)
            st = await svc.create_job(body.id, body.audio, body.video, body.avatar_id, body.sync_mode, body.model,
                                      tmpdir, staged, crf=body.crf, sources=sources)
            await svc.register_callback(st.id, body.callback_url)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return JSONResponse(JobAccepted(id=st.id, state=st.state).model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/v1/jobs/{st.id}"})

    @app.get("/v1/jobs", response_model=JobPage, tags=["jobs"], dependencies=auth, responses=err_responses,
             summary="List jobs, newest first")
    async def list_jobs(state: list[JobState] | None = Query(None), limit: int = Query(50, ge=1, le=500),
                        offset: int = Query(0, ge=0)) -> JobPage:
        jobs = await gateway.list_jobs(state or None, limit + 1, offset)
        more = len(jobs) > limit
        return JobPage(jobs=[job_view(j) for j in jobs[:limit]], next_offset=offset + limit if more else None)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], dependencies=auth,
             responses=err_responses, summary="A job's state, stage, progress, timings, error and output")
    async def get_job(job_id: str) -> JobView:
        return job_view(await gateway.get(job_id))

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], dependencies=auth,
                responses=err_responses, summary="Cancel a job (a finished job is left as it is)")
    async def cancel_job(job_id: str) -> JobView:
        return job_view(await gateway.cancel(job_id))

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], dependencies=auth, responses=err_responses,
             summary="Server-Sent Events: one `status` event (a JobView) per change, until a terminal state",
             response_class=StreamingResponse)
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        first = await gateway.get(job_id)  # 404 before the stream starts

        async def events() -> AsyncIterator[bytes]:
            st, last, last_sent = first, None, time.monotonic()
            deadline = time.monotonic() + settings.job_timeout_s
            while True:
                view = job_view(st)
                key = (view.state, view.frames_done, view.frames_total, view.stage)
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
                st = await gateway.wait(job_id, 0.5)  # at once when the job ends, else after 0.5 s

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.head("/v1/jobs/{job_id}/result", include_in_schema=False, dependencies=auth)
    async def job_result_head(job_id: str, request: Request) -> Response:
        return await svc.result_response(request, job_id)

    @app.get("/v1/jobs/{job_id}/result", tags=["jobs"], dependencies=auth,
                   responses={**err_responses, 200: {"content": {"video/mp4": {}}},
                              206: {"content": {"video/mp4": {}}}},
                   summary="The output mp4 (Range, ETag); 409 until the job has succeeded",
                   response_class=StreamingResponse)
    async def job_result(job_id: str, request: Request) -> Response:
        return await svc.result_response(request, job_id)

    # --- avatars ------------------------------------------------------------------------------------
    async def _sidecar(method: str, *args, timeout: float | None = None):
        from actors.service_support import ManagerUnavailable, service_sidecar

        ref = getattr(service_sidecar(settings), method).remote(*args)
        try:
            return await asyncio.wait_for(ref, timeout=timeout or settings.actor_call_timeout_s)
        except asyncio.TimeoutError as e:
            raise ManagerUnavailable(f"the service sidecar did not answer {method} in time") from e
        except Exception as e:
            from actors import task_cause

            cause = task_cause(e)
            if isinstance(cause, LipsyncError):
                raise cause from None
            raise

    @app.post("/v1/avatars", status_code=201, response_model=AvatarView, tags=["avatars"], dependencies=auth,
              responses=err_responses, summary="Prepare a template once (multipart `video` or JSON {video})",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": AvatarCreate.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "required": ["video"], "properties": {
                      "video": {"type": "string", "format": "binary"}}}}}}})
    async def create_avatar(request: Request) -> JSONResponse:
        tmpdir = svc.tmpdir()
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                up = Upload(tmpdir, settings.max_upload_bytes)
                await up.read(request)
                if "video" not in up.files:
                    raise ApiProblem(422, "input.invalid", "multipart field 'video' (a file) is required", "video")
                path, fname = up.files["video"]
                ref = await gateway.upload(path, fname)
            else:
                try:
                    body = AvatarCreate.model_validate_json(await request.body())
                except ValidationError as e:
                    raise RequestValidationError(e.errors()) from None
                request.state.inputs = {"video": body.video}
                ref = await svc.stage_input(body.video, "video", tmpdir)
                if not ref.startswith("upload:"):  # a server path: stored through the manager first
                    raise ApiProblem(422, "input.invalid", "avatars are prepared from an upload or a URL", "video")
            summary = await _sidecar("prepare_avatar", ref, timeout=settings.chunk_timeout_s)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return JSONResponse(AvatarView(**summary).model_dump(mode="json"), status_code=201)

    @app.get("/v1/avatars/{avatar_id}", response_model=AvatarView, tags=["avatars"], dependencies=auth,
             responses=err_responses, summary="A prepared avatar")
    async def get_avatar(avatar_id: str) -> AvatarView:
        try:
            return AvatarView(**await _sidecar("get_avatar", avatar_id))
        except InputNotFound as e:
            raise ApiProblem(404, "avatar.not_found", e.message, "avatar_id") from None

    @app.get("/v1/avatars", response_model=list[AvatarView], tags=["avatars"], dependencies=auth,
             responses=err_responses, summary="Prepared avatars")
    async def list_avatars(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> list[AvatarView]:
        return [AvatarView(**a) for a in await _sidecar("list_avatars", limit, offset)]

    # --- batches ------------------------------------------------------------------------------------
    @app.post("/v1/batches", status_code=202, response_model=BatchView, tags=["batches"], dependencies=auth,
              responses=err_responses, summary="Many audios against one video or avatar")
    async def create_batch(body: BatchCreate) -> JSONResponse:
        if len(body.audios) > settings.max_batch_jobs:
            raise ApiProblem(422, "input.invalid", f"a batch carries at most {settings.max_batch_jobs} audios "
                             f"(LIPSYNC_MAX_BATCH_JOBS), got {len(body.audios)}", "audios")
        await svc.check_callback(body.callback_url)
        n = await gateway.unfinished_count(settings.max_queued_jobs)
        if n + len(body.audios) > settings.max_queued_jobs:
            raise QueueFull(f"the job queue cannot take {len(body.audios)} more jobs ({n} unfinished, "
                            f"LIPSYNC_MAX_QUEUED_JOBS={settings.max_queued_jobs}); retry later")
        batch_id = body.id or new_job_id()
        tmpdir = svc.tmpdir()
        try:
            staged = {}
            if body.video is not None:
                staged["video"] = await svc.stage_input(body.video, "video", tmpdir)
            for i, audio in enumerate(body.audios):
                st = await svc.create_job(f"{batch_id}--{i:03d}", audio, body.video, body.avatar_id,
                                          body.sync_mode, body.model, tmpdir, staged, crf=body.crf)
                await svc.register_callback(st.id, body.callback_url)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        view = await _batch(batch_id, len(body.audios))
        return JSONResponse(view.model_dump(mode="json"), status_code=202)

    async def _batch(batch_id: str, n: int | None = None) -> BatchView:
        jobs = []
        i = 0
        while n is None or i < n:
            try:
                jobs.append(job_view(await gateway.get(f"{batch_id}--{i:03d}")))
            except JobNotFound:
                break
            i += 1
        if not jobs:
            raise JobNotFound(f"batch {batch_id} does not exist")
        counts: dict[str, int] = {}
        for j in jobs:
            counts[j.state.value] = counts.get(j.state.value, 0) + 1
        if all(j.state.terminal for j in jobs):
            state = JobState.succeeded if all(j.state == JobState.succeeded for j in jobs) else JobState.failed
        else:
            state = JobState.rendering if any(j.state != JobState.queued for j in jobs) else JobState.queued
        return BatchView(id=batch_id, state=state, progress=sum(j.progress for j in jobs) / len(jobs),
                         counts=counts, jobs=jobs)

    @app.get("/v1/batches/{batch_id}", response_model=BatchView, tags=["batches"], dependencies=auth,
             responses=err_responses, summary="One status over a batch's jobs")
    async def get_batch(batch_id: str) -> BatchView:
        return await _batch(batch_id)

    # --- compatibility API ---------------------------------------------------------------------------
    @app.post("/easy/submit", response_model=CompatEnvelope, tags=["compat"], dependencies=auth,
              summary="Compatibility: submit {audio_url, video_url, code, pn, ...}")
    async def easy_submit(request: Request) -> JSONResponse:
        try:
            raw = json.loads(await request.body() or b"{}")
            body = CompatSubmit.model_validate(raw)
        except (ValueError, ValidationError) as e:
            return envelope(10002, False, f"bad parameter: the body must be a JSON object: {str(e)[:300]}")
        notes = []
        for name in ("chaofen", "watermark_switch", "digital_auth"):
            if str(getattr(body, name) or 0) not in ("0", ""):
                notes.append(f"{name} is not supported and was ignored")
        extra = sorted((body.model_extra or {}).keys())
        if extra:
            notes.append(f"unknown fields ignored: {', '.join(extra)}")
        if not body.audio_url or not body.video_url:
            return envelope(10002, False, "bad parameter: audio_url and video_url are required")
        code = body.code or str(uuid.uuid4())
        if not _ID_RE.fullmatch(code):
            return envelope(10002, False, f"bad parameter: code must match {JOB_ID_PATTERN}")
        pn = str(body.pn if body.pn is not None else 1)
        if pn not in ("0", "1"):
            return envelope(10002, False, "bad parameter: pn must be 1 (ping-pong) or 0 (forward loop)")
        tmpdir = svc.tmpdir()
        try:
            await svc.admit_or_429()
            await svc.create_job(code, body.audio_url, body.video_url, None, "pingpong" if pn == "1" else "loop",
                                 None, tmpdir)
        except QueueFull as e:
            return envelope(10001, True, f"busy: {e.message}")
        except ApiProblem as e:
            return envelope(10002, False, f"bad parameter: {e.message}")
        except LipsyncError as e:
            status = http_status(e)
            if status in (400, 404, 409, 413):
                return envelope(10002, False, f"bad parameter: {e.code}: {e.message}")
            return envelope(9999, False, f"error: {e.code}: {e.message}")
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return envelope(10000, True, "ok" + (f" ({'; '.join(notes)})" if notes else ""), CompatData(code=code))

    @app.get("/easy/query", response_model=CompatEnvelope, tags=["compat"], dependencies=auth,
             summary="Compatibility: poll a job by code")
    async def easy_query(code: str = "") -> JSONResponse:
        if not code or not _ID_RE.fullmatch(code):
            return envelope(10004, True, "task not found", None)
        try:
            st = await gateway.get(code)
        except JobNotFound:
            return envelope(10004, True, "task not found", None)
        except LipsyncError as e:
            return envelope(9999, False, f"error: {e.code}: {e.message}")
        if st.state == JobState.succeeded:
            size = st.output_bytes
            try:
                if size is None:
                    raise RuntimeError("the job reports no output size")
                if settings.compat_data_dir is not None:
                    await svc.publish_compat(code, size)
            except Exception as e:
                log.error("compat publish of %s failed: %r", code, e)
                return envelope(9999, False, f"error: the result could not be published: {e}")
            svc._compat_progress.pop(code, None)
            return envelope(10000, True, "success", CompatData(code=code, status=2, progress=100,
                                                               result=svc.compat_result_path(code)))
        if st.state.terminal:
            err = st.error
            msg = f"{err.code}: {err.message}" if err else f"job {st.state.value}"
            return envelope(10000, True, "failed", CompatData(code=code, status=3, progress=svc.compat_progress(st),
                                                              msg=msg))
        return envelope(10000, True, "running", CompatData(code=code, status=1, progress=svc.compat_progress(st)))

    @app.post("/upload", response_model=CompatEnvelope, tags=["compat"], dependencies=auth,
              summary="Compatibility: upload a file (multipart `file`/`audio`); answers its path")
    async def easy_upload(request: Request) -> JSONResponse:
        tmpdir = svc.tmpdir()
        try:
            up = Upload(tmpdir, settings.max_upload_bytes)
            try:
                await up.read(request)
            except InputTooLarge as e:
                return envelope(10002, False, f"bad parameter: {e.message}")
            if not up.files:
                return envelope(10002, False, "bad parameter: no file part (multipart field 'file')")
            path, fname = next(iter(up.files.values()))
            suffix = Path(fname).suffix.lower()
            suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
            dest = svc.upload_dir() / f"{uuid.uuid4().hex}{suffix}"
            shutil.move(str(path), dest)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return envelope(10000, True, "ok", CompatData(path=str(dest)))

    @app.api_route("/{full_path:path}", methods=["GET", "HEAD"], include_in_schema=False, dependencies=auth)
    async def compat_result(full_path: str, request: Request) -> Response:
        """Serve `data.result` paths this service published, and nothing else."""
        m = re.fullmatch(r"(?P<prefix>.*?)/?temp/(?P<code>[^/]+)-r\.mp4", full_path)
        if m is not None and _ID_RE.fullmatch(m.group("code")):
            want = svc.compat_result_path(m.group("code")).lstrip("/")
            if full_path.lstrip("/") == want:
                return await svc.result_response(request, m.group("code"), f"{m.group('code')}-r.mp4")
        return _error_response(404, "not_found", f"no such path: /{full_path}", None)

    return app


# --- Ray Serve ----------------------------------------------------------------------------------------
def _deployment():
    from ray import serve

    @serve.deployment(name="lipsync-ingress", ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=200, health_check_period_s=10)
    @serve.ingress()
    class Ingress:
        def __init__(self, settings: dict | None = None) -> None:
            from actors import metrics

            logging.basicConfig(level=logging.INFO)
            self.settings = Settings(**(settings or {}))
            metrics.install("lipsync-ingress", self.settings.log_format)  # JSON logs with actor and node

        def __serve_build_asgi_app__(self):
            from actors.service_support import ManagerGateway

            return create_app(self.settings, ManagerGateway(self.settings))

    return Ingress


def build_app(args: dict | None = None):
    """A Serve application; `args` override LIPSYNC_* settings (a Serve config's `args`)."""
    settings = Settings(**(args or {}))
    overrides = settings.model_dump(mode="json")  # replicas get exactly this process's settings
    if settings.api_token is not None:
        overrides["api_token"] = settings.api_token.get_secret_value()
    return _deployment().options(num_replicas=settings.serve_replicas).bind(overrides)


def __getattr__(name: str):
    if name == "app":  # built on first use so that importing this module stays cheap
        return build_app()
    raise AttributeError(name)
