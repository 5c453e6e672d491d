"""Synthetic but realistic media: speech-like audio and a template video of a photographed face.

Used by `lipsync demo`, by the tests and by the benchmarks. Nothing is downloaded: the speech is a
source-filter synthesis (glottal pulses through vowel formants, fricative noise, pauses) and the
face is scikit-image's bundled `astronaut` photograph with a slow, subtle head motion.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import threading
import wave
from fractions import Fraction

import cv2
import numpy as np
from scipy import signal

from cluster.config import Settings, get_settings
from cluster.errors import EncodeError
from cluster.media.ffmpeg import FFmpeg

# --- speech ------------------------------------------------------------------------------------
# (F1, F2, F3) in Hz of a few vowels of an adult speaker.
_VOWEL_FORMANTS: dict[str, tuple[float, float, float]] = {
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (300.0, 2250.0, 3000.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (320.0, 870.0, 2240.0),
}
_FORMANT_BANDWIDTHS = (80.0, 110.0, 160.0)
_NOISE_FLOOR = 1e-4
"""Amplitude of the background noise in pauses (about -80 dBFS): silence, but not digital zero."""
_BLOCK_SAMPLES = 1 << 17
"""Samples synthesised at a time (~8 s at 16 kHz): long audio never holds full-length temporaries."""


@dataclasses.dataclass(frozen=True)
class _Syllable:
    start: int
    stop: int
    vowel: str
    amplitude: float
    attack: float          # fraction of the syllable
    decay_from: float      # fraction of the syllable
    pitch_from: float      # intonation factor at the start
    pitch_to: float        # intonation factor at the end
    fricative: int         # samples of fricative noise at the onset (0: none)
    fricative_amp: float

    def envelope(self) -> np.ndarray:
        """Fast attack, sustained nucleus, slower decay."""
        x = np.linspace(0.0, 1.0, self.stop - self.start)
        env = np.where(x < self.attack, np.sin(0.5 * np.pi * x / self.attack) ** 2, 1.0)
        tail = np.clip((x - self.decay_from) / (1.0 - self.decay_from), 0.0, 1.0)
        return self.amplitude * env * np.cos(0.5 * np.pi * tail) ** 2


def speech_like(seconds: float, sample_rate: int = 16000, seed: int = 0, pause_every: float | None = 2.2,
                pause_seconds: tuple[float, float] = (0.3, 0.8)) -> np.ndarray:
    """Speech-like float32 mono audio in [-1, 1], deterministic for a seed.

    Voiced syllables of 150-300 ms, often separated by short closures: Rosenberg glottal pulses
    (pitch 100-220 Hz with slow drift, intonation and jitter) through three formant resonators
    set per syllable to a vowel a/e/i/o/u, with attack/decay envelopes; some unvoiced fricative
    bursts; and pauses of `pause_seconds` after speech runs of about `pause_every` seconds
    (0.7x-1.3x; None: no pauses) holding only a faint noise floor. Synthesised in blocks: memory
    is about two float32 copies of the result.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    n = int(round(seconds * sample_rate))
    rng = np.random.default_rng(seed)
    syllables = _plan_syllables(n, sample_rate, rng, pause_every, pause_seconds)
    starts = np.array([s.start for s in syllables], dtype=np.int64)
    stops = np.array([s.stop for s in syllables], dtype=np.int64)
    base = rng.uniform(115.0, 175.0)
    drift_phase = rng.uniform(0, 2 * np.pi, size=2)
    noise_rng = np.random.default_rng([seed, 1])

    jitter_sos = signal.butter(2, 30.0, fs=sample_rate, output="sos")
    jitter_gain = _noise_gain(jitter_sos)
    hiss_sos = signal.butter(4, min(2500.0, 0.3 * sample_rate), btype="highpass", fs=sample_rate, output="sos")
    hiss_gain = _noise_gain(hiss_sos)
    jitter_zi = np.zeros((jitter_sos.shape[0], 2))
    hiss_zi = np.zeros((hiss_sos.shape[0], 2))
    formant_zi = np.zeros((3, 2))
    phase, last_glottal = 0.0, 0.0

    voiced = np.empty(n, dtype=np.float32)
    unvoiced = np.empty(n, dtype=np.float32)
    for b0 in range(0, n, _BLOCK_SAMPLES):
        b1 = min(n, b0 + _BLOCK_SAMPLES)
        t = np.arange(b0, b1) / sample_rate
        voiced_env = np.zeros(b1 - b0)
        unvoiced_env = np.zeros(b1 - b0)
        intonation = np.ones(b1 - b0)
        first, last = np.searchsorted(stops, b0, "right"), np.searchsorted(starts, b1, "left")
        for syl in syllables[first:last]:  # the syllables overlapping this block
            lo, hi = max(syl.start, b0), min(syl.stop, b1)
            voiced_env[lo - b0:hi - b0] = syl.envelope()[lo - syl.start:hi - syl.start]
            intonation[lo - b0:hi - b0] = np.linspace(syl.pitch_from, syl.pitch_to,
                                                      syl.stop - syl.start)[lo - syl.start:hi - syl.start]
            if syl.fricative:
                f_hi = min(syl.start + syl.fricative, b1)
                if f_hi > lo:
                    unvoiced_env[lo - b0:f_hi - b0] = (np.hanning(syl.fricative) * syl.fricative_amp)[
                        lo - syl.start:f_hi - syl.start]

        jitter, jitter_zi = signal.sosfilt(jitter_sos, noise_rng.standard_normal(b1 - b0), zi=jitter_zi)
        drift = (1.0 + 0.08 * np.sin(2 * np.pi * 0.31 * t + drift_phase[0])
                 + 0.04 * np.sin(2 * np.pi * 1.13 * t + drift_phase[1]))
        f0 = np.clip(base * drift * intonation * (1.0 + 0.005 * jitter / jitter_gain), 100.0, 220.0)
        cycles = phase + np.cumsum(f0 / sample_rate)
        phase = float(cycles[-1] % 1.0)
        glottal = _rosenberg(cycles % 1.0)
        source = np.diff(glottal, prepend=last_glottal) * voiced_env  # radiated glottal flow derivative
        last_glottal = float(glottal[-1])

        # formant filtering, piecewise per syllable; a gap takes the next syllable's vowel
        cuts = np.concatenate(([b0], starts[(starts > b0) & (starts < b1)], stops[(stops > b0) & (stops < b1)], [b1]))
        cuts = np.unique(cuts)
        for p0, p1 in zip(cuts[:-1], cuts[1:]):
            k = min(int(np.searchsorted(stops, p0, "right")), len(syllables) - 1)
            vowel = syllables[k].vowel if syllables else "a"
            y, formant_zi = _formant_cascade(source[p0 - b0:p1 - b0], _VOWEL_FORMANTS[vowel], sample_rate, formant_zi)
            voiced[p0:p1] = y

        hiss, hiss_zi = signal.sosfilt(hiss_sos, noise_rng.standard_normal(b1 - b0), zi=hiss_zi)
        unvoiced[b0:b1] = unvoiced_env * hiss / (4.0 * hiss_gain)  # peaks near 1 before the envelope

    voiced *= 0.85 / max(float(np.abs(voiced).max()), 1e-9)
    voiced += 2.0 * unvoiced
    del unvoiced
    voiced *= 1.0 / max(float(np.abs(voiced).max()) / 0.9, 1.0)
    for b0 in range(0, n, _BLOCK_SAMPLES):
        b1 = min(n, b0 + _BLOCK_SAMPLES)
        voiced[b0:b1] += (_NOISE_FLOOR * noise_rng.standard_normal(b1 - b0)).astype(np.float32)
    np.clip(voiced, -1.0, 1.0, out=voiced)
    return voiced


