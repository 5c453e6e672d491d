"""Template normalisation: constant frame rate, rotation applied, short closed GOPs, cached.

A normalised template is an H.264 yuv420p mp4 (video only, faststart, even dimensions, square
pixels) whose frames can be read at random cheaply by `cluster.media.decode.TemplateReader`.
It is stored once per content hash under `<storage_root>/templates/<id>/template.mp4`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from pydantic import BaseModel

from cluster import telemetry
from cluster.config import Settings, get_settings
from cluster.errors import InputError, InputUnreadable, MediaError
from cluster.fsutil import file_sha256, publish
from cluster.media.ffmpeg import ffmpeg_has_decoder, ffmpeg_has_filters, file_url, input_args, run_ffmpeg
from cluster.media.probe import count_video_frames, probe_video, read_media_info
from cluster.media.still import is_still, write_still_template
from cluster.schemas import JobState, MediaInfo, VideoStreamInfo

log = logging.getLogger("lipsync.normalize")

TEMPLATE_FILE = "template.mp4"
#: Common frame rates a variable-rate source snaps to when its average is within 1 % of one.
STANDARD_RATES = tuple(Fraction(n, d) for n, d in (
    (24000, 1001), (24, 1), (25, 1), (30000, 1001), (30, 1), (48, 1), (50, 1), (60000, 1001),
    (60, 1)))


class NormalizedTemplate(BaseModel):
    """A template normalised for random access; `id` is the source's content hash (16 hex)."""
    id: str
    path: str
    info: MediaInfo
    source: str
    cached: bool = False
    decode_error: str | None = None  # what a decoder of the source said while it was normalised (a damaged file)


def content_id(path: str | os.PathLike) -> str:
    """The id of a template (and of its avatar): the first 16 hex digits of its SHA-256."""
    return file_sha256(path)[:16]


def template_path_for(template_id: str, settings: Settings) -> Path:
    """Where the normalised template of `template_id` is stored."""
    return settings.dir("templates") / template_id / TEMPLATE_FILE


#: What normalising does, by version: 2 deinterlaces an interlaced source and takes the default of several
#: video streams; 3 lays a transparent one on white; 4 tone-maps HDR with its reference white at SDR's white
#: (`TONEMAP_TO_SDR`) and fits a photo within H.264 level 5.1's frame (`cluster.media.still`). Written beside
#: each template it makes (`RECIPE_FILE`), so that one made before, from a source that needs more, is made again
#: (its content id is the source's bytes: a cache hit kept the combing, the proxy or the colour under the
#: transparent pixels)
RECIPE = 4
RECIPE_FILE = "recipe"


def mark_recipe(template: Path) -> None:
    """Record that `template` was made by this version's recipe (`RECIPE`)."""
    (template.parent / RECIPE_FILE).write_text(str(RECIPE))


