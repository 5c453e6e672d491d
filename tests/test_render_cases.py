"""End-to-end render cases (issue #2), in process with `render_local` (no Ray).

Every case renders real generated media and checks the output independently of the render
path's own verification: H.264 video + AAC audio, exactly N = ceil(audio_seconds * fps) frames
(counted by demuxing), durations equal to the audio's within one frame, the template's exact fps,
and where it matters the template frames each output frame shows (PSNR of the top rows of the
frame, far from the face, against the planned template frame).
"""
from __future__ import annotations

import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cluster.audio import frame_energy, load_audio
from cluster.config import get_settings
from cluster.errors import OutputVerificationError, RenderError
from cluster.media.encode import SegmentEncoder
from cluster.media.finalize import verify_output
from cluster.media.probe import count_video_frames, probe
from cluster.quality import pearson
from cluster.render import admit, finalize_job, job_dir, new_job_id, prepare_job, render_chunk, render_local
from cluster.schemas import MediaInfo, RenderRequest
from cluster.synth import astronaut_template, speech_like, write_audio
from tests.helpers import decode_all, psnr

SR = 16000
SMALL = (320, 240)
MATCH_DB = 35.0
"""Top-rows PSNR of an output frame against the template frame it should show (measured ~40 dB:
one re-encode at CRF 16); neighbouring template frames differ by head motion."""


# --- helpers --------------------------------------------------------------------------------
def expected_frames(n_samples: int, fps: Fraction) -> int:
    """N = ceil(audio_seconds * fps), exact."""
    return math.ceil(Fraction(n_samples, SR) * Fraction(fps))


def pingpong_order(n: int, t: int) -> list[int]:
    """0, 1, ..., t-1, t-2, ..., 1, 0, 1, ... written out by hand (independent of cluster.plan)."""
    order, k, step = [], 0, 1
    for _ in range(n):
        order.append(k)
        if not 0 <= k + step < t:
            step = -step
        k += step
    return order


