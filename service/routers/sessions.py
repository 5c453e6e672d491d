"""`/v1/sessions`: live avatars. Speech in (WebSocket or idempotent POSTs of PCM), a live HLS
stream out, figures while it runs, the recording afterwards.

The session lives in its own actor (`actors.live.LiveSessionActor`), not in this replica: a
replica that dies loses its open socket, not the session (the client reconnects and resumes from
the byte offset the socket's `ready` message reports).

Two routers: `router` needs the API's bearer token (create, read, delete, the recording);
`public_router` holds what browsers and players open without headers (the audio WebSocket, POST
audio, the playlist and its segments), authorised by one of the session's two tokens in the
query string (`?token=`, from the create response: signed as jobs' watch URLs are, expiring after
`LIPSYNC_LIVE_TOKEN_TTL_S`): the speaking one (`token`, in `audio_ws`) opens the socket, POST audio
and the stream, the watch-only one in `hls_url` only the stream. POST audio takes the bearer token too.
A refused WebSocket is accepted and closed at once with an application code and a reason (a
browser cannot read a refused handshake's status):

| code | why |
|---|---|
| 4400 | a binary message with an odd byte count (PCM s16le is 2 bytes a sample) |
| 4401 | the session token is missing, wrong or expired, or it is `hls_url`'s watch-only one |
| 4404 | no such session |
| 4409 | another audio socket is open on the session |
| 4410 | the session has ended (or failed now: its reason, e.g. `resource.disk`, is the close's) |
| 4415 | `?sample_rate=` is not the session's or not offered (16000, 24000, 48000) |
| 4422 | a text message that is not `{"type": "end"}` JSON |
| 1013 | the session's actor did not answer in time (restarting): connect again shortly |
| 1011 | the session's actor did not come back, or has less speech than the socket sent |
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
import uuid
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from actors import gcs_lookup
from cluster.config import Settings
from cluster.errors import DiskFull, LipsyncError
from cluster.live import SessionOffsetGap
from cluster.schemas import AudioAppended, SessionCreate, SessionView, is_builtin_model
from cluster.views import without_root
from service.auth import require_token
from service.backend import conditional_range
from service.errors import ApiProblem, error_responses, http_status
from service.stream_cache import StreamCache
from service.uploads import json_body, openapi_json_body, read_body

log = logging.getLogger("lipsync.service")

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_token)],
                   responses=error_responses())
public_router = APIRouter(prefix="/v1/sessions", tags=["sessions"],
                          responses=error_responses(401, 404, 410, 422, 503))

RATES = (16000, 24000, 48000)
_SESSION_ID = re.compile(r"^[0-9a-f]{16}$")


# --- talking to the session's actor ----------------------------------------------------------------
def _settings(request: Request | WebSocket):
    return request.app.state.settings


async def _looked_up(what: str, timeout: float, fn, *args):
    """`fn(*args)`, a lookup of actors in Ray's control store (`gcs_lookup`: in a thread, never on the event loop,
    where a GCS that Ray lets take 60 s while it restarts held every request of this replica, health checks, event
    streams and audio sockets with it), within `timeout`; past it a 503 saying "`what` not found in time"."""
    try:
        return await gcs_lookup(fn, *args, timeout=timeout)
    except asyncio.TimeoutError:
        raise ApiProblem(503, "service.unavailable", f"{what} not found in time (the cluster's GCS did not answer)",
                         None, headers={"Retry-After": "1"}) from None


async def _registry(settings: Settings):
    """The live registry's handle (`actors.live.live_registry`), looked up off the event loop (`_looked_up`)."""
    from actors.live import live_registry

    return await _looked_up("the live session registry was", settings.actor_call_timeout_s, live_registry, settings)


async def _call(ref, timeout: float, raw_actor_errors: bool = False):
    """Await an actor call; typed errors come back as themselves, no answer as 503, a dead actor
    as 410 (or as Ray's error with `raw_actor_errors`, for `_ask` to retry)."""
    from actors import raise_if_cancelled, task_cause

    try:
        return await asyncio.wait_for(ref, timeout=timeout)
    except asyncio.TimeoutError:
        raise ApiProblem(503, "service.unavailable", "the live session did not answer in time", None,
                         headers={"Retry-After": "1"}) from None
    except Exception as e:
        await raise_if_cancelled(e)  # (the request was: its client went away)
        cause = task_cause(e)
        if isinstance(cause, LipsyncError):
            raise cause from None
        from ray.exceptions import ActorUnavailableError, RayActorError

        if raw_actor_errors and isinstance(e, (RayActorError, ActorUnavailableError)):
            raise
        if isinstance(e, RayActorError):
            raise ApiProblem(410, "session.ended", "the live session's actor is gone", None) from None
        raise


class NoActor(ApiProblem):
    """No actor runs the session (none began it, or its actors have left: ended, or died for good).
    Routes ask the registry what its journal says (`_stored`): a 404, or its stored view."""

    def __init__(self, session_id: str, message: str) -> None:
        super().__init__(404, "session.not_found", message, "session_id")
        self.session_id = session_id


