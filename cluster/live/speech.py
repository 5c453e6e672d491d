"""Streaming speech features: resampling to 16 kHz and mel columns of the audio received so far.

The batch path decodes a whole file, computes `cluster.audio.melspectrogram` of it and gives
output frame `i` the window `mel_windows(mel, fps, i, i+1)`. A live utterance computes the same
columns as the audio arrives: column `j` (centred on sample `200 j`, 50 ms wide, pre-emphasised)
is final once samples up to `200 j + 400` are in, and at the end of the utterance the remaining
columns are computed with the same zero padding as the batch path. A speech frame is ready when
the columns the model reads are final (`model_columns`: 6 for the built-in model, 16 for
Wav2Lip-class models), so the lookahead is what the model's window needs and no more.
"""
from __future__ import annotations

import math
import threading
from fractions import Fraction

import numpy as np

from cluster.audio import (
    HOP,
    MEL_COLUMNS_PER_SECOND,
    MEL_STEP,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    denoise_mel,
    mel_frame_count,
    mel_gain_db,
    mel_window_starts,
    melspectrogram,
    raised_mel,
    room_spectrum,
)
from cluster.plan import frame_count_from_samples

#: PCM rates a session accepts (s16le mono).
SESSION_RATES = (16000, 24000, 48000)
#: The mel value of silence (dB-normalised floor): idle frames' windows.
SILENT_MEL = -4.0


def model_columns(model: str) -> int:
    """Mel columns of its window the model reads: the built-in model only its first
    `READ_COLUMNS` (the frame's own sound, and the next ~40 ms for a closure), others all 16."""
    from cluster.schemas import is_builtin_model

    if is_builtin_model(model):
        from cluster.models.builtin import READ_COLUMNS

        return READ_COLUMNS
    return MEL_STEP