def made_before_recipe(template: Path, source_info: MediaInfo) -> bool:
    """True when `template` was made before this recipe from a source it treats otherwise (interlaced, several
    video streams): it is to be made again. A source that the new recipe treats the same marks it as current."""
    try:
        made = int((template.parent / RECIPE_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        made = 0
    if made >= RECIPE:
        return False
    v = source_info.video
    if v is not None and ((made < 2 and (v.interlaced or v.stream)) or (made < 3 and v.alpha)
                          or (made < 4 and (v.hdr_transfer or v.frame_count == 1))):  # (a photo: fitted anew)
        return True
    try:
        mark_recipe(template)  # (the next use reads the mark, not the source)
    except OSError:
        pass
    return False


def _standard(fps: Fraction | float) -> Fraction | None:
    """The standard rate within 1 % of `fps`, if any."""
    return next((rate for rate in STANDARD_RATES if abs(fps - rate) <= rate / 100), None)


#: The rates a template is brought within (`target_fps`): below MIN its frames are repeated at
#: LOW_RATE_TARGET, as a photo's (a 1 fps slideshow gave a 1 fps output, its mouth moving once a
#: second); above MAX, frames are dropped to a rate no higher (a 1000 fps source gave a 1000 fps
#: output, 40 times the render for frames no player shows).
MIN_TEMPLATE_FPS, LOW_RATE_TARGET, MAX_TEMPLATE_FPS = Fraction(10), Fraction(25), Fraction(60)
#: Rates a fast source is brought down to, preferred in this order where they divide its rate (frames
#: then taken at even intervals: 1000 -> 50, 120 -> 60, 119.88 -> 59.94, 144 -> 48, 90 -> 30, 72 -> 24);
#: else MAX_TEMPLATE_FPS.
HIGH_RATE_TARGETS = (Fraction(60), Fraction(60000, 1001), Fraction(50), Fraction(48), Fraction(30),
                     Fraction(30000, 1001), Fraction(25), Fraction(24))


def rate_out_of_bounds(info: MediaInfo) -> bool:
    """Whether a stored template (or an avatar's) was normalised before rates were brought within
    MIN_TEMPLATE_FPS-MAX_TEMPLATE_FPS: it is made again (from its video), never used by its id."""
    return info.video is not None and not MIN_TEMPLATE_FPS <= info.video.fps <= MAX_TEMPLATE_FPS


def target_fps(info: MediaInfo) -> Fraction:
    """The constant rate of the normalised template: the source's exact rate. For a variable-rate
    source, the standard rate its frames are laid on (its cadence, r_frame_rate: a 25 fps recording
    that dropped frames stays 25 fps, the gaps filled by repeating frames, rather than becoming a
    10 fps video whose mouth would move 10 times a second); else its average rate, snapped to a
    standard rate within 1 % (29.87 -> 30000/1001). Then brought within MIN_TEMPLATE_FPS and
    MAX_TEMPLATE_FPS."""
    fps = _source_rate(info)
    if fps < MIN_TEMPLATE_FPS:
        return LOW_RATE_TARGET
    if fps > MAX_TEMPLATE_FPS:
        return next((rate for rate in HIGH_RATE_TARGETS if (fps / rate).denominator == 1), MAX_TEMPLATE_FPS)
    return fps


def _source_rate(info: MediaInfo) -> Fraction:
    v = info.video
    fps = v.fps
    if not v.variable_frame_rate:
        return fps
    cadence = _standard(v.base_fps) if v.base_fps else None
    if cadence is not None and cadence > fps:
        return cadence
    return _standard(fps) or fps.limit_denominator(1001)


def _expected_frames(info: MediaInfo, fps: Fraction) -> tuple[int, int]:
    """(expected frame count of the normalised output, tolerance in frames)."""
    v = info.video
    if not v.variable_frame_rate and fps == v.fps:
        expected = v.frame_count
    else:
        expected = round(v.duration * fps)
    return expected, max(2, round(expected * 0.02))


def template_users(template_id: str, template: Path, settings: Settings) -> list[str]:
    """Who renders from the template file `template` now: unfinished jobs whose plan reads it (their ids) and
    live sessions not ended on its avatar. A template made again under them (an upgrade's recipe) changed
    their frames mid-job: a job planned at 160x120 read 320x360 frames and failed, or mixed old and new ones."""
    import sqlite3

    users = []
    db = settings.db_path
    if db.is_file():
        unfinished = [st.value for st in JobState if not st.terminal]
        try:
            conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)  # (escaped: # ? %)
            try:
                rows = conn.execute(f"SELECT id, plan FROM jobs WHERE plan IS NOT NULL AND state IN "
                                    f"({','.join('?' * len(unfinished))})", unfinished).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as e:  # (cannot tell: taken as none, said)
            log.warning("the unfinished jobs of %s cannot be read to see who uses %s: %s", db, template, e)
            rows = []
        for job_id, plan in rows:
            try:
                if json.loads(plan).get("template_path") == str(template):
                    users.append(job_id)
            except (ValueError, AttributeError):
                continue
    from cluster.live.journal import FINAL_FILE, LOCK_FILE, SESSION_FILE
    from cluster.retention import _lock_held, _newest_mtime

    sessions = settings.storage_root / "sessions"
    for d in sessions.iterdir() if sessions.is_dir() else []:
        try:
            if (d / FINAL_FILE).exists() or json.loads((d / SESSION_FILE).read_text()).get("avatar_id") != template_id:
                continue
            # running: its process holds its journal's lock, or it wrote in the last minutes (restarting); a
            # session lost with its service (never ended) is no user
            if _lock_held(d / LOCK_FILE) or _newest_mtime(d) > time.time() - SESSION_RESTART_WINDOW_S:
                users.append(f"live session {d.name}")
        except (OSError, ValueError, AttributeError):
            continue
    return users


#: A session directory written this recently, its journal's lock free, may be a session whose actor restarts
SESSION_RESTART_WINDOW_S = 120.0


def kept_for_users(template_id: str, template: Path, settings: Settings, why: str) -> bool:
    """True (said in the log) when the template `template`, to be made again (`why`), is read by unfinished work
    (`template_users`): it is used as it is meanwhile, and made again by a later use once that work has ended."""
    users = template_users(template_id, template, settings)
    if users:
        log.warning("template %s %s, but %s render%s from it: it is used as it is until they end", template_id, why,
                    ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else ""),
                    "s" if len(users) == 1 else "")
    return bool(users)


