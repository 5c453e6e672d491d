"""Typed errors with stable machine codes, used everywhere.

Every error carries `code` (stable, machine-readable), a message naming the problem (which file,
which stream, what was expected), and where it applies the `stage`, `job_id`, `chunk` and the
underlying exception text (`cause`). `to_info()` turns it into the pydantic `ErrorInfo` stored
with a failed job.
"""
from __future__ import annotations

from typing import Any


class LipsyncError(Exception):
    """Base of every typed error. `retryable`: whether running the same step again (another
    attempt of a chunk, on another worker) can succeed; False for errors that say the job itself
    cannot succeed (bad input, a model that cannot load, a cancelled job)."""
    code: str = "error"
    exit_code: int = 1  # CLI exit status
    retryable: bool = True
    field: str | None = None

    def __init__(self, message: str, *, code: str | None = None, stage: str | None = None,
                 job_id: str | None = None, chunk: int | None = None, cause: str | None = None,
                 path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.stage = stage
        self.job_id = job_id
        self.chunk = chunk
        self.cause = cause
        self.path = path
        self.field = field  # the API request's field it is about, where the path alone does not say

    def __reduce__(self):  # survive pickling through Ray with every field
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))

    def with_context(self, **kw: Any) -> "LipsyncError":
        """Fill in stage/job_id/chunk where not already set; returns self."""
        for k, v in kw.items():
            if v is not None and getattr(self, k, None) is None:
                setattr(self, k, v)
        return self

    def naming(self, sources: dict[str, str]) -> "LipsyncError":
        """Name what the user gave instead of the stored copies `sources` maps from (a path, an
        upload reference), in the message and the path; returns self."""
        for stored, original in sources.items():
            if stored in self.message:
                self.message = self.message.replace(stored, original)
                self.args = (self.message,)
            if self.path == stored:
                self.path = original
        return self

    def to_info(self):
        from cluster.schemas import ErrorInfo
        return ErrorInfo(code=self.code, message=self.message, stage=self.stage, chunk=self.chunk,
                         cause=self.cause, path=self.path)

    def __str__(self) -> str:
        return self.message


