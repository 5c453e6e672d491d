"""The HTTP service end to end: a real `lipsync serve` on a loopback port (session fixture `service`),
driven through the SDK, the shell client, raw HTTP and the compatibility API."""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.helpers import hold_event_stream, wait_until

pytestmark = pytest.mark.service


# --- media ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svc_media(service):
    """Tiny inputs: a 1 s 320x240 face template and short speech clips, inside the input root."""
    from cluster.synth import astronaut_template, speech_like, write_audio

    root = service.input_root
    video = astronaut_template(str(root / "face.mp4"), seconds=1.0, fps=25, size=(320, 240))
    audio = write_audio(str(root / "speech.wav"), speech_like(1.2, seed=3))
    return {"video": video, "audio": audio, "audio_seconds": 1.2}


def expected_frames(seconds: float, fps: int = 25) -> int:
    return math.ceil(seconds * fps - 1e-6)


def verify_mp4(path: str | Path, audio_seconds: float, frames: int | None = None) -> None:
    """A playable H.264/AAC mp4 of exactly the audio's length in frames (or `frames`), at 320x240."""
    from cluster.media.probe import count_video_frames, read_media_info

    info = read_media_info(str(path))
    assert info.video is not None and info.video.codec == "h264", info
    assert info.audio is not None and info.audio.codec == "aac", info
    assert (info.video.width, info.video.height) == (320, 240)
    assert count_video_frames(str(path)) == (frames or expected_frames(audio_seconds))
    assert abs(info.audio.duration - audio_seconds) < 0.1, info.audio


def auth(service) -> dict:
    return {"Authorization": f"Bearer {service.token}"}


# --- SDK ------------------------------------------------------------------------------------------
def test_sdk_submit_wait_download_idempotent(service, svc_media, tmp_path):
    from cluster.client import ApiError, AsyncClient, Client

    job_id = f"sdk-{uuid.uuid4().hex[:8]}"
    with Client(service.url, token=service.token) as c:
        job = c.submit(svc_media["audio"], svc_media["video"], id=job_id, sync_mode="pingpong")
        assert job.id == job_id
        view = job.wait(progress=False, timeout=180)
        assert view.state.value == "succeeded" and view.progress == 1.0
        assert view.frames_done == view.frames_total == expected_frames(svc_media["audio_seconds"])
        assert view.output is not None and view.output.url == f"{service.url}/v1/jobs/{job_id}/result"
        assert view.output.duration == pytest.approx(view.frames_total / 25)  # the template's 25 fps
        assert (view.output.width, view.output.height, view.output.fps) == (320, 240, 25.0)
        out = job.download(tmp_path / "out.mp4")
        assert out.stat().st_size == view.output.size
        verify_mp4(out, svc_media["audio_seconds"])
        # the same id with the same inputs is the same job; with other inputs a conflict
        again = c.submit(svc_media["audio"], svc_media["video"], id=job_id, sync_mode="pingpong")
        assert again.id == job_id and again.status().state.value == "succeeded"
        other = service.input_root / "other.wav"
        from cluster.synth import speech_like, write_audio

        write_audio(str(other), speech_like(1.0, seed=11))
        with pytest.raises(ApiError) as e:
            c.submit(str(other), svc_media["video"], id=job_id)
        assert e.value.status == 409 and e.value.code == "job.conflict"
        # resumable download: the partial file an interrupted download left (its bytes and the ETag
        # of the result they are of) is completed with a Range request: its bytes are kept
        etag = c.http.head(f"/v1/jobs/{job_id}/result").headers["etag"]
        (tmp_path / "resume.mp4.part").write_bytes(b"\0" * 1000)
        (tmp_path / "resume.mp4.part.etag").write_text(etag)
        resumed = c.download(job_id, tmp_path / "resume.mp4")
        assert resumed.read_bytes() == b"\0" * 1000 + out.read_bytes()[1000:]
        assert not (tmp_path / "resume.mp4.part.etag").exists()
        (tmp_path / "whole.mp4.part").write_bytes(out.read_bytes())  # already complete: 416, kept
        (tmp_path / "whole.mp4.part.etag").write_text(etag)
        assert c.download(job_id, tmp_path / "whole.mp4").read_bytes() == out.read_bytes()
        # a partial of another result (another job's download to the same path), or of unknown origin,
        # is never spliced with this one: the download starts over
        for name, tag in (("other.mp4", '"another-job-123-1"'), ("unknown.mp4", None)):
            (tmp_path / f"{name}.part").write_bytes(b"\0" * 1000)
            if tag:
                (tmp_path / f"{name}.part.etag").write_text(tag)
            assert c.download(job_id, tmp_path / name).read_bytes() == out.read_bytes()

        async def download_async(name: str):
            async with AsyncClient(service.url, token=service.token) as ac:
                return await ac.download(job_id, tmp_path / name)

        (tmp_path / "async.mp4.part").write_bytes(b"\0" * 1000)  # the async twin, the same rules
        (tmp_path / "async.mp4.part.etag").write_text('"another-job-123-1"')
        assert asyncio.run(download_async("async.mp4")).read_bytes() == out.read_bytes()
        (tmp_path / "async-resume.mp4.part").write_bytes(b"\0" * 1000)
        (tmp_path / "async-resume.mp4.part.etag").write_text(etag)
        assert asyncio.run(download_async("async-resume.mp4")).read_bytes() == b"\0" * 1000 + out.read_bytes()[1000:]
        listed = c.list(state="succeeded", limit=500)
        assert job_id in [j.id for j in listed.jobs]


