"""The hostile input corpus (tests/corpus.py) through admission, the render path and `lipsync
render` (issue 12): every bad input is refused within seconds with its typed code, naming the
file, leaving no file behind and reaching nothing outside the input root; every valid-but-odd
input renders to a correct, verified output.
"""
from __future__ import annotations

import math
import os
import time
from fractions import Fraction
from pathlib import Path

import av
import pytest

from cluster.config import Settings
from cluster.errors import LipsyncError
from cluster.media.normalize import target_fps
from cluster.media.probe import probe, read_media_info
from cluster.render import admit, prepare_job, render_local
from cluster.schemas import RenderRequest
from tests.corpus import CASES, REFUSAL_DEADLINE_S
from tests.helpers import wait_until

TEMP_MARKS = (".tmp", ".pending", ".template-", ".ffconcat", ".out-")
ADMIT_CASES = [n for n, (_, code, stage) in CASES.items() if code and stage == "admit"]
RENDER_CASES = [n for n, (_, code, _) in CASES.items() if code is None]


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(storage_root=tmp_path_factory.mktemp("hostile-store"), chunk_seconds=1.0,
                    batch_size=8)


@pytest.fixture(scope="module")
def model(settings):
    from cluster.models import load_model

    return load_model("builtin", settings)


def files_under(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")}


def temporaries(*roots: Path) -> list[str]:
    return sorted(p for p in files_under(*roots) if any(m in Path(p).name for m in TEMP_MARKS))


def request_for(corpus, name: str, output: Path | None = None) -> RenderRequest:
    case = corpus.cases[name]
    audio = case.path if case.role == "audio" else (corpus.speech if case.code else corpus.speech_short)
    video = case.path if case.role == "video" else corpus.template
    return RenderRequest(audio=str(audio), video=str(video), output=str(output) if output else None)


def decoded_audio_seconds(path: Path) -> float:
    """Seconds of audio the file decodes to (PyAV, independent of the product's loader)."""
    samples = 0
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        for packet in c.demux(stream):
            try:
                samples += sum(f.samples for f in packet.decode())
            except av.error.InvalidDataError:  # a damaged frame: skipped, as ffmpeg does
                continue
        return samples / stream.codec_context.sample_rate


# --- the corpus is what it claims --------------------------------------------------------------
def test_corpus_files_are_what_they_claim(hostile_corpus):
    cases = hostile_corpus.cases
    with av.open(str(cases["nonmonotonic_pts"].path)) as c:
        pts = [p.pts for p in c.demux(c.streams.video[0]) if p.pts is not None]
    assert pts != sorted(pts), pts[:8]
    with av.open(str(cases["frames_8k"].path)) as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (7680, 4320)
    with av.open(str(cases["frames_20000x20"].path)) as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (20000, 20)
    phone = probe(cases["phone_240fps_vfr_rotated"].path).video
    assert phone.rotation == 90 and phone.variable_frame_rate and (phone.width, phone.height) == (240, 320)
    assert 150 < float(phone.fps) <= 240
    assert probe(cases["silent_audio"].path).audio.duration == pytest.approx(0.8, abs=0.01)
    assert probe(cases["audio_0s1"].path).audio.duration == pytest.approx(0.1, abs=0.01)
    mp3 = cases["mp3_corrupt_middle"].path
    assert 0.7 < decoded_audio_seconds(mp3) < 1.47  # frames are lost in the middle
    from cluster.faces.mtcnn import MTCNNDetector
    from cluster.media.decode import iter_frames

    first = next(iter_frames(str(cases["two_faces"].path), 1))
    assert len(MTCNNDetector().detect_batch(first)[0]) == 2
    escapes = hostile_corpus.escapes
    assert Path(escapes["symlink_out"]).resolve() == hostile_corpus.canaries.secret
    if "hard_link_out" in escapes:
        assert os.stat(escapes["hard_link_out"]).st_ino == hostile_corpus.canaries.secret.stat().st_ino


# --- refused at admission ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ADMIT_CASES)
def test_bad_input_is_refused_at_admission(hostile_corpus, settings, tmp_path, name):
    case = hostile_corpus.cases[name]
    out = tmp_path / "out.mp4"
    watched = (settings.storage_root, hostile_corpus.root, tmp_path)
    before = files_under(*watched)
    t0 = time.monotonic()
    with pytest.raises(LipsyncError) as info:
        admit(f"adm-{name}"[:16], request_for(hostile_corpus, name, out), settings)
    elapsed = time.monotonic() - t0
    err = info.value
    assert err.code == case.code, (err.code, err.message)
    assert elapsed < REFUSAL_DEADLINE_S
    assert str(case.path) in err.message and err.path == str(case.path)
    assert files_under(*watched) == before, "a refused input changed files"
    hostile_corpus.canaries.assert_untouched(err.message, err.cause)


def test_no_face_is_refused_when_the_template_is_prepared(hostile_corpus, settings, model, tmp_path):
    case = hostile_corpus.cases["no_face"]
    admitted = admit("noface", request_for(hostile_corpus, "no_face", tmp_path / "o.mp4"), settings)
    t0 = time.monotonic()
    with pytest.raises(LipsyncError) as info:
        prepare_job("noface", admitted, settings, model_size=model.size)
    assert time.monotonic() - t0 < REFUSAL_DEADLINE_S
    assert info.value.code == "input.no_face" and info.value.stage == "prepare"
    assert str(case.path) in info.value.message  # the file the user gave, not the stored copy
    assert not temporaries(settings.storage_root, tmp_path)
    hostile_corpus.canaries.assert_untouched(info.value.message, info.value.cause)


# --- valid but odd: a correct output -------------------------------------------------------------
EXPECTED_SIZE = {"two_faces": (640, 240), "phone_240fps_vfr_rotated": (240, 320)}


@pytest.mark.parametrize("name", RENDER_CASES)
def test_valid_but_odd_input_renders_correctly(hostile_corpus, settings, model, tmp_path, name):
    case = hostile_corpus.cases[name]
    req = request_for(hostile_corpus, name, tmp_path / f"{name}.mp4")
    source_video = read_media_info(req.video, settings)
    fps = target_fps(source_video) if name == "phone_240fps_vfr_rotated" else Fraction(25)
    render_local(req, settings, model=model)
    out = Path(req.output)
    info = probe(out)
    assert info.video.codec == "h264" and info.audio.codec == "aac" and info.video.rotation == 0
    assert info.video.fps == fps
    assert (info.video.width, info.video.height) == EXPECTED_SIZE.get(name, (320, 240))
    seconds = decoded_audio_seconds(Path(req.audio))
    assert abs(info.video.frame_count - math.ceil(seconds * fps)) <= 1, (info.video.frame_count, seconds)
    assert info.audio.duration == pytest.approx(seconds, abs=0.07)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    # none left behind; a node-cache frame file still being built (a thread of this process, started by
    # a template's second job) may be writing its own for a moment
    wait_until(lambda: not temporaries(settings.storage_root), 60, 0.2, "temporaries gone")
    hostile_corpus.canaries.assert_untouched(out.read_bytes())
    assert case.note  # each odd case says what it exercises


# --- the same through `lipsync render` -----------------------------------------------------------
CLI_CASES = ["hls_network_as_mp4", "frames_8k", "video_as_audio"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e["LIPSYNC_STORAGE_ROOT"] = str(tmp_path_factory.mktemp("hostile-cli-store"))
    return e


@pytest.mark.parametrize("name", CLI_CASES)
def test_lipsync_render_refuses_with_one_line(hostile_corpus, cli_env, tmp_path, name):
    from tests.test_cli import CLI, run_cli

    case = hostile_corpus.cases[name]
    req = request_for(hostile_corpus, name)
    out = tmp_path / "out.mp4"
    rc, _, err, elapsed = run_cli([*CLI, "render", "--audio", req.audio, "--video", req.video, "-o", str(out)],
                                  cli_env, tmp_path, timeout=60)
    assert rc == 2, err
    assert elapsed < REFUSAL_DEADLINE_S + 10  # interpreter start-up on a loaded machine included
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lipsync: error: {case.code}: "), err
    assert str(case.path) in lines[0]
    assert list(tmp_path.iterdir()) == []
    assert not temporaries(Path(cli_env["LIPSYNC_STORAGE_ROOT"]))
    hostile_corpus.canaries.assert_untouched(err)


def test_lipsync_render_renders_a_tenth_of_a_second(hostile_corpus, cli_env, tmp_path):
    from tests.test_cli import CLI, run_cli

    req = request_for(hostile_corpus, "audio_0s1")
    out = tmp_path / "blip.mp4"
    rc, _, err, _ = run_cli([*CLI, "render", "--audio", req.audio, "--video", req.video, "-o", str(out),
                             "--local", "-q"], cli_env, tmp_path, timeout=120)
    assert rc == 0, err
    info = probe(out)
    assert info.video.frame_count == 3 and info.audio.duration == pytest.approx(0.1, abs=0.07)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


# --- server paths that leave the input root (the job manager's admission) ------------------------
def test_paths_outside_the_input_root_are_refused_and_never_read(hostile_corpus, settings):
    """`..`, relative, absolute, /etc/passwd, a symlink out, a hard link (it may name a file outside
    the roots): `input.outside_roots` naming the path, before anything is opened; no byte of the
    target reaches the error."""
    from cluster.render import admit_on_manager

    rooted = settings.model_copy(update={"input_roots": str(hostile_corpus.root)})
    for name, path in hostile_corpus.escapes.items():
        for role in ("audio", "video"):
            req = request_for(hostile_corpus, "audio_0s1").model_copy(update={role: path})
            t0 = time.monotonic()
            with pytest.raises(LipsyncError) as info:
                admit_on_manager(f"esc-{name}-{role}"[:40], req, rooted)
            err = info.value
            assert time.monotonic() - t0 < REFUSAL_DEADLINE_S
            if name == "hard_link_out":  # refused by its link count, before it is opened
                assert err.code == "input.outside_roots" and "hard link" in err.message, (err.code, err.message)
            else:
                assert err.code == "input.outside_roots", (name, err.code, err.message)
                assert path in err.message
            hostile_corpus.canaries.assert_untouched(err.message, err.cause, repr(err.to_info()))
