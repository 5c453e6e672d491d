"""The SDK's two faces are one model: the same public methods and parameters, the same retry
rules (a request that may have been carried out is not sent twice unless it is safe to repeat),
the same download (resume, retries, checks), and neither breaks on what a newer server adds.
Against in-process transports (no socket is opened)."""
from __future__ import annotations

import asyncio
import inspect
import json

import httpx
import pytest

from cluster import client as sdk
from cluster.client import ApiError, AsyncClient, Client, WaitTimeout

VIEW = {"id": "j1", "state": "rendering", "stage": "render", "progress": 0.5, "frames_done": 10, "frames_total": 20,
        "created_at": "2026-12-06T00:00:00+00:00", "updated_at": "2026-12-06T00:00:01+00:00"}
AVATAR = "0123456789abcdef"
SESSION = {"id": "s1", "state": "live", "avatar_id": AVATAR, "model": "builtin", "sample_rate": 16000,
           "hls_url": "/v1/sessions/s1/hls/index.m3u8", "audio_ws": "ws://api.test/v1/sessions/s1/audio",
           "audio_url": "/v1/sessions/s1/audio"}


def _public(cls) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(getattr(cls, n)) for n in dir(cls)
            if not n.startswith("_") and callable(getattr(cls, n))}


@pytest.mark.parametrize("sync, twin", [(Client, AsyncClient), (sdk.Job, sdk.AsyncJob),
                                        (sdk.LiveSession, sdk.AsyncLiveSession)])
def test_the_async_face_has_every_method_of_the_sync_one_with_the_same_parameters(sync, twin):
    a, b = _public(sync), _public(twin)
    missing = set(a) - set(b) - {"close"}  # AsyncClient.aclose
    assert not missing, f"{twin.__name__} lacks {sorted(missing)}"
    for name in set(a) & set(b):
        pa = [(p.name, p.kind, p.default) for p in a[name].parameters.values()]
        pb = [(p.name, p.kind, p.default) for p in b[name].parameters.values()]
        if name == "__init__":
            continue
        assert pa == pb, f"{name}: {a[name]} != {b[name]}"


def _both(handler, call, backoff_s: float = 0.01, retries: int = 3):
    """Run `call(client)` on a sync Client and an AsyncClient over the same handler; both outcomes
    (a value, or the exception raised) and the requests each sent."""
    outcomes = []
    for face in ("sync", "async"):
        seen: list[httpx.Request] = []

        def recording(request: httpx.Request, seen=seen) -> httpx.Response:
            seen.append(request)
            return handler(request, len(seen))

        if face == "sync":
            with Client("http://api.test", transport=httpx.MockTransport(recording), backoff_s=backoff_s,
                        retries=retries) as c:
                try:
                    outcomes.append((call(c), seen))
                except Exception as e:  # compared below
                    outcomes.append((e, seen))
        else:
            async def arecording(request: httpx.Request, seen=seen) -> httpx.Response:
                await request.aread()
                return recording(request)

            async def main():
                async with AsyncClient("http://api.test", transport=httpx.MockTransport(arecording),
                                       backoff_s=backoff_s, retries=retries) as c:
                    result = call(c)
                    return await result if inspect.isawaitable(result) else result

            try:
                outcomes.append((asyncio.run(main()), seen))
            except Exception as e:
                outcomes.append((e, seen))
    return outcomes


@pytest.mark.parametrize("failure", ["read_error", "504", "read_timeout"])
def test_a_live_session_is_not_created_twice_when_the_first_request_may_have_reached_the_server(failure):
    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            if failure == "read_error":
                raise httpx.ReadError("connection reset", request=request)
            if failure == "read_timeout":
                raise httpx.ReadTimeout("timed out", request=request)
            return httpx.Response(504, text="Gateway Timeout")
        return httpx.Response(201, json=SESSION)

    for outcome, seen in _both(handler, lambda c: c.live(AVATAR)):
        assert len(seen) == 1, f"{failure}: the session was requested {len(seen)} times"
        assert isinstance(outcome, ApiError)
        if failure != "504":
            assert outcome.code == ("connection.timeout" if failure == "read_timeout" else "connection.failed")
            assert "may have reached the server" in outcome.message