def speech_vowels(seconds: float, sample_rate: int = 16000, seed: int = 0, pause_every: float | None = 2.2,
                  pause_seconds: tuple[float, float] = (0.3, 0.8)) -> list[tuple[float, float, str]]:
    """The syllables of `speech_like` with the same arguments: (start s, stop s, vowel) each, in
    order, so a benchmark knows which vowel was spoken when (the same plan, replayed)."""
    n = int(round(seconds * sample_rate))
    rng = np.random.default_rng(seed)
    return [(s.start / sample_rate, s.stop / sample_rate, s.vowel)
            for s in _plan_syllables(n, sample_rate, rng, pause_every, pause_seconds)]


def _plan_syllables(n: int, sample_rate: int, rng: np.random.Generator, pause_every: float | None,
                    pause_seconds: tuple[float, float]) -> list[_Syllable]:
    """Syllables in order: speech runs of about `pause_every` s separated by pauses."""
    syllables: list[_Syllable] = []
    pos = int(rng.uniform(0.05, 0.25) * sample_rate)  # short lead-in silence
    vowels = list(_VOWEL_FORMANTS)
    while pos < n:
        run_end = n if not pause_every else min(n, pos + int(pause_every * rng.uniform(0.7, 1.3) * sample_rate))
        while pos < run_end:
            a, b = pos, min(pos + int(rng.uniform(0.15, 0.30) * sample_rate), run_end)
            if b - a < int(0.06 * sample_rate):
                break
            fricative = int(rng.uniform(0.04, 0.09) * sample_rate) if rng.random() < 0.35 else 0
            syllables.append(_Syllable(
                start=a, stop=b, vowel=vowels[int(rng.integers(len(vowels)))],
                amplitude=rng.uniform(0.45, 1.0), attack=rng.uniform(0.12, 0.25), decay_from=rng.uniform(0.55, 0.75),
                pitch_from=rng.uniform(1.0, 1.12), pitch_to=rng.uniform(0.88, 1.0),
                fricative=min(fricative, b - a), fricative_amp=rng.uniform(0.08, 0.2)))
            pos = b
            if rng.random() < 0.6:  # a stop-consonant closure before the next syllable
                pos += int(rng.uniform(0.03, 0.08) * sample_rate)
        pos = run_end + int(rng.uniform(*pause_seconds) * sample_rate)
    return syllables


