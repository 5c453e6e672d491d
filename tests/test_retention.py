"""Retention removes old finished jobs' files, never an unfinished job's; rows stay queryable."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from cluster.config import Settings
from cluster.jobstore import JobStore
from cluster.retention import sweep
from cluster.schemas import JobState, RenderRequest


def test_sweep_keeps_running_jobs_and_recent_ones(tmp_path):
    s = Settings(storage_root=tmp_path / "st", retention_days=1, compat_data_dir=tmp_path / "compat")
    store = JobStore(s.db_path)
    for job_id in ("old-done", "old-running", "new-done"):
        store.create(job_id, RenderRequest(audio="a.wav", video="v.mp4"))
        (s.dir("jobs") / job_id / "segments").mkdir(parents=True)
        (s.dir("jobs") / job_id / "segments" / "00000.mp4").write_bytes(b"x")
    out = s.dir("outputs") / "old-done.mp4"
    out.write_bytes(b"mp4")
    for job_id in ("old-done", "new-done"):
        store.transition(job_id, JobState.preparing)
        store.transition(job_id, JobState.failed if job_id == "new-done" else JobState.cancelled,
                         output=str(out) if job_id == "old-done" else None)
    store.transition("old-running", JobState.preparing)
    outside = tmp_path / "user-output.mp4"
    outside.write_bytes(b"keep")
    later = datetime.now(timezone.utc) + timedelta(days=2)
    assert Settings(storage_root=tmp_path / "st").retention_days == 0  # off by default
    assert sweep(s.model_copy(update={"retention_days": 0}), store, now=later) == []
    removed = sweep(s, store, now=later)
    assert set(removed) == {"old-done", "new-done"}
    assert not (s.storage_root / "jobs" / "old-done").exists() and not out.exists()
    assert (s.storage_root / "jobs" / "old-running" / "segments" / "00000.mp4").exists()
    assert store.get("old-done").state == JobState.cancelled  # still queryable
    assert outside.exists()
    # a sweep "now" leaves jobs younger than the retention alone
    (s.dir("jobs") / "new-done2").mkdir()
    assert sweep(s, store) == []
    assert Path(s.storage_root / "jobs" / "old-running").exists()


def test_sweep_removes_ended_live_sessions_only(tmp_path):
    """An ended live session's directory (speech, segments, recording: hundreds of MB an hour) goes
    once its final view is older than the retention; a running one (no final view) never does."""
    import os
    import time

    s = Settings(storage_root=tmp_path / "st", retention_days=1)
    store = JobStore(s.db_path)
    for name in ("ended-long-ago", "running", "ended-now"):
        d = s.dir("sessions") / name
        (d / "hls").mkdir(parents=True)
        (d / "audio.pcm").write_bytes(b"\0" * 100)
    for name in ("ended-long-ago", "ended-now"):
        (s.dir("sessions") / name / "final.json").write_text("{}")
    long_ago = time.time() - 3 * 86400
    os.utime(s.dir("sessions") / "ended-long-ago" / "final.json", (long_ago, long_ago))
    os.utime(s.dir("sessions") / "running" / "audio.pcm", (long_ago, long_ago))  # old speech, still running
    sweep(s, store)
    assert sorted(p.name for p in s.dir("sessions").iterdir()) == ["ended-now", "running"]
