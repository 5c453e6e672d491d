"""The frame plan: how many output frames, which template frame each one shows, and the chunks.

Pure functions. Output frame `i` shows template frame `template_indices(...)[i]`; a ping-pong loop
runs 0, 1, ..., T-1, T-2, ..., 1, 0, 1, ... so that consecutive output frames never jump.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from cluster.schemas import Chunk

_SECONDS_EPSILON = Fraction(1, 10**6)
"""Float noise tolerated on a duration: 2.0000000001 s at 25 fps is 50 frames, not 51."""


def frame_count(audio_seconds: float, fps: Fraction) -> int:
    """Output frames for `audio_seconds` of audio: `ceil(audio_seconds * fps)` robust to float noise
    (durations within 1 us of a frame boundary count as on it); at least 1."""
    if not math.isfinite(audio_seconds) or audio_seconds < 0:
        raise ValueError(f"audio duration must be a finite number >= 0, got {audio_seconds!r}")
    fps = _positive_fps(fps)
    exact = (Fraction(audio_seconds) - _SECONDS_EPSILON) * fps
    return max(1, math.ceil(exact))


def frame_count_from_samples(n_samples: int, sample_rate: int, fps: Fraction) -> int:
    """Output frames for `n_samples` audio samples: exact `ceil(n_samples / sample_rate * fps)`, >= 1."""
    if n_samples < 0 or sample_rate <= 0:
        raise ValueError(f"need n_samples >= 0 and sample_rate > 0, got {n_samples}, {sample_rate}")
    fps = _positive_fps(fps)
    num = int(n_samples) * fps.numerator
    den = int(sample_rate) * fps.denominator
    return max(1, -(-num // den))


SYNC_MODES = ("pingpong", "forward", "cut_off", "silence", "remap")
"""How the template follows the audio (`RenderRequest.loop`; the API's `sync_mode`, where `loop`
is `forward`): `pingpong` and `forward` repeat the template over the audio's length; `cut_off`
ends at the shorter of audio and template; `silence` plays at least the whole template, the audio
padded with silence; `remap` stretches (or squeezes) the template over the audio's length."""


def sync_frame_count(audio_frames: int, template_frames: int, mode: str = "pingpong") -> int:
    """Output frames for an audio of `audio_frames` frames against a `template_frames` template."""
    if audio_frames < 1 or template_frames < 1:
        raise ValueError(f"need audio_frames, template_frames >= 1, got {audio_frames}, {template_frames}")
    if mode == "cut_off":
        return min(audio_frames, template_frames)
    if mode == "silence":
        return max(audio_frames, template_frames)
    if mode not in SYNC_MODES:
        raise ValueError(f"sync mode must be one of {', '.join(SYNC_MODES)}, got {mode!r}")
    return audio_frames


def template_indices(start: int, stop: int, template_frames: int, loop: str = "pingpong",
                     total: int | None = None) -> np.ndarray:
    """Template frame shown by each output frame in [start, stop): int64 [stop-start].

    `forward` (and `cut_off`, which never passes the template's end): i % T. `pingpong` (and
    `silence`, which plays the template through, then turns): period 2T-2, 0..T-1 then T-2..1, no
    repeated or skipped frame at a turnaround; T == 1 shows frame 0 throughout. `remap`:
    floor(i * T / total), the template stretched over `total` output frames. The result for a
    sub-range equals the same slice of the result for the whole range.
    """
    if template_frames < 1:
        raise ValueError(f"template must have at least 1 frame, got {template_frames}")
    if not 0 <= start <= stop:
        raise ValueError(f"bad output frame range [{start}, {stop})")
    i = np.arange(start, stop, dtype=np.int64)
    t = int(template_frames)
    if loop == "remap":
        if total is None or total < 1 or stop > total:
            raise ValueError(f"remap needs the output's total frames (>= {stop}), got {total!r}")
        return np.minimum((i * t) // int(total), t - 1)
    if loop in ("forward", "cut_off"):
        return i % t
    if loop not in ("pingpong", "silence"):
        raise ValueError(f"loop must be one of {', '.join(SYNC_MODES)}, got {loop!r}")
    if t == 1:
        return np.zeros_like(i)
    period = 2 * t - 2
    m = i % period
    return np.where(m < t, m, period - m)


def fit_audio_samples(frames: int, fps: Fraction, sample_rate: int) -> int:
    """Samples of an audio fitted to exactly `frames` output frames (trimmed or silence-padded):
    the most samples for which `frame_count_from_samples` still gives `frames`."""
    fps = _positive_fps(fps)
    return (int(frames) * int(sample_rate) * fps.denominator) // fps.numerator


def make_chunks(total_frames: int, fps: Fraction, chunk_seconds: float, first_seconds: float = 0.0) -> list[Chunk]:
    """Cut output frames [0, total_frames) into consecutive chunks of about `chunk_seconds`
    (`round(chunk_seconds * fps)` frames, >= 1). A remainder shorter than half a chunk joins the
    previous chunk; a longer one becomes the last, shorter chunk. A `first_seconds` shorter than
    `chunk_seconds` makes the first chunk that long (its segment is ready sooner); the rest are cut
    as above from where it ends."""
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if not chunk_seconds > 0:
        raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds!r}")
    fps = _positive_fps(fps)
    target = max(1, round(Fraction(chunk_seconds) * fps))
    first = max(1, round(Fraction(first_seconds) * fps)) if 0 < first_seconds < chunk_seconds else target
    if first >= target or total_frames <= target:
        first = 0  # no separate first chunk
    bounds = ([0] if first else []) + list(range(first, total_frames, target)) + [total_frames]
    if len(bounds) > 2 and 2 * (bounds[-1] - bounds[-2]) < target:
        del bounds[-2]  # merge a tiny tail into the previous chunk
    return [Chunk(index=k, start=a, stop=b) for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def _positive_fps(fps: Fraction | int | float) -> Fraction:
    f = Fraction(fps)
    if f <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    return f
