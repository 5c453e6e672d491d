"""What a remote call came to, decided in one place.

Every caller of an actor method or task needs the same four answers: it *answered* (a value), it
*raised* (our typed error, or any exception, crossed back as a `RayTaskError`), the process
*died* (`RayActorError`: Ray may restart it), or it *stalled* (no answer by the deadline).
A fifth, *lost*, covers the rest of Ray's errors: an object whose owner or node went away.
Callers branch on `Outcome.kind` instead of repeating an `except` ladder.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from actors import task_cause
from cluster.errors import LipsyncError, WorkerLost


class Kind(str, enum.Enum):
    answered = "answered"
    raised = "raised"
    died = "died"
    stalled = "stalled"
    lost = "lost"


@dataclass
class Outcome:
    kind: Kind
    value: Any = None
    error: BaseException | None = None   # what was raised here (RayError, TimeoutError)
    cause: BaseException | None = None   # for `raised`: the remote exception itself

    @property
    def ok(self) -> bool:
        return self.kind == Kind.answered

    def describe(self, who: str, what: str) -> str:
        """One line for logs and error messages: who did what, and how it ended."""
        if self.kind == Kind.stalled:
            return f"{who} gave no answer to {what} in time"
        if self.kind == Kind.raised:
            return f"{who} raised during {what}: {self.cause}"[:2000]
        return f"{who} {self.kind.value} during {what}: {type(self.error).__name__}: {self.error}"[:2000]

    def typed(self, fallback: type[LipsyncError], message: str, **context) -> LipsyncError:
        """The remote typed error as itself (context filled in), or `fallback(message)` with the
        cause attached for anything else."""
        if self.kind == Kind.raised and isinstance(self.cause, LipsyncError):
            return self.cause.with_context(**context)
        if self.kind in (Kind.died, Kind.lost):
            return WorkerLost(f"{message}: {type(self.error).__name__}", cause=str(self.error)[:2000], **context)
        cause = self.cause if self.kind == Kind.raised else self.error
        return fallback(f"{message}: {cause}" if cause else message, cause=str(cause)[:4000], **context)


def classify(error: BaseException) -> Outcome:
    """The outcome a call that raised `error` came to."""
    if isinstance(error, (asyncio.TimeoutError, GetTimeoutError)):
        return Outcome(Kind.stalled, error=error)
    if isinstance(error, RayTaskError):
        return Outcome(Kind.raised, error=error, cause=task_cause(error))
    if isinstance(error, RayActorError):
        return Outcome(Kind.died, error=error)
    if isinstance(error, RayError):
        return Outcome(Kind.lost, error=error)
    raise error  # not a remote-call outcome: a bug here, let it surface


async def outcome(ref, timeout: float) -> Outcome:
    """Await an object ref (from an async actor) with a deadline, and classify how it ended."""
    try:
        return Outcome(Kind.answered, value=await asyncio.wait_for(ref, timeout=timeout))
    except (asyncio.TimeoutError, RayError) as e:
        return classify(e)


def outcome_sync(ref, timeout: float) -> Outcome:
    """`ray.get` with a deadline (from a driver or a sync actor), classified."""
    try:
        return Outcome(Kind.answered, value=ray.get(ref, timeout=timeout))
    except (GetTimeoutError, RayError) as e:
        return classify(e)


class UnreadAnswers:
    """The answers (object refs) of calls whose caller may stop before reading them (a chunk that ended with a
    batch in flight: cancelled, or handed out again). One freed unread with an error in it (`StaleAttempt`) was
    Ray's "Unhandled error" traceback in the caller's log; `drop` reads each when it comes, and drops it."""

    def __init__(self) -> None:
        self._refs: set = set()

    def add(self, ref) -> None:
        self._refs.add(ref)

    def read(self, ref) -> None:
        """`ref` is read by its caller now."""
        self._refs.discard(ref)

    def drop(self) -> None:
        for ref in self._refs:
            ref.future().add_done_callback(_read_and_drop)
        self._refs.clear()


def _read_and_drop(answer) -> None:
    """The answer of a call nobody reads any more, taken and dropped (its error is no longer anyone's)."""
    answer.exception()
