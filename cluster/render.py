"""The one render path, as plain functions: admit -> prepare -> render chunks -> finalise.

`render_local` runs them in this process (tests, debugging); the Ray runtime (`actors/`)
distributes exactly the same functions: compositors call `prepare_job`, `render_chunk` and
`finalize_job`, and `render_chunk`'s `generate` argument is where the model is reached
(in-process model here, a model-worker actor in the cluster).
"""
from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import time
import uuid
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from pydantic import BaseModel, Field

from cluster import telemetry
from cluster.config import Settings, get_settings
from cluster.errors import (
    InputError,
    InputNotFound,
    InputsGone,
    LipsyncError,
    ModelLoadError,
    OutputVerificationError,
    RenderError,
)
from cluster.fsutil import fsync_dir, fsync_file, sweep_temporaries, temporary_name
from cluster.resources import RESERVATIONS, check_job_disk, disk_full_guard
from cluster.schemas import Chunk, MediaInfo, RenderRequest

if TYPE_CHECKING:
    from cluster.audio import SampleFile

log = logging.getLogger("lipsync.render")

GenerateFn = Callable[[np.ndarray, np.ndarray], "np.ndarray | Callable[[], np.ndarray]"]
"""(mel windows [B,1,80,16] float32, crops [B,S,S,3] uint8) -> generated crops [B,S,S,3] uint8,
or a function returning them (the batch was submitted to a model elsewhere): `render_chunk` then
prepares and submits the next batch before it waits for this one, so the model and this process
work at the same time."""
ProgressFn = Callable[[int], None]


class JobPlan(BaseModel):
    """Everything a compositor needs to render any chunk of a job; stored as JSON with the job."""
    job_id: str
    job_dir: str
    audio_path: str
    audio_duration: float
    mel_path: str
    avatar_id: str
    template_path: str
    track_path: str
    template_frames: int
    width: int
    height: int
    fps_num: int
    fps_den: int
    frames_total: int
    loop: str
    model: str
    model_size: int
    crop: str = "aligned"  # crop recipe: "aligned" or "wav2lip" (cluster.faces.align)
    batch_size: int
    chunks: list[Chunk]
    output_path: str
    crf: int | None = None  # the request's output quality; None: the settings' crf
    color: list[int] | None = None  # the template's colour tags (VideoStreamInfo.color), carried to the output
    blobs: dict[str, str] = Field(default_factory=dict)  # "template"/"track"/"mel" -> sha256, for node caches
    # Set when prepare wrote only the mel columns the first chunk reads (`prepare_job(defer_mel=True)`):
    # that file; `write_job_mel` writes the whole `mel_path` afterwards, from the same samples.
    mel_head_path: str = ""
    decoded_samples: int = 0  # 16 kHz samples the audio input decoded to
    audio_samples: int = 0    # samples of the signal the mel describes (the audio fitted to the sync mode)
    model_gain_db: float = 0.0  # how much louder than the file the model hears the speech (quiet recordings)
    model_dc: float = 0.0  # the constant offset taken off the file's samples for the model (`cluster.audio.dc_offset`)
    # the room's mel magnitudes (80) taken out of the model's input (`cluster.audio.denoise_mel`); empty: none
    model_room: list[float] = Field(default_factory=list)
    # the built-in model's file the job was planned with: a job resumed by another version renders its remaining
    # chunks with it, not with that version's built-in model (another mouth from one chunk on)
    model_file: str = ""

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)

    def segment_path(self, index: int) -> str:
        return str(Path(self.job_dir) / "segments" / f"{index:05d}.mp4")

    @property
    def mel_pending(self) -> bool:
        """Only the first chunk's mel columns are written yet (`write_job_mel` writes the rest)."""
        return bool(self.mel_head_path) and not Path(self.mel_path).exists()


def plan_for_chunk(plan: JobPlan, chunk: Chunk) -> JobPlan:
    """The plan `chunk` renders with: while the whole mel is still being written (`mel_pending`), the
    first chunk reads the mel head (the same columns, bit for bit); other chunks wait for the whole."""
    if chunk.index != 0 or not plan.mel_pending:
        return plan
    from cluster.fsutil import file_sha256

    blobs = {**plan.blobs, "mel": file_sha256(plan.mel_head_path)} if plan.blobs else {}
    return plan.model_copy(update={"mel_path": plan.mel_head_path, "blobs": blobs})


class ChunkResult(BaseModel):
    index: int
    frames: int
    segment: str
    seconds: float
    # of `seconds`, how long the render thread waited for the model's answers and for the encoder
    # to take frames (where a compositor waits, issue 19)
    waited_model_s: float = 0.0
    waited_encoder_s: float = 0.0
    data: bytes | None = None  # the segment's bytes, when rendered on a node without the storage root