@pytest.mark.parametrize("failure", ["connect_error", "503"])
def test_a_live_session_is_requested_again_when_the_first_request_did_nothing(failure):
    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            if failure == "connect_error":
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(503, headers={"retry-after": "0"}, json={"error": {
                "code": "service.unavailable", "message": "starting", "field": None}})
        return httpx.Response(201, json=SESSION)

    for outcome, seen in _both(handler, lambda c: c.live(AVATAR)):
        assert len(seen) == 2 and outcome.id == "s1", outcome


def test_a_batch_carries_an_id_and_is_sent_again_after_a_gateway_timeout_with_the_same_one():
    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            return httpx.Response(504, text="Gateway Timeout")
        body = json.loads(request.content)
        return httpx.Response(202, json={"id": body["id"], "state": "queued", "progress": 0.0, "counts": {},
                                         "jobs": []})

    for outcome, seen in _both(handler, lambda c: c.submit_batch(["/data/a.wav", "/data/b.wav"],
                                                                 video="/data/v.mp4")):
        ids = [json.loads(r.content)["id"] for r in seen]
        assert len(seen) == 2 and ids[0] == ids[1] == outcome.id and len(ids[0]) == 32, ids


def test_a_batch_of_local_files_is_refused_before_anything_is_sent_and_a_bad_url_at_once():
    """A batch's local files are uploaded first (test_service); a name that is none of a local file, a URL
    or an absolute server path (`submit_batch(["speech.wav"], ...)` where no speech.wav is) reached the
    server and came back as `input.outside_roots`. And `Client("foo")` failed at its first call as a
    connection error."""
    from cluster.errors import InputError

    for outcome, seen in _both(lambda request, n: httpx.Response(500),
                               lambda c: c.submit_batch(["/data/a.wav", "speech.wav"], avatar="0123456789abcdef")):
        assert isinstance(outcome, InputError) and not seen, outcome
        assert (outcome.path, outcome.field) == ("speech.wav", "audios") and outcome.code == "input.not_found" \
            and "audios file speech.wav does not exist here, and is not a URL or an absolute server path" \
            in str(outcome), outcome
    with pytest.raises(InputError, match="the service URL 'foo' is not an http"):
        Client("foo")
    with pytest.raises(InputError, match="not an http"):
        AsyncClient("ftp://host/")


def test_a_read_timeout_of_a_get_is_retried_and_no_answer_at_all_is_an_api_error():
    def flaky(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json=VIEW)

    for outcome, seen in _both(flaky, lambda c: c.get("j1")):
        assert len(seen) == 2 and outcome.id == "j1", outcome

    def dead(request: httpx.Request, n: int) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    for outcome, seen in _both(dead, lambda c: c.get("j1")):
        assert isinstance(outcome, ApiError) and outcome.code == "connection.timeout", outcome
        assert len(seen) == 4  # retries=3


def test_events_a_newer_server_adds_are_skipped_not_fatal():
    stream = (f"event: status\ndata: {json.dumps(VIEW)}\n\n"
              "event: log\ndata: {\"line\": \"a newer server's event\"}\n\n"
              ": keep-alive\n\n"
              f"event: status\ndata: {json.dumps({**VIEW, 'state': 'succeeded', 'progress': 1.0})}\n\n")

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response(200, text=stream, headers={"content-type": "text/event-stream"})

    def sync_events(c):
        return [v.state.value for v in c.events("j1", timeout=5)]

    async def async_events(c):
        return [v.state.value async for v in c.events("j1", timeout=5)]

    outcomes = _both(handler, lambda c: sync_events(c) if isinstance(c, Client) else async_events(c))
    for outcome, _ in outcomes:
        assert outcome == ["rendering", "succeeded"], outcome