def _load_cached(template_id: str, path: Path, source: str,
                 settings: Settings, source_info: MediaInfo) -> NormalizedTemplate | None:
    if not path.is_file():
        return None
    try:
        info = read_media_info(path, settings)
    except InputError:
        return None  # an unreadable cache entry is rebuilt
    if info.video is None:
        return None
    stale = ("was made before this version's recipe for its source" if made_before_recipe(path, source_info) else
             "was stored before ranges were converted" if info.video.full_range else  # made again
             "has a frame rate out of bounds" if rate_out_of_bounds(info) else None)
    if stale is not None and not kept_for_users(template_id, path, settings, stale):
        return None
    return NormalizedTemplate(id=template_id, path=str(path), info=info, source=source, cached=True)


def keyframe_layout(path: str | os.PathLike) -> tuple[int, int, bool, bool]:
    """(frames, longest keyframe interval in frames, square pixels, evenly timed) of the first video
    stream, by demuxing (no decoding). Evenly timed is judged on every packet (the probe samples
    the first ones only: a clip steady at first that drops frames later is variable-rate here)."""
    import av

    from cluster.media.probe import pts_uneven

    with av.open(file_url(path), options={"protocol_whitelist": "file"}) as container:
        stream = container.streams.video[0]
        sar = stream.sample_aspect_ratio
        square = sar is None or sar.numerator == 0 or sar == 1
        frames, longest, run = 0, 0, 0
        pts: list[int] = []
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:
                continue
            frames += 1
            run = 1 if packet.is_keyframe else run + 1
            longest = max(longest, run)
            if packet.pts is not None:
                pts.append(packet.pts)
    return frames, longest, square, not pts_uneven(pts)


def reusable_as_is(source: str, info: MediaInfo, settings: Settings) -> int | None:
    """The frame count of a template that already is what normalisation makes (constant-rate
    H.264 yuv420p, even size, square pixels, no rotation, keyframes at least every
    `2 * gop_frames` frames), so it is used as is instead of re-encoded; None otherwise."""
    v = info.video
    if (v is None or v.codec != "h264" or v.pix_fmt != "yuv420p" or v.variable_frame_rate
            or v.rotation != 0 or v.width % 2 or v.height % 2 or v.hdr_transfer or v.full_range or v.interlaced
            or v.stream != 0 or target_fps(info) != v.fps):
        return None
    try:
        frames, longest, square, even = keyframe_layout(source)
    except Exception:  # noqa: BLE001 - anything odd about the file: normalise it instead
        return None
    expected, tolerance = _expected_frames(info, v.fps)
    if not square or not even or longest > 2 * settings.gop_frames or abs(frames - expected) > tolerance:
        return None
    return frames


