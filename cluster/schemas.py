"""Pydantic models shared by the server, the SDK, the CLI and the runtime."""
from __future__ import annotations

import enum
import re
from datetime import datetime, timezone
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobState(str, enum.Enum):
    queued = "queued"
    preparing = "preparing"
    rendering = "rendering"
    finalizing = "finalizing"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


# Allowed forward moves; a job leaves `rendering` only forward.
TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.queued: {JobState.preparing, JobState.failed, JobState.cancelled},
    JobState.preparing: {JobState.rendering, JobState.failed, JobState.cancelled},
    JobState.rendering: {JobState.finalizing, JobState.failed, JobState.cancelled},
    JobState.finalizing: {JobState.succeeded, JobState.failed, JobState.cancelled},
    JobState.succeeded: set(),
    JobState.failed: set(),
    JobState.cancelled: set(),
}


class ErrorInfo(BaseModel):
    code: str
    message: str
    stage: str | None = None
    chunk: int | None = None
    cause: str | None = None
    path: str | None = None


# --- media -------------------------------------------------------------------------------
class VideoStreamInfo(BaseModel):
    codec: str
    width: int            # display width (rotation applied)
    height: int           # display height (rotation applied)
    fps_num: int
    fps_den: int
    frame_count: int      # exact when known, else estimated from duration * fps
    duration: float
    rotation: int = 0     # degrees clockwise the player must rotate (0/90/180/270)
    variable_frame_rate: bool = False
    pix_fmt: str | None = None
    hdr_transfer: str | None = None  # "smpte2084" (PQ) or "arib-std-b67" (HLG); None for SDR
    full_range: bool = False  # full-range (0-255, "pc", yuvj*) samples: normalising brings them to limited range
    # [primaries, transfer, matrix] as FFmpeg's AVCOL_* codes when the stream names any (1 = BT.709, 6 =
    # SMPTE 170M / BT.601...): the rendered segments carry them on (the pixels outside the mouth are its own)
    color: list[int] | None = None
    sar: float = 1.0      # sample aspect ratio: normalising makes the pixels square, width x sar wide
    base_fps: float | None = None  # the stream's cadence (r_frame_rate): a variable-rate stream's frames lie on it
    interlaced: bool = False  # fields, not frames (broadcast, AVCHD .mts): normalising deinterlaces it
    alpha: bool = False  # a transparent picture (ProRes 4444, VP9 with alpha): normalising lays it on white
    stream: int = 0  # which of the file's video streams (ffmpeg's 0:v:N): the default one, as a player shows

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)


class AudioStreamInfo(BaseModel):
    codec: str
    sample_rate: int
    channels: int
    duration: float


class MediaInfo(BaseModel):
    path: str
    format: str
    duration: float
    size_bytes: int
    video: VideoStreamInfo | None = None
    audio: AudioStreamInfo | None = None


# --- plan --------------------------------------------------------------------------------
LoopMode = Literal["pingpong", "forward", "cut_off", "silence", "remap"]
"""`forward` is the API's sync_mode `loop`; see cluster.plan.SYNC_MODES."""


class Chunk(BaseModel):
    """Output frames [start, stop) of one job, rendered into one segment."""
    model_config = ConfigDict(frozen=True)
    index: int
    start: int
    stop: int

    @property
    def frames(self) -> int:
        return self.stop - self.start


# --- jobs --------------------------------------------------------------------------------
class RenderRequest(BaseModel):
    """What a user asks for. Paths are server-side paths (already admitted)."""
    audio: str
    video: str | None = None
    avatar_id: str | None = None
    model: str | None = None          # None: the settings' default
    crop: Literal["wav2lip", "aligned"] | None = None  # None: LIPSYNC_CROP, else the model's own recipe
    loop: LoopMode = "pingpong"
    chunk_seconds: float | None = None
    crf: int | None = Field(None, ge=0, le=51)  # output quality (x264 CRF); None: the settings' crf
    output: str | None = None         # where to place the final mp4 (CLI); default under storage root
    sources: dict[str, str] = Field(default_factory=dict)  # stored copy -> the path the user gave
    batch_size: int | None = Field(None, ge=1)  # a batch's first job: how many audios its batch asked for
    avatar_name: str | None = None  # the avatar's name when it was admitted (`name_avatar`): views show it


