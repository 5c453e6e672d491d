"""Structured logs: `LIPSYNC_LOG_FORMAT=json` writes one JSON object per line with the job id,
chunk, actor and node of every line that concerns them; `text` (the default) a readable line
with the same fields.

Where the fields come from, in this order: the record's `extra` (`log.info(..., extra={"job_id":
j})`), the current context (`with log_context(job_id=j, chunk=3): ...`, a contextvar, so each
asyncio task of the job manager carries its own job), and the process (`set_process_context`,
called by each actor with its name and Ray node id). Secrets (LIPSYNC_API_TOKEN, RAY_AUTH_TOKEN
and any value registered with `add_secret`) are replaced by `***` in every line, and a message
is cut at `MAX_MESSAGE_CHARS` so file contents that end up in an exception text stay out.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import os
import socket
from typing import Iterator

FIELDS = ("job_id", "chunk", "stage", "code", "actor", "node")  # stage, code: a failed job's
MAX_MESSAGE_CHARS = 4000
SECRET_ENV = ("LIPSYNC_API_TOKEN", "LIPSYNC_CALLBACK_SECRET", "RAY_AUTH_TOKEN")

# No default: a shared mutable default would be one dict for every context; `.get({})` reads it.
_context: contextvars.ContextVar[dict] = contextvars.ContextVar("lipsync_log_context")
_process: dict[str, str] = {}
_secrets: set[str] = set()
_HANDLER_NAME = "lipsync-structured"


def add_secret(value: str | None) -> None:
    """Never print `value` (a token) in a log line."""
    if value and len(value) >= 6:
        _secrets.add(value)


def set_process_context(actor: str | None = None, node: str | None = None) -> None:
    """Fields every line of this process carries (an actor's name, its Ray node id)."""
    if actor:
        _process["actor"] = actor
    if node:
        _process["node"] = node


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Lines logged inside the block carry `fields` (job_id, chunk, ...); nests, and follows
    asyncio tasks created inside it."""
    token = _context.set({**_context.get({}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: object) -> None:
    """Set context fields for the rest of the current task/thread (e.g. at the top of an asyncio task)."""
    _context.set({**_context.get({}), **{k: v for k, v in fields.items() if v is not None}})


def set_context(**fields: object) -> None:
    """Replace the context's fields (at the top of an actor method: a thread that runs one call
    after another must not keep the previous call's job or chunk)."""
    _context.set({k: v for k, v in fields.items() if v is not None})


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _fields(record: logging.LogRecord) -> dict:
    out: dict = {}
    ctx = _context.get({})
    for key in FIELDS:
        value = getattr(record, key, None)
        if value is None:
            value = ctx.get(key, _process.get(key))
        if value is not None:
            out[key] = value
    return out


def _message(record: logging.LogRecord) -> str:
    message = record.getMessage()
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + f"... [{len(message) - MAX_MESSAGE_CHARS} chars cut]"
    return redact(message)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, job_id, chunk, actor, node, pid, host, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": _message(record),
            **_fields(record),
            "pid": record.process,
            "host": socket.gethostname(),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))[-MAX_MESSAGE_CHARS:]
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [job_id=.. chunk=.. actor=.. node=..] message`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = (f"{self.formatTime(record)} {record.levelname} {record.name}"
                f"{' [' + fields + ']' if fields else ''} {_message(record)}")
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))[-MAX_MESSAGE_CHARS:]
        return line


def configure(log_format: str | None = None, level: int | str = logging.INFO) -> logging.Handler:
    """Install the structured handler on the `lipsync` logger (idempotent; replaces an earlier one).

    `log_format`: "json" or "text"; default `LIPSYNC_LOG_FORMAT` (through the settings), else text.
    """
    if log_format is None:
        from cluster.config import get_settings

        log_format = get_settings().log_format
    for name in SECRET_ENV:
        add_secret(os.environ.get(name))
    logger = logging.getLogger("lipsync")
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # one line per record, not a second plain copy through the root logger
    # httpx says each request at INFO, its whole URL with it (a callback's, whose query may hold its receiver's
    # key), outside these fields and unmasked: its failures reach our own lines as errors
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logger.level))
    return handler
