"""Fragmented MP4 (ISO BMFF) for HLS: an init segment (`ftyp` + `moov` with an H.264 and an AAC
track, no samples) and media segments (`moof` + `mdat`, one fragment holding both tracks).

Written here, box by box, because every field matters to players and must be the same on every
write: each fragment's decode time (`tfdt`) is given by the caller (the job's timeline, from the
segment's start), composition offsets are non-negative (`trun` version 0) and there are no edit
lists (hls.js ignores them): the caller shifts the timeline explicitly instead.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
#: `sample_flags`: a sync sample (depends on no other), and a non-sync one.
SYNC_SAMPLE = 0x02000000
NON_SYNC_SAMPLE = 0x01010000
VIDEO_TRACK, AUDIO_TRACK = 1, 2


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


@dataclass(frozen=True)
class VideoTrack:
    width: int
    height: int
    timescale: int
    avcc: bytes  # the AVCDecoderConfigurationRecord (the mp4 stream's extradata): SPS and PPS


@dataclass(frozen=True)
class AudioTrack:
    sample_rate: int
    channels: int
    asc: bytes  # the AudioSpecificConfig (the AAC encoder's extradata)
    bitrate: int = 0


@dataclass
class Run:
    """One track's samples in a fragment: decode time of the first, then per sample
    (duration, size, flags, composition offset) and their bytes, in decode order."""
    track_id: int
    decode_time: int
    samples: list[tuple[int, int, int, int]] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)

    def add(self, payload: bytes, duration: int, flags: int = 0, offset: int = 0) -> None:
        self.samples.append((duration, len(payload), flags, offset))
        self.data.append(payload)


def _descriptor(tag: int, payload: bytes) -> bytes:
    n = len(payload)  # the 4-byte size form, as ffmpeg writes it
    return bytes([tag, 0x80 | (n >> 21 & 0x7F), 0x80 | (n >> 14 & 0x7F), 0x80 | (n >> 7 & 0x7F), n & 0x7F]) + payload


def _esds(audio: AudioTrack) -> bytes:
    dsi = _descriptor(0x05, audio.asc)
    dcd = _descriptor(0x04, bytes([0x40, 0x15]) + (0).to_bytes(3, "big")
                      + struct.pack(">II", audio.bitrate, audio.bitrate) + dsi)
    es = _descriptor(0x03, struct.pack(">HB", 0, 0) + dcd + _descriptor(0x06, b"\x02"))
    return full_box(b"esds", 0, 0, es)


def _trak(track_id: int, timescale: int, handler: bytes, name: bytes, header: bytes, sample_entry: bytes,
          width: int = 0, height: int = 0, volume: int = 0) -> bytes:
    tkhd = full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track_id, 0, 0), bytes(8),
                    struct.pack(">hhhH", 0, 0, volume, 0), MATRIX, struct.pack(">II", width << 16, height << 16))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))  # language "und"
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, handler), bytes(12), name + b"\0")
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), sample_entry),
               full_box(b"stts", 0, 0, struct.pack(">I", 0)), full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
               full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)), full_box(b"stco", 0, 0, struct.pack(">I", 0)))
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", header, dinf, stbl)))


def init_segment(video: VideoTrack, audio: AudioTrack) -> bytes:
    """`ftyp` + `moov` (no samples, `mvex` announcing fragments) for one H.264 and one AAC track."""
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6", b"mp41", b"avc1")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIIIIH", 0, 0, 1000, 0, 0x00010000, 0x0100), bytes(10), MATRIX,
                    bytes(24), struct.pack(">I", AUDIO_TRACK + 1))
    avc1 = box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HHII", video.width, video.height,
                                                                               0x00480000, 0x00480000),
               bytes(4), struct.pack(">H", 1), bytes(32), struct.pack(">Hh", 0x0018, -1), box(b"avcC", video.avcc))
    mp4a = box(b"mp4a", bytes(6), struct.pack(">H", 1), bytes(8),
               struct.pack(">HHHHI", audio.channels, 16, 0, 0, audio.sample_rate << 16), _esds(audio))
    video_trak = _trak(VIDEO_TRACK, video.timescale, b"vide", b"VideoHandler",
                       full_box(b"vmhd", 0, 1, bytes(8)), avc1, video.width, video.height)
    audio_trak = _trak(AUDIO_TRACK, audio.sample_rate, b"soun", b"SoundHandler",
                       full_box(b"smhd", 0, 0, bytes(4)), mp4a, volume=0x0100)
    mvex = box(b"mvex", *(full_box(b"trex", 0, 0, struct.pack(">IIIII", t, 1, 0, 0, 0))
                          for t in (VIDEO_TRACK, AUDIO_TRACK)))
    return ftyp + box(b"moov", mvhd, video_trak, audio_trak, mvex)


def _moof(sequence: int, runs: list[Run], offsets: list[int]) -> bytes:
    trafs = []
    for run, offset in zip(runs, offsets):
        flags = 0x000001 | 0x000100 | 0x000200 | 0x000400 | 0x000800  # offset, duration, size, flags, cto
        entries = b"".join(struct.pack(">IIII", *s) for s in run.samples)
        trafs.append(box(b"traf", full_box(b"tfhd", 0, 0x020000, struct.pack(">I", run.track_id)),
                         full_box(b"tfdt", 1, 0, struct.pack(">Q", run.decode_time)),
                         full_box(b"trun", 0, flags, struct.pack(">Ii", len(run.samples), offset), entries)))
    return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)


def media_segment(sequence: int, runs: list[Run]) -> bytes:
    """One fragment (`moof` + `mdat`) holding every run's samples, in the order given."""
    runs = [r for r in runs if r.samples]
    size = len(_moof(sequence, runs, [0] * len(runs)))  # the offsets don't change the size
    offsets, at = [], size + 8
    for run in runs:
        offsets.append(at)
        at += sum(len(d) for d in run.data)
    return _moof(sequence, runs, offsets) + box(b"mdat", *(d for run in runs for d in run.data))
