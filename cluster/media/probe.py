"""Probing media files in-process with PyAV (no ffprobe subprocess).

`check_input_file` refuses missing, empty, oversized and playlist/concat-style files before any
demuxer sees them; `probe` reads streams, exact frame rate, rotation and frame-rate variability;
`probe_video` / `probe_audio` add the product's limits.
"""
from __future__ import annotations

import functools
import os
import statistics
from fractions import Fraction
from pathlib import Path

import av

from cluster.config import Settings, get_settings
from cluster.errors import (
    InputError,
    InputNotFound,
    InputTooLarge,
    InputTooLong,
    InputUnreadable,
    NoAudioStream,
    NoVideoStream,
    UnsafeInput,
    os_reason,
)
from cluster.media.ffmpeg import file_url
from cluster.schemas import AudioStreamInfo, MediaInfo, VideoStreamInfo

#: Extensions of playlists, manifests and list files: demuxers that open other files or URLs.
UNSAFE_EXTENSIONS = frozenset({
    ".m3u8", ".m3u", ".pls", ".txt", ".ffconcat", ".concat", ".sdp", ".mpd", ".xspf", ".asx",
    ".wpl", ".ism", ".isml", ".f4m", ".cue", ".rtsp", ".url",
})
#: Leading bytes (after whitespace / BOM, lower-cased) of such files.
UNSAFE_SIGNATURES = (b"#extm3u", b"#ext-x-", b"ffconcat", b"[playlist]", b"v=0", b"<?xml",
                     b"<mpd", b"<asx", b"<smil", b"#!", b"file ", b"file\t")
#: Demuxers that read other files or URLs; refused even if the sniffing missed them.
UNSAFE_FORMATS = frozenset({"hls", "applehttp", "concat", "ffconcat", "sdp", "rtp", "rtsp", "dash",
                            "image2", "image2pipe", "tee", "data", "ffmetadata", "mpd"})
#: Transfer characteristics (AVColorTransferCharacteristic) of HDR video: a phone's default HLG, PQ.
HDR_TRANSFERS = {16: "smpte2084", 18: "arib-std-b67"}
#: AVFieldOrder values of interlaced video (top or bottom field first, coded and displayed).
INTERLACED_FIELD_ORDERS = frozenset({2, 3, 4, 5})
#: Video packets demuxed to measure frame-rate variability.
VFR_SAMPLE_PACKETS = 120
#: Tolerated relative deviation of a frame interval from the median before a file counts as VFR.
VFR_TOLERANCE = 0.02


def check_input_file(path: str | os.PathLike, settings: Settings | None = None) -> Path:
    """Refuse a file before opening it: missing (`InputNotFound`), empty (`InputUnreadable`),
    larger than `max_upload_bytes` (`InputTooLarge`), or a playlist / concat list / manifest
    (`UnsafeInput`; such files make ffmpeg open other files or URLs). Returns the path."""
    s = settings or get_settings()
    p = Path(path)
    try:
        if not p.is_file():
            raise InputNotFound(f"input file {p} does not exist (or is not a regular file)",
                                path=str(p))
        size = p.stat().st_size
    except (OSError, ValueError) as exc:  # a name the system refuses (NUL, too long)
        raise InputError(f"input file {p} cannot be used: {os_reason(exc)}",
                         path=str(p)) from None
    if size == 0:
        raise InputUnreadable(f"input file {p} is empty", path=str(p))
    if size > s.max_upload_bytes:
        raise InputTooLarge(f"input file {p} is {size} bytes, more than the limit of "
                            f"{s.max_upload_bytes} bytes", path=str(p))
    if p.suffix.lower() in UNSAFE_EXTENSIONS:
        raise UnsafeInput(f"input file {p} is not an audio/video file: its extension {p.suffix} is a text, playlist "
                          f"or list file's (refused unread: ffmpeg would follow what such a file names); only plain "
                          f"audio/video files are accepted", path=str(p))
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise InputUnreadable(f"input file {p} cannot be read: {exc}", path=str(p),
                              cause=str(exc)) from exc
    if _looks_like_playlist(head):
        # the message never quotes the file: its bytes may be a secret (a hard link into a root)
        raise UnsafeInput(f"input file {p} is a playlist, concat list or manifest (text naming other "
                          f"files or URLs); only plain audio/video files are accepted", path=str(p))
    return p