def test_the_service_exports_its_metrics_on_the_port_it_was_given(service, svc_media):
    """`lipsync serve --metrics-port PORT`: Prometheus' target is fixed (Ray picked a new port at each
    start), on loopback, and carries the product's series once a job has rendered."""
    import socket

    from cluster.client import Client

    with Client(service.url, token=service.token) as c:
        view = c.submit(svc_media["audio"], svc_media["video"]).wait(timeout=180)
    assert view.state.value == "succeeded"
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline and "ray_lipsync_frames_rendered_total" not in text:
        time.sleep(1.0)
        text = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
    assert "ray_lipsync_frames_rendered_total" in text, text[-2000:]
    import psutil

    for address in [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                    if a.family == socket.AF_INET and not a.address.startswith("127.")]:
        with pytest.raises(OSError):  # on loopback only
            socket.create_connection((address, service.metrics_port), timeout=2).close()


def test_async_client_and_cancel(service, svc_media):
    from cluster.client import AsyncClient, JobFailed

    async def run():
        async with AsyncClient(service.url, token=service.token) as c:
            job = await c.submit(svc_media["audio"], svc_media["video"])
            view = await job.cancel()
            assert view.state.value in ("cancelled", "succeeded")
            if view.state.value == "cancelled":
                with pytest.raises(JobFailed) as e:
                    await job.wait(timeout=60)
                assert e.value.job.state.value == "cancelled"
                assert e.value.job.error.code == "cancelled"
            return view

    asyncio.run(run())


def test_a_job_another_live_run_renders_is_not_cancelled_here(service):
    """A job of another run sharing the storage root (a `lipsync render` beside the service) was listed, and a
    DELETE wrote `cancelled` into the shared store while that run rendered on and committed its file: its
    output then had no job, and the user who cancelled saw a state that was not true. Now refused (409)."""
    import socket

    import psutil

    from cluster.jobstore import JobStore
    from cluster.owners import EMBEDDED_PREFIX, identity_gone
    from cluster.schemas import ErrorInfo, JobState, RenderRequest

    store = JobStore(service.storage_root / "jobs.sqlite3")
    me = psutil.Process()
    alive = f"{EMBEDDED_PREFIX}{socket.gethostname()}:{me.pid}:{me.create_time()}"  # this test's process
    gone = f"{EMBEDDED_PREFIX}{socket.gethostname()}:{me.pid}:{me.create_time() - 100}"  # a run that has ended
    assert not identity_gone(alive) and identity_gone(gone)
    request = RenderRequest(audio="/elsewhere/a.wav", video="/elsewhere/v.mp4")
    store.create("run-elsewhere", request, owner=alive, client=alive)
    store.create("run-gone", request, owner=gone, client=gone)
    store.create("run-on-another-host", request, owner=f"{EMBEDDED_PREFIX}another-host:42:1.0")
    headers = {"Authorization": f"Bearer {service.token}"} if service.token else {}
    try:
        with httpx.Client(base_url=service.url, headers=headers, timeout=60) as http:
            r = http.delete("/v1/jobs/run-elsewhere")
            err = r.json()["error"]
            assert r.status_code == 409 and err["code"] == "job.run_elsewhere", r.text
            assert alive in err["message"] and "lipsync render" in err["message"], r.text
            assert http.get("/v1/jobs/run-elsewhere").json()["state"] == "queued"
            r = http.delete("/v1/jobs/run-gone")  # nobody runs it any more: cancelled here
            assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
            # a run this machine cannot see alive (it may have died there): cancelled, or its job held a queue
            # place and its output path for good
            r = http.delete("/v1/jobs/run-on-another-host")
            assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    finally:  # the stand-in run ends: the service's list holds no unfinished job of it
        store.end("run-elsewhere", JobState.failed, error=ErrorInfo(code="test", message="the stand-in run ended"))


# --- raw HTTP ---------------------------------------------------------------------------------------
def test_event_streams_past_the_bound_are_refused_and_a_closed_one_frees_its_place(service, svc_media):
    """Each job event stream asks the job manager twice a second: a replica keeps at most
    `LIPSYNC_MAX_EVENT_STREAMS` (4 in the session service) open. The next is refused (429
    `service.busy`, Retry-After, naming the setting); a stream the client closes frees its place.
    (`test_20_concurrent_submissions` waits on 20 jobs at once through the SDK, whose `wait` polls
    when its stream is refused.)"""
    import contextlib

    from cluster.synth import speech_like, write_audio

    audio = write_audio(str(service.input_root / "speech-events-bound.wav"), speech_like(120.0, seed=21))
    with httpx.Client(base_url=service.url, headers=auth(service), timeout=60) as http:
        job_id = http.post("/v1/jobs", json={"audio": audio, "video": svc_media["video"]}).json()["id"]

        try:
            with contextlib.ExitStack() as stack:
                streams = [hold_event_stream(http, job_id, stack) for _ in range(4)]
                with http.stream("GET", f"/v1/jobs/{job_id}/events") as over:
                    over.read()
                    assert over.status_code == 429, over.text
                    error = over.json()["error"]
                    assert error["code"] == "service.busy" and "LIPSYNC_MAX_EVENT_STREAMS=4" in error["message"]
                    assert int(over.headers["retry-after"]) >= 1
                assert http.get(f"/v1/jobs/{job_id}").json()["state"] not in ("succeeded", "failed", "cancelled")
                streams[0][0].close()
                with contextlib.ExitStack() as again:
                    hold_event_stream(http, job_id, again)  # the closed stream's place
        finally:
            http.delete(f"/v1/jobs/{job_id}")