#: A multipart submission's job id, ahead of its files (the SDK sends it): a retry of an accepted job is answered
#: as that job, not refused by a full queue before the files are read (`service.routers.jobs`)
JOB_ID_HEADER = "X-Lipsync-Job-Id"


class UploadedFile(BaseModel):
    """What `POST /v1/uploads` answers: `ref` names the stored bytes as a job's or a batch's input."""
    ref: str = Field(..., description="upload:<sha256><.ext>: give it as an audio, audios item or video")
    name: str = Field(..., description="the file's name as sent")
    size: int


class StoredInput(BaseModel):
    """Bytes a client uploaded to the job manager: `ref` ("upload:<sha256><.ext>") names them in
    a RenderRequest's `audio`/`video`."""
    ref: str
    size: int
    sha256: str


class StageTime(BaseModel):
    """When one stage of a job (admit, prepare, render, finalize) started and ended."""
    stage: str
    started_at: datetime
    ended_at: datetime | None = None

    @property
    def seconds(self) -> float | None:
        return (self.ended_at - self.started_at).total_seconds() if self.ended_at else None


class JobStatus(BaseModel):
    id: str
    state: JobState
    frames_done: int = 0
    frames_total: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    output: str | None = None         # on the job manager's node; clients fetch it with read_output
    output_bytes: int | None = None   # size of the committed output, once succeeded
    output_seconds: float | None = None  # its length (the planned frames at the template's rate), once succeeded
    output_width: int | None = None   # its picture as rendered (the template's, upright, even), once succeeded
    output_height: int | None = None
    output_fps: float | None = None
    error: ErrorInfo | None = None
    request: RenderRequest | None = None
    stages: list[StageTime] = Field(default_factory=list)
    jobs_ahead: int | None = None  # rendering, none of its chunks on a compositor yet: the jobs served before it
    waiting_for: str | None = None  # rendering while the pool has no live compositor or model worker: what it lacks
    stream_gone: bool = False  # ended, and no HLS playlist of it on disk (never made, purged): no watch_url

    @property
    def progress(self) -> float:
        if self.state == JobState.succeeded:
            return 1.0
        return (self.frames_done / self.frames_total) if self.frames_total else 0.0


# --- HTTP API (serve_app.py and cluster.client share these) --------------------------------
SyncMode = Literal["pingpong", "loop", "cut_off", "silence", "remap"]
"""How audio and template lengths are reconciled: `pingpong` (default) and `loop` repeat the
template for the audio's length; `cut_off` stops at the shorter of the two; `silence` renders
the whole template, audio padded with silence; `remap` stretches the template to the audio."""

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
BATCH_SEPARATOR = "--"  # a batch's jobs are `<batch>--000`, `<batch>--001`, ...


def batch_job_id(batch_id: str, index: int) -> str:
    """The id of a batch's job `index` (its audio's place in the batch)."""
    return f"{batch_id}{BATCH_SEPARATOR}{index:03d}"


def batch_of(job_id: str) -> str | None:
    """The batch a job belongs to, or None."""
    return job_id.split(BATCH_SEPARATOR, 1)[0] if BATCH_SEPARATOR in job_id else None
#: (sizes of up to 5 digits pass the pattern: what is wrong with one is said by `named_model_problem`)
MODEL_NAME_PATTERN = r"^(builtin(:[0-9]{1,5})?|latency:[0-9]{1,3}(:[0-9]{1,5})?|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"
#: A spec of the built-in model: `builtin`, `builtin:S` (or `builtin-S`); group 1 is S. A model file
#: whose name merely starts with "builtin" is not one.
BUILTIN_MODEL = re.compile(r"^builtin(?:[:\-](\d+))?$")


#: A spec of the latency test model: `latency:<ms_per_frame>[:<size>]` (`cluster.models.latency`)
LATENCY_MODEL = re.compile(r"^latency:(\d+(?:\.\d+)?)(?::(\d+))?$")


def is_builtin_model(spec: str) -> bool:
    """Whether the model spec `spec` names the built-in model (`BUILTIN_MODEL`, spaces around ignored)."""
    return bool(BUILTIN_MODEL.match(spec.strip()))


def is_named_model(spec: str) -> bool:
    """Whether `spec` names a model that is not a file: `builtin[:S]` or `latency:<ms>[:S]` (spaces
    around ignored)."""
    return is_builtin_model(spec) or bool(LATENCY_MODEL.match(spec.strip()))