def pcm_to_float(pcm: bytes | memoryview) -> np.ndarray:
    """s16le mono -> float32 in [-1, 1) (s / 32768, as ffmpeg converts s16 to float)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(32768.0)


class StreamResampler:
    """Resamples a stream to 16 kHz (or `target`) with `scipy.signal.resample_poly`'s filter, emitting each
    output sample once the input samples its filter reads have arrived: the concatenated output
    equals `resample_poly(whole input, up, down)` (to float rounding of float32)."""

    def __init__(self, rate: int, target: int = SAMPLE_RATE) -> None:
        if rate not in SESSION_RATES:
            raise ValueError(f"sample rate {rate} is not offered (16000, 24000 or 48000)")
        g = math.gcd(target, rate)
        self.up, self.down = target // g, rate // g
        self.half = 10 * max(self.up, self.down)  # resample_poly's default filter half-length (upsampled rate)
        self._x = np.zeros(0, np.float32)  # input samples kept (from index self._x0)
        self._x0 = 0
        self._emitted = 0  # output samples emitted so far

    def _emit(self, final: bool) -> np.ndarray:
        from scipy.signal import resample_poly

        n_in = self._x0 + len(self._x)
        total_out = -(-n_in * self.up // self.down)
        if final:
            last = total_out
        else:  # output m reads inputs up to (m*down + half)/up
            last = max(0, min(total_out, (n_in * self.up - self.half - 1) // self.down))
        if last <= self._emitted:
            return np.zeros(0, np.float32)
        # start at an input index that is a multiple of `down` (output grid aligned) far enough back
        reach = self.half // self.up + 2
        a = max(0, (self._emitted * self.down // self.up) - reach)
        a -= a % self.down
        a = max(a, self._x0)
        assert a % self.down == 0 or a == 0
        y = resample_poly(self._x[a - self._x0:].astype(np.float64), self.up, self.down)
        off = a * self.up // self.down
        out = y[self._emitted - off: last - off].astype(np.float32)
        if not final and len(out) != last - self._emitted:  # the segment's right edge: never happens
            raise AssertionError("resampler segment too short")
        self._emitted += len(out)
        # keep only what the next outputs can read
        keep_from = max(self._x0, (self._emitted * self.down // self.up) - reach - self.down)
        keep_from -= keep_from % self.down
        if keep_from > self._x0:
            self._x = self._x[keep_from - self._x0:]
            self._x0 = keep_from
        return out

    def push(self, samples: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return samples.astype(np.float32, copy=False)
        self._x = np.concatenate([self._x, samples.astype(np.float32, copy=False)])
        return self._emit(final=False)

    def flush(self) -> np.ndarray:
        if self.up == self.down:
            return np.zeros(0, np.float32)
        return self._emit(final=True)


def _grown(buf: np.ndarray, used: int, need: int, axis: int = 0) -> np.ndarray:
    """`buf` with room for `need` entries along `axis` (doubling), its first `used` kept."""
    if need <= buf.shape[axis]:
        return buf
    shape = list(buf.shape)
    shape[axis] = max(need, 2 * buf.shape[axis])
    grown = np.zeros(shape, buf.dtype)
    index = (slice(None),) * axis + (slice(0, used),)
    grown[index] = buf[index]
    return grown


def _drop_head(buf: np.ndarray, base: int, keep_from: int, end: int, axis: int = 0,
               release: bool = False) -> tuple[np.ndarray, int]:
    """(`buf`, `base`) without its entries before absolute index `keep_from` (`buf` holds [base,
    end)), compacted only once the dead head is as long as what is kept and at least
    `TRIM_MIN_ENTRIES` (amortised: each entry is copied a bounded number of times); `release`
    lets go of a wholly dead buffer whatever its size."""
    dead, live = keep_from - base, end - keep_from
    if dead <= 0 or not (release and live <= 0 or dead >= max(live, TRIM_MIN_ENTRIES)):
        return buf, base
    shape = list(buf.shape)
    shape[axis] = max(live, 0) if release and live <= 0 else max(2 * live, TRIM_MIN_ENTRIES)
    kept = np.zeros(shape, buf.dtype)
    if live > 0:
        src = (slice(None),) * axis + (slice(dead, dead + live),)
        dst = (slice(None),) * axis + (slice(0, live),)
        kept[dst] = buf[src]
    return kept, keep_from


#: A buffer's dead head is let go once it is at least this many entries (and as long as the rest)
TRIM_MIN_ENTRIES = 1 << 16


#: A live session's gain is measured from this much speech on (`ModelInputTracker`)
GAIN_AFTER_S = 3.0


class ModelInputTracker:
    """What a live session's model hears, measured as the speech arrives (the batch path measures a file's first
    30 s once: `cluster.audio.file_room_spectrum`, `model_input_gain_db`): over the last `window_s` of mel columns
    received, every utterance's, measured again after each `every_s`, the room under the speech (`room_spectrum`,
    taken out with `denoise_mel` where `denoise`) and the gain a quiet speaker needs (`mel_gain_db`: a speaker at
    -35 dBFS barely moved the mouth; `raised_mel`). Each column is taken with what was measured before its
    stretch of `every_s`, so the columns do not depend on how the stream was cut into appends (a restarted
    session's replay gives the same). The session's first `every_s` is heard as it is, and raised from its
    `GAIN_AFTER_S` on."""

    def __init__(self, denoise: bool = True, window_s: float = 10.0, every_s: float = 1.0) -> None:
        self.denoise = denoise
        self.every = max(1, round(every_s * MEL_COLUMNS_PER_SECOND))
        self.window = max(self.every, round(window_s * MEL_COLUMNS_PER_SECOND))
        self._recent = np.full((N_MELS, self.window), -4.0, np.float32)  # a ring of the last columns, as received
        self.seen = 0  # columns received
        self.room: np.ndarray | None = None
        self.gain_db = 0.0
        self.gain_after = round(GAIN_AFTER_S * MEL_COLUMNS_PER_SECOND)

    def take(self, norm: np.ndarray) -> np.ndarray:
        """The next columns of the session (`[80, n]`, normalised), as the model hears them."""
        out = np.empty_like(norm)
        i, n = 0, norm.shape[1]
        while i < n:
            k = min(n - i, self.every - self.seen % self.every)
            out[:, i:i + k] = raised_mel(denoise_mel(norm[:, i:i + k], self.room), self.gain_db)
            at = (self.seen + np.arange(k)) % self.window
            self._recent[:, at] = norm[:, i:i + k]
            self.seen += k
            i += k
            if self.seen % self.every == 0:
                recent = self._recent[:, :min(self.seen, self.window)]
                self.room = room_spectrum(recent) if self.denoise else None
                # (from GAIN_AFTER_S of speech on: a first second's loudest columns were a usual speaker's quiet
                # syllables, raised 6 dB; gains under a dB are none, not a flicker of tenths)
                gain = mel_gain_db(recent) if self.seen >= self.gain_after else 0.0
                self.gain_db = gain if gain >= 1.0 else 0.0
        return out


class Utterance:
    """One stretch of speech (until `end`): its 16 kHz samples and the mel columns that are final.

    Memory does not grow with the session's length: what no frame can read again (PCM already in
    the output, samples behind the final mel columns, mel columns before the first frame that can
    still be planned) is let go as the speech goes out (`trim`); each buffer is indexed from a
    base (`_p0`, `_s0`, `_c0`: the absolute index of its first entry).

    Not thread-safe by itself; `cluster.live.session` holds a lock around it."""

    def __init__(self, fps: Fraction, columns_needed: int, index: int = 0,
                 room: ModelInputTracker | None = None) -> None:
        self.fps = Fraction(fps)
        self.columns_needed = int(columns_needed)
        self.index = index
        self.room = room  # what the session's model hears (`ModelInputTracker`; None: the speech as it is)
        self.samples = np.zeros(1 << 16, np.float32)
        self._s0 = 0
        self.n = 0  # 16 kHz samples received
        self.ended = False
        self.mel = np.zeros((N_MELS, 256), np.float32)
        self._c0 = 0
        self.columns = 0  # final mel columns computed
        self.scheduled = 0  # speech frames handed to the renderer (see schedule.py)
        self.starved = False  # its speech ran out before its end, and has not spoken since (schedule.py)
        # ...and waits for enough of it to speak again. A new one waits so too (schedule.py): started on its first
        # ready frame, a real-time sender's next frames were not there yet, and it spoke 1-3 frames, fell silent
        # for the rebuffer and spoke again: a stutter, heard and seen, at each start (the web page's Speak again)
        self.rebuffering = True
        self.committed = 0  # speech frames whose audio went out: never planned again (rollback stops there)
        self.silent_before = False  # the last speech frame planned was a pause's (schedule.py's catch-up)
        self.pcm = np.zeros(1 << 16, np.int16)  # the PCM as received, at the session's rate
        self._p0 = 0
        self.pcm_n = 0
        self.pcm_taken = 0  # PCM samples already put into the output's audio

    def append_pcm(self, ints: np.ndarray) -> None:
        used, need = self.pcm_n - self._p0, self.pcm_n - self._p0 + len(ints)
        self.pcm = _grown(self.pcm, used, need)
        self.pcm[used:need] = ints
        self.pcm_n += len(ints)

    def take_pcm(self, n: int) -> np.ndarray:
        """The next `n` samples of received PCM for the output (zeros past what was received);
        once all speech frames are out, what is left over (under a frame) is dropped."""
        a = self.pcm_taken
        b = min(self.pcm_n, a + n)
        b = max(a, b)
        out = np.zeros(n, np.int16)
        out[:b - a] = self.pcm[a - self._p0:b - self._p0]
        self.pcm_taken = a + n
        return out

    def trim(self) -> None:
        """Let go of what no frame can read again (see the class); an ended utterance whose speech
        is all out lets go of everything."""
        done = self.ended and self.committed >= (self.total_frames() or 0) and self.pcm_taken >= self.pcm_n
        self.pcm, self._p0 = _drop_head(self.pcm, self._p0, min(self.pcm_taken, self.pcm_n), self.pcm_n,
                                        release=done)
        # the next mel columns read samples from 3 columns before them (see _update_columns)
        keep = self.n if self.ended else min(self.n, max(0, (self.columns - 3) * HOP))
        self.samples, self._s0 = _drop_head(self.samples, self._s0, keep, self.n, release=done)
        first = self.columns if done else int(mel_window_starts(self.fps, self.committed, self.committed + 1)[0])
        self.mel, self._c0 = _drop_head(self.mel, self._c0, min(self.columns, max(0, first)), self.columns, axis=1,
                                        release=done)

    # --- audio in -------------------------------------------------------------------------
    def append(self, wav16: np.ndarray) -> None:
        if self.ended:
            raise ValueError("utterance already ended")
        used, need = self.n - self._s0, self.n - self._s0 + len(wav16)
        self.samples = _grown(self.samples, used, need)
        self.samples[used:need] = wav16
        self.n += len(wav16)
        self._update_columns()
        self.trim()

    def end(self) -> None:
        self.ended = True
        self._update_columns()

    # --- features ---------------------------------------------------------------------------
    def final_columns(self) -> int:
        """Mel columns that can no longer change: all of them once ended, else those whose
        50 ms frame (plus the sample pre-emphasis reads before it) has arrived."""
        if self.ended:
            return mel_frame_count(self.n)
        return max(0, (self.n - N_FFT // 2) // HOP + 1)

    def _update_columns(self) -> None:
        c0, c1 = self.columns, self.final_columns()
        if c1 <= c0:
            return
        # a slice starting 3 columns before c0 reproduces columns >= c0 exactly (the first of
        # them reads samples from 200*c0 - 400, pre-emphasis one more); from 0: the same padding
        s0 = max(0, (c0 - 3) * HOP)
        s1 = self.n if self.ended else min(self.n, (c1 - 1) * HOP + N_FFT // 2)
        part = melspectrogram(self.samples[s0 - self._s0:s1 - self._s0])
        off = s0 // HOP
        self.mel = _grown(self.mel, c0 - self._c0, c1 - self._c0, axis=1)
        part = part[:, c0 - off:c1 - off]
        self.mel[:, c0 - self._c0:c1 - self._c0] = part if self.room is None else self.room.take(part)
        self.columns = c1

    # --- frames ---------------------------------------------------------------------------------
    def total_frames(self) -> int | None:
        """Speech frames of the whole utterance once it has ended (the batch path's count)."""
        if not self.ended:
            return None
        return frame_count_from_samples(self.n, SAMPLE_RATE, self.fps) if self.n else 0

    def ready_frames(self) -> int:
        """Speech frames whose model input is final."""
        total = self.total_frames()
        if total is not None:
            return total
        if self.columns == 0:
            return 0
        # frame k is ready when floor(k*80/fps) + columns_needed - 1 < self.columns
        last_start = self.columns - self.columns_needed  # the largest window start allowed
        if last_start < 0:
            return 0
        fps = self.fps
        # largest k with floor(k*80*den/num) <= last_start  <=>  k*80*den < (last_start+1)*num
        k = ((last_start + 1) * fps.numerator - 1) // (80 * fps.denominator)
        return int(k) + 1

    def windows(self, start: int, stop: int) -> np.ndarray:
        """The model input of speech frames [start, stop): float32 [n, 1, 80, 16]; columns past
        the final ones repeat the last final column (the batch path's rule at the end; before the
        end only columns the model does not read are affected)."""
        if stop > self.ready_frames():
            raise ValueError(f"speech frames up to {stop} requested, {self.ready_frames()} ready")
        mel = self.mel[:, :self.columns - self._c0]
        cols = mel_window_starts(self.fps, start, stop)[:, None] + np.arange(MEL_STEP, dtype=np.int64)[None, :]
        cols -= self._c0
        if cols.size and cols.min() < 0:
            raise ValueError(f"speech frames from {start} requested; frames before {self.committed} went out and "
                             f"their mel is let go")
        np.minimum(cols, mel.shape[1] - 1, out=cols)
        return np.ascontiguousarray(mel[:, cols].transpose(1, 0, 2)[:, None], dtype=np.float32)

    def frame_of_sample(self, sample16: int) -> int:
        """The speech frame whose display interval holds 16 kHz sample `sample16`."""
        return int(sample16 * self.fps.numerator // (SAMPLE_RATE * self.fps.denominator))


class SpeechInput:
    """What a session received: PCM at the declared rate, cut into utterances, with the byte
    offset of the stream (for idempotent appends and resumed sockets)."""

    def __init__(self, rate: int, fps: Fraction, columns_needed: int, denoise: bool = False,
                 conditioned: bool = False) -> None:
        if rate not in SESSION_RATES:
            raise ValueError(f"sample rate {rate} is not offered (16000, 24000 or 48000)")
        self.rate = rate
        self.fps = Fraction(fps)
        self.columns_needed = columns_needed
        # the room taken out (`Settings.denoise_model_input`) and a quiet speaker raised: a session's, not a test's
        self.room = ModelInputTracker(denoise) if conditioned or denoise else None
        self.lock = threading.RLock()
        self.bytes_received = 0
        self.utterances: list[Utterance] = []
        self._resampler = StreamResampler(rate)

    def current(self) -> Utterance:
        if not self.utterances or self.utterances[-1].ended:
            self.utterances.append(Utterance(self.fps, self.columns_needed, len(self.utterances), self.room))
            self._resampler = StreamResampler(self.rate)
        return self.utterances[-1]

    def append(self, pcm: bytes) -> tuple[int, int]:
        """Add PCM (whole samples); (utterance index, its 16 kHz samples after this chunk)."""
        if len(pcm) % 2:
            raise ValueError(f"PCM s16le needs an even byte count, got {len(pcm)}")
        with self.lock:
            utt = self.current()
            ints = np.frombuffer(pcm, dtype="<i2")
            utt.append_pcm(ints)
            utt.append(self._resampler.push(ints.astype(np.float32) / np.float32(32768.0)))
            self.bytes_received += len(pcm)
            # the 16 kHz sample this chunk's last sample becomes, once resampled
            return utt.index, -(-utt.pcm_n * SAMPLE_RATE // self.rate)

    def end(self) -> bool:
        """End the current utterance (its tail renders with the batch path's end padding);
        False when there was none open."""
        with self.lock:
            if not self.utterances or self.utterances[-1].ended:
                return False
            utt = self.utterances[-1]
            utt.append(self._resampler.flush())
            utt.end()
            return True
