"""The SDK's and `lipsync live`'s end of a live session, against a small real HTTP/WebSocket server
started here (FastAPI under uvicorn on a free loopback port: no Ray, no model): a session closed
after its service went away raises what happened first (the audio socket lost, the service not
answering) within seconds, not the DELETE's half minute of retries; a normal end asks the service
to end the session once everything is rendered (`POST /end`: reason `finished`, not `deleted`)."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from cluster.client import ApiError, AsyncClient, Client

AVATAR = "0123456789abcdef"
SID = "5e55104f00000000"
RATE = 16000
CHUNK = b"\x00\x01" * (RATE // 50)  # 20 ms of PCM s16le


class FakeService:
    """One live session's routes, as the service answers them (`service/routers/sessions.py`), on a real
    socket; `requests` the (method, path) each got. `end_answer`: the status `POST /end` is answered
    (200: the session ends `finished` at the next read of it); `ends`: whether a session asked to end ends;
    `answers_end`: whether the socket answers the speech's end; `renders`: whether what it receives is
    rendered; `get_answer_after_end`: the status a GET of the session is answered once it was asked to end
    (200: its view); `delete_answer`: the status DELETE is answered (200: the session ends, `deleted`)."""

    def __init__(self, end_answer: int = 200, ends: bool = True, answers_end: bool = True, renders: bool = True,
                 get_answer_after_end: int = 200, delete_answer: int = 200, read_delay_s: float = 0.0,
                 close_after: int | None = None, close_code: int = 1011) -> None:
        self.read_delay_s = read_delay_s  # each audio message read this late (a service that reads behind)
        self.close_after = close_after  # the first audio socket closed (`close_code`) after this many messages
        self.close_code = close_code
        self.end_answer, self.ends = end_answer, ends
        self.answers_end, self.renders = answers_end, renders
        self.get_answer_after_end, self.delete_answer = get_answer_after_end, delete_answer
        self.requests: list[tuple[str, str]] = []
        self.received = 0
        self.state, self.reason, self.finishing = "live", None, False
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def view(self) -> dict:
        seconds = self.received / (2 * RATE)
        return {"id": SID, "state": self.state, "reason": self.reason, "avatar_id": AVATAR, "sample_rate": RATE,
                "hls_url": f"{self.url}/v1/sessions/{SID}/hls/index.m3u8",
                "audio_ws": f"ws://127.0.0.1:{self.port}/v1/sessions/{SID}/audio",
                "audio_url": f"/v1/sessions/{SID}/audio", "bytes_received": self.received,
                "seconds_received": seconds, "seconds_rendered": seconds if self.renders else 0.0}

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def note(request: Request, call_next):
            self.requests.append((request.method, request.url.path))
            return await call_next(request)

        @app.post("/v1/sessions")
        async def create() -> JSONResponse:
            return JSONResponse(self.view(), status_code=201)

        @app.get("/v1/sessions/{sid}")
        async def get():
            if self.finishing and self.get_answer_after_end != 200:
                return JSONResponse({"error": {"code": "service.unavailable", "message": "not now"}},
                                    status_code=self.get_answer_after_end)
            if self.finishing and self.ends and self.state == "live":  # everything rendered: it ends
                self.state, self.reason = "ended", "finished"
            return self.view()

        @app.post("/v1/sessions/{sid}/end")
        async def end() -> JSONResponse:
            if self.end_answer != 200:
                return JSONResponse({"error": {"code": "service.unavailable", "message": "not now"}},
                                    status_code=self.end_answer)
            self.finishing = True
            return JSONResponse(self.view())

        @app.delete("/v1/sessions/{sid}")
        async def delete():
            if self.delete_answer == 401:
                return JSONResponse({"error": {"code": "auth.invalid_token", "message": "the token is wrong"}},
                                    status_code=401)
            if self.state == "live":
                self.state, self.reason = "ended", "deleted"
            return self.view()

        @app.get("/v1/sessions/{sid}/recording")
        async def recording() -> Response:
            return Response(b"mp4", media_type="video/mp4")

        @app.websocket("/v1/sessions/{sid}/audio")
        async def audio(ws: WebSocket) -> None:
            self.requests.append(("WS", ws.url.path))
            await ws.accept()
            await ws.send_text(json.dumps({"type": "ready", "offset": self.received, "sample_rate": RATE}))
            try:
                while True:
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        return
                    if message.get("bytes") is not None:
                        await asyncio.sleep(self.read_delay_s)
                        self.received += len(message["bytes"])
                        if self.close_after is not None and self.received >= self.close_after * len(CHUNK):
                            self.close_after = None  # (once: the socket opened again is kept)
                            await ws.close(self.close_code, "another audio socket took this session over"
                                           if self.close_code == 4409 else
                                           "the session's actor did not come back in time")
                            return
                        if self.state == "ended":  # ended meanwhile (a stopping service ended it), as the service says
                            await ws.close(4410, f"session {SID} is ended")
                            return
                    elif json.loads(message["text"]).get("type") == "end":
                        self.requests.append(("WS", "end"))
                        if not self.answers_end:
                            continue
                        await ws.send_text(json.dumps({"type": "ended", "offset": self.received}))
            except WebSocketDisconnect:
                return

        return app

    def __enter__(self) -> "FakeService":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the fake service did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """The service goes away: its listener closed, its open sockets closed (uvicorn's shutdown: 1012)."""
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stop()


def _stop_ending_sessions_later(service: FakeService, after_s: float) -> dict:
    """The service stopped `after_s` from now as `lipsync serve` stops: its sessions ended first (reason
    service_stopped, the audio socket closed with 4410), then, 0.3 s later, it goes away."""
    stopped: dict = {}

    def stop() -> None:
        time.sleep(after_s)
        stopped["at"] = time.monotonic()
        service.state, service.reason = "ended", "service_stopped"
        time.sleep(0.3)
        service.stop()

    threading.Thread(target=stop, daemon=True).start()
    return stopped


def _stop_later(service: FakeService, after_s: float, stopped: dict | None = None) -> dict:
    """The service stopped `after_s` from now; `stopped["at"]` when it begins to go away."""
    stopped = {} if stopped is None else stopped

    def stop() -> None:
        time.sleep(after_s)
        stopped["at"] = time.monotonic()  # when it begins to go away
        service.stop()

    threading.Thread(target=stop, daemon=True).start()
    return stopped


def _speak_until_it_fails(send) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        send(CHUNK)
        time.sleep(0.02)
    raise AssertionError("sending went on for 20 s after the service went away")


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_session_whose_service_went_away_raises_the_lost_socket_at_once(face, caplog):
    """The service goes away while speech streams in (a SIGTERM: it closes its sockets and its listener).
    The error raised names the audio socket's loss and the service not answering, within seconds: the
    close's DELETE is tried once, its failure logged at WARNING and noted, not raised in its place (it
    was: six retries over ~35 s, then `connection.failed: DELETE /v1/sessions/<id>`)."""
    caplog.set_level(logging.INFO, logger="lipsync.client")
    with FakeService() as service:
        if face == "sync":
            with Client(service.url) as client:
                stopped = _stop_later(service, 0.5)
                with pytest.raises(ApiError) as raised:
                    with client.live(AVATAR) as session:
                        _speak_until_it_fails(session.send)
        else:
            async def main():
                async with AsyncClient(service.url) as client:
                    session = await client.live(AVATAR)
                    async with session:
                        _stop_later(service, 0.5, stopped)
                        deadline = time.monotonic() + 20
                        while time.monotonic() < deadline:
                            await session.send(CHUNK)
                            await asyncio.sleep(0.02)
                    return session

            stopped = {}
            with pytest.raises(ApiError) as raised:
                asyncio.run(main())
        took = time.monotonic() - stopped["at"]
    error = raised.value
    assert error.code == "connection.failed", error
    assert f"live session {SID}: its audio socket was lost" in error.message, error.message
    assert "the service stopped answering" in error.message and "DELETE" not in error.message, error.message
    assert took < 10, f"the error came {took:.1f} s after the service went away"
    # the DELETE tried once, not again; said at WARNING, and noted on the error raised
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert not retries, retries
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "not ended" in r.getMessage()]
    assert len(warned) == 1 and f"/v1/sessions/{SID}/recording" in warned[0].getMessage(), caplog.text
    assert any("not ended after ApiError" in note for note in getattr(error, "__notes__", [])), error


