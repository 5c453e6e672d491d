"""The SQLite job table: durable, idempotent, forward-only states."""
from __future__ import annotations

import pytest

from cluster.errors import InputError, JobNotFound
from cluster.jobstore import InvalidTransition, JobStore
from cluster.schemas import ErrorInfo, JobState, RenderRequest
from tests.helpers import run_on_small_tmpfs, unshare_works

REQ = RenderRequest(audio="/a.wav", video="/v.mp4")


def test_state_survives_reopening(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    s = JobStore(db)
    s.create("j1", REQ)
    s.transition("j1", JobState.preparing)
    s.set_plan("j1", {"k": 1}, frames_total=100, chunks_total=4)
    s.transition("j1", JobState.rendering)
    s.chunk_done("j1", 0, 25, "/seg/0.mp4")
    s.chunk_done("j1", 2, 25, "/seg/2.mp4")
    s.close()
    s2 = JobStore(db)  # a restarted job manager sees exactly this
    st = s2.get("j1")
    assert st.state == JobState.rendering and st.frames_done == 50 and st.chunks_done == 2
    assert s2.done_chunks("j1") == {0: "/seg/0.mp4", 2: "/seg/2.mp4"}
    assert s2.plan("j1") == {"k": 1}
    assert [j.id for j in s2.unfinished()] == ["j1"]
    assert st.request == REQ


def test_create_is_idempotent(tmp_path):
    s = JobStore(tmp_path / "db")
    first, created = s.create("same", REQ)
    s.transition("same", JobState.preparing)
    again, created2 = s.create("same", RenderRequest(audio="/other.wav", video="/v.mp4"))
    assert created and not created2
    assert again.state == JobState.preparing and again.request == REQ


def test_states_only_move_forward(tmp_path):
    s = JobStore(tmp_path / "db")
    s.create("j", REQ)
    with pytest.raises(InvalidTransition):
        s.transition("j", JobState.finalizing)  # skipping preparing/rendering
    s.transition("j", JobState.preparing)
    s.transition("j", JobState.rendering)
    with pytest.raises(InvalidTransition):
        s.transition("j", JobState.preparing)  # rendering is left only forward
    err = ErrorInfo(code="render.chunk_failed", message="boom", stage="render", chunk=3, cause="x")
    st = s.transition("j", JobState.failed, error=err)
    assert st.error == err
    with pytest.raises(InvalidTransition):
        s.transition("j", JobState.succeeded)  # terminal is terminal
    assert s.unfinished() == []


def test_unknown_job_is_a_typed_error(tmp_path):
    s = JobStore(tmp_path / "db")
    with pytest.raises(JobNotFound):
        s.get("nope")


def test_list_filters_and_pages(tmp_path):
    s = JobStore(tmp_path / "db")
    for i in range(5):
        s.create(f"j{i}", REQ)
    s.transition("j1", JobState.cancelled)
    # newest first, as GET /v1/jobs promises and the web page's Jobs tab shows (it listed the oldest)
    assert [j.id for j in s.list([JobState.queued], limit=2)] == ["j4", "j3"]
    assert [j.id for j in s.list([JobState.queued], limit=2, offset=2)] == ["j2", "j0"]
    assert [j.id for j in s.list([JobState.cancelled])] == ["j1"]

    # a page after another by `before` (its last job): jobs submitted meanwhile do not shift it, as they
    # shift an offset (the next page repeated a job of the last one)
    first = s.list(limit=2)
    assert [j.id for j in first] == ["j4", "j3"]
    s.create("j5", REQ)
    assert [j.id for j in s.list(limit=2, offset=2)] == ["j3", "j2"]  # the offset repeats j3
    assert [j.id for j in s.list(limit=2, before=first[-1].id)] == ["j2", "j1"]
    assert [j.id for j in s.list([JobState.queued], before="j3")] == ["j2", "j0"]
    with pytest.raises(InputError, match="before"):
        s.list(before="nope")


@pytest.mark.skipif(not unshare_works(), reason="mount namespaces (unshare --mount) are not permitted here")
def test_the_disk_that_holds_the_job_store_fills_up(speech_wav, astronaut_video):
    """A real 12 MiB tmpfs as the storage root, SQLite on it, filled while a job renders: the
    chunk fails `resource.disk` and writing that end hits SQLITE_FULL; the job still reads as
    failed `resource.disk` (kept in memory), not as unfinished; writes fail typed (`DiskFull`),
    never as a raw sqlite3 error; once space is back the end is written, SQLite's integrity check
    passes, and a new job renders to the end."""
    r = run_on_small_tmpfs("store_disk_scenario.py", [speech_wav, astronaut_video], timeout=300)
    assert r["write_on_full_disk"] == {"code": "resource.disk", "type": "DiskFull", "job_id": "running"}
    assert r["chunk_on_full_disk"]["code"] == "resource.disk", r["chunk_on_full_disk"]
    assert r["end_on_full_disk"] == {"ok": True, "value": True}
    assert r["pending_while_full"] == ["running"]
    assert r["status_while_full"] == {"state": "failed", "code": "resource.disk"}
    assert r["failed_listed_while_full"] == ["running"] and r["unfinished_while_full"] == []
    assert r["counts_while_full"] == {"failed": 1}
    assert r["end_again_while_full"] == {"ok": True, "value": False}  # the first end wins
    assert r["create_while_full"]["code"] == "resource.disk" and r["create_while_full"]["type"] == "DiskFull"
    # a restart while the disk is still full reads the end as told (kept off the root), not a job to resume
    assert r["restart_view_while_full"] == {"state": "failed", "code": "resource.disk"}
    assert r["status_after"] == {"state": "failed", "code": "resource.disk"} and r["pending_after"] == []
    assert r["restart_view_after"] == {"state": "failed", "code": "resource.disk"}
    assert r["integrity"] == "ok"
    assert r["after"] == {"state": "succeeded", "code": None} and r["after_output"] > 0


def test_a_failed_commit_leaves_the_store_usable(tmp_path):
    """A COMMIT that fails (here: a deferred foreign-key violation) is rolled back, and the next
    write works (a connection left inside the failed transaction would refuse every later one)."""
    import sqlite3

    s = JobStore(tmp_path / "jobs.sqlite3")
    s.create("j1", REQ)
    with pytest.raises(sqlite3.IntegrityError):
        with s._tx() as c:
            c.execute("PRAGMA defer_foreign_keys=ON")
            c.execute("INSERT INTO chunks (job_id, idx, frames, segment) VALUES ('nope', 0, 1, 's')")
    assert not s._conn.in_transaction
    s.chunk_done("j1", 0, 25, "/seg/0.mp4")
    assert s.get("j1").chunks_done == 1


def test_an_end_the_store_cannot_write_yet_is_kept_and_written_later(tmp_path):
    """Another process holds the database's write lock past the busy timeout when a job ends: the
    end is not lost with an exception (the job would stay unfinished until a restart), it is the
    job's state at once and is written once the lock is free."""
    import sqlite3

    db = tmp_path / "jobs.sqlite3"
    s = JobStore(db, busy_timeout_s=0.2)
    s.create("j1", REQ)
    s.transition("j1", JobState.preparing)
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # e.g. a backup tool, or a stuck process on the same file
    try:
        assert s.end("j1", JobState.failed, error=ErrorInfo(code="render.failed", message="x")) is True
        assert s.get("j1").state == JobState.failed  # reported at once
        assert s.end("j1", JobState.succeeded) is False  # the first end wins
    finally:
        other.execute("ROLLBACK")
        other.close()
    s.create("j2", REQ)  # the next write writes the pending end first
    s.close()
    again = JobStore(db)
    assert again.get("j1").state == JobState.failed and again.get("j1").error.code == "render.failed"


def test_an_end_told_but_not_written_before_a_stop_is_kept_through_the_restart(tmp_path):
    """A probe: a job told `failed` because its end could not be written (its storage root gone read-only) was still
    `rendering` on disk; the service stopped before a write succeeded, the next start resumed it and it could end
    `succeeded` where its clients had been told `failed`. An end the store cannot write is kept off the storage
    root too (the user's state directory, a file of the store's own), and the next process to open the store takes
    it: the job reads as it was told from the first read on, is not resumed, and the end is written; the file of
    the process that is gone is removed. A file this version cannot read is said and skipped, never a store that
    cannot open; another user's is not read."""
    import json
    import sqlite3
    import subprocess
    import sys

    db, spill = tmp_path / "root" / "jobs.sqlite3", tmp_path / "state"
    s = JobStore(db, spill_dir=spill)
    for job_id in ("told", "running"):
        s.create(job_id, REQ)
        s.transition(job_id, JobState.preparing)
    s.close()
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # no write reaches the store (as on a root gone read-only)
    try:  # a service that tells the end, cannot write it, and stops
        said = subprocess.run([sys.executable, "-c", f"""
from cluster.jobstore import JobStore
from cluster.schemas import ErrorInfo, JobState
s = JobStore({str(db)!r}, busy_timeout_s=0.2, spill_dir={str(spill)!r})
print(s.end("told", JobState.failed, error=ErrorInfo(code="resource.disk", message="read-only")))
"""], capture_output=True, text=True, timeout=120)
        assert said.stdout.strip() == "True", said.stderr
    finally:
        other.execute("ROLLBACK")
        other.close()
    kept = list(spill.iterdir())
    assert len(kept) == 1 and json.loads(kept[0].read_text())["ends"]["told"]["state"] == "failed"
    import socket

    prefix = kept[0].name.split("-")[0]
    gone = f"embedded:{socket.gethostname()}:999999:1.00"  # a process of this host that no longer runs
    (spill / f"{prefix}-bad.json").write_text(json.dumps({"version": 1, "store": str(db.absolute()), "process": gone,
                                                          "ends": {"running": {"state": "archived"}}}))
    (spill / f"{prefix}-newer.json").write_text(json.dumps({"version": 2, "store": str(db.absolute()), "ends": {}}))
    (spill / f"{prefix}-odd.json").write_text(json.dumps({"version": 1, "store": str(db.absolute()), "process": 5,
                                                          "ends": {}}))  # (a review: it stopped the store opening)
    again = JobStore(db, spill_dir=spill)  # (the bad file said and skipped: it opens)
    assert again.get("told").state == JobState.failed and again.get("told").error.code == "resource.disk"
    assert [j for j, _, _ in again.unfinished_owners()] == ["running"]  # only the job still running is resumed
    again.close()
    assert [p.name for p in spill.iterdir()] == ["rejected"]  # the gone one's taken; the others moved aside: one
    # with an end it could not read (kept for a person, not removed with it), one of another shape, one odd
    assert sorted(p.name for p in (spill / "rejected").iterdir()) == [f"{prefix}-{n}.json" for n in ("bad", "newer",
                                                                                                    "odd")]
    plain = sqlite3.connect(str(db))
    assert plain.execute("SELECT state FROM jobs WHERE id = 'told'").fetchone()[0] == "failed"
    plain.close()


def test_a_job_of_a_store_from_before_owners_is_claimed_once(tmp_path):
    """A store written before jobs had owners: its unfinished jobs have none, and would wait for
    ever (no manager resumed them, none abandoned them, and they counted against the queue bound).
    The first manager up claims each; a second one does not."""
    import sqlite3

    db = tmp_path / "jobs.sqlite3"
    s = JobStore(db)
    s.create("legacy", REQ)
    s.create("owned", REQ, owner="cluster:a")
    s.close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE jobs SET owner = NULL, client = NULL WHERE id = 'legacy'")
    s = JobStore(db)
    assert ("legacy", None, None) in s.unfinished_owners()
    assert s.claim_unowned("legacy", "cluster:b")
    assert not s.claim_unowned("legacy", "cluster:c") and not s.claim_unowned("owned", "cluster:c")
    assert dict((i, o) for i, o, _ in s.unfinished_owners()) == {"legacy": "cluster:b", "owned": "cluster:a"}


def test_a_succeeded_job_tells_its_outputs_length_picture_and_rate(tmp_path):
    """From the plan the finalise step verified the file against: a 321x241 template renders 320x240
    (even, for 4:2:0), and the job says so; a job that did not succeed tells none of it, also while
    its end waits for the database's lock."""
    import sqlite3

    db = tmp_path / "jobs.sqlite3"
    s = JobStore(db, busy_timeout_s=0.2)
    plan = {"width": 320, "height": 240, "fps_num": 30000, "fps_den": 1001, "frames_total": 90}
    for job_id in ("ok", "failed", "pending"):
        s.create(job_id, REQ)
        s.transition(job_id, JobState.preparing)
        s.set_plan(job_id, plan, frames_total=90, chunks_total=1)
    assert s.get("ok").output_width is None  # not before the end
    s.end("ok", JobState.succeeded, output="/out/ok.mp4")
    s.end("failed", JobState.failed, error=ErrorInfo(code="render.failed", message="x"))
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        s.end("pending", JobState.succeeded, output="/out/p.mp4")  # kept in memory: the lock is taken
        pending = s.get("pending")
    finally:
        other.execute("ROLLBACK")
        other.close()
    for st in (s.get("ok"), pending):
        assert (st.output_width, st.output_height, st.output_fps, st.output_seconds) == (320, 240, 29.97, 3.003)
    failed = s.get("failed")
    assert (failed.output_width, failed.output_height, failed.output_fps, failed.output_seconds) == (None,) * 4


def test_who_runs_an_unfinished_job(tmp_path):
    """`runner_of`: the owner of a job not yet ended (its client for a job admitted before owners), else None."""
    s = JobStore(tmp_path / "jobs.sqlite3")
    s.create("mine", REQ, owner="cluster:a", client="embedded:h:1:2")
    s.create("old", REQ, client="embedded:h:1:2")
    s.create("ended", REQ, owner="cluster:a")
    s.end("ended", JobState.cancelled)
    assert s.runner_of("mine") == "cluster:a" and s.runner_of("old") == "embedded:h:1:2"
    assert s.runner_of("ended") is None and s.runner_of("nowhere") is None


def test_a_store_moved_to_another_root_is_told(tmp_path):
    """Rows name their files by absolute path under the root they were written in: a copied or restored root
    served under another path read its results as removed (or served them from the old place). The root is
    recorded, and a store read elsewhere says so; a store of before the record is judged by its inputs."""
    import shutil
    import sqlite3

    from cluster.jobstore import storage_root_problem

    old, new = tmp_path / "old", tmp_path / "new"
    s = JobStore(old / "jobs.sqlite3")
    s.create("j1", RenderRequest(audio=str(old / "jobs" / "j1" / "inputs" / "audio.wav"), video="/v.mp4"))
    s.close()
    assert storage_root_problem(old / "jobs.sqlite3") is None
    shutil.copytree(old, new)
    said = storage_root_problem(new / "jobs.sqlite3")
    assert said and f"written at {old}" in said and f"symlink {old} -> {new}" in said, said
    conn = sqlite3.connect(new / "jobs.sqlite3")
    conn.execute("DROP TABLE meta")  # a store of before the record
    conn.commit()
    conn.close()
    said = storage_root_problem(new / "jobs.sqlite3")
    assert said and f"written at {old}" in said, said
    JobStore(new / "jobs.sqlite3").close()  # opened: the root its rows say is recorded, not the one it is in
    assert storage_root_problem(new / "jobs.sqlite3") == said
    shutil.rmtree(old)
    old.symlink_to(new)  # the old path made a link to the new place, as the message says: served there
    assert storage_root_problem(old / "jobs.sqlite3") is None
    assert storage_root_problem(new / "jobs.sqlite3") is None  # (the same directory, under its new name too)
    assert storage_root_problem(tmp_path / "none" / "jobs.sqlite3") is None  # a new root


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_store_whose_file_was_removed_or_replaced_takes_no_more_writes(tmp_path, how):
    """A probe deleted the storage root under a running service: its store went on writing to the unlinked file,
    admitted a job, called it succeeded, and a restart lost both (a second service took the same root meanwhile).
    A store whose path no longer names the file it opened refuses every write (`service.storage_lost`); an end it
    cannot write is kept and reported as any unwritable end is."""
    import shutil

    from cluster.errors import StorageLost

    root = tmp_path / "root"
    s = JobStore(root / "jobs.sqlite3")
    s.create("running", REQ)
    s.check_present()
    shutil.rmtree(root)
    if how == "replaced":  # a second service's new store at the same path
        JobStore(root / "jobs.sqlite3").close()
    with pytest.raises(StorageLost, match=f"was {how} while this service ran") as e:
        s.create("new", REQ)
    assert e.value.code == "service.storage_lost"
    with pytest.raises(StorageLost):
        s.check_present()
    assert s.end("running", JobState.failed, error=ErrorInfo(code="x", message="y")) is True
    assert s.get("running").state == JobState.failed  # kept in memory, said truthfully
    s.get("running")  # a read retries the pending end: not into the lost store (a review: it wrote it there)
    assert "running" in s._pending


def test_a_store_that_cannot_be_looked_at_refuses_writes_and_still_ends_its_jobs(tmp_path, monkeypatch):
    """A review: a stat that failed otherwise than "not found" (a stale NFS handle: ESTALE, EIO) raised a bare
    OSError out of every write, `end` included, and the job's task died with its job unfinished for good. It is
    `StorageLost` now, and the end is kept as any unwritable end."""
    import errno
    import os as os_module

    from cluster import jobstore
    from cluster.errors import StorageLost

    s = JobStore(tmp_path / "jobs.sqlite3")
    s.create("running", REQ)
    real_stat = os_module.stat

    def stale(path, *args, **kwargs):
        if str(path) == str(s.path):
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(jobstore.os, "stat", stale)
    with pytest.raises(StorageLost, match="Stale file handle"):
        s.create("new", REQ)
    assert s.end("running", JobState.failed, error=ErrorInfo(code="x", message="y")) is True
    assert s.get("running").state == JobState.failed


def test_readiness_names_a_lost_store(tmp_path):
    """`/readyz` answered a bare "the job manager is not ready" (`service.not_ready`) for a store removed under
    the service, which no wait mends: it says `service.storage_lost` now (public: no path in it)."""
    import shutil

    from fastapi.testclient import TestClient

    from cluster.config import Settings
    from service.app import create_app

    root = tmp_path / "root"
    root.mkdir()
    store = JobStore(root / "jobs.sqlite3")

    class Manager:  # the job manager's `ready`: it checks its store first (actors/orchestrator.py)
        async def ready(self, timeout: float):
            store.check_present()
            return {"models": [{"health": "live"}], "compositors": [{"health": "live"}]}

    with TestClient(create_app(Settings(storage_root=tmp_path / "svc"), gateway=Manager())) as client:
        assert client.get("/readyz").status_code == 200
        shutil.rmtree(root)
        client.app.state.readyz = None  # past the probe cache
        r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "service.storage_lost", r.text
    assert str(root) not in r.text and "restarted" in r.json()["error"]["message"]


def test_a_restarted_process_whose_store_is_gone_takes_no_work(tmp_path):
    """A job manager that Ray restarted after its storage root was deleted opened a new, empty store there and
    took work as if its predecessor's jobs had never been. Opened as the store of a predecessor
    (`must_exist`, the manager's `was_current_actor_reconstructed`), a missing store is made nowhere: it lists
    nothing and refuses every write (`service.storage_lost`); a store that is there opens as always."""
    from cluster.errors import StorageLost

    root = tmp_path / "root"
    kept = JobStore(root / "jobs.sqlite3")
    kept.create("old", REQ)
    kept.close()
    again = JobStore(root / "jobs.sqlite3", must_exist=True)  # Ray restarted it; the root is there
    assert again.get("old") is not None
    again.check_present()
    again.close()

    import shutil

    shutil.rmtree(root)
    lost = JobStore(root / "jobs.sqlite3", must_exist=True)
    assert not root.exists()  # not made again
    assert lost.unfinished_owners() == []
    for read in (lambda: lost.get("old"), lambda: lost.list()):  # not "no such job": the store is what is gone
        with pytest.raises(StorageLost):
            read()
    with pytest.raises(StorageLost, match="was not there when this job manager was restarted") as e:
        lost.create("new", REQ)
    assert e.value.code == "service.storage_lost"
    with pytest.raises(StorageLost):
        lost.check_present()
    assert not root.exists()


def test_a_store_of_a_newer_format_is_refused_at_the_start(tmp_path):
    """An upgrade probe: a version served a store a newer one had written, without a word, and misread it (a purged
    job's result answered 500 `output.missing`). A store records its format; one of a higher format than this
    version reads is refused: at `lipsync serve`/`render`'s start (`storage_root_problem`: settings.invalid, exit
    2), and by the store itself wherever it is opened (a joined cluster's, a RayService's job manager): it takes no
    work, resumes nothing and answers `service.store_too_new`, and nothing is written to it."""
    import sqlite3

    from cluster.errors import StoreTooNew
    from cluster.jobstore import STORE_FORMAT, storage_root_problem, store_format

    db = tmp_path / "jobs.sqlite3"
    s = JobStore(db)
    s.create("newer", REQ)
    s.close()
    conn = sqlite3.connect(db)
    assert store_format(conn) == STORE_FORMAT
    conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(STORE_FORMAT + 1),))
    conn.commit()
    conn.close()
    said = storage_root_problem(db)
    assert said and f"store format {STORE_FORMAT + 1}; this version reads up to {STORE_FORMAT}" in said, said
    refused = JobStore(db)
    assert refused.unfinished_owners() == [] and refused.count_by_state() == {}
    from service.errors import http_status

    for act in (lambda: refused.get("newer"), lambda: refused.list(), lambda: refused.create("x", REQ),
                refused.check_present, lambda: refused.runner_of("newer"), lambda: refused.exists("newer"),
                lambda: refused.request("newer"), lambda: refused.plan("newer"),
                lambda: refused.end("newer", JobState.cancelled)):  # (a review: a cancel was told, and spilled)
        with pytest.raises(StoreTooNew) as e:
            act()
        assert e.value.code == "service.store_too_new" and http_status(e.value) == 503  # (was 500)
    assert refused.pending_ends() == {}
    refused.close()
    assert storage_root_problem(db) == said  # its format kept


