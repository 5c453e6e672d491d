"""What the routers share: admission, staging inputs, submitting a job, callbacks, streaming a
result, and the compatibility API's files. `Backend` wraps the job manager's async handle
(`actors.service_support.ManagerGateway`); one lives on `app.state.backend` (`get_backend`)."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from cluster.config import Settings
from cluster.errors import JobNotFound, JobNotReady, LipsyncError, TooManyEventStreams
from cluster.hls import sign_watch, watch_expiry, watch_key
from cluster.models import is_named_model
from cluster.netguard import download, is_url
from cluster.owners import identity_gone, process_identity
from cluster.render import new_job_id
from cluster.schemas import CallbackView, JobState, JobStatus, JobView, RenderRequest
from cluster.views import job_view
from service.errors import ApiProblem, QueueFull, error_response

log = logging.getLogger("lipsync.service")

#: How long `POST /upload` files are kept in a replica's temporary directory (no compat_data_dir)
COMPAT_TMP_UPLOAD_TTL_S = 24 * 3600.0
#: The longest wait between two sweeps of those files (a tenth of their time to live, where shorter)
COMPAT_SWEEP_MAX_PERIOD_S = 600.0
CALLBACK_VIEW_TIMEOUT_S = 2.0  # a job's view waits this long at most for its callback's delivery state

SYNC_TO_LOOP = {"pingpong": "pingpong", "loop": "forward", "cut_off": "cut_off", "silence": "silence",
                "remap": "remap"}


def check_template_choice(video, avatar_id) -> None:
    """A job's template is a video or a prepared avatar: one of them, not both (which would it render?
    the CLI refuses it too); 422 naming the field otherwise."""
    if video is None and avatar_id is None:
        raise ApiProblem(422, "input.invalid", "a job needs a video (or an avatar_id)", "video")
    if video is not None and avatar_id is not None:
        raise ApiProblem(422, "input.invalid", "give a video or an avatar_id, not both", "avatar_id")


def get_backend(request: Request) -> "Backend":
    """The dependency routes declare: `backend: Backend = Depends(get_backend)`."""
    return request.app.state.backend


def private_dir(path: Path) -> Path:
    """`path` as a directory only this user can enter (uploads in flight pass through it); where
    another user made it first (a shared /tmp), or it is a link, a fresh private one instead."""
    import stat

    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            os.chmod(path, 0o700)
            return path
    except OSError:
        pass
    log.warning("%s is not this user's own directory: using a private one instead", path)
    return Path(tempfile.mkdtemp(prefix=f"lipsync-ingress-{os.getuid()}-"))


def sweep_request_dirs(root: Path, older_than_s: float) -> list[Path]:
    """Remove the request directories (`Backend.tmpdir`) under `root` of an ingress killed mid-request (a
    request's `finally` removes its own; these inputs, up to an upload's size each, would stay for ever): at
    once where the process its owner file names (host, pid and start time: `cluster.owners`) is known to be gone
    (a probe: a service killed during an upload left 1.5 MB that its restart kept, under the age rule alone),
    else once nothing wrote to it for `older_than_s` (another replica's requests on this node are younger: an
    upload that stalls past `upload_idle_timeout_s` is dropped). An owner on another host (a container sharing
    this directory) is never known to be gone: the age rule."""
    cutoff, removed = time.time() - older_than_s, []
    for d in root.glob("req-*"):
        try:
            try:
                gone = identity_gone((d / OWNER_FILE).read_text().strip())
            except (FileNotFoundError, UnicodeDecodeError):  # (one of an older version, or made just now)
                gone = False
            if gone or max([d.stat().st_mtime, *(f.stat().st_mtime for f in d.iterdir())]) < cutoff:
                shutil.rmtree(d)
                removed.append(d)
        except FileNotFoundError:  # removed meanwhile (its request ended)
            continue
        except OSError as e:
            log.warning("cannot remove the stale request directory %s: %s", d, e)
    if removed:
        log.info("removed %d request directories left by a stopped ingress under %s", len(removed), root)
    return removed


#: A request directory's owner: `cluster.owners.process_identity` of the ingress that made it
OWNER_FILE = ".owner"


class Backend:
    """The routes' shared logic on `gateway`, the job manager's async handle."""

    def __init__(self, settings: Settings, gateway) -> None:
        self.settings = settings
        self.gateway = gateway
        # this service's own (its storage root and namespace): another service of this user on the node
        # neither takes its compat uploads as inputs nor sweeps its files
        mine = hashlib.sha256(f"{settings.storage_root.resolve()}\0{settings.namespace}".encode()).hexdigest()[:12]
        self.tmp_root = private_dir(private_dir(Path(tempfile.gettempdir()) / f"lipsync-ingress-{os.getuid()}") / mine)
        self.identity = process_identity()  # this ingress process's (its request directories, its audio sockets)
        sweep_request_dirs(self.tmp_root, max(3600.0, 2 * settings.upload_idle_timeout_s))
        # (and those of a version before per-service directories, kept beside them: by age)
        sweep_request_dirs(self.tmp_root.parent, max(3600.0, 2 * settings.upload_idle_timeout_s))
        self._compat_progress: OrderedDict[str, int] = OrderedDict()
        self.event_streams = 0  # job event streams open on this replica (`LIPSYNC_MAX_EVENT_STREAMS`)
        self._sidecar = None  # the service sidecar's handle, kept (`sidecar`)
        self.batches_admitting: dict[str, int] = {}  # batch id -> its POSTs admitting audios on this replica
        # batch id -> until when (monotonic) an audio of it answered 503 under the batch's own id may still be
        # stored by the job manager (`batch_view` does not call the batch failed meanwhile)
        self.batches_admitted_late: dict[str, float] = {}
        token = settings.api_token.get_secret_value() if settings.api_token else None
        self.watch_key = watch_key(token) if token else None
        self._compat_sweeper: asyncio.Task | None = None  # `keep_sweeping_compat_uploads`

    # views ----------------------------------------------------------------------------------------
    def watch_query(self, job_id: str) -> str:
        """`?token=<expires>.<signature>` for a job's HLS URLs when the service has a token, else "".
        The expiry is rounded up to a step of the TTL or an hour, the shorter, so that the URL stays
        the same between polls and lasts no more than twice a short TTL (a 60 s TTL lasted up to an
        hour)."""
        if self.watch_key is None:
            return ""
        expires = watch_expiry(time.time(), self.settings.watch_url_ttl_s)
        return f"?token={sign_watch(self.watch_key, job_id, expires)}"

    def watch_url(self, job_id: str) -> str:
        return f"/v1/jobs/{job_id}/hls/index.m3u8{self.watch_query(job_id)}"

    def view(self, st: JobStatus) -> JobView:
        """The API's view of a job, with its watch_url."""
        return job_view(st, watch_url=self.watch_url(st.id), storage_root=str(self.settings.storage_root))

    # admission ---------------------------------------------------------------------------------
    async def known(self, job_id: str | None) -> bool:
        """Whether a job of this id was accepted already (a client's retry: it counts in the queue already)."""
        if job_id is None:
            return False
        try:
            await self.gateway.get(job_id)
            return True
        except JobNotFound:
            return False

    async def refuse_what_cannot_succeed(self, video: str | None, avatar_id: str | None, model: str | None,
                                         callback_url: str | None, stored_too: bool = True) -> None:
        """What a job or batch request can be refused for before its inputs travel or the queue's bound is
        checked (a request that can never succeed is told why, not to come back later): the template's
        choice, a named model's size (in a thread: a size not seen before takes up to 0.7 s of CPU; the
        job manager checks it too), the callback URL and, `stored_too`, the model file and avatar."""
        from cluster.models import check_named_model

        check_template_choice(video, avatar_id)
        await asyncio.to_thread(check_named_model, model)
        await self.check_callback(callback_url)
        if stored_too:
            await self.check_model_and_avatar(model, avatar_id)

    async def check_model_and_avatar(self, model: str | None, avatar_id: str | None) -> None:
        """A model file the service does not have, an avatar it does not know: refused now (the job manager
        would refuse them at admission), by the service sidecar."""
        if avatar_id is not None:
            await self.sidecar("get_avatar", avatar_id)
        if model is not None and not is_named_model(model):
            await self.sidecar("check_model", self.resolve_model(model))

    def batch_admitted_late(self, batch_id: str) -> None:
        """An audio of batch `batch_id` was answered 503 under the batch's own id: the job manager may still
        store its job within one admission window (`batch_view` does not call the batch failed meanwhile)."""
        now = time.monotonic()
        for gone in [b for b, until in self.batches_admitted_late.items() if until <= now]:
            del self.batches_admitted_late[gone]
        self.batches_admitted_late[batch_id] = now + self.admission_window_s()

    def may_be_admitted_late(self, batch_id: str) -> bool:
        return time.monotonic() < self.batches_admitted_late.get(batch_id, 0.0)

    def admission_window_s(self) -> float:
        """The longest one job's admission may take from its request's staging to its answer: for a URL input
        the sidecar's check of the model and avatar and the download, then the job manager's wait
        (`ManagerGateway.submit`), and the callback's registration (each a bounded call; a downloaded
        input's parts sent to the job manager are not counted: a few calls at the transfer's pace)."""
        s = self.settings
        return s.url_timeout_s + s.admission_timeout_s() + 2 * s.actor_call_timeout_s + 10

    async def admit_or_429(self) -> None:
        n = await self.gateway.unfinished_count(self.settings.max_queued_jobs)
        if n >= self.settings.max_queued_jobs:
            raise QueueFull.at(n, self.settings.max_queued_jobs)

    def open_event_stream(self):
        """Count one more job event stream, or refuse it (`TooManyEventStreams`) while
        `max_event_streams` are open on this replica: each one asks the job manager about its job
        twice a second, and the manager also schedules every render's batches. Returns the stream's
        release (call it once the stream is over; later calls do nothing)."""
        if self.event_streams >= self.settings.max_event_streams:
            raise TooManyEventStreams(f"{self.event_streams} job event streams are open on this service replica "
                                      f"(LIPSYNC_MAX_EVENT_STREAMS={self.settings.max_event_streams}); poll "
                                      f"GET /v1/jobs/ID instead, or retry later")
        self.event_streams += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.event_streams -= 1
        return release

    def tmpdir(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix="req-", dir=self.tmp_root))
        (d / OWNER_FILE).write_text(self.identity)  # whose it is (`sweep_request_dirs`)
        return d

    async def stage_input(self, value: str, field: str, tmpdir: Path) -> str:
        """A URL (downloaded under the address guard), an upload of this ingress, or a server path:
        what the job manager's `submit` takes."""
        if is_url(value):
            dest = tmpdir / f"{field}-url{_suffix_of(value)}"
            settings = self.settings
            await asyncio.to_thread(download, value, dest, max_bytes=settings.max_upload_bytes,
                                    timeout_s=settings.url_timeout_s, max_redirects=settings.url_max_redirects,
                                    allow_private=settings.allow_private_urls, field=field)
            return await self.gateway.upload(dest, dest.name)
        compat_upload = self.compat_upload_path(value)
        if compat_upload is not None:
            return await self.gateway.upload(compat_upload, compat_upload.name)
        # A server path: the job manager resolves it against the input roots on its own node
        # (cluster.inputs.resolve_input_path: symlinks and '..' first, then the roots).
        return value

    def resolve_model(self, model: str | None) -> str | None:
        if model is None or is_named_model(model):  # builtin[:S], latency:<ms>[:S] (slow test/bench jobs)
            return model
        path = self.settings.storage_root / "models" / (model if model.endswith(".onnx") else model + ".onnx")
        return str(path)

    async def create_job(self, job_id: str | None, audio: str | Path, video: str | Path | None,
                         avatar_id: str | None, sync_mode: str, model: str | None, tmpdir: Path,
                         staged: dict[str, str] | None = None, crf: int | None = None,
                         sources: dict[str, str] | None = None, batch_size: int | None = None,
                         id_chosen: bool | None = None) -> JobStatus:
        """Stage the inputs and admit the job (`ManagerGateway.submit`); `job_id` None: one is minted.
        `id_chosen`: whether the client chose the id (default: whether one was given)."""
        if sync_mode not in SYNC_TO_LOOP:
            raise ApiProblem(422, "input.unsupported", f"sync_mode {sync_mode!r} is not supported by this server "
                             f"(supported: {', '.join(SYNC_TO_LOOP)})", "sync_mode")
        check_template_choice(video, avatar_id)
        staged, sources = dict(staged or {}), dict(sources or {})
        if any(is_url(str(v)) for v in (audio, video) if v is not None):
            # what the job manager would refuse anyway is refused before a download that may be large
            await self.check_model_and_avatar(model, avatar_id)
        for name, given in (("audio", audio), ("video", video)):
            if given is not None and name not in staged:
                staged[name] = await self.stage_input(str(given), name, tmpdir)
                if staged[name] != str(given):  # a URL fetched, a compat path: errors name what was given
                    sources.setdefault(staged[name], str(given))
        request = RenderRequest(audio=staged["audio"], video=staged.get("video"), avatar_id=avatar_id,
                                model=self.resolve_model(model), loop=SYNC_TO_LOOP[sync_mode], crf=crf,
                                sources=sources, batch_size=batch_size)
        return await self.gateway.submit(job_id or new_job_id(), request,
                                         id_chosen=job_id is not None if id_chosen is None else id_chosen)

    # callbacks -------------------------------------------------------------------------------------
    async def check_callback(self, url: str | None) -> None:
        """Refuse a callback URL the address guard would refuse at delivery (400, field callback_url)."""
        if url is None:
            return
        from cluster.netguard import check_url

        await asyncio.to_thread(check_url, url, allow_private=self.settings.allow_private_urls, field="callback_url")

    async def register_callback(self, job_id: str, url: str | None) -> None:
        if url is None:
            return
        await self.sidecar("register", job_id, url)

    async def sidecar(self, method: str, *args, timeout: float | None = None):
        """Await one method of the service sidecar (callbacks, avatars); typed errors come back as
        themselves, no answer in time as ManagerUnavailable (503)."""
        from ray.exceptions import RayActorError

        from actors import gcs_lookup, raise_if_cancelled, task_cause
        from actors.service_support import ManagerUnavailable, service_sidecar

        deadline = time.monotonic() + (timeout or self.settings.actor_call_timeout_s)
        for attempt in (1, 2):
            try:
                if self._sidecar is None:  # looked up once (a GCS round trip, off the event loop), then kept
                    self._sidecar = await gcs_lookup(service_sidecar, self.settings,
                                                     timeout=max(0.1, deadline - time.monotonic()))
                ref = getattr(self._sidecar, method).remote(*args)
                return await asyncio.wait_for(ref, timeout=max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError as e:
                raise ManagerUnavailable(f"the service sidecar did not answer {method} in time") from e
            except Exception as e:
                await raise_if_cancelled(e)  # (the request was: its client went away)
                cause = task_cause(e)
                if isinstance(cause, LipsyncError):
                    raise cause from None
                if isinstance(e, RayActorError) and attempt == 1:  # gone for good (replaced): the new one, once
                    self._sidecar = None
                    continue
                raise

    async def callback_of(self, job_id: str) -> CallbackView | None:
        """How the delivery of the job's callback goes, None when it has none. Asked beside the job's own
        state, within CALLBACK_VIEW_TIMEOUT_S: a sidecar that does not answer leaves the view without it
        (said in the log), never fails it."""
        try:
            record = await self.sidecar("record", job_id, timeout=CALLBACK_VIEW_TIMEOUT_S)
            return CallbackView.model_validate(record) if record else None
        except Exception as e:  # noqa: BLE001 - the job's view stands without it
            log.warning("job %s: its callback's delivery is not known now: %s", job_id, e)
            return None

    # results ------------------------------------------------------------------------------------
    async def succeeded(self, job_id: str) -> tuple[JobStatus, int]:
        st = await self.gateway.get(job_id)
        if st.state != JobState.succeeded:
            raise JobNotReady(f"job {job_id} is {st.state.value}; " + ("its result exists once it has succeeded"
                              if not st.state.terminal else "it has no result (only a succeeded job has one)"),
                              job_id=job_id)
        size = st.output_bytes
        if size is None:  # no file to measure: `output.expired` (410) when it is gone
            await self.gateway.read_output(job_id, 0, 0)
            raise ApiProblem(500, "output.missing", f"job {job_id} reports no output size", None)
        return st, size

    async def stream_output(self, job_id: str, start: int, stop: int, first: bytes = b"") -> AsyncIterator[bytes]:
        part = min(self.settings.transfer_part_bytes, 1 << 20)
        pos = start
        if first:
            pos += len(first)
            yield first
        while pos < stop:
            data = await self.gateway.read_output(job_id, pos, min(part, stop - pos))
            if not data:
                raise RuntimeError(f"job {job_id}: output ended at byte {pos}, expected {stop}")
            pos += len(data)
            yield data

    async def result_response(self, request: Request, job_id: str, filename: str | None = None) -> Response:
        st, size = await self.succeeded(job_id)
        etag = f'"{job_id}-{size}-{int(st.updated_at.timestamp())}"'
        headers = {"Content-Disposition": f'attachment; filename="{filename or job_id + ".mp4"}"'}
        answer = conditional_range(request, size, etag, headers, "output")
        if isinstance(answer, Response):
            return answer
        start, stop, status = answer
        # the first part is read before the answer starts: an output that is gone (retention) is a
        # 410 naming why, not a 200 whose body breaks off
        first = await self.gateway.read_output(job_id, start, 0 if request.method == "HEAD" else
                                               min(self.settings.transfer_part_bytes, 1 << 20, stop - start))
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="video/mp4")
        return StreamingResponse(self.stream_output(job_id, start, stop, first), status_code=status,
                                 headers=headers, media_type="video/mp4")

    # compat -------------------------------------------------------------------------------------
    def upload_dir(self) -> Path:
        base = self.settings.compat_data_dir or (self.tmp_root / "compat")
        d = Path(base) / "upload"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def sweep_compat_uploads(self, now: float | None = None) -> int:
        """Remove `POST /upload` files older than `COMPAT_TMP_UPLOAD_TTL_S` (or the retention time, if
        shorter) where they are kept in this replica's temporary directory (no `compat_data_dir`:
        retention does not see them there); returns how many. Run at each upload and now and then between
        (`keep_sweeping_compat_uploads`), so they never pile up."""
        if self.settings.compat_data_dir is not None:
            return 0
        from cluster.fsutil import remove_files_older_than

        cutoff = (now if now is not None else time.time()) - self.compat_upload_ttl_s()
        removed = remove_files_older_than(self.upload_dir(), cutoff, log)
        legacy = self.tmp_root.parent / "compat" / "upload"  # a version before per-service directories kept them
        if legacy.is_dir():  # there (an upgrade probe found them never removed); no longer taken as inputs
            removed += remove_files_older_than(legacy, cutoff, log)
        return removed

    def compat_upload_ttl_s(self) -> float:
        """How long a `POST /upload` file kept in this replica's temporary directory lives."""
        ttl = COMPAT_TMP_UPLOAD_TTL_S
        if self.settings.retention_days > 0:
            ttl = min(ttl, self.settings.retention_days * 86400)
        return ttl

    def keep_sweeping_compat_uploads(self) -> None:
        """Sweep the `POST /upload` files (`sweep_compat_uploads`) now and then from now on, not only at the next
        upload: a burst of uploads followed by none left its files in the temporary directory, outside the
        storage root, past their time for good (a probe: 82 files still there minutes after their 121 s). Started
        by the first upload (there is nothing to sweep before); on this replica's event loop."""
        if self.settings.compat_data_dir is not None or (
                self._compat_sweeper is not None and not self._compat_sweeper.done()):
            return
        # (in a context of its own: not the first upload's request, whose log fields its lines would carry)
        from actors import task_apart

        self._compat_sweeper = task_apart(self._sweep_compat_uploads_forever())

    async def _sweep_compat_uploads_forever(self) -> None:
        period = min(COMPAT_SWEEP_MAX_PERIOD_S, max(1.0, self.compat_upload_ttl_s() / 10))
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(self.sweep_compat_uploads)
            except Exception:  # tried again at the next period
                log.exception("sweeping the /upload files of %s failed; trying again in %.0f s", self.upload_dir(),
                              period)

    def compat_upload_path(self, value: str) -> Path | None:
        """A file `POST /upload` stored (and only such a file), else None."""
        d = self.upload_dir().resolve()
        try:
            p = Path(os.path.realpath(value))
        except (OSError, ValueError):
            return None
        if p.parent == d and re.fullmatch(r"[0-9a-f]{32}\.[A-Za-z0-9]{1,8}|[0-9a-f]{32}", p.name) and p.is_file():
            return p
        return None

    def compat_result_path(self, code: str) -> str:
        if self.settings.compat_data_dir is not None:
            return str(Path(self.settings.compat_data_dir) / "temp" / f"{code}-r.mp4")
        return f"/temp/{code}-r.mp4"

    async def publish_compat(self, code: str, size: int) -> None:
        """Copy the verified output to <compat_data_dir>/temp/<code>-r.mp4 (atomically, checked length;
        every file operation in a thread: none blocks the event loop, the final fsync included)."""
        from cluster.fsutil import publish, temporary_name

        dest = Path(self.settings.compat_data_dir) / "temp" / f"{code}-r.mp4"
        if await asyncio.to_thread(lambda: dest.is_file() and dest.stat().st_size == size):
            return
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        tmp = temporary_name(dest)
        f = await asyncio.to_thread(open, tmp, "wb")
        try:
            written = 0
            async for data in self.stream_output(code, 0, size):
                await asyncio.to_thread(f.write, data)
                written += len(data)
            if written != size:
                raise RuntimeError(f"published {written} bytes of {size}")

            def finish() -> None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                publish(tmp, dest)

            await asyncio.to_thread(finish)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise

    def compat_last_progress(self, code: str) -> int:
        """The progress a compat query answered last for `code` (never lower: a client's bar does
        not move back while the job manager is briefly away)."""
        return self._compat_progress.get(code, 1)

    def forget_compat_progress(self, code: str) -> None:
        self._compat_progress.pop(code, None)

    def compat_progress(self, st: JobStatus) -> int:
        now = time.time()
        age = max(0.0, now - st.updated_at.timestamp())
        creep = 1 - math.exp(-age / 20.0)
        if st.state == JobState.queued:
            p = 1 + 3 * creep
        elif st.state == JobState.preparing:
            p = 5 + 9 * creep
        elif st.state == JobState.rendering:
            frac = (st.frames_done / st.frames_total) if st.frames_total else 0.0
            p = 15 + 80 * frac
        elif st.state == JobState.finalizing:
            p = 95 + 4 * creep
        else:
            p = 0
        p = min(99, int(p))
        prev = self._compat_progress.get(st.id, 0)
        p = max(p, prev)
        self._compat_progress[st.id] = p
        self._compat_progress.move_to_end(st.id)
        while len(self._compat_progress) > 10000:
            self._compat_progress.popitem(last=False)
        return p