# The prepared files a compositor reads, by role: what a node without the storage root caches.
BLOB_FIELDS = {"template": "template_path", "track": "track_path", "mel": "mel_path"}


def with_blobs(plan: JobPlan) -> JobPlan:
    """The plan with the content hash of each prepared file it reads (see `localized`); the mel's
    once it is written (`plan_for_chunk` hashes the head the first chunk reads meanwhile)."""
    from cluster.fsutil import file_sha256

    return plan.model_copy(update={"blobs": {role: file_sha256(getattr(plan, field))
                                             for role, field in BLOB_FIELDS.items()
                                             if not (role == "mel" and plan.mel_pending)}})


def localized(plan: JobPlan, cache_root: Path, fetcher: Callable[[str], Callable[[int, int], bytes]],
              part_bytes: int, budget_bytes: int) -> JobPlan:
    """The plan as a node without the storage root renders it: each prepared file from the
    node-local cache (fetched once per node by content hash), segments under the cache."""
    from cluster.nodecache import cached_file

    update = {field: str(cached_file(cache_root, plan.blobs[role], Path(getattr(plan, field)).suffix,
                                     fetcher(plan.blobs[role]), part_bytes, budget_bytes))
              for role, field in BLOB_FIELDS.items()}
    return plan.model_copy(update={**update, "job_dir": str(Path(cache_root) / "jobs" / plan.job_id)})


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def job_dir(job_id: str, settings: Settings | None = None) -> Path:
    return (settings or get_settings()).dir("jobs") / job_id


# --- admit -------------------------------------------------------------------------------
@telemetry.timed("stage_seconds", stage="admit")
@disk_full_guard("admit")
def admit(job_id: str, request: RenderRequest, settings: Settings | None = None, link: bool = False) -> RenderRequest:
    """Probe the inputs (typed errors for bad ones, within seconds) and store them under the job.

    Returns the request with paths pointing at the stored copies, so the job survives the
    caller's files going away. A user's file is copied (a hard link would share its inode: the
    user rewriting the file would change the job's input, and its link count would make
    `resolve_input_path` refuse it later); `link=True` is for files that are already ours
    (content-addressed uploads), hard-linked where the filesystem allows.
    """

    s = settings or get_settings()
    audio_info, video_info = check_inputs(request, s)
    template_info = avatar_label = None
    if video_info is None and request.avatar_id is not None:  # sized by the avatar's template
        from cluster.faces.avatar import avatar_name, load_avatar

        template_info = load_avatar(request.avatar_id, s).info
        avatar_label = avatar_name(request.avatar_id, s)  # (its views name it: a hex id tells jobs apart badly)
    template = (video_info or template_info).video
    if request.loop == "cut_off" and template is not None and template.frame_count == 1:
        raise InputError("sync_mode cut_off ends the video at the shorter of the speech and the template, and this "
                         "template is one frame (a photo): the video would last 0.04 s. Use pingpong or loop",
                         path="sync_mode", job_id=job_id)
    check_job_disk(audio_info, video_info, request.output, s, job_id=job_id, stored_template=template_info,
                   reserve=True)  # promised until the job renders (actors/jobs.py releases it)
    jdir = job_dir(job_id, s)
    made = not jdir.exists()  # by this call: removed again if it fails (retention never sees a dir without a row)
    inputs = jdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    stored = {}
    try:
        for key in ("audio", "video"):
            src = getattr(request, key)
            if src is None:
                continue
            dst = inputs / f"{key}{Path(src).suffix.lower()}"
            if not dst.exists():
                _store_input(src, dst, link)
            stored[key] = str(dst)
    except BaseException:
        RESERVATIONS.release(job_id)
        if made:
            shutil.rmtree(jdir, ignore_errors=True)
        raise
    # stored copy -> what the user gave (through any earlier mapping, e.g. an upload's reference)
    sources = {**request.sources, **{stored[k]: request.sources.get(getattr(request, k), getattr(request, k))
                                     for k in stored}}
    if request.output is not None:  # relative to the caller, not to whichever process finalises
        stored["output"] = str(Path(request.output).expanduser().resolve())
    return request.model_copy(update={**stored, "sources": sources, "avatar_name": avatar_label})