class SessionGone(ApiProblem):
    """410 for what needs a running session, of one whose actors have left: `view` its journalled end
    (ended; or `failed` and why: a session whose actor died for good, Ray's restarts exhausted)."""

    def __init__(self, view: dict) -> None:
        error = view.get("error") or {}
        super().__init__(410, "session.ended", error.get("message") or
                         f"session {view['id']} has {view.get('state', 'ended')}", None)
        self.view = view


def _actor(settings, session_id: str, handles: list | None = None):
    """The session's actors (`actors.live.SessionActors`, made with `handles` where given); NoActor when none
    runs it."""
    from actors.live import SessionActors
    from cluster.live import SessionNotFound

    if not _SESSION_ID.match(session_id):
        raise ApiProblem(404, "session.not_found", f"no live session {session_id}", "session_id")
    try:
        return SessionActors(settings, session_id, handles)
    except SessionNotFound as e:
        raise NoActor(session_id, e.message) from None


async def _actors(settings, session_id: str):
    """`_actor`, its lookup (two GCS round trips) made off the event loop (`_looked_up`), unless this process
    looked the session up lately (`SessionActors.KNOWN_S`)."""
    from actors.live import SessionActors

    if (handles := SessionActors.known(session_id)) is not None:
        return _actor(settings, session_id, handles)
    return await _looked_up(f"live session {session_id} was", settings.actor_call_timeout_s, _actor, settings,
                            session_id)


async def _stored(settings, missing: NoActor) -> dict:
    """The view of a session without an actor as its journal tells it, from the registry (it runs on
    the storage root's node; this ingress may not): ended, or `failed` (lost); `missing` (404) when no
    such session began."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    try:
        view = await _call((await _registry(settings)).stored_view.remote(missing.session_id),
                           settings.actor_call_timeout_s, raw_actor_errors=True)
    except (RayActorError, ActorUnavailableError) as e:  # the registry itself restarting (Ray restarts it)
        raise ApiProblem(503, "service.unavailable", f"live session {missing.session_id}: the live registry did "
                         f"not answer ({type(e).__name__}); try again", None, headers={"Retry-After": "1"}) from None
    if view is None:
        raise missing
    return view


#: The live streams' files as this ingress process read them from the sessions' actors (`StreamCache`)
_streams = StreamCache()
FIRST_PLAYLIST_WAIT_S = 10.0  # how long a playlist request waits for a new session's first segment
BLOCKING_RELOAD_MAX_S = 3.0  # LL-HLS: a blocking playlist reload waits at most 3 target durations (1 s)
BLOCKING_RELOAD_POLL_S = 0.04  # ... looking at the playlist this often (a frame at 25 fps)
# calls either of a session's actors may answer, or that only the running one accepts and that are
# safe to repeat (an append carries its offset): asked of the partner too when the first is slow
HEDGED = frozenset({"read_hls", "view", "append"})
HEDGE_AFTER_S = 0.25


async def _hedged(actors, method: str, args: tuple, timeout: float):
    """Ask `actors.current`; if it has not answered within `HEDGE_AFTER_S` (it may have just died:
    Ray takes a second or two to say so), ask its partner too. The first answer wins (a standby's
    refusal or a death is no answer); when neither answers, the first one's error is raised."""
    first = asyncio.ensure_future(_call(getattr(actors.current, method).remote(*args), timeout,
                                        raw_actor_errors=True))
    first.add_done_callback(_retrieved)
    done, _ = await asyncio.wait({first}, timeout=HEDGE_AFTER_S)
    partner = None if done else actors.partner()
    if partner is None:
        return await first
    second = asyncio.ensure_future(_call(getattr(partner, method).remote(*args), timeout, raw_actor_errors=True))
    second.add_done_callback(_retrieved)
    pending = {first, second}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is None:
                    if task is second:
                        actors.current = partner
                    return task.result()
        return first.result()  # raises its error
    finally:  # (the request cancelled too: `asyncio.wait` does not pass that on to them)
        for task in pending:
            task.cancel()


def _retrieved(task: asyncio.Task) -> None:
    """A hedged call's outcome taken (one whose request gave up on it was asyncio's "never retrieved" line)."""
    if not task.cancelled():
        task.exception()


