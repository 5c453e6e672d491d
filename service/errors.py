"""The API's error answers: `{"error": {"code", "message", "field"}}` for every route, and the
HTTP status of each typed error (`cluster.errors`). The handlers are installed once, by the app."""
from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import LipsyncError, QueueFull  # noqa: F401 (QueueFull: the routes import it from here)
from cluster.schemas import CompatEnvelope
from cluster.views import shortened, text_without_root

log = logging.getLogger("lipsync.service")

# The error bodies a route may answer, for the OpenAPI schema.
ERROR_CODES = (400, 401, 404, 409, 410, 413, 415, 422, 429, 503, 507)


def error_responses(*codes: int) -> dict:
    """A router's or a route's `responses` for these statuses (default `ERROR_CODES`): each with the
    API's error body."""
    from cluster.schemas import ApiError

    return {c: {"model": ApiError} for c in codes or ERROR_CODES}


def openapi_with_one_error_body(app: FastAPI) -> dict:
    """The app's OpenAPI description, where every validation answer (422) is described with the
    body it really has, the API's error body (FastAPI adds its own `HTTPValidationError` to each
    route with parameters that does not declare 422)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = spec.get("components", {}).get("schemas", {})
        for path in spec["paths"].values():
            for operation in path.values():
                for answer in operation.get("responses", {}).values():
                    content = answer.get("content", {}).get("application/json", {})
                    if content.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                        content["schema"] = {"$ref": "#/components/schemas/ApiError"}
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = spec
    return app.openapi_schema


class ApiProblem(Exception):
    """An HTTP error answer with the API's error body (`envelope`: the compatibility API's `{code, success, msg,
    data}` with that code instead)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, envelope: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers
        self.envelope = envelope


def only_query(*names: str):
    """A route dependency refusing query parameters the route does not take (422 `input.invalid` naming it): FastAPI
    ignores them, so `GET /v1/jobs?status=failed` (for `state`) listed every job as if it were the failed ones."""
    async def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(names))
        if unknown:
            raise ApiProblem(422, "input.invalid", f"unknown query parameter {unknown[0]!r} (this route takes "
                             f"{', '.join(names)})", unknown[0])
    return Depends(check)


def http_status(err: LipsyncError) -> int:
    code = err.code
    if code == "input.too_large":
        return 413
    if code == "input.not_found" and err.path in ("audio", "video", "avatar_id"):
        return 400
    if code == "input.invalid" and err.path == "model":  # a value of the field outside what works (`builtin:10`):
        return 422  # as the field's pattern refuses others (`../x`), so that one field has one status
    if code.startswith("input.") or code.startswith("model.invalid"):
        return 400
    if code in ("job.not_found", "avatar.not_found", "session.not_found", "batch.not_found", "hls.not_published"):
        return 404
    if code in ("session.ended", "session.actor_lost", "session.restart_failed"):
        return 410  # a session that has ended (or failed): what the HTTP routes and the socket (4410) say
    if code in ("avatar.not_ready", "session.not_ended", "session.no_recording", "session.offset_gap"):
        return 409
    if code == "session.capacity":
        return 429
    if code in ("job.conflict", "job.not_succeeded", "job.run_elsewhere", "job.not_finished"):
        return 409
    if code == "output.expired":
        return 410
    if code == "service.busy":
        return 429
    if code == "resource.disk":  # the storage root is full (or read-only): Insufficient Storage
        return 507
    if code in ("service.unavailable", "render.timeout", "service.storage_lost", "service.store_too_new"):
        return 503
    return 500


# errors that are about one input whatever file it is (the same file sent as audio and video is both)
_FIELD_OF_CODE = {"input.no_video_stream": "video", "input.no_face": "video", "input.face_sideways": "video",
                  "input.no_audio_stream": "audio"}


def field_of(err: LipsyncError, values: dict[str, str | None]) -> str | None:
    """The request field an error is about: its own path when that names one, else the field its
    code is about, else the field whose value the error mentions."""
    if err.path in values or err.path in ("audio", "video", "avatar_id", "model", "sync_mode", "file", "body",
                                          "callback_url", "before"):
        return err.path
    if err.code in _FIELD_OF_CODE and _FIELD_OF_CODE[err.code] in values:
        return _FIELD_OF_CODE[err.code]
    for name, value in values.items():
        if value and (err.path == value or (value in err.message)):
            return name
    return None


def _methods_of_path(request: Request) -> str:
    """The methods the app's routes take at this request's path, comma-separated (each route asked:
    FastAPI's included routers keep their routes to themselves)."""
    from starlette.routing import Match

    return ", ".join(method for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
                     if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                            for route in request.app.routes))


def error_response(status: int, code: str, message: str, field: str | None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status,
                        headers=headers)


