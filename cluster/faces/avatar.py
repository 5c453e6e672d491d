"""Avatars: a normalised template plus its subject's face track, prepared once per content hash.

Layout: `<storage_root>/avatars/<id>/track.npz` and `avatar.json` (written last, atomically: an
avatar directory without `avatar.json` is an unfinished preparation and is redone).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError

from cluster import stopping, telemetry
from cluster.config import Settings, get_settings
from cluster.errors import FaceSideways, InputNotFound, LipsyncError, NoFace, RenderTimeout
from cluster.faces.mtcnn import FaceDetection, MTCNNDetector
from cluster.faces.track import FaceTrack, build_track
from cluster.fsutil import lock_within, publish, read_name, store_name, temporary_name, touch, write_atomic
from cluster.media.decode import TemplateReader, iter_frames
from cluster.media.normalize import (
    MAX_TEMPLATE_FPS,
    MIN_TEMPLATE_FPS,
    content_id,
    decode_error,
    frames_map_one_to_one,
    normalize_template,
    rate_out_of_bounds,
    template_path_for,
)
from cluster.media.probe import probe_video
from cluster.schemas import MediaInfo

log = logging.getLogger("lipsync.avatar")

AVATAR_FILE = "avatar.json"
#: the name a user knows an avatar by (`name_avatar`), beside its `avatar.json`
NAME_FILE = "name.txt"
TRACK_FILE = "track.npz"
_AVATAR_ID = re.compile(r"^[0-9a-f]{8,64}$")


class Avatar(BaseModel):
    """A prepared template: `id` is the template's content hash."""
    id: str
    template_path: str
    track_path: str
    info: MediaInfo
    frame_count: int
    cached: bool = False

    def load_track(self) -> FaceTrack:
        """The stored face track (one entry per template frame)."""
        return FaceTrack.load(self.track_path)


def _avatar_dir(avatar_id: str, settings: Settings) -> Path:
    return settings.dir("avatars") / avatar_id


def _read_stored(avatar_id: str, settings: Settings) -> Avatar | None:
    """The stored avatar when complete (json valid, track and template present), else None."""
    meta = _avatar_dir(avatar_id, settings) / AVATAR_FILE
    try:
        avatar = Avatar.model_validate_json(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError):
        return None  # a damaged entry is rebuilt
    if avatar.id != avatar_id or not Path(avatar.track_path).is_file() or not Path(avatar.template_path).is_file():
        return None
    video = avatar.info.video
    if video is not None and (_full_range(video) or "color" not in video.model_fields_set):
        # stored by an older version: a full-range template (washed-out renders) or no colour tags read.
        # Brought up to date once, in place: the face track stays valid (same frames, same geometry)
        try:
            avatar = _update_stored(avatar, meta, settings)
        except LipsyncError as e:
            log.warning("avatar %s could not be brought up to date (%s): prepared again", avatar_id, e)
            return None
    return avatar.model_copy(update={"cached": True})


def _full_range(video) -> bool:
    """Whether a stored template is full range (avatars stored before `full_range` was read say so by
    their yuvj* pixel format only)."""
    return video.full_range or (video.pix_fmt or "").startswith("yuvj")


def _update_stored(avatar: Avatar, meta: Path, settings: Settings) -> Avatar:
    """An avatar stored by an older version, with its template converted to limited range where it was
    full range (frames kept one for one) and its colour tags read, stored again (`avatar.json` last)."""
    from cluster.media.ffmpeg import file_url, input_args, run_ffmpeg
    from cluster.media.normalize import x264_template_args
    from cluster.media.probe import read_media_info

    template = Path(avatar.template_path)
    if _full_range(avatar.info.video):
        tmp = temporary_name(template)  # unique: two processes may update it at once
        try:
            run_ffmpeg(["-loglevel", "error", *input_args(template), "-map", "0:v:0", "-an", "-fps_mode", "passthrough",
                        "-vf", "scale=in_range=full:out_range=limited,format=yuv420p",
                        *x264_template_args(settings), "-movflags", "+faststart", "-f", "mp4", file_url(tmp)],
                       timeout=settings.ffmpeg_timeout_s, settings=settings, stage="normalize", path=str(template))
            publish(tmp, template)
        finally:
            tmp.unlink(missing_ok=True)
    info = read_media_info(template, settings)
    if info.video is None or info.video.frame_count != avatar.frame_count:
        raise InputNotFound(f"avatar {avatar.id}: its converted template has "
                            f"{info.video.frame_count if info.video else 0} frames, expected {avatar.frame_count}",
                            path="avatar_id")
    updated = avatar.model_copy(update={"info": info.model_copy(update={"path": str(template)})})
    write_atomic(meta, updated.model_dump_json(indent=2))
    return updated