def _live_while_the_service_stops(stop_later, speech_wav: str, recording, capsys):
    """`lipsync live --realtime --recording RECORDING` against a fake service that `stop_later` stops 1 s in:
    (exit status, seconds from the stop to the exit, stderr, its `lipsync: error:` lines, the service)."""
    from cluster import cli

    with FakeService() as service:
        stopped = stop_later(service, 1.0)
        rc = cli.main(["live", "--avatar", AVATAR, "--audio", speech_wav, "--realtime", "--url", service.url,
                       "--recording", str(recording)])
        took = time.monotonic() - stopped["at"]
    err = capsys.readouterr().err
    return rc, took, err, [line for line in err.splitlines() if line.startswith("lipsync: error:")], service


def test_lipsync_live_says_the_lost_socket_and_where_the_recording_is(speech_wav, tmp_path, capsys):
    """`lipsync live --realtime --recording r.mp4` whose service goes away mid-speech: exit 1 within
    seconds, its error line names the audio socket's loss, that the session could not be ended, and how
    to fetch the recording once the service is back (there is no `lipsync` command for it: curl)."""
    recording = tmp_path / "r.mp4"
    rc, took, err, error, service = _live_while_the_service_stops(_stop_later, speech_wav, recording, capsys)
    assert rc == 1, err
    assert took < 10, f"lipsync live exited {took:.1f} s after the service went away"
    assert len(error) == 1, err
    assert "its audio socket was lost" in error[0] and "the service stopped answering" in error[0], error
    assert "could not be ended either" in error[0], error
    assert f"fetch it with curl -f -o {recording} {service.url}/v1/sessions/{SID}/recording" in error[0], error
    assert "trying again" not in err and not recording.exists(), err


