"""cluster.audio: decoding, Wav2Lip mel spectrogram, mel windows, frame energy."""
from __future__ import annotations

import re
import subprocess
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from cluster import audio, synth
from cluster.errors import InputNotFound, InputUnreadable, NoAudioStream
from cluster.media.ffmpeg import ffmpeg_binary

SR = 16000
TONE_HZ = 440.0
TONE_SECONDS = 2.0

_ENCODE = {
    "wav": ["-c:a", "pcm_s16le"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "96k"],
    "m4a": ["-c:a", "aac", "-b:a", "96k"],
    "flac": ["-c:a", "flac"],
    "ogg": ["-c:a", "libvorbis"],
}


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                   check=True, timeout=60, capture_output=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 440 Hz tone at 44.1 kHz stereo written by the ffmpeg CLI in each format (independent of
    cluster.synth), a video with an audio track, a video without one, and a garbage file."""
    d = tmp_path_factory.mktemp("audio_media")
    files = {}
    for ext, codec in _ENCODE.items():
        p = d / f"tone.{ext}"
        _ffmpeg("-f", "lavfi", "-i", f"sine=frequency={TONE_HZ}:duration={TONE_SECONDS}:sample_rate=44100",
                "-ac", "2", *codec, str(p))
        files[ext] = str(p)
    mp4_with_audio = d / "with_audio.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-f", "lavfi",
            "-i", f"sine=frequency={TONE_HZ}:sample_rate=48000", "-t", str(TONE_SECONDS),
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(mp4_with_audio))
    files["video"] = str(mp4_with_audio)
    mp4_silent = d / "no_audio.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-t", "1",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", str(mp4_silent))
    files["no_audio"] = str(mp4_silent)
    garbage = d / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    files["garbage"] = str(garbage)
    return files


def _dominant_hz(wav: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spec) * SR / len(wav))


@pytest.mark.parametrize("kind", ["wav", "mp3", "m4a", "flac", "ogg", "video"])
def test_load_audio_decodes_formats_to_16k_mono(media, kind):
    wav = audio.load_audio(media[kind])
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(audio.audio_duration(wav) - TONE_SECONDS) < 0.05, len(wav)
    mid = wav[SR // 2: SR // 2 + SR]
    assert abs(_dominant_hz(mid) - TONE_HZ) <= 2.0
    assert 0.05 < np.abs(mid).max() <= 1.0


def test_load_audio_typed_errors(media, tmp_path):
    with pytest.raises(NoAudioStream) as e:
        audio.load_audio(media["no_audio"])
    assert "no_audio.mp4" in str(e.value) and e.value.code == "input.no_audio_stream"
    with pytest.raises(InputUnreadable) as e:
        audio.load_audio(media["garbage"])
    assert "garbage.mp3" in str(e.value) and e.value.cause
    with pytest.raises(InputNotFound):
        audio.load_audio(str(tmp_path / "missing.wav"))


def test_load_audio_deadline_kills_ffmpeg(media):
    from cluster.config import Settings
    from cluster.errors import MediaError

    with pytest.raises(MediaError, match="timed out"):
        audio.load_audio(media["flac"], settings=Settings(ffmpeg_timeout_s=1e-4))


def _librosa_reference(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's audio.melspectrogram, written with librosa (the test-only reference)."""
    import librosa

    y = scipy.signal.lfilter([1, -0.97], [1], wav)
    stft = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800)
    basis = librosa.filters.mel(sr=SR, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    s_db = 20 * np.log10(np.maximum(1e-5, basis @ np.abs(stft))) - 20
    return np.clip(8 * ((s_db + 100) / 100) - 4, -4, 4)


def test_melspectrogram_matches_librosa_reference():
    speech = synth.speech_like(3.3, seed=3)
    for n in (len(speech), 4321, 800):  # several blocks, odd lengths, shorter than one block
        wav = speech[:n]
        mel = audio.melspectrogram(wav)
        ref = _librosa_reference(wav)
        assert mel.dtype == np.float32 and mel.shape == (80, 1 + n // 200) == ref.shape
        assert np.abs(mel - ref).max() < 1e-4
    full = audio.melspectrogram(speech)  # speech reaches well above the floor, pauses sit near it
    assert full.max() > 0 and full.min() < -3.5


def test_melspectrogram_memory_is_bounded_on_ten_minutes():
    wav = (0.1 * np.random.default_rng(1).standard_normal(10 * 60 * SR)).astype(np.float32)
    tracemalloc.start()
    try:
        mel = audio.melspectrogram(wav)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert mel.shape == (80, 1 + len(wav) // 200)
    # peak counts the output and the per-block temporaries (the input existed before)
    assert peak < 3 * (mel.nbytes + wav.nbytes)
    assert peak < mel.nbytes + 32 * 2**20, peak


def test_mel_windows_exact_columns_past_409_seconds():
    t = 80 * 500
    mel = np.tile(np.arange(t, dtype=np.float32), (80, 1))  # each column holds its own index
    win = audio.mel_windows(mel, Fraction(25), 12000, 12003)
    assert win.shape == (3, 1, 80, 16) and win.dtype == np.float32
    assert win[0, 0, 0, 0] == 38400 and win[1, 0, 0, 0] == 38403
    np.testing.assert_array_equal(win[0, 0, 5], np.arange(38400, 38416))
    # past the end the last column repeats
    tail = audio.mel_windows(mel, Fraction(25), 12497, 12498)[0, 0, 0]
    np.testing.assert_array_equal(tail, [39990 + k for k in range(10)] + [t - 1] * 6)
    beyond = audio.mel_windows(mel, Fraction(25), 12600, 12601)  # starts past T
    assert np.all(beyond == t - 1)


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30), Fraction(30000, 1001), Fraction(60)])
def test_mel_windows_start_columns_match_exact_floor(fps):
    t = 5000
    mel = np.tile(np.arange(t, dtype=np.float32), (80, 1))
    start, stop = 1000, 1400
    win = audio.mel_windows(mel, fps, start, stop)
    expected = [min(int(Fraction(i * 80) / fps), t - 1) for i in range(start, stop)]
    np.testing.assert_array_equal(win[:, 0, 0, 0], expected)
    # a sub-range equals the same slice of a longer range (chunks agree with the whole)
    np.testing.assert_array_equal(audio.mel_windows(mel, fps, 1100, 1200), win[100:200])