#: Audio formats whose magic begins as a script's `#!` does: AMR-NB, AMR-WB and multichannel AMR storage (RFC 4867),
#: phones' and messengers' voice recordings
AMR_MAGIC = (b"#!AMR\n", b"#!AMR-WB\n", b"#!AMR_MC1.0\n", b"#!AMR-WB_MC1.0\n")


def _looks_like_playlist(head: bytes) -> bool:
    if head.startswith(AMR_MAGIC):  # (they were refused as a playlist)
        return False
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(UNSAFE_SIGNATURES):
        return True
    # a text file whose lines name URLs or absolute paths is a list of other inputs
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if any(ch < " " and ch not in "\t\r\n" for ch in decoded):
        return False
    for line in decoded.lower().splitlines():
        line = line.strip().strip("'\"")
        if "://" in line or line.startswith(("/", "file:", "#ext", "file ", "file\t")):
            return True
    return False


def _mp4_without_index(path: str) -> str | None:
    """What shows an MP4/MOV file (its top-level boxes: `ftyp` first) cut short or never finished, where FFmpeg says
    only "Invalid data": no `moov` box (the index a recorder writes last), or a box running past the end of the file;
    None for anything else."""
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            at, boxes = 0, []
            while at + 8 <= size and len(boxes) < 1000:
                f.seek(at)
                length, kind = struct.unpack(">I4s", f.read(8))
                if length == 1:
                    length = struct.unpack(">Q", f.read(8))[0]
                elif length == 0:
                    length = size - at
                boxes.append(kind)
                if boxes[0] != b"ftyp":
                    return None
                if length < 8 or at + length > size:
                    return (f"its {kind.decode('latin-1')!r} box declares {length} bytes from byte {at}, the file "
                            f"has {size} (the recording was not finished, the copy was cut, or its bytes were "
                            f"damaged): copy or export it again")
                at += length
    except (OSError, struct.error):
        return None
    if boxes and boxes[0] == b"ftyp" and b"moov" not in boxes:
        return "it has no index (no 'moov' box: a recorder writes it last): record, copy or export it again"
    return None


def _open(path: str, settings: Settings) -> av.container.InputContainer:
    try:
        container = av.open(file_url(path), options={"protocol_whitelist": "file"},
                            timeout=settings.probe_timeout_s)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        # FFmpeg's own words ("Invalid data found when processing input"), not its error number and URL
        why = os_reason(exc)
        cut = _mp4_without_index(path)
        if cut:  # (a probe: an unfinished recording was "not a readable audio/video file: Invalid data ...")
            raise InputUnreadable(f"{path} is truncated, unfinished or damaged: {cut}", path=path,
                                  cause=str(exc)) from exc
        raise InputUnreadable(f"{path} is not a readable audio/video file: {why}", path=path,
                              cause=str(exc)) from exc
    names = set(container.format.name.split(","))
    if names & UNSAFE_FORMATS:
        container.close()
        raise UnsafeInput(f"{path} opens with the {container.format.name} demuxer, which reads "
                          f"other files; only plain audio/video files are accepted", path=path)
    return container


def _stream_duration(stream, container_duration: float) -> float:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    return container_duration