def test_every_job_view_the_sdk_gives_has_urls_a_player_can_open():
    """A probe: `get`, `list`, `cancel`, `events` and the batch calls gave the service's relative URLs
    (`/v1/jobs/j1/hls/index.m3u8`) where `Job.watch_url` and the CLI gave absolute ones: a view passed on to a
    player or another machine could not be opened. Every face and call now gives them absolute."""
    done = {**VIEW, "state": "succeeded", "progress": 1.0, "watch_url": "/v1/jobs/j1/hls/index.m3u8?token=t",
            "output": {"size": 10, "url": "/v1/jobs/j1/result"}}
    batch = {"id": "b", "state": "succeeded", "progress": 1.0, "counts": {}, "jobs": [done]}

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        path = request.url.path
        if path.startswith("/v1/batches"):
            return httpx.Response(202 if request.method == "POST" else 200, json=batch)
        if path == "/v1/jobs":
            return httpx.Response(200, json={"jobs": [done]})
        if path.endswith("/events"):
            return httpx.Response(200, text=f"event: status\ndata: {json.dumps(done)}\n\n",
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=done)

    def views(c):
        calls = [lambda: c.get("j1"), lambda: c.list(), lambda: c.cancel("j1"), lambda: c.purge("j1"),
                 lambda: c.batch("b"), lambda: c.cancel_batch("b"),
                 lambda: c.submit_batch(["/data/a.wav"], video="/data/v.mp4")]

        def flat(x):
            return [x] if isinstance(x, sdk.JobView) else list(x.jobs)
        if isinstance(c, Client):
            return [v for call in calls for v in flat(call())] + list(c.events("j1", timeout=5))

        async def gather():
            out = [v for call in calls for v in flat(await call())]
            return out + [v async for v in c.events("j1", timeout=5)]
        return gather()

    for outcome, _ in _both(handler, views):
        assert not isinstance(outcome, Exception), outcome
        assert len(outcome) == 8
        for view in outcome:
            assert view.watch_url == "http://api.test/v1/jobs/j1/hls/index.m3u8?token=t"
            assert view.output.url == "http://api.test/v1/jobs/j1/result"


def test_a_jobs_watch_url_is_the_last_views_once_it_has_one():
    """`Job.watch_url` fell back to the URL given at submission where the last view had none: a job that ended
    before its first segment, or whose files were removed, still gave a player a stream that answered 404/410."""
    accepted = {"id": "j1", "state": "queued", "watch_url": "/v1/jobs/j1/hls/index.m3u8?token=t"}
    failed = {**VIEW, "state": "failed", "watch_url": None}

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=accepted)
        return httpx.Response(200, json=failed)

    def call(c):
        job = c.submit("/data/a.wav", video="/data/v.mp4")
        if isinstance(c, Client):
            before = job.watch_url
            job.status()
            return before, job.watch_url

        async def go():
            j = await job
            before = j.watch_url
            await j.status()
            return before, j.watch_url
        return go()

    for outcome, _ in _both(handler, call):
        assert outcome == ("http://api.test/v1/jobs/j1/hls/index.m3u8?token=t", None), outcome


def test_a_wait_whose_server_stops_answering_ends_in_wait_timeout_at_its_deadline():
    def handler(request: httpx.Request, n: int) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def call(c):
        return c.wait("j1", False, 1.0, 0.1)  # positional: progress, timeout, poll_s, the same in both faces

    for outcome, seen in _both(handler, call, backoff_s=0.4, retries=6):  # retries outlast the deadline
        assert isinstance(outcome, WaitTimeout) and "job j1 still unknown after 1 s" in str(outcome), repr(outcome)
        assert len(seen) >= 2


def test_a_wait_whose_service_went_away_says_so_not_that_the_job_is_still_rendering():
    """A service stopped 5 s into `wait(timeout=60)` (a probe): both faces raised `job X still rendering after
    60 s`, what the service said before it went, with nothing on the 53 s it did not answer. The timeout now
    says the service has not answered, what the last try met, and the state as it last answered."""
    view = {"id": "j1", "state": "rendering", "stage": "render", "progress": 0.2, "frames_done": 10,
            "frames_total": 50, "created_at": "2026-12-06T18:00:00Z", "updated_at": "2026-12-06T18:00:01Z"}

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(501)  # (polled)
        if n <= 3:
            return httpx.Response(200, json=view)
        raise httpx.ConnectError("Connection refused", request=request)

    for outcome, _ in _both(handler, lambda c: c.wait("j1", False, 1.5, 0.05), backoff_s=0.2, retries=6):
        assert isinstance(outcome, WaitTimeout), repr(outcome)
        assert "the service has not answered" in str(outcome) and "Connection refused" in str(outcome), outcome
        assert str(outcome).endswith("the job was rendering when it last answered"), outcome