def test_frame_energy_measures_speech_band_per_frame_span():
    fps = Fraction(25)
    t = np.arange(3 * SR) / SR
    wav = np.zeros_like(t)
    burst = (t >= 1.0) & (t < 1.2)  # frames 25..29 exactly
    wav[burst] = 0.5 * np.sin(2 * np.pi * 1000 * t[burst])
    rumble = t >= 2.0  # 60 Hz, outside the speech band
    wav[rumble] = 0.5 * np.sin(2 * np.pi * 60 * t[rumble])
    e = audio.frame_energy(wav.astype(np.float32), fps, 80)
    assert e.shape == (80,) and e.dtype == np.float32
    assert np.all(e[26:30] > 0.3)  # ~0.35 = RMS of a 0.5 sine
    assert np.all(e[:25] < 1e-6)
    assert np.all(e[32:50] < 0.01)
    assert np.all(e[55:75] < 0.02 * e[27])  # the 60 Hz rumble is filtered out
    assert np.all(e[75:] == 0)  # past the end of the audio


def test_frame_energy_spans_at_ntsc_rate():
    fps = Fraction(30000, 1001)
    n = 10 * SR
    wav = (0.3 * np.sin(2 * np.pi * 800 * np.arange(n) / SR)).astype(np.float32)
    frames = 300  # ceil(10 s * 29.97) = 300
    e = audio.frame_energy(wav, fps, frames)
    assert np.all(np.abs(e[5:] - 0.3 / np.sqrt(2)) < 0.01)


def test_audio_duration():
    assert audio.audio_duration(np.zeros(24000, np.float32)) == 1.5
    assert audio.audio_duration(np.zeros(100, np.float32), sample_rate=100) == 1.0