def prepare_avatar(video_path: str, settings: Settings | None = None,
                   detector: MTCNNDetector | None = None) -> Avatar:
    """Normalise a template, find its subject's face on every frame, store the track.

    Faces are detected in full on every `settings.detect_interval`-th frame and tracked between
    (`MTCNNDetector.detect_sequence`). When normalising keeps the source's frames one for one
    (`frames_map_one_to_one`: e.g. a camera's constant-rate H.264 re-encoded only for short GOPs),
    the faces are found on the source's frames while ffmpeg normalises it, in parallel; otherwise on
    the normalised template, after it.

    Cached by the template's content hash: preparing the same bytes again reads the stored
    avatar (`cached=True`) without any detection. Raises the input errors of
    `normalize_template`, and `cluster.errors.NoFace` when too few frames show a face.
    """
    s = settings or get_settings()
    source = str(video_path)
    template_id = content_id(source)
    if (stored := _cached(template_id, s, source)) is not None:
        return stored
    # one preparation of a template at a time (the jobs of a batch share one): a second waits, then
    # reads what the first stored, instead of normalising again and replacing its files under it
    with _preparing(template_id, s):
        if (stored := _cached(template_id, s, source)) is not None:
            return stored
        telemetry.emit("avatar_cache", result="miss")
        return _prepare(source, template_id, s, detector)


def stored_avatar_for(video_path: str, settings: Settings | None = None) -> Avatar | None:
    """The avatar already prepared from this template's bytes (by content hash), else None."""
    s = settings or get_settings()
    return _cached(content_id(str(video_path)), s, str(video_path))


def _cached(template_id: str, s: Settings, source: str | None = None) -> Avatar | None:
    """The stored avatar of `template_id` when it is whole and of this storage root (a hit), else None; given
    its `source`, None too when its template was made before the recipe that source needs (`made_before_recipe`)."""
    from cluster.media.normalize import kept_for_users, made_before_recipe

    stored = _read_stored(template_id, s)
    if stored is not None:  # prepared again from its video (deinterlaced, its default stream, ...), unless in use
        stale = ("has a frame rate out of bounds" if rate_out_of_bounds(stored.info) else
                 "was made before this version's recipe for its source"
                 if source is not None and made_before_recipe(Path(stored.template_path), probe_video(source, s))
                 else None)
        if stale is not None and not kept_for_users(template_id, Path(stored.template_path), s, stale):
            return None
    if stored is not None and stored.template_path == str(template_path_for(template_id, s)):
        telemetry.emit("avatar_cache", result="hit")
        touch_avatar(template_id, s)
        return stored
    return None


def touch_avatar(avatar_id: str, s: Settings) -> None:
    """Record a use of a stored avatar (its `avatar.json`'s mtime): retention removes avatars, and
    their templates, unused for `LIPSYNC_RETENTION_DAYS`."""
    touch(_avatar_dir(avatar_id, s) / AVATAR_FILE)  # gone meanwhile: the next use prepares it again


@contextlib.contextmanager
def _preparing(template_id: str, s: Settings):
    """Hold the template's preparation lock (a file lock: other processes of this storage root
    wait too), waiting at most `chunk_timeout_s` for another preparation to end."""
    path = s.dir("avatars") / f".{template_id}.lock"
    with open(path, "a+b") as f:  # closing it releases the lock
        if not lock_within(f, s.chunk_timeout_s):
            raise RenderTimeout(f"template {template_id} has been prepared by another job for over "
                                f"{s.chunk_timeout_s:.0f} s", stage="prepare", path=str(path))
        yield


