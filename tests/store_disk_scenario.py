"""The disk that holds the job store (SQLite, WAL) fills up while a job runs (run by
tests/test_jobstore.py inside `unshare --mount --map-root-user`, a small tmpfs as the storage root).

usage: python store_disk_scenario.py STORAGE_ROOT AUDIO VIDEO
Prints one JSON line: what each step raised or read.

The job is driven as the job manager drives it (cluster.render's steps, each state change written
to the store first); the disk fills between its chunks, so the chunk fails with `resource.disk`
and writing that end itself hits SQLITE_FULL.
"""
from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

from cluster.config import Settings
from cluster.errors import LipsyncError
from cluster.jobstore import JobStore
from cluster.models import load_model
from cluster.render import admit, finalize_job, prepare_job, render_chunk
from cluster.schemas import JobState, RenderRequest
from tests.disk_scenario import fill


def outcome(fn) -> dict:
    try:
        value = fn()
        return {"ok": True, "value": value if isinstance(value, (bool, int, str, type(None))) else repr(value)}
    except LipsyncError as e:
        return {"ok": False, "code": e.code, "type": type(e).__name__, "job_id": e.job_id, "message": e.message}
    except Exception as e:  # noqa: BLE001 - an untyped error is what the scenario looks for
        return {"ok": False, "code": None, "type": type(e).__name__, "message": str(e)}


def view(store: JobStore, job_id: str) -> dict:
    st = store.get(job_id)
    return {"state": st.state.value, "code": st.error.code if st.error else None}


def run_job(store: JobStore, job_id: str, request: RenderRequest, s: Settings, model, stop_after: int | None = None):
    """Create, prepare and render a job as the manager does; chunks [0, stop_after) only, when given."""
    store.create(job_id, request)
    store.transition(job_id, JobState.preparing)
    plan = prepare_job(job_id, admit(job_id, request, s), s, model_size=model.size)
    store.set_plan(job_id, plan.model_dump(mode="json"), plan.frames_total, len(plan.chunks))
    store.transition(job_id, JobState.rendering)
    for chunk in plan.chunks[:stop_after]:
        result = render_chunk(plan, chunk, model.generate, s)
        store.chunk_done(job_id, chunk.index, result.frames, result.segment)
    return plan


def main() -> None:
    root, audio, video = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    s = Settings(storage_root=root / "store", chunk_seconds=0.5, batch_size=8, disk_reserve_bytes=0)
    model = load_model("builtin", s)
    store = JobStore(s.db_path)
    report: dict = {}

    def request(name: str) -> RenderRequest:
        return RenderRequest(audio=audio, video=video, output=str(root / "out" / f"{name}.mp4"))

    # a job renders its first chunk; then the disk fills up
    plan = run_job(store, "running", request("running"), s, model, stop_after=1)
    ballast = fill(root)
    # writes until SQLite's WAL cannot grow either: a small write now fails with SQLITE_FULL
    for i in range(100_000):
        try:
            store.set_frames_done("running", i)
        except LipsyncError as e:
            report["write_on_full_disk"] = {"code": e.code, "type": type(e).__name__, "job_id": e.job_id}
            break
    # the next chunk fails on the full disk, and ending the job cannot be written either
    chunk = outcome(lambda: render_chunk(plan, plan.chunks[1], model.generate, s))
    report["chunk_on_full_disk"] = chunk
    from cluster.errors import DiskFull
    from cluster.schemas import ErrorInfo

    error = ErrorInfo(code=chunk.get("code") or DiskFull.code, message=chunk.get("message") or "", stage="render")
    report["end_on_full_disk"] = outcome(lambda: store.end("running", JobState.failed, error=error))
    report["pending_while_full"] = sorted(store.pending_ends())
    # the store keeps answering: the job's truthful end, lists, counts; a new job is refused, typed
    report["status_while_full"] = view(store, "running")
    report["failed_listed_while_full"] = [st.id for st in store.list([JobState.failed])]
    report["unfinished_while_full"] = store.unfinished_ids()
    report["counts_while_full"] = store.count_by_state()
    report["end_again_while_full"] = outcome(lambda: store.end("running", JobState.cancelled))
    report["create_while_full"] = outcome(lambda: store.create("new", request("new"))[1])
    # a store opened now (a restarted manager) takes the end kept off the root: the job reads as told, not resumed
    report["restart_view_while_full"] = view(JobStore(s.db_path), "running")

    # space again: the next read (a second after the last attempt) writes the pending end
    ballast.unlink()
    time.sleep(JobStore.FLUSH_EVERY_S + 0.1)
    report["status_after"] = view(store, "running")
    report["pending_after"] = sorted(store.pending_ends())
    report["restart_view_after"] = view(JobStore(s.db_path), "running")
    with sqlite3.connect(s.db_path) as conn:
        report["integrity"] = conn.execute("PRAGMA integrity_check").fetchone()[0]
    # and a new job runs to the end
    after = run_job(store, "after", request("after"), s, model)
    finalize_job(after, s)
    store.end("after", JobState.succeeded, output=after.output_path)
    report["after"] = view(JobStore(s.db_path), "after")
    report["after_output"] = Path(after.output_path).stat().st_size
    print(json.dumps(report))


if __name__ == "__main__":
    main()
