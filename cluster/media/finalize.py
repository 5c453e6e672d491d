"""Finishing a job: concatenate segments (stream copy), mux AAC audio, verify, rename atomically."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av

from cluster.config import Settings, get_settings
from cluster.errors import InputError, OutputVerificationError
from cluster.fsutil import publish, temporary_name
from cluster.media.ffmpeg import file_url, input_args, run_ffmpeg
from cluster.media.probe import read_media_info
from cluster.schemas import MediaInfo

#: An AAC frame holds 1024 samples; the last one is padded, so the audio stream may run up to one
#: AAC frame past the source (ffmpeg's mp4 edit list trims the encoder's priming, not this tail).
AAC_FRAME_SAMPLES = 1024
#: how much shorter than the speech an output's audio may be (container time stamps round to a few samples)
AUDIO_SHORT_TOLERANCE_S = 0.002


def _ffconcat_quote(path: str) -> str:
    """A path quoted for an ffconcat `file` line: single quotes, `'` written as `'\\''`."""
    return "'" + path.replace("'", "'\\''") + "'"


def write_concat_list(segments: list[str], list_path: str | os.PathLike) -> None:
    """Write our own ffconcat list of `segments` (absolute `file:` paths, safely quoted)."""
    lines = ["ffconcat version 1.0"]
    for seg in segments:
        if "\n" in seg or "\r" in seg:
            raise OutputVerificationError(f"segment path {seg!r} contains a line break", path=seg)
        lines.append("file " + _ffconcat_quote(file_url(seg)))
    Path(list_path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def finalize_output(segments: list[str], audio_path: str, out_path: str, *, frames_expected: int,
                    fps: Fraction, audio_duration: float,
                    settings: Settings | None = None, audio_copy: bool = False) -> MediaInfo:
    """Concatenate `segments` by stream copy, mux `audio_path` as AAC trimmed to `audio_duration`
    (with `audio_copy`: `audio_path` is the job's AAC track, `cluster.media.aac`, copied packet for
    packet, the same packets its HLS segments hold),
    keep exactly `frames_expected` video frames, write to a temporary name next to `out_path`,
    `verify_output` it, then rename it to `out_path` atomically. On any failure the temporary
    file is removed and the error raised (`MediaError`, `RenderTimeout`,
    `OutputVerificationError`). Returns the verified output's MediaInfo."""
    s = settings or get_settings()
    if not segments:
        raise OutputVerificationError(f"no segments to finalise into {out_path}", path=out_path)
    missing = [seg for seg in segments if not os.path.isfile(seg)]
    if missing:
        raise OutputVerificationError(f"segments missing for {out_path}: {missing[:3]}",
                                      path=out_path)
    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # the project's temporary names (`temporary_name`), so a killed finalize's are found by
    # `sweep_temporaries(out.parent, of=out)`
    tmp, list_path = str(temporary_name(out)), str(temporary_name(out))
    try:
        write_concat_list([str(Path(seg).resolve()) for seg in segments], list_path)
        run_ffmpeg([
            "-loglevel", "error",
            "-f", "concat", "-safe", "0", *input_args(list_path),
            *(() if audio_copy else ("-t", f"{audio_duration:.6f}")), *input_args(audio_path),
            "-map", "0:v:0", "-map", "1:a:0", "-map_metadata", "-1",
            # every frame of the segments (verified to be `frames_expected` below): `-frames:v` ended the
            # output at the last frame and cut the audio's last packet, up to an AAC frame of speech
            "-c:v", "copy",
            *(("-c:a", "copy") if audio_copy else ("-c:a", "aac", "-b:a", s.audio_bitrate)),
            "-movflags", "+faststart", "-f", "mp4", file_url(tmp),
        ], timeout=s.ffmpeg_timeout_s, settings=s, stage="finalize", path=str(out))
        verify_output(tmp, frames_expected=frames_expected, fps=fps,
                      audio_duration=audio_duration, settings=s)
        publish(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        Path(list_path).unlink(missing_ok=True)
    return read_media_info(out, s)


def _count_video_frames(container) -> tuple[int, float]:
    """(exact frame count, presentation span in seconds incl. the last frame's duration)."""
    stream = container.streams.video[0]
    count, first, end = 0, None, None
    for packet in container.demux(stream):
        if packet.size == 0 or packet.pts is None or packet.is_discard:
            continue
        count += 1
        first = packet.pts if first is None else min(first, packet.pts)
        stop = packet.pts + (packet.duration or 0)
        end = stop if end is None else max(end, stop)
    span = float((end - first) * stream.time_base) if count else 0.0
    return count, span


def verify_output(path: str, *, frames_expected: int, fps: Fraction, audio_duration: float,
                  settings: Settings | None = None) -> MediaInfo:
    """Check a finished file: a video and an audio stream, exactly `frames_expected` video frames
    (counted by demuxing, not from the header), video and audio durations equal to
    `audio_duration` within one frame (`1/fps`; the audio also within one AAC frame of padding).
    Raises `OutputVerificationError` naming the file and the failed check (expected vs found)."""
    s = settings or get_settings()
    fps = Fraction(fps)
    frame = 1.0 / float(fps)

    def fail(check: str) -> OutputVerificationError:
        return OutputVerificationError(f"output {path} failed verification: {check}", path=path,
                                       stage="finalize")

    try:
        info = read_media_info(path, s)
    except InputError as exc:
        raise fail(f"not a readable mp4 ({exc.message})") from exc
    if info.video is None:
        raise fail("expected a video stream, found none")
    if info.audio is None:
        raise fail("expected an audio stream, found none")
    try:
        with av.open(file_url(path), options={"protocol_whitelist": "file"}) as container:
            frames, video_span = _count_video_frames(container)
    except av.error.FFmpegError as exc:
        raise fail(f"demuxing the video stream failed: {exc}") from exc
    if frames != frames_expected:
        raise fail(f"expected {frames_expected} video frames, found {frames}")
    if abs(info.video.fps - fps) > fps / 1000:  # muxer time bases may round a hair
        raise fail(f"expected {fps} fps, found {info.video.fps}")
    planned = frames / fps
    if abs(float(planned) - audio_duration) > frame + 1e-6:
        raise fail(f"{frames} frames at {fps} fps last {float(planned):.4f} s, expected the audio "
                   f"duration {audio_duration:.4f} s within one frame ({frame:.4f} s)")
    if abs(video_span - audio_duration) > frame + 1e-3:
        raise fail(f"video stream lasts {video_span:.4f} s, expected {audio_duration:.4f} s "
                   f"within one frame ({frame:.4f} s)")
    audio_slack = frame + AAC_FRAME_SAMPLES / max(info.audio.sample_rate, 1)
    if audio_duration - info.audio.duration > AUDIO_SHORT_TOLERANCE_S:
        raise fail(f"audio stream lasts {info.audio.duration:.4f} s, {audio_duration - info.audio.duration:.4f} s "
                   f"short of the speech's {audio_duration:.4f} s: its end was cut")
    if abs(info.audio.duration - audio_duration) > audio_slack:
        raise fail(f"audio stream lasts {info.audio.duration:.4f} s, expected "
                   f"{audio_duration:.4f} s "
                   f"within {audio_slack:.4f} s (one frame + one AAC frame)")
    video = info.video.model_copy(update={"frame_count": frames})
    return info.model_copy(update={"video": video})