def test_a_full_queue_is_a_typed_refusal_with_its_retry_after_on_both_faces():
    """A full job queue reached the SDK's caller as a bare `ApiError(429, 'service.busy')` after ~35 s of
    retries, its Retry-After lost: it is `ServiceBusy` with `retry_after`, at once with `retries=0`."""
    from cluster.client import ServiceBusy

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "5"}, json={"error": {
            "code": "service.busy", "message": "64 jobs are unfinished (LIPSYNC_MAX_QUEUED_JOBS)", "field": None}})

    for outcome, seen in _both(handler, lambda c: c.submit("/data/a.wav", "/data/v.mp4"), retries=0):
        assert isinstance(outcome, ServiceBusy) and isinstance(outcome, ApiError), repr(outcome)
        assert (outcome.status, outcome.code, outcome.retry_after, len(seen)) == (429, "service.busy", 5.0, 1)
    from cluster.client import BatchRefused

    for outcome, _ in _both(handler, lambda c: c.submit_batch(["/data/a.wav"], "/data/v.mp4"), retries=0):
        assert isinstance(outcome, BatchRefused) and outcome.retry_after == 5.0, repr(outcome)  # (its batch_id too)


def _result_server(body: bytes, first: list):
    """A result endpoint that answers `first` (one answer made per request) and then the body,
    honouring Range."""
    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if n <= len(first):
            return first[n - 1]()
        rng = request.headers.get("range")
        etag = '"j1-%d"' % len(body)
        if rng and request.headers.get("if-range") in (None, etag):
            start = int(rng.split("=")[1].rstrip("-"))
            if start >= len(body):
                return httpx.Response(416, headers={"content-range": f"bytes */{len(body)}", "etag": etag})
            return httpx.Response(206, content=body[start:], headers={
                "content-range": f"bytes {start}-{len(body) - 1}/{len(body)}", "etag": etag})
        return httpx.Response(200, content=body, headers={"etag": etag})
    return handler


def test_both_downloads_retry_an_overloaded_server_and_resume_the_same_result(tmp_path):
    body = bytes(range(256)) * 400
    def busy():
        return httpx.Response(503, headers={"retry-after": "0"}, json={"error": {
            "code": "service.unavailable", "message": "busy", "field": None}})

    for outcome, seen in _both(_result_server(body, [busy]), lambda c: c.download("j1", tmp_path / f"out{id(c)}.mp4")):
        assert not isinstance(outcome, Exception), repr(outcome)
        assert outcome.read_bytes() == body and len(seen) == 2

    # a partial file of this result resumes with Range; one longer than the result starts over
    for name, held, tag in (("resume", body[:1000], '"j1-%d"' % len(body)), ("longer", body + b"x" * 10, None)):
        dests = []
        for face in ("sync", "async"):
            dest = tmp_path / f"{name}-{face}.mp4"
            dest.with_name(dest.name + ".part").write_bytes(held)
            dest.with_name(dest.name + ".part.etag").write_text(tag or '"j1-%d"' % len(body))
            dests.append(dest)
        results = _both(_result_server(body, []), lambda c, dests=dests: c.download(
            "j1", dests[0] if isinstance(c, Client) else dests[1]))
        for outcome, seen in results:
            assert not isinstance(outcome, Exception), repr(outcome)
            assert outcome.read_bytes() == body, name
            if name == "resume":
                assert seen[0].headers["range"] == "bytes=1000-"


def test_a_recording_asked_for_while_its_session_still_ends_is_waited_for(tmp_path):
    """`lipsync live --recording` right after `close()` (which waits a bounded time): the session may
    still be ending; both faces wait for its recording instead of failing with session.not_ended."""
    from cluster.schemas import SessionView

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            return httpx.Response(409, json={"error": {"code": "session.not_ended", "message": "s1 is ending",
                                                       "field": None}})
        return httpx.Response(200, content=b"mp4 bytes")

    view = SessionView.model_validate(SESSION)
    outcomes = _both(handler, lambda c: (sdk.LiveSession if isinstance(c, Client) else sdk.AsyncLiveSession)(
        c, view).download_recording(tmp_path / f"rec-{type(c).__name__}.mp4", timeout=30))
    for outcome, seen in outcomes:
        assert len(seen) == 2 and outcome.read_bytes() == b"mp4 bytes", (outcome, seen)


