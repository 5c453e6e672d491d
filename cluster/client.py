"""Python SDK for the lip-sync service (`lipsync serve`, serve_app.py): sync `Client` and `AsyncClient`.

    from cluster.client import Client
    c = Client("http://127.0.0.1:8000", token="...")
    job = c.submit("speech.wav", "person.mp4", sync_mode="pingpong")
    print(job.watch_url)                      # its HLS stream, playable while it renders
    for segment in job.segments():            # each finished segment, as it is published
        print(segment.index, segment.url)
    job.wait(progress=True, timeout=600)
    job.download("out.mp4")

Typed with the server's pydantic models (`cluster.schemas`). Refusals that did nothing (429, 503)
and connections that could not be opened are retried with exponential backoff (honouring
Retry-After); requests that are safe to repeat (reads, and submissions and batches, which carry an
id) also on broken or timed-out connections and gateway errors, except an upload whose answer
timed out (not sent again whole). Every other error raises `ApiError` carrying the server's error
code (`connection.failed` / `connection.timeout` when no answer came); a wait past its deadline
raises `WaitTimeout`. Local files are uploaded (multipart, streamed from disk); `http(s)://` URLs
and server paths (under the server's input roots) are passed as such. Imports neither ray nor
onnxruntime.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import re
import stat
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import ValidationError

from cluster.errors import InputError, InputNotFound, os_reason
from cluster.schemas import (
    JOB_ID_HEADER,
    JOB_ID_PATTERN,
    AvatarView,
    BatchView,
    HlsSegment,
    JobAccepted,
    JobPage,
    JobState,
    JobView,
    UploadedFile,
)
from cluster.views import state_said

RETRY_STATUS = (429, 502, 503, 504)
log = logging.getLogger("lipsync.client")

# how long `segments()` without a timeout keeps opening a job's event stream that the server refuses
# (429: its LIPSYNC_MAX_EVENT_STREAMS are all taken) before it raises that answer
REFUSED_STREAM_PATIENCE_S = 600.0
# how long a live session's audio socket, reopened after its connection was lost, keeps asking while
# the server still counts the lost one as holding the session (it lets go 10 s after its last audio)
SOCKET_TAKEOVER_S = 12.0
# how long `download_recording` waits for a session that is still ending (its recording is written then)
RECORDING_WAIT_S = 300.0
# a live session closed after an error (its audio socket lost, its service gone) is ended with one DELETE
# bounded so, never retried: the error already raised is what its caller sees, not the DELETE's half minute of
# retries against a service that stopped (a service that is back ends an idle session by itself)
CLOSE_AFTER_ERROR_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
# how often a session asked to end (POST /end) is looked at until it has
END_POLL_S = 0.25
# what a live session's close after an error raises when it comes while closing (never swallowed for that error)
_INTERRUPTS = (KeyboardInterrupt, asyncio.CancelledError)


class ApiError(Exception):
    """An error answer of the service: HTTP status, the server's stable `code`, `message`, `field`."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field

    @classmethod
    def from_response(cls, r: httpx.Response) -> "ApiError":
        try:
            e = r.json()["error"]
            status, code, message, field = r.status_code, e["code"], e["message"], e.get("field")
        except (ValueError, KeyError, TypeError):
            status, code, message, field = r.status_code, f"http.{r.status_code}", r.text[:500] or r.reason_phrase, None
            if r.headers.get("content-type", "").startswith("text/html"):  # another server (a probe: its page, whole)
                message = (f"the server answered HTTP {status} with a web page, not the lipsync API: is the URL "
                           f"(--url, LIPSYNC_URL) the lipsync service's?")
        if cls is ApiError and status in (429, 503):
            ra = r.headers.get("retry-after", "")
            return ServiceBusy(status, code, message, field, retry_after=float(ra) if ra.isdigit() else None)
        return cls(status, code, message, field)