def test_raw_http_json_paths_events_range(service, svc_media):
    h = auth(service)
    with httpx.Client(base_url=service.url, headers=h, timeout=60) as http:
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"], "sync_mode": "loop"})
        assert r.status_code == 202, r.text
        body = r.json()
        assert set(body) == {"id", "state", "watch_url"} and body["state"] in ("queued", "preparing", "rendering")
        assert body["watch_url"].startswith(f"/v1/jobs/{body['id']}/hls/index.m3u8?token=")  # signed: a token is set
        job_id = body["id"]
        assert r.headers["location"] == f"/v1/jobs/{job_id}"
        # SSE: one event per change, ending at the terminal state, progress never going back
        events = []
        with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        assert events and events[-1]["state"] == "succeeded"
        progress = [e["progress"] for e in events]
        assert progress == sorted(progress) and progress[-1] == 1.0
        v = http.get(f"/v1/jobs/{job_id}").json()
        assert v["state"] == "succeeded" and v["stage"] == "done" and v["sync_mode"] == "loop"
        # a query parameter a list does not take is refused, not ignored (`?status=failed` listed every job)
        for path, wrong in (("/v1/jobs", "status"), ("/v1/avatars", "state")):
            r = http.get(path, params={wrong: "failed"})
            assert r.status_code == 422 and r.json()["error"]["field"] == wrong, r.text
            assert f"unknown query parameter '{wrong}'" in r.json()["error"]["message"], r.text
        assert http.get("/v1/jobs", params={"state": "succeeded", "limit": 5}).status_code == 200
        # what it was given, by name (the page's job list tells jobs apart by it): not the server's paths
        assert v["inputs"] == {"audio": Path(svc_media["audio"]).name, "video": Path(svc_media["video"]).name}, v
        assert v["frames_done"] == v["frames_total"] == expected_frames(svc_media["audio_seconds"])
        assert v["error"] is None and v["output"]["size"] > 1000
        size = v["output"]["size"]
        full = http.get(f"/v1/jobs/{job_id}/result")
        assert full.status_code == 200 and full.headers["content-type"] == "video/mp4"
        assert full.headers["accept-ranges"] == "bytes" and int(full.headers["content-length"]) == size
        assert len(full.content) == size
        etag = full.headers["etag"]
        part = http.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == full.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{size}"
        tail = http.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=-50"})
        assert tail.status_code == 206 and tail.content == full.content[-50:]
        past = http.get(f"/v1/jobs/{job_id}/result", headers={"Range": f"bytes={size}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
        assert past.json()["error"]["code"] == "input.range_not_satisfiable"
        # several ranges: the whole file (it was a 416: a downloader asking for two parts got nothing)
        both = http.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=0-1,5-9"})
        assert both.status_code == 200 and both.content == full.content
        assert http.get(f"/v1/jobs/{job_id}/result", headers={"If-None-Match": etag}).status_code == 304
        assert http.get(f"/v1/jobs/{job_id}/result", headers={"If-None-Match": f'"x", W/{etag}'}).status_code == 304
        # listing: filter and pagination
        page = http.get("/v1/jobs", params={"state": "succeeded", "limit": 1}).json()
        assert len(page["jobs"]) == 1 and page["jobs"][0]["state"] == "succeeded"
        listed = http.get("/v1/jobs", params={"state": "succeeded"}).json()["jobs"]
        assert all(j["state"] == "succeeded" for j in listed)
        # the next page by `before` (steady while jobs are submitted): the rest of the list, in order
        first = http.get("/v1/jobs", params={"limit": 1}).json()
        rest = http.get("/v1/jobs", params={"limit": 500, "before": first["next_before"]}).json()["jobs"] \
            if first["next_before"] else []
        # newest first, as the route says (it answered oldest first: the page's Jobs tab hid the recent ones)
        everything = http.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
        assert [j["id"] for j in everything] == [first["jobs"][0]["id"]] + [j["id"] for j in rest]
        created = [datetime.fromisoformat(j["created_at"]) for j in everything]
        assert created and created == sorted(created, reverse=True), created  # (one job when run alone)
        unknown = http.get("/v1/jobs", params={"before": "no-such-job"})  # the refusal names its parameter
        assert unknown.status_code == 400 and unknown.json()["error"]["field"] == "before", unknown.text
        # a route without the method: 405 with the methods it takes
        wrong = http.put(f"/v1/jobs/{job_id}")
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed", wrong.text
        assert {"GET", "DELETE"} <= {m.strip() for m in wrong.headers["allow"].split(",")}, wrong.headers
        # unknown job: 404 with the error body; result before success: 409
        nf = http.get("/v1/jobs/does-not-exist")
        assert nf.status_code == 404 and nf.json()["error"]["code"] == "job.not_found"
        # health and OpenAPI
        assert httpx.get(service.url + "/healthz").status_code == 200  # no token needed
        assert http.get("/readyz").status_code == 200
        spec = http.get("/openapi.json").json()
        for route in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/result",
                      "/v1/batches", "/easy/submit", "/easy/query", "/upload", "/healthz", "/readyz"):
            assert route in spec["paths"], route
        assert "JobView" in spec["components"]["schemas"] and "ApiError" in spec["components"]["schemas"]


def test_result_409_until_succeeded_and_bad_input(service, svc_media, tmp_path):
    h = auth(service)
    bad = service.input_root / "not-media.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with httpx.Client(base_url=service.url, headers=h, timeout=60) as http:
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": str(bad)})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"].startswith("input.") and err["field"] == "video", err
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"], "crf": 99})
        assert r.status_code == 422 and r.json()["error"]["field"] == "crf"
        # a pattern is said in words, not as its regular expression; a repeated query parameter by its name
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"], "model": "a b"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "model", r.text
        assert "'builtin'" in r.json()["error"]["message"] and "^(" not in r.json()["error"]["message"], r.text
        r = http.get("/v1/jobs", params={"state": "bogus"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "state", r.text
        # a video and an avatar: which to render? refused, as the CLI refuses it (it rendered one of them)
        for form in ({"json": {"audio": svc_media["audio"], "video": svc_media["video"],
                               "avatar_id": "0123456789abcdef"}},
                     {"data": {"avatar_id": "0123456789abcdef"},
                      "files": {"audio": open(svc_media["audio"], "rb"), "video": open(svc_media["video"], "rb")}}):
            r = http.post("/v1/jobs", **form)
            assert r.status_code == 422 and r.json()["error"]["field"] == "avatar_id", r.text
        # an unknown avatar: its field, and no server path in the message
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "avatar_id": "0123456789abcdef"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["field"] == "avatar_id" and "0123456789abcdef" in err["message"], err
        assert str(service.storage_root) not in err["message"], err
        # an unknown model name: the service's model names, not a path on the server
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"], "model": "nosuch"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["field"] == "model", err
        assert err["message"].startswith("unknown model 'nosuch': this service has the built-in model"), err
        assert str(service.storage_root) not in err["message"], err
        # with an audio URL to fetch, a bad avatar or model is refused before the download (the URL here
        # would be refused itself, input.unsafe: the answers show it was never tried)
        r = http.post("/v1/jobs", json={"audio": "http://127.0.0.1:9/a.wav", "avatar_id": "0123456789abcdef"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "avatar_id", r.text
        r = http.post("/v1/jobs", json={"audio": "http://127.0.0.1:9/a.wav", "video": svc_media["video"],
                                        "model": "nosuch"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "model", r.text
        # the same file sent as audio and as video: the error is about the video
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["audio"]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "video", r.text
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"],
                                        "model": "/etc/passwd"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "model"
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"]})
        job_id, watch = r.json()["id"], r.json()["watch_url"]
        purged = http.delete(f"/v1/jobs/{job_id}/files")  # a running job's files stay: cancel it first
        assert purged.status_code == 409 and purged.json()["error"]["code"] == "job.not_finished", purged.text
        res = http.get(f"/v1/jobs/{job_id}/result")
        if res.status_code != 200:  # the documented code (the route once answered job.not_ready)
            assert res.status_code == 409 and res.json()["error"]["code"] == "job.not_succeeded", res.text
        # the watch_url handed out at once plays at once: its playlist waits (bounded) for the first segment,
        # where ffmpeg met a playlist without one ("Empty segment") and gave up
        t0 = time.monotonic()
        playlist = http.get(watch)
        assert playlist.status_code == 200 and ("#EXTINF" in playlist.text or time.monotonic() - t0 > 7.5), \
            (time.monotonic() - t0, playlist.text)
        wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", 120, 0.5, "job")
        # its output removed (as retention does): the job stays succeeded, its result is a 410 naming
        # why, never a 200 that breaks off; /easy/query says the task failed, with the same reason
        (output,) = (service.storage_root / "outputs").glob(f"{job_id}.mp4")
        output.unlink()
        for method in ("GET", "HEAD"):
            res = http.request(method, f"/v1/jobs/{job_id}/result")
            assert res.status_code == 410, (method, res.status_code)
        err = http.get(f"/v1/jobs/{job_id}/result").json()["error"]
        assert err["code"] == "output.expired" and "no longer exists" in err["message"], err
        q = http.get("/easy/query", params={"code": job_id}).json()
        assert q["data"]["status"] == 3 and "output.expired" in q["data"]["msg"], q
        assert str(service.storage_root) not in err["message"] + q["data"]["msg"]  # no server path told clients
        # its view says so (it read as any success, `output` null, and still gave a watch_url), as the list does
        view = http.get(f"/v1/jobs/{job_id}").json()
        assert view["state"] == "succeeded" and view["expired"] is True and view["output"] is None, view
        assert view.get("watch_url") is None, view
        listed = [v for v in http.get("/v1/jobs", params={"limit": 100}).json()["jobs"] if v["id"] == job_id]
        assert listed and listed[0]["expired"] is True and listed[0].get("watch_url") is None, listed
        # its files removed on request, as retention does (a factory's disk: a probe found no way to), the job's
        # directory too: its stream is 410 as its result, not an empty playlist; asked again, the same answer
        job_dir = service.storage_root / "jobs" / job_id
        assert job_dir.is_dir()
        for _ in range(2):
            purged = http.delete(f"/v1/jobs/{job_id}/files")
            assert purged.status_code == 200 and purged.json()["expired"] is True, purged.text
            assert not job_dir.exists()
        for name in ("index.m3u8", "init.mp4"):
            res = http.get(watch.replace("index.m3u8", name))
            assert res.status_code == 410 and res.json()["error"]["code"] == "output.expired", (name, res.text)
            assert "stream no longer exists" in res.json()["error"]["message"], res.text
        # a cancelled job's, the same (a probe: its view kept a watch_url, whose playlist answered 200, empty and ended)
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"],
                                        "model": "latency:200"})
        other, other_watch = r.json()["id"], r.json()["watch_url"]
        assert http.delete(f"/v1/jobs/{other}").json()["state"] == "cancelled"
        assert http.delete(f"/v1/jobs/{other}/files").status_code == 200
        assert http.get(f"/v1/jobs/{other}").json().get("watch_url") is None
        res = http.get(other_watch)
        assert res.status_code == 410 and "cancelled, and its stream no longer exists" in res.text, res.text


# --- guards ---------------------------------------------------------------------------------------------
def test_guards_refuse(service, svc_media, tmp_path):
    outside = tmp_path / "outside.wav"
    outside.write_bytes(Path(svc_media["audio"]).read_bytes())
    link = service.input_root / "link-out.wav"
    if not link.exists():
        link.symlink_to(outside)
    h = auth(service)
    with httpx.Client(base_url=service.url, headers=h, timeout=60) as http:
        def refused(audio: str, status=400, codes=("input.unsafe", "input.outside_roots")):
            r = http.post("/v1/jobs", json={"audio": audio, "video": svc_media["video"]})
            assert r.status_code == status, (audio, r.text)
            e = r.json()["error"]
            assert e["code"] in codes and e["field"] == "audio", (audio, e)
            return e["message"]

        refused(str(outside))                                                  # outside the roots
        refused(str(service.input_root / ".." / "outside.wav"))               # '..'
        refused(str(link))                                                     # symlink out
        refused("relative.wav")
        assert "non-public" in refused("http://127.0.0.1:9/a.wav")             # loopback
        assert "non-public" in refused("http://169.254.169.254/latest/meta-data")  # metadata
        assert "non-public" in refused("http://[::1]/a.wav")
        refused("file:///etc/passwd")
        r = http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"],
                                        "callback_url": "http://169.254.169.254/hook"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "callback_url"
        # what is no URL (a NUL, a newline, an unbalanced bracket): 400 naming its field, on every route that
        # takes one. They were 500 `service.internal` (urlsplit's ValueError, httpx's InvalidURL), and /easy/submit
        # answered that 500 instead of its envelope; a callback_url holding a NUL was taken, and failed at delivery
        def no_url(r, field: str) -> None:
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "input.unsafe" and error["field"] == field, r.text
            assert "not a URL" in error["message"] or "not an RTMP URL" in error["message"], r.text

        for bad in ("http://[::1", "http://8.8.8.8/a\u0000b", "https://8.8.8.8/a\nb"):
            assert "not a URL" in refused(bad, codes=("input.unsafe",))
            with open(svc_media["video"], "rb") as v:
                no_url(http.post("/v1/jobs", data={"audio": bad}, files={"video": ("face.mp4", v)}), "audio")
            no_url(http.post("/v1/avatars", json={"video": bad}), "video")
            no_url(http.post("/v1/batches", json={"audios": [bad], "video": svc_media["video"]}), "audios")
            no_url(http.post("/v1/jobs", json={"audio": svc_media["audio"], "video": svc_media["video"],
                                               "callback_url": bad}), "callback_url")
            no_url(http.post("/v1/sessions", json={"avatar_id": "abcdef0123456789",
                                                   "rtmp_url": bad.replace("http", "rtmp")}), "rtmp_url")
            r = http.post("/easy/submit", json={"audio_url": bad, "video_url": svc_media["video"],
                                                "code": str(uuid.uuid4())})
            assert r.status_code == 200 and r.json()["success"] is False and "not a URL" in r.json()["msg"], r.text
        # oversize upload (the service's limit is 4 MiB), refused while streaming
        big = tmp_path / "big.wav"
        big.write_bytes(b"\0" * (5 * 1024**2))
        with open(big, "rb") as f, open(svc_media["video"], "rb") as v:
            r = http.post("/v1/jobs", files={"audio": ("big.wav", f), "video": ("face.mp4", v)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "input.too_large"
        assert r.json()["error"]["field"] == "audio"
    # wrong or missing token: 401 on every route but the probes (/healthz, /readyz)
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        assert httpx.get(service.url + "/readyz", headers=headers, timeout=30).status_code == 200
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/easy/query?code=x"),
                             ("GET", "/v1/jobs/x/result")):
            r = httpx.request(method, service.url + path, headers=headers, timeout=30)
            said = r.json()["msg"] if path.startswith("/easy") else r.json()["error"]["code"]  # (its envelope)
            assert r.status_code == 401 and said.startswith("auth.invalid_token"), (method, path)
    assert service.token not in service.tail(10**6)  # never logged


# --- shell client ---------------------------------------------------------------------------------------
def test_shell_client(service, svc_media, tmp_path):
    env = {**os.environ, "LIPSYNC_URL": service.url, "LIPSYNC_API_TOKEN": service.token}
    lipsync = [sys.executable, "-m", "cluster.cli"]
    out = tmp_path / "cli.mp4"
    r = subprocess.run(lipsync + ["submit", svc_media["audio"], svc_media["video"], "-o", str(out), "-q",
                                  "--sync-mode", "pingpong", "--timeout", "180"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["state"] == "succeeded"
    verify_mp4(out, svc_media["audio_seconds"])
    job_id = view["id"]
    r = subprocess.run(lipsync + ["status", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"
    r = subprocess.run(lipsync + ["wait", job_id, "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == job_id
    r = subprocess.run(lipsync + ["download", job_id, str(tmp_path / "again.mp4")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and (tmp_path / "again.mp4").read_bytes() == out.read_bytes()
    r = subprocess.run(lipsync + ["submit", svc_media["audio"], svc_media["video"]], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    new_id = r.stdout.strip()
    r = subprocess.run(lipsync + ["cancel", new_id], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] in ("cancelled", "succeeded")
    new_state = json.loads(r.stdout)["state"]
    # the jobs, newest first, one line each; filtered by state; as JSON; paged with --before
    r = subprocess.run(lipsync + ["list", "--state", "succeeded", "--limit", "500"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith(job_id + " "))
    assert line.split()[1] == "succeeded" and "audio=" in line, line
    assert (new_id in r.stdout) == (new_state == "succeeded"), (new_state, r.stdout)  # filtered by its state
    r = subprocess.run(lipsync + ["list", "--limit", "1", "--json"], env=env, capture_output=True, text=True,
                       timeout=60)
    page = json.loads(r.stdout)
    assert r.returncode == 0 and [v["id"] for v in page["jobs"]] == [new_id], r.stdout  # the newest
    assert f"--before {page['next_before']}" in r.stderr
    r = subprocess.run(lipsync + ["list", "--limit", "1", "--before", new_id], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 and new_id not in r.stdout, r.stdout
    r = subprocess.run(lipsync + ["status", "no-such-job"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "job.not_found" in r.stderr
    r = subprocess.run(lipsync + ["status", job_id, "--token", "wrong"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "auth.invalid_token" in r.stderr


# --- compatibility API --------------------------------------------------------------------------------------
def test_compat_api(service, svc_media):
    h = auth(service)
    with httpx.Client(base_url=service.url, headers=h, timeout=60) as http:
        # liveness probe of the original clients
        r = http.get("/easy/query", params={"code": str(uuid.uuid4())})
        assert r.status_code == 200 and r.json() == {"code": 10004, "success": True, "msg": "task not found",
                                                     "data": None}
        # audio uploaded first, then passed as audio_url
        with open(svc_media["audio"], "rb") as f:
            up = http.post("/upload", files={"file": ("speech.wav", f)}).json()
        assert up["code"] == 10000 and up["success"] is True
        audio_path = up["data"]["path"]
        assert Path(audio_path).is_file() and Path(audio_path).parent == service.compat_dir / "upload"
        empty = http.post("/upload", files={"file": ("empty.wav", b"")}).json()  # was accepted, refused at submit
        assert empty["code"] == 10002 and empty["success"] is False and "empty.wav is empty" in empty["msg"], empty
        code = str(uuid.uuid4())
        body = {"audio_url": audio_path, "video_url": svc_media["video"], "code": code, "pn": 1, "chaofen": 0,
                "watermark_switch": 0, "digital_auth": 0}
        r = http.post("/easy/submit", json=body)
        assert r.status_code == 200
        sub = r.json()
        assert sub["code"] == 10000 and sub["success"] is True and sub["data"]["code"] == code, sub
        seen = []
        deadline = time.monotonic() + 180
        while True:
            q = http.get("/easy/query", params={"code": code}).json()
            assert q["code"] == 10000 and q["success"] is True, q
            d = q["data"]
            assert d["code"] == code and d["status"] in (1, 2), q
            seen.append(d["progress"])
            if d["status"] == 2:
                break
            assert 0 <= d["progress"] < 100
            assert time.monotonic() < deadline, seen
            time.sleep(0.3)
        assert seen == sorted(seen) and seen[-1] == 100
        result = d["result"]
        assert result == str(service.compat_dir / "temp" / f"{code}-r.mp4")
        verify_mp4(result, svc_media["audio_seconds"])
        # clients that GET <server><data.result>
        served = http.get(result)
        assert served.status_code == 200 and served.content == Path(result).read_bytes()
        assert http.get("/etc/passwd").status_code == 404
        assert http.get(str(service.compat_dir / "temp" / "other-r.mp4")).status_code == 404
        # a query after completion keeps answering the same
        assert http.get("/easy/query", params={"code": code}).json() == q
        # resubmitting the same code with the same inputs is accepted; unsupported options noted
        r = http.post("/easy/submit", json={**body, "chaofen": 1, "extra_field": "x"}).json()
        assert r["code"] == 10000 and "chaofen" in r["msg"] and "extra_field" in r["msg"]
        # bad inputs: refused at submit (10002), never a hang
        for bad in ({**body, "code": str(uuid.uuid4()), "audio_url": "/etc/passwd"},
                    {**body, "code": str(uuid.uuid4()), "video_url": "http://10.0.0.1/v.mp4"},
                    {**body, "code": str(uuid.uuid4()), "audio_url": ""},
                    {**body, "code": "../../x"}):
            r = http.post("/easy/submit", json=bad).json()
            assert r["code"] == 10002 and r["success"] is False and r["msg"], (bad, r)
        r = http.post("/easy/submit", content=b"not json", headers={"content-type": "application/json"}).json()
        assert r["code"] == 10002


def test_compat_failed_job_reports_status_3(service, svc_media):
    """A job that fails after submit (no face in the template) is status 3 with the reason."""
    import numpy as np

    from cluster.media.encode import SegmentEncoder  # noqa: F401  (import check: encoder available)
    from cluster.synth import write_audio

    noface = service.input_root / "noface.mp4"
    if not noface.exists():
        import av

        with av.open(str(noface), "w") as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
            for i in range(25):
                frame = np.full((240, 320, 3), 40 + i, np.uint8)
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    code = str(uuid.uuid4())
    with httpx.Client(base_url=service.url, headers=auth(service), timeout=60) as http:
        r = http.post("/easy/submit", json={"audio_url": svc_media["audio"], "video_url": str(noface), "code": code,
                                            "pn": 0}).json()
        if r["code"] == 10002:  # refused at submit: also a truthful answer
            assert "face" in r["msg"]
            return
        assert r["code"] == 10000, r

        def done():
            q = http.get("/easy/query", params={"code": code}).json()
            return q if q["data"]["status"] != 1 else None

        q = wait_until(done, 120, 0.5, "compat failure")
        assert q["data"]["status"] == 3 and "no_face" in q["data"]["msg"], q
        assert write_audio  # noqa


# --- load ------------------------------------------------------------------------------------------------------
def test_20_concurrent_submissions(service, svc_media, tmp_path):
    """20 jobs at once, each with its own audio: all succeed, with distinct outputs of the right length."""
    from cluster.client import AsyncClient
    from cluster.synth import speech_like, write_audio

    lengths = [0.8 + 0.04 * i for i in range(20)]
    audios = [write_audio(str(tmp_path / f"a{i}.wav"), speech_like(s, seed=100 + i)) for i, s in enumerate(lengths)]

    async def run():
        async with AsyncClient(service.url, token=service.token, timeout=120) as c:
            jobs = await asyncio.gather(*(c.submit(a, svc_media["video"]) for a in audios))
            views = await asyncio.gather(*(j.wait(timeout=400, poll_s=1.0) for j in jobs))
            outs = await asyncio.gather(*(j.download(tmp_path / f"o{i}.mp4") for i, j in enumerate(jobs)))
            return jobs, views, outs

    jobs, views, outs = asyncio.run(run())
    assert len({j.id for j in jobs}) == 20
    assert all(v.state.value == "succeeded" for v in views)
    digests = set()
    for out, seconds, view in zip(outs, lengths, views):
        assert view.frames_total == expected_frames(seconds)
        verify_mp4(out, seconds)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 20


def test_sync_modes_output_lengths(service, svc_media, tmp_path):
    """Length mismatch: 1 s template (25 frames) against 1.2 s and 0.6 s audios."""
    from cluster.client import Client
    from cluster.media.ffmpeg import ffmpeg_binary
    from cluster.media.probe import probe
    from cluster.synth import speech_like, write_audio

    short = write_audio(str(tmp_path / "short.wav"), speech_like(0.6, seed=21))
    hifi = tmp_path / "stereo48k.wav"  # the output keeps the audio's own rate and channels in every mode
    subprocess.run([ffmpeg_binary(), "-v", "error", "-i", svc_media["audio"], "-ar", "48000", "-ac", "2", str(hifi)],
                   check=True, timeout=60)
    cases = [("cut_off", str(hifi), 25, 1.0), ("silence", short, 25, 1.0),
             ("remap", svc_media["audio"], 30, 1.2), ("silence", svc_media["audio"], 30, 1.2)]
    with Client(service.url, token=service.token) as c:
        jobs = [c.submit(audio, svc_media["video"], sync_mode=mode) for mode, audio, _, _ in cases]
        fine, coarse = (c.submit(svc_media["audio"], svc_media["video"], crf=crf) for crf in (12, 45))
        for job, (mode, _, frames, seconds) in zip(jobs, cases):
            view = job.wait(timeout=180)
            assert view.sync_mode == mode and view.frames_total == frames, (mode, view)
            out = job.download(tmp_path / f"{job.id}.mp4")
            verify_mp4(out, seconds, frames)
            if mode == "cut_off":  # it was a 16 kHz mono copy in cut_off and silence
                sound = probe(str(out)).audio
                assert (sound.sample_rate, sound.channels) == (48000, 2), sound
        # output quality: a lower crf gives a larger file of the same length
        assert fine.wait(timeout=180).output.size > 1.5 * coarse.wait(timeout=180).output.size


def test_avatars_and_batches(service, svc_media, tmp_path):
    """Prepare a template once, then a batch of audios against it, and a job by avatar_id."""
    from cluster.client import Client
    from cluster.synth import speech_like, write_audio

    h = auth(service)
    with httpx.Client(base_url=service.url, headers=h, timeout=120) as http:
        with open(svc_media["video"], "rb") as v:
            r = http.post("/v1/avatars", files={"video": ("face.mp4", v)})
        assert r.status_code == 201, r.text
        avatar = r.json()
        assert avatar["frames"] == 25 and (avatar["width"], avatar["height"]) == (320, 240)
        # a look at an avatar is not a use: retention still removes it when no job or session uses it
        # (listing renewed every avatar, so one was never removed while the page listed them)
        meta = service.storage_root / "avatars" / avatar["id"] / "avatar.json"
        long_ago = int(time.time()) - 3 * 86400
        os.utime(meta, (long_ago, long_ago))
        assert http.get(f"/v1/avatars/{avatar['id']}").json() == avatar
        assert avatar["id"] in [a["id"] for a in http.get("/v1/avatars").json()]
        assert meta.stat().st_mtime == long_ago
        nf = http.get("/v1/avatars/0123456789abcdef")
        assert nf.status_code == 404 and nf.json()["error"]["code"] == "avatar.not_found"
        # a file that is no video: the error names the client's file and field (it named the server's
        # stored copy, /.../inputs/<sha256>.mp4, with no field)
        bad = http.post("/v1/avatars", files={"video": ("my face.mp4", b"not a video at all" * 50)})
        error = bad.json()["error"]
        assert bad.status_code == 400 and error["field"] == "video" and "my face.mp4" in error["message"], error
        assert "/inputs/" not in error["message"], error
        # a photo is a template too: one frame, its size as a viewer sees it
        import av

        with av.open(svc_media["video"]) as container:
            still = next(container.decode(video=0)).to_image()
        photo = tmp_path / "portrait.jpg"
        still.save(photo, quality=92)
        with open(photo, "rb") as f:
            r = http.post("/v1/avatars", files={"video": ("portrait.jpg", f, "image/jpeg")})
        assert r.status_code == 201, r.text
        assert r.json()["frames"] == 1 and (r.json()["width"], r.json()["height"]) == (320, 240), r.json()
        audios = [write_audio(str(service.input_root / f"batch{i}.wav"), speech_like(0.8 + 0.2 * i, seed=40 + i))
                  for i in range(3)]
        r = http.post("/v1/batches", json={"id": "batch-1", "audios": audios, "avatar_id": avatar["id"]})
        assert r.status_code == 202, r.text
        batch = r.json()
        assert batch["id"] == "batch-1" and len(batch["jobs"]) == 3
        done = wait_until(lambda: (b := http.get("/v1/batches/batch-1").json())["state"] in ("succeeded", "failed")
                          and b, 240, 0.5, "batch")
        assert done["state"] == "succeeded" and done["counts"] == {"succeeded": 3} and done["progress"] == 1.0
        assert meta.stat().st_mtime > time.time() - 300  # the jobs used it: renewed
        for i, job in enumerate(done["jobs"]):
            assert job["batch_id"] == "batch-1" and job["frames_total"] == expected_frames(0.8 + 0.2 * i)
        too_many = http.post("/v1/batches", json={"audios": ["x"] * 101, "avatar_id": avatar["id"]})
        assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "audios"
        # more audios than the job queue ever holds (64 by default, under the batch bound of 100): bad input,
        # not "busy, retry later" (which no retry could ever get past)
        never = http.post("/v1/batches", json={"audios": ["x"] * 65, "avatar_id": avatar["id"]})
        assert never.status_code == 422 and "LIPSYNC_MAX_QUEUED_JOBS" in never.json()["error"]["message"], never.text
        # an audio that fails after others were accepted: the answer names them and how to go on
        missing = str(service.input_root / "no-such.wav")
        half = http.post("/v1/batches", json={"id": "batch-2", "audios": [audios[0], missing],
                                              "avatar_id": avatar["id"]})
        assert half.status_code == 400, half.text
        message = half.json()["error"]["message"]
        assert "its job batch-2--000 was accepted" in message and "no-such.wav" in message, message
        assert "(correct it and send the request again with id batch-2" in message, message
        assert half.json()["error"]["field"] == "audios", half.text
        # ...and the batch's view counts the audio that was refused: it read as its one job, "succeeded"
        def batch_2_settled():  # every job it has ended
            b = http.get("/v1/batches/batch-2").json()
            return all(j["state"] in ("succeeded", "failed", "cancelled") for j in b["jobs"]) and b

        partial = wait_until(batch_2_settled, 240, 0.5, "batch-2's first job")
        assert partial["counts"]["not_admitted"] == 1 and partial["state"] == "failed", partial
        assert partial["progress"] <= 0.5 and len(partial["jobs"]) == 1, partial
        # the same id with another number of audios is another batch
        other = http.post("/v1/batches", json={"id": "batch-2", "audios": [audios[0]], "avatar_id": avatar["id"]})
        assert other.status_code == 409 and other.json()["error"]["code"] == "job.conflict", other.text
        # an error about what the batch shares names that field, not `audios`
        unknown = http.post("/v1/batches", json={"audios": [audios[0]], "avatar_id": "0123456789abcdef"})
        assert unknown.status_code == 400 and unknown.json()["error"]["field"] == "avatar_id", unknown.text
        again = http.post("/v1/batches", json={"id": "batch-2", "audios": [audios[0], audios[1]],
                                               "avatar_id": avatar["id"]})
        assert again.status_code == 202 and len(again.json()["jobs"]) == 2, again.text
        done2 = wait_until(lambda: (b := http.get("/v1/batches/batch-2").json())["state"] in ("succeeded", "failed")
                           and b, 240, 0.5, "batch-2")
        assert done2["counts"] == {"succeeded": 2}, done2
        # a batch is cancelled as one (DELETE was a 405); a finished job of it is left as it is
        long_audios = [write_audio(str(service.input_root / f"long{i}.wav"), speech_like(6.0, seed=50 + i))
                       for i in range(2)]
        assert http.post("/v1/batches", json={"id": "batch-3", "audios": long_audios, "avatar_id": avatar["id"],
                                              "model": "latency:150"}).status_code == 202
        cancelled = http.delete("/v1/batches/batch-3")
        assert cancelled.status_code == 200 and cancelled.json()["counts"] == {"cancelled": 2}, cancelled.text
        assert cancelled.json()["state"] == "cancelled", cancelled.text  # asked for: not "failed"
        with Client(service.url, token=service.token) as c:  # the SDK's face of it
            assert c.cancel_batch("batch-2").counts == {"succeeded": 2}
            # local files (a laptop: no input roots): uploaded first through POST /v1/uploads, each once
            local = [tmp_path / "mine0.wav", tmp_path / "mine1.wav"]
            for i, path in enumerate(local):
                write_audio(str(path), speech_like(0.6 + 0.2 * i, seed=60 + i))
            batch = c.submit_batch([str(p) for p in local] + [str(local[0])], avatar=avatar["id"])
            done4 = wait_until(lambda: (b := c.batch(batch.id)).state.value in ("succeeded", "failed") and b, 240,
                               0.5, "a batch of local files")
            assert done4.counts == {"succeeded": 3}, done4
            assert [j.frames_total for j in done4.jobs] == [expected_frames(0.6), expected_frames(0.8),
                                                            expected_frames(0.6)]
            given = [j.inputs["audio"] for j in done4.jobs]  # named by the files uploaded, not by their refs
            assert given == ["mine0.wav", "mine1.wav", "mine0.wav"], given
        # the upload route itself: one `file` field, stored by content; anything else refused by its field
        stored = http.post("/v1/uploads", files={"file": ("take 1.wav", open(audios[0], "rb"))})
        assert stored.status_code == 201 and stored.json()["ref"].startswith("upload:"), stored.text
        assert stored.json()["name"] == "take 1.wav" and stored.json()["size"] == os.path.getsize(audios[0])
        for bad, status in (({"files": {"audio": ("a.wav", b"RIFF")}}, 400), ({"json": {"file": "x"}}, 415),
                            ({"files": {"file": ("empty.wav", b"")}}, 400)):
            refused = http.post("/v1/uploads", **bad)
            assert refused.status_code == status and refused.json()["error"]["field"] == "file", refused.text
        job = http.post("/v1/jobs", json={"audio": stored.json()["ref"], "avatar_id": avatar["id"]})
        assert job.status_code == 202, job.text  # a ref is an input, as a URL or a server path is
        nf = http.get("/v1/batches/no-such-batch")
        assert nf.status_code == 404 and nf.json()["error"]["code"] == "batch.not_found", nf.text
    with Client(service.url, token=service.token) as c:
        assert c.prepare_avatar(svc_media["video"]).id == avatar["id"]  # cached by content
        job = c.submit(svc_media["audio"], avatar=avatar["id"])
        view = job.wait(timeout=180)
        assert view.inputs == {"audio": Path(svc_media["audio"]).name, "avatar": avatar["name"],
                               "avatar_id": avatar["id"]}, view.inputs  # its name: the Jobs tab shows it
        assert avatar["name"], avatar
        verify_mp4(job.download(tmp_path / "by-avatar.mp4"), svc_media["audio_seconds"])
        assert view.frames_total == expected_frames(svc_media["audio_seconds"])


def test_a_batch_reads_as_its_jobs_are():
    """A batch whose jobs are still being prepared reads `preparing` (it read `rendering`)."""
    from cluster.schemas import JobState as S
    from service.routers.batches import batch_state

    assert batch_state([S.preparing, S.preparing]) == S.preparing
    assert batch_state([S.queued, S.preparing]) == S.preparing
    assert batch_state([S.queued, S.queued]) == S.queued
    assert batch_state([S.preparing, S.rendering]) == S.rendering
    assert batch_state([S.succeeded, S.queued]) == S.rendering  # one made its frames already
    assert batch_state([S.succeeded, S.succeeded]) == S.succeeded
    assert batch_state([S.succeeded, S.cancelled]) == S.cancelled  # a user's cancel is no failure
    assert batch_state([S.failed, S.cancelled]) == S.failed