def top_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of the top fifth of two frames: far from the face and the paste mask."""
    rows = a.shape[0] // 5
    return psnr(a[:rows], b[:rows])


def tone_fraction(wav: np.ndarray, hz: float = 1000.0, sample_rate: int = SR) -> float:
    """Fraction of the signal's power within +-30 Hz of `hz`."""
    spectrum = np.abs(np.fft.rfft(wav.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(wav.size, 1.0 / sample_rate)
    return float(spectrum[np.abs(freqs - hz) <= 30.0].sum() / max(spectrum.sum(), 1e-12))


def check_output(path: str | Path, n_samples: int, fps: Fraction, size: tuple[int, int]) -> MediaInfo:
    """Independent checks of a finished output; returns its probe."""
    path = str(path)
    fps = Fraction(fps)
    seconds = n_samples / SR
    frame = 1.0 / float(fps)
    info = probe(path)
    assert info.video is not None and info.audio is not None, info
    assert info.video.codec == "h264" and info.audio.codec == "aac", info
    assert info.video.pix_fmt == "yuv420p", info
    assert (info.video.width, info.video.height) == size, info
    assert info.video.rotation == 0, info
    assert not info.video.variable_frame_rate, info  # constant frame rate, as planned
    assert count_video_frames(path) == expected_frames(n_samples, fps)
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert Fraction(stream.average_rate) == fps, (stream.average_rate, fps)
        assert stream.codec_context.name == "h264"
        assert "rotate" not in stream.metadata
        first = next(container.decode(stream))
        assert (first.width, first.height) == size
        assert not first.rotation, first.rotation
    assert abs(info.video.duration - seconds) <= frame + 1e-3, (info.video.duration, seconds)
    # exactly the speech: its last AAC packet was once cut off, and then the encoder's padding after it
    # counted (the edit list now ends at the last real sample)
    assert abs(info.audio.duration - seconds) <= 0.002, (info.audio, seconds)
    assert abs(info.duration - seconds) <= frame + 1e-3, (info.duration, seconds)
    return info


def render(audio: str, video: str, out: Path, model, job_id: str | None = None, **request) -> MediaInfo:
    return render_local(RenderRequest(audio=audio, video=video, output=str(out), **request),
                        get_settings(), model=model, job_id=job_id)


# --- shared inputs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    from cluster.models import load_model

    return load_model("builtin", get_settings())


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("render_cases")


def _speech(d: Path, name: str, n_samples: int, seed: int) -> tuple[str, np.ndarray]:
    wav = speech_like(n_samples / SR, seed=seed)
    assert wav.size == n_samples
    return write_audio(str(d / name), wav), wav


@pytest.fixture(scope="module")
def speech_1s5(d):
    """1.5 s of speech (24000 samples): 38 frames at 25 fps (37.5 rounded up), 45 at 30 fps."""
    return _speech(d, "speech_1s5.wav", 24000, seed=11)


@pytest.fixture(scope="module")
def template_1s(d) -> str:
    """320x240 25 fps, 25 frames, no audio track."""
    return astronaut_template(str(d / "template_1s.mp4"), seconds=1.0, fps=25, size=SMALL, seed=3)


@pytest.fixture(scope="module")
def loop_renders(d, model, template_1s):
    """The 25-frame template under 2.4 s of speech (60 frames), ping-pong and forward loops,
    in 1 s chunks (so the chunk boundaries fall inside the loop)."""
    audio, _ = _speech(d, "speech_2s4.wav", 38400, seed=12)
    out = {}
    for loop in ("pingpong", "forward"):
        out[loop] = d / f"loop_{loop}.mp4"
        out[f"{loop}_job"] = new_job_id()
        render(audio, template_1s, out[loop], model, job_id=out[f"{loop}_job"], loop=loop, chunk_seconds=1.0)
        check_output(out[loop], 38400, Fraction(25), SMALL)
    return out


# --- cases ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, fps", [((1280, 720), 25), ((1080, 1920), 30)], ids=["720p25", "portrait1080x1920p30"])
def test_large_templates(d, model, speech_1s5, size, fps):
    audio, _ = speech_1s5
    template = astronaut_template(str(d / f"large_{size[0]}x{size[1]}.mp4"), seconds=1.0, fps=fps, size=size)
    out = d / f"out_{size[0]}x{size[1]}.mp4"
    render(audio, template, out, model)
    info = check_output(out, 24000, Fraction(fps), size)
    assert info.video.frame_count == (38 if fps == 25 else 45)


def test_ntsc_rate_is_kept_exactly(d, model):
    """29.97 fps: 2.002 s of audio is exactly 60 frames (at 30 fps it would be 61)."""
    audio, _ = _speech(d, "speech_2s002.wav", 32032, seed=13)
    ntsc = Fraction(30000, 1001)
    template = astronaut_template(str(d / "ntsc.mp4"), seconds=1.0, fps=ntsc, size=SMALL)
    out = d / "out_ntsc.mp4"
    render(audio, template, out, model)
    info = check_output(out, 32032, ntsc, SMALL)
    assert (info.video.fps_num, info.video.fps_den) == (30000, 1001)
    assert count_video_frames(out) == 60


def test_short_template_loops_pingpong(loop_renders, template_1s):
    tmpl = decode_all(template_1s)
    out = decode_all(str(loop_renders["pingpong"]))
    assert len(tmpl) == 25 and len(out) == 60
    right = pingpong_order(60, 25)
    assert right[23:28] == [23, 24, 23, 22, 21] and right[47:51] == [1, 0, 1, 2]
    wrong = [i % 25 for i in range(60)]
    scores = np.array([[top_psnr(o, t) for t in tmpl] for o in out])  # [output frame, template frame]
    right_db = scores[np.arange(60), right]
    assert right_db.min() > MATCH_DB, np.round(right_db, 1)
    best = scores.argmax(axis=1)
    assert np.abs(best - np.array(right)).max() <= 1, (best.tolist(), right)
    far = np.abs(np.array(right) - np.array(wrong)) >= 6
    assert far.sum() >= 15
    wrong_db = scores[np.arange(60), wrong]
    assert wrong_db[far].mean() < right_db[far].mean() - 6.0, (wrong_db[far].mean(), right_db[far].mean())


def test_forward_loop_differs_from_pingpong(loop_renders, template_1s):
    tmpl = decode_all(template_1s)
    fw = decode_all(str(loop_renders["forward"]))
    pp = decode_all(str(loop_renders["pingpong"]))
    forward = [i % 25 for i in range(60)]
    fw_db = np.array([top_psnr(fw[i], tmpl[k]) for i, k in enumerate(forward)])
    assert fw_db.min() > MATCH_DB, np.round(fw_db, 1)
    # same first pass through the template, then different frame orders
    same = np.array([top_psnr(fw[i], pp[i]) for i in range(60)])
    assert same[:25].min() > MATCH_DB, np.round(same[:25], 1)
    differs = np.abs(np.array(forward) - np.array(pingpong_order(60, 25))) >= 6
    assert same[differs].max() < MATCH_DB - 3, np.round(same, 1)


def test_template_longer_than_audio(d, model, astronaut_video):
    """A 2 s (50-frame) template under 1.2 s of speech: 30 output frames, template frames 0..29."""
    audio, _ = _speech(d, "speech_1s2.wav", 19200, seed=14)
    out = d / "out_long_template.mp4"
    render(audio, astronaut_video, out, model)
    check_output(out, 19200, Fraction(25), SMALL)
    tmpl = decode_all(astronaut_video)
    frames = decode_all(str(out))
    assert len(tmpl) == 50 and len(frames) == 30
    db = np.array([top_psnr(frames[i], tmpl[i]) for i in range(30)])
    assert db.min() > MATCH_DB, np.round(db, 1)


@pytest.mark.parametrize("template_audio", [None, "tone"], ids=["template_without_audio", "template_with_tone"])
def test_output_carries_the_speech_not_the_template_audio(d, model, speech_1s5, template_audio):
    audio, speech = speech_1s5
    tone = None
    if template_audio == "tone":
        t = np.arange(int(1.0 * SR)) / SR
        tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    template = astronaut_template(str(d / f"template_audio_{template_audio}.mp4"), seconds=1.0, fps=25,
                                  size=SMALL, audio=tone, seed=4)
    template_info = probe(template)
    if tone is not None:  # the template really carries a tone
        assert template_info.audio is not None
        assert tone_fraction(load_audio(template)) > 0.9
    else:
        assert template_info.audio is None
    out = d / f"out_template_audio_{template_audio}.mp4"
    render(audio, template, out, model)
    check_output(out, 24000, Fraction(25), SMALL)
    out_audio = load_audio(str(out))
    assert tone_fraction(out_audio) < 0.05
    n = expected_frames(24000, Fraction(25))
    envelope = frame_energy(out_audio, Fraction(25), n)
    assert pearson(envelope, frame_energy(speech, Fraction(25), n)) > 0.95


@pytest.mark.parametrize("ext", [".wav", ".mp3", ".m4a"])
def test_speech_formats(d, model, template_1s, ext):
    """The same 1.2 s of speech as wav, mp3 and m4a: 30 frames each, and the output's audio is it."""
    speech = speech_like(1.2, seed=15)
    audio = write_audio(str(d / f"speech_fmt{ext}"), speech)
    out = d / f"out_fmt_{ext[1:]}.mp4"
    render(audio, template_1s, out, model)
    check_output(out, speech.size, Fraction(25), SMALL)
    n = expected_frames(speech.size, Fraction(25))
    assert n == 30
    envelope = frame_energy(load_audio(str(out)), Fraction(25), n)
    assert pearson(envelope, frame_energy(speech, Fraction(25), n)) > 0.95


def test_rotated_template(d, model):
    """A template stored sideways with a 90-degree display matrix renders upright at its display
    size (320x240) and the output has no rotation metadata."""
    rotated = astronaut_template(str(d / "rotated.mp4"), seconds=1.0, fps=25, size=SMALL, rotation=90, seed=5)
    upright = astronaut_template(str(d / "upright.mp4"), seconds=1.0, fps=25, size=SMALL, seed=5)
    rinfo = probe(rotated)
    assert rinfo.video.rotation == 90 and (rinfo.video.width, rinfo.video.height) == SMALL
    with av.open(rotated) as c:  # stored sideways
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (240, 320)
    audio, _ = _speech(d, "speech_rot.wav", 19200, seed=16)
    out = d / "out_rotated.mp4"
    render(audio, rotated, out, model)
    check_output(out, 19200, Fraction(25), SMALL)
    frames = decode_all(str(out))
    tmpl = decode_all(upright)
    assert frames.shape == (30, 240, 320, 3)
    db = np.array([top_psnr(frames[i], tmpl[k]) for i, k in enumerate(pingpong_order(30, 25))])
    assert db.min() > MATCH_DB, np.round(db, 1)
    # the avatar the job prepared is known by the template's file name (`lipsync avatars`, the page)
    from cluster.faces.avatar import avatar_name
    from cluster.media.normalize import content_id

    assert avatar_name(content_id(rotated), get_settings()) == "rotated.mp4"


def test_a_template_whose_half_height_is_odd(d, model):
    """240x426 (as 480x854, 640x362: H/2 odd, the chroma planes end mid-row of the frame's width):
    renders at its size, the frames far from the face as the template's (it failed every chunk)."""
    size = (240, 426)
    template = astronaut_template(str(d / "portrait.mp4"), seconds=1.0, fps=25, size=size, seed=6)
    audio, _ = _speech(d, "speech_portrait.wav", 16000, seed=17)
    out = d / "out_portrait.mp4"
    render(audio, template, out, model)
    check_output(out, 16000, Fraction(25), size)
    frames, tmpl = decode_all(str(out)), decode_all(template)
    assert frames.shape == (25, 426, 240, 3)
    db = np.array([top_psnr(frames[i], tmpl[k]) for i, k in enumerate(pingpong_order(25, 25))])
    assert db.min() > MATCH_DB, np.round(db, 1)


def test_frames_where_the_face_is_gone_are_left_as_they_are(d, model):
    """The face leaves the picture for a second (a plain grey frame): those frames come out as the
    template's, nothing drawn on them (a mouth floated on the grey, the track holding the face's last
    place); the frames with the face get their mouth."""
    import subprocess

    from cluster.media.ffmpeg import ffmpeg_binary

    face = astronaut_template(str(d / "leaves_src.mp4"), seconds=3.0, fps=25, size=SMALL, seed=8)
    template = str(d / "leaves.mp4")
    subprocess.run([ffmpeg_binary(), "-v", "error", "-y", "-i", face, "-vf",
                    "drawbox=x=0:y=0:w=iw:h=ih:color=gray:t=fill:enable='between(t,1,2)'", "-c:v", "libx264",
                    "-crf", "12", template], check=True, timeout=60)
    audio, _ = _speech(d, "speech_leaves.wav", 48000, seed=18)
    out = d / "out_leaves.mp4"
    render(audio, template, out, model)
    check_output(out, 48000, Fraction(25), SMALL)
    frames, tmpl = decode_all(str(out)), decode_all(template)
    grey = [i for i in range(75) if tmpl[i].std() < 2.0]
    assert len(grey) >= 24, len(grey)
    for i in grey:  # output frame i shows template frame i (3 s of speech, 3 s of template)
        assert np.abs(frames[i].astype(int) - tmpl[i].astype(int)).max() <= 3, i
    faces = [i for i in range(75) if i not in grey]
    lower = slice(SMALL[1] // 3, SMALL[1])
    moved = [np.abs(frames[i][lower].astype(int) - tmpl[i][lower].astype(int)).max() for i in faces]
    assert sum(m > 20 for m in moved) > len(faces) // 2, moved  # the mouth is drawn where the face is


def test_cut_off_on_a_photo_is_refused_at_admission(d, model):
    """`cut_off` ends at the shorter of speech and template: on a photo (one frame) the video would last
    0.04 s and the speech be thrown away; refused by name instead (it succeeded with 1 frame)."""
    import cv2

    from cluster.errors import InputError

    photo = str(d / "portrait.png")
    cv2.imwrite(photo, decode_all(astronaut_template(str(d / "for_photo.mp4"), seconds=0.2, fps=25, size=SMALL))[0])
    audio, _ = _speech(d, "speech_photo.wav", 16000, seed=19)
    with pytest.raises(InputError, match="cut_off") as refused:
        render(audio, photo, d / "out_photo_cut.mp4", model, loop="cut_off")
    assert refused.value.path == "sync_mode" and refused.value.code == "input.invalid"
    render(audio, photo, d / "out_photo.mp4", model)  # ping-pong over one frame: the speech's length
    check_output(d / "out_photo.mp4", 16000, Fraction(25), SMALL)


def test_the_output_carries_the_templates_colour_tags(d, model):
    """The pixels outside the mouth are the template's own: the output says what they are, as the
    template does (an HD clip tagged BT.601 came out untagged, and players assume BT.709 for HD)."""
    import subprocess

    from cluster.media.ffmpeg import ffmpeg_binary

    face = astronaut_template(str(d / "tagged_src.mp4"), seconds=1.0, fps=25, size=SMALL, seed=9)
    tagged = str(d / "tagged601.mp4")
    subprocess.run([ffmpeg_binary(), "-v", "error", "-y", "-i", face, "-vf",
                    "setparams=color_primaries=smpte170m:color_trc=smpte170m:colorspace=smpte170m",
                    "-c:v", "libx264", "-crf", "12", tagged], check=True, timeout=60)
    assert probe(tagged).video.color == [6, 6, 6]
    audio, _ = _speech(d, "speech_tagged.wav", 16000, seed=20)
    for settings_update in ({"encode_in_process": True}, {"encode_in_process": False}):
        out = d / f"out_tagged_{settings_update['encode_in_process']}.mp4"
        render_local(RenderRequest(audio=audio, video=tagged, output=str(out)),
                     get_settings().model_copy(update=settings_update), model=model)
        assert probe(str(out)).video.color == [6, 6, 6], settings_update
    assert probe(face).video.color is None  # an untagged template: an untagged output, as before
    render(audio, face, d / "out_untagged.mp4", model)
    assert probe(str(d / "out_untagged.mp4")).video.color is None


def test_speech_from_a_file_with_a_silent_first_audio_track(d, model):
    """A speech file with two audio tracks, the first silent (a muted original beside the narration):
    the job follows and plays the one with the speech, the loudest (it used the first, silently)."""
    import subprocess

    from cluster.media.ffmpeg import ffmpeg_binary
    from cluster.media.probe import speech_stream

    speech, wav = _speech(d, "speech_second_track.wav", 32000, seed=21)
    both = str(d / "two_tracks.m4a")
    subprocess.run([ffmpeg_binary(), "-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono",
                    "-i", speech, "-map", "0:a", "-map", "1:a", "-c:a", "aac", "-t", "2", both], check=True,
                   timeout=60)
    assert speech_stream(both) == 1
    template = astronaut_template(str(d / "two_tracks_face.mp4"), seconds=1.0, fps=25, size=SMALL, seed=10)
    out = d / "out_two_tracks.mp4"
    render(both, template, out, model)
    heard = load_audio(str(out), get_settings())
    assert np.sqrt(np.mean(heard ** 2)) > 0.5 * np.sqrt(np.mean(wav ** 2)), "the output plays the silent track"


def test_verify_output_rejects_wrong_files(loop_renders):
    good = str(loop_renders["pingpong"])
    seconds = 38400 / SR
    verify_output(good, frames_expected=60, fps=Fraction(25), audio_duration=seconds)  # control
    bad_checks = {
        "expected 61 video frames, found 60": dict(frames_expected=61, fps=Fraction(25), audio_duration=seconds),
        "expected 30 fps": dict(frames_expected=60, fps=Fraction(30), audio_duration=seconds),
        "expected the audio duration": dict(frames_expected=60, fps=Fraction(25), audio_duration=seconds + 0.2),
    }
    for needle, kw in bad_checks.items():
        with pytest.raises(OutputVerificationError, match=needle) as e:
            verify_output(good, **kw)
        assert e.value.code == "output.verification_failed" and good in e.value.message
    # The job's segments were dropped once its output verified; a segment-like file is video only.
    assert not (job_dir(loop_renders["pingpong_job"]) / "segments").exists()
    segment = loop_renders["pingpong"].with_name("video_only.mp4")
    with SegmentEncoder(str(segment), 320, 240, Fraction(25)) as enc:
        enc.write(decode_all(good)[:25])
        enc.close()
    assert count_video_frames(segment) == 25
    with pytest.raises(OutputVerificationError, match="expected an audio stream"):
        verify_output(str(segment), frames_expected=25, fps=Fraction(25), audio_duration=1.0)


def test_tampered_segments_fail_finalize_and_leave_no_output(d, model, template_1s, tmp_path):
    """Chunks of 20, 20, 10 frames; a deleted segment, then a short one in place of the first:
    each makes finalize fail with a typed error and no output; the real segments then finalise."""
    s = get_settings().model_copy(update={"first_chunk_seconds": 0})  # equal chunks
    audio, _ = _speech(d, "speech_2s.wav", 32000, seed=17)
    out = tmp_path / "tampered.mp4"
    job_id = new_job_id()
    request = RenderRequest(audio=audio, video=template_1s, output=str(out), chunk_seconds=0.8)
    plan = prepare_job(job_id, admit(job_id, request, s), s, model_size=model.size)
    assert [c.frames for c in plan.chunks] == [20, 20, 10]
    for chunk in plan.chunks:
        render_chunk(plan, chunk, model.generate, s)

    seg0, seg1, seg2 = (Path(plan.segment_path(k)) for k in range(3))
    seg1.unlink()
    with pytest.raises(OutputVerificationError, match="missing") as e:
        finalize_job(plan, s)
    assert e.value.code == "output.verification_failed" and e.value.stage == "finalize"
    assert str(seg1) in e.value.message
    assert not out.exists()

    render_chunk(plan, plan.chunks[1], model.generate, s)
    original = seg0.read_bytes()
    shutil.copyfile(seg2, seg0)  # 10 frames where 20 belong
    with pytest.raises(OutputVerificationError, match="expected 50 video frames, found 40") as e:
        finalize_job(plan, s)
    assert e.value.job_id == job_id
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind

    seg0.write_bytes(original)
    info = finalize_job(plan, s)
    assert info.video.frame_count == 50
    check_output(out, 32000, Fraction(25), SMALL)


def test_finalize_is_idempotent_after_success(d, model, template_1s, tmp_path):
    """A job manager that restarts after the output was written re-runs finalize: the verified
    output is kept (not rebuilt from segments that were already dropped)."""
    s = get_settings()
    audio, _ = _speech(d, "speech_idem.wav", 16000, seed=18)
    out = tmp_path / "idem.mp4"
    job_id = new_job_id()
    plan = prepare_job(job_id, admit(job_id, RenderRequest(audio=audio, video=template_1s, output=str(out)), s), s,
                       model_size=model.size)
    for chunk in plan.chunks:
        render_chunk(plan, chunk, model.generate, s)
    finalize_job(plan, s)
    assert not (Path(plan.job_dir) / "segments").exists()
    mtime = out.stat().st_mtime_ns
    again = finalize_job(plan, s)
    assert again.video.frame_count == 25 and again.path == str(out)
    assert out.stat().st_mtime_ns == mtime


def test_a_chunk_rendered_twice_keeps_its_first_segment(d, model, template_1s, tmp_path):
    """A late duplicate render of a chunk (an attempt a killed job manager had started, a
    straggler's twin) never replaces the segment a resumed job may have adopted: the first wins."""
    s = get_settings()
    audio, _ = _speech(d, "speech_twice.wav", 16000, seed=23)
    job_id = new_job_id()
    plan = prepare_job(job_id, admit(job_id, RenderRequest(audio=audio, video=template_1s,
                                                           output=str(tmp_path / "twice.mp4")), s), s,
                       model_size=model.size)
    chunk = plan.chunks[0]
    first = render_chunk(plan, chunk, model.generate, s)
    st = os.stat(first.segment)
    again = render_chunk(plan, chunk, model.generate, s)
    assert again.segment == first.segment and again.frames == chunk.frames
    st2 = os.stat(first.segment)
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert sorted(p.name for p in Path(first.segment).parent.iterdir()) == [Path(first.segment).name]


def test_output_is_published_only_on_commit(d, model, template_1s, tmp_path):
    """The cluster finalises under a pending name and commits (renames) only if the job is still
    wanted (a cancelled job's verified output is discarded, never published: the next test)."""
    from cluster.hls import hls_dir
    from cluster.render import commit_output, pending_output_path
    from tests.helpers import writer_killed_mid_write

    s = get_settings()
    audio, _ = _speech(d, "speech_commit.wav", 16000, seed=19)
    job_id = new_job_id()
    out = tmp_path / "commit.mp4"
    plan = prepare_job(job_id, admit(job_id, RenderRequest(audio=audio, video=template_1s, output=str(out)), s), s,
                       model_size=model.size)
    for chunk in plan.chunks:
        render_chunk(plan, chunk, model.generate, s)
    finalize_job(plan, s, commit=False)
    pending = pending_output_path(plan)
    assert pending.exists() and not out.exists()
    killed_mid_save = writer_killed_mid_write(hls_dir(plan.job_dir) / "audio.m4a")
    commit_output(plan, s)
    assert out.exists() and not pending.exists()
    assert not killed_mid_save.exists()  # a killed writer's temporary goes with the job's commit
    assert not (Path(plan.job_dir) / "segments").exists()
    check_output(out, 16000, Fraction(25), SMALL)


def test_batches_in_flight_bound_the_submitted_batches_and_change_no_frame(d, model, template_1s, tmp_path):
    """A compositor keeps up to `batches_in_flight` model batches submitted while it prepares the
    next (the model works meanwhile); the frames are the same whatever the depth."""
    from cluster.media.decode import iter_frames

    audio, _ = _speech(d, "speech_inflight.wav", 32000, seed=19)  # 2 s: 50 frames, batches of 8
    segments, most_ahead = {}, {}
    for depth in (1, 2, 3):
        s = get_settings().model_copy(update={"batches_in_flight": depth, "batch_size": 8})
        job_id = new_job_id()
        plan = prepare_job(job_id, admit(job_id, RenderRequest(audio=audio, video=template_1s,
                                                               output=str(tmp_path / f"d{depth}.mp4")), s), s,
                           model_size=model.size)
        unfinished, ahead = [], []

        def generate(mel, crops, unfinished=unfinished, ahead=ahead):  # a model elsewhere: fetched later
            ticket = object()
            unfinished.append(ticket)
            ahead.append(len(unfinished) - 1)  # batches submitted and not yet fetched, besides this one

            def result(unfinished=unfinished):
                unfinished.remove(ticket)
                return model.generate(mel, crops)
            return result
        chunk = plan.chunks[-1]
        render_chunk(plan, chunk, generate, s)
        assert not unfinished
        most_ahead[depth] = max(ahead)
        segments[depth] = np.concatenate(list(iter_frames(plan.segment_path(chunk.index), 64, s)))
    assert most_ahead == {1: 1, 2: 2, 3: 3}
    assert np.array_equal(segments[1], segments[2]) and np.array_equal(segments[1], segments[3])


def test_a_chunk_tells_how_long_it_waited_for_the_model(d, model, template_1s):
    """`ChunkResult.waited_model_s`: the time the render thread spent fetching the model's answers
    (a model elsewhere answering 0.1 s after each batch is asked for); the encoder's share too."""
    import time

    audio, _ = _speech(d, "speech_waits.wav", 32000, seed=20)
    s = get_settings().model_copy(update={"batch_size": 8})
    job_id = new_job_id()
    plan = prepare_job(job_id, admit(job_id, RenderRequest(audio=audio, video=template_1s,
                                                           output=str(d / "waits.mp4")), s), s, model_size=model.size)

    def generate(mel, crops):
        ready = time.monotonic() + 0.1

        def result():
            time.sleep(max(0.0, ready - time.monotonic()))
            return model.generate(mel, crops)
        return result
    chunk = plan.chunks[-1]  # 44 frames: 6 batches
    got = render_chunk(plan, chunk, generate, s)
    assert 0.05 <= got.waited_model_s < got.seconds
    assert 0 <= got.waited_encoder_s < got.seconds
    fast = render_chunk(plan, chunk, model.generate, s)  # an in-process model: nothing to wait for
    assert fast.waited_model_s == 0


def test_what_a_killed_finalize_left_next_to_the_output_is_removed(d, model, template_1s, tmp_path):
    """A compositor killed mid-finalize leaves `finalize_output`'s temporary output and concat
    list in the user's output directory (the service chaos test saw it): the next finalize of the
    job, and its commit, remove this job's, and nobody else's."""
    from cluster.fsutil import temporary_name
    from cluster.render import commit_output, discard_output, discard_segments, pending_output_path

    s = get_settings()
    audio, _ = _speech(d, "speech_killed_finalize.wav", 16000, seed=21)
    out_dir = tmp_path / "out"
    plans = []
    for name in ("a.mp4", "b.mp4"):
        job_id = new_job_id()
        request = RenderRequest(audio=audio, video=template_1s, output=str(out_dir / name))
        plan = prepare_job(job_id, admit(job_id, request, s), s, model_size=model.size)
        for chunk in plan.chunks:
            render_chunk(plan, chunk, model.generate, s)
        plans.append(plan)

    def leftovers(plan):  # what finalize_output creates next to the pending output (output, concat list)
        pending = pending_output_path(plan)
        pending.parent.mkdir(parents=True, exist_ok=True)
        made = [temporary_name(pending), temporary_name(pending)]
        for path in made:
            path.write_bytes(b"half written")
        return made
    a, b = plans
    left_a, left_b = leftovers(a), leftovers(b)
    finalize_job(a, s)
    assert not any(p.exists() for p in left_a) and all(p.exists() for p in left_b)
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) == ["a.mp4"]
    again = leftovers(a)  # killed after the pending output was verified: the commit sweeps too
    commit_output(a, s)
    assert not any(p.exists() for p in again)
    finalize_job(b, s, commit=False)
    assert pending_output_path(b).exists()
    discard_output(b)  # a job that ends without its output: its leftovers go with the pending output
    assert not any(p.exists() for p in left_b) and not pending_output_path(b).exists()
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.mp4"]
    # a finalize still running when its job ended (its deadline passed mid-finalize: a step in a
    # compositor is not stopped) made a pending output after the discard, which nothing then removed
    with pytest.raises(RenderError, match="ended while its output was finalized"):
        finalize_job(b, s, commit=False)
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.mp4"]
    segments = Path(b.segment_path(0)).parent  # its segments go too, as a committed job's (a job failed by a
    assert segments.is_dir() and not Path(a.segment_path(0)).parent.exists()  # full disk kept megabytes each)
    discard_segments(b, s)
    assert not segments.exists() and Path(b.job_dir).is_dir()
