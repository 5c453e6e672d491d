"""A job's first segment does not wait for the whole of its audio (issue 20's first-frame target).

Prepare writes only the mel columns the first chunk reads (`prepare_job(defer_mel=True)`); the
first chunk renders and publishes from them while the whole spectrogram is written afterwards
(`write_job_mel`), bit for bit the one a whole prepare writes. The job's AAC is encoded up to
the first chunk's end, then held until the first segment is published. Checked on real files:
the first segment's HLS marker exists while `mel.npy` does not.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.schemas import JobState, RenderRequest
from tests.helpers import decode_all, wait_until

LONG_SECONDS = 13.2  # > 1024 mel columns (12.8 s): the first chunk's columns are a head, not the whole


@pytest.fixture(scope="module")
def long_wav(media_dir) -> str:
    from cluster.synth import speech_like, write_audio

    return write_audio(str(media_dir / "speech_long.wav"), speech_like(LONG_SECONDS, seed=5))


def test_first_chunk_is_published_before_the_whole_mel_is_written(tmp_path, long_wav, astronaut_video):
    from cluster.audio import load_audio, mel_frame_count, melspectrogram
    from cluster.config import Settings
    from cluster.errors import InputsGone
    from cluster.hls import AUDIO_FILE, HlsPublisher, hls_dir, published_chunks
    from cluster.models import load_model
    from cluster.render import admit, plan_for_chunk, prepare_job, render_chunk, write_job_mel

    s = Settings(storage_root=tmp_path / "store", chunk_seconds=1.0, keep_segments=True)
    model = load_model("builtin", s)
    request = admit("deferred", RenderRequest(audio=long_wav, video=astronaut_video), s)
    plan = prepare_job("deferred", request, s, model_size=model.size, defer_mel=True)
    mel, head_path = Path(plan.mel_path), Path(plan.mel_head_path)
    assert plan.mel_pending and head_path.is_file() and not mel.exists()
    head = np.load(head_path)
    assert head.shape[1] < mel_frame_count(plan.audio_samples)  # a head, not the whole spectrogram
    with pytest.raises(InputsGone):  # the other chunks wait for the whole mel
        render_chunk(plan, plan.chunks[1], model.generate, s)

    publisher = HlsPublisher(plan, s).start()
    try:
        first = plan.chunks[0]
        # the AAC stops at the first chunk's end until its segment is out
        track = publisher.track
        track.wait_format(60)
        end = float(first.stop / plan.fps)
        track.wait_until(round(end * track.sample_rate), 60)
        time.sleep(0.3)
        assert track.last_pts < track.sample_rate * (end + 0.5) and not track.done
        render_chunk(plan_for_chunk(plan, first), first, model.generate, s)
        publisher.chunk_done(0)
        directory = hls_dir(plan.job_dir)
        wait_until(lambda: published_chunks(directory, len(plan.chunks)), 60, what="the first segment")
        assert not mel.exists()  # published from the head alone
        wait_until(lambda: (directory / AUDIO_FILE).exists(), 60, what="the whole AAC once the segment is out")
    finally:
        publisher.close()
    first_from_head = decode_all(plan.segment_path(0))

    write_job_mel(plan, request, s)
    assert not plan.mel_pending
    whole = np.load(mel)
    assert np.array_equal(whole, melspectrogram(load_audio(long_wav, s)))
    assert np.array_equal(whole[:, :head.shape[1]], head)
    reference = prepare_job("whole", admit("whole", RenderRequest(audio=long_wav, video=astronaut_video), s), s,
                            model_size=model.size)
    assert not reference.mel_head_path and mel.read_bytes() == Path(reference.mel_path).read_bytes()
    render_chunk(plan, plan.chunks[0], model.generate, s)  # the first chunk again, from the whole mel
    assert np.array_equal(decode_all(plan.segment_path(0)), first_from_head)

    mel.unlink()  # a step run again (e.g. after a restart) writes the same file
    assert plan.mel_pending
    write_job_mel(plan, request, s)
    assert np.array_equal(np.load(mel), whole)


def test_a_short_job_writes_its_whole_mel_at_prepare(tmp_path, speech_wav, astronaut_video):
    from cluster.config import Settings
    from cluster.render import admit, prepare_job

    s = Settings(storage_root=tmp_path / "store", chunk_seconds=1.0)
    plan = prepare_job("short", admit("short", RenderRequest(audio=speech_wav, video=astronaut_video), s), s,
                       model_size=96, defer_mel=True)
    assert len(plan.chunks) > 1 and not plan.mel_head_path and Path(plan.mel_path).is_file()


def test_a_job_keeps_the_quality_it_was_planned_with(tmp_path, speech_wav, astronaut_video):
    """The plan fixes the job's CRF: a service restarted mid-job with another LIPSYNC_CRF rendered
    the job's remaining chunks at the new quality (one video, two qualities: 1 MB per 20 s, then
    150 KB)."""
    from cluster.config import Settings
    from cluster.render import admit, plan_for_chunk, prepare_job

    s = Settings(storage_root=tmp_path / "store", chunk_seconds=1.0, crf=30)
    plan = prepare_job("q", admit("q", RenderRequest(audio=speech_wav, video=astronaut_video), s), s, model_size=96)
    assert plan.crf == 30 and plan_for_chunk(plan, plan.chunks[-1]).crf == 30
    asked = prepare_job("q2", admit("q2", RenderRequest(audio=speech_wav, video=astronaut_video, crf=12), s), s,
                        model_size=96)
    assert asked.crf == 12


@pytest.mark.ray
def test_cluster_job_renders_its_first_chunk_from_the_mel_head(runtime, long_wav, astronaut_video, tmp_path):
    from cluster.hls import hls_dir, published_chunks

    job = runtime.submit(RenderRequest(audio=long_wav, video=astronaut_video, output=str(tmp_path / "o.mp4")))
    st = runtime.wait(job.id, timeout=300)
    assert st.state == JobState.succeeded, st.error
    assert "features" in {stage.stage for stage in st.stages}  # the whole mel was its own step
    job_dir = Path(runtime.settings.storage_root) / "jobs" / job.id
    assert (job_dir / "mel-head.npy").is_file() and (job_dir / "mel.npy").is_file()
    frames = decode_all(st.output)
    assert len(frames) == round(LONG_SECONDS * 25)
    markers = published_chunks(hls_dir(job_dir), 10_000)
    assert sum(round(p["duration"] * 25) for m in markers for p in m["parts"]) == len(frames)


@pytest.mark.ray
def test_a_restarted_manager_writes_a_missing_whole_mel_again(runtime, long_wav, astronaut_video, tmp_path):
    import ray

    from cluster.audio import load_audio, melspectrogram

    # a model that takes 40 ms a frame (no CPU): the job is still rendering when the manager goes
    job = runtime.submit(RenderRequest(audio=long_wav, video=astronaut_video, output=str(tmp_path / "o.mp4"),
                                       model="latency:40:96"))
    mel = Path(runtime.settings.storage_root) / "jobs" / job.id / "mel.npy"
    wait_until(lambda: mel.exists() or runtime.status(job.id).state.terminal, 120, what="the whole mel")
    assert not runtime.status(job.id).state.terminal
    ray.kill(runtime.manager(), no_restart=False)
    mel.unlink()  # the head stays: the resumed job writes the whole mel again before its other chunks
    st = runtime.wait(job.id, timeout=300)
    assert st.state == JobState.succeeded, st.error
    assert len(decode_all(st.output)) == round(LONG_SECONDS * 25)
    assert np.array_equal(np.load(mel), melspectrogram(load_audio(long_wav)))


def test_aac_is_encoded_up_to_its_limit_and_paced_on(long_wav):
    import threading

    from cluster.media.aac import AacTrack

    track = AacTrack(long_wav, LONG_SECONDS, hold_after_s=1.0, hold_max_s=60)
    worker = threading.Thread(target=track.encode, daemon=True)
    worker.start()
    try:
        track.wait_format(60)
        for limit in (1.0, 5.0):  # held at each limit, never far past it
            track.wait_until(round(limit * track.sample_rate), 60)
            time.sleep(0.3)
            assert track.last_pts < track.sample_rate * (limit + 0.5) and not track.done
            track.allow_until(limit + 4.0)
        track.allow_until(2.0)  # a limit never moves back
        track.release()
        worker.join(60)
        assert track.done and track.last_pts >= track.sample_rate * (LONG_SECONDS - 0.1)
    finally:
        track.stop()


def test_a_quiet_recording_reaches_the_model_at_a_usual_level(tmp_path, long_wav, astronaut_video):
    """A probe: speech recorded 20 dB quieter (a phone's, a lavalier's: RMS -36 dBFS) moved the built-in model's
    mouth a ninth as far, and 40 dB quieter not at all, with nothing said. The model now hears a quiet recording
    at a usual level (`model_input_gain_db`, the same gain in the first chunk's mel head and the whole mel); the
    output's audio is the file as given. Speech at a usual level is left as it is."""
    from cluster.audio import MODEL_SPEECH_DBFS, load_audio, melspectrogram
    from cluster.config import Settings
    from cluster.models import load_model
    from cluster.render import admit, prepare_job, write_job_mel
    from cluster.synth import write_audio

    s = Settings(storage_root=tmp_path / "store", chunk_seconds=1.0)
    model = load_model("builtin", s)
    usual = load_audio(long_wav, s)
    quiet = write_audio(str(tmp_path / "quiet.wav"), usual * 0.1)  # -20 dB
    reference = np.load(prepare_job("usual", admit("usual", RenderRequest(audio=long_wav, video=astronaut_video), s),
                                    s, model_size=model.size).mel_path)
    request = admit("quiet", RenderRequest(audio=quiet, video=astronaut_video), s)
    plan = prepare_job("quiet", request, s, model_size=model.size, defer_mel=True)
    level = 20 * np.log10(np.percentile(np.sqrt((usual[:len(usual) // 320 * 320].reshape(-1, 320) ** 2).mean(1)), 98))
    assert plan.model_gain_db == pytest.approx(MODEL_SPEECH_DBFS - (level - 20), abs=0.1), (plan.model_gain_db, level)
    head = np.load(plan.mel_head_path)
    write_job_mel(plan, request, s)  # (checks the whole against the head it extends)
    whole = np.load(plan.mel_path)
    raised = melspectrogram(load_audio(quiet, s) * np.float32(10 ** (plan.model_gain_db / 20)))
    assert np.abs(whole - raised).max() < 1e-4 and np.array_equal(whole[:, :head.shape[1]], head)
    # a usual recording's features, but for the few dB between its level and the model's; before: 20 dB apart
    before = np.abs(melspectrogram(load_audio(quiet, s)) - reference).mean()
    assert np.abs(whole - reference).mean() < before / 5, (np.abs(whole - reference).mean(), before)
    assert plan.audio_path == request.audio  # the output's audio: the file as given, not raised
    usual_plan = prepare_job("again", admit("again", RenderRequest(audio=long_wav, video=astronaut_video), s), s,
                             model_size=model.size)
    assert usual_plan.model_gain_db == 0.0


def test_a_noisy_room_does_not_move_the_mouth_in_the_pauses(tmp_path, long_wav, astronaut_video):
    """The built-in model's mouth opens on white noise from about -50 dBFS (still at -55). A recording made in such
    a room (here -45 dBFS under speech at a usual level) moved the mouth in every pause: the room is measured between
    the words and taken out of the model's input (`denoise_mel`), so the pauses stay still and the speech still opens
    the mouth. A quiet recording raised in full by `model_input_gain_db` (+17 dB; its room from -65 to -48) moved it
    too: its gain stops where its room reaches `NOISE_CEILING_DBFS` (-56), whose rest is taken out as well."""
    from cluster.audio import NOISE_CEILING_DBFS, load_audio, mel_windows, melspectrogram
    from cluster.config import Settings
    from cluster.live.speech import SILENT_MEL
    from cluster.models import load_model
    from cluster.render import admit, prepare_job, write_job_mel
    from cluster.synth import write_audio

    s = Settings(storage_root=tmp_path / "store", chunk_seconds=1.0)
    model = load_model("builtin", s)
    usual = load_audio(long_wav, s)
    rng = np.random.default_rng(7)
    per = 16000 // 25
    frames = len(usual) // per
    # frames in the middle of the speech's pauses (none of its samples within 3 frames either side), and its loudest
    quiet = [i for i in range(3, frames - 3) if np.abs(usual[(i - 3) * per:(i + 4) * per]).max() < 1e-3][:8]
    energy = np.array([np.abs(usual[i * per:(i + 1) * per]).mean() for i in range(frames)])
    loud = [int(i) for i in np.argsort(energy)[-8:]]
    assert len(quiet) == 8
    crops = np.random.default_rng(1).integers(0, 255, (8, model.size, model.size, 3), dtype=np.uint8)
    silent = model.generate(np.full((8, 1, 80, 16), SILENT_MEL, np.float32), crops).astype(int)

    def moved(m: np.ndarray, which: list[int]) -> float:
        windows = np.concatenate([mel_windows(m, plan.fps, i, i + 1) for i in which])
        return float(np.abs(model.generate(windows, crops).astype(int) - silent).mean())

    def planned(name: str, wav: np.ndarray, settings: Settings = s):
        request = admit(name, RenderRequest(audio=write_audio(str(tmp_path / f"{name}.wav"), wav),
                                            video=astronaut_video), settings)
        plan = prepare_job(name, request, settings, model_size=model.size, defer_mel=True)
        write_job_mel(plan, request, settings)  # checks the whole mel against the head the first chunk read
        return plan, np.load(plan.mel_path)

    plan, clean = planned("clean", usual)
    assert plan.model_room == [] and np.array_equal(clean, melspectrogram(usual))  # as it was
    speaking = moved(clean, loud)
    noisy_room = usual + rng.normal(0.0, 10 ** (-45 / 20), len(usual)).astype(np.float32)
    plan, mel = planned("room", noisy_room)
    assert len(plan.model_room) == 80 and plan.model_gain_db == 0.0
    assert moved(mel, quiet) < 0.5, moved(mel, quiet)
    assert moved(mel, loud) > 0.8 * speaking, (moved(mel, loud), speaking)
    plain = Settings(storage_root=tmp_path / "store", chunk_seconds=1.0, denoise_model_input=False)
    plan, mel = planned("room-plain", noisy_room, plain)
    assert plan.model_room == [] and moved(mel, quiet) > 1.0, moved(mel, quiet)  # heard as it is: the pauses moved
    quiet_recording = usual * np.float32(0.1) + rng.normal(0.0, 10 ** (-65 / 20), len(usual)).astype(np.float32)
    plan, mel = planned("quiet", quiet_recording)  # speech at about -30 dBFS, its room at -65
    assert 5 < plan.model_gain_db <= NOISE_CEILING_DBFS + 65 + 0.5, plan.model_gain_db  # raised, not the 17 dB in full
    assert moved(melspectrogram(quiet_recording * np.float32(10 ** (17 / 20))), quiet) > 1.0  # in full: they moved
    assert moved(mel, quiet) < 0.5, moved(mel, quiet)
    noisy = quiet_recording
    # (a review) digital silence, of an edited file's zeroed lead-in or of the silence a sync mode pads with, is no
    # room: the cap holds
    noisy = quiet_recording
    s = plain
    lead_in = write_audio(str(tmp_path / "lead_in.wav"), np.concatenate([np.zeros(16000 * 3, np.float32), noisy]))
    padded = RenderRequest(audio=lead_in, video=astronaut_video, sync_mode="silence")
    again = prepare_job("lead-in", admit("lead-in", padded, s), s, model_size=model.size, defer_mel=True)
    assert abs(again.model_gain_db - plan.model_gain_db) < 0.5, (again.model_gain_db, plan.model_gain_db)


def test_the_model_hears_the_speech_of_an_offset_too_hot_or_cancelling_file(tmp_path, long_wav, astronaut_video):
    """A probe's files that rendered `succeeded` with the mouth wrong: a recorder's DC offset (the speech read as
    loud as its room, so a quiet recording got no gain, and the offset's step at the start opened the mouth on
    silence); a float file 12 dB beyond full scale (its mel saturated: the mouth never closed); a stereo file with
    one channel's polarity inverted (its mix is silence: the mouth never moved). The model hears each as it hears
    the plain recording: the offset taken off, the level brought down, the channel that does not cancel."""
    from cluster.audio import MODEL_LOUDEST_DBFS, MODEL_SPEECH_DBFS, load_audio, model_input_gain_db
    from cluster.config import Settings
    from cluster.media.ffmpeg import ffmpeg_binary
    from cluster.models import load_model
    from cluster.render import admit, prepare_job
    from cluster.synth import write_audio

    s = Settings(storage_root=tmp_path / "store", chunk_seconds=1.0)
    size = load_model("builtin", s).size
    usual = load_audio(long_wav, s)

    def planned(name: str, audio: str):
        plan = prepare_job(name, admit(name, RenderRequest(audio=audio, video=astronaut_video), s), s,
                           model_size=size)
        return plan, np.load(plan.mel_path)

    quiet = usual * np.float32(0.3)
    reference, reference_mel = planned("quiet", write_audio(str(tmp_path / "quiet.wav"), quiet))
    assert reference.model_gain_db > 5 and reference.model_dc == 0.0
    offset, mel = planned("offset", write_audio(str(tmp_path / "offset.wav"), quiet + np.float32(0.5)))
    assert abs(offset.model_dc - 0.5) < 1e-3, offset.model_dc
    assert abs(offset.model_gain_db - reference.model_gain_db) < 0.5, (offset.model_gain_db, reference.model_gain_db)
    assert np.abs(mel - reference_mel).mean() < 0.05, np.abs(mel - reference_mel).mean()
    hot_path = str(tmp_path / "hot.wav")  # float samples up to 4x full scale
    subprocess.run([ffmpeg_binary(s), "-v", "error", "-y", "-i", long_wav, "-af", "volume=12dB", "-c:a", "pcm_f32le",
                    hot_path], check=True, timeout=60)
    hot, mel = planned("hot", hot_path)
    plain, plain_mel = planned("plain", long_wav)
    assert hot.model_gain_db < -3, hot.model_gain_db  # brought down to MODEL_LOUDEST_DBFS
    assert plain.model_gain_db == 0.0 and MODEL_SPEECH_DBFS < MODEL_LOUDEST_DBFS
    assert model_input_gain_db(MODEL_LOUDEST_DBFS + 0.01) == pytest.approx(-0.01)  # continuous (a review: -9 dB)
    assert (mel >= 3.99).mean() <= (plain_mel >= 3.99).mean() + 0.01  # not saturated
    cancelling = str(tmp_path / "cancelling.wav")
    subprocess.run([ffmpeg_binary(s), "-v", "error", "-y", "-i", long_wav, "-af", "pan=stereo|c0=c0|c1=-1*c0",
                    cancelling], check=True, timeout=60)
    _, mel = planned("cancelling", cancelling)
    assert np.abs(mel - plain_mel).max() < 0.01, np.abs(mel - plain_mel).max()  # its left channel: the speech
