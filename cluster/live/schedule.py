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
"""
from __future__ import annotations

import collections
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

    def __len__(self) -> int:
        return len(self.template_index)

    @property
    def speech_frames(self) -> int:
        return sum(1 for s in self.speech if s is not None)


class LiveScheduler:
    def __init__(self, speech: SpeechInput, template_frames: int, fps: Fraction, loop: str = "pingpong",
                 rebuffer_frames: int = 0) -> None:
        self.speech = speech
        self.rebuffer_frames = int(rebuffer_frames)
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
        rate, fps = self.speech.rate, self.fps
        a = frame * rate * fps.denominator // fps.numerator
        b = (frame + 1) * rate * fps.denominator // fps.numerator
        return int(b - a)

    def pending_speech_frames(self) -> int:
        """Speech frames received (ready or waiting for lookahead) and not yet planned."""
        with self.speech.lock:
            n = 0
            for u in self.speech.utterances[self._utt:]:
                total = u.total_frames()
                have = total if total is not None else u.frame_of_sample(u.n)
                n += max(0, have - u.scheduled)
            return n

    def plan(self, n: int) -> FrameBatch:
        """The next `n` output frames."""
        with self.speech.lock:
            utts = self.speech.utterances
            slots: list[tuple[int, int] | None] = []
            resumed = 0
            for _ in range(n):
                slot = None
                while self._utt < len(utts):
                    u = utts[self._utt]
                    ready, total = u.ready_frames(), u.total_frames()
                    if u.rebuffering and (total is not None or ready - u.scheduled >= self.rebuffer_frames):
                        u.rebuffering = False  # enough has come (or all of it): it speaks again
                    if u.scheduled < ready and not u.rebuffering:
                        slot = (u.index, u.scheduled)
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
                while j + 1 < n and slots[j + 1] is not None and slots[j + 1][0] == u_index:
                    j += 1
                mel[i:j + 1] = utts[u_index].windows(k0, k0 + (j - i) + 1)
                i = j + 1
        first = self.next_frame
        self.next_frame += n
        self.underruns += resumed
        idx = template_indices(first, first + n, self.template_frames, self.loop)
        return FrameBatch(first=first, template_index=idx, mel=mel, speech=slots, underruns=resumed)

    def commit(self, batch: FrameBatch) -> np.ndarray:
        """The batch was rendered: its audio (int16 at the session's rate)."""
        parts = []
        with self.speech.lock:
            utts = self.speech.utterances
            touched = set()
            for offset, slot in enumerate(batch.speech):
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
                                       self.speech_frames_done))
            for u_index in touched:  # what went out is let go (memory does not grow with the session)
                utts[u_index].trim()
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def rollback(self, batch: FrameBatch) -> np.ndarray:
        """The batch went out without the model: its speech frames are planned again next (none
        is lost); its audio is silence."""
        with self.speech.lock:
            utts = self.speech.utterances
            firsts: dict[int, int] = {}
            for slot in batch.speech:
                if slot is not None:
                    firsts[slot[0]] = min(firsts.get(slot[0], slot[1]), slot[1])
            for u_index, k in firsts.items():
                utts[u_index].scheduled = min(utts[u_index].scheduled, k)
                # planned again from there as if it had not run out (its frames were ready: no pause for them)
                utts[u_index].starved = utts[u_index].rebuffering = False
            self.underruns -= batch.underruns  # counted again when they are planned again
            if firsts:
                self._utt = min(self._utt, min(firsts))
        return np.zeros(sum(self.audio_span(batch.first + i) for i in range(len(batch))), np.int16)

    # --- durability (cluster.live.journal) ---------------------------------------------------------
    def published(self, frames: int) -> list | None:
        """Output frames [0, frames) are published: the last speech frame among them,
        [utterance, speech frame, PCM taken, speech frames done] (None if none yet), the point a
        restarted session resumes from."""
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
        u_index, k, taken, done = (int(v) for v in mark)
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