class ServiceBusy(ApiError):
    """The service refused for now and the client's retries (honouring Retry-After) are spent: 429
    (`service.busy`: its job queue is full; `session.capacity`; too many avatar preparations or event
    streams) or 503 (`service.not_ready`). `retry_after`: the seconds it asked for (None: none said).
    `Client(retries=0)` raises it at once instead of after the retries (about 35 s at Retry-After 5)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, code, message, field)
        self.retry_after = retry_after


class BatchRefused(ApiError):
    """`submit_batch` was answered an error: the server's, and `batch_id`, the id the batch was sent under
    (chosen by the SDK unless given). Audios before a refused one were admitted and run under it:
    `batch(e.batch_id)`, `cancel_batch(e.batch_id)`, or the corrected batch sent again with `id=e.batch_id`."""

    def __init__(self, error: ApiError, batch_id: str) -> None:
        super().__init__(error.status, error.code, error.message, error.field)
        self.batch_id = batch_id
        self.retry_after = getattr(error, "retry_after", None)  # a refusal for now (`ServiceBusy`)


class JobFailed(ApiError):
    """`wait` saw the job end failed or cancelled; `.job` is its final view."""

    def __init__(self, job: JobView) -> None:
        err = job.error
        super().__init__(200, err.code if err else job.state.value,
                         err.message if err else f"job {job.id} ended {job.state.value}")
        self.job = job


class WaitTimeout(TimeoutError):
    pass


class _Partial:
    """A download's partial file `<path>.part` and, beside it, the ETag of the result it holds
    (`<path>.part.etag`): a download resumes it only for that same result (`If-Range`: another
    result's server answers 200 and it is written anew), and one of unknown origin is started
    over, never spliced with another job's bytes."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.part = dest.with_name(dest.name + ".part")
        self.tag = dest.with_name(dest.name + ".part.etag")

    def resume(self) -> tuple[int, dict[str, str]]:
        """(bytes held, the request's Range headers)."""
        have = self.part.stat().st_size if self.part.exists() else 0
        etag = None
        if have:
            try:
                etag = self.tag.read_text().strip() or None
            except OSError:
                etag = None
            if etag is None:
                self.discard()
                return 0, {}
        return have, ({"Range": f"bytes={have}-", "If-Range": etag} if etag else {})

    def open(self, etag: str | None, have: int):
        """The partial file to write the answer to: appended to (`have` > 0, a 206 for its result) or
        written anew; the result's ETag recorded first."""
        if etag:
            self.tag.write_text(etag)
        else:
            self.tag.unlink(missing_ok=True)
        return open(self.part, "ab" if have else "wb")

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.tag.unlink(missing_ok=True)

    def done(self) -> None:
        os.replace(self.part, self.dest)
        self.tag.unlink(missing_ok=True)


class _Download:
    """One download of a job's result to `path`, shared by both clients: what each answer of
    `GET /v1/jobs/<id>/result` means (`verdict`), the partial file it resumes, the length it checks."""

    def __init__(self, job_id: str, path: str | os.PathLike) -> None:
        self.job_id = job_id
        dest = Path(path).expanduser()
        try:  # said before a byte is fetched (it failed at the end, leaving the whole file as `.part`)
            if dest.is_dir():
                raise InputError(f"download of job {job_id}: {dest} is a directory (give a file name, e.g. "
                                 f"out.mp4)", path=str(dest))
            dest.parent.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:  # a name the system refuses, a parent that is a file or not writable
            raise InputError(f"download of job {job_id}: {dest} cannot be written: "
                             f"{os_reason(e)}", path=str(dest)) from None
        self.partial = _Partial(dest)
        self.size: int | None = None
        self.have = 0
        self.complete = False

    def headers(self) -> dict[str, str]:
        """The next request's headers (resuming what the partial file holds)."""
        self.have, headers = self.partial.resume()
        return headers

    def verdict(self, r: httpx.Response, attempt: int, retries: int) -> str:
        """`done` (the partial file is the whole result), `again` (it was longer than the result: it
        is gone, ask again), `retry` (an overload answer: wait, ask again), `write` (write the body to
        `open()`); any other answer raises its `ApiError` (an error answer's body read first)."""
        if r.status_code == 416 and self.have:  # the partial file may already be complete
            total = r.headers.get("content-range", "").rpartition("/")[2]
            if re.fullmatch(r"[0-9]{1,19}", total) and int(total) == self.have:
                self.size = self.have
                return "done"
            self.partial.discard()
            return "again"
        if r.status_code not in (200, 206):
            if r.status_code in RETRY_STATUS and attempt < retries:
                return "retry"
            raise ApiError.from_response(r)
        if r.status_code == 200:
            self.have = 0
            length = r.headers.get("content-length", "")
            self.size = int(length) if re.fullmatch(r"[0-9]{1,19}", length) else None
        else:
            self.size = int(r.headers["content-range"].rsplit("/", 1)[1])
        return "write"

    def open(self, r: httpx.Response):
        return self.partial.open(r.headers.get("etag"), self.have)

    def whole(self, verdict: str) -> bool:
        """After an answer's `verdict` was acted on: the partial file holds the whole result (its
        announced length; without one, a body that ended cleanly)."""
        if verdict == "done":
            self.complete = True
        elif verdict == "write":
            got = self.partial.part.stat().st_size if self.partial.part.exists() else 0
            self.complete = got == self.size if self.size is not None else True
        return self.complete

    def finish(self, retries: int) -> Path:
        if not self.complete:
            got = self.partial.part.stat().st_size if self.partial.part.exists() else 0
            raise ApiError(0, "download.incomplete", f"job {self.job_id}: got {got} bytes"
                           + (f" of {self.size}" if self.size is not None else "") + f" in {retries + 1} tries")
        self.partial.done()
        return self.partial.dest

    def failed(self, e: Exception) -> ApiError:
        return ApiError(0, "connection.failed", f"download of {self.job_id} failed: {e!r}")


class _Deadline:
    """The deadline of an event stream (`timeout` seconds from now; None: none): the stream's
    reads wait no longer than it (`http`), each line checks it (`lines`, `check`), and a read
    that timed out at it (`reads`) is `WaitTimeout` too."""

    def __init__(self, timeout: float | None, message: str) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout
        self.message = message
        self.refused_since: float | None = None

    def http(self, timeout: float) -> httpx.Timeout:
        read = max(30.0, timeout)  # the server sends a keep-alive every 15 s
        if self.at is not None:
            read = min(read, max(0.1, self.at - time.monotonic()) + 0.05)
        return httpx.Timeout(timeout, read=read)

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise WaitTimeout(self.message)

    def lines(self, lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            yield line
            self.check()

    def refused_wait(self, r: httpx.Response, attempt: int, backoff_s: float) -> float | None:
        """Seconds to wait before opening a stream the server refused for now (429: its streams are
        all taken; Retry-After honoured), None for any other refusal or past the deadline; without
        one, past `REFUSED_STREAM_PATIENCE_S` from the first refusal."""
        if r.status_code != 429:
            return None
        now = time.monotonic()
        if self.refused_since is None:
            self.refused_since = now
        delay = _retry_delay(attempt, r, backoff_s)
        give_up = self.at if self.at is not None else self.refused_since + REFUSED_STREAM_PATIENCE_S
        return None if now + delay >= give_up else delay

    @contextlib.contextmanager
    def reads(self):
        try:
            yield
        except httpx.ReadTimeout:
            if self.at is not None and time.monotonic() >= self.at:
                raise WaitTimeout(self.message) from None
            raise


class _Reconnects:
    """When an event stream is opened again, for both clients: after a refusal the server gives for now
    (429: its streams are all taken, `_Deadline.refused_wait`; 503, a gateway's 502/504, the Serve
    proxy's bare 404 or 500) or a connection that could not be opened or broke mid-stream, after a
    backoff, never past the stream's deadline (`WaitTimeout`). A stream that never opened gives up after
    the client's `retries` failures (a wrong URL, a service that is down: `ApiError`, also when the
    deadline comes first); one that delivered events outlasts a service restart, for `AWAY_PATIENCE_S`
    without an answer in a row. Any other refusal raises its `ApiError`."""

    def __init__(self, client: "_Base", deadline: _Deadline, path: str) -> None:
        self.client, self.deadline, self.path = client, deadline, path
        self.failures, self.opened, self.away_since = 0, False, None

    def delivered(self) -> None:
        self.failures, self.opened, self.away_since = 0, True, None
        self.deadline.refused_since = None  # a later refusal gets the whole patience again

    def refused(self, r: httpx.Response) -> float:
        """Seconds to wait before opening the stream again after answer `r`, else raised."""
        if r.status_code == 429:
            delay = self.deadline.refused_wait(r, self.failures, self.client.backoff_s)
            if delay is None:
                raise ApiError.from_response(r)
            self.failures += 1
            return delay
        if not _retryable(r, True):
            raise ApiError.from_response(r)
        return self._again(ApiError.from_response(r), r)

    def broke(self, e: httpx.TransportError) -> float:
        """Seconds to wait before opening the stream again after `e`, else raised (`connection.*`)."""
        if _name_unknown(e):  # a typo in the URL: no retry mends it
            raise self._failed(e)
        return self._again(e, None)

    def _again(self, last: Exception, r: httpx.Response | None) -> float:
        now = time.monotonic()
        self.away_since = self.away_since or now
        patient = self.opened and now - self.away_since < AWAY_PATIENCE_S
        if self.failures >= self.client.retries and not patient:
            raise self._failed(last)
        try:
            delay = self.client._retry_wait("GET", self.path, self.failures, r, last, self.deadline.at)
        except WaitTimeout:
            if self.opened:
                raise
            raise self._failed(last) from None  # no answer at all: said as such, not as a timeout
        self.failures += 1
        return delay

    def _failed(self, last: Exception) -> ApiError:
        if isinstance(last, ApiError):
            return last
        return _connection_error(last, self.client.url, "GET", self.path, True)


def _ends_the_job(event: tuple[str, str]) -> bool:
    """Whether an event stream's (type, data) is the job's terminal status (the stream's last event)."""
    kind, data = event
    if kind not in STATUS_EVENTS:
        return False
    try:
        return JobState(json.loads(data).get("state")).terminal
    except (ValueError, TypeError, AttributeError):
        return False


def _segment_urls(client: "_Base", segment: HlsSegment) -> HlsSegment:
    return segment.model_copy(update={"url": client.absolute(segment.url or ""),
                                      "init_url": client.absolute(segment.init_url) if segment.init_url else None})


def _q(id_: str) -> str:
    """An id as one path segment: a user's id with `/` or `..` reached other routes (`../batches/x`)."""
    segment = quote(str(id_), safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment  # (URLs resolve dot segments)


def _is_local_file(value: str | os.PathLike) -> bool:
    s = str(value)
    try:
        return "://" not in s and Path(s).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):  # a name the system refuses (NUL, too long), `~` of no user:
        return False  # no file here (local_input_error says why)


def _retryable(r: httpx.Response, idempotent: bool) -> bool:
    """Worth sending again: a refusal that did nothing (429, 503: overloaded, or not ready yet), and,
    for a request that is safe to repeat, a gateway's 502/504 (the request may have been carried
    out behind it) and a bare 500 that is not our error envelope (the Serve proxy's answer when the
    ingress replica died under the request); a bare 404 is the proxy's answer while the service
    starts (its app not deployed yet: the request reached nothing)."""
    if r.status_code in (429, 503):
        return True
    if _serve_starting(r):
        return True
    if not idempotent:
        return False
    return r.status_code in (502, 504) or (r.status_code == 500 and ApiError.from_response(r).code == "http.500")


# The request never reached the server: sending it again is safe whatever it does.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have reached the server (and been carried out): sent again only when safe to repeat.
_MAYBE_SENT = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteTimeout)


def _serve_starting(r: httpx.Response) -> bool:
    """The Serve proxy's 404 while the service's app is not deployed yet ("Path '/v1/...' not found. Ping
    http://.../-/routes for available routes."): the request reached nothing. Not any bare 404: a wrong URL
    behind another server is an answer."""
    return r.status_code == 404 and "not found. Ping" in r.text and "/-/routes" in r.text


def _retryable_error(e: httpx.TransportError, idempotent: bool, upload: bool = False) -> bool:
    """Worth sending again: a request that never reached the server; one that may have, when safe
    to repeat, unless it is an upload whose answer timed out (not sent again whole: the server may
    be admitting it still)."""
    if isinstance(e, _NOT_SENT):
        return not _name_unknown(e)  # (a name that does not resolve is a typo, not a server away: 25 s of retries)
    return idempotent and isinstance(e, _MAYBE_SENT) and not (upload and isinstance(e, httpx.TimeoutException))


#: What a `connection.failed` says of a host name the resolver does not know
UNKNOWN_HOST = "does not resolve"


def _name_unknown(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is the resolver's "no such name" (not its "try again")."""
    import socket

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, socket.gaierror) and e.errno == socket.EAI_NONAME:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&#]*")


def _shown(path: str) -> str:
    """A request's path as messages and logs show it: a signed URL's token left out (it grants the
    job's media until it expires; an error printed by the CLI lands in terminals and logs)."""
    return _TOKEN_IN_QUERY.sub(r"\1...", path)


def _connection_error(e: Exception | None, url: str, method: str, path: str, idempotent: bool) -> ApiError:
    """The ApiError of a request that got no answer: `connection.timeout` or `connection.failed`,
    saying whether the server may have carried it out."""
    what = "connection.timeout" if isinstance(e, httpx.TimeoutException) else "connection.failed"
    if _name_unknown(e):
        host = httpx.URL(url).host
        return ApiError(0, what, f"{method} {_shown(path)}: the service's host name {host!r} {UNKNOWN_HOST} (is "
                                 f"the URL right: --url, LIPSYNC_URL?): {e!r}")
    maybe = "" if idempotent or isinstance(e, _NOT_SENT) else (
        "; the request may have reached the server: check its state before sending it again")
    return ApiError(0, what, f"{method} {_shown(path)}: no answer from {url}: {e!r}{maybe}")


#: The longest a wait polls on through a service that does not answer, in a row (a restart takes 35-120 s)
AWAY_PATIENCE_S = 600.0


class _Wait:
    """One `wait` of a job, shared by both clients: its deadline (6 h without a timeout), progress
    bar and last view; each face only does the I/O (the event stream, then polling)."""

    def __init__(self, job_id: str, progress: bool, timeout: float | None) -> None:
        self.job_id = job_id
        self.limit = timeout if timeout is not None else 6 * 3600
        self.deadline = time.monotonic() + self.limit
        self.bar = _Bar(progress)
        self.view: JobView | None = None
        self.away_since: float | None = None  # the service has not answered since (`passing`)
        self.away_error: ApiError | None = None  # ...and what the last try met

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def seen(self, view: JobView) -> bool:
        """Record a view; True once the job has ended."""
        self.view, self.away_since, self.away_error = view, None, None
        self.bar.show(view)
        return view.state.terminal

    def stream_broke(self, e: Exception) -> None:
        """The event stream failed: polling follows, but an unknown job is an answer."""
        if isinstance(e, ApiError) and e.status == 404 and e.code != "http.404":
            raise e

    def passing(self, e: ApiError) -> bool:
        """Whether a poll's error is the service away for now (restarting, overloaded, starting), which
        the wait outlasts, until its own deadline and for `AWAY_PATIENCE_S` in a row at most: a restart takes
        longer than one request's retries; a service that stays away is said so."""
        if e.code == "connection.failed" and UNKNOWN_HOST in e.message:  # a typo: no restart mends it
            return False
        if e.code in ("connection.failed", "connection.timeout", "http.500") or e.status in (429, 502, 503, 504) \
                or (e.code == "http.404" and "/-/routes" in e.message):
            now = time.monotonic()
            self.away_since, self.away_error = self.away_since or now, e
            if now - self.away_since < AWAY_PATIENCE_S:
                log.info("job %s: %s; waiting on (%.0f s left)", self.job_id, e, self.left())
                return True
        return False

    def polling(self) -> bool:
        """Whether to ask again (`WaitTimeout` once past the deadline)."""
        if self.view is not None and self.view.state.terminal:
            return False
        if time.monotonic() > self.deadline:
            raise self.timeout()
        return True

    def timeout(self, cause: Exception | None = None) -> WaitTimeout:
        state = self.view.state.value if self.view else "unknown"
        why = f" ({cause})" if cause is not None and self.view is None else ""  # e.g. nothing answered at all
        if (self.away_since is not None or cause is not None) and self.view is not None:
            # not "still rendering": that is only what the service said before it stopped answering
            away = f"for the last {time.monotonic() - self.away_since:.0f} s " if self.away_since else ""
            last = cause or (self.away_error.message if self.away_error else "")
            return WaitTimeout(f"job {self.job_id}: no end seen after {self.limit:g} s; the service has not answered "
                               f"{away}({last}); the job was {state} when it last answered")
        return WaitTimeout(f"job {self.job_id} still {state} after {self.limit:g} s{why}")

    def close(self) -> None:
        self.bar.close()

    def result(self, raise_on_failure: bool) -> JobView:
        if raise_on_failure and self.view.state != JobState.succeeded:
            raise JobFailed(self.view)
        return self.view


def _within(deadline: float, timeout: float) -> float:
    """An attempt's HTTP timeout that ends by `deadline` (at least half a second)."""
    return max(0.5, min(timeout, deadline - time.monotonic()))


def _retry_delay(attempt: int, r: httpx.Response | None, base: float) -> float:
    if r is not None:
        ra = r.headers.get("retry-after", "")
        if re.fullmatch(r"[0-9]{1,6}", ra):  # honoured, spread by up to a quarter more: clients refused together
            return min(float(ra) * (1 + random.random() / 4), 30.0)  # do not come back together
    return min(base * 2 ** min(attempt, 16), 15.0) * (0.5 + random.random() / 2)


class _Uploads:
    """Local files of a request, opened anew for each attempt (a retry sends them again from their
    start) and streamed from disk by both clients; `close` (in a `finally`) closes the last ones."""

    def __init__(self, files: dict[str, str | os.PathLike], data: dict | None = None) -> None:
        self.files, self.data, self.handles = files, data, []

    def __call__(self) -> dict:
        self.close()
        parts = {}
        for k, v in self.files.items():
            h = open(Path(v).expanduser(), "rb")
            self.handles.append(h)
            parts[k] = (Path(v).name, h, "application/octet-stream")
        return {"files": parts} if self.data is None else {"files": parts, "data": self.data}

    def close(self) -> None:
        for h in self.handles:
            h.close()
        self.handles.clear()


def _form(audio, video, avatar, options: dict[str, Any]):
    """(files, data, json) for a submission: local files go multipart, the rest JSON. An id the service would refuse
    is refused here, naming it (a non-ASCII one reached an HTTP header: a bare UnicodeEncodeError, a probe)."""
    opts = {k: v for k, v in options.items() if v is not None}
    if "id" in opts and not re.fullmatch(JOB_ID_PATTERN, str(opts["id"]), re.ASCII):
        raise InputError(f"id {opts['id']!r} is not valid: letters, digits, '.', '_' and '-' (ASCII), starting with a "
                         f"letter or digit, at most 64", path="id")
    local = {k: v for k, v in (("audio", audio), ("video", video)) if v is not None and _is_local_file(v)}
    for k, v in (("audio", audio), ("video", video)):
        if v is not None and k not in local:
            _check_not_local(k, v)
    if not local:
        body = {"audio": str(audio), **opts}
        if video is not None:
            body["video"] = str(video)
        if avatar is not None:
            body["avatar_id"] = avatar
        return None, None, body
    data = {k: str(v) for k, v in opts.items()}
    if avatar is not None:
        data["avatar_id"] = avatar
    for k, v in (("audio", audio), ("video", video)):
        if v is not None and k not in local:
            data[k] = str(v)
    return local, data, None


#: How long a submission that names URL inputs may take to be answered: the service fetches them (each up to
#: its LIPSYNC_URL_TIMEOUT_S, 60 s by default) and probes them before its 202. With the client's usual read
#: timeout (60 s) the client gave up first, sent it again (the service fetched again) and, its retries spent,
#: said `connection.timeout` instead of the service's `input.url_failed`.
URL_SUBMIT_TIMEOUT_S = 600.0


def _answer_s(client: "_Base", body: dict) -> float | httpx.Timeout:
    """The timeout of a JSON submission `body`: `URL_SUBMIT_TIMEOUT_S` to be answered when it names a URL input
    (connecting within the client's own), else the client's own."""
    given = [body.get("audio"), body.get("video"), *(body.get("audios") or [])]
    if any("://" in str(v) for v in given if v is not None):
        return httpx.Timeout(max(client.timeout, URL_SUBMIT_TIMEOUT_S), connect=client.timeout)
    return client.timeout


_Views = TypeVar("_Views", JobView, JobPage, BatchView)


class _Base:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0,
                 retries: int = 6, backoff_s: float = 0.5) -> None:
        url = url or os.environ.get("LIPSYNC_URL") or "http://127.0.0.1:8000"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:  # said now, not as a connection failure
            raise InputError(f"the service URL {url!r} is not an http(s) URL (e.g. http://HOST:8000; --url or "
                             f"LIPSYNC_URL)", path="url")
        token = token if token is not None else os.environ.get("LIPSYNC_API_TOKEN")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s

    def _retry_wait(self, method: str, path: str, attempt: int, r: httpx.Response | None, last: Exception | None,
                    deadline: float | None) -> float:
        """How long to wait before a request's next attempt (`WaitTimeout` past the caller's deadline),
        said at INFO on `lipsync.client` (the CLI shows it: a command against a service that is down or
        restarting says what it waits for instead of being silent until its retries are spent)."""
        delay = _retry_delay(attempt, r, self.backoff_s)
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise WaitTimeout(f"{method} {_shown(path)}: no answer before the deadline (last: {last})") from last
        cause = (f"answered {last.status} {last.code}" if isinstance(last, ApiError)
                 else f"no answer from {self.url} ({type(last).__name__}: {last})")
        of = f"attempt {attempt + 2} of {self.retries + 1}" if attempt < self.retries else \
            f"attempt {attempt + 2}: a stream that was open waits for its service to come back"
        log.info("%s %s: %s; trying again in %.1f s (%s)", method, _shown(path), cause, delay, of)
        return delay

    def absolute(self, path: str) -> str:
        """A URL the service answered (e.g. `/v1/jobs/<id>/hls/index.m3u8?token=...`), made absolute."""
        return path if "://" in path else self.url + path

    def _views(self, model: type[_Views], data: Any) -> _Views:
        """`data` (an answer's JSON, or its text) as `model`, every job view's URLs absolute (`absolute_urls`): what
        `get`, `list`, `cancel`, `events` and the batch calls give can be opened as it is, as `Job.watch_url` can."""
        view = model.model_validate_json(data) if isinstance(data, (str, bytes)) else model.model_validate(data)
        if isinstance(view, JobView):
            return self.absolute_urls(view)
        return view.model_copy(update={"jobs": [self.absolute_urls(job) for job in view.jobs]})

    def absolute_urls(self, view: JobView) -> JobView:
        """`view` with its URLs absolute (`watch_url`, `output.url`; the service answers them relative to
        itself), as `Job.watch_url` gives the first: what a player, or a shell on another machine, can open."""
        update: dict[str, Any] = {"watch_url": self.absolute(view.watch_url) if view.watch_url else None}
        if view.output is not None:
            update["output"] = view.output.model_copy(update={"url": self.absolute(view.output.url)})
        return view.model_copy(update=update)