def os_reason(e: BaseException) -> str:
    """An OS error's reason in words ("No such file or directory"), without Python's `[Errno 2] ...: 'path'`
    (the message names the path itself); any other exception's text."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _rebuild(cls, message, state):
    obj = cls.__new__(cls)
    Exception.__init__(obj, message)
    obj.__dict__.update(state)
    return obj


# --- bad input (CLI exit 2, HTTP 4xx) -----------------------------------------------------
class InputError(LipsyncError):
    code = "input.invalid"
    exit_code = 2
    retryable = False


class InputNotFound(InputError):
    code = "input.not_found"


class InputUnreadable(InputError):
    code = "input.unreadable"


class NoVideoStream(InputError):
    code = "input.no_video_stream"


class NoAudioStream(InputError):
    code = "input.no_audio_stream"


class InputTooLong(InputError):
    code = "input.too_long"


class InputTooLarge(InputError):
    code = "input.too_large"


class UnsafeInput(InputError):
    code = "input.unsafe"


class InputOutsideRoots(InputError):
    """A server-side path input that does not lie under `settings.input_roots`."""
    code = "input.outside_roots"


class NoFace(InputError):
    code = "input.no_face"


class FaceSideways(InputError):
    """The template's face lies on its side (`cluster.faces.avatar`): found, but not upright enough to
    lip-sync (the mouth would be drawn where an upright face's would be)."""
    code = "input.face_sideways"


# --- models --------------------------------------------------------------------------------
class ModelError(LipsyncError):
    code = "model.error"


class ModelContractError(ModelError):
    code = "model.invalid_contract"
    exit_code = 2
    retryable = False


class ModelLoadError(ModelError):
    code = "model.load_failed"
    retryable = False


class ModelInferenceError(ModelError):
    code = "model.inference_failed"


# --- media tooling -------------------------------------------------------------------------
class MediaError(LipsyncError):
    code = "media.ffmpeg_failed"


class EncodeError(MediaError):
    code = "render.encode_failed"


class OutputVerificationError(LipsyncError):
    code = "output.verification_failed"



# --- resources -----------------------------------------------------------------------------
class DiskFull(LipsyncError):
    """Not enough free space under the storage root (or the output's directory) for a job:
    refused at admission against an estimate, or the disk filled while the job ran."""
    code = "resource.disk"
    retryable = False  # another attempt on the same full disk fails the same way

# --- runtime -------------------------------------------------------------------------------
class RenderError(LipsyncError):
    code = "render.failed"


class ChunkFailed(RenderError):
    code = "render.chunk_failed"


class WorkerLost(RenderError):
    code = "render.worker_lost"


class RenderTimeout(RenderError):
    code = "render.timeout"


class JobCancelled(LipsyncError):
    code = "cancelled"
    retryable = False


class JobNotFound(LipsyncError):
    code = "job.not_found"
    exit_code = 2
    retryable = False


class HlsNotPublished(LipsyncError):
    """A file of a job's HLS stream that is not published (yet, or at all): the job exists (HTTP 404)."""
    code = "hls.not_published"
    exit_code = 2
    retryable = False


class JobConflict(LipsyncError):
    """The same job id was submitted again with other inputs (HTTP 409)."""
    code = "job.conflict"
    exit_code = 2
    retryable = False


class TooManyPreparations(LipsyncError):
    """`LIPSYNC_MAX_AVATAR_PREPARATIONS` avatars are being prepared already (HTTP 429: retry later)."""
    code = "service.busy"
    retryable = True


class AdmissionTooLate(LipsyncError):
    """A job's admission ended after its caller stopped waiting for it (it was answered 503): not stored,
    so no job renders that its caller was told was not admitted (HTTP 503)."""
    code = "service.unavailable"


class QueueFull(LipsyncError):
    """`LIPSYNC_MAX_QUEUED_JOBS` jobs are unfinished already (HTTP 429; compat API code 10001): retry later."""
    code = "service.busy"
    retryable = True

    @classmethod
    def at(cls, unfinished: int, bound: int) -> QueueFull:
        """The queue holds `unfinished` jobs of at most `bound`."""
        return cls(f"the job queue is full ({unfinished} unfinished job{'' if unfinished == 1 else 's'}, "
                   f"LIPSYNC_MAX_QUEUED_JOBS={bound}); "
                   f"retry later")


class TooManyEventStreams(LipsyncError):
    """`LIPSYNC_MAX_EVENT_STREAMS` job event streams are open on this ingress replica (HTTP 429: poll
    `GET /v1/jobs/ID`, or retry later)."""
    code = "service.busy"
    retryable = True


class OutputExpired(LipsyncError):
    """A succeeded job whose output no longer exists: removed by retention (`LIPSYNC_RETENTION_DAYS`)
    or by hand (HTTP 410). The job stays succeeded; its result is gone."""
    code = "output.expired"
    retryable = False


class StorageLost(LipsyncError):
    """The job store this process opened was removed or replaced under it (its storage root deleted, moved
    or remounted): nothing written from now on would last (HTTP 503, until the service is restarted)."""
    code = "service.storage_lost"
    retryable = False


class StoreTooNew(StorageLost):
    """The job store was written by a newer version, in a format this one would misread (HTTP 503): it takes no
    work; serve it with that version or a later one."""
    code = "service.store_too_new"


class JobNotFinished(LipsyncError):
    """A job's files were asked to be removed while it runs (HTTP 409): cancel it first."""
    code = "job.not_finished"
    retryable = False


class JobNotReady(LipsyncError):
    """The job's output was asked for before the job succeeded (HTTP 409)."""
    code = "job.not_succeeded"
    retryable = False


class JobAbandoned(LipsyncError):
    """An embedded run's job whose client (the process that admitted it) is gone."""
    code = "job.abandoned"
    retryable = False


class JobRunElsewhere(LipsyncError):
    """A job that another live run sharing the storage root runs (e.g. a `lipsync render` beside a service):
    only that run can stop it (HTTP 409)."""
    code = "job.run_elsewhere"
    exit_code = 2
    retryable = False


class OutputPathInUse(InputError):
    """Another unfinished job already writes to the same output path."""
    code = "output.path_in_use"


class PlacementError(LipsyncError):
    """The cluster cannot hold the actors asked for (names the missing resource)."""
    code = "cluster.unplaceable"
    exit_code = 2
    retryable = False


class ServiceInUse(LipsyncError):
    """`lipsync serve` joining a cluster where what it would start already runs otherwise: Ray Serve's
    HTTP proxy on another port, or this namespace's job manager on another storage root."""
    code = "service.in_use"
    exit_code = 2
    retryable = False


class PortInUse(LipsyncError):
    """`lipsync serve`: another process listens on the address it was asked to serve on."""
    code = "service.port_in_use"
    exit_code = 2  # a mistake in how it was started, as settings.invalid: a restart would only repeat it
    retryable = False

    @classmethod
    def at(cls, host: str, port: int, why: str) -> PortInUse:
        return cls(f"cannot listen on {host}:{port}: {why} (another process holds it: stop it, or pick another --port)")


class InputsGone(LipsyncError):
    code = "job.inputs_missing"
    retryable = False
