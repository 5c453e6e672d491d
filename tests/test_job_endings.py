"""Every job reaches a true terminal state: corrupt rows, abandoned runs, other owners' jobs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray

from cluster.jobstore import JobStore
from cluster.owners import identity_gone, process_identity
from cluster.schemas import JobState, RenderRequest
from tests.helpers import wait_until

pytestmark = pytest.mark.ray


def _dead_identity() -> str:
    """The identity of a real process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    identity = process_identity(proc.pid)
    proc.wait(timeout=30)
    assert identity_gone(identity)
    return identity


def test_manager_restart_ends_corrupt_and_abandoned_jobs_and_leaves_other_runs_alone(
        runtime, speech4_wav, astronaut_video, tmp_path):
    store = JobStore(runtime.settings.db_path)
    request = RenderRequest(audio=speech4_wav, video=astronaut_video, output=str(tmp_path / "old.mp4"))
    # A job left by a killed `lipsync render`, and one of a run that is still alive (this process).
    store.create("abandoned-job", request, owner=_dead_identity(), client=None)
    store.create("abandoned-rendering-job", request, owner=_dead_identity(), client=None)  # killed mid-render
    store.transition("abandoned-rendering-job", JobState.preparing)
    store.set_plan("abandoned-rendering-job", {"k": 1}, frames_total=100, chunks_total=4)
    store.transition("abandoned-rendering-job", JobState.rendering)
    store.create("other-live-run-job", request, owner=process_identity(), client=None)
    # One of our own jobs, whose stored row stops validating while it renders.
    # (both with an identity model of 60 ms a frame: still unfinished at the kill by construction; with the
    # built-in model they ended 1.6-1.9 s after the kill point, unloaded)
    job = runtime.submit(RenderRequest(audio=speech4_wav, video=astronaut_video, output=str(tmp_path / "c.mp4"),
                                       model="latency:60:96"))
    # And one whose stored plan stops validating: resuming it raises inside a state change.
    planned = runtime.submit(RenderRequest(audio=speech4_wav, video=astronaut_video, output=str(tmp_path / "p.mp4"),
                                           model="latency:60:96"))
    wait_until(lambda: runtime.status(job.id).state != JobState.queued, 120, what="the job to start")
    wait_until(lambda: store.plan(planned.id) is not None or runtime.status(planned.id).state.terminal, 180,
               what="the second job's plan")
    store._conn.execute("UPDATE jobs SET request = ? WHERE id = ?", ('{"audio": 5', job.id))
    store._conn.execute("UPDATE jobs SET plan = ? WHERE id = ?", ('{"job_id": 7}', planned.id))
    ray.kill(runtime.manager(), no_restart=False)  # the restarted manager resumes its own jobs only

    corrupt = runtime.wait(job.id, timeout=120)
    assert corrupt.state == JobState.failed and corrupt.request is None
    assert corrupt.error.code == "job.corrupt_record" and corrupt.error.cause, corrupt.error
    broken = runtime.wait(planned.id, timeout=120)
    assert broken.state == JobState.failed and broken.error.code == "render.failed", broken.error
    assert "validation" in (broken.error.cause or "").lower() and planned.id in broken.error.message
    abandoned = wait_until(lambda: (lambda st: st if st.state.terminal else None)(runtime.status("abandoned-job")),
                           60, what="the abandoned job to end")
    assert abandoned.state == JobState.failed and abandoned.error.code == "job.abandoned"
    assert abandoned.error.stage == "queued", abandoned.error
    mid_render = runtime.status("abandoned-rendering-job")  # the stage it had reached, not "admit"
    assert mid_render.error.code == "job.abandoned" and mid_render.error.stage == "render", mid_render.error
    assert not (tmp_path / "old.mp4").exists()
    other = runtime.status("other-live-run-job")
    assert other.state == JobState.queued  # not ours, and its run is alive: untouched
    store.end("other-live-run-job", JobState.cancelled)
    assert os.getpid()  # (this process is the "other run")
