"""Job-end callbacks: durable delivery records (SQLite under the storage root) and signing.

When a job that carries a `callback_url` ends, its final `JobView` is POSTed there as JSON with
`X-Lipsync-Signature: sha256=<hex HMAC-SHA256 of the body under LIPSYNC_CALLBACK_SECRET>` (or,
where none is set, under LIPSYNC_API_TOKEN: set a callback secret so that receivers never hold the
API token; no signature header when neither is set) and `X-Lipsync-Job`. Deliveries are retried with
exponential backoff (`retry_delay_s`) up to `callback_attempts`, counted across restarts; the URL passes
the same address guard as URL inputs, at registration and again at each delivery. A callback never
changes the job's state.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable

log = logging.getLogger("lipsync.callbacks")

SIGNATURE_HEADER = "X-Lipsync-Signature"
FIRST_RETRY_S = 0.5  # the wait after a callback's first failed delivery; each next one doubles ...
LONGEST_RETRY_S = 300.0  # ... up to this: a receiver down for a deploy or an outage still gets it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS callbacks (
    job_id     TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    state      TEXT NOT NULL DEFAULT 'pending',   -- pending | delivered | failed
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at TEXT NOT NULL
);
"""


def retry_delay_s(failed: int) -> float:
    """The wait before the next delivery of a callback whose `failed` deliveries (1, 2, ...) all failed."""
    return min(LONGEST_RETRY_S, FIRST_RETRY_S * 2 ** max(0, failed - 1))


def retry_window_s(attempts: int) -> float:
    """How long after its job ends a callback is still tried, at most (its waits; the POSTs' own time aside)."""
    return sum(retry_delay_s(n) for n in range(1, attempts))


async def deliver(job_id: str, url: str, post: Callable[[], Awaitable[int]], store: CallbackStore, *,
                  attempts: int, tried: int = 0, sleep: Callable[[float], Awaitable] = asyncio.sleep) -> bool:
    """POST a job's callback (`post()` answers the HTTP status or raises a `LipsyncError`) until it is
    delivered or `attempts` deliveries failed, `tried` of them before (a restart goes on counting; a
    setting lowered since leaves one try); each try recorded in `store`. True when delivered."""
    from cluster.errors import LipsyncError

    for attempt in range(min(tried, attempts - 1), attempts):
        error = None
        try:
            status = await post()
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except LipsyncError as e:  # (its message names the URL: said as the logs say it, query and path cut)
            error = f"{e.code}: {e.message}".replace(url, url_said(url))
        final = error is None or attempt == attempts - 1
        store.attempt(job_id, error, final)
        if error is None:
            log.info("callback of job %s delivered to %s", job_id, url_said(url), extra={"job_id": job_id})
            return True
        log.warning("callback of job %s to %s failed (attempt %d/%d%s): %s", job_id, url_said(url), attempt + 1,
                    attempts, "" if final else f", next in {retry_delay_s(attempt + 1):g} s", error,
                    extra={"job_id": job_id})
        if not final:
            await sleep(retry_delay_s(attempt + 1))
    return False


def url_said(url: str) -> str:
    """A callback's URL as the logs say it: its scheme and host, without credentials, path or query (a receiver's
    key is often there: `?k=...`, Slack's `/services/T../B../<key>`, Telegram's `/bot<token>/`)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a malformed URL>"
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    return shown + ("/..." if parts.path.strip("/") else "") + ("?..." if parts.query else "")


def sign(body: bytes, token: str) -> str:
    return "sha256=" + hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, token: str, header: str) -> bool:
    """What a receiver does: constant-time check of the signature header."""
    return hmac.compare_digest(sign(body, token), header or "")


class CallbackStore:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def _now(self) -> str:
        return datetime.now(timezone.utc).isoformat()

    def add(self, job_id: str, url: str) -> bool:
        """Record a callback; False when the job already has one (kept as it is)."""
        with self._lock:
            cur = self._conn.execute("INSERT OR IGNORE INTO callbacks (job_id, url, updated_at) VALUES (?, ?, ?)",
                                     (job_id, url, self._now()))
            return cur.rowcount == 1

    def attempt(self, job_id: str, error: str | None, final: bool) -> None:
        state = "delivered" if error is None else ("failed" if final else "pending")
        with self._lock:
            self._conn.execute("UPDATE callbacks SET attempts = attempts + 1, state = ?, last_error = ?, "
                               "updated_at = ? WHERE job_id = ?", (state, error, self._now(), job_id))

    def pending(self) -> list[tuple[str, str, int]]:
        """The callbacks not yet delivered nor given up: (job id, URL, deliveries tried so far)."""
        with self._lock:
            rows = self._conn.execute("SELECT job_id, url, attempts FROM callbacks WHERE state = 'pending'").fetchall()
        return [(r["job_id"], r["url"], r["attempts"]) for r in rows]

    def forget(self, job_id: str) -> None:
        """Remove a job's callback record (its job's record went: `LIPSYNC_RECORD_RETENTION_DAYS`)."""
        with self._lock:
            self._conn.execute("DELETE FROM callbacks WHERE job_id = ?", (job_id,))

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM callbacks WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else None