def frames_map_one_to_one(source: str, info: MediaInfo) -> bool:
    """True when normalising `source` keeps its frames one for one, in order (constant rate,
    yuv420p, even size, square pixels, unrotated, and as many packets as the header promises), so
    its faces can be found on the source's own frames while ffmpeg re-encodes it (for short GOPs)."""
    v = info.video
    if (v is None or v.pix_fmt != "yuv420p" or v.variable_frame_rate or v.rotation != 0
            or v.width % 2 or v.height % 2 or not v.frame_count or v.hdr_transfer or v.full_range or v.interlaced
            or v.stream != 0 or target_fps(info) != v.fps):
        return False
    try:
        frames, _, square, even = keyframe_layout(source)
    except Exception:  # noqa: BLE001 - anything odd about the file: detect on the normalised template
        return False
    return square and even and frames == v.frame_count


#: HDR (PQ or HLG) to SDR BT.709: linear light with HDR's reference white (ITU-R BT.2408: 203 cd/m², 75 % of
#: the HLG signal, where phones put a white wall or paper) as SDR's white, BT.709 primaries, Mobius's curve
#: (linear up to 0.9 of that white, what is brighter compressed below it: with 0.7 a white wall came back at 221
#: of 235, now 5 levels under white; Hable's curve darkened faces by a third), BT.709 transfer, limited range.
#: (With 100 cd/m² as SDR's white, a probe's phone-style HLG and PQ clips came out 31 levels too bright on
#: average, faces washed out to near white.)
HDR_REFERENCE_WHITE_NITS = 203
TONEMAP_TO_SDR = (f"zscale=t=linear:npl={HDR_REFERENCE_WHITE_NITS},format=gbrpf32le,zscale=p=bt709,"
                  "tonemap=tonemap=mobius:param=0.9:desat=0,zscale=t=bt709:m=bt709:r=tv,")


def sdr_filters(source: str, info: MediaInfo, settings: Settings) -> str:
    """The filters that bring an HDR template (a phone's default HLG, PQ) to SDR, as the output is
    (8-bit BT.709: cut to 8 bits without them, it plays washed out); "" for SDR. An ffmpeg without
    `zscale` and `tonemap` cannot: the template is refused, saying how to convert it."""
    transfer = info.video.hdr_transfer if info.video else None
    if transfer is None:
        return ""
    if not ffmpeg_has_filters("zscale", "tonemap", settings=settings):
        raise InputError(f"template {source} is HDR video (transfer {transfer}) and this server's ffmpeg has no "
                         f"zscale/tonemap filters to bring it to SDR; convert it to SDR (BT.709) first, or set "
                         f"LIPSYNC_FFMPEG to an ffmpeg with zimg", code="input.unsupported", path=source)
    return TONEMAP_TO_SDR


def _alpha_decoder(video: VideoStreamInfo, settings: Settings) -> list[str]:
    """The ffmpeg decoder option that reads a VP8/VP9 stream's alpha (FFmpeg's own decoders drop it; libvpx's
    read it), where the ffmpeg in use has libvpx; none otherwise (the picture is kept, its alpha not)."""
    name = {"vp9": "libvpx-vp9", "vp8": "libvpx"}.get(video.codec)
    if not video.alpha or name is None:
        return []
    if not ffmpeg_has_decoder(name, settings=settings):
        log.warning("the ffmpeg in use has no %s decoder: the transparent parts of a %s template keep the colour "
                    "they hold", name, video.codec)
        return []
    return ["-c:v", name]


