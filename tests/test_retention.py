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
    # each periodic sweep reads only the jobs that came of age since the last one's cutoff (it read every finished
    # job, page by page re-sorted, each period: 53 s and 630 MB at 100k jobs)
    (s.dir("jobs") / "old-done" / "again").mkdir(parents=True)
    assert sweep(s, store, now=later, since=later - timedelta(days=1)) == []  # old-done ended before: not read
    assert sweep(s, store, now=later) == ["old-done"]


def test_record_retention_removes_old_finished_jobs_records_with_their_files_and_keeps_the_rest(tmp_path):
    """The job store kept every record for good (a soak: 2859 jobs, 14 MB, about 5 KB a job, 430 MB a day at its
    pace). `LIPSYNC_RECORD_RETENTION_DAYS` removes a finished job's record, and its files first, once it has been
    unchanged that long; never an unfinished job's, nor a recent one's; off by default."""
    from cluster.errors import JobNotFound

    s = Settings(storage_root=tmp_path / "st", record_retention_days=30)
    store = JobStore(s.db_path)
    for job_id in ("old-done", "old-running", "recent-done"):
        store.create(job_id, RenderRequest(audio="a.wav", video="v.mp4"))
        (s.dir("jobs") / job_id).mkdir(parents=True)
        store.transition(job_id, JobState.preparing)
    store.set_plan("old-done", {"k": 1}, frames_total=10, chunks_total=1)
    store.transition("old-done", JobState.rendering)
    store.transition("old-done", JobState.failed)
    store.transition("recent-done", JobState.cancelled)
    assert Settings(storage_root=tmp_path / "x").record_retention_days == 0  # off by default
    in_40_days = datetime.now(timezone.utc) + timedelta(days=40)
    assert sweep(s.model_copy(update={"record_retention_days": 0}), store, now=in_40_days) == []
    assert store.get("old-done").state == JobState.failed
    in_20_days = datetime.now(timezone.utc) + timedelta(days=20)
    sweep(s, store, now=in_20_days)  # (younger than the retention: kept)
    assert store.get("recent-done").state == JobState.cancelled
    store._conn.execute("UPDATE jobs SET updated_at = ? WHERE id = 'recent-done'",  # changed 10 days later
                        ((datetime.now(timezone.utc) + timedelta(days=15)).isoformat(),))
    sweep(s, store, now=in_40_days)
    for gone in ("old-done",):
        try:
            store.get(gone)
            raise AssertionError(f"{gone} kept")
        except JobNotFound:
            pass
        assert not (s.storage_root / "jobs" / gone).exists()
        assert not store._conn.execute("SELECT 1 FROM stages WHERE job_id = ?", (gone,)).fetchall()
    assert store.get("old-running").state == JobState.preparing  # unfinished: never
    assert store.get("recent-done").state == JobState.cancelled and (s.storage_root / "jobs" / "recent-done").exists()
    # its callback record goes with it (a job submitted again under the id found its callback taken as the old one's:
    # `add` keeps an existing record), and a retention shorter than a stop is remembered is refused
    import pytest
    from pydantic import ValidationError

    from cluster.callbacks import CallbackStore

    callbacks = CallbackStore(tmp_path / "callbacks.sqlite3")
    callbacks.add("recent-done", "http://receiver/hook")
    sweep(s, store, now=datetime.now(timezone.utc) + timedelta(days=50), callbacks=callbacks)
    assert callbacks.get("recent-done") is None and callbacks.add("recent-done", "http://receiver/other")
    with pytest.raises(ValidationError, match="shorter than 0.25"):
        Settings(storage_root=tmp_path / "x", record_retention_days=0.01)


def test_sweep_removes_ended_live_sessions_only(tmp_path):
    """An ended live session's directory (speech, segments, recording: hundreds of MB an hour) goes
    once its final view is older than the retention; a running one (no final view) never does."""
    import os
    import time

    from cluster.live.journal import SessionJournal

    s = Settings(storage_root=tmp_path / "st", retention_days=1)
    store = JobStore(s.db_path)
    for name in ("ended-long-ago", "running", "ended-now", "dead-long-ago", "dead-now"):
        d = s.dir("sessions") / name
        (d / "hls").mkdir(parents=True)
        (d / "audio.pcm").write_bytes(b"\0" * 100)
    for name in ("ended-long-ago", "ended-now"):
        (s.dir("sessions") / name / "final.json").write_text("{}")
    running = SessionJournal(s.dir("sessions") / "running")
    assert running.take()  # a process runs it (its lock held)
    long_ago = time.time() - 3 * 86400
    os.utime(s.dir("sessions") / "ended-long-ago" / "final.json", (long_ago, long_ago))
    for name in ("running", "dead-long-ago"):  # old speech: one still running, one whose actor died for good
        d = s.dir("sessions") / name
        for f in [d, *d.iterdir()]:
            os.utime(f, (long_ago, long_ago))
    sweep(s, store)
    assert sorted(p.name for p in s.dir("sessions").iterdir()) == ["dead-now", "ended-now", "running"]


