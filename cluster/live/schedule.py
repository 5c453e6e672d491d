"""The live frame scheduler: what each output frame of a session shows.

Per output frame: the next speech frame when one is ready (its model input final), else an idle
frame (the template frame with the model's silent mouth: a window of silence). When an utterance's
speech runs out before its end (an underrun: the sender fell behind real time), it speaks again once
`rebuffer_frames` of it are ready, or its end has come: a sender a little slower than real time gives
stretches of speech with a few pauses, not 1-3 frame fragments between idle frames. The template's
ping-pong phase advances with every output frame, speech or idle, so output frame `f` always
shows template frame `template_indices(f)`: a session that starts speaking on its first frame
shows the same template frames, with the same mel windows, as a batch job of that speech.

A planned batch is either committed (its audio is taken from the speech as received; silence for
idle frames) or rolled back (the model did not answer: the frames go out without the model and
their speech is planned again on the next frames, so none is lost).

Catching up: a rolled-back batch delays the speech after it by the frames it took, and a takeover
by its stand-still (`add_debt`); nothing else would win that time back while the speech keeps
coming (a microphone sends its pauses too), so the latency stayed that much higher for the rest of
the session. With `catch_up`, the scheduler owes those frames (`debt`, never more than the speech
waiting to be rendered) and pays them back from the pauses of that waiting speech: a frame is
skipped (not rendered; its audio left out) when it, the frame before it and the two after it are
all at most `silence_dbfs`, so a pause keeps its first frame and its last two and speech is never
cut. A sender's own pace is never caught up: a file sent faster than real time waits its turn
with its pauses whole.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from cluster.audio import MEL_STEP, N_MELS
from cluster.live.speech import SILENT_MEL, SpeechInput
from cluster.plan import template_indices


@dataclass
class FrameBatch:
    first: int  # output frame index of the batch's first frame
    template_index: np.ndarray  # [n] template frame of each output frame
    mel: np.ndarray  # [n, 1, 80, 16] the model's input
    speech: list[tuple[int, int] | None] = field(default_factory=list)  # (utterance, speech frame) or idle
    underruns: int = 0  # utterances that spoke again in this batch after their speech ran out
    # speech frames of a pause skipped to catch up: (offset of the slot they come before, utterance, frame)
    skipped: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.template_index)

    @property
    def speech_frames(self) -> int:
        return sum(1 for s in self.speech if s is not None)


class LiveScheduler:
    def __init__(self, speech: SpeechInput, template_frames: int, fps: Fraction, loop: str = "pingpong",
                 rebuffer_frames: int = 0, catch_up: bool = False, silence_dbfs: float = -45.0) -> None:
        self.speech = speech
        self.rebuffer_frames = int(rebuffer_frames)
        self.catch_up = bool(catch_up)
        # a speech frame's mean square (int16 PCM) at or below this is a pause's
        self._silent_power = (32768.0 * 10.0 ** (float(silence_dbfs) / 20.0)) ** 2
        self.debt = 0  # frames the service delayed the waiting speech by (see the module)
        self._debt_held_until = 0.0  # (monotonic) a takeover's debt is not cut to the waiting speech before then
        self.skipped_frames = 0  # speech frames of pauses skipped to catch up (committed)
        self.underruns = 0  # an utterance's speech ran out before its end (each one a pause in the speech)
        self.template_frames = int(template_frames)
        self.fps = Fraction(fps)
        self.loop = loop
        self.next_frame = 0  # the next output frame to plan
        self._utt = 0  # the utterance speech frames come from
        self.speech_frames_done = 0
        # committed speech frames not yet known published: (output frame, utterance, speech frame,
        # its utterance's PCM samples taken after it, speech frames done after it)
        self.marks: collections.deque = collections.deque()
        self.resume_mark: list | None = None  # the last speech frame published (see `published`)

    def audio_span(self, frame: int) -> int:
        """Samples (at the session's rate) of output frame `frame`'s display interval."""
        a, b = self._frame_span(frame)
        return b - a

    def pending_speech_frames(self) -> int:
        """Speech frames received (ready or waiting for lookahead) and not yet planned."""
        with self.speech.lock:
            n = 0
            for u in self.speech.utterances[self._utt:]:
                total = u.total_frames()
                have = total if total is not None else u.frame_of_sample(u.n)
                n += max(0, have - u.scheduled)
            return n

    def add_debt(self, frames: int, hold_s: float = 0.0) -> None:
        """The waiting speech was delayed by `frames` output frames (a takeover's stand-still). `hold_s`: the
        debt is not cut to the speech waiting for that long (a takeover's first batches come before the speech
        its sender sent during the stand-still, which the service sends again once the new actor is up)."""
        if self.catch_up:
            self.debt += max(0, int(frames))
            self._debt_held_until = time.monotonic() + hold_s

    def _frame_span(self, k: int) -> tuple[int, int]:
        """Samples [a, b) (at the session's rate) of speech frame `k`'s display interval."""
        rate, fps = self.speech.rate, self.fps
        return (int(k * rate * fps.denominator // fps.numerator),
                int((k + 1) * rate * fps.denominator // fps.numerator))

    def _silent(self, u, k: int) -> bool:
        """Speech frame `k` of utterance `u` is a pause's: all its PCM is here and its level is at most
        `silence_dbfs`."""
        a, b = self._frame_span(k)
        if b > u.pcm_n or a < u._p0 or b <= a:
            return False
        x = u.pcm[a - u._p0:b - u._p0].astype(np.float32)
        return float(np.dot(x, x)) / (b - a) <= self._silent_power

    def _skippable(self, u, k: int, ready: int) -> bool:
        """Frame `k` may be skipped to catch up: inside a pause, the frame before it (planned) and the
        two after it (ready) silent too."""
        return (self.debt > 0 and k >= 1 and k + 2 < ready and u.silent_before
                and self._silent(u, k) and self._silent(u, k + 1) and self._silent(u, k + 2))

    def _waiting_ready(self) -> int:
        """Speech frames ready and not yet planned (the debt can never exceed them). Under the lock."""
        return sum(max(0, u.ready_frames() - u.scheduled) for u in self.speech.utterances[self._utt:])

    def plan(self, n: int) -> FrameBatch:
        """The next `n` output frames."""
        with self.speech.lock:
            utts = self.speech.utterances
            slots: list[tuple[int, int] | None] = []
            skipped: list[tuple[int, int, int]] = []
            resumed = 0
            if self.debt and time.monotonic() >= self._debt_held_until:
                # speech that is no longer waiting has nothing left to win back
                self.debt = min(self.debt, self._waiting_ready())
            for _ in range(n):
                slot = None
                while self._utt < len(utts):
                    u = utts[self._utt]
                    ready, total = u.ready_frames(), u.total_frames()
                    if u.rebuffering and (total is not None or ready - u.scheduled >= self.rebuffer_frames):
                        u.rebuffering = False  # enough has come (or all of it): it speaks again
                    if u.scheduled < ready and not u.rebuffering:
                        while self.catch_up and self._skippable(u, u.scheduled, ready):
                            skipped.append((len(slots), u.index, u.scheduled))
                            u.scheduled += 1
                            self.debt -= 1
                        slot = (u.index, u.scheduled)
                        if self.catch_up:
                            u.silent_before = self._silent(u, u.scheduled)
                        u.scheduled += 1
                        if u.starved:  # it speaks again: an underrun when more speech came (not its end: a
                            resumed += total is None  # sender that paused before ending is no slow sender)
                            u.starved = False
                        break
                    if total is not None and u.scheduled >= total:
                        self._utt += 1
                        continue
                    if u.scheduled > 0 and not u.starved and u.scheduled >= ready:  # ran out mid-utterance
                        u.starved, u.rebuffering = True, self.rebuffer_frames > 0
                    break
                slots.append(slot)
            mel = np.full((n, 1, N_MELS, MEL_STEP), SILENT_MEL, np.float32)
            i = 0
            while i < n:  # runs of consecutive speech frames of one utterance: one windows() each
                if slots[i] is None:
                    i += 1
                    continue
                u_index, k0 = slots[i]
                j = i
                # (consecutive frames: a pause's frames skipped to catch up break a run, which would otherwise give
                # the frames after them the model input of the skipped ones)
                while j + 1 < n and slots[j + 1] is not None and slots[j + 1][0] == u_index \
                        and slots[j + 1][1] == slots[j][1] + 1:
                    j += 1
                mel[i:j + 1] = utts[u_index].windows(k0, k0 + (j - i) + 1)
                i = j + 1
        first = self.next_frame
        self.next_frame += n
        self.underruns += resumed
        idx = template_indices(first, first + n, self.template_frames, self.loop)
        return FrameBatch(first=first, template_index=idx, mel=mel, speech=slots, underruns=resumed,
                          skipped=skipped)

    def commit(self, batch: FrameBatch) -> np.ndarray:
        """The batch was rendered: its audio (int16 at the session's rate)."""
        parts = []
        with self.speech.lock:
            utts = self.speech.utterances
            touched = set()
            skips = collections.deque(batch.skipped)
            for offset, slot in enumerate(batch.speech):
                while skips and skips[0][0] == offset:  # a pause's frames left out: their audio too
                    _, u_index, k = skips.popleft()
                    u = utts[u_index]
                    u.pcm_taken = max(u.pcm_taken, self._frame_span(k)[1])
                    u.committed = max(u.committed, k + 1)
                    self.skipped_frames += 1
                span = self.audio_span(batch.first + offset)
                if slot is None:
                    parts.append(np.zeros(span, np.int16))
                else:
                    u = utts[slot[0]]
                    parts.append(u.take_pcm(span))
                    u.committed = max(u.committed, slot[1] + 1)
                    touched.add(slot[0])
                    self.speech_frames_done += 1
                    self.marks.append((batch.first + offset, slot[0], slot[1], u.pcm_taken,
                                       self.speech_frames_done, self.skipped_frames, self.debt))
            for u_index in touched:  # what went out is let go (memory does not grow with the session)
                utts[u_index].trim()
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def rollback(self, batch: FrameBatch, owed_from: int = 0) -> np.ndarray:
        """The batch went out without the model: its speech frames are planned again next (none
        is lost); its audio is silence. `owed_from`: the batch's frames before this offset delayed
        nothing (a takeover's first frames, which fill the stream time its stand-still left, owed by
        `add_debt` already)."""
        with self.speech.lock:
            utts = self.speech.utterances
            firsts: dict[int, int] = {}
            for slot in [*batch.speech, *((u_index, k) for _, u_index, k in batch.skipped)]:
                if slot is not None:
                    firsts[slot[0]] = min(firsts.get(slot[0], slot[1]), slot[1])
            for u_index, k in firsts.items():
                utts[u_index].scheduled = min(utts[u_index].scheduled, k)
                # planned again from there as if it had not run out (its frames were ready: no pause for them)
                utts[u_index].starved = utts[u_index].rebuffering = False
                utts[u_index].silent_before = False
            if self.catch_up:
                self.debt += len(batch.skipped)  # its skips are owed again
                # the speech after the batch's first speech frame now comes that much later
                spoken = [i for i, slot in enumerate(batch.speech) if slot is not None]
                self.debt += max(0, len(batch) - max(spoken[0], owed_from)) if spoken else 0
            self.underruns -= batch.underruns  # counted again when they are planned again
            if firsts:
                self._utt = min(self._utt, min(firsts))
        return np.zeros(sum(self.audio_span(batch.first + i) for i in range(len(batch))), np.int16)

    # --- durability (cluster.live.journal) ---------------------------------------------------------
    def published(self, frames: int) -> list | None:
        """Output frames [0, frames) are published: the last speech frame among them,
        [utterance, speech frame, PCM taken, speech frames done, pause frames skipped by then, frames owed
        then] (None if none yet), the point a restarted session resumes from."""
        while self.marks and self.marks[0][0] < frames:
            self.resume_mark = list(self.marks.popleft()[1:])
        return self.resume_mark

    def resume(self, next_frame: int, mark: list | None) -> None:
        """Continue at output frame `next_frame` (the ping-pong phase follows it) with the speech
        after `mark` (see `published`): every speech frame after it is planned again."""
        self.next_frame = int(next_frame)
        self.resume_mark = list(mark) if mark else None
        if not mark:
            return
        u_index, k, taken, done = (int(v) for v in mark[:4])
        # (skips after the mark are planned again, and counted when they are: a journal's total counted them twice)
        self.skipped_frames = int(mark[4]) if len(mark) > 4 else 0
        # what the dead process still owed (a fault's delay it was paying back), owed by this one
        self.debt = int(mark[5]) if len(mark) > 5 and self.catch_up else 0
        with self.speech.lock:
            utts = self.speech.utterances
            for u in utts[:u_index]:
                u.scheduled = u.committed = u.total_frames() or 0
                u.pcm_taken = u.pcm_n
                u.trim()
            utts[u_index].scheduled = utts[u_index].committed = k + 1
            utts[u_index].pcm_taken = taken
            utts[u_index].trim()
            self._utt = u_index
            self.speech_frames_done = done
