"""Structured logs (cluster/logs.py) and plain-Python telemetry events (cluster/telemetry.py)."""
from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from cluster import logs, telemetry


@pytest.fixture
def captured():
    """The `lipsync` logger's structured output, as a string buffer; restored afterwards."""
    logger = logging.getLogger("lipsync")
    saved = (list(logger.handlers), logger.level, logger.propagate, dict(logs._process))

    def install(fmt: str) -> io.StringIO:
        handler = logs.configure(fmt)
        handler.setStream(buffer := io.StringIO())
        return buffer

    yield install
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    logs._process.clear()
    logs._process.update(saved[3])


def test_json_lines_carry_job_chunk_actor_node_from_context_extra_and_process(captured):
    out = captured("json")
    logs.set_process_context(actor="lipsync-compositor-0", node="ab12")
    log = logging.getLogger("lipsync.test")
    with logs.log_context(job_id="job-1"):
        log.info("preparing")
        with logs.log_context(chunk=3):
            log.warning("chunk %d slow", 3)
    log.info("explicit", extra={"job_id": "job-2", "chunk": 0})
    logs.set_context(job_id="job-3", chunk=5)  # an actor method's first line
    logs.set_context(job_id="job-4")           # the next call in the same thread: no stale chunk
    log.info("next call")
    logs.set_context()
    log.info("nothing about a job")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["msg"], x.get("job_id"), x.get("chunk")) for x in lines] == [
        ("preparing", "job-1", None), ("chunk 3 slow", "job-1", 3), ("explicit", "job-2", 0),
        ("next call", "job-4", None), ("nothing about a job", None, None)]
    assert all(x["actor"] == "lipsync-compositor-0" and x["node"] == "ab12" for x in lines)
    assert lines[1]["level"] == "WARNING" and lines[1]["logger"] == "lipsync.test"
    # a failed job's line carries its stage and error code as fields (a shipper filters on them)
    log.warning("job j failed: render.failed: ...", extra={"job_id": "j", "stage": "render", "code": "render.failed"})
    failed = json.loads(out.getvalue().splitlines()[-1])
    assert (failed["job_id"], failed["stage"], failed["code"]) == ("j", "render", "render.failed"), failed


def test_each_asyncio_task_keeps_its_own_job(captured):
    out = captured("json")
    log = logging.getLogger("lipsync.test")

    async def job(job_id: str) -> None:
        logs.bind(job_id=job_id)
        for step in range(3):
            await asyncio.sleep(0)
            log.info("step %d of %s", step, job_id)

    async def main() -> None:
        await asyncio.gather(job("a"), job("b"))
    asyncio.run(main())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 6
    assert all(x["msg"].endswith(x["job_id"]) for x in lines)


def test_secrets_and_long_contents_stay_out_of_logs(captured, monkeypatch):
    monkeypatch.setenv("LIPSYNC_API_TOKEN", "tok-3f9a7c1e55d0")
    out = captured("json")
    log = logging.getLogger("lipsync.test")
    log.info("auth header Bearer tok-3f9a7c1e55d0 refused")
    log.info("bytes %s", "x" * 50_000)
    try:
        raise ValueError("token tok-3f9a7c1e55d0 in an exception")
    except ValueError:
        log.exception("failed")
    text = out.getvalue()
    assert "tok-3f9a7c1e55d0" not in text and "Bearer ***" in text
    assert all(len(line) < logs.MAX_MESSAGE_CHARS * 3 for line in text.splitlines())
    assert "ValueError" in json.loads(text.splitlines()[-1])["exc"]


def test_text_format_shows_the_same_fields(captured):
    out = captured("text")
    with logs.log_context(job_id="j9", chunk=2):
        logging.getLogger("lipsync.test").info("hello")
    assert "[job_id=j9 chunk=2" in out.getvalue() and out.getvalue().rstrip().endswith("hello")