def test_sweep_removes_what_nothing_refers_to_once_old(tmp_path):
    """Stored uploads, avatars with their templates, and job directories without a row grew for
    ever under retention; they go once unused for that long, never while an unfinished job or a
    running session uses them."""
    import json
    import os
    import time

    from cluster.live.journal import SessionJournal

    s = Settings(storage_root=tmp_path / "st", retention_days=1)
    store = JobStore(s.db_path)
    long_ago = time.time() - 3 * 86400

    def old(*paths: Path) -> None:
        for path in paths:
            for f in [path, *(path.rglob("*") if path.is_dir() else [])]:
                os.utime(f, (long_ago, long_ago))

    for name in ("old.wav", "new.wav"):
        (s.dir("inputs") / name).write_bytes(b"x")
    old(s.dir("inputs") / "old.wav")
    for avatar in ("a-unused", "a-queued-job", "a-session", "a-recent"):
        (s.dir("avatars") / avatar).mkdir()
        (s.dir("avatars") / avatar / "avatar.json").write_text("{}")
        (s.dir("templates") / avatar).mkdir()
        (s.dir("templates") / avatar / "template.mp4").write_bytes(b"t")
        if avatar != "a-recent":
            old(s.dir("avatars") / avatar, s.dir("templates") / avatar)
    (s.dir("templates") / "t-orphan").mkdir()
    old(s.dir("templates") / "t-orphan")
    store.create("queued", RenderRequest(audio="a.wav", avatar_id="a-queued-job"))
    session = s.dir("sessions") / "live"
    session.mkdir(parents=True)
    (session / "session.json").write_text(json.dumps({"avatar_id": "a-session"}))
    assert SessionJournal(session).take()
    for job_dir in ("no-row-old", "no-row-new", "queued"):
        (s.dir("jobs") / job_dir / "inputs").mkdir(parents=True)
    old(s.dir("jobs") / "no-row-old", s.dir("jobs") / "queued")
    sweep(s, store)
    assert sorted(p.name for p in s.dir("inputs").iterdir()) == ["new.wav"]
    assert sorted(p.name for p in s.dir("avatars").iterdir() if p.is_dir()) == ["a-queued-job", "a-recent",
                                                                                 "a-session"]
    assert sorted(p.name for p in s.dir("templates").iterdir()) == ["a-queued-job", "a-recent", "a-session"]
    assert sorted(p.name for p in s.dir("jobs").iterdir()) == ["no-row-new", "queued"]


def test_sweep_removes_other_versions_builtin_models_no_unfinished_job_was_planned_with(tmp_path):
    """An upgrade probe: each version writes its own built-in model file (~0.9 MB) and none was ever removed. Those
    of other versions go once old, unless an unfinished job was planned with one (it renders its remaining chunks
    with it); this version's own and custom models stay."""
    import os
    import time

    from cluster.models.builtin import builtin_model_file

    s = Settings(storage_root=tmp_path / "st", retention_days=1)
    store = JobStore(s.db_path)
    models = s.dir("models")
    current, custom = builtin_model_file(s, 256), models / "wav2lip.onnx"
    older, planned = models / "builtin-s256-00000000000000aa.onnx", models / "builtin-s96-00000000000000bb.onnx"
    recent = models / "builtin-s256-00000000000000cc.onnx"
    long_ago = time.time() - 3 * 86400
    for f in (current, custom, older, planned, recent):
        f.write_bytes(b"onnx")
        if f != recent:
            os.utime(f, (long_ago, long_ago))
    store.create("resumable", RenderRequest(audio="a.wav", video="v.mp4"))
    store.set_plan("resumable", {"model_file": str(planned)}, 10, 1)
    sweep(s, store)
    assert sorted(p.name for p in models.iterdir()) == sorted(f.name for f in (current, custom, planned, recent))


