"""The durable job table: SQLite on disk under the storage root.

Every state change is written (and committed) here before it is reported. The job manager
reloads unfinished jobs from this table after a restart; chunk rows remember which segments are
already rendered so that a resumed job re-renders only the rest.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cluster.errors import JobNotFound, LipsyncError
from cluster.schemas import TRANSITIONS, ErrorInfo, JobState, JobStatus, RenderRequest, StageTime, utcnow

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
"""

# Columns added after the first release: added to an existing database when it is opened.
_ADDED_COLUMNS = {"owner": "TEXT", "client": "TEXT", "request_key": "TEXT"}


class InvalidTransition(LipsyncError):
    code = "job.invalid_transition"


class JobCorrupt(LipsyncError):
    """A stored job row that no longer validates (edited, or written by another version)."""
    code = "job.corrupt_record"
    retryable = False


def _output_seconds(row: sqlite3.Row) -> float | None:
    """A finished job's output length from its stored plan (frames at the template's rate; the
    finalise step verified the file against them)."""
    try:
        plan = json.loads(row["plan"] or "null")
        return round(plan["frames_total"] * plan["fps_den"] / plan["fps_num"], 3)
    except (ValueError, TypeError, KeyError, ZeroDivisionError):
        return None


def _request_or_none(raw: str) -> RenderRequest | None:
    """A status must be readable even when its stored request is not (the job then fails)."""
    try:
        return RenderRequest.model_validate_json(raw)
    except ValueError:
        return None