def test_lipsync_live_says_a_session_ended_by_its_services_stop_at_once(speech_wav, tmp_path, capsys):
    """A service that stops ends its sessions first (reason service_stopped), then goes: `lipsync live` asked for
    the ended session's view with the half minute of retries against a service that had gone, then said only
    `connection.failed: GET ...`. It says the stop at once, with where the recording is fetched from."""
    recording = tmp_path / "r.mp4"
    rc, took, err, error, service = _live_while_the_service_stops(_stop_ending_sessions_later, speech_wav, recording,
                                                                  capsys)
    assert rc == 1 and len(error) == 1 and took < 10, (took, err)
    assert error[0].startswith(f"lipsync: error: session.ended: live session {SID} ") and (
        "was ended by its service's stop (reason service_stopped)" in error[0]
        or "ended and its service stopped answering" in error[0]), error
    assert f"once the service is back, fetch it with curl -f -o {recording} {service.url}/v1/sessions/{SID}/" \
           "recording" in error[0], error
    assert "trying again" not in err and not recording.exists(), err


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_normal_end_asks_the_service_to_finish_the_session(face):
    """Leaving the `with` block after the speech: `POST /end` (the session ends `finished` once everything
    it received is rendered), waited for, and no DELETE (it was: a DELETE, reason `deleted`, though all
    the speech had been rendered)."""
    with FakeService() as service:
        if face == "sync":
            with Client(service.url) as client:
                with client.live(AVATAR) as session:
                    for _ in range(5):
                        session.send(CHUNK)
                    session.end()
        else:
            async def main():
                async with AsyncClient(service.url) as client:
                    async with await client.live(AVATAR) as s:
                        for _ in range(5):
                            await s.send(CHUNK)
                        await s.end()
                    return s

            session = asyncio.run(main())
    assert session.view.state == "ended" and session.view.reason == "finished", session.view
    calls = [(m, p) for m, p in service.requests if not (m == "GET" and p == f"/v1/sessions/{SID}")]
    assert ("POST", f"/v1/sessions/{SID}/end") in calls, calls
    assert ("DELETE", f"/v1/sessions/{SID}") not in calls, calls


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("end_answer, ends", [(409, True), (200, False)])
def test_a_session_whose_end_is_refused_or_late_is_deleted(face, end_answer, ends):
    """`POST /end` answered an error, or the session not ended within the close's bound: it is ended now
    (DELETE), after the `/end`."""
    with FakeService(end_answer=end_answer, ends=ends) as service:
        if face == "sync":
            with Client(service.url, retries=0) as client:
                session = client.live(AVATAR)
                session.send(CHUNK)
                view = session.close(wait_s=0.5)
        else:
            async def main():
                async with AsyncClient(service.url, retries=0) as client:
                    s = await client.live(AVATAR)
                    await s.send(CHUNK)
                    return await s.close(wait_s=0.5)

            view = asyncio.run(main())
    assert view.state == "ended" and view.reason == "deleted", view
    calls = [(m, p) for m, p in service.requests if m in ("POST", "DELETE")]
    assert calls[-2:] == [("POST", f"/v1/sessions/{SID}/end"), ("DELETE", f"/v1/sessions/{SID}")], calls


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_close_after_an_error_neither_ends_the_speech_nor_waits_for_it(face):
    """Leaving the block on an error with the audio socket still open: the socket closed and one DELETE,
    at once. It was: the speech's end sent on the socket and waited for (up to the client's timeout and
    more), then its rendering waited for (up to `wait_s`), then the DELETE: a `lipsync live` whose
    rendering wait timed out waited as long again; a Ctrl-C in the block did too."""
    with FakeService(answers_end=False) as service:
        if face == "sync":
            with Client(service.url, timeout=3, retries=0) as client:
                with pytest.raises(RuntimeError, match="boom"):
                    with client.live(AVATAR) as session:
                        session.send(CHUNK)
                        before, t0 = len(service.requests), time.monotonic()
                        raise RuntimeError("boom")
                took = time.monotonic() - t0
        else:
            async def main():
                async with AsyncClient(service.url, timeout=3, retries=0) as client:
                    s = await client.live(AVATAR)
                    async with s:
                        await s.send(CHUNK)
                        marks.update(before=len(service.requests), t0=time.monotonic())
                        raise RuntimeError("boom")

            marks: dict = {}
            with pytest.raises(RuntimeError, match="boom"):
                asyncio.run(main())
            took, before = time.monotonic() - marks["t0"], marks["before"]
        after = service.requests[before:]
    assert after == [("DELETE", f"/v1/sessions/{SID}")], after
    assert took < 2, f"the close after the error took {took:.1f} s"