def test_an_avatar_in_use_is_renewed(tmp_path, astronaut_video):
    """Each use of an avatar renews it (its avatar.json's mtime): one used every day is never
    removed, however long ago it was prepared."""
    import os
    import time

    from cluster.faces.avatar import AVATAR_FILE, load_avatar, prepare_avatar

    s = Settings(storage_root=tmp_path / "st", retention_days=1)
    avatar = prepare_avatar(astronaut_video, s)
    meta = s.dir("avatars") / avatar.id / AVATAR_FILE
    long_ago = time.time() - 3 * 86400
    os.utime(meta, (long_ago, long_ago))
    load_avatar(avatar.id, s)
    assert meta.stat().st_mtime > time.time() - 60
    os.utime(meta, (long_ago, long_ago))
    assert prepare_avatar(astronaut_video, s).cached and meta.stat().st_mtime > time.time() - 60


def test_compat_uploads_kept_by_a_replica_expire(tmp_path, monkeypatch):
    """`POST /upload` files kept in a replica's temporary directory (no compat data directory,
    which retention would see) go after a day at most, at each upload."""
    import os
    import tempfile
    import time

    from service.backend import COMPAT_TMP_UPLOAD_TTL_S, Backend

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # not the machine's own /tmp
    (tmp_path / "tmp").mkdir()

    backend = Backend(Settings(storage_root=tmp_path / "st"), gateway=None)
    old, new = backend.upload_dir() / "old.wav", backend.upload_dir() / "new.wav"
    for f in (old, new):
        f.write_bytes(b"x")
    long_ago = time.time() - COMPAT_TMP_UPLOAD_TTL_S - 60
    os.utime(old, (long_ago, long_ago))
    assert backend.sweep_compat_uploads() == 1
    assert not old.exists() and new.exists()
    assert str(backend.upload_dir()).startswith(str(tmp_path))
    # another service of this user on the node (its own storage root) has its own directory: it neither
    # takes this one's uploads as inputs nor sweeps them (with a short retention it removed them)
    other = Backend(Settings(storage_root=tmp_path / "other", retention_days=0.0001), gateway=None)
    assert other.upload_dir() != backend.upload_dir()
    stored = backend.upload_dir() / ("ab" * 16 + ".wav")
    stored.write_bytes(b"x")
    os.utime(stored, (long_ago, long_ago))
    assert backend.compat_upload_path(str(stored)) == stored and other.compat_upload_path(str(stored)) is None
    other.sweep_compat_uploads()
    assert stored.exists()
    assert Backend(Settings(storage_root=tmp_path / "st"), gateway=None).upload_dir() == backend.upload_dir()
    # an upgrade probe: uploads of a version before per-service directories (up to 2 GiB each) were never removed
    legacy = backend.tmp_root.parent / "compat" / "upload"
    legacy.mkdir(parents=True)
    (legacy / "stale.wav").write_bytes(b"x")
    (legacy / "recent.wav").write_bytes(b"x")
    os.utime(legacy / "stale.wav", (long_ago, long_ago))
    backend.sweep_compat_uploads()
    assert not (legacy / "stale.wav").exists() and (legacy / "recent.wav").exists()
    assert backend.compat_upload_path(str(legacy / "recent.wav")) is None  # not another service's inputs


def test_compat_uploads_are_swept_between_uploads_too(tmp_path, monkeypatch):
    """They were swept only at the next upload: after a burst and none since, a probe found 82 files in the
    replica's temporary directory (outside the storage root) minutes past their time. The first upload starts a
    sweep now and then (a tenth of their time to live), on the replica's event loop, once."""
    import asyncio
    import os
    import tempfile
    import time

    import service.backend as backend_module
    from service.backend import Backend

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    backend = Backend(Settings(storage_root=tmp_path / "st", retention_days=20 / 86400), gateway=None)  # 20 s
    assert backend.compat_upload_ttl_s() == 20
    monkeypatch.setattr(backend_module, "COMPAT_SWEEP_MAX_PERIOD_S", 0.2)
    left = backend.upload_dir() / ("cd" * 16 + ".mp4")
    left.write_bytes(b"x")
    os.utime(left, (time.time() - 30, time.time() - 30))

    async def an_upload_then_none():
        backend.keep_sweeping_compat_uploads()
        first = backend._compat_sweeper
        backend.keep_sweeping_compat_uploads()  # (one sweeper)
        assert backend._compat_sweeper is first
        deadline = time.monotonic() + 10
        while left.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        first.cancel()

    asyncio.run(an_upload_then_none())
    assert not left.exists()


