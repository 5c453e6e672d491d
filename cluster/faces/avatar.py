"""Avatars: a normalised template plus its subject's face track, prepared once per content hash.

Layout: `<storage_root>/avatars/<id>/track.npz` and `avatar.json` (written last, atomically: an
avatar directory without `avatar.json` is an unfinished preparation and is redone).
"""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cluster import telemetry
from cluster.config import Settings, get_settings
from cluster.errors import InputNotFound
from cluster.faces.mtcnn import FaceDetection, MTCNNDetector
from cluster.faces.track import FaceTrack, build_track
from cluster.fsutil import write_atomic
from cluster.media.decode import iter_frames
from cluster.media.normalize import normalize_template
from cluster.schemas import MediaInfo

AVATAR_FILE = "avatar.json"
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
    return avatar.model_copy(update={"cached": True})


def prepare_avatar(video_path: str, settings: Settings | None = None,
                   detector: MTCNNDetector | None = None) -> Avatar:
    """Normalise a template, find its subject's face on every frame, store the track.

    Faces are detected in full on every `settings.detect_interval`-th frame and tracked between
    (`MTCNNDetector.detect_sequence`).

    Cached by the template's content hash: preparing the same bytes again reads the stored
    avatar (`cached=True`) without any detection. Raises the input errors of
    `normalize_template`, and `cluster.errors.NoFace` when too few frames show a face.
    """
    s = settings or get_settings()
    template = normalize_template(video_path, s)
    stored = _read_stored(template.id, s)
    if stored is not None and stored.template_path == template.path:
        telemetry.emit("avatar_cache", result="hit")
        return stored
    telemetry.emit("avatar_cache", result="miss")

    video = template.info.video
    detector = detector or MTCNNDetector()
    with telemetry.timed("stage_seconds", stage="detect"):
        detections: list[list[FaceDetection]] = list(
            detector.detect_sequence(iter_frames(template.path, s.batch_size, s), s.detect_interval))
        track = build_track(detections, (video.width, video.height), s.min_face_fraction,
                            path_for_errors=str(video_path), fps=float(video.fps))

    out_dir = _avatar_dir(template.id, s)
    out_dir.mkdir(parents=True, exist_ok=True)
    track_path = out_dir / TRACK_FILE
    track.save(track_path)
    avatar = Avatar(id=template.id, template_path=template.path, track_path=str(track_path),
                    info=template.info, frame_count=len(track), cached=False)
    write_atomic(out_dir / AVATAR_FILE, avatar.model_dump_json(indent=2))
    return avatar


def load_avatar(avatar_id: str, settings: Settings | None = None) -> Avatar:
    """A prepared avatar by id; raises `InputNotFound` if there is none (or it is incomplete)."""
    s = settings or get_settings()
    if not isinstance(avatar_id, str) or not _AVATAR_ID.match(avatar_id):
        raise InputNotFound(f"unknown avatar id {avatar_id!r} (expected a hex content hash)")
    avatar = _read_stored(avatar_id, s)
    if avatar is None:
        raise InputNotFound(f"avatar {avatar_id} does not exist under {s.dir('avatars')} "
                            f"(prepare it first)")
    return avatar