# what a field whose pattern did not match takes, said in words (the pattern itself is no help to a user)
_PATTERN_WORDS = {
    "model": "'builtin', 'builtin:S' (S a crop size), 'latency:MS' or the name of one of the service's models "
             "(`lipsync models`)",
    "id": "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 (48 for a batch)",
    "avatar_id": "the hex id of a prepared avatar (what `lipsync avatar VIDEO` prints, POST /v1/avatars answers)",
}
#: An id's length out of bounds is the same mistake as its pattern ("String should have at least 8 characters"
#: said nothing of what an avatar id is)
_ID_TYPES = {"string_pattern_mismatch", "string_too_short", "string_too_long"}


def _said_plainly(error: dict, field: str | None) -> str:
    """A validation error's message, where pydantic's words would be a regular expression."""
    kind = error.get("type")
    if field in _PATTERN_WORDS and (kind == "string_pattern_mismatch" or (field != "model" and kind in _ID_TYPES)):
        given = str(error.get("input"))
        return f"{given[:100]!r}{'...' if len(given) > 100 else ''} is not valid: expected {_PATTERN_WORDS[field]}"
    return str(error.get("msg"))


def proxy_gone(e: BaseException | None) -> bool:
    """Whether `e` is Ray's word that Serve's HTTP proxy has died (the replica sends each answer through it):
    killed as the service stops, an answer in flight (an open event stream's) cannot go out."""
    from ray.exceptions import RayActorError

    return isinstance(e, RayActorError) and "ProxyActor" in str(e)


class QuietProxyLoss(logging.Filter):
    """Drop Serve's own "Request failed." traceback of a request whose answer could not go out because Serve's
    HTTP proxy was killed (`proxy_gone`): every stop with an event stream open wrote two ERROR tracebacks, false
    alarms to whoever alerts on ERROR (this service's line says it at WARNING)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage() == "Request failed." and record.exc_info and proxy_gone(record.exc_info[1]))


def install_exception_handlers(app: FastAPI) -> None:
    """Every route answers errors the same way: ApiProblem, typed errors, invalid requests and
    unknown paths all get the API's error body."""

    def said(request: Request, message: str) -> str:  # where the service keeps its files is not told, nor a
        # client's overlong id or URL echoed back whole
        return shortened(text_without_root(message, str(request.app.state.settings.storage_root)))

    @app.exception_handler(ApiProblem)
    async def _problem(request: Request, e: ApiProblem):
        if e.envelope is not None:  # a compatibility route's (its clients read `{code, success, msg, data}` only)
            body = CompatEnvelope(code=e.envelope, success=False, msg=f"{e.code}: {said(request, e.message)}")
            return JSONResponse(body.model_dump(mode="json"), status_code=e.status, headers=e.headers)
        return error_response(e.status, e.code, said(request, e.message), e.field, e.headers)

    @app.exception_handler(LipsyncError)
    async def _lipsync(request: Request, e: LipsyncError):
        status = http_status(e)
        retry_after = request.app.state.settings.retry_after_s
        headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
        field = e.field or field_of(e, getattr(request.state, "inputs", {}))
        if status >= 500:
            log.error("%s %s: %s: %s", request.method, request.url.path, e.code, e.message)
        return error_response(status, e.code, said(request, e.message), field, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = list(first.get("loc", ()))
        if where[:1] in (["query"], ["path"]):  # a parameter: its name (`state`, not `state.0` of a repeated one)
            where = where[1:2]
        loc = [str(x) for x in where if x != "body"]
        field = shortened(".".join(loc)) or None  # (an unknown key of any length is the field)
        return error_response(422, "input.invalid", said(request, f"{field or 'request'}: "
                                                                  f"{_said_plainly(first, field)}"), field)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug: logged with its traceback, answered in the
        if proxy_gone(e):  # the answer's way out (Serve's HTTP proxy) was killed: the service stops, not a bug
            log.warning("%s %s: not answered: Ray Serve's HTTP proxy is gone (the service stops)", request.method,
                        request.url.path)
            return error_response(503, "service.unavailable", "the service is stopping", None)
        log.error("%s %s: unexpected error", request.method, request.url.path, exc_info=e)  # API's error shape
        return error_response(500, "service.internal", f"internal error: {type(e).__name__}", None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(404, "not_found", shortened(f"no such path: {request.url.path}"), None)
        if e.status_code == 405:  # Starlette's Allow names the first route of the path only: every one's
            allowed = _methods_of_path(request) or (e.headers or {}).get("Allow", "")
            return error_response(405, "method_not_allowed", f"{request.method} is not allowed on "
                                  f"{request.url.path} (allowed: {allowed})", None, {"Allow": allowed})
        return error_response(e.status_code, "http_error", str(e.detail), None, dict(e.headers or {}))