def check_model(model: str, settings: Settings) -> None:
    """`InputNotFound` for a model that names no file: a name the service resolved into its models
    directory (`model: tiny96`) is answered with the service's model names, not a path on the server."""
    from cluster.models import check_named_model, is_named_model

    if is_named_model(model):
        check_named_model(model)  # at admission: not a model load failing later
        return
    if Path(model).is_file():
        return
    models = settings.dir("models")
    if Path(model).parent == models:
        names = sorted(p.stem for p in models.glob("*.onnx") if not p.name.startswith("builtin-"))
        raise InputNotFound(f"unknown model {Path(model).stem!r}: this service has the built-in model ('builtin', "
                            "'builtin:S')" + (f" and the ONNX files of its models directory: {', '.join(names)}"
                                              if names else " and no ONNX file in its models directory"),
                            path="model")
    raise InputNotFound(f"model file {model} does not exist (expected 'builtin' or an .onnx file)", path=model)


def check_inputs(request: RenderRequest, settings: Settings | None = None) -> tuple[MediaInfo, MediaInfo | None]:
    """Probe a request's inputs where they are (typed errors naming the file, within seconds);
    returns what was found (audio, video or None for an avatar job)."""
    from cluster.media.probe import probe_audio, probe_video

    s = settings or get_settings()
    try:
        check_model(request.model or s.model, s)
    except InputError as e:
        if request.model:
            raise
        # the service's own default (a joined service checks no LIPSYNC_MODEL at its start): not the request's
        raise ModelLoadError(f"the service's default model cannot be used: {e.message} (LIPSYNC_MODEL="
                             f"{s.model!r}, an operator's setting)", stage="admit") from None

    def probed(key: str, probe) -> MediaInfo:
        try:
            return probe(getattr(request, key), s)
        except LipsyncError as e:
            # the request's field it is about, before its path names the user's file: an upload's name, which
            # the request as sent (`upload:<sha256>`) does not show
            if e.field is None and e.path == getattr(request, key):
                e.field = key
            _name_sources(e, request)
            raise

    audio = probed("audio", probe_audio)
    video = probed("video", probe_video) if request.video is not None else None
    if video is None and request.avatar_id is None:
        raise InputNotFound("a job needs a template video or an avatar_id")
    return audio, video


def _store_input(src: str, dst: Path, link: bool) -> None:
    """`src` stored as `dst` whole or not at all: a user's file is copied (a link would change its
    link count, see resolve_input_path), one of ours hard-linked where the filesystem allows; a copy
    cut short (a full disk) is not left behind."""
    tmp = temporary_name(dst)
    try:
        try:
            if not link:
                raise OSError("copy requested")
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def admit_on_manager(job_id: str, request: RenderRequest, settings: Settings | None = None) -> RenderRequest:
    """Admission on the job manager's node: resolve each input (an upload reference, or a path
    under `settings.input_roots`), then `admit` the resolved request. Errors name the file the
    client gave (`request.sources` maps what it sent to its own path)."""
    from cluster.inputs import is_upload_ref, name_of_upload_ref, resolve_input

    s = settings or get_settings()
    resolved: dict[str, str] = {}
    sources = dict(request.sources)
    uploads_only = True
    for key in ("audio", "video"):
        given = getattr(request, key)
        if given is None:
            continue
        uploads_only = uploads_only and is_upload_ref(given)
        try:
            path = str(resolve_input(given, s))
        except LipsyncError as e:
            _name_sources(e, request).with_context(job_id=job_id, stage="admit")
            raise
        resolved[key] = path
        # the name the user knows: the client's file (a form's), or the name a reference's bytes were uploaded under
        named = request.sources.get(given) or name_of_upload_ref(given, Path(path), s)
        sources[path] = named or given
    return admit(job_id, request.model_copy(update={**resolved, "sources": sources}), s, link=uploads_only)


def _name_sources(err: LipsyncError, request: RenderRequest) -> LipsyncError:
    """Errors about a stored copy name the file the user gave instead."""
    return err.naming(request.sources)


# --- prepare -----------------------------------------------------------------------------
def output_path_for(job_id: str, settings: Settings | None = None) -> Path:
    """Where the cluster commits a job's output: under the storage root, on the manager's node
    (clients fetch the bytes through the job manager)."""
    return (settings or get_settings()).dir("outputs") / f"{job_id}.mp4"


def prepare_deadline(request: RenderRequest, settings: Settings | None = None) -> float:
    """How long preparing `request` may take: it transcodes and detects faces in the whole
    template, so the deadline follows the template's length (never below chunk_timeout_s)."""
    from cluster.media.probe import probe_video

    s = settings or get_settings()
    seconds = 0.0
    if request.video is not None:
        try:
            info = probe_video(request.video, s)
            seconds = info.video.duration if info.video else info.duration
        except LipsyncError:  # prepare itself reports what is wrong with the file
            seconds = s.max_input_seconds
    return max(s.chunk_timeout_s, s.chunk_timeout_s + s.prepare_seconds_per_template_second * seconds)