def test_a_sweep_against_a_store_replaced_under_it_removes_nothing(tmp_path):
    """A review: the sidecar's retention kept the store it opened at its start; a storage root restored from a
    backup under it was swept against the old, deleted store, and a job the new store has unfinished lost its
    files. A sweep against a store removed or replaced raises `service.storage_lost` and removes nothing."""
    import pytest

    from cluster.errors import StorageLost

    s = Settings(storage_root=tmp_path / "st", retention_days=1)
    store = JobStore(s.db_path)
    store.create("done", RenderRequest(audio="a.wav", video="v.mp4"))
    store.transition("done", JobState.preparing)
    store.transition("done", JobState.cancelled)
    s.db_path.unlink()
    restored = JobStore(s.db_path)  # the backup's store: the same job, still rendering there
    restored.create("done", RenderRequest(audio="a.wav", video="v.mp4"))
    (s.dir("jobs") / "done" / "segments").mkdir(parents=True)
    with pytest.raises(StorageLost):
        sweep(s, store, now=datetime.now(timezone.utc) + timedelta(days=2))
    assert (s.dir("jobs") / "done" / "segments").is_dir()


def test_a_store_that_refuses_its_work_is_not_swept_every_period(tmp_path, caplog):
    """A sidecar whose store is lost (its root deleted, the actor restarted by Ray) logged a traceback of
    `service.storage_lost` at every retention period for as long as it ran; it says so once and stops."""
    import asyncio
    import logging

    from cluster.retention import sweep_periodically

    s = Settings(storage_root=tmp_path / "gone", retention_days=1)
    lost = JobStore(tmp_path / "gone" / "jobs.sqlite3", must_exist=True)
    assert lost.refusal is not None
    with caplog.at_level(logging.ERROR, logger="lipsync.retention"):
        asyncio.run(asyncio.wait_for(sweep_periodically(s, lost), 5))  # returns: no loop left running
    said = [r for r in caplog.records if r.name == "lipsync.retention"]
    assert len(said) == 1 and "retention does not sweep" in said[0].getMessage() and not said[0].exc_info, said
    assert "storage" in said[0].getMessage()


def test_a_purge_removes_the_jobs_stored_uploads_unless_an_unfinished_job_uses_them(tmp_path):
    """A probe purged a job (`DELETE /v1/jobs/ID/files`, "its output, stream, inputs and working files") and its
    customer's speech stayed in `inputs/` with the name it came under, until retention judged it unused."""
    from cluster.inputs import UPLOAD_NAMES
    from cluster.retention import remove_job_files

    s = Settings(storage_root=tmp_path / "st")
    store = JobStore(s.db_path)
    shared, own = s.dir("inputs") / ("a" * 64 + ".wav"), s.dir("inputs") / ("b" * 64 + ".wav")
    names = s.storage_root / UPLOAD_NAMES
    names.mkdir(parents=True)
    for path in (shared, own):
        path.write_bytes(b"RIFF")
        (names / path.name).write_text("customer.wav")
    elsewhere = tmp_path / "a-server-file.wav"  # an input the service reads where it is: never removed
    elsewhere.write_bytes(b"RIFF")
    store.create("done", RenderRequest(audio=str(own), video=str(shared)))
    store.create("running", RenderRequest(audio=str(elsewhere), video=str(shared)))
    store.transition("done", JobState.preparing)
    store.transition("done", JobState.failed)
    store.transition("running", JobState.preparing)
    root = s.storage_root.resolve()
    assert remove_job_files(store.get("done"), root, store)
    assert not own.exists() and not (names / own.name).exists()
    assert shared.exists() and (names / shared.name).exists()  # the unfinished job's video
    store.transition("running", JobState.cancelled)
    assert remove_job_files(store.get("running"), root, store)
    assert not shared.exists() and elsewhere.exists()
    again = s.dir("inputs") / ("c" * 64 + ".wav")
    again.write_bytes(b"RIFF")
    store.create("retained", RenderRequest(audio=str(again)))
    store.transition("retained", JobState.preparing)
    store.transition("retained", JobState.failed)
    remove_job_files(store.get("retained"), root)  # retention's own call: stored uploads go by their last use
    assert again.exists()