async def _ask(settings, session_id: str, actors, method: str, *args, timeout: float):
    """Call the session's running actor (`actors`: `SessionActors`). A call that meets it dead,
    restarting (Ray restarts it, `LIPSYNC_LIVE_MAX_RESTARTS`) or standing by is made again, on
    its partner or itself, until `live_restart_wait_s` has passed (then 503 with Retry-After);
    a session whose actors are gone is `NoActor` (see `_stored`). Every call must be safe to
    repeat: appends carry their byte offset."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    from cluster.live import SessionNotFound, SessionStandby

    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(timeout, settings.live_restart_wait_s)
    while True:
        remaining = max(0.5, deadline - loop.time())
        try:
            if method in HEDGED:
                answer = await _hedged(actors, method, args, min(timeout, remaining))
            else:
                answer = await _call(getattr(actors.current, method).remote(*args), min(timeout, remaining),
                                     raw_actor_errors=True)
            actors.answered()
            return answer
        except (RayActorError, ActorUnavailableError, SessionStandby) as e:
            if loop.time() >= deadline:
                raise ApiProblem(503, "service.unavailable", f"live session {session_id}: its actor did not come "
                                 f"back within {settings.live_restart_wait_s:g} s ({type(e).__name__})", None,
                                 headers={"Retry-After": "1"}) from None
            await asyncio.sleep(0.05 if isinstance(e, SessionStandby) else 0.02)
            try:  # its standby (taking over), or itself again once Ray has restarted it (looked up in a thread)
                await _looked_up(f"live session {session_id}: its actors were", max(0.5, deadline - loop.time()),
                                 actors.standing_by if isinstance(e, SessionStandby) else actors.failed)
            except SessionNotFound as gone:
                raise NoActor(session_id, gone.message) from None


def session_token(request: Request | WebSocket, session_id: str, speak: bool = True) -> tuple[str | None, int | None]:
    """A signed, expiring token of this session (the same signing as jobs' watch URLs,
    `cluster.hls.sign_watch`): `speak` for its audio socket (and its stream), scoped to
    `session:<id>:speak`; else for its stream only (`session:<id>`), what `hls_url` carries, so
    that a URL given to viewers cannot be used to make the avatar speak. (None, None) when the
    service runs without an API token (then these routes are open, as the rest of the API)."""
    import time

    from cluster.hls import sign_watch

    key = request.app.state.watch_key
    if key is None:
        return None, None
    expires = int(time.time() + _settings(request).live_token_ttl_s)
    return sign_watch(key, f"session:{session_id}" + (":speak" if speak else ""), expires), expires


def token_ok(request: Request | WebSocket, session_id: str, token: str | None, speak: bool = False) -> bool:
    """Whether `token` opens this session's audio socket (`speak`) or its stream (either token)."""
    from cluster.hls import check_watch

    key = request.app.state.watch_key
    if key is None:
        return True
    if not token:
        return False
    return check_watch(key, f"session:{session_id}:speak", token) or (
        not speak and check_watch(key, f"session:{session_id}", token))


_FORWARDED_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def public_base(request: Request) -> str:
    """The base of the absolute URLs a session's view carries: LIPSYNC_PUBLIC_URL when set, else
    the request's own address as its client used it, through a TLS proxy too (the first value of
    X-Forwarded-Proto, http or https, and of X-Forwarded-Host, a plain host[:port])."""
    configured = _settings(request).public_url
    if configured:
        return configured.rstrip("/")
    url = request.base_url
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    if proto in ("http", "https"):
        url = url.replace(scheme=proto)
    host = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
    if host and _FORWARDED_HOST.match(host):
        url = url.replace(netloc=host)
    return str(url).rstrip("/")


def _view(request: Request, raw: dict, with_token: bool = True) -> SessionView:
    base = public_base(request)
    sid = raw["id"]
    token, expires = session_token(request, sid)
    watch, _ = session_token(request, sid, speak=False)
    query = f"?token={token}" if token else ""
    watch_query = f"?token={watch}" if watch else ""
    ws_base = "ws" + base[4:] if base.startswith("http") else base
    own = ("token", "token_expires", "hls_url", "audio_ws", "audio_url", "recording_url")
    view = SessionView(**{k: v for k, v in raw.items() if k in SessionView.model_fields and k not in own},
                       hls_url=f"{base}/v1/sessions/{sid}/hls/index.m3u8{watch_query}",  # for viewers: watch only
                       audio_ws=f"{ws_base}/v1/sessions/{sid}/audio{query}",
                       audio_url=f"{base}/v1/sessions/{sid}/audio",
                       token=token if with_token else None,
                       token_expires=datetime.fromtimestamp(expires, timezone.utc) if expires else None,
                       recording_url=f"{base}/v1/sessions/{sid}/recording" if raw.get("recording_bytes") or (
                           raw.get("state") == "failed" and raw.get("segments_published")) else None)
    return view.model_copy(update={"error": without_root(view.error, str(_settings(request).storage_root))})


def _problem(e: LipsyncError) -> ApiProblem:
    status = http_status(e)
    headers = {"Retry-After": "5"} if status == 429 else None
    return ApiProblem(status, e.code, e.message, e.path if e.path in ("avatar_id", "model", "rtmp_url") else None,
                      headers)


# --- create, read, delete ------------------------------------------------------------------------
@router.post("", status_code=201, response_model=SessionView,
             summary="Start a live session on a prepared avatar (404 unknown, 409 not prepared yet, "
                     "429 at LIPSYNC_MAX_LIVE_SESSIONS, 400 an rtmp_url the address guard refuses)",
             openapi_extra=openapi_json_body(SessionCreate))
async def create_session(request: Request) -> JSONResponse:
    body = await json_body(request, SessionCreate)  # read once the token is checked
    settings = _settings(request)
    model = body.model
    if model is not None and not is_builtin_model(model):
        model = str(settings.storage_root / "models" / (model if model.endswith(".onnx") else model + ".onnx"))
    session_id = uuid.uuid4().hex[:16]
    try:
        raw = await _call((await _registry(settings)).create.remote(session_id, body.avatar_id, model,
                                                                body.sample_rate, body.max_seconds,
                                                                body.rtmp_url, body.segment_seconds,
                                                                within_s=settings.model_load_timeout_s + 55),
                          timeout=settings.model_load_timeout_s + 60)
    except LipsyncError as e:
        if e.code == "model.load_failed" and model is not None and not is_builtin_model(model):
            # the model this request named cannot be loaded (no such file, not a lip-sync model): the
            # request's problem, not the server's
            raise ApiProblem(400, e.code, f"model {body.model!r} cannot be loaded: {e.message}", "model") from None
        raise _problem(e) from None
    return JSONResponse(_view(request, raw).model_dump(mode="json"), status_code=201)


