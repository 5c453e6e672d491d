"""The SDK's retry rules, against an in-process transport (no socket is opened).

A submission carries an id chosen by the SDK, so a bare 500 from the Serve proxy (the ingress
replica died under the request) is retried and answered with the same job; our own typed 500s
are not retried; GETs are retried on a bare 500 too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from cluster.client import ApiError, AsyncClient, Client


def _flaky(answers: list[httpx.Response], seen: list[httpx.Request]):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0) if len(answers) > 1 else answers[0]
    return handler


def _accepted(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(202, json={"id": body["id"], "state": "queued"})


def test_a_submission_is_retried_after_a_bare_500_with_the_same_id():
    seen: list[httpx.Request] = []
    calls = iter([httpx.Response(500, text="Internal Server Error"), None])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = next(calls)
        return answer if answer is not None else _accepted(request)

    with Client("http://api.test", transport=httpx.MockTransport(handler), backoff_s=0.01) as client:
        job = client.submit("/data/a.wav", "/data/v.mp4")  # paths on the server: sent as JSON
    ids = [json.loads(r.content)["id"] for r in seen]
    assert len(seen) == 2 and ids[0] == ids[1] == job.id, ids


def test_a_submission_naming_urls_waits_for_the_services_fetch_on_both_faces():
    """The service fetches URL inputs (each up to its LIPSYNC_URL_TIMEOUT_S, 60 s) before its 202: with the
    client's read timeout (60 s) the client gave up first, sent it again, and said `connection.timeout`
    instead of the service's `input.url_failed`. A submission or batch naming a URL waits 600 s; one of
    server paths keeps the client's own timeout."""
    from cluster.client import URL_SUBMIT_TIMEOUT_S

    reads: list[tuple[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        reads.append((request.url.path, request.extensions["timeout"]["read"]))
        assert request.extensions["timeout"]["connect"] == 60.0  # (a host that never answers: the client's own)
        if request.url.path == "/v1/batches":
            return httpx.Response(202, json={"id": body["id"], "state": "queued", "progress": 0.0, "jobs": [],
                                              "counts": {}})
        return _accepted(request)

    async def async_calls() -> None:
        async with AsyncClient("http://api.test", transport=httpx.MockTransport(handler)) as client:
            await client.submit("https://media.example/a.wav", "/data/v.mp4")
            await client.submit("/data/a.wav", "/data/v.mp4")
            await client.submit_batch(["https://media.example/a.wav"], "/data/v.mp4")

    with Client("http://api.test", transport=httpx.MockTransport(handler)) as client:
        client.submit("https://media.example/a.wav", "/data/v.mp4")
        client.submit("/data/a.wav", "/data/v.mp4")
        client.submit_batch(["/data/a.wav"], "https://media.example/v.mp4")
    asyncio.run(async_calls())
    assert reads == [("/v1/jobs", URL_SUBMIT_TIMEOUT_S), ("/v1/jobs", 60.0), ("/v1/batches", URL_SUBMIT_TIMEOUT_S)] * 2


def test_our_typed_500_is_not_retried_and_keeps_its_code():
    seen: list[httpx.Request] = []
    typed = httpx.Response(500, json={"error": {"code": "render.internal", "message": "boom", "field": None}})
    with Client("http://api.test", transport=httpx.MockTransport(_flaky([typed], seen)), backoff_s=0.01) as client:
        with pytest.raises(ApiError) as info:
            client.submit("/data/a.wav", "/data/v.mp4")
    assert len(seen) == 1 and info.value.code == "render.internal" and info.value.status == 500


def test_a_get_is_retried_after_a_bare_500_async_twin_too():
    view = {"id": "j1", "state": "queued"}
    seen: list[httpx.Request] = []
    answers = [httpx.Response(500, text="Internal Server Error"), httpx.Response(200, json=view)]

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    async def main():
        async with AsyncClient("http://api.test", transport=httpx.MockTransport(handler), backoff_s=0.01) as client:
            return await client.request("GET", "/v1/jobs/j1")

    r = asyncio.run(main())
    assert r.status_code == 200 and len(seen) == 2


@pytest.fixture
def silent_job_server():
    """A real HTTP server on loopback whose job stays `queued`: its event stream sends the first
    view, then only the server's keep-alive comments (`/keepalive/...`) or nothing at all
    (`/silent/...`), for up to 20 s."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cluster.schemas import JobView

    view = JobView(id="j1", state="queued", stage="queued", progress=0.0, frames_done=0, frames_total=0,
                   created_at=time.time(), updated_at=time.time()).model_dump_json().encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if not path.endswith("/events"):
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(view)))
                self.end_headers()
                self.wfile.write(view)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            try:
                self.wfile.write(b"data: " + view + b"\n\n")
                self.wfile.flush()
                for _ in range(100):
                    time.sleep(0.2)
                    if path.startswith("/keepalive"):
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
            except OSError:  # the client left
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("stream", ["keepalive", "silent"])
def test_wait_keeps_its_deadline_while_the_job_sends_no_event(silent_job_server, stream):
    """`wait(timeout=...)` (and `lipsync wait --timeout`) raises WaitTimeout at its deadline while
    the job sits queued: between events the stream carries only keep-alives, or nothing; it
    used to notice the deadline only at the job's next event (up to the server's 6 h)."""
    import time

    from cluster.client import WaitTimeout

    with Client(f"{silent_job_server}/{stream}", retries=0) as client:
        t0 = time.monotonic()
        with pytest.raises(WaitTimeout, match="queued"):
            client.wait("j1", timeout=1.5, poll_s=0.2)
        assert 1.5 <= time.monotonic() - t0 < 5

    async def twin():
        async with AsyncClient(f"{silent_job_server}/{stream}", retries=0) as client:
            t0 = time.monotonic()
            with pytest.raises(WaitTimeout):
                await client.wait("j1", timeout=1.5, poll_s=0.2)
            return time.monotonic() - t0

    assert 1.5 <= asyncio.run(twin()) < 5


def _segment_events() -> bytes:
    segment = {"index": 0, "name": "seg00000.m4s", "start": 0.0, "duration": 0.25,
               "url": "/v1/jobs/j1/hls/seg00000.m4s"}
    return (f"event: segment\ndata: {json.dumps(segment)}\n\n"
            'event: status\ndata: {"id": "j1", "state": "succeeded"}\n\n').encode()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_segment_stream_refused_while_the_servers_are_all_taken_is_opened_again(face):
    """429 on `/events` (LIPSYNC_MAX_EVENT_STREAMS reached): `segments()` (what `lipsync submit --watch`
    reads) waits Retry-After and opens it again instead of failing a job that runs; any other
    refusal is raised at once."""
    busy = {"error": {"code": "service.busy", "message": "4 job event streams are open", "field": None}}
    seen: list[httpx.Request] = []
    answers = [httpx.Response(429, json=busy, headers={"Retry-After": "0"}),
               httpx.Response(429, json=busy, headers={"Retry-After": "0"}),
               httpx.Response(200, content=_segment_events(), headers={"content-type": "text/event-stream"})]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    if face == "sync":
        with Client("http://api.test", transport=httpx.MockTransport(handler), backoff_s=0.01) as client:
            got = list(client.segments("j1", timeout=10))
    else:
        async def main():
            async with AsyncClient("http://api.test", transport=httpx.MockTransport(handler), backoff_s=0.01) as c:
                return [s async for s in c.segments("j1", timeout=10)]
        got = asyncio.run(main())
    assert len(seen) == 3 and [s.name for s in got] == ["seg00000.m4s"]
    assert got[0].url == "http://api.test/v1/jobs/j1/hls/seg00000.m4s"

    gone = [httpx.Response(404, json={"error": {"code": "job.not_found", "message": "no job j2", "field": None}})]
    with Client("http://api.test", transport=httpx.MockTransport(_flaky(gone, seen)), backoff_s=0.01) as client:
        with pytest.raises(ApiError) as info:
            list(client.segments("j2", timeout=10))
    assert info.value.status == 404


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_segment_stream_refused_for_too_long_without_a_timeout_raises_the_refusal(face, monkeypatch):
    """`segments()` without a timeout (`lipsync submit --watch`'s default) opened a refused stream again
    for ever: every wait has a deadline, so past `REFUSED_STREAM_PATIENCE_S` the 429 is raised."""
    import cluster.client

    monkeypatch.setattr(cluster.client, "REFUSED_STREAM_PATIENCE_S", 1.5)
    busy = {"error": {"code": "service.busy", "message": "4 job event streams are open", "field": None}}
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(429, json=busy, headers={"Retry-After": "1"})

    t0 = time.monotonic()
    with pytest.raises(ApiError) as info:
        if face == "sync":
            with Client("http://api.test", transport=httpx.MockTransport(handler), backoff_s=0.01) as client:
                list(client.segments("j1"))
        else:
            async def main():
                async with AsyncClient("http://api.test", transport=httpx.MockTransport(handler), backoff_s=0.01) as c:
                    return [s async for s in c.segments("j1")]
            asyncio.run(main())
    assert info.value.status == 429 and info.value.code == "service.busy"
    assert len(seen) == 2 and 0.9 < time.monotonic() - t0 < 5


def test_each_retry_says_what_it_waits_for_on_both_faces(caplog):
    """A command against a service that is down or overloaded says why it waits (the CLI shows
    `lipsync.client` at INFO) instead of being silent until its retries are spent."""
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    busy = httpx.Response(503, json={"error": {"code": "service.not_ready", "message": "starting", "field": None}})
    caplog.set_level("INFO", logger="lipsync.client")
    with Client("http://api.test", transport=httpx.MockTransport(refused), retries=2, backoff_s=0.01) as client:
        with pytest.raises(ApiError) as info:
            client.get("j1")
    assert info.value.code == "connection.failed"

    async def overloaded(request: httpx.Request) -> httpx.Response:
        return busy

    async def main():
        async with AsyncClient("http://api.test", transport=httpx.MockTransport(overloaded), retries=1,
                               backoff_s=0.01) as client:
            with pytest.raises(ApiError):
                await client.get("j1")
    asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "lipsync.client"]
    assert len(said) == 3, said
    assert "GET /v1/jobs/j1: no answer from http://api.test (ConnectError: [Errno 111] Connection refused)" \
        in said[0] and "(attempt 2 of 3)" in said[0] and "(attempt 3 of 3)" in said[1]
    assert "answered 503 service.not_ready; trying again in" in said[2] and "(attempt 2 of 2)" in said[2]


class _BreaksAfter(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that sends `data`, then breaks as a service going down does."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self):
        yield self.data
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    async def __aiter__(self):
        yield self.data
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def _segment(index: int) -> bytes:
    body = {"index": index, "name": f"seg{index:05d}.m4s", "start": 2.0 * index, "duration": 2.0,
            "init": "init.mp4", "url": f"/v1/jobs/j1/hls/seg{index:05d}.m4s?token=t",
            "init_url": "/v1/jobs/j1/hls/init.mp4?token=t"}
    return f"event: segment\ndata: {json.dumps(body)}\n\n".encode()


def _refused(request: httpx.Request):
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def _run(face: str, handler, call, **kw):
    """`call(client)` on the sync face, or awaited (or gathered, for an async iterator) on the async one."""
    kw.setdefault("backoff_s", 0.01)
    if face == "sync":
        with Client("http://api.test", transport=httpx.MockTransport(handler), **kw) as client:
            got = call(client)
            return list(got) if hasattr(got, "__next__") else got

    async def main():
        async with AsyncClient("http://api.test", transport=httpx.MockTransport(handler), **kw) as c:
            got = call(c)
            return [x async for x in got] if hasattr(got, "__anext__") else await got
    return asyncio.run(main())


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_segment_stream_that_breaks_is_opened_again_and_gives_each_segment_once(face):
    """A service restarted under `segments()`: the stream broke with httpx's RemoteProtocolError and the
    rest of the job's segments were lost. It is opened again (the server sends every segment from the
    first), each segment comes once, and its init segment's URL comes with it, absolute and signed."""
    seen: list[httpx.Request] = []
    sse = {"content-type": "text/event-stream"}
    answers = [lambda r: httpx.Response(200, stream=_BreaksAfter(_segment(0)), headers=sse),
               _refused,  # the service is restarting
               lambda r: httpx.Response(503, json={"error": {"code": "service.not_ready", "message": "starting",
                                                             "field": None}}),
               lambda r: httpx.Response(404, text="Path '/v1/jobs/j1/events' not found. Ping http://x/-/routes"),
               # a clean end before the job's (a replica stopped gracefully): not the end of the job's segments
               lambda r: httpx.Response(200, content=_segment(0) + b": keep-alive\n\n", headers=sse),
               lambda r: httpx.Response(200, content=_segment(0) + _segment(1) + b'event: status\ndata: {"id": "j1", '
                                        b'"state": "succeeded"}\n\n', headers=sse)]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)(request)

    got = _run(face, handler, lambda c: c.segments("j1", timeout=30))
    assert len(seen) == 6 and [s.index for s in got] == [0, 1], got
    assert got[1].url == "http://api.test/v1/jobs/j1/hls/seg00001.m4s?token=t"
    assert got[1].init_url == "http://api.test/v1/jobs/j1/hls/init.mp4?token=t"

    fetched: list[str] = []

    def media(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        return httpx.Response(200, content=b"init bytes")
    assert _run(face, media, lambda c: c.fetch(got[1].init_url)) == b"init bytes"
    assert fetched == ["http://api.test/v1/jobs/j1/hls/init.mp4?token=t"]


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_signed_urls_token_stays_out_of_errors_and_logs(face, caplog):
    """`fetch(url)` of a signed segment URL that got no answer raised `connection.failed` naming the URL
    with its token, which the CLI prints: the token (it grants the job's media) is left out of the
    error and of the retries' log lines; the rest of the URL stays."""
    caplog.set_level(logging.INFO, logger="lipsync.client")
    url = "http://api.test/v1/jobs/j1/hls/seg00001.m4s?token=1767225600.SIGNATURE&x=1"
    with pytest.raises(ApiError) as info:
        _run(face, _refused, lambda c: c.fetch(url), retries=1)
    assert info.value.code == "connection.failed" and "/v1/jobs/j1/hls/seg00001.m4s?token=...&x=1" in info.value.message
    assert "SIGNATURE" not in info.value.message and "SIGNATURE" not in caplog.text
    assert "trying again" in caplog.text


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_event_stream_that_cannot_be_opened_is_an_api_error(face):
    """`events()` and `segments()` raised httpx's ConnectError as it was, untried: now retried as every
    request is, then `connection.failed`."""
    for call in (lambda c: c.events("j1", timeout=30), lambda c: c.segments("j1", timeout=30)):
        with pytest.raises(ApiError) as info:
            _run(face, _refused, call, retries=2)
        assert info.value.code == "connection.failed" and "Connection refused" in info.value.message


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_wait_outlasts_a_service_restart_until_its_own_deadline(face):
    """`wait(timeout=400)` gave up with `connection.failed` about 25 s into a service's restart (one
    request's retries), while the job resumed and succeeded. Its event stream, once open, is opened again
    through refused connections, a starting service's 503 and Serve's 404 until the job's end comes; and
    when the stream cannot be had, the polling goes on through the same until the wait's own deadline."""
    sse = {"content-type": "text/event-stream"}
    view = {"id": "j1", "stage": "render", "progress": 0.2, "frames_done": 10, "frames_total": 50,
            "created_at": "2026-12-06T18:00:00Z", "updated_at": "2026-12-06T18:00:01Z"}
    running, done = {**view, "state": "rendering"}, {**view, "state": "succeeded", "progress": 1.0, "frames_done": 50}
    away = ([_refused] * 4
            + [lambda r: httpx.Response(503, json={"error": {"code": "service.not_ready", "message": "starting",
                                                              "field": None}})]
            + [lambda r: httpx.Response(404, text="Path '/v1/jobs/j1' not found. Ping http://x/-/routes")])

    def serving(answers: list, seen: list):
        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return answers.pop(0)(request)
        return handler

    # the stream: open, broken by the restart, opened again (more failures than the client's retries)
    seen: list[httpx.Request] = []
    answers = ([lambda r: httpx.Response(200, stream=_BreaksAfter(
        f"event: status\ndata: {json.dumps(running)}\n\n".encode()), headers=sse)] + away
        + [lambda r: httpx.Response(200, content=f"event: status\ndata: {json.dumps(done)}\n\n".encode(),
                                    headers=sse)])
    got = _run(face, serving(answers, seen), lambda c: c.wait("j1", timeout=60, poll_s=0.01), retries=2)
    assert got.state.value == "succeeded" and len(seen) == 8 and not answers
    # polling: a stream the server does not offer (501), then the job's view through the same outage
    seen, answers = [], ([lambda r: httpx.Response(501, text="Not Implemented")] + away
                         + [lambda r: httpx.Response(200, json=done)])
    got = _run(face, serving(answers, seen), lambda c: c.wait("j1", timeout=60, poll_s=0.01), retries=2)
    assert got.state.value == "succeeded" and "/events" in str(seen[0].url) and not answers

    gone = httpx.Response(404, json={"error": {"code": "job.not_found", "message": "no job j2", "field": None}})
    with pytest.raises(ApiError) as info:  # a job that does not exist is an answer, not a passing problem
        _run(face, lambda r: gone, lambda c: c.wait("j2", timeout=60, poll_s=0.01), retries=2)
    assert info.value.code == "job.not_found"


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_id_is_one_path_segment(face):
    """`lipsync cancel '../batches/victim'` sent DELETE /v1/batches/victim and cancelled another batch's jobs:
    an id is sent escaped, as one segment of the path, whatever it holds."""
    seen: list[httpx.Request] = []
    gone = {"error": {"code": "not_found", "message": "no such path", "field": None}}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404, json=gone)

    for call in (lambda c: c.cancel("../batches/victim"), lambda c: c.get("a/b?x=1#y"),
                 lambda c: c.batch("../jobs/j1"), lambda c: c.avatar("..")):
        with pytest.raises(ApiError):
            _run(face, handler, call)
    assert [r.url.raw_path for r in seen] == [b"/v1/jobs/..%2Fbatches%2Fvictim", b"/v1/jobs/a%2Fb%3Fx%3D1%23y",
                                              b"/v1/batches/..%2Fjobs%2Fj1", b"/v1/avatars/%2E%2E"]
    assert seen[0].method == "DELETE"


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_stream_that_was_open_outlasts_more_failures_than_a_request_and_one_never_open_says_no_answer(face):
    """`segments()` gave up after the client's retries (about 20 s) while its service restarted (30-45 s on
    2 cores): a stream that delivered events is opened again until its service answers (10 minutes in a
    row at most). One that never opened fails as a request does, with `connection.failed`, also when its
    deadline comes first (it said WaitTimeout, hiding that nothing answered)."""
    seen: list[httpx.Request] = []
    sse = {"content-type": "text/event-stream"}
    answers = ([lambda r: httpx.Response(200, stream=_BreaksAfter(_segment(0)), headers=sse)] + [_refused] * 6
               + [lambda r: httpx.Response(200, content=_segment(0) + _segment(1) + b'event: status\ndata: {"id": '
                                           b'"j1", "state": "succeeded"}\n\n', headers=sse)])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)(request)

    got = _run(face, handler, lambda c: c.segments("j1", timeout=60), retries=2)
    assert [s.index for s in got] == [0, 1] and len(seen) == 8

    t0 = time.monotonic()
    with pytest.raises(ApiError) as info:
        _run(face, _refused, lambda c: c.events("j1", timeout=1), retries=6, backoff_s=4)
    assert info.value.code == "connection.failed" and time.monotonic() - t0 < 5, info.value