def test_the_async_wait_closes_its_event_stream_when_the_job_ends():
    """`AsyncClient.wait` left its event stream's generators open once the job ended: the event loop's
    shutdown closed them, and printed "an error occurred during closing of asynchronous generator" after
    every wait. Against a real HTTP server on loopback (in-process transports do not show it)."""
    import socket
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/v1/jobs/j1/events")
    async def events():
        async def body():
            yield f"event: status\ndata: {json.dumps(VIEW)}\n\n"
            await asyncio.sleep(0.2)
            yield f"event: status\ndata: {json.dumps({**VIEW, 'state': 'succeeded', 'stage': 'done'})}\n\n"
            await asyncio.sleep(30)  # a stream the server keeps open: the client ends it
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/v1/jobs/j1")
    async def get():
        return JSONResponse({**VIEW, "state": "succeeded", "stage": "done"})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.05)
        problems = []

        async def main():
            asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context["message"]))
            async with AsyncClient(f"http://127.0.0.1:{port}") as c:
                return await c.wait("j1", timeout=20)

        assert asyncio.run(main()).state.value == "succeeded"
        assert problems == [], problems
    finally:
        server.should_exit = True


def test_a_download_onto_a_directory_is_refused_before_a_byte_is_fetched(tmp_path):
    """`download(job, <a directory>)` fetched the whole result, then failed to rename it (IsADirectoryError),
    leaving `<dir>.part` beside it; a name longer than the file system takes raised OSError. Both faces now
    raise InputError naming the path, before any request."""
    from cluster.errors import InputError

    for target, says in ((tmp_path, "is a directory"), (tmp_path / ("x" * 300 + ".mp4"), "cannot be written")):
        for outcome, seen in _both(lambda request, n: httpx.Response(200, content=b"x"),
                                   lambda c, target=target: c.download("j1", target)):
            assert isinstance(outcome, InputError) and says in outcome.message, outcome
            assert seen == [], seen
    assert not list(tmp_path.parent.glob(tmp_path.name + ".part*"))


def test_a_submitted_name_that_is_no_local_file_nor_a_server_path_is_refused_before_it_is_sent():
    """`submit("<a relative name that is no file here>")` was sent as a server path (the server's answer: "not
    absolute"), and a name longer than the file system takes the same; `submit_batch` refused such names itself.
    Both faces now refuse them with InputError naming the field, and send nothing."""
    from cluster.errors import InputError

    for name, says in (("typo.wav", "audio file typo.wav does not exist here, and is not a URL or an absolute server"),
                       ("x" * 300 + ".wav", "File name too long")):
        for outcome, seen in _both(lambda request, n: httpx.Response(202, json=VIEW),
                                   lambda c, name=name: c.submit(name, "/srv/in/v.mp4")):
            assert isinstance(outcome, InputError) and (outcome.path, outcome.field) == (name, "audio"), outcome
            assert says in outcome.message and seen == [], (outcome.message, seen)


def test_a_local_input_is_judged_before_it_is_sent(tmp_path, monkeypatch):
    """One check for the SDK and the CLI (`local_input_error`): each name a user may give, with what is
    sent and what is refused, and why (an unknown `~user` was a traceback; a pipe, a NUL byte and an empty
    name were "does not exist" or sent to the server)."""
    import os

    from cluster.client import local_input_error

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "speech.wav").write_bytes(b"RIFF")
    os.symlink(tmp_path / "gone.wav", tmp_path / "dangling.wav")
    monkeypatch.chdir(tmp_path)
    cases = {"speech.wav": None, str(tmp_path / "speech.wav"): None, "/srv/in/a.wav": None, "upload:ab.wav": None,
             "https://example.com/a.wav": None,
             "": ("input.invalid", "audio is empty"), "a\0b.wav": ("input.invalid", "a name with a NUL byte"),
             "/srv/a\0b.wav": ("input.invalid", "a name with a NUL byte"),
             "fifo": ("input.invalid", "is not a regular file (a pipe, socket or device)"),
             str(tmp_path / "fifo"): ("input.invalid", "is not a regular file"),
             ".": ("input.invalid", "is a directory, not a file"),
             str(tmp_path): ("input.invalid", "is a directory, not a file"),
             "typo.wav": ("input.not_found", "audio file typo.wav does not exist here"),
             "dangling.wav": ("input.not_found", "does not exist here"),
             "~no-such-user-here/a.wav": ("input.invalid", "no user's home directory is named so here"),
             "x" * 300 + ".wav": ("input.invalid", "File name too long"),
             "/srv/" + "x" * 300 + ".wav": ("input.invalid", "File name too long")}
    for value, want in cases.items():
        got = local_input_error("audio", value)
        if want is None:
            assert got is None, (value, got)
        else:
            assert got is not None and got.code == want[0] and want[1] in got.message and got.field == "audio", \
                (value, got and (got.code, got.message))