# --- sync ---------------------------------------------------------------------------------------
class Job:
    """A submitted job; `view` is the last status seen."""

    def __init__(self, client: "Client", view: JobView | JobAccepted) -> None:
        self.client, self.id = client, view.id
        self.view = view if isinstance(view, JobView) else None
        self._watch = view.watch_url

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.view.state.value if self.view else '?'})"

    @property
    def watch_url(self) -> str | None:
        """The job's HLS playlist (absolute; signed when the service has a token): give it to a player. None once
        the last view seen says the job has no stream (it ended before its first segment, or its files were
        removed)."""
        watch = self.view.watch_url if self.view is not None else self._watch
        return self.client.absolute(watch) if watch else None

    def segments(self, timeout: float | None = None) -> Iterator[HlsSegment]:
        """Each finished HLS segment (absolute `url`) as it is published, until the job ends."""
        return self.client.segments(self.id, timeout=timeout)

    def status(self) -> JobView:
        self.view = self.client.get(self.id)
        return self.view

    def wait(self, progress: bool = False, timeout: float | None = None, poll_s: float = 1.0,
             raise_on_failure: bool = True) -> JobView:
        self.view = self.client.wait(self.id, progress=progress, timeout=timeout, poll_s=poll_s,
                                     raise_on_failure=raise_on_failure)
        return self.view

    def download(self, path: str | os.PathLike) -> Path:
        return self.client.download(self.id, path)

    def cancel(self) -> JobView:
        self.view = self.client.cancel(self.id)
        return self.view