@disk_full_guard("prepare")
def prepare_job(job_id: str, request: RenderRequest, settings: Settings | None = None,
                model_size: int | None = None, detector=None, output_path: str | None = None,
                defer_mel: bool = False) -> JobPlan:
    """Prepare the avatar (cached), decode audio to mel features, plan frames and chunks.

    The output goes to `output_path` (the cluster passes `output_path_for(job_id)`), else to the
    request's output, else into the job's directory. With `defer_mel`, a job of several chunks
    gets only the mel columns its first chunk reads (`mel_head_path`, whole blocks of the
    computation: a few seconds of audio), so the first chunk can render at once, however long the
    audio; `write_job_mel` writes the whole spectrogram afterwards."""
    from cluster.audio import (
        SampleFile,
        dc_offset,
        decode_audio_to_file,
        file_room_spectrum,
        mel_columns_needed,
        mel_frame_count,
        mel_head_columns,
        model_input_gain_db,
        room_level_db,
        room_level_dbfs,
        speech_level_dbfs,
        write_melspectrogram,
    )
    from cluster.faces.avatar import load_avatar, name_avatar, prepare_avatar
    from cluster.plan import make_chunks

    s = settings or get_settings()
    for key in ("audio", "video"):
        p = getattr(request, key)
        if p is not None and not Path(p).exists():
            raise InputsGone(f"job {job_id}: stored {key} input {p} no longer exists", job_id=job_id,
                             stage="prepare", path=p)
    jd = job_dir(job_id, s)
    jd.mkdir(parents=True, exist_ok=True)
    # The audio is streamed, never held whole (an hour of speech is 230 MB of float32 samples and
    # 92 MB of mel): decoded into an unnamed file in the job's directory, read back block by block.
    with tempfile.TemporaryFile(dir=jd, prefix="audio16k.") as raw:
        try:
            if request.video is not None:
                avatar = prepare_avatar(request.video, s, detector=detector)
                name_avatar(avatar.id, request.sources.get(request.video, request.video), s)
            else:
                avatar = load_avatar(request.avatar_id, s)
            n_samples = decode_audio_to_file(request.audio, raw, s)
        except LipsyncError as e:
            _name_sources(e, request).with_context(job_id=job_id, stage="prepare")
            raise
        vinfo = avatar.info.video
        assert vinfo is not None
        fps = vinfo.fps
        frames_total, audio_path, samples = _fit_to_sync_mode(SampleFile(raw, n_samples), request,
                                                              avatar.frame_count, fps)
        dc = dc_offset(samples)
        if dc:  # taken off for the model (the output's audio is unchanged)
            log.info("job %s: its audio is offset by %.4f (full scale): the model hears it without", job_id, dc,
                     extra={"job_id": job_id})
            samples = SampleFile(samples.f, samples.n_file, len(samples), dc=dc)
        level, floor = speech_level_dbfs(samples), room_level_dbfs(samples)
        gain_db = round(model_input_gain_db(level, floor), 2)
        if gain_db:  # quiet or too loud: the model hears it at a usual level (the output's audio is unchanged)
            log.info("job %s: its speech is at %.1f dBFS (the room between words at %.1f): the model hears it %.1f dB "
                     "%s", job_id, level, floor, abs(gain_db), "louder" if gain_db > 0 else "quieter",
                     extra={"job_id": job_id})
            samples = SampleFile(samples.f, samples.n_file, len(samples), gain_db=gain_db, dc=dc)
        room = file_room_spectrum(samples) if s.denoise_model_input else None
        if room is not None:
            log.info("job %s: the room between its words (%.1f dB in the speech band, as the model hears it) is taken "
                     "out of the model's input", job_id, room_level_db(room), extra={"job_id": job_id})
        chunks = make_chunks(frames_total, fps, request.chunk_seconds or s.chunk_seconds, s.first_chunk_seconds)
        mel_path, head_path = jd / "mel.npy", ""
        head = mel_columns_needed(fps, chunks[0].stop)
        if defer_mel and len(chunks) > 1 and mel_head_columns(head, len(samples)) < mel_frame_count(len(samples)):
            head_path = str(jd / "mel-head.npy")
            write_melspectrogram(samples.read, len(samples), head_path, columns=head, room=room)
        else:
            write_melspectrogram(samples.read, len(samples), mel_path, room=room)
    n_fitted = len(samples)
    model = request.model or s.model
    if model_size is None:
        from cluster.models import load_model

        model_size = load_model(model, s).size
    from cluster.models import crop_for_spec
    from cluster.models.builtin import builtin_model_file_for

    crop = crop_for_spec(model, request.crop, s)
    return JobPlan(
        job_id=job_id, job_dir=str(jd), audio_path=audio_path, audio_duration=n_fitted / 16000.0,
        mel_path=str(mel_path), avatar_id=avatar.id, template_path=avatar.template_path,
        track_path=avatar.track_path, template_frames=avatar.frame_count, width=vinfo.width,
        height=vinfo.height, fps_num=fps.numerator, fps_den=fps.denominator, frames_total=frames_total,
        loop=request.loop, model=model, model_size=model_size, crop=crop, batch_size=s.batch_size, chunks=chunks,
        output_path=output_path or request.output or str(jd / "output.mp4"),
        crf=request.crf if request.crf is not None else s.crf,  # fixed for the job: a restart with another
        # LIPSYNC_CRF does not render its remaining chunks at another quality
        mel_head_path=head_path, decoded_samples=n_samples, audio_samples=n_fitted, color=vinfo.color,
        model_gain_db=gain_db, model_dc=dc, model_file=builtin_model_file_for(model, s),
        model_room=[] if room is None else [float(x) for x in room],
    )