class JobStore:
    """A small, thread-safe facade over one SQLite file (WAL mode, busy timeout)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, check_same_thread=False,
                                     isolation_level=None)
        self._conn.row_factory = sqlite3.Row
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

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # --- reading -------------------------------------------------------------------------
    def _row(self, conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}", job_id=job_id)
        return row

    def _status(self, conn: sqlite3.Connection, row: sqlite3.Row) -> JobStatus:
        done = conn.execute("SELECT COUNT(*), COALESCE(SUM(frames), 0) FROM chunks WHERE job_id = ?",
                            (row["id"],)).fetchone()
        return JobStatus(
            id=row["id"], state=JobState(row["state"]),
            frames_done=max(int(row["frames_done"]), int(done[1])), frames_total=row["frames_total"],
            chunks_done=int(done[0]), chunks_total=row["chunks_total"],
            created_at=row["created_at"], updated_at=row["updated_at"], output=row["output"],
            output_seconds=_output_seconds(row) if row["state"] == JobState.succeeded.value else None,
            error=ErrorInfo.model_validate_json(row["error"]) if row["error"] else None,
            request=_request_or_none(row["request"]),
            stages=[StageTime(stage=r["stage"], started_at=r["started_at"], ended_at=r["ended_at"])
                    for r in conn.execute("SELECT * FROM stages WHERE job_id = ? ORDER BY started_at",
                                          (row["id"],)).fetchall()],
        )

    def get(self, job_id: str) -> JobStatus:
        with self._lock:
            return self._status(self._conn, self._row(self._conn, job_id))

    def exists(self, job_id: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def list(self, states: list[JobState] | None = None, limit: int = 100, offset: int = 0) -> list[JobStatus]:
        sql, args = "SELECT * FROM jobs", []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        sql += " ORDER BY created_at, id LIMIT ? OFFSET ?"
        args += [limit, offset]
        with self._lock:
            return [self._status(self._conn, r) for r in self._conn.execute(sql, args).fetchall()]

    def unfinished_ids(self, owner: str | None = None) -> list[str]:
        """Ids of the jobs not yet terminal, of `owner` only when given (no validation: a row that
        no longer validates still gets resumed, and failed, rather than blocking every other job)."""
        return [job_id for job_id, job_owner, _ in self.unfinished_owners()
                if owner is None or job_owner == owner]

    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (for the jobs-by-state gauge)."""
        with self._tx() as conn:
            return {state: n for state, n in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    def unfinished_owners(self) -> list[tuple[str, str | None, str | None]]:
        """(id, owner, client) of every job not yet terminal, oldest first."""
        states = [s.value for s in JobState if not s.terminal]
        with self._lock:
            rows = self._conn.execute(f"SELECT id, owner, client FROM jobs WHERE state IN "
                                      f"({','.join('?' * len(states))}) ORDER BY created_at, id", states).fetchall()
        return [(r["id"], r["owner"], r["client"]) for r in rows]

    def request_key(self, job_id: str) -> str | None:
        with self._lock:
            return self._row(self._conn, job_id)["request_key"]

    def job_writing_to(self, output: str) -> str | None:
        """The id of an unfinished job whose request names `output`, if any."""
        states = [s.value for s in JobState if not s.terminal]
        with self._lock:
            rows = self._conn.execute(f"SELECT id, request FROM jobs WHERE state IN "
                                      f"({','.join('?' * len(states))})", states).fetchall()
        for r in rows:
            try:
                if json.loads(r["request"]).get("output") == output:
                    return r["id"]
            except (ValueError, AttributeError):
                continue
        return None

    def unfinished(self) -> list[JobStatus]:
        return self.list([s for s in JobState if not s.terminal], limit=1_000_000)

    def request(self, job_id: str) -> RenderRequest:
        """The stored request, validated; `JobCorrupt` (with the validation error as cause) if it is not."""
        with self._lock:
            raw = self._row(self._conn, job_id)["request"]
        try:
            return RenderRequest.model_validate_json(raw)
        except ValueError as e:
            raise JobCorrupt(f"job {job_id}: its stored request no longer validates", job_id=job_id,
                             cause=str(e)[:2000]) from e

    def plan(self, job_id: str) -> dict | None:
        with self._lock:
            raw = self._row(self._conn, job_id)["plan"]
        return json.loads(raw) if raw else None

    def done_chunks(self, job_id: str) -> dict[int, str]:
        """Chunk index -> segment path of every chunk recorded as rendered."""
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
        with self._tx() as c:
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
        with self._tx() as c:
            c.execute("INSERT INTO stages (job_id, stage, started_at) VALUES (?, ?, ?) "
                      "ON CONFLICT(job_id, stage) DO UPDATE SET ended_at = NULL",
                      (job_id, stage, utcnow().isoformat()))

    def stage_ended(self, job_id: str, stage: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE stages SET ended_at = ? WHERE job_id = ? AND stage = ? AND ended_at IS NULL",
                      (utcnow().isoformat(), job_id, stage))

    def transition(self, job_id: str, state: JobState, *, error: ErrorInfo | None = None,
                   output: str | None = None) -> JobStatus:
        """Move a job forward; refuses moves TRANSITIONS does not allow (e.g. out of a terminal state)."""
        with self._tx() as c:
            row = self._row(c, job_id)
            current = JobState(row["state"])
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
        Returns whether this call ended it."""
        assert state.terminal
        now = utcnow().isoformat()
        with self._tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job with id {job_id!r}", job_id=job_id)
            if row["state"] in {s.value for s in JobState if s.terminal}:
                return False
            c.execute("UPDATE jobs SET state = ?, error = COALESCE(?, error), output = COALESCE(?, output), "
                      "updated_at = ? WHERE id = ?",
                      (state.value, error.model_dump_json() if error else None, output, now, job_id))
            c.execute("UPDATE stages SET ended_at = ? WHERE job_id = ? AND ended_at IS NULL", (now, job_id))
            return True

    def set_plan(self, job_id: str, plan: dict, frames_total: int, chunks_total: int) -> None:
        with self._tx() as c:
            self._row(c, job_id)
            c.execute("UPDATE jobs SET plan = ?, frames_total = ?, chunks_total = ?, updated_at = ? WHERE id = ?",
                      (json.dumps(plan), frames_total, chunks_total, utcnow().isoformat(), job_id))

    def chunk_done(self, job_id: str, idx: int, frames: int, segment: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO chunks (job_id, idx, frames, segment) VALUES (?, ?, ?, ?)",
                      (job_id, idx, frames, segment))
            c.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (utcnow().isoformat(), job_id))

    def forget_chunk(self, job_id: str, idx: int) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM chunks WHERE job_id = ? AND idx = ?", (job_id, idx))

    def set_frames_done(self, job_id: str, frames_done: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET frames_done = ?, updated_at = ? WHERE id = ?",
                      (frames_done, utcnow().isoformat(), job_id))
