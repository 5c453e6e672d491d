"""Live sessions without Ray: streaming features, the frame scheduler, the encoder's live HLS.

The frames a session renders equal a batch job's (same 16 kHz audio, same first template frame),
compared before encoding; a real ffmpeg/PyAV reads the live playlist back with video and audio."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from cluster.audio import mel_windows, melspectrogram
from cluster.live.speech import SpeechInput, StreamResampler
from tests.helpers import decoded_counts


def _chunks(data, rng, most):
    i = 0
    while i < len(data):
        n = int(rng.integers(1, most))
        yield data[i:i + n]
        i += n


def test_streaming_mel_columns_equal_the_whole_files_and_only_final_ones_are_used():
    rng = np.random.default_rng(3)
    pcm = (rng.standard_normal(16000 * 2 + 77) * 4000).astype(np.int16)
    fps = Fraction(25)
    speech = SpeechInput(16000, fps, columns_needed=3)
    ready_seen = []
    for part in _chunks(pcm, rng, 1500):
        speech.append(part.tobytes())
        u = speech.utterances[0]
        k = u.ready_frames()
        if k:  # a ready frame's columns the model reads never change afterwards
            ready_seen.append((k, u.windows(0, k)[:, :, :, :3].copy()))
        # lookahead: the last ready frame starts at least 600 samples (37.5 ms: its 3 columns' 50 ms
        # frames, less up to a column of rounding) before the end of what arrived
        if k:
            assert (k - 1) * 640 <= u.n - 600
    speech.end()
    u = speech.utterances[0]
    whole = melspectrogram(pcm.astype(np.float32) / 32768)
    assert np.array_equal(u.mel[:, :u.columns], whole)
    total = u.total_frames()
    assert np.array_equal(u.windows(0, total), mel_windows(whole, fps, 0, total))
    for k, seen in ready_seen[::10]:
        assert np.array_equal(seen, mel_windows(whole, fps, 0, k)[:, :, :, :3])


def test_a_sessions_room_is_taken_out_of_its_speech_as_it_arrives_however_it_is_cut():
    """A live session measures the room under its speech as it arrives (the last 10 s of columns, again after each
    second, `ModelInputTracker`) and takes it out of the columns after the first second; the columns do not depend on
    how the stream was cut into appends, so a restarted session's replay gives the same."""
    from cluster import audio, synth
    from cluster.live.speech import ModelInputTracker

    speech = synth.speech_like(6.0, seed=5).astype(np.float32)
    room = np.random.default_rng(7).normal(0.0, 10 ** (-45 / 20), len(speech)).astype(np.float32)
    pcm = np.clip((speech + room) * 32768, -32768, 32767).astype(np.int16)

    def columns(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        streamed = SpeechInput(16000, Fraction(25), columns_needed=3, denoise=True)
        for part in _chunks(pcm, rng, 3000):
            streamed.append(part.tobytes())
        streamed.end()
        return np.concatenate([u.mel[:, :u.columns] for u in streamed.utterances], axis=1)

    first = columns(1)
    assert np.array_equal(first, columns(2))
    heard = melspectrogram(pcm.astype(np.float32) / 32768)
    assert first.shape == heard.shape
    second = ModelInputTracker().every
    assert np.array_equal(first[:, :second], heard[:, :second])  # the first second: nothing measured yet
    band = audio._room_band()
    pauses = np.flatnonzero(melspectrogram(speech)[band].max(axis=0) <= -4.0)
    pauses = pauses[pauses >= second]
    assert len(pauses) > 40
    level = 20 * np.log10(audio.mel_magnitude(first[band][:, pauses]).mean(axis=0))
    as_heard = 20 * np.log10(audio.mel_magnitude(heard[band][:, pauses]).mean(axis=0))
    assert (as_heard - level).mean() > 15, (as_heard - level).mean()
    plain = SpeechInput(16000, Fraction(25), columns_needed=3)
    plain.append(pcm.tobytes())
    plain.end()
    assert np.array_equal(plain.utterances[0].mel[:, :plain.utterances[0].columns], heard)  # denoise off: as heard


def test_a_quiet_speaker_is_heard_at_a_usual_level_after_a_few_seconds():
    """A live session's speech was heard as sent: a speaker at -35 dBFS barely moved the mouth, where a file at
    that level is raised for the model (`model_input_gain_db`). A session measures its level as the speech arrives
    (`mel_gain_db` over the last 10 s, again each second) and raises the columns from the third second on by it
    (`GAIN_AFTER_S`); a speaker at a usual level is heard as sent, bit for bit."""
    from cluster import audio, synth
    from cluster.live.speech import ModelInputTracker

    speech = synth.speech_like(6.0, seed=5).astype(np.float32)  # about -10 dBFS
    # (a quiet room: a room that would reach NOISE_CEILING_DBFS stops the gain there, as a file's does)
    room = np.random.default_rng(7).normal(0.0, 10 ** (-80 / 20), len(speech)).astype(np.float32)

    def columns(wav: np.ndarray, seed: int = 1) -> np.ndarray:
        streamed = SpeechInput(16000, Fraction(25), columns_needed=3, conditioned=True)
        for part in _chunks(np.clip(wav * 32768, -32768, 32767).astype(np.int16), np.random.default_rng(seed), 3000):
            streamed.append(part.tobytes())
        streamed.end()
        return np.concatenate([u.mel[:, :u.columns] for u in streamed.utterances], axis=1)

    usual = speech + room
    assert np.array_equal(columns(usual), melspectrogram(np.clip(usual * 32768, -32768, 32767).astype(np.int16)
                                                         .astype(np.float32) / 32768))  # as sent
    quiet = speech * np.float32(10 ** (-25 / 20)) + room  # about -35 dBFS, its room at -80
    heard_quiet, raised = columns(quiet), columns(quiet, seed=2)
    assert np.array_equal(heard_quiet, raised)  # however the stream was cut
    second, after = ModelInputTracker().every, ModelInputTracker().gain_after
    band = audio._room_band()
    loud = melspectrogram(speech)[band].mean(axis=0) > np.percentile(melspectrogram(speech)[band].mean(axis=0), 80)
    loud[:after] = False

    def level(m: np.ndarray) -> np.ndarray:
        return 20 * np.log10(audio.mel_magnitude(m[band]).mean(axis=0))

    as_sent = melspectrogram(np.clip(quiet * 32768, -32768, 32767).astype(np.int16).astype(np.float32) / 32768)
    assert (level(usual_columns := columns(usual))[loud] - level(as_sent)[loud]).mean() > 20  # 25 dB apart as sent
    assert abs((level(raised)[loud] - level(usual_columns)[loud]).mean()) < 6, \
        (level(raised)[loud] - level(usual_columns)[loud]).mean()  # raised to about the usual level
    assert np.array_equal(raised[:, :second], as_sent[:, :second])  # the first second: nothing measured yet
    assert second < after


def _stream_and_render(pcm: np.ndarray, rate: int, seed: int) -> tuple[list, list, list]:
    """Feed `pcm` in random chunks, plan and commit what is ready (every seventh batch rolled back
    first, as a model fault does), end the speech halfway and at the end: (the mel windows and
    the audio of every committed batch, the largest buffers an utterance held, in entries)."""
    from cluster.live.schedule import LiveScheduler

    rng = np.random.default_rng(seed)
    speech = SpeechInput(rate, Fraction(25), columns_needed=3)
    scheduler = LiveScheduler(speech, 250, Fraction(25))
    mels, audio, held = [], [], []
    batches = 0

    def render_ready() -> None:
        nonlocal batches
        while scheduler.pending_speech_frames():
            planned = scheduler.plan(4)
            if not any(slot is not None for slot in planned.speech):
                break
            batches += 1
            if batches % 7 == 0:  # shown without the model: its speech is planned again
                scheduler.rollback(planned)
                continue
            mels.append(planned.mel.copy())
            audio.append(scheduler.commit(planned))
        held.append(max((len(u.pcm), len(u.samples), u.mel.shape[1]) for u in speech.utterances))

    half = len(pcm) // 2
    for part in _chunks(pcm[:half], rng, rate // 2):
        speech.append(part.tobytes())
        render_ready()
    speech.end()
    render_ready()
    for part in _chunks(pcm[half:], rng, rate // 2):
        speech.append(part.tobytes())
        render_ready()
    speech.end()
    render_ready()
    return mels, audio, held


def test_speech_that_runs_out_mid_utterance_speaks_again_in_stretches():
    """A sender at half real time: once an utterance's speech ran out before its end, it speaks
    again when 5 frames (0.2 s) of it are ready (its first frame still goes as soon as it is
    ready), not frame by frame between idle frames (1-frame fragments, the mouth closing and
    opening each time); each underrun is counted; the end plays whatever is left; a rebuffer of 0
    keeps the frame-by-frame behaviour."""
    from itertools import groupby

    from cluster.live.schedule import LiveScheduler

    pcm = (np.random.default_rng(3).standard_normal(16000 * 4) * 3000).astype(np.int16)
    for rebuffer in (5, 0):
        speech = SpeechInput(16000, Fraction(25), columns_needed=3)
        scheduler = LiveScheduler(speech, 250, Fraction(25), rebuffer_frames=rebuffer)
        shown = []
        for frame in range(150):  # one output frame per 40 ms; 20 ms of speech arrive meanwhile
            speech.append(pcm[320 * frame:320 * (frame + 1)].tobytes())
            shown.append(scheduler.plan(1).speech[0] is not None)
        runs = [len(list(group)) for spoken, group in groupby(shown) if spoken]
        gaps = sum(1 for spoken, _ in groupby(shown) if not spoken)
        if rebuffer:
            assert min(runs[1:-1]) >= 5, runs  # after the first (latency first: it goes as soon as it is ready)
        else:
            assert max(runs) <= 2, runs  # fragments
        assert scheduler.underruns == len(runs) - 1 and gaps >= len(runs) - 1, (scheduler.underruns, runs)
        # a batch rolled back (the model did not answer) un-counts what it counted, and its frames go again
        batch = scheduler.plan(5)
        before = scheduler.underruns - batch.underruns
        scheduler.rollback(batch)
        assert scheduler.underruns == before
        speech.end()  # the end: what is left plays at once, whatever its length
        left = scheduler.pending_speech_frames()
        assert sum(s is not None for s in scheduler.plan(left + 5).speech) == left and (left > 0 or not rebuffer)


def test_a_long_session_holds_only_the_speech_not_yet_out(monkeypatch):
    """Three minutes of speech at 48 kHz streamed in random chunks, rendered as it becomes ready
    (with rollbacks): what went out is let go, so an utterance's buffers stay a few seconds long
    instead of growing with the session (an hour held about 1 GB); the model's input and the
    output's audio are exactly those of the same stream with nothing let go."""
    import cluster.live.speech as speech_module

    pcm = (np.random.default_rng(5).standard_normal(48000 * 180) * 3000).astype(np.int16)
    mels, audio, held = _stream_and_render(pcm, 48000, seed=1)
    monkeypatch.setattr(speech_module, "TRIM_MIN_ENTRIES", 1 << 62)  # nothing let go but whole utterances
    ref_mels, ref_audio, ref_held = _stream_and_render(pcm, 48000, seed=1)
    assert len(mels) == len(ref_mels) > 1000
    assert all(np.array_equal(a, b) for a, b in zip(mels, ref_mels))
    assert np.array_equal(np.concatenate(audio), np.concatenate(ref_audio))
    most = max(max(h) for h in held)
    assert max(max(h) for h in ref_held) >= 48000 * 90  # kept whole: half the speech at 48 kHz
    assert most <= 4 * speech_module.TRIM_MIN_ENTRIES, most  # a few seconds at most


@pytest.mark.parametrize("rate", [24000, 48000])
def test_streaming_resampler_equals_one_pass_resampling(rate):
    from scipy.signal import resample_poly

    rng = np.random.default_rng(rate)
    x = rng.standard_normal(rate + 11).astype(np.float32)
    resampler = StreamResampler(rate)
    out = np.concatenate([resampler.push(part) for part in _chunks(x, rng, 4000)] + [resampler.flush()])
    ref = resample_poly(x.astype(np.float64), resampler.up, resampler.down).astype(np.float32)
    assert np.array_equal(out, ref)


def test_odd_and_unoffered_input_is_refused():
    with pytest.raises(ValueError, match="sample rate 22050"):
        SpeechInput(22050, Fraction(25), 3)
    with pytest.raises(ValueError, match="even byte count"):
        SpeechInput(16000, Fraction(25), 3).append(b"\x00\x01\x02")


def _builtin_session(session_id: str, template: str, out_dir: Path, journal=None):
    """(a started in-process `LiveSession` on the built-in model over `template` prepared as an
    avatar, with `journal` if given, the settings it runs with)."""
    from cluster.config import get_settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.live.session import LiveSession
    from cluster.models import crop_for_spec, load_model

    s = get_settings()
    model = load_model("builtin", s)
    avatar = prepare_avatar(template, s)
    session = LiveSession(session_id, template_path=avatar.template_path, track_path=avatar.track_path,
                          model="builtin", model_size=model.size, crop=crop_for_spec("builtin", None, s),
                          generate=model.generate, sample_rate=16000, out_dir=out_dir, settings=s, journal=journal)
    session.start()
    return session, s


def _pcm16(path: str) -> np.ndarray:
    from scipy.io import wavfile

    rate, data = wavfile.read(path)
    assert rate == 16000 and data.dtype == np.int16
    return data


def test_a_session_asking_for_its_own_segment_length_gets_it_and_the_service_keeps_its_own():
    from cluster.config import Settings
    from cluster.live.session import session_settings

    s = Settings(live_segment_seconds=0.5, live_playlist_segments=8)
    assert session_settings(s, None) is s and session_settings(s, 0.5) is s
    short = session_settings(s, 0.25)
    assert (short.live_segment_seconds, short.live_playlist_segments) == (0.25, 8)
    assert s.live_segment_seconds == 0.5  # the service's own settings are left as they are


def test_session_frames_equal_a_batch_jobs(speech_wav, astronaut_video, tmp_path, monkeypatch):
    """Same 16 kHz speech, same first template frame: the speech frames a live session renders
    (in its small batches, with its streaming features) equal the frames of a batch job, before
    encoding. Idle frames go through the same path with a silent window."""
    import cluster.media.encode as encode
    from cluster.config import get_settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.live.schedule import LiveScheduler
    from cluster.live.session import LiveRenderer
    from cluster.models import crop_for_spec, load_model
    from cluster.render import render_local
    from cluster.schemas import RenderRequest

    batch_frames = []

    class RecordingEncoder(encode.SegmentEncoder):  # the real encoder; the frames it gets are kept
        def write_yuv(self, frames):
            batch_frames.append(np.array(frames))
            return super().write_yuv(frames)

    monkeypatch.setattr(encode, "SegmentEncoder", RecordingEncoder)
    s = get_settings()
    model = load_model("builtin", s)
    render_local(RenderRequest(audio=speech_wav, video=astronaut_video, output=str(tmp_path / "batch.mp4")), s,
                 model=model)
    batch = np.concatenate(batch_frames)

    avatar = prepare_avatar(astronaut_video, s)  # the batch job's (cached by content)
    renderer = LiveRenderer(avatar.template_path, avatar.track_path, model.size, crop_for_spec("builtin", None, s), s)
    speech = SpeechInput(16000, renderer.fps, columns_needed=3)
    scheduler = LiveScheduler(speech, renderer.frame_count, renderer.fps)
    rng = np.random.default_rng(0)
    live, idle = [], 0
    for part in _chunks(_pcm16(speech_wav), rng, 3000):
        speech.append(part.tobytes())
        utterance = speech.utterances[0]
        while (ready := utterance.ready_frames() - utterance.scheduled) > 0:  # render what is ready
            planned = scheduler.plan(min(3, ready))
            frames, err = renderer.render(planned, model.generate)
            assert err is None
            scheduler.commit(planned)
            live += [f for f, slot in zip(frames, planned.speech) if slot is not None]
            idle += sum(slot is None for slot in planned.speech)
            if idle:
                break
        if idle:
            break
    assert idle == 0, "the audio arrived before the frames were due: no idle frame should have been needed"
    speech.end()
    while scheduler.pending_speech_frames():
        planned = scheduler.plan(4)
        frames, err = renderer.render(planned, model.generate)
        scheduler.commit(planned)
        live += [f for f, slot in zip(frames, planned.speech) if slot is not None]
    renderer.close()
    live = np.stack(live)
    assert live.shape == batch.shape
    assert np.array_equal(live, batch)


def test_live_session_streams_hls_that_ffmpeg_reads_and_a_verified_recording(speech_wav, astronaut_video,
                                                                             tmp_path):
    import time

    import av

    from cluster.live.encoder import PUBLISHED, read_playlist

    session, s = _builtin_session("t", astronaut_video, tmp_path / "session")
    pcm = _pcm16(speech_wav)[:16000 * 2].tobytes()
    t0 = time.monotonic()
    for i in range(0, len(pcm), 3200):  # 100 ms chunks at real time
        assert session.append(pcm[i:i + 3200])["accepted"]
        time.sleep(max(0.0, t0 + (i + 3200) / 32000 - time.monotonic()))
    session.finish()
    assert session.join(30)
    stats = session.stats()
    assert stats["state"] == "ended" and stats["reason"] == "finished", stats
    assert stats["seconds_rendered"] == pytest.approx(2.0, abs=0.04)
    assert stats["latency_samples"] > 0 and stats["latency_p50_s"] < 3.0

    hls = tmp_path / "session" / "hls"
    text = (hls / PUBLISHED).read_text()
    assert "#EXT-X-TARGETDURATION:1" in text and "#EXT-X-ENDLIST" in text
    _seq, segments, ended = read_playlist(hls / PUBLISHED)
    assert ended and all(d <= s.live_segment_seconds for _, d in segments)
    with av.open(str(hls / PUBLISHED)) as container:  # a real demuxer/decoder reads the playlist
        assert container.streams.video and container.streams.audio
        video_frames, audio_samples = decoded_counts(container)
    listed = round(sum(d for _, d in segments) * 25)
    assert video_frames == listed
    assert audio_samples / 48000 == pytest.approx(listed / 25, abs=0.1)  # the encoder is fed 48 kHz
    # the recording: every frame streamed, verified (frame count, audio as long as the video)
    assert session.recording is not None and Path(session.recording).is_file()
    assert stats["recording_seconds"] == pytest.approx(stats["seconds_streamed"], abs=1e-6)


def test_a_recording_that_cannot_be_written_fails_the_session_with_its_cause(speech_wav, astronaut_video, tmp_path):
    """Joining the recording raises an OS error (here its file's name is taken by a directory; a
    full disk is the same path): the session ends `failed` with that cause and its stage, within
    its join's deadline, instead of staying `ending` for good."""
    session, _ = _builtin_session("w", astronaut_video, tmp_path / "session")
    (tmp_path / "session" / "hls" / "recording-0.fmp4").mkdir(parents=True)
    session.append(_pcm16(speech_wav)[:8000].tobytes())
    session.finish()
    assert session.join(60)
    stats = session.stats()
    assert stats["state"] == "failed", stats
    assert stats["error"]["code"] == "live.internal" and stats["error"]["stage"] == "live-recording", stats
    assert "recording-0.fmp4" in stats["error"]["message"] and "IsADirectoryError" in stats["error"]["message"]
    assert session.recording is None


def test_a_session_that_fails_midway_keeps_a_recording_of_what_it_streamed(speech_wav, astronaut_video, tmp_path,
                                                                           monkeypatch):
    """The encoder's input breaks after 1.5 s of stream (a full disk, a dead pipe): the session ends
    `failed` with that cause, and its recording holds every segment it had published (viewers saw
    them; nothing is lost), verified like any other."""
    from cluster.live.encoder import LiveEncoder

    write = LiveEncoder.write

    def breaks_after_a_while(self, frames, pcm, timeout=10.0):
        if self.frames_written >= 38:
            raise OSError(28, "No space left on device")
        return write(self, frames, pcm, timeout)

    monkeypatch.setattr(LiveEncoder, "write", breaks_after_a_while)
    session, _ = _builtin_session("f", astronaut_video, tmp_path / "session")
    session.append(_pcm16(speech_wav)[:16000 * 3].tobytes())
    assert session.join(60)
    stats = session.stats()
    assert stats["state"] == "failed" and stats["error"]["stage"] == "live", stats
    assert "No space left on device" in stats["error"]["message"]
    published = sum(e["frames"] for e in session.playlist.entries)
    assert published >= 25 and stats["segments_published"] == len(session.playlist.entries)
    assert session.recording is not None and Path(session.recording).is_file()
    assert stats["recording_seconds"] == pytest.approx(published / 25, abs=1e-6)


def test_an_ended_sessions_journal_stays_closed(speech_wav, astronaut_video, tmp_path):
    """`finish` and `end_speech` that come after a session's end (a client's late call) note nothing:
    its journal is closed and stays so (it reopened its events file, which nothing closed again)."""
    from cluster.live.journal import EVENTS_FILE, SessionJournal

    journal = SessionJournal(tmp_path / "session")
    session, _ = _builtin_session("j", astronaut_video, tmp_path / "session", journal=journal)
    session.append(_pcm16(speech_wav)[:16000].tobytes())  # an utterance still open when it is deleted
    session.stop("deleted")
    assert session.join(60) and session.stats()["state"] == "ended"
    events = (tmp_path / "session" / EVENTS_FILE).read_text()
    session.finish()
    assert session.end_speech() is False
    # an append past its offset after the end is told it ended (410), not to resend from an offset (409)
    late = session.append(b"\x00\x00" * 10, offset=10 ** 6)
    assert late["accepted"] is False and late["state"] == "ended", late
    assert (tmp_path / "session" / EVENTS_FILE).read_text() == events
    assert journal._events is None and journal._audio is None


def test_a_full_disk_under_the_journal_fails_the_session_with_a_typed_error(speech_wav, astronaut_video, tmp_path,
                                                                            monkeypatch):
    """A probe filled the disk under a live session: the journal's audio write raised a bare OSError out of
    `append`, the audio socket broke without a close code (its client reconnected 311 times), and the end's
    journal write killed the session's thread. `append` now raises `resource.disk` (stage live-journal, which the
    socket closes with), the session ends `failed` with that cause, and an end that cannot be journalled is said
    in the log, the session ending all the same."""
    import errno

    from cluster.errors import DiskFull
    from cluster.live.journal import SessionJournal

    journal = SessionJournal(tmp_path / "session")
    session, _ = _builtin_session("d", astronaut_video, tmp_path / "session", journal=journal)
    pcm = _pcm16(speech_wav)
    session.append(pcm[:8000].tobytes())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "write_audio", full)
    monkeypatch.setattr(journal, "save_final", full)
    with pytest.raises(DiskFull) as e:
        session.append(pcm[8000:16000].tobytes())
    assert e.value.code == "resource.disk" and e.value.stage == "live-journal", e.value
    assert session.join(60)  # its thread ended the session (the end's journal write failed too: said, not raised)
    stats = session.stats()
    assert stats["state"] == "failed" and stats["error"]["code"] == "resource.disk", stats
    assert stats["error"]["stage"] == "live-journal", stats


def test_a_sender_that_pauses_mid_utterance_gets_its_speech_counted_once(speech_wav, astronaut_video, tmp_path):
    """A sender that stops for longer than `live_flush_after_s` with part of a frame's audio sent:
    the session renders that tail at once (padded to a whole frame) and the rest becomes a new
    utterance, padded again at its end. The view counts speech, not padding: 3.2 s received, 3.2 s
    rendered (it said 3.24 before: 81 speech frames for 80 frames of speech), and the recording's
    audio holds every received sample once (its energy equals the speech's)."""
    import time

    import av

    session, s = _builtin_session("p", astronaut_video, tmp_path / "session")
    speech = _pcm16(speech_wav)
    assert len(speech) == 51200  # 3.2 s: 80 frames at 25 fps
    cut = 24160  # 37.75 frames: the pause leaves three quarters of a frame waiting for lookahead
    for part in (speech[:cut], speech[cut:]):
        data = part.tobytes()
        for i in range(0, len(data), 6400):
            deadline = time.monotonic() + 30
            while not session.append(data[i:i + 6400])["accepted"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        if part is not speech[cut:]:  # the pause: the tail is rendered as an utterance's end (waited for, not
            # slept through: on a loaded machine the session's loop took longer than the pause plus a second)
            time.sleep(s.live_flush_after_s)
            deadline = time.monotonic() + 30
            while not session.speech.utterances[-1].ended:
                assert time.monotonic() < deadline, "the pause did not end the utterance"
                time.sleep(0.05)
    session.finish()
    assert session.join(30)
    stats = session.stats()
    assert len(session.speech.utterances) == 2  # the pause split the speech
    assert session.scheduler.speech_frames_done == 38 + 43  # each part padded to whole frames
    assert stats["seconds_received"] == 3.2 and stats["seconds_rendered"] == 3.2, stats
    with av.open(str(session.recording)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    # AAC at 48 kHz, float: the speech's energy (int16 at 16 kHz) within the codec's error, once
    energy = float(np.sum((speech / 32768.0) ** 2)) * 3  # 3x the samples at 48 kHz
    assert float(np.sum(audio.astype(np.float64) ** 2)) == pytest.approx(energy, rel=0.1)


def test_the_buffer_takes_what_it_has_room_for_and_the_rest_is_offered_again(speech_wav, astronaut_video, tmp_path,
                                                                             monkeypatch):
    """One message of 3.2 s into a 1-s buffer: the buffer used to take the whole message when it was
    not yet full (30 s in one message sat past a 5-s limit); it takes 1 s, says so by its offset, and
    the sender offers the rest again from there; every byte is received once."""
    import time

    session, s = _builtin_session("b", astronaut_video, tmp_path / "session")
    monkeypatch.setattr(s, "live_buffer_seconds", 1.0)
    data = _pcm16(speech_wav).tobytes()
    first = session.append(data, offset=0)
    assert first["accepted"] and first["offset"] == 32000, first  # 1 s at 16 kHz, 2 bytes a sample
    offset, deadline = first["offset"], time.monotonic() + 60
    while offset < len(data):
        assert time.monotonic() < deadline, offset
        answer = session.append(data[offset:], offset=offset)
        assert answer["buffered_s"] <= 1.0 + 1e-6, answer
        offset = answer["offset"] if answer["accepted"] else offset
        time.sleep(0.05)
    session.finish()
    assert session.join(60)
    assert session.stats()["seconds_received"] == 3.2 and session.speech.bytes_received == len(data)


# --- RTMP: the session's stream pushed to a real RTMP server (Debian's nginx + its RTMP module) ------
NGINX = "/usr/sbin/nginx"
NGINX_RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"


@pytest.fixture
def rtmp_server(tmp_path):
    """nginx with its RTMP module on a free loopback port, in the foreground, for this test only
    (stopped at its end; bound to this process's life). Yields the port."""
    import shutil
    import socket
    import subprocess

    from cluster.media.ffmpeg import die_with_parent_hook
    from tests.helpers import wait_until

    nginx = shutil.which("nginx") or NGINX
    if not Path(nginx).exists() or not Path(NGINX_RTMP_MODULE).exists():
        pytest.skip("nginx with its RTMP module is not installed (apt-get install -y nginx libnginx-mod-rtmp; "
                    ".ci/run installs them)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "nginx"
    root.mkdir()
    (root / "nginx.conf").write_text(f"""
load_module {NGINX_RTMP_MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        application live {{ live on; record off; }}
    }}
}}
""")
    log = open(root / "stderr.log", "wb")
    proc = subprocess.Popen([nginx, "-p", str(root), "-e", str(root / "error.log"), "-c", str(root / "nginx.conf")],
                            stdout=log, stderr=log, preexec_fn=die_with_parent_hook())

    def listening():
        assert proc.poll() is None, (root / "stderr.log").read_text() + (root / "error.log").read_text()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 10, 0.05, "nginx to listen")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_live_session_pushes_video_and_audio_to_an_rtmp_server(rtmp_server, speech_wav, astronaut_video, tmp_path):
    """`rtmp_url`: the session's stream (video and its audio) reaches a real RTMP server, read back
    from it by ffmpeg; the stream key never shows in the session's figures; the HLS is unchanged."""
    import time

    import av

    from cluster.config import get_settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.live.encoder import PUBLISHED, read_playlist
    from cluster.live.session import LiveSession
    from cluster.media.ffmpeg import FFmpeg
    from cluster.models import crop_for_spec, load_model
    from cluster.netguard import vet_rtmp_url

    s = get_settings()
    url = f"rtmp://127.0.0.1:{rtmp_server}/live/secret-key"
    target = vet_rtmp_url(url, allow_private=True)  # loopback: allowed here as LIPSYNC_ALLOW_PRIVATE_URLS does
    model = load_model("builtin", s)
    avatar = prepare_avatar(astronaut_video, s)
    session = LiveSession("r", template_path=avatar.template_path, track_path=avatar.track_path, model="builtin",
                          model_size=model.size, crop=crop_for_spec("builtin", None, s), generate=model.generate,
                          sample_rate=16000, out_dir=tmp_path / "session", settings=s, rtmp=target)
    session.start()
    back = tmp_path / "back.flv"
    try:
        session.append(_pcm16(speech_wav)[:16000 * 3].tobytes())  # 3 s at once: within the 5 s buffer
        time.sleep(0.5)
        stats = session.stats()
        assert stats["rtmp_state"] == "pushing", stats
        assert stats["rtmp_url"] == f"rtmp://127.0.0.1:{rtmp_server}/live/…" and "secret" not in str(stats)
        # a player reads the stream back from the server: 2 s of it
        with FFmpeg(["-loglevel", "error", "-rw_timeout", "20000000", "-i", url, "-t", "2", "-map", "0", "-c", "copy",
                     "-f", "flv", str(back)], stage="rtmp-read") as reader:
            assert reader.wait(60) == 0, reader.stderr_tail()
    finally:
        session.finish()
        assert session.join(60)
    stats = session.stats()
    assert stats["state"] == "ended" and stats["rtmp_state"] == "ended" and stats["rtmp_error"] is None, stats
    with av.open(str(back)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.width, video.height) == ("h264", 320, 240)
        assert audio.codec_context.name == "aac"
        frames, samples = decoded_counts(container)
    assert frames >= 40 and samples / audio.rate >= 1.5, (frames, samples)
    _seq, segments, ended = read_playlist(tmp_path / "session" / "hls" / PUBLISHED)  # the HLS as without RTMP
    assert ended and segments and all(d <= s.live_segment_seconds for _, d in segments)


def test_rtmp_urls_pass_the_same_address_guard_as_input_urls():
    from cluster.errors import UnsafeInput
    from cluster.netguard import vet_rtmp_url

    def resolve(host, port):
        return {"stream.example.com": ["93.184.216.34"], "rebind.example.com": ["127.0.0.1"]}[host]

    target = vet_rtmp_url("rtmp://stream.example.com/live2/abc-key", allow_private=False, resolve=resolve)
    assert target.connect_url == "rtmp://93.184.216.34:1935/live2/abc-key"  # the vetted address, pinned
    assert target.tc_url == "rtmp://stream.example.com/live2" and target.shown == "rtmp://stream.example.com/live2/…"
    assert vet_rtmp_url("rtmps://stream.example.com/app/k", allow_private=False, resolve=resolve).connect_url \
        == "rtmps://93.184.216.34:443/app/k"
    for bad, words in [("rtmp://127.0.0.1/live/k", "non-public"), ("rtmp://rebind.example.com/live/k", "non-public"),
                       ("rtmp://169.254.169.254/live/k", "non-public"), ("http://stream.example.com/live/k", "rtmp"),
                       ("file:///etc/passwd", "rtmp"), ("rtmp://stream.example.com/onlyapp", "stream key"),
                       ("rtmp://u:p@stream.example.com/live/k", "credentials"),
                       ("rtmp://stream.example.com/live/k?x=1", "query"),
                       ("rtmp://stream.example.com/live/k -y", "spaces")]:
        with pytest.raises(UnsafeInput, match=words) as e:
            vet_rtmp_url(bad, allow_private=False, resolve=resolve)
        assert e.value.path == "rtmp_url"
    assert vet_rtmp_url("rtmp://127.0.0.1:1935/live/k", allow_private=True).connect_url == "rtmp://127.0.0.1:1935/live/k"


def test_a_refused_rtmp_push_fails_alone_and_the_session_streams_on(speech_wav, astronaut_video, tmp_path):
    """No RTMP server at the address: `rtmp_state` says failed and why; the session stays live and its
    HLS stream and recording are whole."""
    import socket

    from cluster.config import get_settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.live.encoder import PUBLISHED, read_playlist
    from cluster.live.session import LiveSession
    from cluster.models import crop_for_spec, load_model
    from cluster.netguard import vet_rtmp_url
    from tests.helpers import wait_until

    s = get_settings()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = load_model("builtin", s)
    avatar = prepare_avatar(astronaut_video, s)
    session = LiveSession("f", template_path=avatar.template_path, track_path=avatar.track_path, model="builtin",
                          model_size=model.size, crop=crop_for_spec("builtin", None, s), generate=model.generate,
                          sample_rate=16000, out_dir=tmp_path / "session", settings=s,
                          rtmp=vet_rtmp_url(f"rtmp://127.0.0.1:{port}/live/secret-key", allow_private=True))
    session.start()
    try:
        session.append(_pcm16(speech_wav)[:16000].tobytes())
        stats = wait_until(lambda: (lambda st: st if st["rtmp_state"] == "failed" else None)(session.stats()), 30,
                           0.1, "the RTMP push to fail")
        assert f"127.0.0.1:{port}" in stats["rtmp_error"] and "refused" in stats["rtmp_error"].lower(), stats
        assert "secret" not in str(stats), stats  # the stream key is never shown
        assert stats["state"] == "live"
        wait_until(lambda: session.stats()["seconds_rendered"] >= 0.96, 30, 0.1, "the speech to be rendered")
    finally:
        session.finish()
        assert session.join(60)
    stats = session.stats()
    assert stats["state"] == "ended" and stats["reason"] == "finished" and stats["rtmp_state"] == "failed", stats
    _seq, segments, ended = read_playlist(tmp_path / "session" / "hls" / PUBLISHED)
    assert ended and segments
    assert stats["recording_seconds"] == pytest.approx(stats["seconds_streamed"], abs=1e-6)


def test_a_restarted_encoder_continues_the_playlist_and_the_recording_joins_its_epochs(tmp_path):
    """Two encoder epochs (a session's actor restarted between them) in one live playlist: the
    second's segments follow `#EXT-X-DISCONTINUITY` and its own init segment, media sequence numbers
    go on, each segment decodes after the init segment its EXT-X-MAP names, and the recording holds
    every frame of both and their audio."""
    import io
    import re

    import av

    from cluster.config import get_settings
    from cluster.errors import EncodeError
    from cluster.live.encoder import PUBLISHED, LiveEncoder, LivePlaylist, make_recording, parse_playlist

    s = get_settings().model_copy(update={"live_playlist_segments": 3})
    hls = tmp_path / "hls"
    fps = Fraction(25)
    playlist = LivePlaylist(hls, s.live_playlist_segments)
    rng = np.random.default_rng(3)
    tone = (np.sin(np.arange(640 * 30) * 2 * np.pi * 440 / 16000) * 8000).astype(np.int16)
    for epoch, frames in ((0, 36), (1, 24)):
        encoder = LiveEncoder(hls, 160, 120, fps, 16000, s, epoch=epoch, start_number=len(playlist.entries),
                              start_frame=sum(e["frames"] for e in playlist.entries))
        if epoch == 0:  # frames of another layout (BGR) are refused, not streamed as garbage
            with pytest.raises(EncodeError, match=r"expected I420 frames \[n, 180, 160\] uint8, got \[4, 120, 160, 3"):
                encoder.write(np.zeros((4, 120, 160, 3), np.uint8), tone[:4 * 640])
        for first in range(0, frames, 4):
            encoder.write(rng.integers(0, 255, (4, 180, 160), dtype=np.uint8), tone[first * 640:(first + 4) * 640])
        encoder.close()
        playlist.poll(encoder.playlist, encoder.epoch, encoder.init, fps, final=epoch == 1)
    text = (hls / PUBLISHED).read_text()
    assert [e["frames"] for e in playlist.entries] == [12, 12, 12, 12, 12]
    assert "#EXT-X-MEDIA-SEQUENCE:2" in text and "#EXT-X-DISCONTINUITY-SEQUENCE:0" in text
    assert text.count("#EXT-X-DISCONTINUITY\n") == 1 and '#EXT-X-MAP:URI="init-1.mp4"' in text
    assert text.index("#EXT-X-DISCONTINUITY\n") < text.index('URI="init-1.mp4"') < text.index("seg_000003.m4s")
    assert text.rstrip().endswith("#EXT-X-ENDLIST")
    # what a player fetches: each listed segment after the init segment its EXT-X-MAP names, timestamps going on
    _seq, listed, _ended = parse_playlist(text)
    maps = re.findall(r'URI="([^"]+)"', text)
    assert [name for name, _ in listed] == ["seg_000002.m4s", "seg_000003.m4s", "seg_000004.m4s"]
    starts = []
    for (name, _), init in zip(listed, [maps[0], maps[1], maps[1]]):
        with av.open(io.BytesIO((hls / init).read_bytes() + (hls / name).read_bytes())) as container:
            stream = container.streams.video[0]
            packets = [p for p in container.demux(stream) if p.size]
            starts.append(float(packets[0].pts * stream.time_base))
            assert sum(len(p.decode()) for p in packets) == 12
    assert starts == sorted(starts) and starts[1] == pytest.approx(36 / 25, abs=0.03)
    seconds = make_recording(hls, tmp_path / "rec.mp4", playlist.entries, fps, s)
    assert seconds == pytest.approx(60 / 25)
    with av.open(str(tmp_path / "rec.mp4")) as container:
        video_frames, audio_samples = decoded_counts(container)
    assert video_frames == 60 and audio_samples / 48000 == pytest.approx(2.4, abs=0.05)


def test_the_live_playlist_lists_its_last_segments_as_low_latency_parts(tmp_path):
    """LL-HLS: each segment (one GOP, a keyframe first) is also one partial segment, listed with
    `#EXT-X-PART` for the segments within three target durations of the end; `#EXT-X-PART-INF`'s
    PART-TARGET is at least every part, `PART-HOLD-BACK` three times it. A player in low-latency
    mode may then stay a part behind the edge instead of a whole target duration (hls.js bounds its
    live position at edge - PART-TARGET, else edge - TARGETDURATION). Without a part target the
    playlist has none of these tags."""
    import re

    from cluster.live.encoder import LivePlaylist, parse_playlist

    entries = [{"name": f"seg_{i:06d}.m4s", "seconds": 0.24, "frames": 6, "epoch": 0, "init": "init.mp4"}
               for i in range(20)]
    text = LivePlaylist(tmp_path, 16, entries, part_target=0.25).text()
    _seq, listed, _ended = parse_playlist(text)
    # the newest (19) is the in-progress segment: listed by its part alone, at the end
    assert [n for n, _ in listed] == [f"seg_{i:06d}.m4s" for i in range(4, 19)]
    assert text.endswith('#EXT-X-PART:DURATION=0.240000,URI="seg_000019.m4s",INDEPENDENT=YES\n')
    assert "#EXT-X-PART-INF:PART-TARGET=0.250\n" in text
    assert "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.750\n" in text
    parts = re.findall(r'#EXT-X-PART:DURATION=([0-9.]+),URI="([^"]+)",INDEPENDENT=YES\n#EXTINF:([0-9.]+),\n(\S+)', text)
    # TARGETDURATION 1: the 12 segments of the last 3 s carry a part each, the part being the segment
    assert [p[1] for p in parts] == [f"seg_{i:06d}.m4s" for i in range(8, 19)]
    assert all(p[1] == p[3] and p[0] == p[2] and float(p[0]) <= 0.25 for p in parts)
    # a segment longer than asked for raises the part target with it (every part <= PART-TARGET)
    longer = LivePlaylist(tmp_path, 16, [*entries, {**entries[0], "name": "seg_000020.m4s", "seconds": 0.28}],
                          part_target=0.25).text()
    assert "#EXT-X-PART-INF:PART-TARGET=0.280\n" in longer
    plain = LivePlaylist(tmp_path, 16, entries).text()
    assert "#EXT-X-PART" not in plain and "SERVER-CONTROL" not in plain


def test_blocking_playlist_reload_waits_for_the_part_or_segment_asked_for(tmp_path):
    """`playlist_has(text, msn, part)`: what a blocking reload (`?_HLS_msn=&_HLS_part=`) waits for.
    Segments 2-8 whole, 9 in progress (its one part listed): part 0 of 9 is there, part 1 of 9 is
    not (it is answered by the next segment's first part, 'or a later one'), segment 9 whole is not;
    more than two segments past the last: None (400); an ended playlist has everything."""
    from cluster.live.encoder import LivePlaylist, playlist_has

    entries = [{"name": f"seg_{i:06d}.m4s", "seconds": 0.24, "frames": 6, "epoch": 0, "init": "init.mp4"}
               for i in range(10)]
    playlist = LivePlaylist(tmp_path, 8, entries, part_target=0.25)
    text = playlist.text()
    assert [playlist_has(text, *q) for q in ((8, None), (9, None), (9, 0), (9, 1), (10, 0), (11, 0), (12, 0))] == \
        [True, False, True, False, False, False, None]
    playlist.entries.append({**entries[0], "name": "seg_000010.m4s"})
    text = playlist.text()
    assert playlist_has(text, 9, None) and playlist_has(text, 9, 1) and playlist_has(text, 10, 0)
    playlist.ended = True
    ended = playlist.text()
    assert ended.rstrip().endswith("#EXT-X-ENDLIST") and "#EXTINF:0.240000,\nseg_000010.m4s" in ended
    assert playlist_has(ended, 11, None) and playlist_has(ended, 12, 3)


def test_a_resumed_session_removes_what_its_killed_process_left_half_written(astronaut_video, tmp_path):
    """A session's process SIGKILLed in a playlist's (or a journal file's) atomic write leaves its
    temporary; the process that resumes the session (`restore`, holding the journal) removes it, and
    only such temporaries."""
    import time

    from cluster.config import get_settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.live.journal import SessionJournal
    from cluster.live.session import LiveSession
    from cluster.models import crop_for_spec, load_model

    s = get_settings()
    model = load_model("builtin", s)
    avatar = prepare_avatar(astronaut_video, s)
    out = tmp_path / "session"
    (out / "hls").mkdir(parents=True)
    stale = [out / "hls" / ".live.m3u8.un5rien_.tmp", out / ".final.json.0123abcd.tmp"]
    kept = [out / "hls" / "seg_000000.m4s", out / "events.jsonl"]
    for path in stale + kept:
        path.write_bytes(b"x")
    journal = SessionJournal(out)
    assert journal.take()
    journal.save_meta({"avatar_id": avatar.id, "model": "builtin", "started_wall": time.time()})
    session = LiveSession("z", template_path=avatar.template_path, track_path=avatar.track_path, model="builtin",
                          model_size=model.size, crop=crop_for_spec("builtin", None, s), generate=model.generate,
                          sample_rate=16000, out_dir=out, settings=s, journal=journal)
    try:
        assert session.restore() is None
    finally:
        session.renderer.close()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_one_process_runs_a_session_and_its_death_frees_the_session_at_once(tmp_path):
    """The journal's lock: while a process holds it no other takes it; SIGKILLed, the kernel frees
    it and the standby's next try (every 20 ms) takes it."""
    import signal
    import subprocess
    import sys
    import time

    from cluster.live.journal import SessionJournal

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from cluster.live.journal import SessionJournal\n"
                               f"journal = SessionJournal({str(tmp_path)!r})\nassert journal.take()\n"
                               "print('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        standby = SessionJournal(tmp_path)
        assert not standby.take() and not standby.take()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        t0 = time.monotonic()
        while not standby.take():
            assert time.monotonic() - t0 < 1.0, "the dead holder's lock was not freed"
            time.sleep(0.02)
        assert standby.take()  # held: asking again is a no-op
        standby.mark_standby(holder.pid)
        assert not standby.standby_ready()  # its process is gone
    finally:
        holder.kill()
        holder.wait(10)


def test_a_journal_audio_write_that_fails_midway_leaves_none_of_it(tmp_path):
    """The disk fills while a chunk of speech is journalled: none of it stays (the client sends it
    again from the same offset), so the journal's bytes stay at their offsets for a takeover."""
    import errno

    from cluster.live.journal import AUDIO_FILE, SessionJournal

    journal = SessionJournal(tmp_path)
    journal.write_audio(b"ab" * 10)
    real = journal._audio

    class FillsUp:  # the real file: part of the chunk goes in, then the disk is full
        def write(self, view) -> int:
            real.write(view[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self) -> int:
            return real.fileno()

    journal._audio = FillsUp()
    with pytest.raises(OSError):
        journal.write_audio(b"cd" * 10)
    journal._audio = real
    journal.write_audio(b"cd" * 10)  # sent again
    assert (tmp_path / AUDIO_FILE).read_bytes() == b"ab" * 10 + b"cd" * 10


def test_a_journal_line_cut_short_by_a_crash_does_not_swallow_the_next_one(tmp_path):
    """A crash mid-append leaves a torn last line; the next process's first record must not be
    glued to it (both would be dropped when read: a published segment or an utterance's end lost
    after a restart)."""
    from cluster.live.journal import EVENTS_FILE, PUBLISHED_FILE, SessionJournal

    first = SessionJournal(tmp_path)
    first.publish({"seq": 0})
    first.note({"end": 1})
    for name in (PUBLISHED_FILE, EVENTS_FILE):
        with open(tmp_path / name, "ab") as f:
            f.write(b'{"seq": 1, "na')  # the crash
    again = SessionJournal(tmp_path)
    again.publish({"seq": 2})
    again.note({"end": 2})
    assert again.published() == [{"seq": 0}, {"seq": 2}]
    assert again.events() == [{"end": 1}, {"end": 2}]


def test_a_closed_journal_takes_no_more_events(tmp_path):
    """A finish racing the session's end (its check passes, the end closes the journal, then it notes)
    writes nothing after the end: the closed journal's files stay closed and unchanged."""
    from cluster.live.journal import EVENTS_FILE, PUBLISHED_FILE, SessionJournal

    journal = SessionJournal(tmp_path / "s")
    journal.note({"end": 2})
    journal.close()
    journal.note({"finish": True})
    journal.publish({"name": "seg_000001.m4s"})
    assert (tmp_path / "s" / EVENTS_FILE).read_text() == '{"end": 2}\n'
    assert not (tmp_path / "s" / PUBLISHED_FILE).exists() and journal._events is None


def test_a_live_stream_carries_its_templates_colour_tags(speech_wav, astronaut_video, tmp_path):
    """As a job's output: a template tagged BT.601 gives a stream (and recording) tagged BT.601."""
    import subprocess

    from cluster.media.ffmpeg import ffmpeg_binary
    from cluster.media.probe import probe

    tagged = str(tmp_path / "tagged.mp4")
    subprocess.run([ffmpeg_binary(), "-v", "error", "-y", "-i", astronaut_video, "-vf",
                    "setparams=color_primaries=smpte170m:color_trc=smpte170m:colorspace=smpte170m",
                    "-c:v", "libx264", "-crf", "12", tagged], check=True, timeout=60)
    session, _ = _builtin_session("c", tagged, tmp_path / "session")
    session.append(_pcm16(speech_wav)[:16000].tobytes())
    session.finish()
    assert session.join(60) and session.stats()["state"] == "ended"
    assert probe(str(session.recording)).video.color == [6, 6, 6]


def test_a_killed_live_encoder_ends_its_threads_and_a_failed_start_leaves_nothing(tmp_path, monkeypatch):
    """`kill` (a session torn down) left both feeding threads blocked for good on their queues' `get`;
    an encoder whose start failed after its ffmpeg started left that ffmpeg and the audio fifo behind."""
    import psutil

    from cluster.config import get_settings
    from cluster.live import speech
    from cluster.live.encoder import LiveEncoder

    s = get_settings()
    encoder = LiveEncoder(tmp_path / "a", 160, 120, Fraction(25), 16000, s)
    encoder.write(np.zeros((4, 180, 160), np.uint8), np.zeros(4 * 640, np.int16))
    encoder.kill()
    for t in encoder._threads:
        t.join(10)
    assert not any(t.is_alive() for t in encoder._threads)
    assert encoder._run.proc.poll() is not None and not list((tmp_path / "a").glob("*.fifo"))

    children_before = {p.pid for p in psutil.Process().children()}

    def broken(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(speech, "StreamResampler", broken)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        LiveEncoder(tmp_path / "b", 160, 120, Fraction(25), 16000, s)
    left = [p for p in psutil.Process().children() if p.pid not in children_before and p.status() != "zombie"]
    assert not left and not list((tmp_path / "b").glob("*.fifo")), left


def test_a_live_encoder_whose_ffmpeg_failed_releases_its_stderr_file_on_close(tmp_path):
    """`close` read ffmpeg's exit and raised its failure before releasing the stderr file it reads that from:
    one descriptor held per failed session, until its actor went."""
    from cluster.config import get_settings
    from cluster.errors import LipsyncError
    from cluster.live.encoder import LiveEncoder

    encoder = LiveEncoder(tmp_path / "a", 160, 120, Fraction(25), 16000, get_settings())
    encoder.write(np.zeros((4, 180, 160), np.uint8), np.zeros(4 * 640, np.int16))
    encoder._run.proc.kill()  # ffmpeg dies: its exit is a failure
    with pytest.raises(LipsyncError, match="live encoding"):
        encoder.close(timeout=10)
    assert encoder._run._stderr.closed


def test_a_live_encoder_whose_ffmpeg_stopped_taking_input_closes_within_one_timeout(tmp_path):
    """An ffmpeg that takes no input (a stalled disk): `close` killed it after its first wait, then waited its
    whole timeout again for each input's end, on queues that the feeders, ended on the dead pipe, no longer read
    (three timeouts: a session read `ending` for 60-90 s)."""
    import os
    import queue
    import signal
    import time

    from cluster.config import get_settings
    from cluster.errors import EncodeError, LipsyncError
    from cluster.live.encoder import LiveEncoder

    encoder = LiveEncoder(tmp_path / "a", 160, 120, Fraction(25), 16000, get_settings())
    os.kill(encoder._run.proc.pid, signal.SIGSTOP)
    with pytest.raises(EncodeError, match="took no input"):
        for _ in range(200):
            encoder.write(np.zeros((25, 180, 160), np.uint8), np.zeros(25 * 640, np.int16), timeout=0.3)
    while True:  # both inputs' queues full, as a feeder stuck on the pipe leaves them
        try:
            encoder._audio.put_nowait(b"\0\0" * 1920)
        except queue.Full:
            break
    t0 = time.monotonic()
    with pytest.raises(LipsyncError):
        encoder.close(timeout=2)
    assert time.monotonic() - t0 < 5, time.monotonic() - t0  # one wait, then the kill (it took over 6 s)
    assert encoder._run.proc.poll() is not None


def test_a_playlist_left_by_a_session_that_is_over_reads_ended():
    """A session whose actor died for good, or whose service stopped, left its playlist without
    `#EXT-X-ENDLIST` and its newest segment listed by its part alone: players followed it for ever."""
    from cluster.live.encoder import LivePlaylist, ended_playlist, parse_playlist

    playlist = LivePlaylist("/nowhere", window=6, part_target=0.5)
    playlist.entries = [{"name": f"seg_{i:06d}.m4s", "seconds": 0.48, "frames": 12, "epoch": 0, "init": "init.mp4"}
                        for i in range(3)]
    left = playlist.text()
    assert "#EXT-X-ENDLIST" not in left and left.rstrip().splitlines()[-1].startswith("#EXT-X-PART:")
    assert parse_playlist(left)[1] == [("seg_000000.m4s", 0.48), ("seg_000001.m4s", 0.48)]
    over = ended_playlist(left)
    playlist.ended = True
    assert over == playlist.text()  # as the session's own end writes it
    assert parse_playlist(over) == (0, [(f"seg_{i:06d}.m4s", 0.48) for i in range(3)], True)
    assert ended_playlist(over) == over



def _speech_with_pauses(seconds: float, rate: int = 16000, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like PCM: 0.8 s loud (about -20 dBFS) then 0.6 s of a quiet room (about -70 dBFS), over
    and over; and which samples are loud."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    loud = (np.arange(n) / rate % 1.4) < 0.8
    pcm = rng.standard_normal(n) * np.where(loud, 3300.0, 10.0)
    return np.clip(pcm, -32768, 32767).astype(np.int16), loud


def _live_run(pcm: np.ndarray, catch_up: bool, faults: range, realtime: bool = True):
    """A session's scheduler fed `pcm` (16 kHz) in real time (40 ms per output frame) or all at once,
    planning 4 frames per 4 output frames; the batches planned at output frames in `faults` are rolled
    back (the model did not answer). Returns (output frame, its delay in frames) of each committed
    speech frame, the output's audio of those frames, the speech frames skipped, the scheduler."""
    from cluster.live.schedule import LiveScheduler

    speech = SpeechInput(16000, Fraction(25), columns_needed=3)
    scheduler = LiveScheduler(speech, 250, Fraction(25), rebuffer_frames=5, catch_up=catch_up)
    delays, audio, skipped = [], [], set()
    whole = melspectrogram(pcm.astype(np.float32) / 32768)  # each frame's model input: its own window
    total = len(pcm) // 640
    if not realtime:
        speech.append(pcm.tobytes())
        speech.end()
    for frame in range(0, total + 400, 4):
        if realtime and frame < total:
            speech.append(pcm[640 * frame:640 * (frame + 4)].tobytes())
            if frame + 4 >= total:
                speech.end()
        batch = scheduler.plan(4)
        if frame in faults:
            scheduler.rollback(batch)
            continue
        out = scheduler.commit(batch)
        skipped |= {k for _, _, k in batch.skipped}
        for offset, slot in enumerate(batch.speech):
            if slot is not None:
                # (the columns the model reads: the 3 of columns_needed; live, the later ones repeat the last final)
                own = mel_windows(whole, Fraction(25), slot[1], slot[1] + 1)[0]
                assert np.array_equal(batch.mel[offset][..., :3], own[..., :3]), (batch.first + offset, slot)
                delays.append((batch.first + offset, batch.first + offset - slot[1]))
                audio.append(out[640 * offset:640 * (offset + 1)])
    return delays, np.concatenate(audio), skipped, scheduler


def test_a_session_wins_back_the_latency_a_model_fault_added_from_the_pauses_of_its_speech():
    """A model that did not answer for 10 batches (40 frames, 1.6 s) delays the speech after it by
    that much; a microphone keeps sending (its pauses too), so without catching up the speech stays
    1.6 s late for the rest of the session. Catching up shortens the pauses waiting to be rendered
    until the delay is won back: every loud frame is rendered, in order, with its own audio; each
    pause keeps at least 3 frames; nothing is skipped without a fault, nor of a sender's own
    backlog."""
    from itertools import groupby

    pcm, loud = _speech_with_pauses(30.0)
    frames = len(pcm) // 640
    faults = range(100, 140)
    before, _, none_skipped, plain = _live_run(pcm, catch_up=False, faults=faults)
    after, audio, skipped, caught = _live_run(pcm, catch_up=True, faults=faults)
    (base,) = {d for f, d in before if 50 <= f < 100}  # the delay before the fault (the lookahead's rebuffer)
    assert min(d for f, d in before if f > 600) >= base + 40  # the fault's delay, for good
    assert {d for f, d in after if f > 600} == {base}  # won back
    assert not none_skipped and plain.skipped_frames == 0
    assert len(skipped) == caught.skipped_frames == 40 and caught.debt == 0
    # no loud frame was skipped, and each frame kept carries its own audio, in order
    loud_frames = {k for k in range(frames) if loud[640 * k:640 * (k + 1)].any()}
    assert not loud_frames & skipped
    kept = [k for k in range(frames) if k not in skipped]
    assert [slot for _, slot in after] and len(after) == len(kept)
    assert np.array_equal(audio, np.concatenate([pcm[640 * k:640 * (k + 1)] for k in kept]))
    # a pause keeps at least 3 frames (0.12 s)
    assert min(len(list(run)) for is_loud, run in groupby(k in loud_frames for k in kept) if not is_loud) >= 3
    # the whole speech is accounted for: rendered or skipped
    u = caught.speech.utterances[0]
    assert u.pcm_taken >= u.pcm_n
    # without a fault nothing is skipped; a file sent at once is caught up by the fault's delay only
    assert not _live_run(pcm, catch_up=True, faults=range(0))[2]
    assert not _live_run(pcm, catch_up=True, faults=range(0), realtime=False)[2]
    assert len(_live_run(pcm, catch_up=True, faults=faults, realtime=False)[2]) == 40


def test_an_utterance_from_a_real_time_sender_starts_without_a_stutter():
    """An utterance spoke on its first ready frame; a real-time sender's next frames were not there yet, so it
    spoke 1-3 frames, fell silent for the rebuffer (its audio too: the first 40-120 ms of a word, then 0.2 s
    of silence) and spoke again, counted as the sender being slower than real time (the web page's Speak again
    showed "the speech ran out 1 time(s)"). A new utterance now starts once the rebuffer's frames are ready
    (or it has ended): one stretch of speech, no underrun, whatever the sender's chunking and phase."""
    from itertools import groupby

    from cluster.live.schedule import LiveScheduler

    pcm = (np.random.default_rng(1).standard_normal(16000 * 3) * 3000).astype(np.int16)
    for chunk_ms in (20, 40):
        for phase in range(0, 160, 40):
            speech = SpeechInput(16000, Fraction(25), columns_needed=3)
            scheduler = LiveScheduler(speech, 250, Fraction(25), rebuffer_frames=5)
            shown, sent = [], 0
            for t in range(0, 2000, 4):  # ms; a batch of 4 frames planned every 160 ms
                if t >= phase and (t - phase) % chunk_ms == 0 and sent < len(pcm):
                    speech.append(pcm[sent:sent + 16 * chunk_ms].tobytes())
                    sent += 16 * chunk_ms
                if t % 160 == 0:
                    batch = scheduler.plan(4)
                    shown += [slot is not None for slot in batch.speech]
                    scheduler.commit(batch)
            runs = [len(list(run)) for spoken, run in groupby(shown) if spoken]
            assert len(runs) == 1 and scheduler.underruns == 0, (chunk_ms, phase, runs)
            assert shown.index(True) <= 8, (chunk_ms, phase, shown.index(True))  # within 0.32 s of the start


def test_a_takeover_wins_back_its_stand_still_and_counts_each_skip_once(monkeypatch):
    """The session's actor dies 6 s in, while it still pays a model fault's debt, its last two batches rendered but
    not published; its standby takes over 1 s later from the journal (the speech acknowledged before the death, the
    mark of the last published frame), owes the stand-still (`add_debt`, held while the service sends again what
    the sender sent meanwhile), renders its first segment without the model up to the frame due at its start (the
    stream time the stand-still left: not owed twice; the batch from that frame on is) and wins the rest back from
    the pauses. Reviews' simulations saw 19 frames won back whatever the stand-still (the debt cut to the
    journal's backlog before the speech sent meanwhile came), a batch's 0.16 s never won back, and the journal's
    skip count, read at publication, count skips after the mark twice."""
    import cluster.live.schedule as schedule
    from cluster.live.schedule import LiveScheduler

    now = [0.0]
    monkeypatch.setattr(schedule.time, "monotonic", lambda: now[0])
    pcm, _ = _speech_with_pauses(20.0)
    frame_pcm = [pcm[640 * k:640 * (k + 1)].tobytes() for k in range(len(pcm) // 640)]
    fault, death, stand_still, ahead = range(88, 108), 144, 25, 12  # frames: 40 ms each; a segment of 0.48 s
    published = death - 8  # its last two batches died with it

    def run(catch_up: bool):
        speech = SpeechInput(16000, Fraction(25), columns_needed=3)
        a = LiveScheduler(speech, 250, Fraction(25), rebuffer_frames=5, catch_up=catch_up)
        sent = 0  # speech frames the sender has sent (one per 40 ms)
        late = {}  # speech frame -> its latency in frames (when it is shown less when it was sent)
        skipped_a, skipped_b = set(), set()
        for f in range(0, death, 4):
            speech.append(b"".join(frame_pcm[sent:sent + 4]))
            sent += 4
            batch = a.plan(4)
            if f in fault:
                a.rollback(batch)
                continue
            a.commit(batch)
            if f < published:
                skipped_a |= {k for _, _, k in batch.skipped}
                late |= {slot[1]: f + i - slot[1] for i, slot in enumerate(batch.speech) if slot is not None}
        mark = a.published(published)
        # the standby: the journal's speech, resumed after the mark; the sender kept sending meanwhile
        journal = b"".join(frame_pcm[:sent])
        sent = death + stand_still  # (up to the takeover; kept by the service meanwhile)
        standby = SpeechInput(16000, Fraction(25), columns_needed=3)
        standby.append(journal)
        b = LiveScheduler(standby, 250, Fraction(25), rebuffer_frames=5, catch_up=catch_up)
        b.resume(published, mark)
        assert b.skipped_frames == mark[4] == len(skipped_a)
        assert a.skipped_frames > mark[4] or not catch_up  # (it died paying: skips after the mark, planned again)
        t0, due = death + stand_still, published + ahead  # the takeover's wall time; the frame due then
        b.add_debt(t0 - published, hold_s=2.0)  # as LiveSession._run: from the last publication to now
        first = published
        while first <= due:  # as LiveSession._run: at once and without the model up to the frame due now
            b.rollback(b.plan(4), owed_from=max(0, due - first))
            first += 4
        standby.append(b"".join(frame_pcm[len(journal) // 1280:sent]))  # the service sends it again
        for f in range(first, first + 300, 4):
            wall = t0 + f - due  # when frame f is shown; the sender has sent 4 frames past it, as before the death
            now[0] = wall / 25
            if sent < min(wall + 4, len(frame_pcm)):
                standby.append(b"".join(frame_pcm[sent:wall + 4]))
                sent = wall + 4
            batch = b.plan(4)
            b.commit(batch)
            skipped_b |= {k for _, _, k in batch.skipped}
            late |= {slot[1]: t0 + f - due + i - slot[1] for i, slot in enumerate(batch.speech) if slot is not None}
        return late, a, b, skipped_a | skipped_b

    plain, _, _, _ = run(False)
    caught, before, after, skips = run(True)
    base = plain[60]
    assert caught[60] == base
    assert min(v for k, v in plain.items() if k > 400) >= base + 20 + stand_still  # the fault's and the stand-still's
    assert {v for k, v in caught.items() if k > 400} == {base}  # won back, to the frame
    # each skip counted once: the dead actor's after the mark (it died paying the fault's debt) are planned again
    assert after.skipped_frames == len(skips), (after.skipped_frames, len(skips))


def test_an_utterance_queued_behind_another_is_not_flushed_as_a_paused_sender():
    """A sender that went quiet for `live_flush_after_s` mid-utterance has its utterance's tail rendered at once
    (the batch path's end). A new utterance waits for its rebuffer's frames (its start), and the flush took that
    for a paused sender even when it was queued behind another still rendering, its frames long ready: it was
    cut in two mid-word (20 ms of silence and an end's padding inside a sentence; a review's simulation, e.g. a
    text-to-speech client posting sentences faster than real time). Only an utterance whose rebuffer cannot be
    met is flushed; one whose frames are not yet ready, as before."""
    from types import SimpleNamespace

    from cluster.config import Settings
    from cluster.live.schedule import LiveScheduler
    from cluster.live.session import LiveSession

    pcm = (np.random.default_rng(2).standard_normal(16000 * 5) * 3000).astype(np.int16)
    speech = SpeechInput(16000, Fraction(25), columns_needed=3)
    session = SimpleNamespace(speech=speech, scheduler=LiveScheduler(speech, 250, Fraction(25), rebuffer_frames=5),
                              s=Settings(), last_audio=0.0, _drain=False, started=0.0, max_seconds=3600.0)
    session.end_speech = lambda: LiveSession.end_speech(SimpleNamespace(speech=speech, closing=False, journal=None))
    speech.append(pcm[:16000 * 3].tobytes())  # a first sentence, sent at once and ended: 3 s to render
    speech.end()
    session.scheduler.plan(4)
    speech.append(pcm[16000 * 3:16000 * 4 + 8000].tobytes())  # the second: 1.5 s of it, then nothing for 0.6 s
    assert LiveSession._housekeeping(session, 0.6) is None
    assert len(speech.utterances) == 2 and not speech.utterances[1].ended  # not cut
    # the sender that paused inside an utterance being rendered, its rebuffer not met: its tail goes now
    speech.append(pcm[16000 * 4 + 8000:16000 * 4 + 8000 + 960].tobytes())  # (less than the rebuffer's 5 frames)
    speech.utterances[1].scheduled = speech.utterances[1].ready_frames() - 1
    session.scheduler._utt = 1
    assert LiveSession._housekeeping(session, 1.3) is None and speech.utterances[1].ended


def test_an_audio_socket_of_an_ingress_process_that_is_gone_holds_nothing():
    """A probe: an ingress replica SIGKILLed mid-speech kept its socket's hold on the session for the whole
    `SOCKET_HOLD_S`: the client's reconnect, through the replica Serve started instead, was refused (4409) until
    then, 10.1 s without speech. A lease names its ingress process; one known to be gone holds nothing."""
    import subprocess
    import sys
    import time

    from actors.live import SOCKET_HOLD_S, socket_holds
    from cluster.owners import process_identity

    replica = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held = (f"lease-a|{process_identity(replica.pid)}", time.monotonic())
        now = time.monotonic()
        assert socket_holds(held, "lease-b", now)  # its process runs: held
        assert not socket_holds(held, held[0], now)  # (its own lease)
        assert not socket_holds(held, "lease-b", now + SOCKET_HOLD_S)  # silent for the hold: taken over
        assert socket_holds(("lease-a", now), "lease-b", now)  # a lease naming no process: held for the hold
    finally:
        replica.kill()
        replica.wait(timeout=30)
    assert not socket_holds(held, "lease-b", time.monotonic())  # its process is gone: taken over at once


def test_speech_a_lost_socket_held_back_is_owed(astronaut_video, speech_wav, tmp_path):
    """A probe: an ingress replica killed mid-speech left its sender without a socket for seconds; the speech it
    sent once reconnected stayed that much later for the rest of the utterance (a sender's own pace is never caught
    up). A socket lost (never closed) and replaced mid-utterance now owes its stand-still, as a takeover's is owed;
    once the utterance has ended nothing waited, and nothing is owed."""
    from actors.live import lost_socket_gap

    # what the session's actor owes when a socket takes it over (`LiveSessionActor.attach`)
    assert lost_socket_gap(("old|embedded:h:1:2.00", 100.0), "new", 102.5) == 2.5  # lost, never closed
    assert lost_socket_gap(None, "new", 102.5) is None  # none held it (closed sockets detach)
    assert lost_socket_gap(("new", 100.0), "new", 102.5) is None  # the same socket again
    assert lost_socket_gap(("post", 100.0), "new", 102.5) is None  # a POST held it
    session, _ = _builtin_session("lost", astronaut_video, tmp_path / "session")
    try:
        session.append(_pcm16(speech_wav)[:16000].tobytes())  # mid-utterance
        session.sender_lost(2.0)
        owed = session.scheduler.debt
        assert owed == 50  # 2 s at 25 fps (held for a while against being cut to the speech waiting)
        session.end_speech()
        session.sender_lost(2.0)
        assert session.scheduler.debt <= owed  # the utterance had ended: nothing waited, nothing more owed
    finally:
        session.finish()
        assert session.join(60)


def test_an_ended_sessions_socket_says_why():
    """A probe: a session that reached its `max_seconds` closed its audio socket with 4410 "session ... is ending",
    which did not say why (7.66 s received, 7.2 s rendered). The close says the reason where the session knows it."""
    from service.routers.sessions import _ended_text

    said = _ended_text("s1", {"state": "ending", "reason": "max_seconds", "max_seconds": 8.0})
    assert said == "session s1 is ending: it reached its max_seconds (8 s)"
    assert _ended_text("s1", {"state": "ended", "reason": "idle_timeout"}).endswith("LIPSYNC_LIVE_IDLE_TIMEOUT_S)")
    assert _ended_text("s1", {"state": "ending", "reason": None}) == "session s1 is ending"
    # the web page's Live tab knows a stopping service's close by these words (live.js, `serviceStopped`)
    assert _ended_text("s1", {"state": "ended", "reason": "service_stopped"}).endswith(": the service stopped")
    assert len(_ended_text("0123456789abcdef", {"state": "ending", "reason": "idle_timeout"}).encode()) <= 120