#: Why a session ended, as its audio socket's close says it (the session view's `reason`; the web page's Live tab
#: knows a stopping service's by its words, "the service stopped": service/static/live.js)
ENDED_BECAUSE = {"max_seconds": "it reached its max_seconds", "idle_timeout": "it received no audio for a while "
                 "(LIPSYNC_LIVE_IDLE_TIMEOUT_S)", "deleted": "it was deleted", "finished": "it was ended",
                 "service_stopped": "the service stopped"}


def _ended_text(session_id: str, view: dict) -> str:
    """The close text of a socket whose session is ending or has ended: the state, and why where it is known
    (a socket closed at `max_seconds` said only "is ending", a probe)."""
    because = ENDED_BECAUSE.get(view.get("reason") or "")
    if because and view.get("reason") == "max_seconds" and view.get("max_seconds"):
        because += f" ({view['max_seconds']:g} s)"
    return f"session {session_id} is {view.get('state')}" + (f": {because}" if because else "")


@router.get("", response_model=list[SessionView], summary="The live sessions not yet ended, by id")
async def list_sessions(request: Request) -> list[SessionView]:
    """Each session not yet ended, as `GET /v1/sessions/{id}` shows it: a client that lost a session's id finds it
    here, to watch or end it (a probe's could not, and waited for the idle timeout). One that does not answer now
    (restarting) is left out."""
    settings = _settings(request)
    running = await _call((await _registry(settings)).running.remote(), settings.actor_call_timeout_s)

    async def view(session_id: str) -> dict | None:
        try:  # (each bounded: one restarting is left out, not waited for in turn with the others)
            return await asyncio.wait_for(_ask(settings, session_id, await _actors(settings, session_id), "view",
                                               timeout=settings.actor_call_timeout_s), settings.actor_call_timeout_s)
        except (ApiProblem, asyncio.TimeoutError):  # (NoActor among them) ended meanwhile, or not answering now
            return None

    raws = await asyncio.gather(*(view(session_id) for session_id in sorted(running)))
    return [_view(request, raw) for raw in raws if raw is not None and raw.get("state") in ("live", "starting",
                                                                                             "ending")]


@router.get("/{session_id}", response_model=SessionView, summary="A session's state and figures")
async def get_session(session_id: str, request: Request) -> SessionView:
    settings = _settings(request)
    try:
        actor = await _actors(settings, session_id)
        raw = await _ask(settings, session_id, actor, "view", timeout=settings.actor_call_timeout_s)
    except NoActor as e:
        raw = await _stored(settings, e)
    return _view(request, raw)


@router.delete("/{session_id}", response_model=SessionView,
               summary="End the session now; its recording is then at /recording")
async def delete_session(session_id: str, request: Request) -> SessionView:
    settings = _settings(request)
    try:
        raw = await _ask(settings, session_id, await _actors(settings, session_id), "stop", "deleted", timeout=90.0)
    except NoActor as e:  # ended already (a repeated DELETE): its view, as the first one answered
        raw = await _stored(settings, e)
    return _view(request, raw, with_token=False)


@router.post("/{session_id}/end", response_model=SessionView,
             summary="End the speech and the session once everything received is rendered")
async def finish_session(session_id: str, request: Request) -> SessionView:
    settings = _settings(request)
    try:
        actor = await _actors(settings, session_id)
        await _ask(settings, session_id, actor, "finish", timeout=settings.actor_call_timeout_s)
        raw = await _ask(settings, session_id, actor, "view", timeout=settings.actor_call_timeout_s)
    except NoActor as e:
        raw = await _stored(settings, e)
    return _view(request, raw, with_token=False)


def require_speak_access(session_id: str, request: Request, token: str | None = Query(
        None, description="the session's speaking token (`token` of its view, what `audio_ws` carries), instead "
                          "of the bearer token")) -> None:
    """POST audio takes what the audio socket takes, the session's speaking token, or the API's bearer
    token: a page or device given a session's `token` could speak through the socket only (where a proxy
    lets no WebSocket through, not at all). A token that is given must be the speaking one."""
    if token is not None:
        if not token_ok(request, session_id, token, speak=True):
            raise ApiProblem(401, "auth.invalid_signature", "the session token (?token=) is wrong, expired, or "
                             "the watch-only one of hls_url: audio takes the speaking token of audio_ws", "token")
        return
    require_token(request)


