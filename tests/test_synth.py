"""cluster.synth: speech-like audio, audio writing, the astronaut template and the demo inputs."""
from __future__ import annotations

import wave
from fractions import Fraction

import av
import numpy as np
import pytest
import scipy.signal

from cluster import audio, synth

SR = 16000
FPS = Fraction(25)


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a boolean array."""
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    return list(edges[1::2] - edges[::2])


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return synth.speech_like(12.0, seed=5)


def test_speech_like_is_deterministic_and_bounded(speech):
    assert speech.dtype == np.float32 and speech.shape == (12 * SR,)
    assert np.abs(speech).max() <= 1.0 and np.abs(speech).max() > 0.5
    np.testing.assert_array_equal(speech, synth.speech_like(12.0, seed=5))
    assert not np.array_equal(speech[:SR], synth.speech_like(1.0, seed=6))


def test_speech_like_has_pauses_and_voiced_syllables(speech):
    n_frames = 12 * 25
    energy = audio.frame_energy(speech, FPS, n_frames)
    loud = energy > 0.1 * np.percentile(energy, 90)
    quiet = energy < 1e-3
    assert 0.5 < loud.mean() < 0.95  # mostly speech
    pauses = [r for r in _runs(quiet) if r >= 7]  # >= 0.28 s of near silence
    assert len(pauses) >= 3, _runs(quiet)  # a pause every 1.5-3 s over 12 s
    assert max(_runs(quiet)) <= 0.85 * 25 + 6  # pauses are 0.3-0.8 s (plus syllable decay)
    # syllables: the energy rises and falls several times a second inside speech runs
    peaks, _ = scipy.signal.find_peaks(energy, prominence=0.2 * np.percentile(energy, 90))
    assert 2.0 * 9 <= len(peaks) <= 7.0 * 12


def test_speech_like_voicing_has_a_speaking_pitch(speech):
    hop = SR // 25
    energy = audio.frame_energy(speech, FPS, 300)
    found = []
    for i in np.argsort(energy)[-20:]:  # the loudest frames are voiced
        x = speech[i * hop: i * hop + 2 * hop].astype(np.float64)
        x -= x.mean()
        ac = np.correlate(x, x, "full")[len(x) - 1:]
        lo, hi = SR // 260, SR // 90
        found.append(SR / (lo + np.argmax(ac[lo:hi])))
    f0 = np.median(found)
    assert 100 <= f0 <= 230, found


def test_speech_like_without_pauses():
    wav = synth.speech_like(6.0, seed=2, pause_every=None)
    quiet = audio.frame_energy(wav, FPS, 150) < 1e-3
    assert max(_runs(quiet[10:]), default=0) < 5  # no pause after the lead-in


def test_write_audio_wav_is_16bit_pcm(tmp_path, speech):
    path = synth.write_audio(str(tmp_path / "s.wav"), speech[:SR])
    with wave.open(path, "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, SR, SR)
        pcm = np.frombuffer(w.readframes(SR), dtype="<i2")
    np.testing.assert_allclose(pcm / 32768.0, speech[:SR], atol=1 / 32768)
    np.testing.assert_allclose(audio.load_audio(path), speech[:SR], atol=1 / 32768)


@pytest.mark.parametrize("ext", [".mp3", ".m4a", ".aac", ".flac", ".ogg"])
def test_write_audio_round_trip_through_ffmpeg(tmp_path, speech, ext):
    original = speech[: 3 * SR]
    back = audio.load_audio(synth.write_audio(str(tmp_path / f"s{ext}"), original))
    # raw ADTS (.aac) keeps the encoder's 1024-sample priming; the containers trim it
    assert abs(len(back) - len(original)) <= (2048 if ext == ".aac" else 0.01 * SR)
    n = min(len(back), len(original))
    lags = range(0, 1200) if ext == ".aac" else range(0, 1)
    corr = max(np.corrcoef(back[lag:lag + n - 1200], original[:n - 1200])[0, 1] for lag in lags)
    assert corr > (0.9999 if ext == ".flac" else 0.98)


def test_write_audio_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="xyz"):
        synth.write_audio(str(tmp_path / "s.xyz"), np.zeros(100, np.float32))


def _decode(path: str):
    with av.open(path) as c:
        s = c.streams.video[0]
        info = (s.width, s.height, s.average_rate, s.codec_context.name, s.codec_context.pix_fmt,
                [a.codec_context.name for a in c.streams.audio])
        frames = [(f.rotation, f.to_ndarray(format="bgr24")) for f in c.decode(video=0)]
    return info, frames


@pytest.mark.parametrize("size,fps,seconds", [((320, 240), Fraction(25), 2.0),
                                               ((240, 320), Fraction(30000, 1001), 1.5)])
def test_astronaut_template_size_fps_frames(tmp_path, size, fps, seconds):
    path = synth.astronaut_template(str(tmp_path / "t.mp4"), seconds=seconds, fps=fps, size=size)
    (w, h, rate, codec, pix_fmt, audio_codecs), frames = _decode(path)
    assert (w, h) == size and rate == fps and codec == "h264" and pix_fmt == "yuv420p"
    assert len(frames) == round(seconds * fps) and audio_codecs == []
    first, last = frames[0][1].astype(np.float32), frames[-1][1].astype(np.float32)
    # a photographed scene (not flat), moving slowly: frames differ, but only a little
    assert first.std() > 30
    step = np.abs(frames[1][1].astype(np.float32) - first).mean()
    assert 0.05 < step < 6 and step < np.abs(last - first).mean()


def test_astronaut_template_still_without_head_motion(tmp_path):
    _, frames = _decode(synth.astronaut_template(str(tmp_path / "s.mp4"), seconds=1.0, head_motion=False))
    assert np.abs(frames[-1][1].astype(np.float32) - frames[0][1].astype(np.float32)).mean() < 1.5


def test_astronaut_template_muxes_audio(tmp_path, speech):
    path = synth.astronaut_template(str(tmp_path / "a.mp4"), seconds=2.0, audio=speech[: 2 * SR])
    (_, _, _, _, _, audio_codecs), frames = _decode(path)
    assert audio_codecs == ["aac"] and len(frames) == 50
    back = audio.load_audio(path)
    assert abs(len(back) - 2 * SR) < 0.05 * SR
    assert np.corrcoef(back[: SR], speech[: SR])[0, 1] > 0.95


def test_astronaut_template_rotation_is_display_metadata(tmp_path):
    upright = synth.astronaut_template(str(tmp_path / "u.mp4"), seconds=0.4, size=(320, 240), seed=3)
    rotated = synth.astronaut_template(str(tmp_path / "r.mp4"), seconds=0.4, size=(320, 240), seed=3,
                                       rotation=90)
    (w, h, *_), frames = _decode(rotated)
    assert (w, h) == (240, 320)  # stored sideways
    _, reference = _decode(upright)
    for (rot, stored), (_, ref) in zip(frames, reference):
        assert rot == -90  # PyAV: counter-clockwise degrees, i.e. the player turns it 90 clockwise
        shown = np.rot90(stored, k=rot // 90)  # what a player displays
        assert shown.shape == ref.shape
        assert np.abs(shown.astype(np.float32) - ref.astype(np.float32)).mean() < 3


def test_make_demo_inputs(tmp_path):
    audio_path, video_path = synth.make_demo_inputs(str(tmp_path / "demo"), seconds=6.0)
    wav = audio.load_audio(audio_path)
    assert audio_path.endswith(".wav") and abs(audio.audio_duration(wav) - 6.0) < 1e-3
    (w, h, rate, *_), frames = _decode(video_path)
    assert (w, h, rate) == (640, 480, 25)
    assert len(frames) / 25 < audio.audio_duration(wav) and len(frames) == 100