class JobOptions(BaseModel):
    """Options of a job, the same in the SDK, the CLI and the HTTP API."""
    model_config = ConfigDict(extra="forbid")
    sync_mode: SyncMode = "pingpong"
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN,
                              description="'builtin' or a model name from the server's model directory")
    crf: int | None = Field(None, ge=0, le=51, description="output quality (x264 CRF); default: server's")
    callback_url: str | None = Field(None, max_length=2048,
                                     description="POSTed the final status (HMAC-SHA256 signed) when the job ends")

    @field_validator("crf", mode="before")
    @classmethod
    def _crf_is_a_number(cls, value):
        """JSON `true` was taken as CRF 1 (a near-lossless encode, four times the bytes): a number only (a form
        field's text, "20", stays one)."""
        if isinstance(value, bool):
            raise ValueError("expected a number from 0 to 51, not true or false")
        return value


class JobCreate(JobOptions):
    """`POST /v1/jobs` as JSON: inputs are http(s) URLs, paths under the server's input roots, or the `ref` of
    a file stored with `POST /v1/uploads`."""
    id: str | None = Field(None, pattern=JOB_ID_PATTERN, description="client-chosen id: resubmission is idempotent")
    audio: str = Field(..., min_length=1, max_length=4096)
    video: str | None = Field(None, min_length=1, max_length=4096)
    avatar_id: str | None = Field(None, pattern=JOB_ID_PATTERN)

    @field_validator("id")
    @classmethod
    def _not_a_batch_member(cls, v: str | None) -> str | None:
        return _without_batch_separator(v)


def _without_batch_separator(v: str | None) -> str | None:
    """`--` joins a batch's id and its jobs' numbers (`<batch>--000`): a job or a batch of the
    client's own with it in its id would be shown as a member of a batch it never was."""
    if v is not None and BATCH_SEPARATOR in v:
        raise ValueError(f"'{BATCH_SEPARATOR}' is reserved: it joins a batch's id and its jobs' numbers "
                         f"(<batch>{BATCH_SEPARATOR}000)")
    return v


class JobAccepted(BaseModel):
    id: str
    state: JobState
    watch_url: str | None = None  # as JobView.watch_url


class OutputInfo(BaseModel):
    size: int
    duration: float | None = None
    url: str
    width: int | None = Field(None, description="the picture as rendered: the template's as a player shows it "
                              "(rotation and pixel aspect applied), rounded down to even numbers (H.264 4:2:0)")
    height: int | None = None
    fps: float | None = None


class CallbackView(BaseModel):
    """How the delivery of a job's `callback_url` goes (the URL itself is not repeated)."""
    state: str = Field(..., description="pending until the job ends and its view is delivered, or "
                       "LIPSYNC_CALLBACK_ATTEMPTS tries have failed; then delivered or failed (a str, not an "
                       "enum: an older SDK reads a state added later as it is)")
    attempts: int = Field(..., description="POSTs tried so far")
    last_error: str | None = Field(None, description="why the last try failed (HTTP 500, connection refused, ...)")
    updated_at: datetime


class JobView(BaseModel):
    """What `GET /v1/jobs/{id}` answers."""
    id: str
    state: JobState
    stage: str = Field(..., description="where the job is now: queued, prepare, render, finalize, waiting (for a "
                       "worker), or done once it has ended, however it ended (a failed job's error.stage says where "
                       "it failed)")
    progress: float = Field(..., ge=0, le=1)
    frames_done: int
    frames_total: int
    chunks_done: int = 0
    chunks_total: int = 0
    created_at: datetime
    updated_at: datetime
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage, where known")
    error: ErrorInfo | None = None
    output: OutputInfo | None = None
    sync_mode: str | None = None
    batch_id: str | None = None
    inputs: dict[str, str] | None = Field(None, description="what the job was given, by name: the file names "
                                          "(or the last part of a URL or path) of its audio and video, or its "
                                          "avatar_id and avatar (the avatar's name, where it has one)")
    watch_url: str | None = Field(None, description="the job's HLS playlist, playable while it renders "
                                  "(signed and expiring when the service has a token: no header needed); null "
                                  "for an ended job that has no stream (it ended before its first segment, or its "
                                  "files were removed)")
    jobs_ahead: int | None = Field(None, description="a rendering job none of whose chunks has reached a compositor "
                                   "yet (its `stage` is then `waiting`): how many other jobs get a chunk before its "
                                   "first (jobs share the compositors chunk by chunk, round-robin); null once it "
                                   "renders, and in every other state")
    waiting_for: str | None = Field(None, description="a rendering job that waits for a worker the pool has none of "
                                    "alive now (a node lost, a worker restarting): what it lacks, since when, and "
                                    "how long it waits before it fails (`stage` is then `waiting`); null otherwise")
    expired: bool = Field(False, description="a succeeded job whose output no longer exists (retention removed its "
                          "files after LIPSYNC_RETENTION_DAYS, or someone did): it has no `output` or `watch_url`, "
                          "and its result and stream answer 410 `output.expired`")
    callback: CallbackView | None = Field(None, description="the delivery of its callback_url, in GET "
                                          "/v1/jobs/{id} of a job that has one (not in lists or events)")


