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


def _pcm16(path: str) -> np.ndarray:
    from scipy.io import wavfile

    rate, data = wavfile.read(path)
    assert rate == 16000 and data.dtype == np.int16
    return data


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
        def write(self, frames):
            batch_frames.append(np.array(frames))
            return super().write(frames)

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

    from cluster.config import get_settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.live.encoder import PUBLISHED, read_playlist
    from cluster.live.session import LiveSession
    from cluster.models import crop_for_spec, load_model

    s = get_settings()
    model = load_model("builtin", s)
    avatar = prepare_avatar(astronaut_video, s)
    session = LiveSession("t", template_path=avatar.template_path, track_path=avatar.track_path, model="builtin",
                          model_size=model.size, crop=crop_for_spec("builtin", None, s), generate=model.generate,
                          sample_rate=16000, out_dir=tmp_path / "session", settings=s)
    session.start()
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
        video_frames = audio_samples = 0
        for frame in container.decode(video=0, audio=0):
            if isinstance(frame, av.VideoFrame):
                video_frames += 1
            else:
                audio_samples += frame.samples
    listed = round(sum(d for _, d in segments) * 25)
    assert video_frames == listed
    assert audio_samples / 48000 == pytest.approx(listed / 25, abs=0.1)  # the encoder is fed 48 kHz
    # the recording: every frame streamed, verified (frame count, audio as long as the video)
    assert session.recording is not None and Path(session.recording).is_file()
    assert stats["recording_seconds"] == pytest.approx(stats["seconds_streamed"], abs=1e-6)