def _prepare(source: str, template_id: str, s: Settings, detector: MTCNNDetector | None) -> Avatar:
    detector = detector or MTCNNDetector()
    template, detections = None, None
    info = probe_video(source, s)
    _check_a_face_is_there(detector, source, info, s)
    if frames_map_one_to_one(source, info):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="normalise") as pool:
            # (in this thread's context: its log lines name the job, its ffmpeg is the job's work)
            normalising = pool.submit(contextvars.copy_context().run, normalize_template, source, s, template_id)
            try:
                detections = _detect(detector, source, s)
            except LipsyncError as e:  # normalisation's own error, if any, says more about the file
                log.info("detecting faces on %s while normalising it failed: %s", source, e)
            template = normalising.result(timeout=s.ffmpeg_timeout_s + 60)  # ffmpeg is bounded by its own
        if detections is not None and len(detections) != template.info.video.frame_count:
            log.warning("%s: %d source frames but %d normalised ones; detecting again on the normalised "
                        "template", source, len(detections), template.info.video.frame_count)
            detections = None
    if template is None:
        template = normalize_template(source, s, template_id)
    if detections is None:
        detections = _detect(detector, template.path, s)
    video = template.info.video
    try:
        track = build_track(detections, (video.width, video.height), s.min_face_fraction,
                            path_for_errors=source, fps=float(video.fps))
    except NoFace as e:  # a damaged file's garbled frames show no face: the damage is the news
        _raise_if_turned(detector, template.path, detections, source, s)
        said = template.decode_error or decode_error(source, s, probe_video(source, s).video.stream)  # (cached,
        # or used as it was: asked now, of the stream that is the template)
        if said:
            e.message += f"; its video also decodes with errors (ffmpeg: {said}): the file may be damaged"
            e.args = (e.message,)
        raise
    _check_upright(detector, template.path, track, source, s)

    out_dir = _avatar_dir(template.id, s)
    out_dir.mkdir(parents=True, exist_ok=True)
    track_path = out_dir / TRACK_FILE
    track.save(track_path)
    avatar = Avatar(id=template.id, template_path=template.path, track_path=str(track_path),
                    info=template.info, frame_count=len(track), cached=False)
    write_atomic(out_dir / AVATAR_FILE, avatar.model_dump_json(indent=2))
    _return_freed_memory()
    return avatar


#: The most a template's face may be turned in the picture's plane (its eye line from level, degrees):
#: past it, a face lying on its side, whose mouth MTCNN places where an upright face's would be (a dark
#: slit drawn on the cheek, the real mouth still, and the job `succeeded`). Aligned crops handle less.
MAX_FACE_ROLL_DEG = 75.0  # (the estimate reads a real tilt of 55-60 degrees up to 6 degrees high)
#: Frames of the face's track whose roll is measured (spread over it; the median decides)
ROLL_SAMPLES = 3


