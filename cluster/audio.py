"""Audio features: decoding to 16 kHz mono, Wav2Lip mel spectrograms, per-frame mel windows and
per-frame speech energy.

The mel spectrogram reproduces Wav2Lip's `audio.py` exactly (pre-emphasis 0.97, STFT n_fft 800,
hop 200, Hann window 800, centred with zero padding as librosa >= 0.10 does, 80 Slaney mels
55-7600 Hz, dB with ref 20, min -100, symmetric normalisation to [-4, 4]), written with numpy
and computed block by block so that long audio never holds a full complex STFT in memory.
"""
from __future__ import annotations

import functools
import os
import selectors
import time
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from cluster.config import Settings, get_settings
from cluster.errors import InputNotFound, InputTooLong, InputUnreadable, MediaError, NoAudioStream
from cluster.media.ffmpeg import PROTOCOL_WHITELIST, FFmpeg, ffmpeg_args, file_url
from cluster.media.probe import check_decoded_length, speech_channel, speech_stream

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS_VALUE = 4.0
MEL_STEP = 16
"""Mel columns per model window (0.2 s)."""
MEL_COLUMNS_PER_SECOND = SAMPLE_RATE // HOP  # 80

_STFT_BLOCK_FRAMES = 1024  # frames per STFT block: ~6.5 MB of float64 frames + 3.3 MB complex
_READ_BLOCK = 1 << 18
_NO_STREAM_MARKERS = ("does not contain any stream", "matches no streams")


# --- decoding ------------------------------------------------------------------------------
def _decode_args(path: str, sample_rate: int) -> list[str]:
    import ffmpeg  # ffmpeg-python builds the command line

    channel = speech_channel(path)  # None: the mix of its channels; else one of them (the mix cancels)
    mono = {"ac": 1} if channel is None else {"af": f"pan=mono|c0=c{channel}"}
    return ["-loglevel", "error", *ffmpeg_args(
        ffmpeg.input(file_url(path), protocol_whitelist=PROTOCOL_WHITELIST)
        # the audio stream with the speech (`speech_stream`: of several, the loudest), as the job's AAC
        # and the admission probe read it (without -map, ffmpeg picks the stream with the most channels
        # or the default flag: lips would follow another track than the one heard)
        .output("pipe:1", map=f"0:a:{speech_stream(path)}", vn=None, ar=int(sample_rate), f="f32le", **mono))]


def _check_decoded(path: str, rc: int, stderr: bytes, n_samples: int, sample_rate: int) -> None:
    """The typed error for a failed, empty or short decode of `path` (nothing when it went well)."""
    err_text = stderr.decode("utf-8", "replace").strip()
    if rc != 0:
        if any(m in err_text for m in _NO_STREAM_MARKERS):
            raise NoAudioStream(f"{path!r} has no audio stream (expected speech audio or a video with "
                                f"an audio track)", path=path, cause=err_text[-2000:])
        raise InputUnreadable(f"cannot decode audio of {path!r}: ffmpeg exited with status {rc}",
                              path=path, cause=err_text[-2000:])
    if n_samples == 0:
        raise InputUnreadable(f"audio of {path!r} decodes to no samples", path=path,
                              cause=err_text[-2000:] or None)
    check_decoded_length(path, n_samples / sample_rate)


def _check_finite(path: str, samples: np.ndarray, first: int, sample_rate: int) -> None:
    """`InputUnreadable` when decoded samples (the file's from sample `first`) hold NaN or infinity: a
    float file that is corrupt. They reached the mel (and the job's AAC encoder, which refused them as
    "Invalid argument", a render fault naming the server's copy of the file)."""
    finite = np.isfinite(samples)
    if not finite.all():
        at = (first + int(np.argmin(finite))) / sample_rate
        raise InputUnreadable(f"audio {path} holds samples that are not numbers (NaN or infinite), "
                              f"the first at {at:.2f} s: the file is corrupt (export it again)", path=path)