@disk_full_guard("prepare")
def write_job_mel(plan: JobPlan, request: RenderRequest, settings: Settings | None = None) -> None:
    """The whole mel spectrogram (`plan.mel_path`) of a job prepared with `defer_mel`: its audio
    decoded again (the same samples as at prepare, checked), the sync mode's fitting applied, the
    columns checked against the head the first chunk rendered from, then published atomically.
    Nothing to do when it is written already (a step run again after a restart)."""
    from cluster.audio import SampleFile, decode_audio_to_file, write_melspectrogram
    from cluster.fsutil import publish

    s = settings or get_settings()
    mel_path = Path(plan.mel_path)
    if mel_path.exists() or not plan.mel_head_path:
        return
    where = dict(job_id=plan.job_id, stage="prepare")
    if request.audio is None or not Path(request.audio).exists():
        raise InputsGone(f"job {plan.job_id}: stored audio input {request.audio} no longer exists", path=request.audio,
                         **where)
    tmp = mel_path.with_name(f".{mel_path.name}.{uuid.uuid4().hex[:8]}.whole.npy")
    try:
        with tempfile.TemporaryFile(dir=plan.job_dir, prefix="audio16k.") as raw:
            try:
                n_samples = decode_audio_to_file(request.audio, raw, s)
            except LipsyncError as e:
                _name_sources(e, request).with_context(**where)
                raise
            if n_samples != plan.decoded_samples:
                raise OutputVerificationError(f"job {plan.job_id}: its audio decodes to {n_samples} samples now, "
                                              f"{plan.decoded_samples} when it was prepared", path=request.audio,
                                              **where)
            samples = SampleFile(raw, n_samples, plan.audio_samples, gain_db=plan.model_gain_db, dc=plan.model_dc)
            write_melspectrogram(samples.read, len(samples), tmp, room=np.array(plan.model_room) if plan.model_room
                                 else None)
        head = np.load(plan.mel_head_path, mmap_mode="r")
        whole = np.load(tmp, mmap_mode="r")
        if not np.array_equal(head, whole[:, :head.shape[1]]):
            raise OutputVerificationError(f"job {plan.job_id}: the mel features differ from the head its first "
                                          f"chunk rendered from", path=plan.mel_head_path, **where)
        del head, whole
        publish(tmp, mel_path)
    finally:
        tmp.unlink(missing_ok=True)


def _fit_to_sync_mode(samples: SampleFile, request: RenderRequest, template_frames: int,
                      fps: Fraction) -> tuple[int, str, SampleFile]:
    """(output frames, the audio file to mux, the 16 kHz samples) for the request's sync mode:
    `cut_off` trims the audio to a shorter template, `silence` pads it with silence to a longer
    one. The mel is made of the fitted 16 kHz samples; the output's audio is the file as given,
    at its own rate and channels, which the job's AAC track cuts or pads to the fitted length (it
    used to be a 16 kHz mono copy: nothing above 8 kHz in these modes)."""
    from cluster.audio import SampleFile
    from cluster.plan import fit_audio_samples, frame_count_from_samples, sync_frame_count

    audio_frames = frame_count_from_samples(len(samples), 16000, fps)
    frames = sync_frame_count(audio_frames, template_frames, request.loop)
    if frames == audio_frames:
        return frames, request.audio, samples
    return frames, request.audio, SampleFile(samples.f, samples.n_file, fit_audio_samples(frames, fps, 16000))


