"""The durable job table: SQLite on disk under the storage root.

Every state change is written (and committed) here before it is reported. The job manager
reloads unfinished jobs from this table after a restart; chunk rows remember which segments are
already rendered so that a resumed job re-renders only the rest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator, NamedTuple

from cluster.errors import DiskFull, InputError, JobNotFound, LipsyncError, StorageLost, StoreTooNew
from cluster.owners import process_identity
from cluster.schemas import TRANSITIONS, ErrorInfo, JobState, JobStatus, RenderRequest, StageTime, utcnow

#: The states' values as the job table stores them, ended and not
TERMINAL_STATES = tuple(s.value for s in JobState if s.terminal)
UNFINISHED_STATES = tuple(s.value for s in JobState if not s.terminal)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    request      TEXT NOT NULL,
    plan         TEXT,
    frames_done  INTEGER NOT NULL DEFAULT 0,
    frames_total INTEGER NOT NULL DEFAULT 0,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    output       TEXT,
    error        TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_state_updated ON jobs(state, updated_at);
CREATE TABLE IF NOT EXISTS chunks (
    job_id   TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx      INTEGER NOT NULL,
    frames   INTEGER NOT NULL,
    segment  TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS stages (
    job_id     TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    stage      TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at   TEXT,
    PRIMARY KEY (job_id, stage)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def recorded_storage_root(conn: sqlite3.Connection) -> str | None:
    """The storage root a job store's rows name their files under (jobs' inputs, plans, outputs; avatars
    beside it name theirs the same way): recorded in its `meta` table, or, in a store written before that
    was, read from a job's stored inputs (`<root>/jobs/<id>/inputs/...`); None where neither says."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'storage_root'").fetchone()
    except sqlite3.OperationalError:  # a store from before the table
        row = None
    if row is not None:
        return row[0]
    for job_id, raw in conn.execute("SELECT id, request FROM jobs ORDER BY created_at DESC LIMIT 50"):
        try:
            audio = json.loads(raw).get("audio") or ""
        except (ValueError, AttributeError):
            continue
        marker = f"/jobs/{job_id}/inputs/"
        if marker in audio:
            return audio.split(marker, 1)[0]
    return None


#: The shape of a spill file (`JobStore._save_spill_locked`): one of another is not read
SPILL_VERSION = 1
#: Beside them, the spill files a store could not read (another version's shape), kept for a person to look at
REJECTED_DIR = "rejected"

#: The job store's format: raised when a version writes what an older one would misread (it then refuses a
#: store of a higher format, `storage_root_problem`, rather than serve it wrong). Recorded in `meta`.
STORE_FORMAT = 1


def written_by_a_newer_version(written_in: int) -> str:
    """What is said of a store of a format above `STORE_FORMAT` (refused where it is opened, and at a start)."""
    return (f"was written by a newer lipsync-cluster (store format {written_in}; this version reads up to "
            f"{STORE_FORMAT}), whose jobs this one would misread")


