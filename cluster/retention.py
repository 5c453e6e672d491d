"""Retention: remove old outputs and temporary files, never a running job's.

`LIPSYNC_RETENTION_DAYS` (0: keep forever). A finished job (succeeded, failed, cancelled) whose
last change is older than that loses its working directory (inputs, segments, its HLS stream, mel features) and
its output file when that lies under the storage root; its row stays in the job table, so it
remains queryable. Files `POST /upload` stored in the compatibility data directory, and results
published there, are removed after the same time, and so is an ended live session's directory
(its speech, stream and recording; judged by its `final.json`). Unfinished jobs and running
sessions are never touched.
"""
from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cluster.config import Settings
from cluster.jobstore import JobStore
from cluster.schemas import JobState

log = logging.getLogger("lipsync.retention")


def sweep(settings: Settings, store: JobStore, now: datetime | None = None) -> list[str]:
    """Remove what retention allows; the ids of the jobs whose files were removed."""
    if settings.retention_days <= 0:
        return []
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(days=settings.retention_days)
    root = settings.storage_root.resolve()
    removed = []
    finished = [JobState.succeeded, JobState.failed, JobState.cancelled]
    offset = 0
    while True:
        page = store.list(finished, 500, offset)
        if not page:
            break
        offset += len(page)
        for st in page:
            if st.updated_at >= cutoff or not st.state.terminal:
                continue
            gone = False
            job_dir = root / "jobs" / st.id
            if job_dir.is_dir():
                shutil.rmtree(job_dir, ignore_errors=True)
                gone = True
            if st.output:
                out = Path(st.output).resolve()
                if out.is_relative_to(root) and out.is_file():
                    out.unlink(missing_ok=True)
                    gone = True
            if gone:
                removed.append(st.id)
    if settings.compat_data_dir is not None:
        limit = time.time() - settings.retention_days * 86400
        for sub in ("upload", "temp"):
            d = Path(settings.compat_data_dir) / sub
            for f in d.glob("*") if d.is_dir() else []:
                try:
                    if f.is_file() and f.stat().st_mtime < limit:
                        f.unlink()
                except OSError as e:
                    log.warning("retention: cannot remove %s: %s", f, e)
    sessions = settings.storage_root / "sessions"
    ended_sessions = 0
    for d in sessions.iterdir() if sessions.is_dir() else []:
        try:  # only an ended session has its final view; a running one is never touched
            ended = (d / "final.json").stat().st_mtime
        except OSError:
            continue
        if ended < cutoff.timestamp():
            shutil.rmtree(d, ignore_errors=True)
            ended_sessions += 1
    if removed or ended_sessions:
        log.info("retention removed the files of %d finished jobs and %d ended live sessions", len(removed),
                 ended_sessions)
    return removed