def with_planned_model(plan: JobPlan, settings: Settings) -> JobPlan:
    """The plan a resumed job renders with: where it was planned with another version's built-in model (its file
    is not this version's), with that model's file, so that the whole video is one model's. (An upgrade probe's
    job, resumed, showed the old model's mouth up to 86 s and the new one's after.) Unchanged where the file is
    this version's, or gone (said in the log: the remaining chunks render with this version's)."""
    from cluster.models.builtin import builtin_model_file_for

    current = builtin_model_file_for(plan.model, settings)
    if not current or not plan.model_file or plan.model_file == current:
        return plan
    if not Path(plan.model_file).is_file():
        log.warning("job %s was planned with the built-in model %s, which no longer exists: its remaining chunks "
                    "render with this version's, whose mouth may differ", plan.job_id, plan.model_file)
        return plan
    log.warning("job %s was planned with another version's built-in model: its remaining chunks render with that "
                "model (%s), not this version's", plan.job_id, plan.model_file)
    return plan.model_copy(update={"model": plan.model_file})


def check_plan_files(plan: JobPlan, render_only: bool = False) -> None:
    """Raise `InputsGone` naming the first stored input or prepared file that no longer exists
    (`render_only`: only those a chunk reads, the whole mel among them; otherwise, while the whole
    mel is pending, its head instead)."""
    pending = plan.mel_pending and not render_only
    mel = ("mel features (first chunk)", plan.mel_head_path) if pending else ("mel features", plan.mel_path)
    files = [("normalised template", plan.template_path), ("face track", plan.track_path), mel]
    for what, p in files if render_only else [("audio input", plan.audio_path), *files]:
        if not Path(p).exists():
            raise InputsGone(f"job {plan.job_id}: the {what} {p} no longer exists", job_id=plan.job_id, path=p)


# --- render one chunk --------------------------------------------------------------------
@disk_full_guard("render")
def render_chunk(plan: JobPlan, chunk: Chunk, generate: GenerateFn, settings: Settings | None = None,
                 progress: ProgressFn | None = None) -> ChunkResult:
    """Render output frames [chunk.start, chunk.stop) into the chunk's H.264 segment.

    Streams batch by batch: decode the template frames the plan maps to, cut aligned crops,
    `generate` new crops, paste them back, encode. Frames stay yuv420p from the decoder to the
    encoder (`cluster.media.yuv`): only the face regions are converted to BGR. Memory is bounded
    by the batches in flight (`Settings.batches_in_flight`) and the encoder's two. The segment
    is written under a unique temporary name and renamed into place only when complete, so a
    killed attempt never leaves a segment that looks finished.
    """
    from cluster.audio import mel_windows
    from cluster.faces.align import crop_matrices, cut_crops_yuv, paste_back_yuv
    from cluster.faces.track import FaceTrack
    from cluster.media.encode import SegmentEncoder
    from cluster.media.framecache import TemplateFrames
    from cluster.plan import template_indices

    s = settings or get_settings()
    t0 = time.monotonic()
    check_plan_files(plan, render_only=True)
    track = FaceTrack.load(plan.track_path)
    mel = np.load(plan.mel_path, mmap_mode="r")
    final = Path(plan.segment_path(chunk.index))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    size = plan.model_size
    try:
        with TemplateFrames(plan.template_path, s, user=plan.job_id) as reader, \
                SegmentEncoder(str(tmp), plan.width, plan.height, plan.fps,
                               s if plan.crf is None else s.model_copy(update={"crf": plan.crf}),
                               color=plan.color) as encoder:

            waited_model = 0.0

            def finish(frames, matrices, crops, shown, generated) -> None:
                nonlocal waited_model
                if callable(generated):
                    t = time.monotonic()
                    generated = generated()
                    waited_model += time.monotonic() - t
                # the batch's frames are its own: pasted into, then given to the encoder
                encoder.write_yuv(paste_back_yuv(frames, generated, matrices, size, original_crops=crops,
                                                 recipe=plan.crop, shown=shown))
                if progress is not None:
                    progress(len(frames))

            # batches submitted and not yet pasted: at most `batches_in_flight` besides the one
            # being prepared, so the model works on them while this process decodes and crops
            pending: collections.deque = collections.deque()
            for b0 in range(chunk.start, chunk.stop, plan.batch_size):
                b1 = min(b0 + plan.batch_size, chunk.stop)
                idx = template_indices(b0, b1, plan.template_frames, plan.loop, plan.frames_total)
                frames = reader.read_yuv(idx)
                matrices = crop_matrices(track.landmarks[idx], track.boxes[idx], size, plan.crop,
                                         (plan.width, plan.height))
                crops = cut_crops_yuv(frames, matrices, size)
                pending.append((frames, matrices, crops, track.shown[idx],
                                generate(mel_windows(mel, plan.fps, b0, b1), crops)))
                while len(pending) > s.batches_in_flight:
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
            written = encoder.close()
            waited_encoder = encoder.waited_s
        if written != chunk.frames:
            raise OutputVerificationError(
                f"segment {tmp} of chunk {chunk.index} has {written} frames, expected {chunk.frames}",
                path=str(tmp))
        # the first verified render of a chunk wins: a late duplicate (an attempt a job manager
        # killed meanwhile had started, a straggler's twin) renders the same frames; it never
        # replaces a segment that a resumed job manager may already have adopted (actors/jobs.py)
        fsync_file(tmp)  # on disk before it is linked and recorded as done
        try:
            os.link(tmp, final)
            fsync_dir(final.parent)
        except FileExistsError:
            log.info("job %s chunk %d: segment %s was already rendered; this render is dropped",
                     plan.job_id, chunk.index, final)
        tmp.unlink()
    except LipsyncError as e:
        tmp.unlink(missing_ok=True)
        e.with_context(job_id=plan.job_id, chunk=chunk.index, stage="render")
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ChunkResult(index=chunk.index, frames=chunk.frames, segment=str(final),
                       seconds=time.monotonic() - t0, waited_model_s=waited_model, waited_encoder_s=waited_encoder)


