"""Retention: remove old outputs and temporary files, never a running job's.

`LIPSYNC_RETENTION_DAYS` (0: keep forever). A finished job (succeeded, failed, cancelled) whose
last change is older than that loses its working directory (inputs, segments, its HLS stream, mel features) and
its output file when that lies under the storage root; its row stays in the job table, so it
remains queryable. Files `POST /upload` stored in the compatibility data directory, and results
published there, are removed after the same time, and so is an ended live session's directory
(its speech, stream and recording; judged by its `final.json`), or one that no process runs
(its lock free) and nothing wrote to for that long (a session whose actor died for good).
What nothing refers to any more goes too once that old: job directories without a row (an
admission that failed half-way), stored uploads (`inputs/`, judged by their last use), and avatars
with their normalised templates unused for that long (`avatar.json`'s mtime, renewed at each use;
never one an unfinished job or a running session uses). Unfinished jobs and running sessions are
never touched.

`LIPSYNC_RECORD_RETENTION_DAYS` (0: keep forever) removes a finished job's record too, once unchanged for that
long (its files first): the job store otherwise grows by about 5 KB a job for good.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cluster.config import Settings
from cluster.errors import LipsyncError
from cluster.fsutil import remove_files_older_than
from cluster.jobstore import JobStore
from cluster.schemas import JobStatus

log = logging.getLogger("lipsync.retention")


async def sweep_periodically(settings: Settings, store: JobStore, callbacks=None) -> None:
    """`sweep` now and every hour, or every tenth of the retention period; a failed sweep is logged and the next one
    tries again. A store that refuses its work (lost, or of a newer format: `JobStore.refusal`) is said once and
    not swept: nothing would change until the service starts again (it logged a traceback every period)."""
    import asyncio

    if store.refusal is not None:
        log.error("retention does not sweep: %s", store.refusal.message)
        return
    days = min(d for d in (settings.retention_days, settings.record_retention_days) if d > 0)
    period = max(10.0, min(3600.0, days * 86400 / 10))  # not a busy loop for a tiny one
    since = None  # the jobs that ended before the last sweep's cutoff were swept by it (the first sweep: all)
    while True:
        try:
            now = datetime.now(timezone.utc)
            await asyncio.to_thread(sweep, settings, store, now, since, callbacks)
            since = now - timedelta(days=settings.retention_days)
        except LipsyncError as e:  # typed (a store removed or replaced since: `check_present`): said, without a trace
            log.error("retention sweep failed: %s", e.message)
        except Exception:  # logged; the next sweep tries again
            log.exception("retention sweep failed")
        await asyncio.sleep(period)


def sweep(settings: Settings, store: JobStore, now: datetime | None = None, since: datetime | None = None,
          callbacks=None) -> list[str]:
    """Remove what retention allows; the ids of the jobs whose files were removed. `since`: only the finished jobs
    whose last change is not older than that are looked at for their files (the last sweep's cutoff: each sweep
    reads the jobs that have come of age since, not every finished job); `callbacks` (a `CallbackStore`): the
    callback records of jobs whose record goes go with it."""
    if settings.retention_days <= 0 and settings.record_retention_days <= 0:
        return []
    store.check_present()  # a store removed or replaced (a root restored from a backup): not swept against it
    now = now or datetime.now(timezone.utc)
    forgotten = _forget_records(settings, store, now, callbacks) if settings.record_retention_days > 0 else 0
    if settings.retention_days <= 0:
        return []
    cutoff = now - timedelta(days=settings.retention_days)
    root = settings.storage_root.resolve()
    removed = []
    for st in _finished_between(store, since, cutoff):
        if remove_job_files(st, root):
            removed.append(st.id)
    if settings.compat_data_dir is not None:
        limit = time.time() - settings.retention_days * 86400
        for sub in ("upload", "temp"):
            remove_files_older_than(Path(settings.compat_data_dir) / sub, limit, log)
    ended_sessions, sessions_in_use = _sweep_sessions(settings.storage_root / "sessions", cutoff.timestamp())
    orphans = _sweep_unreferenced(settings, store, root, cutoff.timestamp(), sessions_in_use)
    if removed or ended_sessions or orphans:
        log.info("retention removed the files of %d finished jobs, %d ended live sessions and %d unused "
                 "inputs, avatars and orphaned job directories", len(removed), ended_sessions, orphans)
    if forgotten:
        log.info("retention removed the records of %d finished jobs (LIPSYNC_RECORD_RETENTION_DAYS)", forgotten)
    return removed


def _forget_records(settings: Settings, store: JobStore, now: datetime, callbacks=None) -> int:
    """Remove the records of finished jobs unchanged for `record_retention_days`, their files and stored uploads
    first (none is left that no record names), and their callback records (a job submitted again under the id
    would find its callback taken as the old one's). How many."""
    cutoff = now - timedelta(days=settings.record_retention_days)
    root = settings.storage_root.resolve()
    forgotten = 0
    for st in _finished_between(store, None, cutoff):  # (by key: the records removed shift no page)
        remove_job_files(st, root, store)
        if store.forget_finished(st.id, cutoff):
            forgotten += 1
            if callbacks is not None:
                callbacks.forget(st.id)
    return forgotten


def _finished_between(store: JobStore, after: datetime | None, before: datetime):
    """The finished jobs whose last change is older than `before` and not older than `after`, page by page."""
    start = None
    while page := store.finished_between(after, before, 500, start):
        yield from page
        last = page[-1]
        start = (last.updated_at.isoformat(), last.id)


def remove_job_files(st: JobStatus, root: Path, store: JobStore | None = None) -> bool:
    """Remove a finished job's files: its working directory (inputs, segments, HLS stream, mel features) and
    its output where that lies under the storage root `root` (resolved); its row stays. True when any
    was there. With `store` (a purge, asked for now), its stored uploads too (`inputs/`, and the names they came
    under) unless an unfinished job uses them: a purge left a customer's speech on disk until retention
    judged it unused (a probe); retention's own sweep removes stored uploads by their last use."""
    gone = False
    if store is not None and st.request is not None:
        gone = _remove_stored_inputs(st, root, store)
    job_dir = root / "jobs" / st.id
    if job_dir.is_dir():
        shutil.rmtree(job_dir, ignore_errors=True)
        gone = True
    if st.output:
        out = Path(st.output).resolve()
        if out.is_relative_to(root) and out.is_file():
            out.unlink(missing_ok=True)
            gone = True
    return gone


def _remove_stored_inputs(st: JobStatus, root: Path, store: JobStore) -> bool:
    """`remove_job_files`' removal of the job's stored uploads that no unfinished job uses."""
    from cluster.inputs import UPLOAD_NAMES

    stored = root / "inputs"
    mine = {Path(p).resolve() for p in (st.request.audio, st.request.video) if p}
    mine = {p for p in mine if p.parent == stored.resolve()}
    if not mine:
        return False
    for job_id in store.unfinished_ids():
        try:
            request = store.request(job_id)
        except LipsyncError:
            continue
        mine -= {Path(p).resolve() for p in (request.audio, request.video) if p}
    for path in mine:
        path.unlink(missing_ok=True)
        (root / UPLOAD_NAMES / path.name).unlink(missing_ok=True)
    return bool(mine)


def _newest_mtime(d: Path) -> float:
    """The latest change in a directory or the files directly in it."""
    newest = d.stat().st_mtime
    for f in d.iterdir():
        try:
            newest = max(newest, f.stat().st_mtime)
        except OSError:
            continue
    return newest


def _lock_held(path: Path) -> bool:
    """Whether a process holds the `flock` on `path` (a live session's `active.lock`)."""
    import fcntl

    try:
        with open(path, "rb") as f:  # no lock file: nobody holds it (and none is made here)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def _sweep_sessions(sessions: Path, cutoff: float) -> tuple[int, set[str]]:
    """Remove ended sessions' directories (final view older than `cutoff`), and those no process
    runs (lock free) that nothing wrote to since `cutoff` (an actor that died for good); (how many,
    the avatars the remaining ones use)."""
    import json

    from cluster.live.journal import FINAL_FILE, LOCK_FILE, SESSION_FILE

    removed, in_use = 0, set()
    for d in sessions.iterdir() if sessions.is_dir() else []:
        try:
            final = d / FINAL_FILE
            if final.exists():
                gone = final.stat().st_mtime < cutoff
            else:  # never ended: gone only when no process runs it and it is old
                gone = _newest_mtime(d) < cutoff and not _lock_held(d / LOCK_FILE)
        except OSError:
            continue
        if gone:
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
            continue
        try:
            in_use.add(json.loads((d / SESSION_FILE).read_text())["avatar_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return removed, in_use


def _sweep_unreferenced(settings: Settings, store: JobStore, root: Path, cutoff: float,
                        sessions_in_use: set[str]) -> int:
    """Remove what no job row, unfinished job or running session refers to and that is older than
    `cutoff`: job directories without a row, stored uploads, avatars with their templates."""
    from cluster.faces.avatar import AVATAR_FILE, _preparing

    removed = 0
    jobs = root / "jobs"
    for d in jobs.iterdir() if jobs.is_dir() else []:
        try:
            if _newest_mtime(d) >= cutoff or store.exists(d.name):
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)  # an admission that failed after it made the directory
        removed += 1
    removed += remove_files_older_than(root / "inputs", cutoff, log)  # stored uploads, by their last use
    remove_files_older_than(root / "upload-names", cutoff, log)  # their names (rewritten at each upload)
    # avatars (and their templates) that unfinished jobs or running sessions use stay, whatever their age
    in_use, models_in_use = set(sessions_in_use), set()
    for job_id in store.unfinished_ids():
        try:
            request = store.request(job_id)
            plan = store.plan(job_id) or {}
        except LipsyncError:
            continue
        in_use.update(x for x in (request.avatar_id, plan.get("avatar_id")) if x)
        models_in_use.add(plan.get("model_file") or "")
    removed += _sweep_old_builtin_models(settings.dir("models"), cutoff, models_in_use)
    avatars, templates = root / "avatars", root / "templates"
    for d in list(avatars.iterdir()) if avatars.is_dir() else []:
        if d.is_dir() and d.name.startswith(".removing-"):  # a sweep killed half-way
            shutil.rmtree(d, ignore_errors=True)
            continue
        if not d.is_dir() or d.name.startswith(".") or d.name in in_use:
            continue
        try:
            with _preparing(d.name, settings):  # not while a job prepares it (its lock file stays: a
                meta = d / AVATAR_FILE          # waiter holds that inode; unlinking it would split the lock)
                last_use = meta.stat().st_mtime if meta.exists() else _newest_mtime(d)
                if last_use >= cutoff:
                    continue
                # out of readers' sight at once (a rename), then removed: a job that reads it from now
                # on finds no avatar and prepares it again
                aside = avatars / f".removing-{d.name}"
                os.replace(d, aside)
                shutil.rmtree(aside, ignore_errors=True)
                shutil.rmtree(templates / d.name, ignore_errors=True)
                removed += 1
        except (OSError, LipsyncError) as e:
            log.warning("retention: cannot remove the avatar %s: %s", d.name, e)
    for d in templates.iterdir() if templates.is_dir() else []:  # a template whose avatar was never stored
        try:
            if d.name not in in_use and not (avatars / d.name).exists() and _newest_mtime(d) < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


def _sweep_old_builtin_models(models: Path, cutoff: float, in_use: set[str]) -> int:
    """Remove built-in model files of other versions (not this version's generator) that no unfinished job was
    planned with and that nothing used since `cutoff` (an upgrade probe found one more of ~0.9 MB per version, kept
    for ever). This version's own, and custom models, stay."""
    from cluster.models.builtin import generator_fingerprint

    removed = 0
    for f in models.glob("builtin-s*-*.onnx") if models.is_dir() else []:
        m = re.fullmatch(r"builtin-s(\d+)-([0-9a-f]+)\.onnx", f.name)
        try:
            if m is None or m.group(2) == generator_fingerprint(int(m.group(1))) or str(f) in in_use \
                    or f.stat().st_mtime >= cutoff:
                continue
            f.unlink()
            removed += 1
        except OSError as e:
            log.warning("retention: cannot remove the built-in model file %s: %s", f, e)
    return removed
