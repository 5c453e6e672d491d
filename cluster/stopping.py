"""A job's running step stopped where it runs once the job has ended (cancelled, failed, timed out).

A job-level step (prepare, the whole mel, finalise) runs for as long as its inputs take: normalising a long
template is minutes of ffmpeg. A job cancelled meanwhile ended at once, but its step ran on to its end, holding
a compositor, its CPU and its memory for nothing (a hostile template's ffmpeg grew to 9 GB after its cancel).
The job manager now asks the process running the step to stop it (`stop`): the ffmpeg processes the step
started are killed (`FFmpeg` registers each with `track`), and its loops over frames leave at their next
batch (`check`). The step's error is `JobCancelled`, which the job manager, whose job has ended, discards.

Work is the job's inside `work_of(job_id)` (a context variable: it follows asyncio tasks and
`asyncio.to_thread`; a `ThreadPoolExecutor` is handed it with `contextvars.copy_context().run`). Plain
Python, testable without Ray.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import threading
import time
import weakref
from typing import Iterable, Iterator, Protocol, TypeVar

from cluster.errors import JobCancelled

log = logging.getLogger("lipsync.stopping")

#: How many stopped jobs a process remembers (a stop that comes before its step's next process or batch), and for
#: how long (a job id may be used again once its record is gone: `LIPSYNC_RECORD_RETENTION_DAYS`)
REMEMBERED_STOPS = 4096
REMEMBERED_STOP_S = 6 * 3600.0

_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("lipsync_job_work", default=None)
_lock = threading.Lock()
_running: dict[str, weakref.WeakSet] = {}  # job id -> its live processes (gone ones drop out by themselves)
_stopped: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()  # job -> (why, when), newest last

T = TypeVar("T")


class Stoppable(Protocol):
    def stop(self) -> None: ...


@contextlib.contextmanager
def work_of(job_id: str) -> Iterator[None]:
    """What runs inside the block is job `job_id`'s work (its processes tracked, `check` reads its stop)."""
    token = _job.set(job_id)
    try:
        yield
    finally:
        _job.reset(token)


def track(process: Stoppable) -> str | None:
    """Register a process just started by the current job's work (stopped at once when the job already was);
    the job's id, for `untrack`."""
    job_id = _job.get()
    if job_id is None:
        return None
    with _lock:
        if _stopped_locked(job_id) is None:
            if len(_running) > REMEMBERED_STOPS:  # jobs whose processes were dropped without `untrack`
                for gone in [j for j, processes in _running.items() if not processes]:
                    del _running[gone]
            _running.setdefault(job_id, weakref.WeakSet()).add(process)
            return job_id
    process.stop()
    return job_id


def untrack(process: Stoppable, job_id: str | None) -> None:
    """A process of job `job_id`'s work that has ended (`track`'s answer; None: not a job's)."""
    if job_id is None:
        return
    with _lock:
        running = _running.get(job_id)
        if running is not None:
            running.discard(process)
            if not running:
                del _running[job_id]


def stop(job_id: str, why: str = "has ended") -> int:
    """Stop job `job_id`'s work in this process: its processes killed now, its loops left at their next `check`.
    How many processes were killed."""
    with _lock:
        _stopped[job_id] = (why, time.monotonic())
        _stopped.move_to_end(job_id)
        while len(_stopped) > REMEMBERED_STOPS:
            _stopped.popitem(last=False)
        processes = list(_running.pop(job_id, ()))
    for process in processes:
        try:
            process.stop()
        except Exception as e:  # noqa: BLE001 - one that cannot be killed does not keep the others running
            log.warning("job %s: a process of its stopped work could not be killed: %r", job_id, e,
                        extra={"job_id": job_id})
    return len(processes)


def stopped(job_id: str | None = None) -> str | None:
    """Why the job's work was stopped ("was cancelled"; the current job's when `job_id` is None), None while it
    may go on."""
    job_id = job_id or _job.get()
    if job_id is None:
        return None
    with _lock:
        return _stopped_locked(job_id)


def _stopped_locked(job_id: str) -> str | None:
    why, when = _stopped.get(job_id, (None, 0.0))
    return why if why is not None and time.monotonic() - when < REMEMBERED_STOP_S else None


def check(stage: str | None = None) -> None:
    """`JobCancelled` when the current job's work was stopped."""
    job_id = _job.get()
    why = stopped(job_id)
    if why is not None:
        raise JobCancelled(f"job {job_id} {why}: its work was stopped", job_id=job_id, stage=stage)


def checked(items: Iterable[T], stage: str | None = None) -> Iterator[T]:
    """`items`, with `check` before each."""
    for item in items:
        check(stage)
        yield item
