"""The compatibility API of the HeyGem-style servers: `/easy/submit`, `/easy/query`, `/upload`, and
the result files it publishes (`<compat_data_dir>/temp/<code>-r.mp4`, also served over HTTP).
Answers are envelopes `{code, success, msg, data}`, never HTTP errors, as those clients expect."""
from __future__ import annotations

import asyncio
import logging
import re
import shutil
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from cluster.errors import JobNotFound, LipsyncError, OutputExpired
from cluster.schemas import BATCH_SEPARATOR, JOB_ID_PATTERN, CompatData, CompatEnvelope, CompatSubmit, JobState
from service.auth import require_token_compat
from service.backend import Backend, get_backend
from service.errors import ApiProblem, QueueFull, error_response, error_responses, http_status
from service.uploads import Upload, loads_once_per_key, openapi_json_body, read_body

log = logging.getLogger("lipsync.service")

router = APIRouter(tags=["compat"], dependencies=[Depends(require_token_compat)],
                   responses=error_responses(401, 422))
_ID_RE = re.compile(JOB_ID_PATTERN)


def envelope(code: int, success: bool, msg: str, data: CompatData | None = None) -> JSONResponse:
    return JSONResponse(CompatEnvelope(code=code, success=success, msg=msg, data=data).model_dump(mode="json"))


@router.post("/easy/submit", response_model=CompatEnvelope, tags=["compat"],
          summary="Compatibility: submit {audio_url, video_url, code, pn, ...}",
          openapi_extra=openapi_json_body(CompatSubmit))
async def easy_submit(request: Request, backend: Backend = Depends(get_backend)) -> JSONResponse:
    try:
        raw = loads_once_per_key(await read_body(request) or b"{}")  # (a key given twice: which one counts?)
        if not isinstance(raw, dict):
            kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(raw),
                                                                                                 "a number")
            return envelope(10002, False, f"bad parameter: the body must be a JSON object, not {kind}")
        body = CompatSubmit.model_validate(raw)
    except ValidationError as e:  # a JSON object, with a field of the wrong kind: that field and why
        said = "; ".join(f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
                         for error in e.errors(include_url=False)[:5])
        return envelope(10002, False, f"bad parameter: {said}"[:400])
    except ApiProblem as e:
        return envelope(10002, False, f"bad parameter: {e.message}")
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
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
    if not _ID_RE.fullmatch(code) or BATCH_SEPARATOR in code:
        return envelope(10002, False, f"bad parameter: code must match {JOB_ID_PATTERN}, without "
                                      f"'{BATCH_SEPARATOR}' (it joins a batch's id and its jobs' numbers)")
    pn = str(body.pn if body.pn is not None else 1)
    if pn not in ("0", "1"):
        return envelope(10002, False, "bad parameter: pn must be 1 (ping-pong) or 0 (forward loop)")
    tmpdir = backend.tmpdir()
    try:
        await backend.admit_or_429()
        # a code minted here is not the client's: an admission that ends after its answer is not stored
        await backend.create_job(code, body.audio_url, body.video_url, None, "pingpong" if pn == "1" else "loop",
                                 None, tmpdir, id_chosen=bool(body.code))
    except QueueFull as e:
        return envelope(10001, True, f"busy: {e.message}")
    except ApiProblem as e:
        return envelope(10002, False, f"bad parameter: {e.message}")
    except LipsyncError as e:
        status = http_status(e)
        if e.code in ("service.unavailable", "service.busy"):  # the job manager did not answer in time: the client
            # asks again (9999 is a failure for good to the stock client, while a code it chose may still render)
            return envelope(10001, True, f"busy: {e.code}: {e.message}")
        if status in (400, 404, 409, 413):
            return envelope(10002, False, f"bad parameter: {e.code}: {e.message}")
        return envelope(9999, False, f"error: {e.code}: {e.message}")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return envelope(10000, True, "ok" + (f" ({'; '.join(notes)})" if notes else ""), CompatData(code=code))

@router.get("/easy/query", response_model=CompatEnvelope, tags=["compat"],
         summary="Compatibility: poll a job by code")