class Client(_Base):
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0,
                 retries: int = 6, backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, token, timeout, retries, backoff_s)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout, transport=transport,
                                 trust_env=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, *, ok=(200,), rewind: Callable[[], dict] | None = None,
                idempotent: bool | None = None, deadline: float | None = None, **kw) -> httpx.Response:
        """One API call, retried with backoff (honouring Retry-After) on a refusal that did nothing
        (429, 503) and on a connection that could not be opened; a call that is safe to repeat
        (GET/HEAD/DELETE, or a submission or batch with an id) also on a broken or timed-out
        connection (an upload's timeout excepted), a gateway's 502/504 and a bare 500. No answer:
        `ApiError` `connection.failed` or `connection.timeout`; none before `deadline`: `WaitTimeout`."""
        idempotent = method in ("GET", "HEAD", "DELETE") if idempotent is None else idempotent
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            r = None
            try:
                if rewind is not None:
                    kw.update(rewind())
                if deadline is not None:  # no attempt, and no wait between them, past the caller's deadline
                    kw["timeout"] = _within(deadline, self.timeout)
                r = self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                if not _retryable_error(e, idempotent, upload=rewind is not None):
                    raise _connection_error(e, self.url, method, path, idempotent) from e
                last = e
            else:
                if r.status_code in ok:
                    return r
                if not _retryable(r, idempotent):
                    raise ApiError.from_response(r)
                last = ApiError.from_response(r)
            if attempt < self.retries:
                time.sleep(self._retry_wait(method, path, attempt, r, last, deadline))
        if isinstance(last, ApiError):
            raise last
        raise _connection_error(last, self.url, method, path, idempotent)

    def submit(self, audio: str | os.PathLike, video: str | os.PathLike | None = None, avatar: str | None = None,
               *, id: str | None = None, sync_mode: str | None = None, model: str | None = None,
               crf: int | None = None, callback_url: str | None = None) -> Job:
        # an id chosen here makes the submission safe to retry: the server answers a repeat with the same job
        opts = dict(id=id or uuid.uuid4().hex, sync_mode=sync_mode, model=model, crf=crf, callback_url=callback_url)
        files, data, body = _form(audio, video, avatar, opts)
        if body is not None:
            r = self.request("POST", "/v1/jobs", ok=(202,), idempotent=True, json=body, timeout=_answer_s(self, body))
        else:
            uploads = _Uploads(files, data)
            try:  # the answer comes once the files are stored and probed: more than a read's usual wait
                r = self.request("POST", "/v1/jobs", ok=(202,), idempotent=True, rewind=uploads,
                                 timeout=max(self.timeout, 600), headers={JOB_ID_HEADER: opts["id"]})
            finally:
                uploads.close()
        return Job(self, JobAccepted.model_validate(r.json()))

    def job(self, job_id: str) -> Job:
        return Job(self, self.get(job_id))

    def get(self, job_id: str, deadline: float | None = None) -> JobView:
        return self._views(JobView, self.request("GET", f"/v1/jobs/{_q(job_id)}", deadline=deadline).json())

    def list(self, state: list[str] | str | None = None, limit: int = 50, offset: int = 0,
             before: str | None = None) -> JobPage:
        """Newest first; the next page is `before=page.next_before` (steady while jobs are submitted)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if before is not None:
            params["before"] = before
        if state:
            params["state"] = [state] if isinstance(state, str) else list(state)
        return self._views(JobPage, self.request("GET", "/v1/jobs", params=params).json())

    def cancel(self, job_id: str) -> JobView:
        return self._views(JobView, self.request("DELETE", f"/v1/jobs/{_q(job_id)}").json())

    def purge(self, job_id: str) -> JobView:
        """Remove a finished job's files on the service now (output, stream, inputs), as its retention does; its
        record stays (a succeeded job then reads `expired`). `ApiError` 409 `job.not_finished` while it runs."""
        return self._views(JobView, self.request("DELETE", f"/v1/jobs/{_q(job_id)}/files").json())

    def _events_of(self, job_id: str, params: dict | None, deadline: _Deadline) -> Iterator[tuple[str, str]]:
        """(event type, data) of the job's event stream until it ends, opened again when it could not be
        opened, was refused for now or broke (`_Reconnects`): a new stream starts with the job's state."""
        path = f"/v1/jobs/{_q(job_id)}/events"
        again, ended = _Reconnects(self, deadline, path), False
        while True:
            try:
                with self.http.stream("GET", path, params=params, timeout=deadline.http(self.timeout)) as r:
                    if r.status_code == 200:
                        with deadline.reads():
                            for event in _sse_events(deadline.lines(r.iter_lines())):
                                again.delivered()
                                ended = ended or _ends_the_job(event)
                                yield event
                        if ended:
                            return
                        delay = again.broke(httpx.RemoteProtocolError("the event stream ended before the job"))
                    else:
                        r.read()
                        delay = again.refused(r)
            except httpx.TransportError as e:
                delay = again.broke(e)
            time.sleep(delay)

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[JobView]:
        """The job's Server-Sent Events, as JobViews, until a terminal state; `WaitTimeout` once
        `timeout` seconds have passed, whether or not an event came (the deadline is checked on
        every line, the server's keep-alives included, and no read waits past it). A stream that
        could not be opened or broke is opened again (a view may then come twice), as `request`
        retries; `ApiError` when it cannot be."""
        deadline = _Deadline(timeout, f"job {job_id}: no end within {timeout or 0:.1f} s")
        for event, data in self._events_of(job_id, None, deadline):
            if event in STATUS_EVENTS:
                yield self._views(JobView, data)

    def segments(self, job_id: str, timeout: float | None = None) -> Iterator[HlsSegment]:
        """The job's HLS segments as they are published (SSE `segment` events, `?segments=1`), from the
        first, until the job ends, each once (a broken stream is opened again); `url` and `init_url`
        (its init segment) absolute (signed: fetch them with any HTTP client, or `fetch`)."""
        deadline = _Deadline(timeout, f"job {job_id}: segments still coming after {timeout or 0:.1f} s")
        following = 0
        for event, data in self._events_of(job_id, {"segments": 1}, deadline):
            if event == "segment" and (segment := HlsSegment.model_validate_json(data)).index >= following:
                following = segment.index + 1
                yield _segment_urls(self, segment)

    def fetch(self, segment: HlsSegment | str) -> bytes:
        """A segment's bytes (`segment.url`), or those of a URL the service gave (e.g. `segment.init_url`);
        retried as `request` does."""
        return self.request("GET", segment if isinstance(segment, str) else segment.url).content

    def wait(self, job_id: str, progress: bool = False, timeout: float | None = None, poll_s: float = 1.0,
             raise_on_failure: bool = True) -> JobView:
        """Follow the job (SSE; polling when the stream breaks) until it ends; `JobFailed` for a failed
        or cancelled job (unless `raise_on_failure=False`), `WaitTimeout` past `timeout`."""
        w = _Wait(job_id, progress, timeout)
        try:
            try:
                for view in self.events(job_id, timeout=w.left()):
                    if w.seen(view):
                        break
            except (httpx.HTTPError, ApiError, WaitTimeout) as e:  # polled below (past the deadline: raised)
                w.stream_broke(e)
            while w.polling():
                try:
                    view = self.get(job_id, deadline=w.deadline)
                except WaitTimeout as e:  # no answer before the deadline
                    raise w.timeout(e) from e
                except ApiError as e:
                    if not w.passing(e):
                        raise
                    time.sleep(min(poll_s * 2, w.left()))
                    continue
                if not w.seen(view):
                    time.sleep(poll_s)
        finally:
            w.close()
        return w.result(raise_on_failure)

    def download(self, job_id: str, path: str | os.PathLike) -> Path:
        """Fetch the output mp4 to `path`: resumes a partial `<path>.part` with Range (for the same
        result only), retries overload answers and broken connections, checks the length against
        the server's, renames into place when complete."""
        dl = _Download(job_id, path)
        for attempt in range(self.retries + 1):
            try:
                with self.http.stream("GET", f"/v1/jobs/{_q(job_id)}/result", headers=dl.headers()) as r:
                    if r.status_code not in (200, 206):
                        r.read()
                    verdict = dl.verdict(r, attempt, self.retries)
                    if verdict == "write":
                        with dl.open(r) as f:
                            for block in r.iter_bytes():  # as it arrives: a cut loses nothing
                                f.write(block)
                if verdict == "retry":
                    time.sleep(_retry_delay(attempt, r, self.backoff_s))
                elif dl.whole(verdict):
                    break
            except httpx.TransportError as e:
                if attempt >= self.retries:
                    raise dl.failed(e) from e
                time.sleep(_retry_delay(attempt, None, self.backoff_s))
        return dl.finish(self.retries)

    def prepare_avatar(self, video: str | os.PathLike) -> AvatarView:
        """Prepare a template once (`POST /v1/avatars`; a local file is uploaded, else a URL);
        then `submit(audio, avatar=view.id)`."""
        if _is_local_file(video):
            uploads = _Uploads({"video": video})
            try:
                r = self.request("POST", "/v1/avatars", ok=(201,), rewind=uploads, timeout=max(self.timeout, 900))
            finally:
                uploads.close()
        else:
            r = self.request("POST", "/v1/avatars", ok=(201,), json={"video": str(video)},
                             timeout=max(self.timeout, 900))
        return AvatarView.model_validate(r.json())

    def avatar(self, avatar_id: str) -> AvatarView:
        return AvatarView.model_validate(self.request("GET", f"/v1/avatars/{_q(avatar_id)}").json())

    def avatars(self, limit: int = 100, offset: int = 0) -> list[AvatarView]:
        """The prepared avatars (`GET /v1/avatars`), by id."""
        r = self.request("GET", "/v1/avatars", params={"limit": limit, "offset": offset})
        return [AvatarView.model_validate(a) for a in r.json()]

    def sessions(self) -> list[SessionView]:
        """The live sessions not yet ended (`GET /v1/sessions`), by id: to find one whose id was lost."""
        return [SessionView.model_validate(v) for v in self.request("GET", "/v1/sessions").json()]

    def submit_batch(self, audios: list[str], video: str | None = None, avatar: str | None = None,
                     **options) -> BatchView:
        """Many audios (local files, URLs or server paths) against one template or avatar; its jobs
        are `<batch id>--000`, `--001`, ... (an id chosen here, unless given: safe to retry). Local
        files are uploaded first, each once (`POST /v1/uploads`)."""
        uploaded = {}
        for path in _batch_locals(audios, video):
            uploads = _Uploads({"file": path})
            try:
                r = self.request("POST", "/v1/uploads", ok=(201,), idempotent=True,  # stored by content
                                 rewind=uploads, timeout=max(self.timeout, 600))
            finally:
                uploads.close()
            uploaded[path] = UploadedFile.model_validate(r.json()).ref
        body = _batch_body(audios, video, avatar, options, uploaded)
        try:
            r = self.request("POST", "/v1/batches", ok=(202,), idempotent=True, json=body,
                                 timeout=_answer_s(self, body))
        except ApiError as e:
            raise BatchRefused(e, body["id"]) from e
        return self._views(BatchView, r.json())

    def batch(self, batch_id: str) -> BatchView:
        return self._views(BatchView, self.request("GET", f"/v1/batches/{_q(batch_id)}").json())

    def cancel_batch(self, batch_id: str) -> BatchView:
        """Cancel the batch's unfinished jobs (finished ones are left as they are)."""
        return self._views(BatchView, self.request("DELETE", f"/v1/batches/{_q(batch_id)}").json())


def _batch_locals(audios: list[str], video: str | None) -> list[str]:
    """The batch's inputs that are local files (uploaded first, as `submit` uploads its own: a batch
    is JSON); anything else that is neither a URL nor an absolute server path is refused here."""
    local = []
    for field, value in [*(("audios", a) for a in audios), ("video", video)]:
        if value is None:
            continue
        if _is_local_file(value):
            local.append(str(value))
        else:
            _check_not_local(field, value)
    return list(dict.fromkeys(local))


def local_input_error(field: str, value) -> InputError | None:
    """Why `value` cannot be sent as the input `field`, before anything is sent (the SDK and the CLI
    both ask): None for a URL, an upload reference, a local regular file, or an absolute path that is
    none here (a server's file, or one this user may not look at: the server judges it); else an empty
    name, a name this system refuses (NUL, too long, an unknown `~user`), a local directory, pipe, socket
    or device, or a relative name that is no local file (a typo: a server-side path must be absolute). Its
    `path` is the file as given, its `field` the input's."""
    s = str(value)
    if "://" in s or s.startswith("upload:"):
        return None
    if not s:
        return InputError(f"{field} is empty: expected a local file, a URL or an absolute server path", field=field)
    if "\0" in s:
        return InputError(f"{field} {s!r}: a name with a NUL byte", path=s, field=field)
    server = PurePosixPath(s).is_absolute()  # (the server's paths, whatever this OS)
    try:
        mode = os.stat(Path(s).expanduser()).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except RuntimeError:  # expanduser: `~name` of no user here
        return InputError(f"{field} {s}: no user's home directory is named so here", path=s, field=field)
    except OSError as e:  # too long, a symlink loop, no permission to look
        if server and e.errno != errno.ENAMETOOLONG:
            return None
        return InputError(f"{field} {s}: {os_reason(e)}", path=s, field=field)
    if mode is not None:
        if stat.S_ISREG(mode):
            return None
        if stat.S_ISDIR(mode):
            return InputError(f"{field} {s} is a directory, not a file", path=s, field=field)
        return InputError(f"{field} {s} is not a regular file (a pipe, socket or device): save it to a file "
                          f"first", path=s, field=field)
    if server:
        return None
    return InputNotFound(f"{field} file {s} does not exist here, and is not a URL or an absolute server path",
                         path=s, field=field)