class HlsSegment(BaseModel):
    """One published media segment of a job's HLS stream (`GET /v1/jobs/{id}/hls/<name>`)."""
    index: int
    name: str
    start: float = Field(..., description="seconds from the job's start")
    duration: float
    init: str = Field("init.mp4", description="its init segment's name (EXT-X-MAP)")
    url: str | None = Field(None, description="where to fetch it (signed when the service has a token)")
    init_url: str | None = Field(None, description="where to fetch its init segment (signed as `url` is)")


class HlsIndex(BaseModel):
    """What a job's playlist lists: its contiguous published segments; `ended` adds EXT-X-ENDLIST."""
    job_id: str
    state: JobState
    ended: bool
    target_duration: int
    segments: list[HlsSegment] = Field(default_factory=list)


class JobPage(BaseModel):
    jobs: list[JobView]
    next_offset: int | None = None
    next_before: str | None = None  # the next page: `?before=<this>` (steady while jobs are submitted)


class ApiErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ApiError(BaseModel):
    """Every 4xx/5xx answer of the API."""
    error: ApiErrorDetail


class AvatarView(BaseModel):
    """A prepared template (`POST /v1/avatars`): submit jobs with `avatar_id` instead of a video."""
    id: str
    name: str | None = Field(None, description="the name of the template it was first prepared from: its file's "
                             "name or its URL's last part (the same bytes given again keep it)")
    frames: int
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration: float | None = None


class AvatarCreate(BaseModel):
    """`POST /v1/avatars` as JSON (or multipart with a `video` file)."""
    model_config = ConfigDict(extra="forbid")
    video: str = Field(..., min_length=1, max_length=4096)


class BatchCreate(JobOptions):
    """`POST /v1/batches`: many audios against one template video or avatar."""
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
    audios: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(..., min_length=1)
    video: str | None = Field(None, min_length=1, max_length=4096)
    avatar_id: str | None = Field(None, pattern=JOB_ID_PATTERN)

    @field_validator("id")
    @classmethod
    def _not_joined(cls, v: str | None) -> str | None:
        return _without_batch_separator(v)


class BatchView(BaseModel):
    id: str
    state: JobState
    progress: float
    counts: dict[str, int] = Field(..., description="jobs per state; `not_admitted`: audios of the batch that "
                                   "were refused when it was submitted, or are being admitted "
                                   "(the batch ends failed once no request admits them)")
    jobs: list[JobView]
    error: ErrorInfo | None = Field(None, description="why a failed batch failed: its first failed job's error "
                                    "(the message counts them and names that job), or `batch.incomplete` for audios "
                                    "never admitted")


# --- compatibility API (/easy/*) -------------------------------------------------------------
class CompatSubmit(BaseModel):
    """`POST /easy/submit` of existing digital-human clients; unknown fields are ignored."""
    model_config = ConfigDict(extra="allow")
    audio_url: str | None = Field(None, max_length=4096)  # (as `JobCreate`'s inputs: a 1 MB "URL" was echoed back)
    video_url: str | None = Field(None, max_length=4096)
    code: str | None = Field(None, max_length=200)
    pn: int | str | None = 1
    chaofen: int | str | None = 0
    watermark_switch: int | str | None = 0
    digital_auth: int | str | None = 0


class CompatData(BaseModel):
    code: str | None = None
    status: int | None = None      # 1 running, 2 success, 3 failed
    progress: int | None = None    # 0..100
    result: str | None = None
    msg: str | None = None
    path: str | None = None        # /upload answers