@public_router.post("/{session_id}/audio", response_model=AudioAppended, dependencies=[
                        Depends(require_speak_access)],
                    responses=error_responses(400, 409, 410, 429),
                    openapi_extra={"requestBody": {"required": True, "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
                    summary="Append raw PCM s16le at the session's rate, idempotent by `offset` (bytes already "
                            "received are skipped); 409 for a gap, 429 while the buffer is full; the bearer "
                            "token or the session's speaking ?token=")
async def append_audio(session_id: str, request: Request, offset: int = Query(..., ge=0, le=2**53),
                       end: bool = Query(False, description="also end the utterance")) -> JSONResponse:
    settings = _settings(request)
    try:
        actor = await _actors(settings, session_id)
        body = await read_body(request, AUDIO_POST_LIMIT)
        if len(body) % 2:
            raise ApiProblem(400, "input.odd_pcm", f"{len(body)} bytes of PCM: s16le needs whole 2-byte samples",
                             "body")
        try:
            answer = await _ask(settings, session_id, actor, "append", body, offset,
                                timeout=settings.actor_call_timeout_s)
        except SessionOffsetGap as e:  # the actor's own words (as themselves, not Ray's traceback)
            raise ApiProblem(409, "session.offset_gap", e.message, "offset") from None
        if answer.get("state") in ("ending", "ended", "failed"):
            raise ApiProblem(410, "session.ended", f"session {session_id} has ended", None)
        if answer.get("socket_held"):
            raise ApiProblem(409, "session.socket_open", "an audio socket is sending to this session: send through "
                             "it, or close it first (a socket that sent nothing for 10 s lets go)", None)
        if not answer["accepted"] or answer["offset"] < offset + len(body):  # full, or it took a part
            raise ApiProblem(429, "session.buffer_full", f"{answer['buffered_s']:.1f} s of speech are waiting to "
                             f"be rendered (LIPSYNC_LIVE_BUFFER_SECONDS); send again from offset {answer['offset']} "
                             "(the same body at the same offset will do: bytes already received are skipped)",
                             None, headers={"Retry-After": "1"})
        if end:
            await _ask(settings, session_id, actor, "end_speech", timeout=settings.actor_call_timeout_s)
    except NoActor as e:
        raise SessionGone(await _stored(settings, e)) from None
    return JSONResponse(AudioAppended(offset=answer["offset"], accepted=True,
                                      buffered_seconds=answer["buffered_s"]).model_dump())


@router.get("/{session_id}/recording", response_class=StreamingResponse,
            responses={200: {"content": {"video/mp4": {}}}, 206: {"content": {"video/mp4": {}}},
                       **error_responses(416)},
            summary="The whole session as one verified mp4 (Range, ETag; 409 until the session has ended)")
async def get_recording(session_id: str, request: Request) -> Response:
    """Once the session has ended its recording is read through the registry (on the storage root's
    node, for the service's life): never through the session's actors, which leave
    `LIPSYNC_LIVE_KEEP_ENDED_S` after the end, maybe in the middle of a download."""
    from actors.live import LOST_RECORDING_WAIT_S

    settings = _settings(request)
    try:
        actor = await _actors(settings, session_id)
        raw = await _ask(settings, session_id, actor, "view", timeout=settings.actor_call_timeout_s)
        gone = False
    except NoActor as e:
        raw, gone = await _stored(settings, e), True
    registry = await _registry(settings)
    size = raw.get("recording_bytes")
    if not size and gone and raw.get("state") == "failed":  # what it had published, joined now (once)
        try:
            size = await _call(registry.join_recording.remote(session_id), 2 * LOST_RECORDING_WAIT_S)
        except LipsyncError as e:
            raise ApiProblem(409, "session.no_recording", f"session {session_id} failed and the segments it had "
                             f"published could not be joined: {e.message}", None) from None
        if not size:
            raise ApiProblem(409, "session.no_recording", f"session {session_id} failed before it published a "
                             f"segment ({(raw.get('error') or {}).get('message')})", None)
    if not size:
        state = raw["state"]
        raise ApiProblem(409, "session.not_ended" if state not in ("ended", "failed") else "session.no_recording",
                         f"session {session_id} is {state}; the recording exists once it has ended"
                         + (f" ({raw['error']['message']})" if raw.get("error") else ""), None)

    # a finished recording never changes: resumable (Range, If-Range) and cacheable (ETag), as a job's result
    headers = {"Content-Disposition": f'attachment; filename="{session_id}.mp4"'}
    answer = conditional_range(request, size, f'"{session_id}-{size}"', headers, "recording")
    if isinstance(answer, Response):
        return answer
    start, stop, status = answer

    async def parts():
        pos = start
        while pos < stop:
            data = await _call(registry.read_recording.remote(session_id, pos, min(1 << 20, stop - pos)),
                               settings.actor_call_timeout_s)
            if not data:
                raise RuntimeError(f"session {session_id}: recording ended at byte {pos} of {size}")
            pos += len(data)
            yield data

    return StreamingResponse(parts(), status_code=status, media_type="video/mp4", headers=headers)


# --- the stream (players: no headers, the session token in the query) -------------------------------
@public_router.head("/{session_id}/hls/{name}", include_in_schema=False)  # a player or CDN probing first
@public_router.get("/{session_id}/hls/{name}", include_in_schema=True,
                   summary="The live HLS playlist (index.m3u8: sliding window, fMP4 segments <= 0.5 s) "
                           "and its init and media segments; ?token= the session token")
async def get_hls(session_id: str, name: str, request: Request, token: str = Query("")) -> Response:
    if not token_ok(request, session_id, token):  # before the lookup: no session's existence is told without it
        raise ApiProblem(401, "auth.invalid_token", "missing, wrong or expired session token (?token=)", "token")
    if "_HLS_part" in request.query_params and "_HLS_msn" not in request.query_params:  # (LL-HLS: a 400)
        raise ApiProblem(400, "request.invalid", "_HLS_part without _HLS_msn: a blocking playlist reload names "
                         "the segment it waits for", "_HLS_msn")
    settings = _settings(request)
    file = "live.m3u8" if name == "index.m3u8" else name
    try:
        actor = await _actors(settings, session_id)

        # (each file read from the session's actor about once per ingress process, not once per viewer)
        data = await (_playlist(settings, session_id, actor) if file == "live.m3u8" else _streams.file(
            session_id, file, lambda: _ask(settings, session_id, actor, "read_hls", file,
                                           timeout=settings.actor_call_timeout_s)))
        if name == "index.m3u8" and "_HLS_msn" not in request.query_params and not _has_segment(data):
            # a new session's playlist exists once its first part is published, and lists a whole segment
            # about a segment's time later: the request waits for that, bounded, since players give up on a
            # 404 playlist (hls.js) or one without a segment (ffmpeg, ffplay: "Empty segment")
            data = await _playlist_until(settings, session_id, actor, data, _has_segment, FIRST_PLAYLIST_WAIT_S, 0.1)
        if data is not None and name == "index.m3u8" and "_HLS_msn" in request.query_params:
            data = await _blocking_reload(request, settings, session_id, actor, data)
    except NoActor as e:  # its actors have left (maybe while this request waited): the stream as it ended
        _streams.forget(session_id)
        await _stored(settings, e)  # 404 unless the session began
        registry = await _registry(settings)
        data = await _call(registry.read_hls.remote(session_id, file), settings.actor_call_timeout_s)
    if data is None:
        raise ApiProblem(404, "hls.not_published", f"session {session_id} has no stream file {name} (yet)", None)
    if name == "index.m3u8" and token:  # the segments' URIs carry the token too (relative URIs drop the query)
        query = "?token=" + urllib.parse.quote(token, safe="")  # as given (checked above, where a key exists)
        text = re.sub(r'^(?!#)(\S+)$', lambda m: m.group(1) + query, data.decode(), flags=re.M)
        text = re.sub(r'URI="([^"]+)"', lambda m: f'URI="{m.group(1)}{query}"', text)
        return Response(text, media_type="application/vnd.apple.mpegurl", headers={"Cache-Control": "no-cache"})
    if name == "index.m3u8":
        return Response(data, media_type="application/vnd.apple.mpegurl", headers={"Cache-Control": "no-cache"})
    media = "video/mp4" if name.endswith(".mp4") else "video/iso.segment"
    return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})