def test_streamed_decode_and_mel_equal_the_whole_signal_ones(media, tmp_path):
    """A job's prepare step streams: the samples decoded into a file and the mel written block by
    block from it are the bytes `load_audio` and `np.save(melspectrogram(...))` give, also for a
    signal trimmed or padded with silence (sync modes), with blocks that do not divide the length."""
    whole = audio.load_audio(media["flac"])
    with open(tmp_path / "raw.f32", "w+b") as raw:
        n = audio.decode_audio_to_file(media["flac"], raw)
        assert n == whole.size
        for length in (n, n - 3333, n + 7777):
            samples = audio.SampleFile(raw, n, length)
            expected = np.zeros(length, np.float32)
            expected[:min(n, length)] = whole[:length]
            np.testing.assert_array_equal(np.concatenate([b for _, b in samples.blocks(block=5000)]), expected)
            assert audio.write_melspectrogram(samples.read, length, tmp_path / "mel.npy") == \
                audio.mel_frame_count(length)
            np.save(tmp_path / "whole.npy", audio.melspectrogram(expected))
            assert (tmp_path / "mel.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()


def test_streamed_decode_typed_errors(media, tmp_path):
    with open(tmp_path / "raw.f32", "w+b") as raw:
        with pytest.raises(NoAudioStream):
            audio.decode_audio_to_file(media["no_audio"], raw)
        with pytest.raises(InputUnreadable):
            audio.decode_audio_to_file(media["garbage"], raw)
        with pytest.raises(InputNotFound):
            audio.decode_audio_to_file(str(tmp_path / "missing.wav"), raw)


@pytest.mark.parametrize("kind", ["mp3", "tagged_mp3", "m4a", "flac"])
def test_audio_cut_short_is_refused_where_its_header_declares_its_length(media, kind, tmp_path):
    """A probe: an FLAC, MP3 or M4A file cut in half (an upload or copy that stopped) rendered half the speech and
    succeeded, where a WAV cut short is refused. Each declares at its start what it holds: the half file is
    refused at admission where the header says so in bytes (the MP3's Xing header, the M4A's index), else as it
    decodes (FLAC's STREAMINFO sample count), naming both; the whole file is not. An MP3 with ID3 tags in front
    of a few hundred bytes and more (a review: their size was read wrong, and the check skipped) is checked the
    same."""
    from cluster.media.probe import declared_audio_seconds, probe_audio

    whole = media[kind.split("_")[-1]]
    if kind == "tagged_mp3":  # a title of 300 bytes and a cover picture of 20 KB in ID3 tags before the audio
        cover = tmp_path / "cover.png"
        import cv2

        cv2.imwrite(str(cover), np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))
        whole = str(tmp_path / "tagged.mp3")
        _ffmpeg("-i", media["mp3"], "-i", str(cover), "-map", "0", "-map", "1", "-c:a", "copy", "-c:v", "png",
                "-disposition:v", "attached_pic", "-metadata", "title=" + "t" * 300, "-id3v2_version", "3", whole)
        assert Path(whole).stat().st_size > Path(media["mp3"]).stat().st_size + 20000
    if kind == "m4a":  # its index first (a phone's, a web upload's): cut after it, the index outlives the data
        whole = str(tmp_path / "faststart.m4a")
        _ffmpeg("-i", media[kind], "-c", "copy", "-movflags", "+faststart", whole)
    if kind == "flac":
        assert declared_audio_seconds(whole) == pytest.approx(TONE_SECONDS, abs=0.1)
    cut = tmp_path / f"cut.{kind.split('_')[-1]}"
    data = Path(whole).read_bytes()
    cut.write_bytes(data[: len(data) - (Path(media["mp3"]).stat().st_size // 2 if kind == "tagged_mp3" else
                                        len(data) // 2)])
    with pytest.raises(InputUnreadable, match="is truncated") as e:
        if kind == "flac":  # its header is whole: the decode tells
            probe_audio(str(cut))
            audio.load_audio(str(cut))
        else:  # refused at admission
            probe_audio(str(cut))
    if kind.endswith("mp3"):
        assert re.search(r"its header declares \d+ bytes of MP3 audio, the file holds \d+ \((4\d|5\d)%", str(e.value))
    if kind == "flac":
        assert re.search(r"its header declares 2\.\d\d s of audio, the file decodes to [01]\.\d\d s", str(e.value))
        with open(tmp_path / "raw.f32", "w+b") as raw, pytest.raises(InputUnreadable, match="declares 2"):
            audio.decode_audio_to_file(str(cut), raw)
    assert audio.audio_duration(audio.load_audio(whole)) == pytest.approx(TONE_SECONDS, abs=0.05)


def test_an_ogg_or_wav_length_is_no_promise_and_amr_is_audio(media, tmp_path):
    """Formats whose length ffmpeg works out from what is there (Ogg's last page) promise none: not checked. An AMR
    voice recording (`#!AMR`, phones' and messengers' format) was refused as a playlist (`#!` as a script)."""
    from cluster.media.probe import declared_audio_seconds, probe_audio

    assert declared_audio_seconds(media["ogg"]) is None and declared_audio_seconds(media["wav"]) is None
    # an M4A whose timestamps leave a gap (a recording that dropped a second): whole, not a cut (a review: its
    # decoded length, a second short of its index's, was refused as truncated)
    gap = tmp_path / "gap.m4a"
    _ffmpeg("-i", media["m4a"], "-c", "copy", "-bsf:a", "setts=ts=if(gte(PTS\\,44100)\\,PTS+44100\\,PTS)", str(gap))
    assert declared_audio_seconds(str(gap)) is None
    probe_audio(str(gap))
    assert audio.audio_duration(audio.load_audio(str(gap))) > 1.5
    amr = tmp_path / "voice.amr"
    _ffmpeg("-i", media["wav"], "-ar", "8000", "-ac", "1", "-c:a", "libopencore_amrnb", "-b:a", "12.2k", str(amr))
    assert amr.read_bytes().startswith(b"#!AMR\n")
    assert probe_audio(str(amr)).audio.duration == pytest.approx(TONE_SECONDS, abs=0.1)
    assert audio.audio_duration(audio.load_audio(str(amr))) == pytest.approx(TONE_SECONDS, abs=0.05)


def test_the_mel_is_of_the_first_audio_stream_the_one_the_output_plays(tmp_path):
    """A file with two audio streams (speech first, then a silent 5.1 track flagged default): the
    mel is computed from the first, the stream the job's AAC is made of and admission probes;
    ffmpeg on its own picks the default one, and the lips would follow silence."""
    speech = synth.write_audio(str(tmp_path / "speech.wav"), synth.speech_like(1.0, seed=3))
    both = tmp_path / "two-tracks.mka"
    _ffmpeg("-i", speech, "-f", "lavfi", "-i", "anullsrc=channel_layout=5.1:sample_rate=48000", "-t", "1",
            "-map", "0:a", "-map", "1:a", "-c:a", "pcm_s16le", "-disposition:a:0", "0", "-disposition:a:1", "default",
            str(both))
    alone = audio.load_audio(speech)
    first = audio.load_audio(str(both))
    assert np.abs(first).max() > 0.05  # the speech, not the silent track
    assert np.allclose(first[:len(alone)], alone, atol=1e-3)


def test_audio_whose_header_hides_its_length_is_refused_while_decoding(tmp_path):
    """A FLAC whose STREAMINFO claims 1 s over 3 s of speech passes the probe (it reads the header);
    the decode stops at the limit (`max_input_seconds`) with `InputTooLong` instead of writing and
    rendering whatever length is hidden behind it."""
    import struct

    from cluster.config import Settings
    from cluster.errors import InputTooLong
    from cluster.media.probe import probe_audio
    from cluster.synth import speech_like, write_audio

    path = write_audio(str(tmp_path / "lying.flac"), speech_like(3.0, seed=1))
    data = bytearray(Path(path).read_bytes())
    assert data[:4] == b"fLaC"
    (fields,) = struct.unpack(">Q", bytes(data[18:26]))  # sample rate, channels, bits, 36-bit total samples
    data[18:26] = struct.pack(">Q", (fields & ~((1 << 36) - 1)) | 16000)  # "1 s"
    Path(path).write_bytes(data)
    s = Settings(storage_root=tmp_path / "store", max_input_seconds=1.5)
    assert probe_audio(path, s).audio.duration == 1.0  # the header passes admission
    with open(tmp_path / "raw.f32", "w+b") as raw:
        with pytest.raises(InputTooLong, match="1.5 s"):
            audio.decode_audio_to_file(path, raw, s)
        assert raw.tell() <= (1.5 + 1) * 16000 * 4 + (1 << 20)  # stopped near the limit


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_audio_holding_nan_or_infinity_is_refused_naming_where(tmp_path, bad):
    """A float WAV with NaN or infinite samples passed admission and the mel, then failed the job's
    AAC encoder ("Invalid argument": `render.encode_failed`, exit 1, naming the server's copy); the
    decode now refuses it as corrupt input, with the time of the first such sample."""
    import scipy.io.wavfile

    samples = (0.1 * np.sin(np.arange(3 * SR) * 2 * np.pi * TONE_HZ / SR)).astype(np.float32)
    samples[int(1.5 * SR):int(1.5 * SR) + 100] = bad
    path = tmp_path / "corrupt.wav"
    scipy.io.wavfile.write(path, SR, samples)
    with open(tmp_path / "raw.f32", "w+b") as raw:
        with pytest.raises(InputUnreadable, match=r"corrupt.wav holds samples that are not numbers .* at 1\.[45]"):
            audio.decode_audio_to_file(str(path), raw)
    with pytest.raises(InputUnreadable, match="not numbers"):
        audio.load_audio(str(path))
    samples[int(1.5 * SR):int(1.5 * SR) + 100] = 0.0  # the same file without them decodes
    scipy.io.wavfile.write(path, SR, samples)
    assert audio.load_audio(str(path)).size == 3 * SR


def _room(seconds: float, dbfs: float, seed: int = 7, pink: bool = False) -> np.ndarray:
    g = np.random.default_rng(seed).normal(0.0, 1.0, int(seconds * 16000))
    if pink:
        f = np.fft.rfft(g)
        f[1:] /= np.sqrt(np.arange(1, len(f)))
        g = np.fft.irfft(f, len(g))
    return (g / g.std() * 10 ** (dbfs / 20)).astype(np.float32)


def _band_level(m: np.ndarray) -> np.ndarray:
    """dB of each column's speech band, as the built-in model reads it (the bands' mean magnitude)."""
    return 20 * np.log10(audio.mel_magnitude(m[audio._room_band()]).mean(axis=0))


def test_a_room_loud_enough_to_move_the_mouth_is_measured_and_taken_out_of_each_column():
    """`room_spectrum` finds a room only where it is loud enough to move the built-in model's mouth (white noise
    from -60 dBFS), from the quietest columns; `denoise_mel` drops a band at the room's level by DENOISE_DEPTH_DB,
    keeps speech well above it, works column by column and leaves a recording without such a room as it was."""
    speech = synth.speech_like(8.0, seed=5).astype(np.float32)  # about -10 dBFS, its pauses exact zeros
    clean = audio.melspectrogram(speech)
    assert audio.room_spectrum(clean) is None  # zeros are no room, and quiet speech is none either
    assert audio.room_spectrum(audio.melspectrogram(speech + _room(8.0, -70))) is None  # too quiet to move it
    assert audio.room_spectrum(audio.melspectrogram(speech + _room(8.0, -60))) is not None  # as README says
    # a voice without pauses (a held vowel, as singing holds it): its quietest columns are the voice, not a room
    # (taken for one, 1.5x of it subtracted closed the mouth on most frames of a quiet one)
    t = np.arange(16000 * 4) / 16000
    vowel = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((150, 300, 450, 700, 1100, 2400), 1))
    for dbfs in (-22, -42):
        held = (vowel / np.sqrt(np.mean(vowel ** 2)) * 10 ** (dbfs / 20) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t)))
        assert audio.room_spectrum(audio.melspectrogram(held.astype(np.float32))) is None, dbfs
    assert audio.room_spectrum(np.full((80, 50), -4.0, np.float32)) is None  # digital silence only
    for pink in (False, True):
        noisy = audio.melspectrogram(speech + _room(8.0, -45, pink=pink))
        room = audio.room_spectrum(noisy)
        assert room is not None
        level = audio.room_level_db(room)
        alone = audio.room_level_db(audio.mel_magnitude(audio.melspectrogram(_room(8.0, -45, pink=pink))).mean(axis=1))
        assert abs(level - alone) < 1.5, (level, alone)  # the room, not the speech
        out = audio.denoise_mel(noisy, room)
        assert out.dtype == np.float32 and out.shape == noisy.shape
        assert np.array_equal(audio.denoise_mel(noisy[:, 123:345], room), out[:, 123:345])
        band = audio._room_band()
        quiet = clean[band].max(axis=0) <= -4.0  # columns of the pauses: the room alone there
        loud = clean[band].mean(axis=0) > np.percentile(clean[band].mean(axis=0), 80)  # vowels' columns

        drop = (_band_level(noisy) - _band_level(out))[quiet]
        assert drop.mean() > 0.6 * audio.DENOISE_DEPTH_DB, drop.mean()  # bands the room's own swing lifts fall less
        assert np.abs(_band_level(out) - _band_level(clean))[loud].mean() < 1.0  # speech as it is without the room
    assert audio.denoise_mel(clean, None) is clean

