"""A bounded soak through the HTTP service (issue 12): 5 SDK client threads submit 50 short jobs in
bursts against a service with a queue bound of 4: the service answers 429 with Retry-After, the
SDK's retries absorb it, every job succeeds, none is lost or run twice to different outputs, and
the service's memory is reported (start, peak, end). The long form is `python -m bench soak`."""
from __future__ import annotations

import pytest

from tests.soak import run_soak

pytestmark = pytest.mark.service
pytest.importorskip("cluster.client", reason="the HTTP service (issue 7) is not in this tree yet")


@pytest.fixture(scope="module")
def bounded_service(tmp_path_factory):
    from tests.service_process import ServiceProcess

    svc = ServiceProcess(tmp_path_factory.mktemp("soak"),
                         env={"LIPSYNC_MAX_QUEUED_JOBS": "4", "LIPSYNC_RETRY_AFTER_S": "1"}).start()
    yield svc
    svc.cleanup()


def test_fifty_short_jobs_in_bursts_all_succeed_once(bounded_service, tmp_path):
    from cluster.synth import astronaut_template, speech_like, write_audio

    root = bounded_service.input_root
    video = astronaut_template(str(root / "face.mp4"), seconds=0.6, fps=25, size=(192, 144))
    inputs = {f"a{k}": (write_audio(str(root / f"s{k}.wav"), speech_like(0.2 + 0.08 * k, seed=70 + k)), video)
              for k in range(2)}
    report = run_soak(bounded_service, inputs, jobs=50, threads=5, burst=5, pause_s=0.5, prefix="soak",
                      work_dir=tmp_path, timeout_s=300)
    assert not report.errors, report.errors[:5]
    assert report.states == {"succeeded": 50} and report.listed == 50
    assert report.distinct_outputs == {"a0": 1, "a1": 1}  # same inputs, same bytes: nothing ran twice apart
    assert report.statuses.get(429, 0) > 0 and report.retry_after == ["1"], report.statuses
    assert report.rss_end < 1.25 * report.rss_start, report.summary()  # flat once warm


def test_a_sigterm_to_the_whole_process_group_stops_the_service_cleanly(bounded_service):
    """After the soak, the service is stopped as systemd and a terminal's job control stop it: the signal to
    every process of its group (its Ray's dashboard and monitors too, not only `lipsync serve`). It stops with
    status 0 and leaves no process of its session (Ray's driver shutdown, which waited 8 s on a Ray shutting
    down beside it, has a deadline now: `RAY_SHUTDOWN_BUDGET_S`)."""
    import os
    import signal
    import time

    import psutil

    svc = bounded_service
    session = os.getsid(svc.proc.pid)
    os.killpg(svc.proc.pid, signal.SIGTERM)
    rc = svc.proc.wait(timeout=60)
    log = svc.tail(4000)
    assert rc == 0 and "lipsync: stopped in" in log and "Traceback" not in log, log

    def left():
        out = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if os.getsid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(" ".join(p.info["cmdline"] or [])[:120])
            except (psutil.Error, OSError):
                continue
        return out

    deadline = time.monotonic() + 30
    while (remaining := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not remaining, remaining
    svc.proc = None  # stopped: the fixture's clean-up has nothing left to stop