async def _blocking_reload(request: Request, settings, session_id: str, actor, data: bytes) -> bytes:
    """LL-HLS blocking playlist reload: `?_HLS_msn=N[&_HLS_part=M]` is answered once the playlist
    holds segment N (or part M of it, or a later one; `cluster.live.encoder.playlist_has`), so a
    player learns of each part as it is published instead of polling for it. Bounded at three
    target durations (then the playlist as it is); N more than two segments ahead: 400."""
    from cluster.live.encoder import playlist_has

    try:
        msn = int(request.query_params["_HLS_msn"])
        part = int(request.query_params["_HLS_part"]) if "_HLS_part" in request.query_params else None
        if msn < 0 or (part is not None and part < 0):
            raise ValueError("negative")
    except ValueError:
        raise ApiProblem(400, "request.invalid", "_HLS_msn and _HLS_part must be integers >= 0", "_HLS_msn") from None
    if playlist_has(data.decode(), msn, part) is None:
        raise ApiProblem(400, "request.invalid", f"_HLS_msn={msn} is more than two segments past the live "
                         f"playlist's last of session {session_id}", "_HLS_msn")
    return await _playlist_until(settings, session_id, actor, data,
                                 lambda text: playlist_has(text, msn, part) is not False,
                                 BLOCKING_RELOAD_MAX_S, BLOCKING_RELOAD_POLL_S)


def _has_segment(playlist: bytes | str | None) -> bool:
    """Whether a live playlist lists a whole segment, or has ended."""
    if playlist is None:
        return False
    text = playlist.decode(errors="replace") if isinstance(playlist, bytes) else playlist
    return "#EXTINF" in text or "#EXT-X-ENDLIST" in text


async def _playlist(settings, session_id: str, actor) -> bytes | None:
    """The session's published playlist, one read of its actor shared by this process's viewers (`_streams`)."""
    return await _streams.playlist(session_id, lambda: _ask(settings, session_id, actor, "read_hls", "live.m3u8",
                                                            timeout=settings.actor_call_timeout_s))