def test_a_close_after_an_error_raises_a_ctrl_c_that_comes_while_it_closes():
    """A KeyboardInterrupt while a close after an error closes the audio socket is raised, after the one
    DELETE (it was swallowed: the close returned the view, as if nothing had come)."""
    with FakeService() as service:
        with Client(service.url, retries=0) as client:
            session = client.live(AVATAR)
            session.send(CHUNK)

            def interrupted() -> None:
                raise KeyboardInterrupt

            session._ws.close = interrupted  # Ctrl-C while the socket closes
            with pytest.raises(KeyboardInterrupt):
                session.close(error=RuntimeError("boom"))
    assert [r for r in service.requests if r[0] == "DELETE"] == [("DELETE", f"/v1/sessions/{SID}")]


def test_an_async_close_after_an_error_raises_a_cancellation_that_comes_while_it_closes():
    """`asyncio.timeout` cancelling the task while `__aexit__` closes the session after the block's error:
    the cancellation is raised (the timeout says TimeoutError), after the one DELETE. It was swallowed:
    the block's error came out instead and the task's cancellation was lost."""
    with FakeService() as service:
        async def main():
            async with AsyncClient(service.url, retries=0) as client:
                s = await client.live(AVATAR)
                await s.send(CHUNK)
                ws, closing = s._ws, s._ws.close

                async def slow_close() -> None:  # the socket's close handshake still under way at the timeout
                    await asyncio.sleep(5)
                    await closing()

                ws.close = slow_close
                t0 = time.monotonic()
                try:
                    async with asyncio.timeout(0.5):
                        async with s:
                            raise ApiError(0, "session.socket_closed", "lost")
                finally:
                    took["s"] = time.monotonic() - t0
                    await closing()

        took: dict = {}
        with pytest.raises(TimeoutError):
            asyncio.run(main())
    assert took["s"] < 3, took
    assert [r for r in service.requests if r[0] == "DELETE"] == [("DELETE", f"/v1/sessions/{SID}")]


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_failed_read_while_the_session_ends_is_said_as_that_read(face, caplog):
    """`POST /end` accepted, then a GET of the session (looking for its end) answered 503: the session is
    ended now (DELETE) and the log names the GET, not the `POST /end` (it said "its end (POST /end) was
    answered 503")."""
    caplog.set_level(logging.INFO, logger="lipsync.client")
    with FakeService(get_answer_after_end=503) as service:
        if face == "sync":
            with Client(service.url, retries=0) as client:
                session = client.live(AVATAR)
                view = session.close(wait_s=2)
        else:
            async def main():
                async with AsyncClient(service.url, retries=0) as client:
                    s = await client.live(AVATAR)
                    return await s.close(wait_s=2)

            view = asyncio.run(main())
    assert view.state == "ended" and view.reason == "deleted", view
    said = [r.getMessage() for r in caplog.records if "ending it now (DELETE)" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert f"(GET /v1/sessions/{SID}) was answered 503 service.unavailable" in said[0], said
    assert "POST /end) was answered" not in said[0], said


@pytest.mark.parametrize("token_from", ["flag", "env"])
def test_lipsync_live_says_the_answer_of_a_refused_delete_and_where_the_token_comes_from(
        token_from, speech_wav, tmp_path, capsys, monkeypatch):
    """`lipsync live --recording r.mp4` whose rendering wait times out, and whose DELETE is answered 401
    (a rotated token): the error line says that answer, not that the service stopped; the speech's end
    was sent once (not again by the close); the curl hint names `$LIPSYNC_API_TOKEN` only when the token
    came from it (`<your token>` for --token) and never the token itself."""
    from cluster import cli
    from cluster.client import LiveSession

    waiting = LiveSession.wait_rendered
    monkeypatch.setattr(LiveSession, "wait_rendered",
                        lambda self, timeout=60.0, poll_s=0.25: waiting(self, min(timeout, 0.5), poll_s))
    monkeypatch.delenv("LIPSYNC_API_TOKEN", raising=False)
    token = ["--token", "s3cret-token"]
    if token_from == "env":
        monkeypatch.setenv("LIPSYNC_API_TOKEN", "s3cret-token")
        token = []
    recording = tmp_path / "r.mp4"
    with FakeService(renders=False, delete_answer=401) as service:
        rc = cli.main(["live", "--avatar", AVATAR, "--audio", speech_wav, "--url", service.url,
                       "--recording", str(recording), *token])
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    error = [line for line in err.splitlines() if line.startswith("lipsync: error:")]
    assert len(error) == 1 and error[0].startswith("lipsync: error: wait.timeout:"), err
    assert "could not be ended either (DELETE answered 401 auth.invalid_token: the token is wrong)" in error[0], error
    assert "stopped or restarts" not in error[0] and "s3cret" not in err, error
    shown = "<your token>" if token_from == "flag" else "$LIPSYNC_API_TOKEN"
    assert (f'once the session has ended, fetch it with curl -f -H "Authorization: Bearer {shown}" -o {recording} '
            f"{service.url}/v1/sessions/{SID}/recording") in error[0], error
    assert service.requests.count(("WS", "end")) == 1, service.requests
    assert [r for r in service.requests if r[0] == "DELETE"] == [("DELETE", f"/v1/sessions/{SID}")]


@pytest.mark.parametrize("face", ["sync", "async"])
def test_wait_rendered_after_a_send_refused_as_taken_over_says_so_at_once(face):
    """A `send` whose socket the service closed with 4409 (another audio socket took the session over) raised;
    `wait_rendered` then waited out its whole timeout for speech no socket of this client would send: it says at
    once what was not received and why."""
    def check(refused: ApiError | None, waited: float, left: ApiError) -> None:
        assert refused is not None and refused.code == "session.socket_in_use", refused
        assert waited < 3 and left.code == "session.socket_in_use", (waited, left)
        assert "of the speech sent were not received" in left.message and "took this session over" in left.message

    with FakeService(close_after=10, close_code=4409) as service:
        if face == "sync":
            with Client(service.url, retries=0).live(AVATAR) as session:
                refused = None
                for _ in range(60):
                    try:
                        session.send(CHUNK)
                    except ApiError as e:
                        refused = e
                        break
                    time.sleep(0.03)
                t0 = time.monotonic()
                with pytest.raises(ApiError) as left:
                    session.wait_rendered(timeout=10)
                check(refused, time.monotonic() - t0, left.value)
        else:
            async def run():
                async with AsyncClient(service.url, retries=0) as client:
                    async with await client.live(AVATAR) as session:
                        refused = None
                        for _ in range(60):
                            try:
                                await session.send(CHUNK)
                            except ApiError as e:
                                refused = e
                                break
                            await asyncio.sleep(0.03)
                        t0 = time.monotonic()
                        with pytest.raises(ApiError) as left:
                            await session.wait_rendered(timeout=10)
                        check(refused, time.monotonic() - t0, left.value)
            asyncio.run(run())


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed-by-the-service"])
def test_wait_rendered_waits_for_what_was_sent_not_only_for_what_arrived(face, closed):
    """The sync `send` returns once its bytes are in the socket's buffer: `wait_rendered` right after 24 s of
    speech read a view of 0 s received and 0 s rendered, and returned at once (the async twin happened to wait).
    Where the service closes the socket after the last `send` (1011), what it did not receive is sent again on a
    socket opened for it (the wait would otherwise end only at its timeout)."""
    with FakeService(read_delay_s=0.02, close_after=10 if closed else None) as service:
        n = 40
        if face == "sync":
            with Client(service.url, retries=0).live(AVATAR) as session:
                for _ in range(n):
                    session.send(CHUNK)
                view = session.wait_rendered(timeout=20)
        else:
            async def run():
                async with AsyncClient(service.url, retries=0) as client:
                    async with await client.live(AVATAR) as session:
                        for _ in range(n):
                            await session.send(CHUNK)
                        return await session.wait_rendered(timeout=20)
            view = asyncio.run(run())
    assert view.bytes_received == n * len(CHUNK), view
    opened = [r for r in service.requests if r == ("WS", f"/v1/sessions/{SID}/audio")]
    assert len(opened) == (2 if closed else 1), service.requests