def load_audio(path: str, settings: Settings | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of `path` (an audio file or a video's audio track) to
    float32 mono at `sample_rate` with ffmpeg, held whole in memory (64 KB a second: a job's
    prepare step streams instead, `decode_audio_to_file`).

    Raises `InputNotFound` for a missing file, `NoAudioStream` when the file has no audio stream,
    `InputUnreadable` when ffmpeg cannot decode it and `MediaError` when ffmpeg runs past
    `settings.ffmpeg_timeout_s` or cannot be started.
    """
    s = settings or get_settings()
    path = _existing(path)
    raw, stderr, rc = _run_collect(_decode_args(path, sample_rate), timeout_s=s.ffmpeg_timeout_s,
                                   what=f"decoding audio of {path!r}", settings=s)
    wav = raw.view(np.float32)
    _check_decoded(path, rc, stderr, wav.size, sample_rate)
    _check_finite(path, wav, 0, sample_rate)
    return wav


def decode_audio_to_file(path: str, out: BinaryIO, settings: Settings | None = None,
                         sample_rate: int = SAMPLE_RATE) -> int:
    """Decode like `load_audio`, but stream the float32 samples into the open binary file `out`
    block by block instead of holding them: memory stays a few hundred KB whatever the length
    (an hour of speech is 230 MB of samples). Returns the number of samples written; the same
    typed errors as `load_audio`; `InputTooLong` as soon as more than `max_input_seconds` have
    been decoded (a header can claim a second and hide hours: the admission probe reads the header)."""
    s = settings or get_settings()
    path = _existing(path)
    deadline = time.monotonic() + s.ffmpeg_timeout_s
    limit = int(s.max_input_seconds * sample_rate) + sample_rate  # a second of slack over the limit
    written = 0
    tail = b""  # bytes of a sample split across two reads

    def take(fd: int) -> int:
        nonlocal tail, written
        data = os.read(fd, _READ_BLOCK)
        if not data:
            return 0
        data = tail + data
        whole = len(data) - len(data) % 4
        _check_finite(path, np.frombuffer(data, np.float32, whole // 4), written, sample_rate)
        out.write(data[:whole])
        tail = data[whole:]
        written += whole // 4
        if written > limit:
            raise InputTooLong(f"audio {path!r} decodes to more than the limit of {s.max_input_seconds:g} s "
                               f"(its header said less)", path=path)
        return len(data)

    with FFmpeg(_decode_args(path, sample_rate), settings=s, stage="decode-audio", stdout=True,
                timeout_error=MediaError) as run:
        _pump_stdout(run, deadline, f"ffmpeg timed out after {s.ffmpeg_timeout_s:g} s decoding audio of {path!r}",
                     take)
        rc = run.wait(max(0.1, deadline - time.monotonic()))
        stderr = run.stderr_tail().encode()
    out.flush()  # readers read the file descriptor (SampleFile), not this buffer
    _check_decoded(path, rc, stderr, written, sample_rate)
    return written


def _existing(path: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFound(f"audio input {path!r} does not exist or is not a file", path=path)
    return path


class SampleFile:
    """Random access to `n_file` float32 samples stored raw in the open binary file `f` (as
    `decode_audio_to_file` writes them), seen as a signal of `length` samples: trimmed when
    shorter, padded with silence when longer. Each `read` reads only its own range (no mmap:
    a sweep over a mapped file would keep every page it touched in this process's memory)."""

    def __init__(self, f: BinaryIO, n_file: int, length: int | None = None, gain_db: float = 0.0,
                 dc: float = 0.0) -> None:
        self.f, self.n_file = f, int(n_file)
        self.length = self.n_file if length is None else int(length)
        self.gain = 10.0 ** (gain_db / 20.0)  # what `read` multiplies the samples by (`model_input_gain_db`)
        self.dc = float(dc)  # what `read` takes off the file's samples first (`dc_offset`)

    def __len__(self) -> int:
        return self.length

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Samples [lo, hi) of the signal, float32 (zeros past the end of the file)."""
        lo, hi = max(0, int(lo)), min(int(hi), self.length)
        out = np.zeros(max(hi - lo, 0), dtype=np.float32)
        stop = min(hi, self.n_file)
        if stop > lo:
            out[:stop - lo] = self._read_file(lo, stop)
            if self.dc:
                out[:stop - lo] -= np.float32(self.dc)
        if self.gain != 1.0:
            out *= np.float32(self.gain)
        return out

    def _read_file(self, lo: int, hi: int) -> np.ndarray:
        data = os.pread(self.f.fileno(), (hi - lo) * 4, lo * 4)
        if len(data) != (hi - lo) * 4:
            raise MediaError(f"decoded audio file ended at {lo + len(data) // 4} samples, expected {hi}")
        return np.frombuffer(data, dtype=np.float32)

    def blocks(self, block: int = 1 << 18):
        """(start, samples) over the whole signal, `block` samples at a time."""
        for a in range(0, self.length, block):
            yield a, self.read(a, min(a + block, self.length))


#: The level the model hears speech at (at least): the 98th percentile of 20 ms frames' RMS in dBFS, over the first
#: LEVEL_WINDOW_S of a job's audio. Speech at a usual level (TTS, a studio: -10 to -8 dBFS there) is left as it is;
#: a quiet recording (a phone's, a lavalier's: -30 to -40) is raised, by at most MAX_MODEL_GAIN_DB, for the model only
#: (the output's audio is the file as given). The built-in model's mouth opened a ninth as far at -20 dB.
MODEL_SPEECH_DBFS = -12.0
MAX_MODEL_GAIN_DB = 24.0
#: Speech louder than this (a float file beyond full scale, a 5.1 mix summed into one channel) is brought down to it
#: for the model (its mel columns saturated and the mouth never closed between syllables); continuous: two files a
#: hundredth of a dB apart are heard a hundredth of a dB apart
MODEL_LOUDEST_DBFS = -3.0
LEVEL_WINDOW_S = 30.0


def _frame_rms(samples: "SampleFile", seconds: float, sample_rate: int, of_file: bool = False) -> np.ndarray:
    """RMS of the 20 ms frames of the first `seconds` of `samples` (`of_file`: of the file's own samples only,
    not the silence a sync mode pads it with): bounded work, whatever the audio's length."""
    n_read = min(len(samples), samples.n_file if of_file else len(samples), int(seconds * sample_rate))
    head = samples.read(0, n_read).astype(np.float64)
    frame = sample_rate // 50
    n = len(head) // frame
    return np.sqrt((head[:n * frame].reshape(n, frame) ** 2).mean(axis=1))


def speech_level_dbfs(samples: "SampleFile", seconds: float = LEVEL_WINDOW_S, sample_rate: int = SAMPLE_RATE) -> float:
    """The level of the loud part of the first `seconds` of `samples` (98th percentile of 20 ms frames' RMS,
    dBFS; -inf for silence): bounded work, whatever the audio's length (a job's first chunk waits for it)."""
    rms = _frame_rms(samples, seconds, sample_rate)
    if len(rms) == 0:
        return float("-inf")
    loud = float(np.percentile(rms, 98))
    return 20.0 * np.log10(loud) if loud > 0 else float("-inf")


#: Frames quieter than this (dBFS) are digital silence (an edited file's zeroed lead-in), not a room
DIGITAL_SILENCE_DBFS = -100.0
#: A file's samples offset by more than this (their mean over the first LEVEL_WINDOW_S, in full scale: -50 dBFS) have
#: it taken off for the model (`dc_offset`)
DC_OFFSET_MIN = 10 ** (-50 / 20)


def dc_offset(samples: "SampleFile", seconds: float = LEVEL_WINDOW_S) -> float:
    """The constant offset of the file's own samples (their mean over the first `seconds`), where it exceeds
    `DC_OFFSET_MIN`; else 0. A recorder's DC offset read as speech and as the room alike (no gain for a quiet
    recording), and its step at the file's ends opened the mouth on silence."""
    n = min(len(samples), samples.n_file, int(seconds * SAMPLE_RATE))
    if n <= 0:
        return 0.0
    mean = float(np.mean(samples.read(0, n), dtype=np.float64))
    return mean if abs(mean) > DC_OFFSET_MIN else 0.0


def room_level_dbfs(samples: "SampleFile", seconds: float = LEVEL_WINDOW_S, sample_rate: int = SAMPLE_RATE) -> float:
    """The level of the room between the words of the first `seconds` of the file's own samples (10th percentile of
    its 20 ms frames' RMS, digital silence left out: zeros would say there is no room at all); -inf when it is all
    digital silence. `model_input_gain_db`'s floor."""
    rms = _frame_rms(samples, seconds, sample_rate, of_file=True)
    rms = rms[rms > 10 ** (DIGITAL_SILENCE_DBFS / 20)]
    if len(rms) == 0:
        return float("-inf")
    return 20.0 * float(np.log10(np.percentile(rms, 10)))


#: The loudest the room between words may reach the model at (dBFS): louder, the built-in model's mouth opens on it
#: (white noise: still at -55 dBFS, half open at -50, open from -45 as for speech); a quiet recording's gain stops
#: there. (The room is also taken out of the model's input, `denoise_mel`; the gain does not count on that: a room
#: that varies between the pauses, e.g. a phone's noise suppression, is measured lower than some of its pauses are.)
NOISE_CEILING_DBFS = -56.0


def model_input_gain_db(level_dbfs: float, floor_dbfs: float = float("-inf")) -> float:
    """How much louder the model hears speech whose level is `level_dbfs` (`speech_level_dbfs`): up to
    `MODEL_SPEECH_DBFS`, by at most `MAX_MODEL_GAIN_DB`; 0 for speech at or above it, and for silence. Never so
    much that the room between its words (`floor_dbfs`, its 10th percentile) reaches `NOISE_CEILING_DBFS`: a quiet
    recording with a noisy room (a phone's, 25 dB above its noise) raised in full moved the mouth in its pauses.
    Speech above `MODEL_LOUDEST_DBFS` is brought down to it (a negative gain)."""
    if not np.isfinite(level_dbfs):
        return 0.0
    if level_dbfs > MODEL_LOUDEST_DBFS:
        return float(MODEL_LOUDEST_DBFS - level_dbfs)
    gain = min(max(MODEL_SPEECH_DBFS - level_dbfs, 0.0), MAX_MODEL_GAIN_DB)
    if np.isfinite(floor_dbfs):
        gain = min(gain, max(NOISE_CEILING_DBFS - floor_dbfs, 0.0))
    return float(gain)


# --- the room under the speech, taken out of the model's input -------------------------------------------
# The built-in model opens the mouth on any sound in the speech band from about -50 dBFS: a room (a fan, a phone's
# or a laptop's own noise) that loud moved the mouth in every pause. Its spectrum is measured between the words and
# taken out of each mel column (spectral subtraction on the mel bands' magnitudes): a band within 1.5x the room's
# magnitude falls DENOISE_DEPTH_DB, a band of speech well above it stays. Measured on synthetic speech at -10 dBFS
# (built-in model, 2026-12-07, the output's mean difference from silence's): pauses 3.0-5.5 levels with a room of
# -50 to -35 dBFS (white or pink), 0.00 with it taken out; quiet speech 4.2-4.7 (4.8 without any room), loud speech
# 5.5 either way. Only a room loud enough to matter, and well under the speech, is taken out: a clean recording's
# model input is as it was, and so is a voice without pauses (a held vowel, singing: its quietest columns are the
# voice itself, which the subtraction would have taken for the room and cut by up to 4x).

#: Mel bands (by centre) whose magnitude the room's level is read in: the speech band the built-in model opens on
ROOM_BAND_HZ = (300.0, 3000.0)
#: The room is taken out from this speech-band level (dB of the mel bands' mean magnitude, `room_level_db`): white
#: noise at -60 dBFS reads -68.2 on average, -69.2 in its quietest columns as `room_spectrum` takes them (-63.3 on
#: average at -55 dBFS, where the built-in model's mouth still stays still)
DENOISE_FROM_DB = -70.0
#: ...where it lies at least this far under the speech's loud columns (their 98th percentile, the same band)
ROOM_UNDER_SPEECH_DB = 15.0
#: Spectral subtraction: each band loses this many times the room's magnitude...
DENOISE_OVERSUBTRACTION = 1.5
#: ...and keeps at least this much of its own (dB below it): no band falls to nothing
DENOISE_DEPTH_DB = 30.0
#: The room's columns: the quietest this percent of a stretch's columns (digital silence left out)
ROOM_PERCENTILE = 5.0


def mel_magnitude(norm: np.ndarray) -> np.ndarray:
    """The mel bands' magnitudes (float64) of normalised mel values: `_mel_blocks`' normalisation undone."""
    db = (np.asarray(norm, np.float64) + MAX_ABS_VALUE) * (-MIN_LEVEL_DB / (2 * MAX_ABS_VALUE)) + MIN_LEVEL_DB
    return 10.0 ** ((db + REF_LEVEL_DB) / 20.0)


def _normalised(magnitude: np.ndarray) -> np.ndarray:
    """Wav2Lip's normalised log-mel values (float32, [-4, 4]) of mel magnitudes (float64, overwritten)."""
    np.maximum(magnitude, 1e-5, out=magnitude)
    db = 20.0 * np.log10(magnitude) - REF_LEVEL_DB
    norm = (2 * MAX_ABS_VALUE) * ((db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB)) - MAX_ABS_VALUE
    return np.clip(norm, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _room_band() -> np.ndarray:
    centres = mel_band_edges()[1:-1]
    return (centres >= ROOM_BAND_HZ[0]) & (centres <= ROOM_BAND_HZ[1])


def _db(magnitude: float) -> float:
    return float(20.0 * np.log10(max(float(magnitude), 1e-12)))


def room_level_db(room: np.ndarray) -> float:
    """The speech-band level of a room's mel magnitudes (`room_spectrum`): dB of the bands' mean magnitude."""
    return _db(np.mean(np.asarray(room)[_room_band()]))


def _heard_columns(norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(the mel magnitudes of the columns of `norm` [80, T] that are not digital silence (the floor in every band),
    their speech-band levels (mean magnitude), which of them are the quietest `ROOM_PERCENTILE` percent); None
    where every column is silence. What `room_spectrum` and `mel_gain_db` read the room and the speech from."""
    heard = norm[:, (norm > -MAX_ABS_VALUE).any(axis=0)]
    if heard.shape[1] == 0:
        return None
    magnitude = mel_magnitude(heard)
    level = magnitude[_room_band()].mean(axis=0)
    return magnitude, level, level <= np.percentile(level, ROOM_PERCENTILE)


def room_spectrum(norm: np.ndarray) -> np.ndarray | None:
    """The room's mel magnitudes (float64 [80]) under the speech of the normalised mel columns `norm` [80, T]: the
    mean of its quietest `ROOM_PERCENTILE` percent of columns by speech-band level, digital silence (a column at the
    floor in every band) left out; None where there is none, where the room is too quiet to move the model's mouth
    (`DENOISE_FROM_DB`), or where it is not well under the loud columns (`ROOM_UNDER_SPEECH_DB`: no pause, so the
    quietest columns are the voice): such a recording's model input is left as it is."""
    norm = np.asarray(norm)
    if norm.ndim != 2 or norm.shape[0] != N_MELS:
        raise ValueError(f"mel must be [80, T], got shape {norm.shape}")
    heard = _heard_columns(norm)
    if heard is None:
        return None
    magnitude, level, quietest = heard
    room = magnitude[:, quietest].mean(axis=1)
    return room if DENOISE_FROM_DB <= room_level_db(room) <= _db(np.percentile(level, 98)) - ROOM_UNDER_SPEECH_DB \
        else None


def denoise_mel(norm: np.ndarray, room: np.ndarray | None) -> np.ndarray:
    """Normalised mel columns `norm` [80, T] with the room's magnitudes `room` (`room_spectrum`) taken out of each
    band: max(m - DENOISE_OVERSUBTRACTION * room, m * 10^(-DENOISE_DEPTH_DB / 20)); float32. Column by column, so
    any stretch of columns gives the columns of the whole. `room` None: `norm` as it is."""
    if room is None:
        return norm
    return _normalised(_without_room(mel_magnitude(norm), room))


def _without_room(magnitude: np.ndarray, room: np.ndarray) -> np.ndarray:
    """`denoise_mel`'s subtraction on mel magnitudes [80, T] (float64, overwritten; returned)."""
    kept = magnitude * 10.0 ** (-DENOISE_DEPTH_DB / 20.0)
    magnitude -= DENOISE_OVERSUBTRACTION * np.asarray(room, np.float64)[:, None]
    return np.maximum(magnitude, kept, out=magnitude)


# --- a live session's level, as the speech arrives ---------------------------------------------------------
#: `MODEL_SPEECH_DBFS` in the mel's speech band (the 98th percentile of columns' `room_level_db`-style level):
#: synthetic speech read 14.6-16.3 dB lower there than its 98th percentile of 20 ms frames' RMS
MODEL_SPEECH_BAND_DB = MODEL_SPEECH_DBFS - 15.0
#: `NOISE_CEILING_DBFS` in the same terms: white noise at -56 dBFS reads -65.6 in its quietest twentieth of columns
NOISE_CEILING_BAND_DB = -65.6
#: The mel's own floor in those terms (-80: a magnitude at the normalisation's clip, -4)
MEL_FLOOR_DB = REF_LEVEL_DB + MIN_LEVEL_DB


def mel_gain_db(norm: np.ndarray) -> float:
    """`model_input_gain_db` for speech known by its normalised mel columns `norm` [80, T] only (a live session's
    last seconds): how much louder the model hears it, up to `MODEL_SPEECH_BAND_DB` for its loud columns (98th
    percentile), by at most `MAX_MODEL_GAIN_DB`, never bringing its quietest twentieth past
    `NOISE_CEILING_BAND_DB`; 0 for speech at a usual level, and for silence."""
    heard = _heard_columns(norm)
    if heard is None:
        return 0.0
    _, level, quietest = heard
    quiet = _db(level[quietest].mean())
    gain = min(max(MODEL_SPEECH_BAND_DB - _db(np.percentile(level, 98)), 0.0), MAX_MODEL_GAIN_DB)
    if quiet > MEL_FLOOR_DB + 0.5:  # a room the mel can tell (one at its floor is none it could raise: `raised_mel`)
        gain = min(gain, max(NOISE_CEILING_BAND_DB - quiet, 0.0))
    return float(gain)


def raised_mel(norm: np.ndarray, gain_db: float) -> np.ndarray:
    """Normalised mel columns as they are `gain_db` louder (0.08 per dB), digital silence (the floor) left as it
    is: what a gain on the samples gives (`SampleFile`), but for the clip at the floor; float32."""
    if not gain_db:
        return norm
    lifted = np.minimum(norm + np.float32(2 * MAX_ABS_VALUE / -MIN_LEVEL_DB * gain_db), MAX_ABS_VALUE)
    return np.where(norm > -MAX_ABS_VALUE, lifted, norm).astype(np.float32)


def file_room_spectrum(samples: "SampleFile", seconds: float = LEVEL_WINDOW_S) -> np.ndarray | None:
    """`room_spectrum` of the first `seconds` of the file's own samples (as `samples.read` gives them: with its gain),
    not the silence a sync mode pads it with: bounded work, whatever the audio's length."""
    n = min(len(samples), samples.n_file, int(seconds * SAMPLE_RATE))
    return room_spectrum(melspectrogram(samples.read(0, n))) if n > 0 else None


def _pump_stdout(run, deadline: float, timeout_message: str, take: Callable[[int], int]) -> None:
    """Call `take(fd)` each time the ffmpeg run's stdout is readable, until it reads 0 bytes (end
    of file); at `deadline` ffmpeg is killed and `MediaError(timeout_message)` raised."""
    with selectors.DefaultSelector() as sel:
        sel.register(run.proc.stdout, selectors.EVENT_READ)
        fd = run.proc.stdout.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                run.kill()
                raise MediaError(timeout_message, cause=run.stderr_tail())
            for _key, _ in sel.select(timeout=min(remaining, 1.0)):
                if take(fd) == 0:
                    return


def _run_collect(args: list[str], *, timeout_s: float, what: str,
                 settings: Settings | None = None) -> tuple[np.ndarray, bytes, int]:
    """Run ffmpeg with `args` through the one runner, collect its stdout into a growing uint8
    buffer (read in blocks, no intermediate copies); killed and reaped on the deadline or any
    error (`MediaError` "timed out").

    Returns (stdout bytes truncated to whole float32 samples, stderr tail, return code).
    """
    deadline = time.monotonic() + timeout_s
    buf = np.empty(1 << 20, dtype=np.uint8)
    n = 0
    def take(fd: int) -> int:
        nonlocal buf, n
        if buf.size - n < _READ_BLOCK:
            grown = np.empty(max(2 * buf.size, n + _READ_BLOCK), dtype=np.uint8)
            grown[:n] = buf[:n]
            buf = grown
        got = os.readv(fd, [memoryview(buf)[n:]])
        n += got
        return got

    with FFmpeg(args, settings=settings, stage="decode-audio", stdout=True,
                timeout_error=MediaError) as run:
        _pump_stdout(run, deadline, f"ffmpeg timed out after {timeout_s:g} s {what}", take)
        rc = run.wait(max(0.1, deadline - time.monotonic()))
        stderr = run.stderr_tail().encode()
    n -= n % 4
    out = buf[:n] if buf.size <= n + n // 4 + _READ_BLOCK else buf[:n].copy()
    return out, stderr, rc


def audio_duration(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Duration in seconds of a mono signal."""
    return len(wav) / float(sample_rate)


# --- mel spectrogram -------------------------------------------------------------------------
# Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's htk=False).
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP,
                    f / _F_SP)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


@functools.lru_cache(maxsize=4)
def mel_band_edges(n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """The n_mels + 2 band edges (Hz) of the Slaney mel filterbank; bin k is centred on edge k+1."""
    return _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """Slaney-style (area-normalised, non-HTK) triangular mel filters, float32 [n_mels, 1+n_fft/2];
    the same matrix as `librosa.filters.mel(..., htk=False, norm='slaney')`. Read-only."""
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_f = mel_band_edges(n_mels, fmin, fmax)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    out = weights.astype(np.float32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=2)
def _hann(n: int) -> np.ndarray:
    """Periodic Hann window (scipy.signal.get_window('hann', n, fftbins=True))."""
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    w.setflags(write=False)
    return w


def mel_frame_count(n_samples: int) -> int:
    """Columns of the mel spectrogram of `n_samples` samples (centred STFT)."""
    return 1 + n_samples // HOP


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's normalised log-mel spectrogram of a 16 kHz mono signal: float32 [80, 1 + len/200].

    Computed in blocks of frames: memory beyond the input and the output stays a few MB whatever
    the length of the audio.
    """
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"melspectrogram expects a mono 1-D signal, got shape {wav.shape}")
    out = np.empty((N_MELS, mel_frame_count(wav.shape[0])), dtype=np.float32)
    for f0, f1, block in _mel_blocks(lambda lo, hi: wav[lo:hi], wav.shape[0]):
        out[:, f0:f1] = block
    return out


def write_melspectrogram(read: Callable[[int, int], np.ndarray], n_samples: int, path: str | os.PathLike,
                         columns: int | None = None, room: np.ndarray | None = None) -> int:
    """`melspectrogram` of the `n_samples`-sample signal that `read(lo, hi)` returns samples of,
    written to `path` as a .npy file (float32 [80, T], the same bytes as `np.save` of the whole
    spectrogram) block by block: memory stays a few MB whatever the length. Atomic (a temporary
    renamed into place once complete and synced). Returns T.

    `columns`: only the first columns, at least that many (whole blocks of the computation, so
    each column is bit for bit the one the whole spectrogram has; all of them when fewer): reads
    only the samples they cover. A job's first chunk renders from these (`mel_head_columns`).
    `room`: a room's mel magnitudes taken out of every column (`denoise_mel`)."""
    from cluster.fsutil import publish

    path = Path(path)
    n_frames = mel_frame_count(int(n_samples)) if columns is None else mel_head_columns(columns, int(n_samples))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # the header for the final shape; the file is sized (sparse) and filled by pwrite, never mapped
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(N_MELS, n_frames))
        offset = header.offset
        del header
        with open(tmp, "r+b") as f:
            fd = f.fileno()
            for f0, _f1, block in _mel_blocks(read, int(n_samples), n_frames, room):
                for row in range(N_MELS):
                    os.pwrite(fd, block[row].tobytes(), offset + (row * n_frames + f0) * 4)
            os.fsync(fd)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n_frames


def _mel_blocks(read: Callable[[int, int], np.ndarray], n: int, stop: int | None = None,
                room: np.ndarray | None = None):
    """(f0, f1, float32 [80, f1-f0]) over the mel frames of an `n`-sample signal (the first `stop`
    of them), `read(lo, hi)` giving its samples [lo, hi) (each block reads only the samples its
    frames cover); with `room`, that room taken out (`denoise_mel`)."""
    n_frames = mel_frame_count(n) if stop is None else min(stop, mel_frame_count(n))
    basis = mel_filterbank()
    window = _hann(WIN)
    pad = N_FFT // 2
    for f0 in range(0, n_frames, _STFT_BLOCK_FRAMES):
        f1 = min(n_frames, f0 + _STFT_BLOCK_FRAMES)
        # samples [a, b) of the zero-padded, pre-emphasised signal cover frames [f0, f1)
        a = f0 * HOP
        b = (f1 - 1) * HOP + N_FFT
        seg = _preemphasized_padded(read, n, a, b, pad)
        frames = np.lib.stride_tricks.sliding_window_view(seg, N_FFT)[::HOP]
        spec = np.abs(np.fft.rfft(frames * window, axis=1))  # [frames, 401]
        magnitude = basis @ spec.T  # [80, frames]
        # (the room taken out before the log: `denoise_mel` on the normalised values costs two more conversions)
        yield f0, f1, _normalised(magnitude if room is None else _without_room(magnitude, room))


def _preemphasized_padded(read: Callable[[int, int], np.ndarray], n: int, a: int, b: int, pad: int) -> np.ndarray:
    """Samples [a, b) of `concat(zeros(pad), lfilter([1, -0.97], [1], wav), zeros(pad))`, float64,
    for the `n`-sample signal `wav` that `read(lo, hi)` returns slices of."""
    seg = np.zeros(b - a, dtype=np.float64)
    lo, hi = max(a - pad, 0), min(b - pad, n)  # range of wav indices inside the block
    if hi > lo:
        x = np.asarray(read(lo, hi), dtype=np.float64)
        y = x.copy()
        y[1:] -= PREEMPHASIS * x[:-1]
        if lo > 0:
            y[0] -= PREEMPHASIS * float(read(lo - 1, lo)[0])
        seg[lo + pad - a: hi + pad - a] = y
    return seg


# --- per-frame windows and energy -----------------------------------------------------------
def mel_window_starts(fps: Fraction, start: int, stop: int) -> np.ndarray:
    """First mel column of the window of each output frame in [start, stop): int64
    `floor(i * 80 / fps)` in exact integer arithmetic."""
    fps = Fraction(fps)
    i = np.arange(start, stop, dtype=np.int64)
    return (i * (MEL_COLUMNS_PER_SECOND * fps.denominator)) // fps.numerator


def mel_head_columns(columns: int, n_samples: int) -> int:
    """Columns `write_melspectrogram(..., columns=columns)` writes for an `n_samples`-sample signal."""
    return min(mel_frame_count(n_samples), -(-max(int(columns), 1) // _STFT_BLOCK_FRAMES) * _STFT_BLOCK_FRAMES)


def mel_columns_needed(fps: Fraction, stop: int) -> int:
    """Mel columns the windows of output frames [0, stop) read (before clamping at the end)."""
    return int(mel_window_starts(fps, stop - 1, stop)[0]) + MEL_STEP if stop > 0 else 0


def mel_windows(mel: np.ndarray, fps: Fraction, start: int, stop: int) -> np.ndarray:
    """The model's mel input for output frames [start, stop): float32 [stop-start, 1, 80, 16].

    Frame `i` takes columns `floor(i*80/fps)` to `+16`; past the end of the spectrogram the last
    column is repeated.
    """
    if mel.ndim != 2 or mel.shape[0] != N_MELS or mel.shape[1] < 1:
        raise ValueError(f"mel must be [80, T>=1], got shape {mel.shape}")
    if not 0 <= start <= stop:
        raise ValueError(f"bad frame range [{start}, {stop})")
    cols = mel_window_starts(fps, start, stop)[:, None] + np.arange(MEL_STEP, dtype=np.int64)[None, :]
    np.minimum(cols, mel.shape[1] - 1, out=cols)
    win = mel[:, cols]  # [80, n, 16]
    return np.ascontiguousarray(win.transpose(1, 0, 2)[:, None], dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _speech_band_sos(sample_rate: int) -> np.ndarray:
    from scipy import signal  # here: scipy.signal takes 0.45 s to import, and only measurements use it

    high = min(3400.0, 0.45 * sample_rate)
    return signal.butter(4, [300.0, high], btype="bandpass", fs=sample_rate, output="sos")


def frame_energy(wav: np.ndarray, fps: Fraction, n_frames: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """RMS of the speech band (300-3400 Hz, 4th-order Butterworth) over each output frame's own time
    span [i/fps, (i+1)/fps): float32 [n_frames]; 0 for frames past the end of the audio."""
    fps = Fraction(fps)
    wav = np.asarray(wav)
    from scipy.signal import sosfilt

    sos = _speech_band_sos(sample_rate)
    zi = np.zeros((sos.shape[0], 2), dtype=np.float64)
    i = np.arange(n_frames + 1, dtype=np.int64)
    bounds = np.minimum((i * (sample_rate * fps.denominator)) // fps.numerator, wav.shape[0])
    out = np.zeros(n_frames, dtype=np.float32)
    block = 512  # frames per filtering block
    for f0 in range(0, n_frames, block):
        f1 = min(n_frames, f0 + block)
        a, b = int(bounds[f0]), int(bounds[f1])
        if b <= a:
            break
        y, zi = sosfilt(sos, wav[a:b].astype(np.float64), zi=zi)
        csum = np.concatenate(([0.0], np.cumsum(y * y)))
        lo, hi = bounds[f0:f1] - a, bounds[f0 + 1:f1 + 1] - a
        counts = hi - lo
        power = np.where(counts > 0, (csum[hi] - csum[lo]) / np.maximum(counts, 1), 0.0)
        out[f0:f1] = np.sqrt(np.maximum(power, 0.0))
    return out