def _suffix_of(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        suffix = Path(urlsplit(url).path).suffix.lower()
    except ValueError:  # what is no URL: `download`'s address guard refuses it, naming its field
        return ""
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix or "") else ""


def conditional_range(request: Request, size: int, etag: str, headers: dict[str, str],
                      what: str) -> Response | tuple[int, int, int]:
    """The answer to a GET of an immutable file of `size` bytes tagged `etag`: a 304 or 416
    `Response`, else (start, stop, status) of the bytes to send (206 for a served Range, else 200);
    `headers` gets Accept-Ranges, ETag, Content-Length and, for a 206, Content-Range."""
    headers.update({"Accept-Ranges": "bytes", "ETag": etag})
    if none_match(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    start, stop, status = 0, size, 200
    rng = request.headers.get("range")
    span = byte_range(rng, size) if rng and request.headers.get("if-range") in (None, etag) else None
    if span == "unsatisfiable":
        return error_response(416, "input.range_not_satisfiable",
                              f"Range {rng!r} starts at or past the end of the {size}-byte {what}", "Range",
                              headers={**headers, "Content-Range": f"bytes */{size}"})
    if span is not None:
        (start, stop), status = span, 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    headers["Content-Length"] = str(stop - start)
    return start, stop, status


def none_match(header: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: `*`, or any tag of the list equal to `etag` by weak comparison."""
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """The [start, stop) one `bytes=` range asks for (RFC 9110 14.2), "unsatisfiable" when it
    starts at or past the end, or None where the header is to be ignored and the whole output
    sent: another unit, a range that is not valid (first past last), several ranges (a server
    may answer those whole)."""
    unit, _, ranges = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in ranges:
        return None
    m = re.fullmatch(r"\s*([0-9]*)-([0-9]*)\s*", ranges)  # ASCII digits
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = (None if not d else int(d) if len(d) <= 18 else 1 << 63 for d in m.groups())  # past any file
    if first is None:  # the last N bytes
        return (max(0, size - last), size) if last > 0 and size > 0 else "unsatisfiable"
    if last is not None and last < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(size, last + 1) if last is not None else size