def _frame_rate(stream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate.numerator > 0 and rate.denominator > 0:
            return Fraction(rate.numerator, rate.denominator)
    return None


def _check_index_within_file(path: str, stream, size: int) -> None:
    """Packets the index places past the end of the file mean the file was cut short."""
    try:
        entries = stream.index_entries
        end = max((e.pos + e.size for e in entries if e.pos >= 0), default=0)
    except (AttributeError, av.error.FFmpegError):
        return
    if end > size:
        raise InputUnreadable(f"{path} is truncated: its index needs {end} bytes, the file has "
                              f"{size}", path=path)


#: How much shorter than its header declares an audio stream may decode before it counts as cut short or damaged
#: (encoders' padding and priming are milliseconds)
DECODED_SHORTFALL_S = 0.25
DECODED_SHORTFALL_SHARE = 0.02


def declared_audio_seconds(path: str | os.PathLike) -> float | None:
    """The length the header of `path` declares for its audio, where the format writes an exact one at its start
    and nothing else tells a cut: a FLAC file's STREAMINFO (its sample count at its sample rate).
    None for the others: a length ffmpeg estimates (from the bit rate, the last page of an Ogg file) follows a
    cut and promises nothing; an MP3's Xing header declares its bytes and an MP4's index its packets' places,
    checked at admission (`_check_mp3_complete`, `_check_index_within_file`), so that a few corrupt MP3 frames
    that the decoder skips, or an M4A whose timestamps leave a gap (a recording that dropped seconds), are not
    taken for a cut."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:4] != b"fLaC":
        return None
    # STREAMINFO, the first metadata block: 20 bits of sample rate, then 3 of channels and 5 of sample size, then
    # 36 of total samples (0 when the encoder did not know)
    fields = int.from_bytes(head[18:26], "big")
    rate, total = fields >> 44, fields & (1 << 36) - 1
    return total / rate if rate and total else None


def _check_mp3_complete(path: str, size: int) -> None:
    """An MP3 whose Xing/Info or VBRI header (LAME's, ffmpeg's, Fraunhofer's: written at its start) declares
    more bytes than the file holds was cut short: ffmpeg decodes what is there and a job renders part of the
    speech without a word. Refused, naming both sizes. Without such a header (or its byte count) nothing is
    declared; corrupt frames in the middle keep the size and are the decoder's to skip."""
    try:
        with open(path, "rb") as f:
            start = 0
            while True:  # ID3v2 tags in front (cover art: hundreds of KB), each its 10-byte header, size and footer
                tag = f.read(10)
                if len(tag) < 10 or tag[:3] != b"ID3":
                    break
                start += 10 + (tag[6] << 21 | tag[7] << 14 | tag[8] << 7 | tag[9]) + (10 if tag[5] & 0x10 else 0)
                f.seek(start)
            f.seek(start)
            frame = f.read(200)  # the first frame: the tag sits after its side information
    except OSError:
        return
    declared = None
    for tag in (b"Xing", b"Info"):
        at = frame.find(tag)
        if at >= 0 and at + 16 <= len(frame):
            flags = int.from_bytes(frame[at + 4:at + 8], "big")
            if flags & 0x2:  # a byte count, after the frame count where there is one
                field = at + 8 + (4 if flags & 0x1 else 0)
                declared = int.from_bytes(frame[field:field + 4], "big")
            break
    if declared is None and frame[36:40] == b"VBRI" and len(frame) >= 50:
        declared = int.from_bytes(frame[46:50], "big")
    have = size - start
    if declared and have < declared - max(4096, declared // 100):
        raise InputUnreadable(f"{path} is truncated: its header declares {declared} bytes of MP3 audio, the file "
                              f"holds {max(have, 0)} ({max(have, 0) / declared:.0%}; the upload or copy stopped "
                              f"early?)", path=path)


def check_decoded_length(path: str | os.PathLike, decoded_s: float) -> None:
    """`InputUnreadable` when the audio of `path` decoded to less than its header declares
    (`declared_audio_seconds`) by more than `DECODED_SHORTFALL_S` or `DECODED_SHORTFALL_SHARE` of it: a FLAC file
    cut short renders part of the speech without a word (WAV's, MP3's and M4A's are checked at admission)."""
    declared = declared_audio_seconds(path)
    if declared is None:
        return
    if decoded_s < declared - max(DECODED_SHORTFALL_S, DECODED_SHORTFALL_SHARE * declared):
        raise InputUnreadable(f"{path} is truncated or damaged: its header declares {declared:.2f} s of audio, "
                              f"the file decodes to {decoded_s:.2f} s (the upload or copy stopped early?)",
                              path=str(path))


#: WAV data sizes that say "unknown" (a writer that could not seek back: a pipe, a live capture): 0, and from
#: 0x7FFFF000 up (SoX's MS_UNSPEC 0x7FFFF000, arecord's 0x7FFFFF00, ffmpeg's and others' 0xFFFFFFFF)
_WAV_SIZE_UNKNOWN_FROM = 0x7FFFF000


def _check_wav_complete(path: str, size: int) -> None:
    """A RIFF/WAVE file whose `data` chunk declares more bytes than the file holds was cut short (an
    upload or a copy that stopped midway): ffmpeg reads what is there and a job renders part of the
    speech without a word. Refused, naming both lengths. A size that says "unknown" (0, or
    `_WAV_SIZE_UNKNOWN_FROM` and up, as a pipe's writer leaves it) and RF64 files are left to ffmpeg."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    pos, byte_rate = 12, 0
    while pos + 8 <= len(head):
        chunk, length = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if chunk == b"fmt " and pos + 20 <= len(head):
            byte_rate = struct.unpack_from("<I", head, pos + 16)[0]
        if chunk == b"data":
            if length == 0 or length >= _WAV_SIZE_UNKNOWN_FROM:
                return
            have = max(size - (pos + 8), 0)
            if have < length:
                said = (f"{length / byte_rate:.2f} s of audio ({length} bytes), the file holds {have / byte_rate:.2f} s"
                        if byte_rate else f"{length} bytes of audio, the file holds {have}")
                raise InputUnreadable(f"{path} is truncated: its header declares {said} (the upload or copy "
                                      f"stopped early?)", path=path)
            return
        pos += 8 + length + (length & 1)
    return


def count_packets(container: av.container.InputContainer, stream) -> int:
    """Exact frame count of `stream` by demuxing (no decoding) from the container's current
    position: packets with data, minus those an edit list discards."""
    return sum(1 for packet in container.demux(stream) if packet.size > 0 and not packet.is_discard)


def scan_streams(path: str, indices: list[int]) -> dict[int, tuple[int, float | None]]:
    """Per stream index: (packets with data, seconds from its first packet's start to its last's end,
    None where the packets carry no timestamps), by demuxing the whole file once (no decoding). For
    files whose header tells no duration: a browser's MediaRecorder WebM, a piped Matroska, a raw
    H.264 stream. Remembered per file version: a job probes its inputs several times."""
    st = os.stat(path)
    return dict(_scan_streams(str(path), tuple(indices), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _scan_streams(path: str, indices: tuple[int, ...], _size: int,
                  _mtime_ns: int) -> dict[int, tuple[int, float | None]]:
    counts = {i: 0 for i in indices}
    first: dict[int, int] = {}
    end: dict[int, int] = {}
    with av.open(file_url(path), options={"protocol_whitelist": "file"}) as container:
        streams = [container.streams[i] for i in indices]
        bases = {s.index: s.time_base for s in streams}
        for packet in container.demux(*streams):
            i = packet.stream.index
            if i not in counts or packet.size <= 0 or packet.is_discard:
                continue
            counts[i] += 1
            if packet.pts is not None:
                first[i] = min(first.get(i, packet.pts), packet.pts)
                end[i] = max(end.get(i, packet.pts), packet.pts + (packet.duration or 0))
    return {i: (counts[i], float((end[i] - first[i]) * bases[i]) if i in end and bases[i] else None)
            for i in indices}


def count_video_frames(path: str | os.PathLike) -> int:
    """Exact number of frames of the first video stream of a file, by demuxing it."""
    try:
        with av.open(file_url(path), options={"protocol_whitelist": "file"}) as container:
            if not container.streams.video:
                raise InputUnreadable(f"{path} has no video stream to count", path=str(path))
            return count_packets(container, container.streams.video[0])
    except av.error.FFmpegError as exc:
        raise InputUnreadable(f"cannot count the video frames of {path}: {exc}", path=str(path),
                              cause=str(exc)) from exc


def _first_frame_and_pts(path: str, container, stream) -> tuple[av.VideoFrame, list[int]]:
    """Decode the first frame (rotation, decodability) and demux up to VFR_SAMPLE_PACKETS pts."""
    first = None
    pts: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.pts is not None and not packet.is_discard:
                pts.append(packet.pts)
            if first is None:
                for frame in packet.decode():
                    first = frame
                    break
            if first is not None and len(pts) >= VFR_SAMPLE_PACKETS:
                break
        if first is None:  # flush: a decoder with delay may hold the only frames
            for frame in stream.codec_context.decode(None):
                first = frame
                break
    except av.error.FFmpegError as exc:
        raise InputUnreadable(f"{path}: the video stream cannot be decoded: {exc}", path=path,
                              cause=str(exc)) from exc
    if first is None:
        raise InputUnreadable(f"{path}: the video stream has no decodable frame", path=path)
    return first, pts


REORDER_WINDOW = 16  # the deepest B-frame reordering H.264 allows (max_dec_frame_buffering)


def _is_variable(stream, fps: Fraction, pts: list[int]) -> bool:
    if not pts:  # no timestamps at all (a raw H.264 stream): frames laid at the demuxer's rate, one after another
        return False
    base = stream.base_rate
    if base and base.numerator > 0 and abs(float(base) - float(fps)) > VFR_TOLERANCE * float(fps):
        return True
    # Packets come in decode order: with B-frames the last few sampled pts leave gaps that later
    # packets would fill, so the tail (one reorder window) is not judged.
    return pts_uneven(pts, skip_tail=REORDER_WINDOW if len(pts) >= VFR_SAMPLE_PACKETS else 0)


def pts_uneven(pts: list[int], skip_tail: int = 0) -> bool:
    """Whether presentation times (any order) are unevenly spaced: an interval off the median by
    more than `VFR_TOLERANCE` (and a tick). `skip_tail`: the last times not judged (a sample cut
    in decode order)."""
    ordered = sorted(set(pts))
    if skip_tail:
        ordered = ordered[:-skip_tail]
    deltas = [b - a for a, b in zip(ordered, ordered[1:])]
    if len(deltas) < 2:
        return False
    median = statistics.median(deltas)
    slack = max(1.0, VFR_TOLERANCE * median)  # one tick of rounding in coarse time bases
    return any(abs(d - median) > slack for d in deltas)


def _rotation_clockwise(frame: av.VideoFrame, stream) -> int:
    """Clockwise degrees (0/90/180/270) a player rotates the picture by."""
    ccw = frame.rotation or 0  # PyAV: counter-clockwise angle of the display matrix
    if not ccw:
        tag = stream.metadata.get("rotate")  # legacy tag, clockwise
        if tag:
            try:
                return int(round(float(tag) / 90.0)) * 90 % 360
            except ValueError:
                return 0
    return int(round(-ccw / 90.0)) * 90 % 360


def _has_alpha(pix_fmt: str | None, stream) -> bool:
    """Whether the stream's pictures are transparent in part: a pixel format with an alpha plane (ProRes 4444,
    QuickTime Animation, PNG in a .mov), or VP8/VP9 whose alpha travels beside the picture (WebM's `alpha_mode`, which
    only libvpx decodes: FFmpeg's own decoder shows the colour its transparent pixels hold)."""
    if str((stream.metadata or {}).get("alpha_mode", "")).strip() == "1":
        return True
    try:
        return any(c.is_alpha for c in av.VideoFormat(pix_fmt).components) if pix_fmt else False
    except (ValueError, TypeError):  # a format PyAV does not know
        return False


def _video_info(path: str, container, stream, container_duration: float,
                size: int) -> VideoStreamInfo:
    fps = _frame_rate(stream)
    if fps is None:
        raise InputUnreadable(f"{path}: cannot determine the frame rate of the video stream",
                              path=path)
    _check_index_within_file(path, stream, size)
    ctx = stream.codec_context
    first, pts = _first_frame_and_pts(path, container, stream)
    duration = _stream_duration(stream, container_duration)
    estimate = round(duration * float(fps))
    frames = stream.frames or 0
    if frames <= 0:
        frames = estimate
    elif abs(frames - duration * float(fps)) > 1:  # edit list: the header counts cut frames too
        container.seek(0)
        frames = count_packets(container, stream)
    rotation = _rotation_clockwise(first, stream)
    width, height = ctx.width or first.width, ctx.height or first.height
    if rotation in (90, 270):
        width, height = height, width
    pix_fmt = ctx.pix_fmt or (first.format.name if first.format else None)
    # JPEG-style full range: a yuvj* format (MJPEG, older phones) or the stream's range flag (AVCOL_RANGE_JPEG)
    full_range = (pix_fmt or "").startswith("yuvj") or int(getattr(ctx, "color_range", 0) or 0) == 2
    # 0 and 2 say nothing (reserved / unspecified; a matrix of 0 is RGB, not a YUV stream's)
    color = [int(getattr(ctx, name, 2) or 2) for name in ("color_primaries", "color_trc", "colorspace")]
    sar = stream.sample_aspect_ratio
    # interlaced: the stream's field order (AVFieldOrder TT, BB, TB, BT) or its first picture's flag
    interlaced = int(getattr(ctx, "field_order", 0) or 0) in INTERLACED_FIELD_ORDERS or \
        bool(getattr(first, "interlaced_frame", False))
    return VideoStreamInfo(codec=ctx.name, width=width, height=height, fps_num=fps.numerator,
                           alpha=_has_alpha(pix_fmt, stream),
                           fps_den=fps.denominator, frame_count=int(frames), duration=duration,
                           rotation=rotation, variable_frame_rate=_is_variable(stream, fps, pts),
                           pix_fmt=pix_fmt, hdr_transfer=HDR_TRANSFERS.get(int(getattr(ctx, "color_trc", 0) or 0)),
                           full_range=full_range, color=color if any(c not in (0, 2) for c in color) else None,
                           sar=float(sar) if sar is not None and sar.numerator > 0 else 1.0,
                           base_fps=float(stream.base_rate) if stream.base_rate and stream.base_rate.numerator > 0
                           else None, interlaced=interlaced)


#: How much of each audio stream `speech_stream` decodes to tell which one holds the speech
SPEECH_PROBE_S = 30.0


def speech_stream(path: str | os.PathLike) -> int:
    """Which of a file's audio streams holds the speech (its index among the audio streams): the only
    one; of several, the loudest over its first `SPEECH_PROBE_S` (a recording's first track may be
    silent beside the narration, or a muted original). The admission probe, the mel features and the
    job's AAC all read this one. Remembered per file version."""
    try:
        st = os.stat(path)
        return _speech_stream(str(path), st.st_size, st.st_mtime_ns)
    except (OSError, av.error.FFmpegError):  # unreadable: the first, and its reader says what is wrong
        return 0


@functools.lru_cache(maxsize=64)
def _speech_stream(path: str, _size: int, _mtime_ns: int) -> int:
    """One pass over the file: each audio stream's mean power over its first `SPEECH_PROBE_S`, in full
    scale (integer samples divided by their type's range); a stream that does not decode counts as none."""
    import numpy as np

    with av.open(file_url(path), options={"protocol_whitelist": "file"}) as container:
        streams = list(container.streams.audio)
        if len(streams) <= 1:
            return 0
        power = {s.index: [0.0, 0] for s in streams}  # stream index -> [sum of squares, samples]
        broken: set[int] = set()
        heard: set[int] = set()  # streams decoded past SPEECH_PROBE_S
        for packet in container.demux(*streams):
            i = packet.stream.index
            if i in broken or i in heard:
                if len(broken | heard) == len(streams):
                    break
                continue
            try:
                frames = packet.decode()
            except av.error.FFmpegError:  # an undecodable track holds no speech we could use
                broken.add(i)
                continue
            for frame in frames:
                samples = _full_scale(frame.to_ndarray())
                power[i][0] += float(np.square(samples).sum())
                power[i][1] += samples.size
                if frame.time is not None and frame.time >= SPEECH_PROBE_S:
                    heard.add(i)
        order = [s.index for s in streams]  # read while the file is open
    mean = [power[i][0] / power[i][1] if power[i][1] and i not in broken else -1.0 for i in order]
    return int(max(range(len(order)), key=lambda k: mean[k]))


#: A mix of a stereo file's two channels whose power is under this share of their mean cancels (a channel whose
#: polarity is inverted: L + (-L) = 0): the model hears its louder channel instead
CANCELLING_MIX_SHARE = 0.25


def speech_channel(path: str | os.PathLike) -> int | None:
    """The channel of a stereo speech stream (`speech_stream`) the model hears instead of the mix of the two, where
    that mix cancels (`CANCELLING_MIX_SHARE`) over the first `SPEECH_PROBE_S`: a stereo file with one channel's
    polarity inverted played speech on its two speakers and gave the model silence (the mouth never moved, and the
    job read succeeded). None (the usual): the mix. Remembered per file version."""
    try:
        st = os.stat(path)
        return _speech_channel(str(path), st.st_size, st.st_mtime_ns)
    except (OSError, av.error.FFmpegError):  # unreadable: the mix, and its reader says what is wrong
        return None


@functools.lru_cache(maxsize=64)
def _speech_channel(path: str, _size: int, _mtime_ns: int) -> int | None:
    import numpy as np

    index = speech_stream(path)
    with av.open(file_url(path), options={"protocol_whitelist": "file"}) as container:
        if index >= len(container.streams.audio):  # none: its reader says so (`NoAudioStream`)
            return None
        stream = container.streams.audio[index]
        ctx = stream.codec_context
        if (getattr(ctx, "channels", None) or (ctx.layout.nb_channels if ctx.layout else 1)) != 2:
            return None  # (a review: 5.1's channels hold different sounds, dialogue in C: ffmpeg's downmix is right)
        channels, mix = np.zeros(2), 0.0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:  # a damaged packet: the others still tell (as `_speech_stream`)
                continue
            for frame in frames:
                x = _full_scale(frame.to_ndarray())
                if frame.format.is_packed:  # interleaved: [1, n * channels]
                    x = x.reshape(-1, len(frame.layout.channels)).T
                if x.shape[0] != 2:
                    continue
                channels += np.square(x).sum(axis=1)
                mix += float(np.square(x.mean(axis=0)).sum())
            if packet.pts is not None and packet.time_base is not None and \
                    float(packet.pts * packet.time_base) >= SPEECH_PROBE_S:
                break
    if not channels.max() > 0 or mix >= CANCELLING_MIX_SHARE * float(channels.mean()):
        return None
    return int(np.argmax(channels))


def _full_scale(samples):
    """Decoded samples as float64 in full scale: integers divided by their type's range, unsigned ones (8-bit WAV)
    centred first (their silence is 128, not 0)."""
    import numpy as np

    if samples.dtype.kind == "u":
        half = float(np.iinfo(samples.dtype).max + 1) / 2
        return (samples.astype(np.float64) - half) / half
    if samples.dtype.kind == "i":
        return samples.astype(np.float64) / float(np.iinfo(samples.dtype).max + 1)
    return samples.astype(np.float64)


def _audio_info(stream, container_duration: float) -> AudioStreamInfo:
    ctx = stream.codec_context
    channels = getattr(ctx, "channels", None) or (ctx.layout.nb_channels if ctx.layout else 0)
    return AudioStreamInfo(codec=ctx.name, sample_rate=int(ctx.sample_rate or 0),
                           channels=int(channels),
                           duration=_stream_duration(stream, container_duration))


def _is_cover_art(stream) -> bool:
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def probe(path: str | os.PathLike, settings: Settings | None = None) -> MediaInfo:
    """Streams, duration, exact fps, display size (rotation applied), frame count, frame-rate
    variability of a media file. Raises the `InputError` subclasses of `check_input_file`, and
    `InputUnreadable` naming the file when it is not media, truncated or undecodable."""
    from cluster.media.still import is_still, still_media_info

    s = settings or get_settings()
    checked = check_input_file(path, s)
    if is_still(checked):  # a photo: read by Pillow, not by ffmpeg's image2 demuxer (cluster.media.still)
        return still_media_info(checked, s)
    return read_media_info(checked, s)


def read_media_info(path: str | os.PathLike, settings: Settings | None = None) -> MediaInfo:
    """`probe` without the input-file checks (size limit, playlist sniffing): for files this
    project wrote itself, e.g. a finished output larger than `max_upload_bytes`."""
    s = settings or get_settings()
    p = str(path)
    try:
        size = os.path.getsize(p)
    except OSError as exc:
        raise InputNotFound(f"{p} cannot be found: {exc}", path=p, cause=str(exc)) from exc
    container = _open(p, s)
    try:
        duration = container.duration / 1_000_000 if container.duration else 0.0
        videos = [v for v in container.streams.video if not _is_cover_art(v)]
        audios = list(container.streams.audio)
        if not videos and not audios:
            raise InputUnreadable(f"{p} has neither an audio nor a video stream", path=p)
        if container.format.name == "wav":
            _check_wav_complete(p, size)
        if container.format.name == "mp3":
            _check_mp3_complete(p, size)
        if videos:  # of several (a proxy and the master, two angles), the one players show: the default one
            videos = sorted(videos, key=lambda v: not v.disposition & av.stream.Disposition.default)
        video = _video_info(p, container, videos[0], duration, size) if videos else None
        if video is not None and len(container.streams.video) > 1:
            video = video.model_copy(update={"stream": list(container.streams.video).index(videos[0])})
        speech = audios[speech_stream(p) if len(audios) > 1 else 0] if audios else None
        if speech is not None:
            _check_index_within_file(p, speech, size)  # an m4a cut short: its index outlives its data
        audio = _audio_info(speech, duration) if speech is not None else None
        untimed = [s.index for s, info in ((videos[0] if videos else None, video), (speech, audio))
                   if info is not None and info.duration <= 0]
        if untimed:  # a header without durations (a live or piped recording): the packets tell
            extent = scan_streams(p, untimed)
            if video is not None and videos[0].index in extent:
                frames, seconds = extent[videos[0].index]  # (packets without durations miss the last frame's)
                laid = frames / video.fps_num * video.fps_den
                video = video.model_copy(update={"frame_count": frames, "duration": max(seconds or 0.0, laid)})
            if audio is not None and speech.index in extent:
                audio = audio.model_copy(update={"duration": extent[speech.index][1] or 0.0})
        if not duration:
            duration = max(video.duration if video else 0.0, audio.duration if audio else 0.0)
        return MediaInfo(path=p, format=container.format.name, duration=duration, size_bytes=size,
                         video=video, audio=audio)
    except av.error.FFmpegError as exc:
        raise InputUnreadable(f"{p} cannot be read: {exc}", path=p, cause=str(exc)) from exc
    finally:
        container.close()


def _check_duration(info: MediaInfo, seconds: float, what: str, s: Settings) -> None:
    limit = s.max_input_seconds
    if seconds > limit:
        # as many decimals as it takes to differ from the limit ("2.0 s, more than the limit of 2 s" was said)
        lasts = next((f"{seconds:.{d}f}" for d in (1, 2, 3) if float(f"{seconds:.{d}f}") > limit), f"{seconds:.3f}")
        raise InputTooLong(f"{what} {info.path} lasts {lasts} s, more than the limit of {limit:g} s "
                           f"(LIPSYNC_MAX_INPUT_SECONDS)", path=info.path)


def probe_video(path: str | os.PathLike, settings: Settings | None = None) -> MediaInfo:
    """`probe` a template video: requires a video stream (`NoVideoStream`), display size within
    `max_width` x `max_height` (`InputTooLarge`), duration within `max_input_seconds`
    (`InputTooLong`)."""
    s = settings or get_settings()
    info = probe(path, s)
    v = info.video
    if v is None:
        raise NoVideoStream(f"{info.path} has no video stream (expected a template video)",
                            path=info.path)
    # the size its frames will have once normalised (square pixels: a sample aspect ratio widens them)
    wide = round(v.width * v.sar) if v.rotation not in (90, 270) else v.width
    high = v.height if v.rotation not in (90, 270) else round(v.height * v.sar)
    if max(v.width, wide) > s.max_width or max(v.height, high) > s.max_height:
        shown = f"{v.width}x{v.height}" + (f" (with its sample aspect ratio {v.sar:g}: {wide}x{high})"
                                           if (wide, high) != (v.width, v.height) else "")
        raise InputTooLarge(f"video {info.path} is {shown}, larger than the limit of "
                            f"{s.max_width}x{s.max_height}", path=info.path)
    if v.width < 2 or v.height < 2 or v.frame_count < 1:
        raise InputUnreadable(f"video {info.path} has no usable picture ({v.width}x{v.height}, "
                              f"{v.frame_count} frames)", path=info.path)
    _check_duration(info, max(v.duration, info.duration), "video", s)
    return info


def probe_audio(path: str | os.PathLike, settings: Settings | None = None) -> MediaInfo:
    """`probe` a speech audio file (any container; a video file with sound is fine): requires an
    audio stream (`NoAudioStream`) and a duration within `max_input_seconds` (`InputTooLong`)."""
    s = settings or get_settings()
    info = probe(path, s)
    a = info.audio
    if a is None:
        raise NoAudioStream(f"{info.path} has no audio stream (expected speech audio)",
                            path=info.path)
    if a.duration <= 0 or a.sample_rate <= 0 or a.channels <= 0:
        raise InputUnreadable(f"audio {info.path} has no usable samples (duration {a.duration} s, "
                              f"{a.sample_rate} Hz, {a.channels} channel{'' if a.channels == 1 else 's'})",
                              path=info.path)
    _check_duration(info, a.duration, "audio", s)
    return info