def test_ends_taken_from_a_gone_process_are_not_dropped_when_they_cannot_be_kept(tmp_path, monkeypatch):
    """A review: a store that took a gone process's spilled end removed its file although it could neither write the
    end (the database locked) nor keep it in a file of its own (the state directory full): one more restart resumed
    a job its clients were told had failed. The file stays until the end is written or kept."""
    import json
    import socket
    import sqlite3

    from cluster import fsutil

    db, spill = tmp_path / "jobs.sqlite3", tmp_path / "state"
    s = JobStore(db, spill_dir=spill)
    s.create("told", REQ)
    s.close()
    spill.mkdir(mode=0o700)
    prefix = s._spill_prefix
    left = spill / f"{prefix}-gone.json"
    left.write_text(json.dumps({"version": 1, "store": str(db.absolute()),
                                "process": f"embedded:{socket.gethostname()}:999999:1.00",
                                "ends": {"told": {"state": "failed", "error": None, "output": None,
                                                  "at": "2026-12-07T10:00:00+00:00"}}}))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil, "write_atomic", full)
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        taker = JobStore(db, busy_timeout_s=0.2, spill_dir=spill)
        assert taker.get("told").state == JobState.failed  # reported as told
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert left.exists()  # neither written nor kept: not removed
    monkeypatch.undo()
    again = JobStore(db, spill_dir=spill)
    assert again.get("told").state == JobState.failed and not left.exists()