def _noise_gain(sos: np.ndarray) -> float:
    """Standard deviation of the filter's output for unit white noise (from its impulse response)."""
    impulse = np.zeros(8192)
    impulse[0] = 1.0
    return float(np.sqrt(np.sum(signal.sosfilt(sos, impulse) ** 2)))


def _rosenberg(phase: np.ndarray, open_q: float = 0.4, close_q: float = 0.16) -> np.ndarray:
    """Rosenberg glottal flow pulse evaluated at the fractional phase of each sample."""
    g = np.zeros_like(phase)
    rise = phase < open_q
    g[rise] = 0.5 * (1.0 - np.cos(np.pi * phase[rise] / open_q))
    fall = (phase >= open_q) & (phase < open_q + close_q)
    g[fall] = np.cos(0.5 * np.pi * (phase[fall] - open_q) / close_q)
    return g


def _formant_cascade(x: np.ndarray, formants: tuple[float, float, float], sample_rate: int,
                     zi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Three second-order resonators (unity gain at DC) in cascade; filter state carried in `zi`."""
    sos = []
    for f, bw in zip(formants, _FORMANT_BANDWIDTHS):
        f = min(f, 0.45 * sample_rate)
        r = math.exp(-math.pi * bw / sample_rate)
        c = 2.0 * r * math.cos(2.0 * math.pi * f / sample_rate)
        sos.append([1.0 - c + r * r, 0.0, 0.0, 1.0, -c, r * r])
    y, zf = signal.sosfilt(np.array(sos), x, zi=zi)
    return y, zf


# --- writing audio -----------------------------------------------------------------------------
_AUDIO_ENCODERS: dict[str, list[str]] = {
    ".mp3": ["-c:a", "libmp3lame", "-q:a", "4", "-f", "mp3"],
    ".m4a": ["-c:a", "aac", "-b:a", "128k", "-f", "ipod"],
    ".aac": ["-c:a", "aac", "-b:a", "128k", "-f", "adts"],
    ".flac": ["-c:a", "flac", "-f", "flac"],
    ".ogg": ["-c:a", "libvorbis", "-q:a", "4", "-f", "ogg"],
}


def write_audio(path: str, wav: np.ndarray, sample_rate: int = 16000, settings: Settings | None = None) -> str:
    """Write mono float audio in [-1, 1] to `path`, by its extension: `.wav` (16-bit PCM, stdlib
    `wave`), `.mp3`, `.m4a`, `.aac`, `.flac`, `.ogg` (ffmpeg, float32 piped in). Returns `path`."""
    s = settings or get_settings()
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    samples = np.ascontiguousarray(np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0))
    if ext == ".wav":
        pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
        with wave.open(path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(pcm.tobytes())
        return path
    if ext not in _AUDIO_ENCODERS:
        raise ValueError(f"cannot write audio as {ext!r}: use one of .wav, {', '.join(_AUDIO_ENCODERS)}")
    args = ["-loglevel", "error", "-f", "f32le", "-ar", str(int(sample_rate)), "-ac", "1", "-i", "pipe:0",
            *_AUDIO_ENCODERS[ext], path]
    with FFmpeg(args, settings=s, stage="write-audio", path=path, stdin=True, error=EncodeError,
                timeout_error=EncodeError) as run:
        run.communicate(input=memoryview(samples.astype("<f4", copy=False)).cast("B"), timeout=s.ffmpeg_timeout_s)
        run.check(f"writing audio {path!r}")
    return path


# --- the astronaut template --------------------------------------------------------------------
_ASTRONAUT_FACE_BOX = (183.0, 78.0, 270.0, 182.0)
"""Face (hairline to chin, cheek to cheek) in skimage.data.astronaut() pixels: x0, y0, x1, y1."""


ASTRONAUT_LANDMARKS = np.array([[203.3, 101.2], [247.6, 103.5], [223.4, 128.7], [200.3, 139.7], [245.7, 143.0]],
                               np.float32)
"""The 5 landmarks (left eye, right eye, nose tip, left / right mouth corner) of the face in
skimage.data.astronaut() pixels, as MTCNN finds them."""


def add_skin_texture(image: np.ndarray, landmarks: np.ndarray, seed: int = 0, strength: float = 1.0) -> np.ndarray:
    """`image` (BGR uint8, any size) with fine skin texture drawn at its own resolution around
    the face of `landmarks` [5,2] (image pixels): film grain and pores (1-2 px), and wrinkle lines
    about 1-2 px wide around the mouth and chin (smile lines, vertical lip lines, chin creases),
    the detail a downscaled photo lacks and a 1080p camera sees. Deterministic for a seed; returns
    a new image. Use it after scaling a photo up, so the texture is as fine as the frame's pixels.
    """
    rng = np.random.default_rng(seed)
    img = image.astype(np.float32)
    h, w = img.shape[:2]
    pts = np.asarray(landmarks, np.float64).reshape(5, 2)
    eye_mid, mouth_l, mouth_r = (pts[0] + pts[1]) / 2, pts[3], pts[4]
    mouth_c = (mouth_l + mouth_r) / 2
    unit = float(np.linalg.norm(mouth_c - eye_mid))      # eyes-to-mouth distance: the face's scale
    down = (mouth_c - eye_mid) / max(unit, 1e-9)
    right = np.array([down[1], -down[0]]) * -1.0           # perpendicular, towards the right mouth corner
    if np.dot(right, mouth_r - mouth_l) < 0:
        right = -right
    # where the texture lies: the face, strongest on the lower face (a soft ellipse)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    face_c = eye_mid + 0.55 * unit * down
    du = (xx - face_c[0]) * right[0] + (yy - face_c[1]) * right[1]
    dv = (xx - face_c[0]) * down[0] + (yy - face_c[1]) * down[1]
    face = np.clip(1.3 - np.sqrt((du / (1.05 * unit)) ** 2 + (dv / (1.45 * unit)) ** 2), 0.0, 1.0).astype(np.float32)
    del yy, xx, du, dv
    # grain and pores: per-pixel luminance noise, slightly correlated, and sparse dark dots
    grain = cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w)).astype(np.float32), (0, 0), 0.6)
    grain *= 9.0 / max(float(grain.std()), 1e-6)
    pores = (rng.random((h, w)) < 0.012).astype(np.float32)
    pores = cv2.GaussianBlur(pores, (0, 0), 0.8) * -60.0
    layer = (grain + pores) * face
    # wrinkles: thin darker curves (with a faint light edge below) in face coordinates
    lines = np.zeros((h, w), np.float32)

    def to_img(u: float, v: float) -> tuple[int, int]:
        p = mouth_c + u * unit * right + v * unit * down
        return int(round(p[0] * 16)), int(round(p[1] * 16))  # 4 fractional bits

    def curve(u0, v0, u1, v1, bend, depth, thickness):
        t = np.linspace(0.0, 1.0, 24)
        u = u0 + (u1 - u0) * t + bend * np.sin(np.pi * t) * (v1 - v0)
        v = v0 + (v1 - v0) * t - bend * np.sin(np.pi * t) * (u1 - u0)
        poly = np.array([to_img(a, b) for a, b in zip(u, v)], np.int32)
        cv2.polylines(lines, [poly], False, float(depth), thickness, cv2.LINE_AA, shift=4)

    for side in (-1.0, 1.0):
        # smile lines from beside the nose wing to beyond the mouth corners, a fainter one beside
        curve(side * 0.50, -0.50, side * 0.78, 0.18, side * 0.10, rng.uniform(24, 32), 2)
        curve(side * 0.56, -0.42, side * 0.84, 0.12, side * 0.10, rng.uniform(12, 18), 1)
        # marionette lines from beyond the mouth corners down
        curve(side * 0.70, 0.12, side * 0.60, 0.55, side * -0.08, rng.uniform(18, 26), 2)
    for _ in range(14):  # vertical lines on the lips and just above / below them
        u = rng.uniform(-0.45, 0.45)
        v0 = rng.uniform(-0.28, -0.05) if rng.random() < 0.5 else rng.uniform(0.02, 0.2)
        curve(u, v0, u + rng.uniform(-0.03, 0.03), v0 + rng.uniform(0.06, 0.13), 0.1, rng.uniform(18, 30), 1)
    for _ in range(6):  # creases across the chin
        u0, v0 = rng.uniform(-0.35, 0.0), rng.uniform(0.35, 0.75)
        curve(u0, v0, u0 + rng.uniform(0.25, 0.4), v0 + rng.uniform(-0.03, 0.03), 0.15, rng.uniform(18, 30), 1)
    for _ in range(30):  # fine crossing lines all over the lower face
        u0, v0 = rng.uniform(-0.9, 0.9), rng.uniform(-0.6, 0.8)
        a = rng.uniform(0, np.pi)
        ln = rng.uniform(0.06, 0.18)
        curve(u0, v0, u0 + ln * np.cos(a), v0 + ln * np.sin(a), rng.uniform(-0.2, 0.2), rng.uniform(10, 18), 1)
    highlight = np.roll(lines, 1, axis=0) * 0.35  # the lit edge of each crease
    layer -= strength * (lines - highlight)
    layer *= strength
    out = img + layer[..., None] * np.array([0.9, 0.95, 1.0], np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def close_mouth(photo: np.ndarray) -> np.ndarray:
    """The astronaut photograph (`skimage.data.astronaut()`, BGR, 512x512) with its smile closed:
    in each column of the mouth the opening between the lips (the teeth and the dark corners,
    between contours traced on the photo) is removed by stretching the upper lip down and the
    lower lip up until they meet at a seam (a per-column remap, so the lips keep their own colour
    and texture), and the seam is darkened a little. A face whose template mouth is closed, made
    offline. Returns a new image."""
    if photo.shape[:2] != (512, 512):
        raise ValueError(f"close_mouth expects the 512x512 astronaut photograph, got {photo.shape[:2]}")
    left, right, centre = 201.5, 248.5, 225.0   # the smile's corners (photo pixels)
    upper_lip, lower_lip = 5.0, 6.0             # lip thickness kept above / below the opening (px)
    map_x, map_y = np.meshgrid(np.arange(512, dtype=np.float32), np.arange(512, dtype=np.float32))
    seam_rows = {}
    for x in range(int(np.floor(left)) - 1, int(np.ceil(right)) + 2):
        q = np.clip((x - centre) / (right - centre if x >= centre else centre - left), -1.0, 1.0)
        top = 140.6 + 0.6 * q                                         # the upper lip's inner edge
        height = 1.0 + 7.6 * (1.0 - q * q) ** 0.9                     # the opening, tallest at the centre
        bottom = top + height
        mid = top + 0.45 * height                                     # where the lips meet
        a, b = top - upper_lip, bottom + lower_lip                     # the band that is remapped
        y = np.arange(int(np.floor(a)), int(np.ceil(b)) + 1)
        yf = y.astype(np.float32)
        src = np.where(yf < mid, a + (yf - a) * (top - a) / (mid - a), bottom + (yf - mid) * (b - bottom) / (b - mid))
        map_y[y, x] = np.clip(src, a, b)
        seam_rows[x] = mid
    closed = cv2.remap(photo.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR)
    for x, mid in seam_rows.items():  # the seam: a soft darker line where the lips meet
        y = np.arange(int(mid) - 2, int(mid) + 3)
        closed[y, x] *= (1.0 - 0.28 * np.exp(-((y - mid + 0.5) / 0.9) ** 2))[:, None]
    return np.clip(np.rint(closed), 0, 255).astype(np.uint8)


def textured_face(size: tuple[int, int] = (1920, 1080), seed: int = 0,
                  closed_mouth: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A still frame (BGR uint8, `size` = (width, height)) of the bundled astronaut photograph
    scaled up so the face fills about 42 % of the height, with fine skin texture drawn after the
    scaling (`add_skin_texture`), and its 5 landmarks [5,2] float32 in frame pixels: a face with
    real high-frequency detail at high resolution, made offline. `closed_mouth`: its smile closed
    first (`close_mouth`)."""
    import skimage.data  # deferred: only the test media need the bundled photograph

    width, height = int(size[0]), int(size[1])
    source = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    if closed_mouth:
        source = close_mouth(source)
    matrix = _astronaut_placement(width, height)
    frame = cv2.warpAffine(source, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    landmarks = (ASTRONAUT_LANDMARKS @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)
    return add_skin_texture(frame, landmarks, seed=seed), landmarks


def _astronaut_placement(width: int, height: int) -> np.ndarray:
    """The affine [2,3] (photo -> frame) that scales and centres the astronaut's face as
    `astronaut_template` places it."""
    x0, y0, x1, y1 = _ASTRONAUT_FACE_BOX
    face_w, face_h = x1 - x0, y1 - y0
    scale = min(0.42 * height / face_h, 0.6 * width / face_w)
    target_c = np.array([width / 2.0, (0.40 if height > width else 0.50) * height])
    face_c = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    return np.hstack([np.eye(2) * scale, (target_c - scale * face_c)[:, None]])


def astronaut_template(path: str, seconds: float = 3.0, fps: Fraction | int = 25,
                       size: tuple[int, int] = (320, 240), head_motion: bool = True,
                       audio: np.ndarray | None = None, rotation: int = 0, seed: int = 0,
                       skin_texture: bool = False, closed_mouth: bool = False, settings: Settings | None = None) -> str:
    """Write a template video of a real photographed face (scikit-image's astronaut) to `path`.

    `size` (width, height) is the display size; the face fills about 40% of its height (portrait
    sizes: face in the upper middle, its width at most 60% of the frame). `head_motion` adds a slow
    smooth sway (translation, tilt, scale) like a person standing and talking. Encoded H.264
    yuv420p at exactly `fps` (e.g. Fraction(30000, 1001)), `round(seconds * fps)` frames; `audio`
    (16 kHz mono float) is muxed as AAC. `rotation` (0/90/180/270) is the clockwise rotation a
    player applies (display matrix): the frames are stored pre-rotated so the face is upright
    once displayed. `skin_texture`: the photograph is first scaled to the frame's resolution and
    fine skin texture is drawn on it there (`add_skin_texture`), so a large face has the detail a
    real camera would see instead of a smooth upscaled photo. `closed_mouth`: the face's smile is
    closed first (`close_mouth`), a template whose mouth is closed. Returns `path`.
    """
    s = settings or get_settings()
    path = os.fspath(path)
    fps = Fraction(fps)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    rotation = int(rotation) % 360
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be 0, 90, 180 or 270, got {rotation}")
    width, height = int(size[0]), int(size[1])
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"size must be even and >= 16 on both sides, got {size}")
    n_frames = max(1, int(round(Fraction(seconds) * fps)))
    stored_w, stored_h = (height, width) if rotation in (90, 270) else (width, height)

    import skimage.data  # deferred: only this function needs the bundled photograph

    source = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    if closed_mouth:
        source = close_mouth(source)
    x0, y0, x1, y1 = _ASTRONAUT_FACE_BOX
    face_w, face_h = x1 - x0, y1 - y0
    face_c = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    scale = min(0.42 * height / face_h, 0.6 * width / face_w)
    target_c = np.array([width / 2.0, (0.40 if height > width else 0.50) * height])
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=6)
    if skin_texture:  # the photo at the frame's scale, textured there; the frames then only sway it
        up = np.array([[scale, 0.0, 0.0], [0.0, scale, 0.0]])
        big = (int(np.ceil(source.shape[1] * scale)), int(np.ceil(source.shape[0] * scale)))
        source = cv2.warpAffine(source, up, big, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
        source = add_skin_texture(source, ASTRONAUT_LANDMARKS * scale, seed=seed)
        face_c, face_h, scale = face_c * scale, face_h * scale, 1.0

    tmp_audio = None
    cmd = ["-loglevel", "error"]
    if rotation:
        # display matrix on the raw input, written to the output untouched (no autorotate filter)
        cmd += ["-noautorotate", "-display_rotation", str(-rotation)]
    cmd += ["-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{stored_w}x{stored_h}",
            "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0"]
    try:
        if audio is not None:
            fd, tmp_audio = tempfile.mkstemp(suffix=".wav", dir=os.path.dirname(os.path.abspath(path)))
            os.close(fd)
            write_audio(tmp_audio, audio, 16000, settings=s)
            cmd += ["-i", tmp_audio, "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "128k"]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
                "-r", f"{fps.numerator}/{fps.denominator}", "-movflags", "+faststart", path]
        frames = (_render_frame(source, k / float(fps), scale, face_c, target_c, face_h, (width, height),
                                head_motion, phases, rotation) for k in range(n_frames))
        _encode_frames(cmd, frames, timeout_s=s.ffmpeg_timeout_s, what=f"writing template {path!r}", path=path,
                       settings=s)
    finally:
        if tmp_audio is not None:
            os.unlink(tmp_audio)
    return path


def _render_frame(source: np.ndarray, t: float, scale: float, face_c: np.ndarray, target_c: np.ndarray,
                  face_h: float, size: tuple[int, int], head_motion: bool, phases: np.ndarray,
                  rotation: int) -> np.ndarray:
    """One display-oriented frame at time t, then pre-rotated against the display rotation."""
    angle, zoom, shift = 0.0, 1.0, np.zeros(2)
    if head_motion:  # slow, incommensurate sways: a few % of the face, about a degree of tilt
        def sway(hz: float, k: int) -> float:
            return math.sin(2 * math.pi * hz * t + phases[k])

        angle = 1.6 * sway(0.21, 0) + 0.5 * sway(0.47, 1)
        zoom = 1.0 + 0.015 * sway(0.13, 2)
        amp = 0.03 * face_h * scale
        shift = amp * np.array([sway(0.17, 3) + 0.3 * sway(0.53, 4), 0.6 * sway(0.23, 5)])
    theta = math.radians(angle)
    a = scale * zoom * math.cos(theta)
    b = scale * zoom * math.sin(theta)
    linear = np.array([[a, b], [-b, a]])  # rotate by `angle` (counter-clockwise on screen) and scale
    offset = target_c + shift - linear @ face_c
    matrix = np.hstack([linear, offset[:, None]])
    frame = cv2.warpAffine(source, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rotation == 90:
        frame = cv2.rotate(frame, cv2.ROTATE_90_COUNTERCLOCKWISE)
    elif rotation == 180:
        frame = cv2.rotate(frame, cv2.ROTATE_180)
    elif rotation == 270:
        frame = cv2.rotate(frame, cv2.ROTATE_90_CLOCKWISE)
    return np.ascontiguousarray(frame)


def _encode_frames(args: list[str], frames, *, timeout_s: float, what: str, path: str,
                   settings: Settings | None = None) -> None:
    """Pipe raw frames into an ffmpeg encoder (the one runner); a timer kills it at the deadline;
    always reaped."""
    with FFmpeg(args, settings=settings, stage="write-template", path=path, stdin=True, error=EncodeError,
                timeout_error=EncodeError) as run:
        timed_out = threading.Event()

        def _kill_at_deadline() -> None:
            timed_out.set()
            run.proc.kill()

        timer = threading.Timer(timeout_s, _kill_at_deadline)
        timer.daemon = True
        timer.start()
        try:
            try:
                for frame in frames:
                    run.proc.stdin.write(memoryview(frame).cast("B"))
                run.proc.stdin.close()
            except BrokenPipeError:  # ffmpeg died: its status and stderr say why, below
                pass
            run.wait(timeout_s)
        finally:
            timer.cancel()
        if timed_out.is_set():
            raise EncodeError(f"ffmpeg timed out after {timeout_s:.0f} s {what}", path=path, cause=run.stderr_tail())
        run.check(what)


def make_demo_inputs(directory: str, seconds: float = 6.0, settings: Settings | None = None) -> tuple[str, str]:
    """The demo's inputs in `directory`: speech-like audio with pauses (`demo_speech.wav`, `seconds`
    long) and a 640x480 25 fps astronaut template (`demo_template.mp4`) of about 4 s, shorter than
    the audio so the ping-pong loop is exercised. Returns (audio_path, video_path)."""
    os.makedirs(directory, exist_ok=True)
    audio_path = os.path.join(directory, "demo_speech.wav")
    video_path = os.path.join(directory, "demo_template.mp4")
    write_audio(audio_path, speech_like(seconds, seed=7), 16000, settings=settings)
    template_seconds = max(1.0, min(4.0, 0.67 * seconds))
    astronaut_template(video_path, seconds=template_seconds, fps=25, size=(640, 480), seed=7, settings=settings)
    return audio_path, video_path