def _spread(items, n: int) -> list:
    """`n` of `items` spread evenly over them (the middle of each of `n` equal parts), in order, fewer where the
    parts share one."""
    return sorted({items[len(items) * (2 * k + 1) // (2 * n)] for k in range(n)})


def _check_upright(detector: MTCNNDetector, template_path: str, track, source: str, s: Settings) -> None:
    """`FaceSideways` when the track's face lies on its side (`MTCNNDetector.roll_degrees` on a few
    of its frames)."""
    found = np.flatnonzero(track.detected)
    picks = [int(i) for i in _spread(found, ROLL_SAMPLES)]
    with TemplateReader(template_path, s) as reader:
        frames = reader.read(picks)
    rolls = [roll for frame, i in zip(frames, picks)
             if (roll := detector.roll_degrees(frame, track.boxes[i])) is not None]
    if not rolls:
        return
    roll = float(np.median(rolls))
    if abs(roll) >= MAX_FACE_ROLL_DEG:
        how = ("half a turn" if abs(roll) >= 135 else
               f"a quarter {'counter-clockwise' if roll > 0 else 'clockwise'}")
        lies = "upside down" if abs(roll) >= 135 else "on its side"
        # (an upside-down face MTCNN finds reads 100-106 degrees: "on its side, a quarter" was the wrong advice,
        # a review; the turn that shows it upright says)
        turned = _turn_showing_upright(detector, frames)
        if turned is not None:
            how, lies, _ = turned
        raise FaceSideways(f"the face in {source} lies {lies} (its eyes {abs(roll):.0f} degrees from level): "
                           f"lip-sync needs a face within {MAX_FACE_ROLL_DEG:.0f} degrees of upright; turn the video "
                           f"{how} (or correct its rotation metadata)", path=source)


#: Frames without a face in which a turned face is looked for, when too few show one (`_raise_if_turned`)
TURNED_SAMPLES = 3
#: (cv2.rotate's code, how the video is to be turned so that the face is upright, how the face lies)
TURNS = ((1, "half a turn", "upside down"),  # cv2.ROTATE_180
         (0, "a quarter clockwise", "on its side"),  # cv2.ROTATE_90_CLOCKWISE
         (2, "a quarter counter-clockwise", "on its side"))  # cv2.ROTATE_90_COUNTERCLOCKWISE


def _turn_showing_upright(detector: MTCNNDetector, frames: list[np.ndarray]) -> tuple[str, str, int] | None:
    """(how the video is to be turned, how the face lies, on how many of `frames`) for the first of `TURNS` that
    shows an upright face (`MTCNNDetector.roll_degrees`: one on its side turned half a turn is still on its side)
    on most of `frames`; None where none does."""
    import cv2

    def upright(frame: np.ndarray) -> bool:
        faces = detector.detect(frame)
        roll = detector.roll_degrees(frame, faces[0].box) if faces else None
        return roll is not None and abs(roll) < MAX_FACE_ROLL_DEG

    for code, how, lies in TURNS:
        shown = sum(1 for frame in frames if upright(cv2.rotate(np.ascontiguousarray(frame), code)))
        if shown * 2 > len(frames):
            return how, lies, shown
    return None


def _raise_turned(detector: MTCNNDetector, frames: list[np.ndarray], source: str) -> None:
    """`FaceSideways` where `frames`, in which no face was found, show an upright one turned (`_turn_showing_upright`):
    an upside-down face (a phone clip whose rotation flag was lost) is found by MTCNN on a quarter of its frames, one
    on its side on one in 50, and was refused as no face, where the fix is a turn."""
    turned = _turn_showing_upright(detector, frames) if frames else None
    if turned is not None:
        how, lies, shown = turned
        raise FaceSideways(f"the face in {source} lies {lies}: turned {how}, {shown} of {len(frames)} frames where "
                           f"none was found show an upright face; lip-sync needs an upright face: turn the video "
                           f"{how} (or correct its rotation metadata)", path=source)


def _raise_if_turned(detector: MTCNNDetector, template_path: str, detections: list[list[FaceDetection]],
                     source: str, s: Settings) -> None:
    """`_raise_turned` on `TURNED_SAMPLES` of the template's frames without a face, spread over them (too few
    frames showed one)."""
    faceless = [i for i, found in enumerate(detections) if not found]
    if not faceless:
        return
    picks = _spread(faceless, TURNED_SAMPLES)
    with TemplateReader(template_path, s) as reader:
        frames = reader.read(picks)
    _raise_turned(detector, list(frames), source)


def _return_freed_memory() -> None:
    """Hand the heap that preparing freed (decoded frame batches, detection buffers: about 60 MiB
    for a 720p template) back to the system; glibc keeps freed heap otherwise. Linux/glibc only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library: nothing to hand back this way
        pass


#: A template of more frames than this is first looked at in FACE_SAMPLES frames spread over it
#: (`_check_a_face_is_there`)
FACE_SAMPLE_FROM_FRAMES = 250
FACE_SAMPLES = 12


def _check_a_face_is_there(detector: MTCNNDetector, source: str, info: MediaInfo, s: Settings) -> None:
    """`NoFace` at once when none of `FACE_SAMPLES` frames spread over a long template shows a face: a probe's
    2-minute 720p video without one was told so after 130 s of detecting on every frame (its track needs a face on
    `min_face_fraction` of them, so a face that none of the samples meets is one the track would refuse). Frames are
    decoded in order up to the first sample that shows one (a usual template: its first frame)."""
    v = info.video
    total = v.frame_count if v is not None else 0
    if total <= FACE_SAMPLE_FROM_FRAMES or v.rotation or v.stream != 0:  # (upright frames of the first stream only:
        return  # a rotated one's are sideways, and MTCNN finds no face on its side)
    step = total / FACE_SAMPLES
    turned_at = set(_spread(range(FACE_SAMPLES), TURNED_SAMPLES))  # (looked at turned before the refusal)
    kept = []
    for n, batch in enumerate(iter_frames(source, 1, s, only={int(k * step) for k in range(FACE_SAMPLES)})):
        if detector.detect(batch[0]):
            return
        if n in turned_at:
            kept.append(batch[0])
    _raise_turned(detector, kept, source)
    raise NoFace(f"no face found in {source}: none in {FACE_SAMPLES} frames spread over its {total} frames (at least "
                 f"{s.min_face_fraction:.0%} of frames must show the face)", path=source)


@telemetry.timed("stage_seconds", stage="detect")
def _detect(detector: MTCNNDetector, path: str, s: Settings) -> list[list[FaceDetection]]:
    """The faces on every frame of the video at `path`, in order."""
    # (left at the next batch once the job that prepares it has ended: `cluster.stopping`)
    return list(detector.detect_sequence(stopping.checked(iter_frames(path, s.batch_size, s), "prepare"),
                                         s.detect_interval))


def name_avatar(avatar_id: str, given: str | None, s: Settings) -> None:
    """Give a stored avatar the name a user knows its template by (`cluster.views.given_name` of the file or
    URL it was given as: a file's name, a URL's last part), unless it has one: the first name stays (the same
    bytes given again under another name are the same avatar). Control characters are dropped, 200 at most."""
    from cluster.views import given_name

    path = _avatar_dir(avatar_id, s) / NAME_FILE
    if not given or path.exists() or not path.parent.is_dir():
        return
    store_name(path, given_name(given))


def avatar_name(avatar_id: str, s: Settings) -> str | None:
    """The name `name_avatar` stored, or None."""
    return read_name(_avatar_dir(avatar_id, s) / NAME_FILE)


def no_such_avatar(avatar_id: str) -> str:
    """What a job, a live session and `GET /v1/avatars/ID` say of an avatar id that names none."""
    return (f"avatar {avatar_id} does not exist: prepare it from its video first (`lipsync avatar VIDEO`, "
            f"POST /v1/avatars, or a job with its video); avatars unused for LIPSYNC_RETENTION_DAYS are removed")


def load_avatar(avatar_id: str, settings: Settings | None = None, *, use: bool = True) -> Avatar:
    """A prepared avatar by id; raises `InputNotFound` if there is none (or it is incomplete). `use`: the
    caller renders from it, which renews it for retention; a look at it (`GET /v1/avatars`) does not."""
    s = settings or get_settings()
    if not isinstance(avatar_id, str) or not _AVATAR_ID.match(avatar_id):
        raise InputNotFound(f"{str(avatar_id)[:100]!r} is not an avatar id (expected the hex id of a prepared "
                            f"avatar: what `lipsync avatar VIDEO` prints, POST /v1/avatars answers)", path="avatar_id")
    avatar = _read_stored(avatar_id, s)
    if avatar is None:
        raise InputNotFound(no_such_avatar(avatar_id), path="avatar_id")
    if rate_out_of_bounds(avatar.info):
        raise InputNotFound(f"avatar {avatar_id} was prepared at {float(avatar.info.video.fps):g} fps, before "
                            f"templates were brought within {MIN_TEMPLATE_FPS}-{MAX_TEMPLATE_FPS} fps: prepare it "
                            f"again from its video (POST /v1/avatars; it keeps its id)", path="avatar_id")
    if use:
        touch_avatar(avatar_id, s)
    return avatar