async def easy_query(code: str = "", backend: Backend = Depends(get_backend)) -> JSONResponse:
    if not code or not _ID_RE.fullmatch(code):
        return envelope(10004, True, "task not found", None)
    # An answer the client takes as the task's end (9999, status 3) only for what really ends it:
    # a job manager restarting, or a publish that failed for now, reads "running" (status 1) with the
    # reason, and the next poll asks again (the stock client marks a task failed for good on 9999).
    def running_for_now(why: str) -> JSONResponse:
        return envelope(10000, True, f"running ({why})",
                        CompatData(code=code, status=1, progress=backend.compat_last_progress(code)))

    try:
        st = await backend.gateway.get(code)
    except JobNotFound:
        return envelope(10004, True, "task not found", None)
    except LipsyncError as e:
        if http_status(e) == 503:
            return running_for_now(f"{e.code}: {e.message}")
        return envelope(9999, False, f"error: {e.code}: {e.message}")
    if st.state == JobState.succeeded:
        size = st.output_bytes
        try:
            if backend.settings.compat_data_dir is not None and size is not None:
                await backend.publish_compat(code, size)
            else:  # served from the job's output: it must still exist (OutputExpired when gone)
                await backend.gateway.read_output(code, 0, 0)
                if size is None:
                    raise RuntimeError("the job reports no output size")
        except Exception as e:
            from cluster.resources import is_disk_full, is_read_only

            # a full disk (or a busy service) for now: asked again at the next query; read-only: no query helps
            if not isinstance(e, OutputExpired) and not is_read_only(e) and (is_disk_full(e) or (
                    isinstance(e, LipsyncError) and http_status(e) == 503)):
                log.warning("compat publish of %s failed for now (asked again at the next query): %r", code, e)
                return running_for_now(f"the result could not be published yet: {e}")
            # an expired output is retention at work, said to the client: not an error of the service
            (log.info if isinstance(e, OutputExpired) else log.error)("compat publish of %s failed: %r", code, e)
            msg = f"{e.code}: {e.message}" if isinstance(e, LipsyncError) else f"the result could not be published: {e}"
            return envelope(10000, True, "failed", CompatData(code=code, status=3, progress=100, msg=msg))
        backend.forget_compat_progress(code)
        return envelope(10000, True, "success", CompatData(code=code, status=2, progress=100,
                                                           result=backend.compat_result_path(code)))
    if st.state.terminal:
        err = backend.view(st).error  # (the storage root not shown)
        msg = f"{err.code}: {err.message}" if err else f"job {st.state.value}"
        return envelope(10000, True, "failed", CompatData(code=code, status=3, progress=backend.compat_progress(st),
                                                          msg=msg))
    return envelope(10000, True, "running", CompatData(code=code, status=1, progress=backend.compat_progress(st)))

@router.post("/upload", response_model=CompatEnvelope, tags=["compat"],
          summary="Compatibility: upload a file (multipart `file`/`audio`); answers its path",
          openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
              "type": "object", "properties": {"file": {"type": "string", "format": "binary"},
                                               "audio": {"type": "string", "format": "binary"}}}}}}})
async def easy_upload(request: Request, backend: Backend = Depends(get_backend)) -> JSONResponse:
    tmpdir = backend.tmpdir()
    try:
        await asyncio.to_thread(backend.sweep_compat_uploads)
        backend.keep_sweeping_compat_uploads()
        up = Upload(tmpdir, backend.settings.max_upload_bytes)
        try:
            await up.read(request)
        except ApiProblem as e:  # not multipart, no boundary: an envelope, as these clients expect
            return envelope(10002, False, f"bad parameter: {e.message}")
        except LipsyncError as e:
            return envelope(10002, False, f"bad parameter: {e.message}")
        if not up.files:
            return envelope(10002, False, "bad parameter: no file part (multipart field 'file')")
        path, fname = next(iter(up.files.values()))
        if path.stat().st_size == 0:  # refused where it is sent (it was accepted, then refused at /easy/submit)
            return envelope(10002, False, f"bad parameter: {fname} is empty (0 bytes)")
        suffix = Path(fname).suffix.lower()
        suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
        dest = backend.upload_dir() / f"{uuid.uuid4().hex}{suffix}"
        await asyncio.to_thread(shutil.move, str(path), dest)  # a copy where the directory is on another disk
    finally:
        await asyncio.to_thread(shutil.rmtree, tmpdir, ignore_errors=True)
    return envelope(10000, True, "ok", CompatData(path=str(dest)))

@router.api_route("/{prefix:path}temp/{code}-r.mp4", methods=["GET", "HEAD"], include_in_schema=False)
async def compat_result(prefix: str, code: str, request: Request, backend: Backend = Depends(get_backend)) -> Response:
    """Serve the `data.result` paths this service published (`GET <server><data.result>`), and nothing else."""
    if _ID_RE.fullmatch(code) and request.url.path.lstrip("/") == backend.compat_result_path(code).lstrip("/"):
        return await backend.result_response(request, code, f"{code}-r.mp4")
    return error_response(404, "not_found", f"no such path: {request.url.path}", None)