async def _playlist_until(settings, session_id: str, actor, data: bytes | None, done, bound_s: float,
                          every_s: float) -> bytes | None:
    """The session's published playlist once `done(its text)`, read again every `every_s`; at
    `bound_s` (an actor that is restarting is waited for up to it, not longer), the last one read
    (`data`, None when there was none)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    while not (data is not None and done(data.decode())) and loop.time() < deadline:
        await asyncio.sleep(every_s)
        try:
            data = await asyncio.wait_for(_playlist(settings, session_id, actor),
                                          max(0.05, deadline - loop.time())) or data
        except asyncio.TimeoutError:
            break
    return data


#: The largest PCM body one `POST .../audio` takes (87 s at 48 kHz; a session buffers a few seconds)
AUDIO_POST_LIMIT = 8 * 1024 * 1024

#: How often an audio socket whose client sends nothing looks at its session (closed once it ended)
SOCKET_IDLE_CHECK_S = 30.0

#: Bytes an audio socket reads ahead of its session (then it stops reading: TCP slows the sender),
#: and the most that one call to the session's actor carries: messages that are waiting are sent
#: together (one call per 10-ms message fell behind real time on a busy node)
SOCKET_INBOX_BYTES = 256 * 1024


class _SocketInbox:
    """The messages of an audio socket, read by a task of their own as they arrive (at most
    `SOCKET_INBOX_BYTES` of PCM ahead), so that those that wait while the session is called are
    taken together."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket, self.queue, self.bytes = websocket, asyncio.Queue(), 0
        self.disconnected = False  # the client is gone (what it sent and the session has not taken is not fed)
        self.room = asyncio.Condition()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            async with self.room:
                await self.room.wait_for(lambda: self.bytes < SOCKET_INBOX_BYTES)
            try:
                message = await self.websocket.receive()
            except Exception as e:  # e.g. the connection went: the loop sees it as a disconnect, with why
                message = {"type": "websocket.disconnect", "error": e}
            self.bytes += len(message.get("bytes") or b"")
            self.queue.put_nowait(message)
            if message["type"] == "websocket.disconnect":
                self.disconnected = True
                return

    async def _taken(self, message: dict) -> dict:
        self.bytes -= len(message.get("bytes") or b"")
        async with self.room:
            self.room.notify()
        return message

    async def get(self, timeout: float) -> dict:
        """The next message (asyncio.TimeoutError after `timeout` without one)."""
        return await self._taken(await asyncio.wait_for(self.queue.get(), timeout))

    async def with_waiting_pcm(self, first: bytes) -> bytes:
        """`first` and the PCM messages of whole samples that are here already, up to
        `SOCKET_INBOX_BYTES` in all: one call to the session for them. A message of another kind (or
        one past the bound) stays first, for the loop to answer."""
        parts, size = [first], len(first)
        while not self.queue.empty():
            message = self.queue._queue[0]  # a peek: asyncio.Queue keeps its items in a deque
            data = message.get("bytes")
            if message["type"] != "websocket.receive" or data is None or len(data) % 2 or \
                    size + len(data) > SOCKET_INBOX_BYTES:
                break
            parts.append((await self._taken(self.queue.get_nowait()))["bytes"])
            size += len(data)
        return b"".join(parts)

    def close(self) -> None:
        self.task.cancel()


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    """Close with `reason` cut to what a close frame holds (123 bytes of UTF-8): a longer one (a
    long session id or sample rate echoed in it) would fail the close itself."""
    data = reason.encode()[:120]
    await websocket.close(code, data.decode(errors="ignore"))


#: WebSocket paths no route matches: the app's last router (Starlette answered them with a bare HTTP 403, read as a
#: token refusal)
unknown_socket_router = APIRouter(include_in_schema=False)


@unknown_socket_router.websocket("/{path:path}")
async def unknown_socket(websocket: WebSocket, path: str) -> None:
    """A socket at a path that is none: refused as the audio socket refuses, accepted and closed with 4404 and a
    reason naming the one socket there is."""
    await websocket.accept()
    await _close(websocket, 4404, "no WebSocket at this path: the audio socket is /v1/sessions/{id}/audio?token=")