def _check_not_local(field: str, value) -> None:
    """An input that is not a local file must be a URL, an upload reference or an absolute server path."""
    problem = local_input_error(field, value)
    if problem is not None:
        raise problem


def _batch_body(audios: list[str], video: str | None, avatar: str | None, options: dict[str, Any],
                uploaded: dict[str, str] | None = None) -> dict:
    uploaded = uploaded or {}
    audios = [uploaded.get(str(a), a) for a in audios]
    video = uploaded.get(str(video), video) if video is not None else None
    body = {"audios": [str(a) for a in audios], "video": None if video is None else str(video),
            "avatar_id": avatar, **options}
    body["id"] = body.get("id") or uuid.uuid4().hex
    return {k: v for k, v in body.items() if v is not None}


class _SseParser:
    """Server-Sent Events, line by line: one parser for the sync and the async streams. `feed`
    answers (event type, data) when a line completes an event, else None."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        if line == "":
            done = (self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data = "message", []
            return done
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        return None


def _sse_events(lines) -> Iterator[tuple[str, str]]:
    """(event type, data) of each Server-Sent Event."""
    parser = _SseParser()
    for line in lines:
        if (done := parser.feed(line)) is not None:
            yield done


STATUS_EVENTS = ("status", "message")  # the events that carry a JobView; others (a newer server's) are skipped


class _Bar:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None

    def show(self, view: JobView) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            # drawn on a terminal only (no carriage returns into a log); `initial`: the frames a running job
            # had before this bar are not counted in its rate (a first update at 1000 frames read 2007 frames/s)
            self.bar = tqdm(total=max(1, view.frames_total), initial=view.frames_done, unit="frame",
                            desc=view.id[:16], dynamic_ncols=True, disable=None)
        self.bar.total = max(1, view.frames_total or self.bar.total)
        self.bar.n = view.frames_total if view.state == JobState.succeeded else view.frames_done
        self.bar.set_postfix_str(state_said(view))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- async -------------------------------------------------------------------------------------------
class AsyncJob:
    def __init__(self, client: "AsyncClient", view: JobView | JobAccepted) -> None:
        self.client, self.id = client, view.id
        self.view = view if isinstance(view, JobView) else None
        self._watch = view.watch_url

    async def status(self) -> JobView:
        self.view = await self.client.get(self.id)
        return self.view

    @property
    def watch_url(self) -> str | None:
        """The job's HLS playlist (absolute; signed when the service has a token): give it to a player. None once
        the last view seen says the job has no stream (it ended before its first segment, or its files were
        removed)."""
        watch = self.view.watch_url if self.view is not None else self._watch
        return self.client.absolute(watch) if watch else None

    def segments(self, timeout: float | None = None) -> AsyncIterator[HlsSegment]:
        """Each finished HLS segment (absolute `url`) as it is published, until the job ends."""
        return self.client.segments(self.id, timeout=timeout)

    async def wait(self, progress: bool = False, timeout: float | None = None, poll_s: float = 1.0,
                   raise_on_failure: bool = True) -> JobView:
        self.view = await self.client.wait(self.id, progress=progress, timeout=timeout, poll_s=poll_s,
                                           raise_on_failure=raise_on_failure)
        return self.view

    async def download(self, path: str | os.PathLike) -> Path:
        return await self.client.download(self.id, path)

    async def cancel(self) -> JobView:
        self.view = await self.client.cancel(self.id)
        return self.view


class AsyncClient(_Base):
    """The async twin of `Client` (same models, same retries)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0,
                 retries: int = 6, backoff_s: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, token, timeout, retries, backoff_s)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout,
                                      transport=transport, trust_env=False)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, *, ok=(200,), rewind: Callable[[], dict] | None = None,
                      idempotent: bool | None = None, deadline: float | None = None, **kw) -> httpx.Response:
        idempotent = method in ("GET", "HEAD", "DELETE") if idempotent is None else idempotent
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            r = None
            try:
                if rewind is not None:
                    kw.update(rewind())
                if deadline is not None:
                    kw["timeout"] = _within(deadline, self.timeout)
                r = await self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                if not _retryable_error(e, idempotent, upload=rewind is not None):
                    raise _connection_error(e, self.url, method, path, idempotent) from e
                last = e
            else:
                if r.status_code in ok:
                    return r
                if not _retryable(r, idempotent):
                    raise ApiError.from_response(r)
                last = ApiError.from_response(r)
            if attempt < self.retries:
                await asyncio.sleep(self._retry_wait(method, path, attempt, r, last, deadline))
        if isinstance(last, ApiError):
            raise last
        raise _connection_error(last, self.url, method, path, idempotent)

    async def submit(self, audio: str | os.PathLike, video: str | os.PathLike | None = None,
                     avatar: str | None = None, *, id: str | None = None, sync_mode: str | None = None,
                     model: str | None = None, crf: int | None = None, callback_url: str | None = None) -> AsyncJob:
        # an id chosen here makes the submission safe to retry: the server answers a repeat with the same job
        opts = dict(id=id or uuid.uuid4().hex, sync_mode=sync_mode, model=model, crf=crf, callback_url=callback_url)
        files, data, body = _form(audio, video, avatar, opts)
        if body is not None:
            r = await self.request("POST", "/v1/jobs", ok=(202,), idempotent=True, json=body,
                                       timeout=_answer_s(self, body))
        else:
            uploads = _Uploads(files, data)
            try:
                r = await self.request("POST", "/v1/jobs", ok=(202,), idempotent=True, rewind=uploads,
                                       timeout=max(self.timeout, 600), headers={JOB_ID_HEADER: opts["id"]})
            finally:
                uploads.close()
        return AsyncJob(self, JobAccepted.model_validate(r.json()))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self.get(job_id))

    async def avatar(self, avatar_id: str) -> AvatarView:
        return AvatarView.model_validate((await self.request("GET", f"/v1/avatars/{_q(avatar_id)}")).json())

    async def avatars(self, limit: int = 100, offset: int = 0) -> list[AvatarView]:
        """The async twin of `Client.avatars`."""
        r = await self.request("GET", "/v1/avatars", params={"limit": limit, "offset": offset})
        return [AvatarView.model_validate(a) for a in r.json()]

    async def sessions(self) -> list[SessionView]:
        """The async twin of `Client.sessions`."""
        return [SessionView.model_validate(v) for v in (await self.request("GET", "/v1/sessions")).json()]

    async def submit_batch(self, audios: list[str], video: str | None = None, avatar: str | None = None,
                           **options) -> BatchView:
        """The async twin of `Client.submit_batch`."""
        uploaded = {}
        for path in _batch_locals(audios, video):
            uploads = _Uploads({"file": path})
            try:
                r = await self.request("POST", "/v1/uploads", ok=(201,), idempotent=True,  # stored by content
                                       rewind=uploads, timeout=max(self.timeout, 600))
            finally:
                uploads.close()
            uploaded[path] = UploadedFile.model_validate(r.json()).ref
        body = _batch_body(audios, video, avatar, options, uploaded)
        try:
            r = await self.request("POST", "/v1/batches", ok=(202,), idempotent=True, json=body,
                                       timeout=_answer_s(self, body))
        except ApiError as e:
            raise BatchRefused(e, body["id"]) from e
        return self._views(BatchView, r.json())

    async def batch(self, batch_id: str) -> BatchView:
        return self._views(BatchView, (await self.request("GET", f"/v1/batches/{_q(batch_id)}")).json())

    async def cancel_batch(self, batch_id: str) -> BatchView:
        """Cancel the batch's unfinished jobs (finished ones are left as they are)."""
        return self._views(BatchView, (await self.request("DELETE", f"/v1/batches/{_q(batch_id)}")).json())

    async def get(self, job_id: str, deadline: float | None = None) -> JobView:
        return self._views(JobView, (await self.request("GET", f"/v1/jobs/{_q(job_id)}", deadline=deadline)).json())

    async def prepare_avatar(self, video: str | os.PathLike) -> AvatarView:
        if _is_local_file(video):
            uploads = _Uploads({"video": video})
            try:
                r = await self.request("POST", "/v1/avatars", ok=(201,), rewind=uploads,
                                       timeout=max(self.timeout, 900))
            finally:
                uploads.close()
        else:
            r = await self.request("POST", "/v1/avatars", ok=(201,), json={"video": str(video)},
                                   timeout=max(self.timeout, 900))
        return AvatarView.model_validate(r.json())

    async def list(self, state: list[str] | str | None = None, limit: int = 50, offset: int = 0,
                   before: str | None = None) -> JobPage:
        """Newest first; the next page is `before=page.next_before` (steady while jobs are submitted)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if before is not None:
            params["before"] = before
        if state:
            params["state"] = [state] if isinstance(state, str) else list(state)
        return self._views(JobPage, (await self.request("GET", "/v1/jobs", params=params)).json())

    async def cancel(self, job_id: str) -> JobView:
        return self._views(JobView, (await self.request("DELETE", f"/v1/jobs/{_q(job_id)}")).json())

    async def purge(self, job_id: str) -> JobView:
        """The async twin of `Client.purge`."""
        return self._views(JobView, (await self.request("DELETE", f"/v1/jobs/{_q(job_id)}/files")).json())

    async def _events_of(self, job_id: str, params: dict | None,
                         deadline: _Deadline) -> AsyncIterator[tuple[str, str]]:
        """The async twin of `Client._events_of`."""
        path = f"/v1/jobs/{_q(job_id)}/events"
        again, ended = _Reconnects(self, deadline, path), False
        while True:
            try:
                async with self.http.stream("GET", path, params=params, timeout=deadline.http(self.timeout)) as r:
                    if r.status_code == 200:
                        parser = _SseParser()
                        with deadline.reads():
                            async for line in r.aiter_lines():
                                if (done := parser.feed(line)) is not None:
                                    again.delivered()
                                    ended = ended or _ends_the_job(done)
                                    yield done
                                deadline.check()
                        if ended:
                            return
                        delay = again.broke(httpx.RemoteProtocolError("the event stream ended before the job"))
                    else:
                        await r.aread()
                        delay = again.refused(r)
            except httpx.TransportError as e:
                delay = again.broke(e)
            await asyncio.sleep(delay)

    async def events(self, job_id: str, timeout: float | None = None) -> AsyncIterator[JobView]:
        """The async twin of `Client.events`."""
        deadline = _Deadline(timeout, f"job {job_id}: no end within {timeout or 0:.1f} s")
        async with contextlib.aclosing(self._events_of(job_id, None, deadline)) as stream:  # closed with this
            async for event, data in stream:
                if event in STATUS_EVENTS:
                    yield self._views(JobView, data)

    async def segments(self, job_id: str, timeout: float | None = None) -> AsyncIterator[HlsSegment]:
        """The async twin of `Client.segments`."""
        deadline = _Deadline(timeout, f"job {job_id}: segments still coming after {timeout or 0:.1f} s")
        following = 0
        async with contextlib.aclosing(self._events_of(job_id, {"segments": 1}, deadline)) as stream:
            async for event, data in stream:
                if event == "segment" and (segment := HlsSegment.model_validate_json(data)).index >= following:
                    following = segment.index + 1
                    yield _segment_urls(self, segment)

    async def fetch(self, segment: HlsSegment | str) -> bytes:
        """The async twin of `Client.fetch`."""
        return (await self.request("GET", segment if isinstance(segment, str) else segment.url)).content

    async def wait(self, job_id: str, progress: bool = False, timeout: float | None = None, poll_s: float = 1.0,
                   raise_on_failure: bool = True) -> JobView:
        """The async twin of `Client.wait`."""
        w = _Wait(job_id, progress, timeout)
        try:
            try:  # the stream closed as the loop ends (left open, the event loop's shutdown closed it: an error)
                async with contextlib.aclosing(self.events(job_id, timeout=w.left())) as views:
                    async for view in views:
                        if w.seen(view):
                            break
            except (httpx.HTTPError, ApiError, WaitTimeout) as e:  # polled below (past the deadline: raised)
                w.stream_broke(e)
            while w.polling():
                try:
                    view = await self.get(job_id, deadline=w.deadline)
                except WaitTimeout as e:  # no answer before the deadline
                    raise w.timeout(e) from e
                except ApiError as e:
                    if not w.passing(e):
                        raise
                    await asyncio.sleep(min(poll_s * 2, w.left()))
                    continue
                if not w.seen(view):
                    await asyncio.sleep(poll_s)
        finally:
            w.close()
        return w.result(raise_on_failure)

    async def download(self, job_id: str, path: str | os.PathLike) -> Path:
        """The async twin of `Client.download` (same resume, retries and checks)."""
        dl = _Download(job_id, path)
        for attempt in range(self.retries + 1):
            try:
                async with self.http.stream("GET", f"/v1/jobs/{_q(job_id)}/result", headers=dl.headers()) as r:
                    if r.status_code not in (200, 206):
                        await r.aread()
                    verdict = dl.verdict(r, attempt, self.retries)
                    if verdict == "write":
                        with dl.open(r) as f:
                            async for block in r.aiter_bytes():  # as it arrives: a cut loses nothing
                                f.write(block)
                if verdict == "retry":
                    await asyncio.sleep(_retry_delay(attempt, r, self.backoff_s))
                elif dl.whole(verdict):
                    break
            except httpx.TransportError as e:
                if attempt >= self.retries:
                    raise dl.failed(e) from e
                await asyncio.sleep(_retry_delay(attempt, None, self.backoff_s))
        return dl.finish(self.retries)


# --- live sessions (`/v1/sessions`): `client.live(avatar_id)` --------------------------------------
# Added to Client / AsyncClient below the classes (this section is the live sessions' own).
from cluster.schemas import SessionCreate, SessionView  # noqa: E402


def _ws_error(code: int | None, reason: str) -> ApiError:
    names = {4400: "input.odd_pcm", 4401: "auth.invalid_token", 4404: "session.not_found",
             4409: "session.socket_in_use", 4410: "session.ended", 4415: "input.sample_rate",
             4422: "input.invalid_message"}
    return ApiError(code or 0, names.get(code or 0, "session.socket_closed"), reason or f"socket closed ({code})")


def _pcm_of_file(path: str | os.PathLike, sample_rate: int) -> bytes:
    """A local audio file as PCM s16le mono at `sample_rate` (decoded with the project's ffmpeg)."""
    import numpy as np

    from cluster.audio import load_audio

    wav = load_audio(str(path), sample_rate=sample_rate)
    return (np.clip(wav, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class _LiveBase:
    """What both twins keep: the session's view, the bytes the server confirmed, the bytes sent
    after that (re-sent from the server's offset when a socket is reopened)."""

    def __init__(self, view: SessionView, chunk_ms: int) -> None:
        self.view = view
        self.id, self.hls_url, self.sample_rate = view.id, view.hls_url, view.sample_rate
        self.chunk_bytes = max(2, int(view.sample_rate * chunk_ms / 1000) * 2)
        self._base = 0  # server offset of self._unconfirmed[0]
        self._unconfirmed = bytearray()
        self.sent = 0
        self._opened = False  # an audio socket was open once: a refusal as "in use" then is our own lost one
        self._refused: ApiError | None = None  # the service's close (4xxx) of the socket a `send` wrote to
        # why `close` after an error could not end the session (its one DELETE failed: logged, never raised)
        self.end_error: ApiError | None = None

    @property
    def _over(self) -> bool:
        """Whether the session has ended or failed, as its view last read."""
        return self.view.state in ("ended", "failed")

    def _all_rendered(self, view: SessionView) -> bool:
        """`wait_rendered`'s end: the session is ending or over, or it has received everything this client sent
        (`_unreceived`: a sync `send` returns once its bytes are in the socket's buffer, and the view read next
        said 0 of 0 s rendered for 24 s just sent) and rendered all it received. (`starting`: a restarted actor
        bringing its encoder back, which then renders what it has.)"""
        return view.state in ("ending", "ended", "failed") or (
            view.state == "live" and not self._unreceived(view) and view.buffered_seconds == 0
            and view.seconds_rendered >= view.seconds_received - 1e-3)

    def _unreceived(self, view: SessionView) -> bool:
        """Whether the service has not received all this client sent (the server offset of its end)."""
        return view.bytes_received < self._base + len(self._unconfirmed)

    def _socket_gone(self) -> bool:
        """Whether the audio socket is closed (by the service, or lost): what was sent after the service's
        offset is then only sent again when a socket is opened."""
        from websockets.protocol import State

        return self._ws is not None and self._ws.state is not State.OPEN

    def _left_unreceived(self, view: SessionView) -> ApiError | None:
        """`wait_rendered`'s failure where it cannot end: the service closed the audio socket a `send` wrote to
        with a refusal (`_refused`: 4409, another socket took the session over) and has not received all this
        client sent, which no socket of this client then sends (it waited out its timeout)."""
        if self._refused is None or self._ws is not None or view.state != "live" or not self._unreceived(view):
            return None
        missing = (self._base + len(self._unconfirmed) - view.bytes_received) / (2 * self.sample_rate)
        return ApiError(self._refused.status, self._refused.code, f"live session {self.id}: {missing:.2f} s of "
                        f"the speech sent were not received: the service closed its audio socket "
                        f"({self._refused.message}); send again to open one")

    def _end_timeout(self) -> float:
        """How long the end of the speech may take to be confirmed: the server reads the speech queued
        ahead of it at its rendering pace (backpressure), so at least the seconds not yet confirmed."""
        return self.client.timeout + len(self._unconfirmed) / (2 * self.sample_rate)

    def _end_not_confirmed(self) -> WaitTimeout:
        return WaitTimeout(f"live session {self.id}: the end of the speech was not confirmed within "
                           f"{self._end_timeout():.0f} s")

    def _held_by_our_lost_socket(self, e: ApiError, deadline: float) -> bool:
        """Whether to open the socket again after `e`: a reconnect (a socket was open before) meets the
        lost one's hold on the session (4409) for a few seconds, until `deadline`."""
        return e.code == "session.socket_in_use" and self._opened and time.monotonic() < deadline

    @staticmethod
    def _how_lost(code: int | None, reason: str) -> str:
        if code is None:
            return "its connection dropped without a close"
        names = {1001: "going away", 1006: "no close frame", 1011: "server error", 1012: "service restart",
                 1013: "try again later"}
        said = reason or names.get(code)
        return f"closed with code {code}" + (f": {said}" if said else "")

    def _socket_lost(self, code: int | None, reason: str, again: ApiError) -> ApiError:
        """The error of a socket that was lost (`code`, `reason`) and that could not be opened again
        (`again`): it names the loss first (the service may have stopped), then the reopening's failure."""
        if again.status != 0 or not again.code.startswith("connection."):  # the service answered: its refusal
            return again
        opening = again.message.removeprefix(f"live session {self.id}: ")
        unanswered = getattr(again, "unanswered", False)
        gone = "the service stopped answering" if unanswered else "the service may have stopped"
        return ApiError(0, again.code, f"live session {self.id}: its audio socket was lost "
                        f"({self._how_lost(code, reason)}) and could not be opened again ({opening}): {gone}")

    def _end_lost(self, code: int | None, reason: str) -> ApiError:
        """The error of the socket closed before the end of the speech was confirmed."""
        if code is not None and 4000 <= code < 5000:  # the service's refusal, as itself
            return _ws_error(code, reason)
        return ApiError(0, "session.socket_closed", f"live session {self.id}: its audio socket was lost "
                        f"({self._how_lost(code, reason)}) before the end of the speech was confirmed")

    def _recording_path(self) -> str:
        return f"/v1/sessions/{self.id}/recording"

    def _not_ended(self, error: BaseException, failure: ApiError) -> None:
        """The one DELETE of a close after `error` failed (`failure`): logged at WARNING and noted on
        `error` (what the caller raises), never raised in its place."""
        self.end_error = failure
        answer = (f"no answer ({failure.message.split(': no answer from ', 1)[-1]})" if failure.status == 0
                  else f"answered {failure.status} {failure.code}: {failure.message}")
        said = (f"live session {self.id}: not ended after {type(error).__name__}: DELETE /v1/sessions/{self.id}: "
                f"{answer}; tried once, not again. The service ends it by itself: a service that was killed reads it "
                f"failed (session.actor_lost) once back; one that runs on ends it once idle "
                f"(LIPSYNC_LIVE_IDLE_TIMEOUT_S). Its recording is then at {self.client.url}{self._recording_path()}")
        log.warning("%s", said)
        if isinstance(error, Exception):
            error.add_note(said)

    def _after_error(self, r: httpx.Response | None, e: httpx.TransportError | None) -> ApiError | None:
        """The outcome of a close's one DELETE after an error: None when the session was ended (`view`
        updated), else its failure."""
        path = f"/v1/sessions/{self.id}"
        if r is None:
            return _connection_error(e, self.client.url, "DELETE", path, True)
        if r.status_code != 200:
            return ApiError.from_response(r)
        self.view = SessionView.model_validate(r.json())
        return None

    def _end_refused(self, e: ApiError, what: str) -> None:
        """`what` (the POST /end, or a GET of the session while it ends) was answered `e`: the session is
        ended now (DELETE) instead; no answer at all is raised (a DELETE would not get one either)."""
        if e.status == 0:
            raise e
        log.info("live session %s: %s was answered %s %s: %s; ending it now (DELETE)", self.id, what,
                 e.status, e.code, e.message)

    @staticmethod
    def _closed(e: Exception) -> tuple[int | None, str]:
        """The close code and reason a socket error carries (None and the error without one)."""
        rcvd = getattr(e, "rcvd", None)
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, repr(e))

    def __repr__(self) -> str:
        return f"LiveSession({self.id!r}, {self.view.state})"

    def _ready(self, message: str | bytes) -> None:
        import json

        info = json.loads(message)
        offset = int(info.get("offset", 0))
        drop = max(0, offset - self._base)
        del self._unconfirmed[:drop]
        self._base = max(self._base, offset)

    def _remember(self, pcm: bytes) -> None:
        self._unconfirmed += pcm
        self.sent += len(pcm)
        if len(self._unconfirmed) > 64 * 1024 * 1024:  # keep the last 64 MiB for a resume
            cut = len(self._unconfirmed) - 64 * 1024 * 1024
            del self._unconfirmed[:cut]
            self._base += cut


class LiveSession(_LiveBase):
    """A live session (sync). `send(pcm)` streams PCM s16le mono at `sample_rate` over the
    session's WebSocket (reopened and resumed from the server's offset if it drops);
    `send_file(path, realtime=True)` paces a file at real time; `stats()` the figures; leaving
    the `with` block ends the speech, waits until it is rendered and ends the session."""

    def __init__(self, client: "Client", view: SessionView, chunk_ms: int = 20) -> None:
        super().__init__(view, chunk_ms)
        self.client = client
        self._ws = None

    def _socket(self):
        if self._ws is None:
            deadline = time.monotonic() + SOCKET_TAKEOVER_S
            refreshed = False
            while True:
                try:
                    self._open_socket()
                    break
                except ApiError as e:
                    if e.code == "auth.invalid_token" and not refreshed:  # its token expired (a reconnect after
                        refreshed = True  # LIPSYNC_LIVE_TOKEN_TTL_S): the session's view carries a fresh one
                        self.stats()
                        continue
                    if not self._held_by_our_lost_socket(e, deadline):
                        raise
                    time.sleep(0.5)
        return self._ws

    def _open_socket(self) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        try:
            self._ws = connect(self.view.audio_ws, open_timeout=self.client.timeout, max_size=1 << 20)
        except (OSError, WebSocketException) as e:  # refused, timed out, a handshake answered with an error
            unopened = ApiError(0, "connection.failed", f"live session {self.id}: its audio socket could not be "
                                f"opened: {e!r}")
            unopened.unanswered = isinstance(e, OSError)  # refused, timed out: not a handshake's answer
            raise unopened from None
        try:
            self._ready(self._ws.recv(timeout=self.client.timeout))
        except Exception as e:
            code, reason = self._closed(e)
            ws, self._ws = self._ws, None
            ws.close()  # not left open behind us: the server allows one audio socket per session
            raise _ws_error(code, reason) from None
        self._opened = True
        self._refused = None
        if self._unconfirmed:  # resume: what the server did not get yet
            self._ws.send(bytes(self._unconfirmed))

    def send(self, pcm: bytes) -> None:
        """Send PCM (an even number of bytes); reopens a dropped socket once and resumes."""
        from websockets.exceptions import ConnectionClosed

        if len(pcm) % 2:
            raise ValueError(f"PCM s16le needs an even byte count, got {len(pcm)}")
        ws = self._socket()  # opened (and resumed) before this chunk is remembered: sent once
        self._remember(pcm)
        try:
            ws.send(pcm)
        except ConnectionClosed as e:
            code, reason = self._closed(e)
            self._ws = None
            if code is not None and 4000 <= code < 5000:
                self._refused = _ws_error(code, reason)
                raise self._refused from None
            try:
                self._socket()  # reopened: re-sends everything after the server's offset, this chunk included
            except ApiError as again:
                raise self._socket_lost(code, reason, again) from None

    def end(self) -> None:
        """End the utterance (its tail renders now; the session stays, idle)."""
        import json

        from websockets.exceptions import ConnectionClosed

        ws = self._socket()
        try:
            ws.send(json.dumps({"type": "end"}))
            self._ready(ws.recv(timeout=self._end_timeout()))
        except ConnectionClosed as e:
            self._ws = None
            raise self._end_lost(*self._closed(e)) from None
        except TimeoutError:
            raise self._end_not_confirmed() from None

    def send_file(self, path: str | os.PathLike, realtime: bool = True) -> float:
        """Send a local audio file (any format ffmpeg reads, resampled to the session's rate) in
        chunks, paced at real time when `realtime`; then end the utterance. Its seconds."""
        pcm = _pcm_of_file(path, self.sample_rate)
        t0 = time.monotonic()
        for i in range(0, len(pcm), self.chunk_bytes):
            self.send(pcm[i:i + self.chunk_bytes])
            if realtime:
                time.sleep(max(0.0, t0 + (i + self.chunk_bytes) / (2 * self.sample_rate) - time.monotonic()))
        self.end()
        return len(pcm) / (2 * self.sample_rate)

    def stats(self) -> SessionView:
        self.view = SessionView.model_validate(self.client.request("GET", f"/v1/sessions/{self.id}").json())
        return self.view

    def wait_rendered(self, timeout: float = 60.0, poll_s: float = 0.25) -> SessionView:
        """Wait until everything sent has been received and rendered (or the session ended). Speech the
        service has not received while the audio socket is closed (a service that closed it after the last
        `send`) is sent again on a socket opened for it."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.stats()
            if self._all_rendered(view):
                return view
            if (refused := self._left_unreceived(view)) is not None:
                raise refused
            if view.state == "live" and self._unreceived(view) and self._socket_gone():
                self._ws = None
                self._socket()  # opened again: it sends what the service has not received
            if time.monotonic() > deadline:
                raise WaitTimeout(f"session {self.id}: speech not rendered within {timeout:g} s")
            time.sleep(poll_s)

    def close(self, wait_s: float = 60.0, error: BaseException | None = None) -> SessionView:
        """End the speech, wait (bounded) until it is rendered, end the session: its final view.

        A normal end (no `error`) ends the speech on the audio socket, waits until it is rendered, then
        asks the service to end the session once everything it received is rendered (`POST /end`: its
        reason reads `finished`) and waits for that end; it is ended now (DELETE) when `/end` was refused
        or the end did not come in time. Its time is bounded by the sum of its steps, not by `wait_s`:
        the speech's end confirmed within `client.timeout` plus the seconds of speech the server had not
        confirmed, up to `wait_s` for the rendering, the `POST /end`, up to `wait_s` again for the
        session's end, then a DELETE of up to 120 s an attempt (each request retried as the client's
        others are). A failure of the speech's end or of its rendering ends the session with one DELETE
        (as below) and is raised.

        A close after an error (`error`: the one the caller is raising, as leaving the `with` block on
        one) neither ends the speech nor waits for it: it closes the audio socket and ends the session
        with one DELETE (`CLOSE_AFTER_ERROR_TIMEOUT`), not retried; a failure of it is logged at WARNING,
        noted on that error and kept in `end_error`, never raised in its place (the service may have
        stopped: that error says so). A KeyboardInterrupt there is raised after that DELETE."""
        failed: BaseException | None = None
        try:
            try:
                if error is None and self._ws is not None and self.view.state == "live":
                    try:
                        self.end()
                    except ApiError as e:
                        if e.code != "session.ended":  # ended by itself (idle): its view says so below
                            raise
                    else:
                        self.wait_rendered(wait_s)
            finally:
                if self._ws is not None:
                    ws, self._ws = self._ws, None
                    ws.close()
        except BaseException as e:
            failed = e
        if error is None and failed is None:
            return self._finish(wait_s)
        self._delete_once(error or failed)
        if error is None or isinstance(failed, _INTERRUPTS):  # a Ctrl-C while closing is not swallowed
            raise failed
        return self.view

    def _finish(self, wait_s: float) -> SessionView:
        """`POST /end`, then the session's end waited for (`wait_s`); DELETE when refused or not in time."""
        try:
            self.view = SessionView.model_validate(
                self.client.request("POST", f"/v1/sessions/{self.id}/end", idempotent=True).json())
        except ApiError as e:
            self._end_refused(e, "its end (POST /end)")
        else:
            deadline = time.monotonic() + wait_s
            try:
                while not self._over and time.monotonic() < deadline:
                    time.sleep(END_POLL_S)
                    self.stats()
            except ApiError as e:
                self._end_refused(e, f"its state, read while it ends (GET /v1/sessions/{self.id})")
        if not self._over:
            self.view = SessionView.model_validate(
                self.client.request("DELETE", f"/v1/sessions/{self.id}", timeout=120.0).json())
        return self.view

    def _delete_once(self, error: BaseException) -> None:
        """The session ended after `error` with one DELETE (`CLOSE_AFTER_ERROR_TIMEOUT`, not retried)."""
        r = e = None
        try:
            r = self.client.http.request("DELETE", f"/v1/sessions/{self.id}", timeout=CLOSE_AFTER_ERROR_TIMEOUT)
        except httpx.TransportError as lost:
            e = lost
        failure = self._after_error(r, e)
        if failure is not None:
            self._not_ended(error, failure)

    def download_recording(self, path: str | os.PathLike, timeout: float = RECORDING_WAIT_S) -> Path:
        """The session's recording (once it has ended: a session still ending, e.g. just after a
        `close` that waited its bound, is waited for up to `timeout`)."""
        from cluster.fsutil import atomic_writer

        dest = Path(path).expanduser()
        deadline = time.monotonic() + timeout
        while True:
            with self.client.http.stream("GET", f"/v1/sessions/{self.id}/recording") as r:
                if r.status_code == 200:
                    with atomic_writer(dest) as f:  # whole or not at all (an error or Ctrl-C leaves no half mp4)
                        for block in r.iter_bytes():  # as it arrives: a cut loses nothing
                            f.write(block)
                    return dest
                r.read()
                error = ApiError.from_response(r)
            if error.code != "session.not_ended" or time.monotonic() >= deadline:
                raise error
            time.sleep(1.0)

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close(error=exc[1])


class AsyncLiveSession(_LiveBase):
    """The async twin of `LiveSession`."""

    def __init__(self, client: "AsyncClient", view: SessionView, chunk_ms: int = 20) -> None:
        super().__init__(view, chunk_ms)
        self.client = client
        self._ws = None

    async def _socket(self):
        if self._ws is None:
            deadline = time.monotonic() + SOCKET_TAKEOVER_S
            refreshed = False
            while True:
                try:
                    await self._open_socket()
                    break
                except ApiError as e:
                    if e.code == "auth.invalid_token" and not refreshed:  # expired: a fresh token (as sync)
                        refreshed = True
                        await self.stats()
                        continue
                    if not self._held_by_our_lost_socket(e, deadline):
                        raise
                    await asyncio.sleep(0.5)
        return self._ws

    async def _open_socket(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        try:
            self._ws = await connect(self.view.audio_ws, open_timeout=self.client.timeout, max_size=1 << 20)
        except (OSError, WebSocketException) as e:
            unopened = ApiError(0, "connection.failed", f"live session {self.id}: its audio socket could not be "
                                f"opened: {e!r}")
            unopened.unanswered = isinstance(e, OSError)  # refused, timed out: not a handshake's answer
            raise unopened from None
        try:
            self._ready(await asyncio.wait_for(self._ws.recv(), self.client.timeout))
        except Exception as e:
            code, reason = self._closed(e)
            ws, self._ws = self._ws, None
            await ws.close()
            raise _ws_error(code, reason) from None
        self._opened = True
        self._refused = None
        if self._unconfirmed:
            await self._ws.send(bytes(self._unconfirmed))

    async def send(self, pcm: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        if len(pcm) % 2:
            raise ValueError(f"PCM s16le needs an even byte count, got {len(pcm)}")
        ws = await self._socket()
        self._remember(pcm)
        try:
            await ws.send(pcm)
        except ConnectionClosed as e:
            code, reason = self._closed(e)
            self._ws = None
            if code is not None and 4000 <= code < 5000:
                self._refused = _ws_error(code, reason)
                raise self._refused from None
            try:
                await self._socket()
            except ApiError as again:
                raise self._socket_lost(code, reason, again) from None

    async def end(self) -> None:
        import json

        from websockets.exceptions import ConnectionClosed

        ws = await self._socket()
        try:
            await ws.send(json.dumps({"type": "end"}))
            self._ready(await asyncio.wait_for(ws.recv(), self._end_timeout()))
        except ConnectionClosed as e:
            self._ws = None
            raise self._end_lost(*self._closed(e)) from None
        except (TimeoutError, asyncio.TimeoutError):
            raise self._end_not_confirmed() from None

    async def send_file(self, path: str | os.PathLike, realtime: bool = True) -> float:
        pcm = await asyncio.to_thread(_pcm_of_file, path, self.sample_rate)
        t0 = time.monotonic()
        for i in range(0, len(pcm), self.chunk_bytes):
            await self.send(pcm[i:i + self.chunk_bytes])
            if realtime:
                await asyncio.sleep(max(0.0, t0 + (i + self.chunk_bytes) / (2 * self.sample_rate) - time.monotonic()))
        await self.end()
        return len(pcm) / (2 * self.sample_rate)

    async def stats(self) -> SessionView:
        r = await self.client.request("GET", f"/v1/sessions/{self.id}")
        self.view = SessionView.model_validate(r.json())
        return self.view

    async def wait_rendered(self, timeout: float = 60.0, poll_s: float = 0.25) -> SessionView:
        deadline = time.monotonic() + timeout
        while True:
            view = await self.stats()
            if self._all_rendered(view):
                return view
            if (refused := self._left_unreceived(view)) is not None:
                raise refused
            if view.state == "live" and self._unreceived(view) and self._socket_gone():
                self._ws = None
                await self._socket()  # opened again: it sends what the service has not received (as sync)
            if time.monotonic() > deadline:
                raise WaitTimeout(f"session {self.id}: speech not rendered within {timeout:g} s")
            await asyncio.sleep(poll_s)

    async def close(self, wait_s: float = 60.0, error: BaseException | None = None) -> SessionView:
        """The async twin of `LiveSession.close` (`POST /end` on a normal end; after an error one DELETE,
        neither ending the speech nor waiting for it). A cancellation (e.g. `asyncio.timeout`) or a
        KeyboardInterrupt while it closes is raised, after the one DELETE, also when `error` is given."""
        failed: BaseException | None = None
        try:
            try:
                if error is None and self._ws is not None and self.view.state == "live":
                    try:
                        await self.end()
                    except ApiError as e:
                        if e.code != "session.ended":  # ended by itself (idle): its view says so below
                            raise
                    else:
                        await self.wait_rendered(wait_s)
            finally:
                if self._ws is not None:
                    ws, self._ws = self._ws, None
                    await ws.close()
        except BaseException as e:
            failed = e
        if error is None and failed is None:
            return await self._finish(wait_s)
        await self._delete_once(error or failed)
        if error is None or isinstance(failed, _INTERRUPTS):  # a cancellation while closing is not swallowed
            raise failed
        return self.view

    async def _finish(self, wait_s: float) -> SessionView:
        try:
            r = await self.client.request("POST", f"/v1/sessions/{self.id}/end", idempotent=True)
            self.view = SessionView.model_validate(r.json())
        except ApiError as e:
            self._end_refused(e, "its end (POST /end)")
        else:
            deadline = time.monotonic() + wait_s
            try:
                while not self._over and time.monotonic() < deadline:
                    await asyncio.sleep(END_POLL_S)
                    await self.stats()
            except ApiError as e:
                self._end_refused(e, f"its state, read while it ends (GET /v1/sessions/{self.id})")
        if not self._over:
            r = await self.client.request("DELETE", f"/v1/sessions/{self.id}", timeout=120.0)
            self.view = SessionView.model_validate(r.json())
        return self.view

    async def _delete_once(self, error: BaseException) -> None:
        r = e = None
        try:
            r = await self.client.http.request("DELETE", f"/v1/sessions/{self.id}",
                                               timeout=CLOSE_AFTER_ERROR_TIMEOUT)
        except httpx.TransportError as lost:
            e = lost
        failure = self._after_error(r, e)
        if failure is not None:
            self._not_ended(error, failure)

    async def download_recording(self, path: str | os.PathLike, timeout: float = RECORDING_WAIT_S) -> Path:
        """The async twin of `LiveSession.download_recording`."""
        from cluster.fsutil import atomic_writer

        dest = Path(path).expanduser()
        deadline = time.monotonic() + timeout
        while True:
            async with self.client.http.stream("GET", f"/v1/sessions/{self.id}/recording") as r:
                if r.status_code == 200:
                    with atomic_writer(dest) as f:
                        async for block in r.aiter_bytes():  # as it arrives: a cut loses nothing
                            f.write(block)
                    return dest
                await r.aread()
                error = ApiError.from_response(r)
            if error.code != "session.not_ended" or time.monotonic() >= deadline:
                raise error
            await asyncio.sleep(1.0)

    async def __aenter__(self) -> "AsyncLiveSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close(error=exc[1])


def _session_body(avatar_id: str, model: str | None, sample_rate: int, max_seconds: float | None,
                  rtmp_url: str | None = None, segment_seconds: float | None = None) -> dict:
    try:
        return SessionCreate(avatar_id=avatar_id, model=model, sample_rate=sample_rate, max_seconds=max_seconds,
                             rtmp_url=rtmp_url, segment_seconds=segment_seconds).model_dump(exclude_none=True)
    except ValidationError as e:  # said as the SDK's other local refusals are (pydantic's own error was raised)
        raise RequestInvalid(e) from None


class RequestInvalid(InputError):
    """A request the shared schema refuses, before it is sent: `problems`, one per field
    ("field: why (got value)"), and the first field as `path`."""

    def __init__(self, error: ValidationError) -> None:
        self.problems = [f"{'.'.join(str(part) for part in err['loc']) or 'body'}: {err['msg']} "
                         f"(got {err.get('input')!r})" for err in error.errors()]
        first = error.errors()[0]["loc"]
        super().__init__("; ".join(self.problems), path=".".join(str(part) for part in first) or "body")


def _client_live(self: Client, avatar_id: str, *, model: str | None = None, sample_rate: int = 16000,
                 max_seconds: float | None = None, chunk_ms: int = 20, rtmp_url: str | None = None,
                 segment_seconds: float | None = None) -> LiveSession:
    """Start a live session on a prepared avatar: `with client.live(avatar_id) as s: s.send(pcm)`.
    `rtmp_url`: the stream is also pushed to this RTMP server (rtmp://host/app/stream-key).
    `segment_seconds`: the stream's longest HLS segment (shorter: closer to live, more bitrate)."""
    r = self.request("POST", "/v1/sessions", ok=(201,), idempotent=False,
                     json=_session_body(avatar_id, model, sample_rate, max_seconds, rtmp_url, segment_seconds),
                     timeout=max(self.timeout, 360.0))
    return LiveSession(self, SessionView.model_validate(r.json()), chunk_ms)


async def _async_client_live(self: AsyncClient, avatar_id: str, *, model: str | None = None, sample_rate: int = 16000,
                             max_seconds: float | None = None, chunk_ms: int = 20,
                             rtmp_url: str | None = None, segment_seconds: float | None = None) -> AsyncLiveSession:
    """`async with await client.live(avatar_id) as s: await s.send(pcm)`."""
    r = await self.request("POST", "/v1/sessions", ok=(201,), idempotent=False,
                           json=_session_body(avatar_id, model, sample_rate, max_seconds, rtmp_url,
                                              segment_seconds),
                           timeout=max(self.timeout, 360.0))
    return AsyncLiveSession(self, SessionView.model_validate(r.json()), chunk_ms)


Client.live = _client_live
AsyncClient.live = _async_client_live


__all__ = ["ApiError", "AsyncClient", "AsyncJob", "AsyncLiveSession", "BatchRefused", "Client", "Job", "JobFailed",
           "LiveSession", "WaitTimeout"]