class CompatEnvelope(BaseModel):
    code: int                      # 10000 ok, 10001 busy, 10002 bad parameter, 10004 not found, 9999 error
    success: bool
    msg: str
    data: CompatData | None = None


# --- live sessions (`/v1/sessions`) ------------------------------------------------------------
class SessionCreate(BaseModel):
    """`POST /v1/sessions`: a live session on a prepared avatar."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # Infinity started a session, NaN was "> 0"
    avatar_id: str = Field(min_length=8, max_length=64, pattern="^[0-9a-f]+$")
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN,
                              description="'builtin' (default) or a model name from the server's model directory")
    sample_rate: Literal[16000, 24000, 48000] = Field(16000, description="rate of the PCM s16le mono sent")
    max_seconds: float | None = Field(None, gt=0, description="end the session after this long "
                                      "(never beyond LIPSYNC_LIVE_MAX_SECONDS)")
    rtmp_url: str | None = Field(None, max_length=2048, description="also push the stream (video and audio) to this "
                                 "RTMP server, rtmp[s]://host[:port]/app/stream-key; public addresses only, as "
                                 "for input URLs (LIPSYNC_ALLOW_PRIVATE_URLS)")
    segment_seconds: float | None = Field(None, ge=0.2, le=6.0, description="the longest HLS segment of this "
                                          "session (default LIPSYNC_LIVE_SEGMENT_SECONDS, 0.5): shorter segments "
                                          "bring a player closer to live at more keyframes (0.25: about 0.2 s "
                                          "closer with hls.js, about +40 % bitrate; the web page's Live tab asks "
                                          "for it); an RTMP push shares them")


class SessionView(BaseModel):
    """A live session: where to send speech and watch the stream, and its figures so far."""
    id: str
    state: str  # live, ending, ended, failed
    reason: str | None = None  # why it ended: finished, deleted, idle_timeout, max_seconds, service_stopped, failed
    error: ErrorInfo | None = None
    # when it ends by itself: the max_seconds asked for, capped at LIPSYNC_LIVE_MAX_SECONDS (a larger one was
    # taken without a word, and the cap was nowhere to be read)
    max_seconds: float | None = None
    avatar_id: str | None = None
    model: str | None = None
    sample_rate: int
    hls_url: str
    audio_ws: str
    audio_url: str
    token: str | None = None  # the audio socket's (and the stream's) query token; hls_url carries a watch-only one
    token_expires: datetime | None = None
    bytes_received: int = 0
    seconds_received: float = 0.0
    # speech that is in the stream, or was a pause shortened to catch up (seconds_skipped of it)
    seconds_rendered: float = 0.0
    # pauses of the speech left out to win back latency the service added (LIPSYNC_LIVE_CATCH_UP)
    seconds_skipped: float = 0.0
    seconds_streamed: float = 0.0
    buffered_seconds: float = 0.0
    segments_published: int = 0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_max_s: float | None = None
    latency_samples: int = 0
    stalls: int = 0
    longest_gap_s: float = 0.0
    # an utterance's speech ran out before its end (its sender behind real time): a pause in the speech
    # each, of LIPSYNC_LIVE_REBUFFER_SECONDS at least
    speech_underruns: int = 0
    model_faults: int = 0
    # seconds of rendering (compositing + the model) per second of stream, lately (admission counts it)
    render_load: float | None = None
    restarts: int = 0  # times the session's actor died and resumed from its journal
    restart_gap_s: float | None = None  # the playlist's stand-still across the last restart
    # the last restart's steps (wall-clock times): the last publication before it, the new process,
    # its imports, the session loaded, the encoder started, the first batch written, the first publication
    restart_timeline: dict[str, float] | None = None
    segment_seconds: float | None = None  # the longest HLS segment of this session
    standby: str | None = None  # "ready": a warm standby waits to take the session over (LIPSYNC_LIVE_STANDBY)
    recording_url: str | None = None
    recording_seconds: float | None = None
    recording_bytes: int | None = None
    rtmp_url: str | None = None  # where the stream is pushed, its stream key left out
    rtmp_state: str | None = None  # pushing, ended, failed (the HLS stream goes on without it)
    rtmp_error: str | None = None


class AudioAppended(BaseModel):
    """`POST /v1/sessions/{id}/audio?offset=N`: the stream's byte offset after this append."""
    offset: int
    accepted: bool
    buffered_seconds: float