# --- finalise ----------------------------------------------------------------------------
def pending_output_path(plan: JobPlan) -> Path:
    """Where finalize writes the verified output before it is committed (same directory)."""
    out = Path(plan.output_path)
    return out.with_name(f".{out.stem}.{plan.job_id}.pending{out.suffix}")


def sweep_finalize_temporaries(plan: JobPlan) -> list[Path]:
    """Remove what a finalize killed mid-way (its compositor SIGKILLed) left next to the output:
    `finalize_output`'s temporary output and concat list, the pending output's temporaries, so
    only this job's are touched. Call it where no finalize of this job can be running."""
    pending = pending_output_path(plan)
    removed = sweep_temporaries(pending.parent, of=pending)
    for stale in removed:
        log.info("job %s: removed %s, left by a finalize that was killed", plan.job_id, stale)
    return removed


def _committed_marker(plan: JobPlan) -> Path:
    return Path(plan.job_dir) / "output.committed"


def _verify(path: Path, plan: JobPlan, s: Settings) -> MediaInfo | None:
    from cluster.media.finalize import verify_output

    try:
        return verify_output(str(path), frames_expected=plan.frames_total, fps=plan.fps,
                             audio_duration=plan.audio_duration, settings=s)
    except LipsyncError:
        return None


@telemetry.timed("stage_seconds", stage="finalise")
@disk_full_guard("finalize")
def finalize_job(plan: JobPlan, settings: Settings | None = None, commit: bool = True) -> MediaInfo:
    """Concatenate the segments, mux the audio and verify, under the pending name; with `commit`
    also rename it into place (`commit_output`).

    Idempotent, for a job manager that restarts mid-way: an output this job already committed
    is verified again, not rebuilt; a verified pending output is reused.
    """
    from cluster.media.finalize import finalize_output

    s = settings or get_settings()
    check_plan_files(plan)
    out, pending = Path(plan.output_path), pending_output_path(plan)
    if _committed_marker(plan).exists() and (info := _verify(out, plan, s)) is not None:
        return info
    info = _verify(pending, plan, s) if pending.exists() else None
    if info is None:
        sweep_finalize_temporaries(plan)  # an earlier attempt's, killed mid-way
        segments = [plan.segment_path(c.index) for c in plan.chunks]
        missing = [p for p in segments if not Path(p).exists()]
        if missing:
            raise OutputVerificationError(f"job {plan.job_id}: {len(missing)} segment(s) missing, first {missing[0]}",
                                          job_id=plan.job_id, stage="finalize", path=missing[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            aac = job_aac(plan, s)
            info = finalize_output(segments, str(aac), str(pending), frames_expected=plan.frames_total,
                                   fps=plan.fps, audio_duration=plan.audio_duration, settings=s, audio_copy=True)
        except LipsyncError as e:
            e.with_context(job_id=plan.job_id, stage="finalize")
            raise
        if _discarded_marker(plan).exists():  # (looked at after the pending output exists: `discard_output`
            pending.unlink(missing_ok=True)   # marks before it removes, so one of the two removes it)
            raise RenderError(f"job {plan.job_id} ended while its output was finalized: the output is discarded",
                              job_id=plan.job_id, stage="finalize", path=str(pending))
    if commit:
        commit_output(plan, s)
        info = info.model_copy(update={"path": str(out)})
    return info


def job_aac(plan: JobPlan, settings: Settings) -> Path:
    """The job's AAC track (`hls/audio.m4a`): encoded once, ahead of the video, by the job's HLS
    publisher; encoded here when there was none (e.g. a job planned before HLS existed)."""
    from cluster.hls import AUDIO_FILE, hls_dir
    from cluster.media.aac import AacTrack

    path = hls_dir(plan.job_dir) / AUDIO_FILE
    if not path.exists():
        track = AacTrack(plan.audio_path, plan.audio_duration, settings.audio_bitrate, spill_dir=plan.job_dir,
                         dc_block=bool(plan.model_dc))
        try:
            track.encode().save(path)
        finally:
            track.close()
    return path


def commit_output(plan: JobPlan, settings: Settings | None = None) -> None:
    """Rename the verified pending output to the output path, record that, drop the rendered
    segments (the verified output holds everything they did). The job's HLS files (`hls/`) stay
    until retention removes the job, for viewers behind the live edge."""
    from cluster.hls import hls_dir

    s = settings or get_settings()
    out, pending = Path(plan.output_path), pending_output_path(plan)
    if pending.exists():
        os.replace(pending, out)  # the pending output was published (fsynced) by finalize
        fsync_dir(out.parent)
    elif not (_committed_marker(plan).exists() and out.exists()):
        raise OutputVerificationError(f"job {plan.job_id}: no verified output to commit at {pending}",
                                      job_id=plan.job_id, stage="finalize", path=str(pending))
    _committed_marker(plan).write_text(str(out))
    sweep_finalize_temporaries(plan)
    # what a writer killed mid-write left (a retried admission's input copy, the saved AAC): the
    # job's writers are done once its output is committed
    for directory in (Path(plan.job_dir) / "inputs", hls_dir(plan.job_dir)):
        for stale in sweep_temporaries(directory):
            log.info("job %s: removed %s, left by a writer that was killed", plan.job_id, stale)
    if not s.keep_segments:
        shutil.rmtree(Path(plan.job_dir) / "segments", ignore_errors=True)


def discard_output(plan: JobPlan) -> None:
    """Remove a pending output that will not be committed (the job was cancelled or failed), and
    what a killed finalize of it left; a finalize of it still running (the job's deadline passed
    while it ran: a step in a compositor is not stopped by that) removes what it made
    (`_discarded_marker`)."""
    _discarded_marker(plan).touch()
    pending_output_path(plan).unlink(missing_ok=True)
    sweep_finalize_temporaries(plan)


def discard_segments(plan: JobPlan, settings: Settings | None = None) -> None:
    """Remove the segments of a job that ended without its output (failed, cancelled), as a committed
    job's are (`LIPSYNC_KEEP_SEGMENTS` keeps them): nothing reads them any more, and a job failed by a full
    disk kept megabytes each until retention, which by default never runs. Its HLS stream stays."""
    if not (settings or get_settings()).keep_segments:
        shutil.rmtree(Path(plan.job_dir) / "segments", ignore_errors=True)


def _discarded_marker(plan: JobPlan) -> Path:
    return Path(plan.job_dir) / "output.discarded"


# --- everything in this process ------------------------------------------------------------
def render_local(request: RenderRequest, settings: Settings | None = None, model=None,
                 progress: Callable[[int, int], None] | None = None, job_id: str | None = None) -> MediaInfo:
    """Render one job entirely in this process (no Ray): the same functions the cluster runs."""
    from cluster.models import load_model

    s = settings or get_settings()
    job_id = job_id or new_job_id()
    model = model or load_model(request.model or s.model, s)
    admitted = admit(job_id, request, s)
    try:
        plan = prepare_job(job_id, admitted, s, model_size=model.size, defer_mel=True)
    finally:
        RESERVATIONS.release(job_id)  # rendering now: what it writes shows in the free space
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, plan.frames_total)

    from cluster.hls import HlsPublisher

    publisher = HlsPublisher(plan, s).start()  # the same HLS output as in the cluster
    try:
        for chunk in plan.chunks:  # the first one from the mel head, as in the cluster
            render_chunk(plan_for_chunk(plan, chunk), chunk, model.generate, s, progress=tick)
            publisher.chunk_done(chunk.index)
            if chunk.index == 0:
                write_job_mel(plan, admitted, s)
        publisher.drain(s.chunk_timeout_s)
        return finalize_job(plan, s)
    finally:
        publisher.close()
