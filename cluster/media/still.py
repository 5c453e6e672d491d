"""Still photos as templates: a PNG, JPEG, WebP, BMP, TIFF or GIF becomes a one-frame template video.

A photo of a person is a common template ("make this portrait speak"). ffmpeg would open it with its
image2 demuxer, which the probe refuses (it expands file-name patterns: it can read other files), so a
photo is recognised by its leading bytes and read here with Pillow instead: its header first (the size
limits apply before a pixel is decoded), then its pixels, turned as its EXIF orientation says (a
phone's portrait photo is stored sideways). Normalising it writes one H.264 frame at
`STILL_FPS`: the render maps every output frame to it, and only the mouth moves. An animated GIF or
WebP is refused by name (convert it to a video); a 16-bit greyscale PNG is brought to 8 bits.
"""
from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from pathlib import Path

import numpy as np

from cluster.config import Settings, get_settings
from cluster.errors import InputError, InputTooLarge, InputUnreadable
from cluster.schemas import MediaInfo, VideoStreamInfo

#: Leading bytes of the photo formats accepted, and Pillow's name of each.
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"GIF87a", "GIF"),
              (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
#: Formats whose files may hold more than one picture (an animation, pages): refused when they do
ANIMATED = frozenset({"GIF", "WEBP", "PNG", "TIFF"})
#: The most pixels a photo may have (a 108 MP phone photo is 12000x9000): decoding costs 3 bytes a pixel
MAX_PHOTO_PIXELS = 120_000_000
#: A photo's colours as a template carries them: sRGB's primaries and transfer, BT.601's matrix (how
#: OpenCV's BGR -> I420 converts), as FFmpeg's AVCOL_* codes (`VideoStreamInfo.color`)
PHOTO_COLOR = [1, 13, 6]
#: The frame rate of a still's template (and so of the videos rendered from it).
STILL_FPS = Fraction(25)
#: A photo larger than the template limits (a phone's 48 MP, 8000x6000) is scaled down to fit them;
#: one more than this many times larger on a side is refused (decoding it would cost too much memory).
MAX_PHOTO_SCALE = 4


def still_format(head: bytes) -> str | None:
    """Pillow's format name of a photo whose file starts with `head`, else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in SIGNATURES if head.startswith(magic)), None)


def is_still(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return still_format(f.read(16)) is not None
    except OSError:
        return False


def _open(path: str, fmt: str, settings: Settings):
    """The photo opened by Pillow (its header read, no pixel decoded), its size checked."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the budget is ours (MAX_PHOTO_PIXELS), checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=[fmt])
    except Image.DecompressionBombError as exc:  # its header names more pixels than Pillow will open
        pixels = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's words, kept as the cause
        said = f" ({int(pixels.group(1)) / 1e6:,.0f} MP, says its header)" if pixels else ""
        raise InputTooLarge(f"photo {path} has more than the {MAX_PHOTO_PIXELS // 1_000_000} MP a photo may "
                            f"have{said}", path=path, cause=str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputUnreadable(f"photo {path} cannot be read as {fmt}: {exc}", path=path, cause=str(exc)) from exc
    if fmt in ANIMATED and getattr(image, "n_frames", 1) > 1:
        frames = image.n_frames
        image.close()
        raise InputError(f"{path} is an animated {fmt} ({frames} frames): a template is a video or a still "
                         f"photo; convert it to a video (e.g. mp4)", code="input.unsupported", path=path)
    # from the header alone first: reading a PNG's EXIF (for its orientation) may decode the whole picture
    w, h = image.size
    most_w, most_h = MAX_PHOTO_SCALE * settings.max_width, MAX_PHOTO_SCALE * settings.max_height

    def too_large(width: int, height: int) -> InputTooLarge:
        image.close()
        return InputTooLarge(f"photo {path} is {width}x{height}, larger than {MAX_PHOTO_SCALE}x the limit of "
                             f"{settings.max_width}x{settings.max_height} (a photo up to that is scaled down to "
                             f"fit it)", path=path)

    if w * h > MAX_PHOTO_PIXELS:
        image.close()
        raise InputTooLarge(f"photo {path} is {w}x{h} ({w * h / 1e6:.0f} MP), more than the "
                            f"{MAX_PHOTO_PIXELS // 1_000_000} MP a photo may have", path=path)
    if max(w, h) > max(most_w, most_h) or min(w, h) > min(most_w, most_h):  # either way up
        raise too_large(w, h)
    width, height = _displayed_size(image)
    if width > most_w or height > most_h:  # the way a viewer sees it
        raise too_large(width, height)
    if width < 2 or height < 2:
        image.close()
        raise InputUnreadable(f"photo {path} has no usable picture ({width}x{height})", path=path)
    if fmt == "JPEG":  # decoded at 1/2, 1/4 or 1/8 where that still covers the template's limits
        side = min(settings.max_width, settings.max_height)
        image.draft("RGB", (min(w, side), min(h, side)))
    return image


def _displayed_size(image) -> tuple[int, int]:
    """(width, height) as a viewer sees the photo: EXIF orientations 5 to 8 turn it a quarter."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: shown as stored
        orientation = 1
    w, h = image.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


#: The most 16x16 macroblocks a frame of H.264 level 5.1 holds (4096x2304, 3840x2160 and smaller fit): a photo's
#: template is made no larger, so that its video plays where level 6 does not (phones' hardware decoders and Windows'
#: own stop at 5.1 or 5.2): a 48 MP photo (8000x6000) fitted to 4096x4096 alone made a 4096x3072 video of level 6.0
LEVEL_51_MACROBLOCKS = 36864


def _macroblocks(width: int, height: int) -> int:
    return -(-width // 16) * -(-height // 16)


def _fitted(width: int, height: int, settings: Settings) -> tuple[int, int]:
    """A photo's size scaled down (aspect kept) to fit within the template limits and H.264 level 5.1's frame
    (`LEVEL_51_MACROBLOCKS`), else as it is."""
    scale = min(1.0, settings.max_width / width, settings.max_height / height,
                math.sqrt(LEVEL_51_MACROBLOCKS * 256 / (width * height)))
    fitted = (width, height) if scale >= 1.0 else (max(2, int(width * scale)), max(2, int(height * scale)))
    while _macroblocks(*fitted) > LEVEL_51_MACROBLOCKS:  # (the blocks' rounding up: a few pixels less)
        scale *= 0.995
        fitted = (max(2, int(width * scale)), max(2, int(height * scale)))
    return fitted


def _format_of(p: str) -> str:
    with open(p, "rb") as f:
        fmt = still_format(f.read(16))
    if fmt is None:
        raise InputUnreadable(f"{p} is not a PNG, JPEG, WebP, BMP, TIFF or GIF photo", path=p)
    return fmt


def still_media_info(path: str | os.PathLike, settings: Settings | None = None) -> MediaInfo:
    """What `probe` tells of a photo: one frame of video at `STILL_FPS`, its size as displayed."""
    s = settings or get_settings()
    p = str(path)
    fmt = _format_of(p)
    with _open(p, fmt, s) as image:
        width, height = _fitted(*_displayed_size(image), s)
        try:  # decoded now (a photo takes milliseconds): a cut file is refused at admission, not in prepare
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputUnreadable(f"photo {p} cannot be decoded: {exc}", path=p, cause=str(exc)) from exc
    seconds = float(1 / STILL_FPS)
    video = VideoStreamInfo(codec=fmt.lower(), width=width, height=height, fps_num=STILL_FPS.numerator,
                            fps_den=STILL_FPS.denominator, frame_count=1, duration=seconds, pix_fmt="rgb24")
    return MediaInfo(path=p, format=fmt.lower(), duration=seconds, size_bytes=os.path.getsize(p), video=video)


def read_still(path: str | os.PathLike, settings: Settings | None = None) -> np.ndarray:
    """The photo's pixels as BGR [H, W, 3] uint8, upright (EXIF orientation applied), cropped to even
    sizes by its last column or row (4:2:0 video); a transparent photo is laid on white."""
    from PIL import Image, ImageOps

    s = settings or get_settings()
    p = str(path)
    with _open(p, _format_of(p), s) as image:
        try:
            if image.mode.startswith("I"):  # 16-bit greyscale (any byte order): convert("RGB") clips it
                levels = np.asarray(image).astype(np.float64)
                image = Image.fromarray(np.clip(levels / 257.0 if image.mode.startswith("I;16") else levels,
                                                0, 255).astype(np.uint8))
            upright = ImageOps.exif_transpose(image)
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                # a cut-out portrait: on white, not on whatever colour its transparent pixels hold
                rgba = upright.convert("RGBA")
                upright = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            upright = upright.convert("RGB")
            fitted = _fitted(*upright.size, s)
            if fitted != upright.size:  # larger than the limits: scaled down to fit them
                upright = upright.resize(fitted, Image.Resampling.LANCZOS)
        except (OSError, ValueError, SyntaxError) as exc:  # a cut or corrupt file shows itself decoding
            raise InputUnreadable(f"photo {p} cannot be decoded: {exc}", path=p, cause=str(exc)) from exc
    rgb = np.asarray(upright)
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[: h - h % 2, : w - w % 2, ::-1])


def write_still_template(source: str | os.PathLike, dest: str | os.PathLike, settings: Settings | None = None) -> int:
    """Write the photo `source` as a one-frame H.264 template video at `dest`; returns its frame count."""
    from cluster.media.encode import SegmentEncoder

    s = settings or get_settings()
    bgr = read_still(source, s)
    h, w = bgr.shape[:2]
    with SegmentEncoder(str(Path(dest)), w, h, STILL_FPS, s, color=PHOTO_COLOR) as encoder:
        encoder.write(bgr[None])
    return 1