def test_a_refused_batch_says_the_id_it_was_sent_under():
    """A batch refused at its second audio: the first was admitted and renders under the id the SDK chose,
    which was only in the message's text; both faces raise `BatchRefused` with `batch_id`."""
    from cluster.client import BatchRefused

    refused = {"error": {"code": "input.unreadable", "message": "audio 1: not readable", "field": "audios"}}
    for given in (None, "my-batch-7"):
        options = {} if given is None else {"id": given}
        for outcome, seen in _both(lambda request, n: httpx.Response(400, json=refused),
                                   lambda c, options=options: c.submit_batch(["/srv/a.wav", "/srv/b.wav"],
                                                                             "/srv/v.mp4", **options)):
            assert isinstance(outcome, BatchRefused) and outcome.code == "input.unreadable", outcome
            sent = json.loads(seen[-1].content)["id"]
            assert outcome.batch_id == sent and (given is None or sent == given), (outcome.batch_id, sent)


def test_a_server_that_is_not_the_service_is_said_to_be_so_in_one_line():
    """A probe pointed the CLI at another web server: the error was its whole HTML page."""
    page = "<!DOCTYPE HTML><html><head><title>Error response</title></head><body>" + "x" * 400 + "</body></html>"

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response(404, text=page, headers={"content-type": "text/html;charset=utf-8"})

    for outcome, _ in _both(handler, lambda c: c.get("j1")):
        assert isinstance(outcome, ApiError) and outcome.code == "http.404", repr(outcome)
        assert "<html" not in str(outcome) and "not the lipsync API" in str(outcome), str(outcome)


def test_a_host_name_that_does_not_resolve_is_said_at_once():
    """A probe's mistyped host was tried 7 times over 25 s ("Name or service not known" is no server away); the
    resolver's "try again" still is retried."""
    import socket

    def resolver_says(errno: int, words: str):
        def handler(request: httpx.Request, n: int) -> httpx.Response:
            try:
                raise socket.gaierror(errno, words)
            except socket.gaierror as e:
                raise httpx.ConnectError(f"[Errno {errno}] {words}", request=request) from e
        return handler

    unknown = resolver_says(socket.EAI_NONAME, "Name or service not known")
    for outcome, seen in _both(unknown, lambda c: c.get("j1")):
        assert isinstance(outcome, ApiError) and outcome.code == "connection.failed", repr(outcome)
        assert "host name 'api.test' does not resolve" in str(outcome) and len(seen) == 1, (str(outcome), len(seen))
    for outcome, _ in _both(unknown, lambda c: c.wait("j1", False, 30.0, 0.1)):
        assert isinstance(outcome, ApiError) and "does not resolve" in str(outcome), repr(outcome)

    for outcome, seen in _both(resolver_says(socket.EAI_AGAIN, "Temporary failure in name resolution"),
                               lambda c: c.get("j1")):
        assert isinstance(outcome, ApiError) and len(seen) == 4, (repr(outcome), len(seen))  # 1 + 3 retries


def test_an_id_the_service_would_refuse_is_refused_before_anything_is_sent(tmp_path):
    """A probe's non-ASCII id reached the submission's header: a bare UnicodeEncodeError from httpx."""
    from cluster.errors import InputError

    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")

    def handler(request: httpx.Request, n: int) -> httpx.Response:
        raise AssertionError("sent")

    for outcome, seen in _both(handler, lambda c: c.submit(str(audio), "/srv/v.mp4", id="ü-ñ")):
        assert isinstance(outcome, InputError) and "id 'ü-ñ' is not valid" in str(outcome), repr(outcome)
        assert not seen