def test_log_format_setting_is_validated(monkeypatch):
    from pydantic import ValidationError

    from cluster.config import Settings

    monkeypatch.setenv("LIPSYNC_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    with pytest.raises(ValidationError, match="log_format"):
        Settings(log_format="xml")


def test_telemetry_reaches_listeners_and_survives_a_broken_one():
    seen = []

    def good(name, value, tags):
        seen.append((name, round(value, 1) if name == "stage_seconds" else value, tags))

    def broken(name, value, tags):
        raise RuntimeError("exporter down")

    telemetry.add_listener(broken)
    telemetry.add_listener(good)
    try:
        telemetry.emit("avatar_cache", result="hit")
        with pytest.raises(KeyError):
            with telemetry.timed("stage_seconds", stage="detect"):
                raise KeyError("the step failed; its time is still reported")
    finally:
        telemetry.remove_listener(broken)
        telemetry.remove_listener(good)
    telemetry.emit("avatar_cache", result="miss")  # no listener: nothing happens
    assert seen == [("avatar_cache", 1.0, {"result": "hit"}), ("stage_seconds", 0.0, {"stage": "detect"})]


def test_every_actor_sets_up_the_structured_logs():
    """Each Ray actor's `__init__` installs the `lipsync` log handler (LIPSYNC_LOG_FORMAT, its name
    and node on every line): the service's sidecar (retention, callbacks, avatars) and the live
    actors logged Python's plain default lines under LIPSYNC_LOG_FORMAT=json."""
    import ast
    import inspect
    import textwrap

    found = {}
    for module in ("compositor", "live", "model_worker", "orchestrator", "service_support"):
        source = inspect.getsource(__import__(f"actors.{module}", fromlist=["_"]))
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef) and any("ray.remote" in ast.unparse(d) for d in node.decorator_list):
                init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
                found[node.name] = "metrics.install(" in textwrap.dedent(ast.unparse(init))
    assert len(found) == 6 and all(found.values()), found


def test_callback_lines_are_the_services_own_with_the_job_and_without_the_urls_query(captured, tmp_path):
    """The callback lines were `cluster.callbacks`'s, outside the `lipsync` loggers: plain text under
    LIPSYNC_LOG_FORMAT=json, no job id, and the receiver's URL whole (`?k=<its key>`), as httpx's own INFO line."""
    import asyncio
    import json

    from cluster.callbacks import CallbackStore, deliver

    httpx_level = logging.getLogger("httpx").level
    out = captured("json")
    try:
        assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
        store = CallbackStore(tmp_path / "callbacks.sqlite3")
        url = "http://user:pw@receiver:8080/hook/T1/secret-path?k=receivers-key"
        store.add("j9", url)
        from cluster.netguard import UrlFetchError

        answers = [UrlFetchError(f"callback_url: POST to {url} failed: ConnectError"), 200]  # (its error names it)

        async def post() -> int:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        async def no_wait(s: float) -> None:
            return None

        assert asyncio.run(deliver("j9", url, post, store, attempts=3, sleep=no_wait))
    finally:
        logging.getLogger("httpx").setLevel(httpx_level)
    said = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(said) == 2 and all(line["logger"] == "lipsync.callbacks" and line["job_id"] == "j9"
                                  for line in said), said
    assert "http://receiver:8080/...?..." in said[1]["msg"], said
    secrets = ("receivers-key", "pw@", "secret-path", "/hook")
    assert not any(secret in line["msg"] for line in said for secret in secrets), said
    assert "receivers-key" not in (store.get("j9")["last_error"] or ""), store.get("j9")


def test_an_answer_the_stopping_services_proxy_cannot_take_is_a_warning_not_two_error_tracebacks(caplog):
    """Every stop with an event stream open logged `GET .../events: unexpected error` and Serve's "Request
    failed." at ERROR with tracebacks (the answer's way out, Serve's HTTP proxy, was killed): false alarms to
    whoever alerts on ERROR. A bug (any other exception) still is one."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from ray.exceptions import RayActorError

    from service.errors import QuietProxyLoss, install_exception_handlers

    app = FastAPI()
    install_exception_handlers(app)
    proxy_killed = RayActorError(error_msg="The actor died unexpectedly before finishing this task.\n\tclass_name: "
                                           "ProxyActor\nThe actor is dead because it was killed by `ray.kill`.")

    @app.get("/stream")
    async def stream():
        raise proxy_killed

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    lipsync = logging.getLogger("lipsync")
    propagates, lipsync.propagate = lipsync.propagate, True  # (seen by caplog)
    try:
        with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.WARNING):
            assert client.get("/stream").json()["error"]["code"] == "service.unavailable"
            assert client.get("/bug").status_code == 500
    finally:
        lipsync.propagate = propagates
    said = [(r.levelname, r.getMessage(), bool(r.exc_info)) for r in caplog.records if r.name == "lipsync.service"]
    assert said == [("WARNING", "GET /stream: not answered: Ray Serve's HTTP proxy is gone (the service stops)",
                     False), ("ERROR", "GET /bug: unexpected error", True)], said
    # Serve's own line of it is dropped, its other lines kept
    quiet = QuietProxyLoss()
    record = logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None,
                               (RayActorError, proxy_killed, None))
    other = logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None,
                              (RuntimeError, RuntimeError("a bug"), None))
    assert not quiet.filter(record) and quiet.filter(other)
