"""Durability and admission of the HTTP service: a bounded queue answers 429; SIGKILL of the whole
`lipsync serve` process group mid-job, a start on the same storage root, and the job finishes."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.service_process import ServiceProcess

pytestmark = pytest.mark.service


def test_queue_bound_then_kill_mid_job_and_resume(tmp_path_factory):
    from cluster.client import Client
    from cluster.synth import astronaut_template, speech_like, write_audio
    from tests.test_service import verify_mp4

    svc = ServiceProcess(tmp_path_factory.mktemp("svc-restart"), env={"LIPSYNC_MAX_QUEUED_JOBS": "1"})
    video = astronaut_template(str(svc.input_root / "face.mp4"), seconds=1.0, fps=25, size=(320, 240))
    seconds = 6.0
    audio = write_audio(str(svc.input_root / "long.wav"), speech_like(seconds, seed=5))
    svc.start()
    try:
        c = Client(svc.url, token=svc.token, retries=0)
        job = c.submit(audio, video, id="durable-1")
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
        view = c2.wait("durable-1", timeout=240)
        assert view.state.value == "succeeded", view
        out = c2.download("durable-1", tmp_path_factory.mktemp("out") / "durable.mp4")
        verify_mp4(out, seconds)
        # finished jobs stay queryable after a clean stop and a start
        assert svc.stop() == 0
        svc.start()
        assert Client(svc.url, token=svc.token).get("durable-1").state.value == "succeeded"
    finally:
        svc.cleanup()