def _link_or_copy(src: str, dst: str) -> None:
    import shutil

    try:
        os.unlink(dst)
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _normalize_still(source: str, template_id: str, out_path: Path, s: Settings) -> NormalizedTemplate:
    fd, tmp = tempfile.mkstemp(prefix=".template-", suffix=".mp4", dir=out_path.parent)
    os.close(fd)
    try:
        write_still_template(source, tmp, s)
        info = read_media_info(tmp, s)
        publish(tmp, out_path)
        mark_recipe(out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    info = info.model_copy(update={"path": str(out_path)})
    return NormalizedTemplate(id=template_id, path=str(out_path), info=info, source=source, cached=False)


def x264_template_args(s: Settings) -> list[str]:
    """The encoder of normalised templates: libx264 tuned for decoding (no CABAC, no deblocking: the
    template is decoded again for every render of the avatar, and 720p decodes in a third less CPU for
    0.1 dB of PSNR, docs/PERFORMANCE.md; segments for users are not tuned so), closed GOPs of `gop_frames`."""
    return ["-c:v", "libx264", "-preset", s.preset, "-tune", "fastdecode", "-crf", str(s.crf),
            "-pix_fmt", "yuv420p", "-g", str(s.gop_frames), "-keyint_min", str(s.gop_frames), "-sc_threshold", "0",
            "-x264-params", "open-gop=0"]


@telemetry.timed("stage_seconds", stage="normalise")
def normalize_template(path: str | os.PathLike, settings: Settings | None = None,
                       template_id: str | None = None) -> NormalizedTemplate:
    """Normalise a template video (CFR, rotation applied, yuv420p, even size, libx264 closed GOPs
    of `gop_frames`, no audio, faststart), cached by content hash: a second call with the same
    bytes returns the stored file with `cached=True` without running ffmpeg.

    `template_id`: the source's content id when the caller already hashed it.
    Raises the `InputError`s of `probe_video`, `InputUnreadable` when the output's frame count
    shows the source was truncated, `MediaError`/`RenderTimeout` when ffmpeg fails.
    """
    s = settings or get_settings()
    source = str(Path(path))
    src_info = probe_video(source, s)
    template_id = template_id or content_id(source)
    out_path = template_path_for(template_id, s)
    out_dir = out_path.parent
    cached = _load_cached(template_id, out_path, source, s, src_info)
    if cached is not None:
        return cached

    out_dir.mkdir(parents=True, exist_ok=True)
    if is_still(source):  # a photo: one H.264 frame (cluster.media.still)
        return _normalize_still(source, template_id, out_path, s)
    as_is = reusable_as_is(source, src_info, s)
    if as_is is not None:  # already constant-rate H.264 with short GOPs: no re-encode
        fd, tmp = tempfile.mkstemp(prefix=".template-", suffix=".mp4", dir=out_dir)
        os.close(fd)
        try:
            _link_or_copy(source, tmp)
            info = read_media_info(tmp, s)
            os.replace(tmp, out_path)  # not publish(): a hard link shares the source's mode
            mark_recipe(out_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        video = info.video.model_copy(update={"frame_count": as_is})
        info = info.model_copy(update={"path": str(out_path), "video": video})
        return NormalizedTemplate(id=template_id, path=str(out_path), info=info, source=source, cached=False)
    fps = target_fps(src_info)
    fps_arg = f"{fps.numerator}/{fps.denominator}"
    # square pixels, then an odd width or height cropped by its last column or row (not rescaled: the
    # picture keeps its pixels); full-range samples (MJPEG, yuvj420p phone video) brought to the limited
    # range the output is (and every player assumes of untagged H.264)
    to_limited = ":in_range=full:out_range=limited" if src_info.video.full_range else ""
    # interlaced fields (a camcorder's .mts, broadcast) woven into one frame comb on every motion, and the output
    # is progressive (players do not deinterlace it): one frame per frame, from the frames flagged interlaced
    deinterlace = "bwdif=mode=send_frame:parity=auto:deint=interlaced," if src_info.video.interlaced else ""
    # a transparent picture (a cut-out presenter) on white, as a transparent photo is, not on whatever colour
    # its transparent pixels hold (black, often); VP8/VP9 carry their alpha beside the picture, for libvpx only
    on_white = ("format=rgba,split[picture][under];[under]format=yuv444p,drawbox=c=white:t=fill[white];"
                "[white][picture]overlay=format=auto," if src_info.video.alpha else "")
    decoder = _alpha_decoder(src_info.video, s)
    # the constant rate last: frames it repeats to fill a gap are references to one picture there, where any filter
    # after it made each a picture of its own, all at once (ffmpeg's filters do not wait for the encoder): a
    # 156 KB template with one hour between two of its frames held 9 GB before its first repeat was encoded
    # a constant-rate source faster than the template (120 fps to 60) is brought to its rate first too, so that the
    # filters between run on the frames kept only (tonemapping a 120 fps HLG clip cost 3x); the same filter, so the
    # same frames (a review: a selection by frame number parted from it on offset starts and coarse time bases)
    source_rate = src_info.video.fps
    decimate = f"fps={fps_arg}," if not src_info.video.variable_frame_rate and source_rate > fps else ""
    vf = (f"{deinterlace}{decimate}{sdr_filters(source, src_info, s)}"
          f"scale=trunc(iw*sar):ih{to_limited},setsar=1,crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0,{on_white}format=yuv420p,"
          f"fps={fps_arg}")
    expected, tolerance = _expected_frames(src_info, fps)
    # more frames than the header says are kept (a variable-rate or late-starting video's header may
    # undercount them); timestamps that run far past it (a corrupt file: hours of repeated frames) stop here
    most = 2 * expected + 2 * math.ceil(fps)
    fd, tmp = tempfile.mkstemp(prefix=".template-", suffix=".mp4", dir=out_dir)
    os.close(fd)
    try:
        done = run_ffmpeg([
            "-loglevel", "error", *decoder, *input_args(source),
            "-map", f"0:v:{src_info.video.stream}", "-an", "-sn", "-dn", "-map_metadata", "-1",
            "-vf", vf, "-r", fps_arg, "-fps_mode", "cfr", "-frames:v", str(most),
            *x264_template_args(s),
            "-movflags", "+faststart", "-f", "mp4", file_url(tmp),
        ], timeout=s.ffmpeg_timeout_s, settings=s, stage="normalize", path=source)
        try:
            found = count_video_frames(tmp)
            info = read_media_info(tmp, s)
        except InputError as exc:
            raise MediaError(f"normalised template {tmp} of {source} is unreadable: {exc}",
                             path=source, stage="normalize", cause=exc.cause) from exc
        if found < expected - tolerance:
            raise InputUnreadable(
                f"template {source} decodes to {found} frames but its header promises {expected} "
                f"(+-{tolerance}) at {fps_arg} fps: the file is truncated or corrupt", path=source)
        said = _decoder_error(done.stderr.decode("utf-8", "replace"))
        if said:  # (a decode of the whole source: paid where its decoder complained only)
            lost, packets = undecodable_frames(source, src_info.video.stream, s.ffmpeg_timeout_s)
            if lost > max(2, DAMAGED_SHARE * packets):
                # ffmpeg's decoder conceals a broken frame as the one before: a damaged file rendered a long
                # freeze with a moving mouth (a probe: 31 of 100 frames, 1.3 s)
                raise InputUnreadable(f"template {source} is damaged: {lost} of its {packets} frames do not decode "
                                      f"whole (ffmpeg: {said}); export or copy it again", path=source)
        if found >= most:
            raise InputUnreadable(
                f"template {source}: its video's timestamps run far past its header's duration "
                f"({src_info.video.duration:.2f} s, {expected} frames at {fps_arg} fps; stopped at {found}): "
                f"the file's timing is corrupt", path=source)
        if found > expected + tolerance:  # a variable-rate or late-starting video whose header undercounts it
            log.info("template %s: %d frames at %s fps where its header promises %d: kept", source, found,
                     fps_arg, expected)
        if info.video is None or info.video.rotation != 0:
            raise MediaError(f"normalised template {tmp} of {source} still carries rotation "
                             f"{info.video.rotation if info.video else None}", path=source,
                             stage="normalize")
        publish(tmp, out_path)
        mark_recipe(out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    video = info.video.model_copy(update={"frame_count": found})
    info = info.model_copy(update={"path": str(out_path), "video": video})
    if said:
        log.warning("template %s: its video decodes with errors (ffmpeg: %s)", source, said)
    return NormalizedTemplate(id=template_id, path=str(out_path), info=info, source=source,
                              cached=False, decode_error=said)


#: The share of a template's frames that may fail to decode (each shown as the frame before) before it is refused
#: as damaged; a few broken frames in a long video pass, with a warning in the log
DAMAGED_SHARE = 0.05


def undecodable_frames(source: str, stream: int = 0, timeout_s: float = 600.0) -> tuple[int, int]:
    """(frames that do not decode, or decode patched up, frames) of the video stream `stream` of `source`, packet by
    packet, from its
    first keyframe on (frames before it, in a stream cut mid-GOP, never decode: no damage) and without the
    frames its edit list hides (discarded: never shown). (0, frames so far) when it takes over `timeout_s`."""
    import av

    decoded = packets = 0
    started = False
    give_up = time.monotonic() + timeout_s
    with av.open(file_url(source), options={"protocol_whitelist": "file"}) as container:
        video = container.streams.video[stream]
        for packet in container.demux(video):
            if time.monotonic() > give_up:
                log.warning("template %s: its frames were not all counted within %.0f s", source, timeout_s)
                return 0, packets
            last = packet.size == 0  # the demuxer's end-of-stream packet: flushes the decoder
            if not last:
                if packet.is_discard:
                    continue
                started = started or packet.is_keyframe
                if not started:
                    continue
                packets += 1
            try:  # a frame the decoder patched up (concealed: `is_corrupt`) is damaged too (a probe's file, 3000
                # bytes changed in its last tenth: 7 frames failed, 70 were concealed and shown as blocks of colour)
                decoded += sum(1 for frame in packet.decode() if started and not frame.is_corrupt)
            except av.error.FFmpegError:
                pass
    return max(packets - decoded, 0), packets


#: An error line of a decoder in ffmpeg's output ("[h264 @ 0x55..] error while decoding MB 6 0, ..."), not
#: of the encoder it feeds (libx264's would fail the run)
_DECODER_LINE = re.compile(r"^\[(?!libx264|vost|out#|vf#)[\w-]+ @ 0x[0-9a-f]+\] (.+)$", re.M)


def _decoder_error(stderr: str) -> str | None:
    """The first thing a decoder complained of in ffmpeg's `stderr`, else None."""
    m = _DECODER_LINE.search(stderr)
    return m.group(1).strip()[:200] if m else None


def decode_error(source: str, settings: Settings, stream: int = 0) -> str | None:
    """What the decoder of `source`'s video says when it is decoded whole (None: nothing, or it could not be
    asked in time): for a refusal to name the damage where the template was normalised before (cached)
    or used as it is. Its cost, a decode of the whole video, is paid on that failure path only."""
    from cluster.errors import LipsyncError

    try:
        done = run_ffmpeg(["-loglevel", "error", *input_args(source), "-map", f"0:v:{stream}", "-f", "null", "-"],
                          timeout=settings.ffmpeg_timeout_s, settings=settings, stage="decode-check", path=source)
    except LipsyncError as e:  # it does not decode at all: that is what it says
        return _decoder_error(e.cause or "")
    return _decoder_error(done.stderr.decode("utf-8", "replace"))
