"""Durability and admission of the HTTP service: a bounded queue answers 429; SIGKILL of the whole
`lipsync serve` process group mid-job, a start on the same storage root, and the job finishes."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.service_process import ServiceProcess

pytestmark = pytest.mark.service


class Receiver:
    """A loopback HTTP server that records callback POSTs and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.posts: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_queue_bound_then_kill_mid_job_and_resume(tmp_path_factory):
    from cluster.callbacks import verify
    from cluster.client import Client
    from cluster.synth import astronaut_template, speech_like, write_audio
    from tests.test_service import verify_mp4

    # private URLs allowed here so that callbacks can reach the loopback receivers of this test
    svc = ServiceProcess(tmp_path_factory.mktemp("svc-restart"),
                         env={"LIPSYNC_MAX_QUEUED_JOBS": "1", "LIPSYNC_ALLOW_PRIVATE_URLS": "1",
                              "LIPSYNC_CALLBACK_ATTEMPTS": "3"})
    good, bad = Receiver(200), Receiver(500)
    video = astronaut_template(str(svc.input_root / "face.mp4"), seconds=1.0, fps=25, size=(320, 240))
    seconds = 3.0
    audio = write_audio(str(svc.input_root / "long.wav"), speech_like(seconds, seed=5))
    short = write_audio(str(svc.input_root / "short.wav"), speech_like(0.8, seed=6))
    svc.start()
    try:
        c = Client(svc.url, token=svc.token, retries=0)
        hdr = {"Authorization": f"Bearer {svc.token}"}
        # a compat job that finishes before the kill: its query must answer the same after the restart
        r = httpx.post(svc.url + "/easy/submit", json={"audio_url": short, "video_url": video, "code": "c-done",
                                                        "pn": 1}, headers=hdr, timeout=60).json()
        assert r["code"] == 10000, r
        c.wait("c-done", timeout=180)
        done_before = httpx.get(svc.url + "/easy/query", params={"code": "c-done"}, headers=hdr, timeout=30).json()
        assert done_before["data"]["status"] == 2, done_before
        # its HLS stream (every job has one, /easy too): the signed URL, the playlist and its segments
        watch = svc.url + c.get("c-done").watch_url
        hls_before = httpx.get(watch, timeout=30).text
        assert "#EXT-X-ENDLIST" in hls_before and "#EXTINF" in hls_before
        segments_before = {line: httpx.get(watch.replace("index.m3u8?", line.split("?")[0] + "?"), timeout=30).content
                           for line in hls_before.splitlines() if line and not line.startswith("#")}
        job = c.submit(audio, video, id="durable-1", callback_url=good.url)
        # the queue holds one unfinished job: the next submission is refused with 429 + Retry-After
        r = httpx.post(svc.url + "/v1/jobs", json={"audio": audio, "video": video},
                       headers={"Authorization": f"Bearer {svc.token}"}, timeout=30)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "service.busy" and int(r.headers["retry-after"]) >= 1
        q = httpx.post(svc.url + "/easy/submit", json={"audio_url": audio, "video_url": video, "code": "c-busy"},
                       headers={"Authorization": f"Bearer {svc.token}"}, timeout=30).json()
        assert q["code"] == 10001 and q["success"] is True
        # kill the whole service (Ray head and workers included) while the job renders
        deadline = time.monotonic() + 120
        while job.status().state.value in ("queued", "preparing"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert job.view.state.value == "rendering", job.view
        svc.kill()
        svc.start()
        c2 = Client(svc.url, token=svc.token, retries=8)
        after = httpx.get(svc.url + "/easy/query", params={"code": "c-done"}, headers=hdr, timeout=30).json()
        assert after == done_before
        # after the restart the same signed URL plays the same stream, byte for byte
        assert httpx.get(watch, timeout=30).text == hls_before
        for line, data in segments_before.items():
            assert httpx.get(watch.replace("index.m3u8?", line.split("?")[0] + "?"), timeout=30).content == data
        assert c2.get("c-done").state.value == "succeeded"
        view = c2.wait("durable-1", timeout=240)
        assert view.state.value == "succeeded", view
        out = c2.download("durable-1", tmp_path_factory.mktemp("out") / "durable.mp4")
        verify_mp4(out, seconds)
        # killed mid-render and resumed: its HLS stream still decodes to the final mp4, frame for frame
        from tests.test_hls import decode_video

        names = [line for line in httpx.get(f"{svc.url}/v1/jobs/durable-1/hls/index.m3u8", headers=hdr,
                                            timeout=30).text.splitlines() if line and not line.startswith("#")]
        whole = out.with_name("durable-hls.mp4")
        whole.write_bytes(b"".join(httpx.get(f"{svc.url}/v1/jobs/durable-1/hls/{n}", headers=hdr, timeout=30).content
                                   for n in ["init.mp4", *names]))
        assert decode_video(str(whole)) == decode_video(str(out))
        # the callback (registered before the kill) is delivered once, signed with the API token
        wait_for = time.monotonic() + 30
        while not good.posts and time.monotonic() < wait_for:
            time.sleep(0.2)
        assert len(good.posts) == 1
        headers, body = good.posts[0]
        assert verify(body, svc.token, headers["x-lipsync-signature"]) and headers["x-lipsync-job"] == "durable-1"
        assert json.loads(body)["state"] == "succeeded" and json.loads(body)["id"] == "durable-1"
        # a failing callback is retried and never changes the job's state
        other = c2.submit(short, video, id="cb-fails", callback_url=bad.url)
        assert c2.wait(other.id, timeout=240).state.value == "succeeded"
        wait_for = time.monotonic() + 30
        while len(bad.posts) < 3 and time.monotonic() < wait_for:
            time.sleep(0.2)
        assert len(bad.posts) == 3
        time.sleep(1.0)
        assert len(bad.posts) == 3 and c2.get("cb-fails").state.value == "succeeded"
        # SIGTERM stops the service cleanly (exit status 0)
        assert svc.stop() == 0
    finally:
        svc.cleanup()
        good.close()
        bad.close()


def test_sigterm_while_the_service_starts_stops_it_cleanly(tmp_path):
    """A SIGTERM that arrives once Ray is up but before the service is ready (a rollout, an
    impatient operator) stops it like any other: exit status 0, what was started taken down,
    not Ray's own handler aborting the process with a stack dump."""
    svc = ServiceProcess(tmp_path)
    try:
        svc.launch()
        deadline = time.monotonic() + 120
        while b"Started a local Ray instance" not in svc.log.read_bytes():
            assert svc.proc.poll() is None and time.monotonic() < deadline, svc.tail()
            time.sleep(0.05)
        time.sleep(0.5)  # past ray.init's return, well before the Serve app answers
        assert b"lipsync service ready" not in svc.log.read_bytes(), "the service was ready too soon for this test"
        rc = svc.stop(timeout=60)
        log = svc.tail(20000)
        assert rc == 0, log
        assert "lipsync: stopping the service" in log and "SIGTERM received" not in log, log
        assert "lipsync service ready" not in log, log
    finally:
        svc.cleanup()