@public_router.websocket("/{session_id}/audio")
async def audio_socket(websocket: WebSocket, session_id: str) -> None:
    """Binary messages: PCM s16le mono at the session's rate, any size; text `{"type": "end"}` ends
    the utterance (the session stays, idle, until DELETE, idle timeout or max_seconds). On
    connect the server sends `{"type": "ready", "offset": N}`: the bytes it has; a client that
    reconnects resumes from there. Backpressure: while the session's buffer of unrendered speech
    is full, the socket is not read."""
    from cluster.live import SessionNotFound

    settings = _settings(websocket)
    await websocket.accept()
    token = websocket.query_params.get("token", "")
    if not token_ok(websocket, session_id, token, speak=True):  # the stream's token does not open it
        await _close(websocket, 4401, "missing, wrong or expired session token (?token= of audio_ws)")
        return
    try:
        if not _SESSION_ID.match(session_id):
            raise SessionNotFound(f"no live session {session_id}")
        actor = await _actors(settings, session_id)
        raw = await _ask(settings, session_id, actor, "view", timeout=settings.actor_call_timeout_s)
    except NoActor as e:
        try:
            gone = SessionGone(await _stored(settings, e))
        except ApiProblem as problem:  # none began (404), or the registry did not answer (503: try again)
            await _close(websocket, 1013 if problem.status == 503 else 4404,
                         problem.message if problem.status == 503 else f"no live session {session_id}")
            return
        await _close(websocket, 4410, gone.message)
        return
    except SessionNotFound:
        await _close(websocket, 4404, f"no live session {session_id}")
        return
    except ApiProblem as e:  # 503: its actor did not answer in time (restarting): the client tries again later
        await _close(websocket, 1013 if e.status == 503 else 4404,
                     e.message if e.status == 503 else f"no live session {session_id}")
        return
    if raw["state"] not in ("live", "starting"):
        await _close(websocket, 4410, f"session {session_id} is {raw['state']}")
        return
    rate = websocket.query_params.get("sample_rate")
    if rate is not None and (not re.fullmatch(r"[0-9]{1,6}", rate) or int(rate) not in RATES
                             or int(rate) != raw["sample_rate"]):
        await _close(websocket, 4415, f"sample_rate {rate} not offered: this session takes {raw['sample_rate']} "
                                    f"(rates offered: {', '.join(map(str, RATES))})")
        return
    # (which process holds it: `actors.live.socket_holds`)
    lease = f"{uuid.uuid4().hex}|{websocket.app.state.backend.identity}"
    try:
        if not await _ask(settings, session_id, actor, "attach", lease, timeout=settings.actor_call_timeout_s):
            await _close(websocket, 4409, "another audio socket is open on this session")
            return
    except ApiProblem as e:
        await _close(websocket, 1013 if e.status == 503 else 4410, e.message)
        return
    offset = raw["bytes_received"]  # the client sends from here on: every append names its offset
    inbox = _SocketInbox(websocket)
    try:
        await websocket.send_text(json.dumps({"type": "ready", "offset": offset,
                                              "sample_rate": raw["sample_rate"]}))
        while True:
            try:  # a client that sends nothing: the session is looked at now and then, and once it has
                message = await inbox.get(SOCKET_IDLE_CHECK_S)  # ended, closed
            except asyncio.TimeoutError:
                raw = await _ask(settings, session_id, actor, "view", timeout=settings.actor_call_timeout_s)
                if raw["state"] not in ("live", "starting"):
                    await _close(websocket, 4410, _ended_text(session_id, raw))
                    return
                continue
            if message["type"] == "websocket.disconnect":
                if message.get("error") is not None:  # the read itself failed: said, not swallowed
                    log.info("session %s: its audio socket's read ended: %r", session_id, message["error"])
                return
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                if len(data) % 2:
                    await _close(websocket, 4400, f"binary message of {len(data)} bytes: PCM s16le needs whole "
                                                f"2-byte samples")
                    return
                data = await inbox.with_waiting_pcm(data)  # with the messages that came meanwhile
                start, sent = offset, offset + len(data)
                while offset < sent:  # backpressure: the socket is not read while the buffer is full
                    if inbox.disconnected:  # its client is gone: it resumes from the session's offset when it
                        return              # reconnects (a large message fed on held the session for its length)
                    # by offset: repeated across a restart of the session's actor, never twice; the
                    # session takes what its buffer has room for, the rest is offered again
                    try:
                        part = data[offset - start:offset - start + SOCKET_INBOX_BYTES]  # not a 16-MiB message each try
                        answer = await _ask(settings, session_id, actor, "append", part, offset, lease,
                                            timeout=settings.actor_call_timeout_s)
                    except SessionOffsetGap as e:  # the session has less than this socket sent: resend
                        await _close(websocket, 1011, e.message)
                        return
                    if answer.get("socket_taken"):  # told, never dropped as bytes the session already had
                        await _close(websocket, 4409, "another audio socket took this session over (this one "
                                                      "sent nothing for 10 s, or its connection was lost)")
                        return
                    if answer["accepted"] and answer["offset"] > offset:
                        offset = min(answer["offset"], sent)
                        continue
                    if answer.get("state") not in ("live", "starting"):
                        await _close(websocket, 4410, _ended_text(session_id, answer))
                        return
                    await asyncio.sleep(0.05)
                actor.touch.remote(lease)
            elif text is not None:
                try:
                    kind = json.loads(text).get("type")
                except (ValueError, AttributeError):
                    kind = None
                if kind != "end":
                    await _close(websocket, 4422, 'text messages must be JSON {"type": "end"}')
                    return
                await _ask(settings, session_id, actor, "end_speech", timeout=settings.actor_call_timeout_s)
                raw = await _ask(settings, session_id, actor, "view", timeout=settings.actor_call_timeout_s)
                await websocket.send_text(json.dumps({"type": "ended", "offset": raw["bytes_received"]}))
    except (WebSocketDisconnect, ValidationError):
        return
    except ApiProblem as e:  # the session's actor did not come back in time, or is gone for good
        await _close(websocket, 1011 if e.status == 503 else 4410, e.message)
        return
    except LipsyncError as e:  # the session ended meanwhile (its actor says so), or another typed refusal
        # a full disk ends the session (`LiveSession.append`): said with its code, as an end (its client does not
        # connect again to meet a bare "failed", the cause lost: a review)
        ends = http_status(e) == 410 or isinstance(e, DiskFull)
        await _close(websocket, 4410 if ends else 1011, f"{e.code}: {e.message}" if isinstance(e, DiskFull)
                     else e.message)
        return
    finally:
        inbox.close()
        actor.detach.remote(lease)
