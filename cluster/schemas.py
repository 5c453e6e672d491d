"""Pydantic models shared by the server, the SDK, the CLI and the runtime."""
from __future__ import annotations

import enum
from datetime import datetime, timezone
from fractions import Fraction
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
LoopMode = Literal["pingpong", "forward"]


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
    loop: LoopMode = "pingpong"
    chunk_seconds: float | None = None
    output: str | None = None         # where to place the final mp4 (CLI); default under storage root
    sources: dict[str, str] = Field(default_factory=dict)  # stored copy -> the path the user gave


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
    error: ErrorInfo | None = None
    request: RenderRequest | None = None
    stages: list[StageTime] = Field(default_factory=list)

    @property
    def progress(self) -> float:
        if self.state == JobState.succeeded:
            return 1.0
        return (self.frames_done / self.frames_total) if self.frames_total else 0.0