def store_format(conn: sqlite3.Connection) -> int:
    """The format a job store was last written in (0: before formats were recorded)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except sqlite3.OperationalError:  # a store from before the table
        return 0
    try:
        return int(row[0]) if row is not None else 0
    except (TypeError, ValueError):
        return 0


def storage_root_problem(db_path: Path) -> str | None:
    """Why the job store at `db_path` cannot serve the storage root it is in: one whose rows name their
    files under another root (the root was moved or restored elsewhere: results read as removed, or were
    served from the old place, and retention never removed the copies); None when it can, or is new."""
    if not db_path.is_file():
        return None
    root = db_path.parent
    try:
        conn = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True, timeout=5)  # (escaped: # ? %)
        try:
            recorded, written_in = recorded_storage_root(conn), store_format(conn)
        finally:
            conn.close()
    except sqlite3.Error as e:  # a store this process cannot read is said where it is opened
        log.debug("cannot read the storage root recorded in %s: %r", db_path, e)
        return None
    if written_in > STORE_FORMAT:
        return f"its job store {written_by_a_newer_version(written_in)}: serve it with that version or a later one"
    if recorded is None or Path(recorded) == root or _same_directory(Path(recorded), root):
        return None
    return (f"its job store was written at {recorded}, whose path its jobs and avatars name their files by: serve "
            f"it there (after a move, a symlink {recorded} -> {root} will do and LIPSYNC_STORAGE_ROOT={recorded}), or "
            f"start with an empty storage root")


def _same_directory(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False

log = logging.getLogger("lipsync.jobstore")

# Columns added after the first release: added to an existing database when it is opened.
_ADDED_COLUMNS = {"owner": "TEXT", "client": "TEXT", "request_key": "TEXT"}


class InvalidTransition(LipsyncError):
    code = "job.invalid_transition"


class JobCorrupt(LipsyncError):
    """A stored job row that no longer validates (edited, or written by another version)."""
    code = "job.corrupt_record"
    retryable = False


OUTPUT_FACTS = ("output_seconds", "output_width", "output_height", "output_fps")


def _output_facts(row: sqlite3.Row) -> dict:
    """A succeeded job's output as its stored plan made it (the finalise step verified the file against
    it): its length (frames at the template's rate), its picture size and rate; nothing for any other
    state (the figures of a plan that did not finish describe no file)."""
    if row["state"] != JobState.succeeded.value:
        return {}
    try:
        plan = json.loads(row["plan"] or "null")
        fps = plan["fps_num"] / plan["fps_den"]
        return {"output_seconds": round(plan["frames_total"] / fps, 3), "output_width": int(plan["width"]),
                "output_height": int(plan["height"]), "output_fps": round(fps, 3)}
    except (ValueError, TypeError, KeyError, ZeroDivisionError):
        return {}


def _request_or_none(raw: str) -> RenderRequest | None:
    """A status must be readable even when its stored request is not (the job then fails)."""
    try:
        return RenderRequest.model_validate_json(raw)
    except ValueError:
        return None


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _is_full(exc: BaseException) -> bool:
    """SQLITE_FULL: the disk that holds the database (or its WAL) has no room for the write."""
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc).lower())


class PendingEnd(NamedTuple):
    """A terminal state that could not be written (the disk was full): reported as the job's state
    from memory and written as soon as a write succeeds again."""
    state: JobState
    error: ErrorInfo | None
    output: str | None
    at: str

    def to_json(self) -> dict:
        return {"state": self.state.value, "error": self.error.model_dump(mode="json") if self.error else None,
                "output": self.output, "at": self.at}

    @classmethod
    def from_json(cls, d: dict) -> "PendingEnd":
        from datetime import datetime

        at = datetime.fromisoformat(d["at"]).isoformat()  # (a time a row's updated_at can hold, or ValueError)
        output = d.get("output")
        if output is not None and not isinstance(output, str):
            raise ValueError(f"output {output!r} is not a path")
        return cls(JobState(d["state"]), ErrorInfo.model_validate(d["error"]) if d.get("error") else None, output, at)


def default_spill_dir() -> Path:
    """Where ends the store cannot write are kept meanwhile: off the storage root (whose disk is the one
    that refused them), in this user's state directory (`$XDG_STATE_HOME`, else ~/.local/state), which
    outlives a reboot."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "lipsync" / "pending-ends"


class JobStore:
    """A small, thread-safe facade over one SQLite file (WAL mode, busy timeout).

    A full disk: a write that hits SQLITE_FULL raises `DiskFull` (`resource.disk`), its
    transaction rolled back, the store usable as before. A terminal state that cannot be written
    (`end`) is kept in memory and reported as the job's state (`get`, `list`, ...) until it is
    written: at the next write, or a read at least a second after the last attempt, once space is
    back. Such ends are also kept off the storage root (`default_spill_dir`): a process that stops before
    they are written leaves them there, and the next one to open the store reports and writes them, rather
    than resuming a job its clients were told had ended."""

    FLUSH_EVERY_S = 1.0

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0, must_exist: bool = False,
                 spill_dir: str | Path | None = None) -> None:
        """`must_exist`: a store this process's predecessor kept (a job manager Ray restarted). Where it is
        gone (its storage root deleted, or not on this node), this store holds nothing and refuses to
        take work (`check_present`: `StorageLost`), where a new, empty one made in its place would have
        answered as if the predecessor's jobs had never been."""
        self.path = Path(path)
        # the ends it cannot write, also kept off the storage root (a file of this process's): a process that
        # stops before they are written leaves them there, and the next one to open this store takes them
        self._spill_dir = Path(spill_dir or default_spill_dir())
        self._spill_prefix = hashlib.sha256(str(self.path.absolute()).encode()).hexdigest()[:16]
        self._identity_of_process = process_identity()
        self._spill = self._spill_dir / f"{self._spill_prefix}-{uuid.uuid4().hex[:12]}.json"  # this store's own
        # why this store takes no work (None: it does): gone where a predecessor kept it, or of a newer format
        self.refusal: StorageLost | None = None
        missing = must_exist and not self.path.exists()
        if missing:
            self.refusal = StorageLost(
                f"the job store {self.path} was not there when this job manager was restarted: the store it kept "
                "is gone (its storage root deleted, or not on this node): it takes no work until the service is "
                "restarted on a storage root that holds its store", path=str(self.path))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: dict[str, PendingEnd] = {}
        self._flushed_at = 0.0
        self._conn = sqlite3.connect(":memory:" if missing else str(self.path), timeout=busy_timeout_s,
                                     check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        if (written_in := store_format(self._conn)) > STORE_FORMAT:  # before anything is written to it
            self.refusal = StoreTooNew(
                f"the job store {self.path} {written_by_a_newer_version(written_in)}: it takes no work; serve it with "
                f"that version or a later one", path=str(self.path))
            log.error("%s", self.refusal.message)
            self._identity = _identity(self.path)
            return
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        have = {r["name"] for r in self._conn.execute("PRAGMA table_info(jobs)").fetchall()}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in have:
                try:
                    self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as e:  # another process added it meanwhile
                    if "duplicate column" not in str(e):
                        raise
        if self._conn.execute("SELECT 1 FROM meta WHERE key = 'storage_root'").fetchone() is None:
            # a new store: its root; a store of before the table: the root its rows say, once
            root = recorded_storage_root(self._conn) or str(self.path.parent)
            try:
                self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('storage_root', ?)", (root,))
            except sqlite3.OperationalError as e:  # a full or read-only disk: recorded at a later open
                log.warning("the storage root of %s was not recorded: %s", self.path, e)
        if store_format(self._conn) < STORE_FORMAT:
            try:
                self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('format', ?)",
                                   (str(STORE_FORMAT),))
            except sqlite3.OperationalError as e:  # a full or read-only disk: recorded at a later open
                log.warning("the format of %s was not recorded: %s", self.path, e)

        if missing:
            log.error("the job store %s is gone: this restarted process takes no work until the service is "
                      "restarted on a storage root that holds its store (service.storage_lost)", self.path)
        self._identity = _identity(self.path)  # the file opened: `check_present` compares the path's with it
        if not missing:
            self._take_spilled()

    # --- ends kept off the storage root -------------------------------------------------------
    def _take_spilled(self) -> None:
        """Ends that other stores of this file told their clients but could not write (their spill files): pending
        here too (their jobs are not resumed, and read as they were told), and written now where they can be.
        The files of processes now gone are removed once their ends are this store's (its own file first); a
        file of a process that still runs is left to it. One this version cannot read (another shape, a bad
        entry, not this user's) is said and skipped."""
        from cluster.owners import identity_gone

        if not self._spill_dir.is_dir():
            return
        taken = []
        for f in sorted(self._spill_dir.glob(self._spill_prefix + "-*.json")):
            try:
                kept = self._read_spill(f)
                if kept is None or f == self._spill:
                    continue
                skipped = False
                with self._lock:
                    for job_id, d in kept["ends"].items():
                        try:
                            end = PendingEnd.from_json(d)
                        except (KeyError, TypeError, ValueError) as e:  # (a ValidationError is a ValueError)
                            log.error("the end kept for job %s in %s cannot be read (%s): skipped", job_id, f, e)
                            skipped = True
                            continue
                        row = self._conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                        if row is not None and not JobState(row["state"]).terminal and job_id not in self._pending:
                            self._pending[job_id] = end
                            log.warning("job %s: its end (%s), told before a restart but not written then, is kept",
                                        job_id, end.state.value)
                if skipped:  # (an end it could not read stays where a person can look at it)
                    self._reject(f)
                elif identity_gone(kept["process"]):  # its process is gone: its ends are this store's to keep
                    taken.append(f)
            except Exception:  # noqa: BLE001 - one file never stops the store from opening
                log.exception("the ends kept in %s could not be taken", f)
        if self._pending:
            with self._lock:  # what it took is this store's to write now: in its own file first
                kept_here = self._save_spill_locked()
                self._flush_locked()
            if not kept_here and self._pending:  # (neither kept nor written: the files stay for a later store)
                return
        for f in taken:  # (their ends written, kept in this store's file, or their jobs ended meanwhile)
            try:
                f.unlink(missing_ok=True)
            except OSError as e:  # (a read-only state directory: taken again, harmlessly, by a later store)
                log.warning("the ends kept in %s were taken but the file cannot be removed: %s", f, e)

    def _read_spill(self, f: Path) -> dict | None:
        """The content of spill file `f` when this user's, in this version's shape and of this store; else None."""
        import stat

        try:
            st = f.stat()
            folder = self._spill_dir.stat()
            if st.st_uid != os.getuid() or folder.st_uid != os.getuid() or folder.st_mode & (stat.S_IWGRP |
                                                                                              stat.S_IWOTH):
                log.error("the ends kept in %s are not this user's alone: not taken", f)
                return None
            kept = json.loads(f.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("the ends kept for %s in %s cannot be read: %s", self.path, f, e)
            return None
        if not isinstance(kept, dict) or kept.get("version") != SPILL_VERSION \
                or not isinstance(kept.get("ends"), dict) or not isinstance(kept.get("process"), str):
            log.error("the ends kept in %s are not of this version's shape: not taken", f)
            self._reject(f)
            return None
        return kept if kept.get("store") == str(self.path.absolute()) else None

    def _reject(self, f: Path) -> None:
        """Move spill file `f` to `REJECTED_DIR` beside it (said once: not read again at every open)."""
        try:
            (self._spill_dir / REJECTED_DIR).mkdir(mode=0o700, exist_ok=True)
            os.replace(f, self._spill_dir / REJECTED_DIR / f.name)
            log.error("%s moved to %s/ for a person to look at", f, REJECTED_DIR)
        except OSError as e:
            log.error("%s cannot be moved to %s/: %s", f, REJECTED_DIR, e)

    def _save_spill_locked(self) -> bool:
        """Write this store's pending ends off the store's disk (under the lock): its own file, private and
        synced; none pending: its file goes. False when it could not be written (said in the log)."""
        from cluster.fsutil import write_atomic

        try:
            if not self._pending:
                self._spill.unlink(missing_ok=True)
                return True
            self._spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self._spill, json.dumps({
                "version": SPILL_VERSION, "store": str(self.path.absolute()), "process": self._identity_of_process,
                "ends": {j: e.to_json() for j, e in self._pending.items()}}))
            return True
        except OSError as e:
            log.error("the ends the job store %s cannot write cannot be kept in %s either (%s): a restart before "
                      "they are written resumes their jobs", self.path, self._spill, e)
            return False

    def _refuse(self) -> None:
        """The store's refusal (`refusal`), raised: it takes no work, and reads nothing a caller could act on."""
        if self.refusal is not None:
            raise self.refusal

    def check_present(self) -> None:
        """`StorageLost` when the path no longer names the file this store opened (a storage root deleted or
        replaced while the service ran: its writes went to an unlinked file, the jobs it accepted answered
        until a restart lost them, and a second service took the same root)."""
        self._refuse()
        try:
            now = _identity(self.path)
        except OSError as e:  # a stale NFS handle, an I/O error, a root that became a file: not the store it was
            raise StorageLost(f"the job store {self.path} cannot be looked at while this service runs ({e}): it "
                              f"takes no work until it is restarted on a storage root that holds its store",
                              path=str(self.path), cause=repr(e)) from e
        if now != self._identity:
            raise StorageLost(f"the job store {self.path} was " + ("removed" if now is None else "replaced")
                              + " while this service ran (its storage root deleted or moved?): it takes no work "
                              "until it is restarted on a storage root that holds its store", path=str(self.path))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self, job_id: str | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any error, COMMIT's
        own included (a failed COMMIT must not leave the connection inside a transaction: every
        later BEGIN would fail); SQLITE_FULL becomes `DiskFull`. Pending ends are written first."""
        with self._lock:
            self.check_present()  # (a stat: what it would write must last)
            self._flush_locked()
            try:
                with self._raw_tx() as conn:
                    yield conn
            except sqlite3.OperationalError as e:
                if _is_full(e):
                    raise DiskFull(f"the job store {self.path} could not be written: the disk is full ({e})",
                                   job_id=job_id, path=str(self.path), cause=str(e)) from e
                raise

    @contextmanager
    def _raw_tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as e:  # SQLite may have rolled it back itself
                    log.warning("rollback of %s: %s", self.path, e)
            raise

    def _flush_locked(self) -> None:
        """Write the pending ends (under the lock); those that still do not fit stay pending."""
        if not self._pending:
            return
        self._flushed_at = time.monotonic()
        try:
            self.check_present()  # (into a store removed or replaced, a flush would be lost as well)
        except StorageLost:
            return
        try:
            self._write_pending_locked()
        finally:
            if not self._pending:
                self._save_spill_locked()

    def _write_pending_locked(self) -> None:
        for job_id, end in list(self._pending.items()):
            try:
                with self._raw_tx() as c:
                    self._write_end(c, job_id, end)
            except JobNotFound:  # deleted meanwhile (retention): nothing left to end
                del self._pending[job_id]
                continue
            except sqlite3.OperationalError as e:
                if not _is_full(e):
                    log.error("job %s: writing its pending end %s failed: %s", job_id, end.state.value, e)
                return
            del self._pending[job_id]
            log.warning("job %s: its end (%s) is written now that the disk has room", job_id, end.state.value)

    def _maybe_flush(self) -> None:
        """On reads: retry pending ends at most every FLUSH_EVERY_S (under the lock)."""
        if self._pending and time.monotonic() - self._flushed_at >= self.FLUSH_EVERY_S:
            self._flush_locked()

    @staticmethod
    def _write_end(c: sqlite3.Connection, job_id: str, end: PendingEnd) -> bool:
        row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}", job_id=job_id)
        if row["state"] in TERMINAL_STATES:
            return False
        c.execute("UPDATE jobs SET state = ?, error = COALESCE(?, error), output = COALESCE(?, output), "
                  "updated_at = ? WHERE id = ?",
                  (end.state.value, end.error.model_dump_json() if end.error else None, end.output, end.at, job_id))
        c.execute("UPDATE stages SET ended_at = ? WHERE job_id = ? AND ended_at IS NULL", (end.at, job_id))
        return True

    def pending_ends(self) -> dict[str, PendingEnd]:
        """Terminal states reported but not yet written (the disk was full)."""
        with self._lock:
            return dict(self._pending)

    # --- reading -------------------------------------------------------------------------
    def _row(self, conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}", job_id=job_id)
        return row

    def _status(self, conn: sqlite3.Connection, row: sqlite3.Row) -> JobStatus:
        st = self._status_on_disk(conn, row)
        end = self._pending.get(row["id"])
        if end is None:
            return st
        facts = _output_facts({**dict(row), "state": end.state.value})
        return st.model_copy(update={
            "state": end.state, "error": end.error or st.error, "output": end.output or st.output,
            "updated_at": end.at, **dict.fromkeys(OUTPUT_FACTS), **facts})

    def _status_on_disk(self, conn: sqlite3.Connection, row: sqlite3.Row) -> JobStatus:
        done = conn.execute("SELECT COUNT(*), COALESCE(SUM(frames), 0) FROM chunks WHERE job_id = ?",
                            (row["id"],)).fetchone()
        return JobStatus(
            id=row["id"], state=JobState(row["state"]),
            frames_done=max(int(row["frames_done"]), int(done[1])), frames_total=row["frames_total"],
            chunks_done=int(done[0]), chunks_total=row["chunks_total"],
            created_at=row["created_at"], updated_at=row["updated_at"], output=row["output"],
            **_output_facts(row),
            error=ErrorInfo.model_validate_json(row["error"]) if row["error"] else None,
            request=_request_or_none(row["request"]),
            stages=[StageTime(stage=r["stage"], started_at=r["started_at"], ended_at=r["ended_at"])
                    for r in conn.execute("SELECT * FROM stages WHERE job_id = ? ORDER BY started_at",
                                          (row["id"],)).fetchall()],
        )

    def get(self, job_id: str) -> JobStatus:
        self._refuse()  # (not "no such job": the job may well be in the store it cannot use)
        with self._lock:
            self._maybe_flush()
            return self._status(self._conn, self._row(self._conn, job_id))

    def exists(self, job_id: str) -> bool:
        self._refuse()
        with self._lock:
            return self._conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def list(self, states: list[JobState] | None = None, limit: int = 100, offset: int = 0,
             before: str | None = None) -> list[JobStatus]:
        """Newest first; `before`: only jobs older than that job (a page after the one it ended: new jobs
        submitted meanwhile do not shift it, as they shift an offset)."""
        self._refuse()
        with self._lock:
            after = None
            if before is not None:
                row = self._conn.execute("SELECT created_at FROM jobs WHERE id = ?", (before,)).fetchone()
                if row is None:
                    raise InputError(f"before: no job {before} (a page's `next_before` names a job of this "
                                     f"service)", path="before")
                after = (row["created_at"], before)
            self._maybe_flush()
            pending = bool(self._pending)
            wanted = set(states or [])
            if pending and states:  # a pending end's row still holds its unfinished state on disk
                states = [*states, *(s for s in JobState if not s.terminal and s not in wanted)]
            sql, args, where = "SELECT * FROM jobs", [], []
            if states:
                where.append(f"state IN ({','.join('?' * len(states))})")
                args += [s.value for s in states]
            if after is not None:
                where.append("(created_at < ? OR (created_at = ? AND id < ?))")
                args += [after[0], after[0], after[1]]
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY created_at DESC, id DESC"  # newest first (the API's and the page's order)
            if not pending:
                sql += " LIMIT ? OFFSET ?"
                args += [limit, offset]
            found = [self._status(self._conn, r) for r in self._conn.execute(sql, args).fetchall()]
        if pending:
            found = [st for st in found if not wanted or st.state in wanted][offset:offset + limit]
        return found

    def finished_between(self, after: datetime | None, before: datetime, limit: int = 500,
                         start: tuple[str, str] | None = None) -> list[JobStatus]:
        """Finished jobs whose last change is older than `before` and not older than `after`, oldest first, `limit`
        at most, from the key (updated_at, id) `start` on (exclusive): retention's pages, read by the index on
        (state, updated_at) (its pages by offset re-sorted every finished job, per page, every period: 53 s and
        630 MB a sweep at 100k jobs). A pending end's row is unfinished on disk: not listed."""
        self._refuse()
        sql = f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(TERMINAL_STATES))}) AND updated_at < ?"
        args: list = [*TERMINAL_STATES, before.isoformat()]
        if after is not None:
            sql += " AND updated_at >= ?"
            args.append(after.isoformat())
        if start is not None:
            sql += " AND (updated_at > ? OR (updated_at = ? AND id > ?))"
            args += [start[0], start[0], start[1]]
        sql += " ORDER BY updated_at, id LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
            return [self._status(self._conn, r) for r in rows]

    def unfinished_ids(self, owner: str | None = None) -> list[str]:
        """Ids of the jobs not yet terminal, of `owner` only when given (no validation: a row that
        no longer validates still gets resumed, and failed, rather than blocking every other job)."""
        return [job_id for job_id, job_owner, _ in self.unfinished_owners()
                if owner is None or job_owner == owner]

    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (for the jobs-by-state gauge; a read, so it answers on a
        full disk too)."""
        if self.refusal is not None:  # (not the counts of a store it cannot use)
            return {}
        with self._lock:
            counts = {state: n for state, n in self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
            for job_id, end in self._pending.items():
                row = self._conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is not None and row["state"] != end.state.value:
                    counts[row["state"]] -= 1
                    counts[end.state.value] = counts.get(end.state.value, 0) + 1
            return {state: n for state, n in counts.items() if n}

    def unfinished_owners(self) -> list[tuple[str, str | None, str | None]]:
        """(id, owner, client) of every job not yet terminal, oldest first (none from a store it cannot use)."""
        if self.refusal is not None:
            return []
        with self._lock:
            rows = self._conn.execute(f"SELECT id, owner, client FROM jobs WHERE state IN "
                                      f"({','.join('?' * len(UNFINISHED_STATES))}) ORDER BY created_at, id",
                                      UNFINISHED_STATES).fetchall()
            ended = set(self._pending)
        return [(r["id"], r["owner"], r["client"]) for r in rows if r["id"] not in ended]

    def runner_of(self, job_id: str) -> str | None:
        """Who runs the unfinished job `job_id`: its owner (or, for a job admitted before owners, its
        client); None when it has ended, does not exist or has neither."""
        self._refuse()
        with self._lock:
            if job_id in self._pending:
                return None
            row = self._conn.execute("SELECT state, owner, client FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or JobState(row["state"]).terminal:
            return None
        return row["owner"] or row["client"]

    def claim_unowned(self, job_id: str, owner: str) -> bool:
        """Make `owner` the owner of a job that has none (admitted before jobs had owners: a store
        of an older version); True when this call claimed it (one manager resumes it, not two)."""
        with self._tx(job_id) as c:
            return c.execute("UPDATE jobs SET owner = ? WHERE id = ? AND owner IS NULL AND client IS NULL",
                             (owner, job_id)).rowcount == 1

    def request_key(self, job_id: str) -> str | None:
        self._refuse()
        with self._lock:
            return self._row(self._conn, job_id)["request_key"]

    def job_writing_to(self, output: str) -> str | None:
        """The id of an unfinished job whose request names `output`, if any."""
        self._refuse()
        with self._lock:
            rows = self._conn.execute(f"SELECT id, request FROM jobs WHERE state IN "
                                      f"({','.join('?' * len(UNFINISHED_STATES))})", UNFINISHED_STATES).fetchall()
            ended = set(self._pending)
        for r in rows:
            if r["id"] in ended:
                continue
            try:
                if json.loads(r["request"]).get("output") == output:
                    return r["id"]
            except (ValueError, AttributeError):
                continue
        return None

    def unfinished(self) -> list[JobStatus]:
        # oldest first: resumed in the order they were admitted (`list` answers newest first)
        return self.list([s for s in JobState if not s.terminal], limit=1_000_000)[::-1]

    def request(self, job_id: str) -> RenderRequest:
        """The stored request, validated; `JobCorrupt` (with the validation error as cause) if it is not."""
        self._refuse()
        with self._lock:
            raw = self._row(self._conn, job_id)["request"]
        try:
            return RenderRequest.model_validate_json(raw)
        except ValueError as e:
            raise JobCorrupt(f"job {job_id}: its stored request no longer validates", job_id=job_id,
                             cause=str(e)[:2000]) from e

    def plan(self, job_id: str) -> dict | None:
        self._refuse()
        with self._lock:
            raw = self._row(self._conn, job_id)["plan"]
        return json.loads(raw) if raw else None

    def done_chunks(self, job_id: str) -> dict[int, str]:
        """Chunk index -> segment path of every chunk recorded as rendered."""
        self._refuse()
        with self._lock:
            rows = self._conn.execute("SELECT idx, segment FROM chunks WHERE job_id = ?", (job_id,)).fetchall()
        return {int(r["idx"]): r["segment"] for r in rows}

    # --- writing -------------------------------------------------------------------------
    def create(self, job_id: str, request: RenderRequest, *, owner: str | None = None, client: str | None = None,
               request_key: str | None = None, admitted_at=None) -> tuple[JobStatus, bool]:
        """Insert a queued job; idempotent: an existing id returns (that job, False).

        `owner`: the job manager deployment that runs it (and resumes it after a restart);
        `client`: who asked (an embedded run's process, whose death abandons the job);
        `request_key`: a digest of what was asked, to tell a resubmission from a conflict;
        `admitted_at`: when admission began (recorded as the `admit` stage, ending now)."""
        now = utcnow().isoformat()
        with self._tx(job_id) as c:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                return self._status(c, row), False
            c.execute("INSERT INTO jobs (id, state, request, created_at, updated_at, owner, client, request_key) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (job_id, JobState.queued.value, request.model_dump_json(), now, now, owner, client,
                       request_key))
            if admitted_at is not None:
                c.execute("INSERT INTO stages (job_id, stage, started_at, ended_at) VALUES (?, 'admit', ?, ?)",
                          (job_id, admitted_at.isoformat(), now))
            return self._status(c, self._row(c, job_id)), True

    def stage_started(self, job_id: str, stage: str) -> None:
        """Record that `stage` (re)starts now (a resumed stage keeps its first start)."""
        with self._tx(job_id) as c:
            c.execute("INSERT INTO stages (job_id, stage, started_at) VALUES (?, ?, ?) "
                      "ON CONFLICT(job_id, stage) DO UPDATE SET ended_at = NULL",
                      (job_id, stage, utcnow().isoformat()))

    def stage_ended(self, job_id: str, stage: str) -> None:
        with self._tx(job_id) as c:
            c.execute("UPDATE stages SET ended_at = ? WHERE job_id = ? AND stage = ? AND ended_at IS NULL",
                      (utcnow().isoformat(), job_id, stage))

    def transition(self, job_id: str, state: JobState, *, error: ErrorInfo | None = None,
                   output: str | None = None) -> JobStatus:
        """Move a job forward; refuses moves TRANSITIONS does not allow (e.g. out of a terminal state)."""
        with self._tx(job_id) as c:
            row = self._row(c, job_id)
            current = self._pending[job_id].state if job_id in self._pending else JobState(row["state"])
            if state != current and state not in TRANSITIONS[current]:
                raise InvalidTransition(f"job {job_id}: cannot move from {current.value} to {state.value}",
                                        job_id=job_id)
            c.execute("UPDATE jobs SET state = ?, error = COALESCE(?, error), output = COALESCE(?, output), "
                      "updated_at = ? WHERE id = ?",
                      (state.value, error.model_dump_json() if error else None, output,
                       utcnow().isoformat(), job_id))
            if state.terminal:  # a stage still open ends with the job
                c.execute("UPDATE stages SET ended_at = ? WHERE job_id = ? AND ended_at IS NULL",
                          (utcnow().isoformat(), job_id))
            return self._status(c, self._row(c, job_id))

    def end(self, job_id: str, state: JobState, *, error: ErrorInfo | None = None, output: str | None = None) -> bool:
        """Move a job to the terminal `state` unless it is terminal already (the first end wins);
        reads nothing but the state, so a row that no longer validates can still be ended.
        Returns whether this call ended it.

        On a full disk, or any other failed write (the database locked past its busy timeout, an
        I/O error), the end is kept in memory (`PendingEnd`), reported as the job's state and
        written once a write succeeds again: a job still ends, truthfully, when the store cannot
        record it (the caller never sees the job stay unfinished for a failed write)."""
        self._refuse()
        assert state.terminal
        end = PendingEnd(state, error, output, utcnow().isoformat())
        with self._lock:
            if job_id in self._pending:
                return False
        try:
            with self._tx(job_id) as c:
                return self._write_end(c, job_id, end)
        except (DiskFull, StorageLost, sqlite3.OperationalError, OSError) as e:
            with self._lock:
                try:
                    row = self._conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                except sqlite3.Error:  # the store cannot be read either (an I/O error): the end is kept all the same
                    row = {"state": None}
                if row is None:
                    raise JobNotFound(f"no job with id {job_id!r}", job_id=job_id) from e
                if row["state"] in TERMINAL_STATES or job_id in self._pending:
                    return False
                self._pending[job_id] = end
                self._save_spill_locked()
            why = "the disk is full" if isinstance(e, DiskFull) else "the job store is gone" \
                if isinstance(e, StorageLost) else "the write failed"
            log.error("job %s ended %s%s, but %s: the job store records it once a write succeeds (%s)",
                      job_id, state.value, f" ({error.code})" if error else "", why,
                      e.cause if isinstance(e, DiskFull) else e)
            return True

    def set_plan(self, job_id: str, plan: dict, frames_total: int, chunks_total: int) -> None:
        with self._tx(job_id) as c:
            self._row(c, job_id)
            c.execute("UPDATE jobs SET plan = ?, frames_total = ?, chunks_total = ?, updated_at = ? WHERE id = ?",
                      (json.dumps(plan), frames_total, chunks_total, utcnow().isoformat(), job_id))

    def chunk_done(self, job_id: str, idx: int, frames: int, segment: str) -> None:
        with self._tx(job_id) as c:
            c.execute("INSERT OR REPLACE INTO chunks (job_id, idx, frames, segment) VALUES (?, ?, ?, ?)",
                      (job_id, idx, frames, segment))
            c.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (utcnow().isoformat(), job_id))

    def forget_chunk(self, job_id: str, idx: int) -> None:
        with self._tx(job_id) as c:
            c.execute("DELETE FROM chunks WHERE job_id = ? AND idx = ?", (job_id, idx))

    def forget_finished(self, job_id: str, ended_before: datetime) -> bool:
        """Remove a finished job's record (its row, chunks and stage times) where its last change is older than
        `ended_before`: retention of records (`LIPSYNC_RECORD_RETENTION_DAYS`). An unfinished job, or one changed
        since, is kept. Whether it was removed."""
        with self._tx(job_id) as c:
            gone = c.execute(f"DELETE FROM jobs WHERE id = ? AND updated_at < ? AND state IN "
                             f"({', '.join('?' * len(TERMINAL_STATES))})",
                             (job_id, ended_before.isoformat(), *TERMINAL_STATES))
            if gone.rowcount:
                c.execute("DELETE FROM chunks WHERE job_id = ?", (job_id,))
                c.execute("DELETE FROM stages WHERE job_id = ?", (job_id,))
            return bool(gone.rowcount)

    def set_frames_done(self, job_id: str, frames_done: int) -> None:
        with self._tx(job_id) as c:
            c.execute("UPDATE jobs SET frames_done = ?, updated_at = ? WHERE id = ?",
                      (frames_done, utcnow().isoformat(), job_id))
