"""The `lipsync` command line, run for real in subprocesses (issue #2).

Each command runs with its own storage root (LIPSYNC_STORAGE_ROOT) under a temporary directory,
in its own process group, with a deadline; on a timeout the whole group (the CLI and any
embedded Ray it started) is killed and reaped.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest

from cluster.config import Settings
from cluster.media.ffmpeg import ffmpeg_binary
from cluster.media.finalize import verify_output
from cluster.media.probe import probe
from cluster.schemas import JobState
from cluster.synth import astronaut_template, speech_like, write_audio

CLI = [sys.executable, "-m", "cluster.cli"]
SR = 16000
BAD_INPUT_DEADLINE_S = 20.0


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str, str, float]:
    """Run a command to completion within `timeout`: (exit status, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish within {timeout:.0f} s; stderr tail:\n{err[-3000:]}")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err, time.monotonic() - t0


def lipsync_script() -> str:
    """The installed `lipsync` console script of this interpreter."""
    script = Path(sys.executable).with_name("lipsync")
    assert script.is_file(), f"console script {script} is not installed (pip install -e .)"
    return str(script)


def check_verified(path: Path, n_samples: int, fps: Fraction) -> None:
    """The file exists and passes the product's verification with independently computed
    expectations (N = ceil(seconds * fps)), with H.264 video and AAC audio."""
    assert path.is_file(), f"{path} was not written"
    frames = -(-n_samples * fps.numerator // (SR * fps.denominator))
    info = verify_output(str(path), frames_expected=frames, fps=fps, audio_duration=n_samples / SR)
    assert info.video.codec == "h264" and info.audio.codec == "aac"


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def env(workdir) -> dict[str, str]:
    """The environment of the CLI processes: a storage root of their own, no Ray address."""
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e["LIPSYNC_STORAGE_ROOT"] = str(workdir / "storage")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


@pytest.fixture(scope="module")
def inputs(workdir) -> dict[str, Path]:
    """Good and bad inputs: speech (wav, m4a), a face template (video only), a flat-colour video
    without a face, garbage bytes, a playlist naming /etc/passwd, and a path that does not exist."""
    f: dict[str, Path] = {}
    speech = speech_like(1.2, seed=21)
    f["speech"] = Path(write_audio(str(workdir / "speech.wav"), speech))
    f["speech_m4a"] = Path(write_audio(str(workdir / "speech.m4a"), speech))
    f["template"] = Path(astronaut_template(str(workdir / "template.mp4"), seconds=1.0, fps=25, size=(320, 240)))
    f["flat"] = workdir / "flat.mp4"
    subprocess.run([ffmpeg_binary(Settings()), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
                    "-f", "lavfi", "-i", "color=c=0x808080:s=320x240:r=25:d=1", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", str(f["flat"])], check=True, timeout=60)
    f["garbage"] = workdir / "garbage.mp4"
    f["garbage"].write_bytes(np.random.default_rng(2).bytes(20000))
    f["playlist"] = workdir / "speech.m3u8"
    f["playlist"].write_text("#EXTM3U\n#EXTINF:10,\n/etc/passwd\n")
    f["missing"] = workdir / "does_not_exist.wav"
    return f


# --- tests ----------------------------------------------------------------------------------
def test_render_local_succeeds(inputs, env, workdir):
    out = workdir / "local.mp4"
    rc, _, err, _ = run_cli([*CLI, "render", "--audio", str(inputs["speech"]), "--video", str(inputs["template"]),
                             "-o", str(out), "--local"], env, workdir, timeout=120)
    assert rc == 0, err
    assert err.strip().splitlines()[-1] == f"wrote {out}"
    check_verified(out, 19200, Fraction(25))


BAD_INPUTS = [
    # (case, audio, video, error code, the file the line must name)
    ("audio_without_audio_stream", "template", "template", "input.no_audio_stream", "audio"),
    ("video_without_video_stream", "speech", "speech_m4a", "input.no_video_stream", "video"),
    ("garbage_audio", "garbage", "template", "input.unreadable", "audio"),
    ("garbage_video", "speech", "garbage", "input.unreadable", "video"),
    ("missing_audio", "missing", "template", "input.not_found", "audio"),
    ("playlist_audio", "playlist", "template", "input.unsafe", "audio"),
    ("template_without_face", "speech", "flat", "input.no_face", "video"),
]


@pytest.mark.parametrize("case, audio, video, code, culprit", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(inputs, env, workdir, case, audio, video, code, culprit):
    out = workdir / f"{case}.mp4"
    rc, _, err, elapsed = run_cli([*CLI, "render", "--audio", str(inputs[audio]), "--video", str(inputs[video]),
                                   "-o", str(out), "--local"], env, workdir, timeout=60)
    assert rc == 2, err
    assert elapsed < BAD_INPUT_DEADLINE_S, elapsed
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lipsync: error: {code}: "), lines[0]
    named = str(inputs[audio] if culprit == "audio" else inputs[video])
    assert named in lines[0], lines[0]  # the file the user gave, also for problems found after admission
    assert not out.exists()


def test_bad_input_through_ray_path_exits_before_ray_starts(inputs, env, workdir):
    out = workdir / "ray_bad.mp4"
    rc, _, err, elapsed = run_cli([*CLI, "render", "--audio", str(inputs["template"]), "--video",
                                   str(inputs["template"]), "-o", str(out)], env, workdir, timeout=60)
    assert rc == 2, err
    assert elapsed < BAD_INPUT_DEADLINE_S, elapsed
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # nothing from Ray: it was never started
    assert lines[0].startswith("lipsync: error: input.no_audio_stream: ") and str(inputs["template"]) in lines[0]
    assert not out.exists()


def _popen(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_two_embedded_renders_on_one_storage_root(inputs, env, workdir):
    """Two `lipsync render` at once on one storage root (each with its own embedded Ray; one
    asking for 2 model workers, more than a 2-core laptop has CPUs for both kinds of actor) both
    succeed with their own outputs, and a job left by a killed run is ended, not rendered."""
    from cluster.jobstore import JobStore
    from cluster.owners import process_identity
    from cluster.schemas import JobState, RenderRequest

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = process_identity(gone.pid)
    gone.wait(timeout=30)
    left = workdir / "left-by-a-killed-run.mp4"
    store = JobStore(Path(env["LIPSYNC_STORAGE_ROOT"]) / "jobs.sqlite3")
    store.create("killed-run-job", RenderRequest(audio=str(inputs["speech"]), video=str(inputs["template"]),
                                                 output=str(left)), owner=identity)

    other = Path(write_audio(str(workdir / "speech_b.wav"), speech_like(1.6, seed=22)))
    # a file of the user's in the directory the renders start in, named like a module the render imports:
    # Ray put that directory on its workers' module path, and this ran in the render's place (the
    # `lipsync` command's own Python does not look there; `python -m` does, unless PYTHONSAFEPATH)
    shadow, user_dir = workdir / "shadowed-import", workdir / "user-dir"  # (its own: the module's other tests
    user_dir.mkdir(exist_ok=True)                                          # run their commands in workdir)
    (user_dir / "av.py").write_text(f"open({str(shadow)!r}, 'w').close()\n"
                                    "raise ImportError('the av.py of the working directory was imported')\n")
    runs = {
        "one.mp4": (inputs["speech"], 19200, ["--workers", "2"], {}),
        "two.mp4": (other, 25600, [], {"LIPSYNC_COMPOSITORS": "1", "LIPSYNC_MODEL_WORKERS": "1"}),
    }
    # as a user starts it: no RAY_AUTH_MODE (Ray then printed its token-mode advice at every start)
    user_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    procs = {name: _popen([*CLI, "render", "--audio", str(audio), "--video", str(inputs["template"]), "-o",
                           str(workdir / name), "-q", *flags], {**user_env, **extra, "PYTHONSAFEPATH": "1"}, user_dir)
             for name, (audio, _, flags, extra) in runs.items()}
    try:
        results = {name: p.communicate(timeout=300) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    for name, (_, samples, _, _) in runs.items():
        out, err = results[name]
        assert procs[name].returncode == 0, err[-3000:]
        assert err.strip().splitlines() == [f"wrote {workdir / name}"], err[-3000:]  # nothing of Ray's
        check_verified(workdir / name, samples, Fraction(25))
    st = store.get("killed-run-job")
    assert st.state == JobState.failed and st.error.code == "job.abandoned", st
    assert not left.exists()
    # Each run rendered exactly its own job.
    ours = {j.request.output: j for j in store.list(limit=1000) if j.request and j.request.output in
            {str(workdir / name) for name in runs}}
    assert sorted(j.state.value for j in ours.values()) == ["succeeded", "succeeded"], ours
    assert not shadow.exists()


@pytest.mark.slow
def test_demo_renders_a_moving_mouth(env, workdir):
    """`lipsync demo -o demo.mp4 --local`: a verified file whose mouth moves with the speech and
    stays (nearly) as in the template during pauses."""
    from cluster.audio import frame_energy, load_audio
    from cluster.faces.align import alignment_matrices
    from cluster.faces.avatar import prepare_avatar
    from cluster.plan import template_indices
    from cluster.quality import mouth_motion, pearson
    from tests.helpers import decode_all

    rc, _, err, _ = run_cli([lipsync_script(), "demo", "-o", "demo.mp4", "--local", "-q"], env, workdir,
                            timeout=180)
    assert rc == 0, err[-3000:]
    out = workdir / "demo.mp4"
    settings = Settings(storage_root=env["LIPSYNC_STORAGE_ROOT"])
    speech_path = settings.storage_root / "demo" / "demo_speech.wav"
    speech = load_audio(str(speech_path))
    check_verified(out, speech.size, Fraction(25))

    avatar = prepare_avatar(str(settings.storage_root / "demo" / "demo_template.mp4"), settings)
    assert avatar.cached  # prepared by the demo's render
    frames = decode_all(str(out))
    template = decode_all(avatar.template_path)
    idx = template_indices(0, len(frames), len(template), "pingpong")
    size = 256
    matrices = alignment_matrices(avatar.load_track().landmarks[idx], size)
    motion = mouth_motion(frames, template[idx], matrices, size)
    energy = frame_energy(speech, Fraction(25), len(frames))
    near = np.convolve(energy, np.ones(7), mode="same")  # speech within +-3 frames
    silent = near < 0.01
    speaking = energy > 0.5 * energy.max()
    assert silent.sum() >= 10 and speaking.sum() >= 10
    assert motion[silent].max() < 4.0, np.round(motion, 1)  # levels: re-encoding noise only
    assert np.median(motion[speaking]) > 8.0, np.round(motion, 1)
    assert pearson(motion, energy) > 0.5
    assert probe(str(out)).video.width == 640


@pytest.mark.parametrize("local", [[], ["--local"]], ids=["ray", "local"])
def test_missing_model_file_is_bad_input(inputs, env, workdir, local):
    """The same answer with and without --local (in process it was model.load_failed, exit 1)."""
    rc, _, err, elapsed = run_cli([*CLI, "render", "--audio", str(inputs["speech"]), "--video", str(inputs["template"]),
                                   "-o", str(workdir / "nomodel.mp4"), "--model", str(workdir / "nope.onnx"), *local],
                                  env, workdir, timeout=60)
    assert rc == 2 and elapsed < BAD_INPUT_DEADLINE_S, err
    assert err.strip().splitlines() == [
        f"lipsync: error: input.not_found: model file {workdir / 'nope.onnx'} does not exist "
        "(expected 'builtin' or an .onnx file)"]


@pytest.mark.slow
def test_default_model_that_cannot_load_fails_the_job_with_its_reason(inputs, env, workdir):
    """LIPSYNC_MODEL names a file that is not ONNX: the workers report it, the job fails clearly."""
    broken = workdir / "broken.onnx"
    broken.write_bytes(b"not a model")
    out = workdir / "broken.mp4"
    ray_env = {**env, "LIPSYNC_COMPOSITORS": "1", "LIPSYNC_MODEL_WORKERS": "1", "LIPSYNC_MODEL": str(broken)}
    rc, _, err, elapsed = run_cli([*CLI, "render", "--audio", str(inputs["speech"]), "--video",
                                   str(inputs["template"]), "-o", str(out), "-q"], ray_env, workdir, timeout=180)
    assert rc == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("lipsync: error: model.load_failed: ") and str(broken) in last, last
    assert not out.exists()


def test_unreachable_ray_address_fails_fast_with_one_line(inputs, env, workdir):
    import socket

    with socket.socket() as s:  # a local port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err, elapsed = run_cli([*CLI, "render", "--audio", str(inputs["speech"]), "--video", str(inputs["template"]),
                                   "-o", str(workdir / "unreachable.mp4")], {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                  workdir, timeout=60)
    assert rc == 1 and elapsed < BAD_INPUT_DEADLINE_S, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in lines[0], err


def test_a_request_the_schema_refuses_exits_2_naming_each_field(inputs, env, workdir):
    """The SDK checks a request against the shared schema before it sends it: the command line
    prints one line per refused field (which field, why, what it got) and exits 2; no traceback,
    nothing sent (the URL has nothing listening)."""
    rc, _, err, elapsed = run_cli([*CLI, "live", "--avatar", "x", "--audio", "speech.wav", "--segment-seconds", "0.05",
                                   "--url", "http://127.0.0.1:9", "--token", "t"], env, workdir, timeout=60)
    assert rc == 2 and elapsed < BAD_INPUT_DEADLINE_S, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 2, err
    assert lines[0].startswith("lipsync: error: input.invalid: avatar_id: ") and "'x'" in lines[0], err
    assert lines[1].startswith("lipsync: error: input.invalid: segment_seconds: ") and "0.05" in lines[1], err


def test_mistakes_a_user_makes_get_one_line_before_any_work(inputs, env, workdir):
    """Each of these used to cost a whole render, a session created for nothing, a wait past the
    user's timeout or a traceback: an output that is a directory, a local file that does not exist
    (it was sent to the server as a server path), a video and an avatar at once, a download onto a
    directory, a URL that is not one, a setting out of range, a wait whose server is unreachable."""
    out_dir = workdir / "an-output-dir"
    out_dir.mkdir(exist_ok=True)
    nowhere = ["--url", "http://127.0.0.1:9", "--token", "t"]  # nothing listens: nothing may be sent
    empty = workdir / "empty.wav"
    empty.write_bytes(b"")
    cases = [
        ("render -o DIR", [*CLI, "render", "--audio", str(inputs["speech"]), "--video", str(inputs["template"]),
                           "-o", str(out_dir)], 2, "is a directory"),
        ("submit missing", [*CLI, "submit", "typo.wav", str(inputs["template"]), *nowhere], 2,
         "audio file typo.wav does not exist"),
        ("submit video and avatar", [*CLI, "submit", str(inputs["speech"]), str(inputs["template"]), "--avatar",
                                     "0123456789abcdef", *nowhere], 2, "not both"),
        ("download onto a dir", [*CLI, "download", "job1", str(out_dir), *nowhere], 2, "is a directory"),
        # names longer than the file system takes: tracebacks (OSError: File name too long)
        ("download onto a name too long", [*CLI, "download", "job1", str(workdir / ("x" * 300 + ".mp4")), *nowhere],
         2, "input.invalid: output"),
        ("submit a name too long", [*CLI, "submit", "y" * 300 + ".wav", str(inputs["template"]), *nowhere], 2,
         "input.invalid: audio yyy"),
        ("live a name too long", [*CLI, "live", "--avatar", "0123456789abcdef", "--audio", "y" * 300 + ".wav",
                                  *nowhere], 2, "input.invalid: audio yyy"),
        ("live missing audio", [*CLI, "live", "--avatar", "0123456789abcdef", "--audio", "typo.wav", *nowhere], 2,
         "audio file typo.wav does not exist"),
        ("live empty audio", [*CLI, "live", "--avatar", "0123456789abcdef", "--audio", str(empty), *nowhere], 2,
         "input.unreadable: input file"),
        ("live video without sound", [*CLI, "live", "--avatar", "0123456789abcdef", "--audio",
                                      str(inputs["template"]), *nowhere], 2, "input.no_audio_stream"),
        ("submit a directory", [*CLI, "submit", str(inputs["speech"]), str(out_dir), *nowhere], 2,
         "is a directory, not a file"),
        ("status bad url", [*CLI, "status", "job1", "--url", "foo", "--token", "t"], 2,
         "input.invalid: the service URL 'foo' is not an http(s) URL"),  # was connection.failed, exit 1
        ("wait negative timeout", [*CLI, "wait", "job1", "--timeout", "-5", *nowhere], 2, "not a number of seconds"),
        ("render without ffmpeg", [*CLI, "render", "--audio", str(inputs["speech"]), "--video", str(inputs["template"]),
                                   "-o", str(workdir / "x.mp4"), "--local", "LIPSYNC_FFMPEG=/nonexistent"], 2,
         "settings.invalid: ffmpeg"),  # was media.ffmpeg_failed, exit 1 (lipsync serve checked it already)
        ("bitrate misspelt", [*CLI, "render", "--audio", str(inputs["speech"]), "--video", str(inputs["template"]),
                              "-o", str(workdir / "x.mp4"), "--local", "LIPSYNC_AUDIO_BITRATE=abc"], 2,
         "settings.invalid: audio_bitrate: Value error, 'abc' is not an AAC bitrate"),
        ("setting out of range", [*CLI, "render", "--audio", str(inputs["speech"]), "--video",
                                  str(inputs["template"]), "-o", str(workdir / "x.mp4"), "--chunk-seconds", "0"], 2,
         "settings.invalid: chunk_seconds"),
        # a preset x264 does not have failed every job's encode, after its prepare
        ("x264 preset misspelt", [*CLI, "render", "--audio", str(inputs["speech"]), "--video",
                                  str(inputs["template"]), "-o", str(workdir / "x.mp4"), "LIPSYNC_PRESET=superfst"], 2,
         "settings.invalid: preset: Input should be 'ultrafast', 'superfast'"),
        ("encoder unknown", [*CLI, "render", "--audio", str(inputs["speech"]), "--video", str(inputs["template"]),
                             "-o", str(workdir / "x.mp4"), "LIPSYNC_VIDEO_ENCODER=libx265"], 2,
         "settings.invalid: video_encoder"),
    ]
    for what, args, code, said in cases:
        variables = dict(a.split("=", 1) for a in args if a.startswith("LIPSYNC_"))
        args = [a for a in args if not a.startswith("LIPSYNC_")]
        rc, _, err, elapsed = run_cli(args, {**env, **variables}, workdir, timeout=60)
        assert rc == code and said in err and "Traceback" not in err, (what, rc, err[-2000:])
        assert elapsed < BAD_INPUT_DEADLINE_S, (what, elapsed)
    rc, _, err, elapsed = run_cli([*CLI, "wait", "job1", "--timeout", "1", *nowhere], env, workdir, timeout=60)
    assert rc == 1 and "Traceback" not in err and elapsed < 8, (rc, elapsed, err[-2000:])
    assert err.strip().splitlines()[-1].startswith("lipsync: error: wait.timeout: "), err[-2000:]  # with its code
    # a service whose storage root, model or ffmpeg cannot work here: refused before Ray starts (a file as the
    # storage root printed "ready", then its job manager restarted for ever; a missing model failed every job)
    from cluster.media.ffmpeg import encoder_problem

    unusable = [("LIPSYNC_VIDEO_ENCODER", "h264_nvenc")] if encoder_problem("h264_nvenc") else []  # (no GPU here)
    for variable, value in (("LIPSYNC_STORAGE_ROOT", "/etc/passwd"), ("LIPSYNC_MODEL", str(workdir / "none.onnx")),
                            ("LIPSYNC_FFMPEG", str(workdir / "no-ffmpeg")), *unusable):
        rc, _, err, elapsed = run_cli([*CLI, "serve", "--port", "9"], {**env, variable: value}, workdir, timeout=60)
        assert rc == 2 and "settings.invalid" in err and variable in err and "Traceback" not in err, (rc, err[-2000:])
        assert elapsed < BAD_INPUT_DEADLINE_S, (variable, elapsed)
    rc, _, err, _ = run_cli([*CLI, "models"], {**env, "LIPSYNC_STORAGE_ROOT": "/etc/passwd"}, workdir, timeout=60)
    assert rc == 2 and "settings.invalid: storage_root" in err and "Traceback" not in err, err[-2000:]
    # a misspelt setting: pydantic's settings ignore a variable they do not know, and `LIPSYNC_API_TOKNE=...` started
    # a service that took every request without a token; now refused by `serve`, said by the other commands
    rc, _, err, elapsed = run_cli([*CLI, "serve", "--port", "9"], {**env, "LIPSYNC_API_TOKNE": "s3cret"}, workdir,
                                  timeout=60)
    assert rc == 2 and elapsed < BAD_INPUT_DEADLINE_S and err.strip() == (
        "lipsync: error: settings.invalid: LIPSYNC_API_TOKNE is not a setting (did you mean LIPSYNC_API_TOKEN?): "
        "docs/SETTINGS.md lists the settings"), err[-2000:]
    # a storage root moved (or restored) under another path: its rows name their files under the old one
    from cluster.jobstore import JobStore
    from cluster.schemas import RenderRequest

    JobStore(workdir / "was" / "jobs.sqlite3").create("j1", RenderRequest(
        audio=str(workdir / "was" / "jobs" / "j1" / "inputs" / "audio.wav"), video="/v.mp4"))
    (workdir / "was").rename(workdir / "moved")
    rc, _, err, elapsed = run_cli([*CLI, "serve", "--port", "9"], {**env, "LIPSYNC_STORAGE_ROOT": str(
        workdir / "moved")}, workdir, timeout=60)
    assert rc == 2 and elapsed < BAD_INPUT_DEADLINE_S and "settings.invalid: storage_root: its job store was " \
        f"written at {workdir / 'was'}" in err, (rc, err[-2000:])
    rc, _, err, _ = run_cli([*CLI, "models"], {**env, "LIPSYNC_CHUNKSECONDS": "2"}, workdir, timeout=60)
    assert rc == 0 and ("lipsync: warning: LIPSYNC_CHUNKSECONDS is not a setting (did you mean "
                        "LIPSYNC_CHUNK_SECONDS?): ignored") in err, (rc, err[-2000:])
    # a second `lipsync serve` on a storage root that one holds: refused (both ran, and both rendered the same
    # unfinished job); the holder is named from the lock file
    import fcntl

    root = Path(env["LIPSYNC_STORAGE_ROOT"])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "serve.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on test-host")
        held.flush()
        rc, _, err, elapsed = run_cli([*CLI, "serve", "--port", "9"], env, workdir, timeout=60)
    assert rc == 2 and "service.storage_in_use" in err and "pid 4242 on test-host" in err, (rc, err[-2000:])
    # a port another process keeps listening on: one line before Ray starts, at once and exit 2 as the other start
    # problems (it was Serve's traceback after 13 s, then exit 1 after waiting PORT_WAIT_S for the port; the wait
    # is for a killed service's proxy only: test_a_port_held_by_a_killed_services_ray_is_waited_for_and_no_other)
    import socket

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        rc, _, err, elapsed = run_cli([*CLI, "serve", "--port", str(port)], env, workdir, timeout=60)
    assert rc == 2 and "Traceback" not in err and elapsed < 14, (rc, elapsed, err[-2000:])  # (not after PORT_WAIT_S)
    [line] = err.strip().splitlines()
    assert line.startswith(f"lipsync: error: service.port_in_use: cannot listen on 127.0.0.1:{port}: Address "
                           f"already in use"), err
    assert line.endswith("(another process holds it: stop it, or pick another --port)"), err
    # --metrics-port (a fixed Prometheus target): one held by another process, said before Ray starts (Ray's
    # metrics agent would have gone without it, the service up and its metrics nowhere); on a joined cluster
    # it is the nodes' own
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        rc, _, err, elapsed = run_cli([*CLI, "serve", "--port", "9", "--metrics-port", str(port)], env, workdir,
                                      timeout=60)
    [line] = err.strip().splitlines()
    assert rc == 2 and elapsed < 14 and line.startswith(
        f"lipsync: error: service.port_in_use: cannot export metrics on 127.0.0.1:{port}: Address already in use"
    ) and line.endswith("(another process holds it: stop it, or pick another --metrics-port)"), (rc, err[-2000:])
    rc, _, err, _ = run_cli([*CLI, "serve", "--port", "8123", "--metrics-port", "8123"], env, workdir, timeout=60)
    assert rc == 2 and "--metrics-port 8123 is also the API's port" in err, err
    rc, _, err, _ = run_cli([*CLI, "serve", "--metrics-port", "9"], {**env, "RAY_ADDRESS": "127.0.0.1:1"}, workdir,
                            timeout=60)
    assert rc == 2 and err.startswith("lipsync: error: settings.invalid: --metrics-port is the embedded Ray's"), err


def test_the_cli_logs_one_json_object_a_line_when_asked(env, workdir):
    """OPERATIONS: `LIPSYNC_LOG_FORMAT=json` makes every `lipsync.*` log line one JSON object; the CLI's own
    lines (a batch render on the head pod) stayed text."""
    rc, out, err, _ = run_cli([*CLI, "-v", "models"], {**env, "LIPSYNC_LOG_FORMAT": "json"}, workdir, timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 0 and "builtin" in out and lines, (rc, out, err)
    records = [json.loads(line) for line in lines]  # (a text line fails here)
    assert any(r["logger"] == "lipsync.models" and r["level"] == "INFO" for r in records), records


def test_url_and_token_are_taken_before_or_after_a_client_command(capsys):
    """`lipsync --token T status ID` was argparse's "invalid choice: 'T'"; the client commands' --url and
    --token are now taken on either side of the command (after it wins), and refused before another; -v on
    either side of any command."""
    from cluster.cli import build_parser, main

    parse = build_parser().parse_args
    assert (parse(["--token", "T", "status", "j"]).token, parse(["status", "j", "--token", "T"]).token) == ("T", "T")
    both = parse(["--url", "http://a:1", "--token", "T", "wait", "j", "--token", "U"])
    assert (both.url, both.token, both.id) == ("http://a:1", "U", "j")
    assert parse(["list"]).url is None and parse(["list"]).token is None
    # -v the same way, on every command (`lipsync wait ID -v` was "unrecognized arguments: -v")
    for args in (["-v", "wait", "j"], ["wait", "j", "-v"], ["wait", "-v", "j"], ["models", "--verbose"],
                 ["serve", "-v"], ["-v", "render", "--audio", "a", "--video", "v", "-o", "o.mp4", "-v"]):
        assert parse(args).verbose is True, args
    assert parse(["wait", "j"]).verbose is False and parse(["models"]).verbose is False
    with pytest.raises(SystemExit) as out:
        main(["--token", "T", "demo", "-o", "x.mp4"])
    assert out.value.code == 2 and "--token is for the client commands, not demo" in capsys.readouterr().err


def test_serve_takes_a_free_dashboard_port_when_the_usual_one_is_held(monkeypatch):
    """A second `lipsync serve` on one machine: Ray's dashboard port 8265 is held by the first, and the
    start failed ("Failed to bind to 127.0.0.1:8265"). The default now takes a free port then; a port
    given explicitly is used as given."""
    import socket

    from cluster import cli

    seen = {}

    def start_service(settings, host, port, **kw):
        seen["dashboard_port"] = kw["dashboard_port"]
        raise cli.LipsyncError("stop here", code="test.stop")

    monkeypatch.setattr("service.launch.start_service", start_service)
    monkeypatch.setattr(cli, "_port_in_use", lambda host, port, wait_s=cli.PORT_WAIT_S:
                        "held" if port == cli.DASHBOARD_PORT else None)
    monkeypatch.setattr(cli, "_stop_started", lambda *a, **k: None)
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # serve installs its own
    try:
        assert cli.main(["serve", "--port", "8299"]) == 1
        assert seen["dashboard_port"] not in (None, cli.DASHBOARD_PORT)
        with socket.socket() as s:  # it was free
            s.bind(("127.0.0.1", seen["dashboard_port"]))
        assert cli.main(["serve", "--port", "8299", "--dashboard-port", "9123"]) == 1
        assert seen["dashboard_port"] == 9123
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_joining_a_cluster_without_its_token_is_one_typed_error(monkeypatch, tmp_path):
    """A cluster with token authentication joined without its token: Ray's `AuthenticationError` (a
    RayError, not one of the errors `connect` caught) came out as a 27-line traceback of `lipsync render`
    and `lipsync serve`; it is the `render.failed` error naming the cluster and the token to give."""
    import ray

    from actors import runtime
    from cluster.config import Settings
    from cluster.errors import RenderError

    if ray.is_initialized():
        pytest.skip("this process already holds a Ray")

    def refused(*args, **kwargs):
        raise ray.exceptions.AuthenticationError("Token authentication is enabled but no authentication token "
                                                 "was found")

    monkeypatch.setattr(runtime, "_check_reachable", lambda address, timeout: None)
    monkeypatch.setattr(runtime, "_enable_token_auth_when_available", lambda: None)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(RenderError) as info:
        runtime.connect(Settings(storage_root=tmp_path), address="127.0.0.1:6499")
    assert info.value.stage == "connect" and "RAY_AUTH_TOKEN" in info.value.message, info.value
    assert "the Ray cluster at 127.0.0.1:6499" in info.value.message


def test_a_joined_start_turns_token_authentication_on_when_a_token_is_given(monkeypatch, tmp_path):
    """`RAY_ADDRESS=... lipsync serve` with the cluster's RAY_AUTH_TOKEN (or its token file) was refused by a
    token cluster (InvalidAuthToken, then "also needs its token: RAY_AUTH_TOKEN": the one it had), while
    `lipsync render` joined: only the render turned Ray's token mode on. Both do now, before `ray.init`."""
    import ray
    from ray._private.authentication import authentication_token_setup

    from actors import runtime
    from cluster.config import Settings
    from cluster.errors import RenderError
    from service import launch

    if ray.is_initialized():
        pytest.skip("this process already holds a Ray")
    seen = []

    def init(*args, **kwargs):  # what the join ran with; then refused, to end the start there
        seen.append((os.environ.get("RAY_AUTH_MODE"), kwargs.get("address")))
        raise ray.exceptions.AuthenticationError("refused here")

    monkeypatch.setattr(runtime, "_check_reachable", lambda address, timeout: None)
    monkeypatch.setattr(authentication_token_setup, "_enable_token_auth", lambda: seen.append("refreshed"))
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0123456789abcdef0123456789abcdef")
    for start in (lambda: runtime.connect(Settings(storage_root=tmp_path), address="127.0.0.1:6499"),
                  lambda: launch.start_service(Settings(storage_root=tmp_path), "127.0.0.1", 1,
                                               address="127.0.0.1:6499")):
        monkeypatch.setenv("RAY_AUTH_MODE", "")  # unset, as a user leaves it (restored at the end)
        with pytest.raises(RenderError) as info:
            start()
        assert info.value.stage == "connect", info.value
        assert seen[-2:] == ["refreshed", ("token", "127.0.0.1:6499")], seen


def test_a_joined_start_waits_for_its_port_and_for_a_deleted_app_within_deadlines(monkeypatch, tmp_path):
    """Joining a cluster whose Serve does not hold the port: a port still held by something going away is
    waited for (up to PORT_WAIT_S, as before an embedded start; it was refused at once), then refused as
    `service.port_in_use`. The wait for a deleted application ends when the start is stopped, and a Serve
    controller that does not answer is a typed error within the call's deadline (it hung the start)."""
    import socket
    import threading

    from cluster.config import Settings
    from cluster.errors import LipsyncError, PortInUse
    from service import launch

    settings = Settings(storage_root=tmp_path / "st", actor_call_timeout_s=0.5)
    monkeypatch.setattr(launch, "_serve_client", lambda s: None)  # no Serve on the cluster
    monkeypatch.setattr("cluster.ports.PORT_WAIT_S", 1.5)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    threading.Timer(0.4, held.close).start()  # let go while the start waits
    launch._check_joined_serve("ray://head:10001", "127.0.0.1", port, "Address already in use", settings)
    with socket.socket() as keeps:
        keeps.bind(("127.0.0.1", 0))
        keeps.listen()
        with pytest.raises(PortInUse, match=r"Address already in use .* for 1.5 s"):
            launch._check_joined_serve("ray://head:10001", "127.0.0.1", keeps.getsockname()[1], "in use", settings)

    class Deleting:  # an application being deleted for ever
        def get_serve_status(self, name):
            status = type("S", (), {"status": "DELETING"})()
            return type("O", (), {"app_status": status})()

    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    launch._check_no_running_app(Deleting(), "ray://head:10001", settings, stop)
    assert time.monotonic() - t0 < 5

    class Silent:
        def get_serve_status(self, name):
            time.sleep(30)

    t0 = time.monotonic()
    with pytest.raises(LipsyncError, match=r"did not answer \(the application's status\) within 0.5 s"):
        launch._check_no_running_app(Silent(), "ray://head:10001", settings)
    assert time.monotonic() - t0 < 5


# --- the shell client against an in-process transport (no socket is opened) ---------------------
FAKE_URL = "http://api.test:8000"
WATCH = "/v1/jobs/{id}/hls/index.m3u8?token=abc"


def _view(job_id: str, state: str, **more) -> dict:
    view = {"id": job_id, "state": state, "stage": "done" if state == "succeeded" else state, "progress": 1.0,
            "frames_done": 20, "frames_total": 20, "created_at": "2026-12-06T00:00:00+00:00",
            "updated_at": "2026-12-06T00:00:01+00:00", "watch_url": WATCH.format(id=job_id)}
    if state == "succeeded":
        view["output"] = {"size": 1000, "duration": 0.8, "url": f"/v1/jobs/{job_id}/result"}
    if state == "failed":
        view["error"] = {"code": "render.failed", "message": "boom"}
    return {**view, **more}


def _fake_service(request: httpx.Request) -> httpx.Response:
    """A service of two jobs, `done` (succeeded) and `bad` (failed), that accepts any JSON submission as
    `done`; its views name their URLs relative to itself, as the real one does."""
    path, method = request.url.path, request.method
    if method == "POST" and path == "/v1/jobs":
        return httpx.Response(202, json={"id": "done", "state": "queued", "watch_url": WATCH.format(id="done")})
    if method == "GET" and path == "/v1/jobs":
        return httpx.Response(200, json={"jobs": [_view("done", "succeeded"), _view("bad", "failed")]})
    job_id = path.split("/")[3]
    state = {"done": "succeeded", "bad": "failed"}.get(job_id)
    if state is None:
        return httpx.Response(404, json={"error": {"code": "job.not_found", "message": f"no job {job_id}"}})
    if path.endswith("/events"):
        return httpx.Response(200, text=f"event: status\ndata: {json.dumps(_view(job_id, state))}\n\n",
                              headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json=_view(job_id, state))


@pytest.fixture
def fake_cli(monkeypatch, capsys):
    """`lipsync ARGS` run in this process against `handler` (default `_fake_service`) at FAKE_URL: (exit
    status, stdout, stderr); `run.seen` the requests the last command sent."""
    from cluster import cli
    from cluster.client import Client

    def run(args: list[str], handler=_fake_service) -> tuple[int, str, str]:
        seen = []

        def recording(request):
            seen.append(request)
            return handler(request)

        monkeypatch.setattr(cli, "_client", lambda a: Client(a.url or FAKE_URL, token=a.token, backoff_s=0.01,
                                                             transport=httpx.MockTransport(recording)))
        capsys.readouterr()
        rc = cli.main(args)
        out, err = capsys.readouterr()
        run.seen = seen
        return rc, out, err
    return run


def test_every_job_view_the_shell_client_prints_has_absolute_urls(fake_cli):
    """`lipsync status ID`, `list --json`, `wait`, `submit --wait`, `cancel` and a failed `wait` printed the service's
    relative `watch_url` (`/v1/jobs/<id>/hls/index.m3u8?token=...`) and `output.url`, which ffplay cannot open,
    while `submit --watch` and the SDK's `job.watch_url` gave an absolute one: every view is absolute now."""
    def urls(view: dict) -> list[str]:
        return [view["watch_url"], *([view["output"]["url"]] if view.get("output") else [])]

    views = []
    for args, code in ((["status", "done"], 0), (["wait", "done", "-q"], 0), (["wait", "bad", "-q"], 1),
                       (["submit", "/data/a.wav", "/data/v.mp4", "--wait", "-q"], 0), (["cancel", "done"], 0)):
        rc, out, err = fake_cli(args)
        assert rc == code, (args, rc, err)
        views.append(json.loads(out))
    rc, out, err = fake_cli(["list", "--json"])
    assert rc == 0, err
    views += json.loads(out)["jobs"]
    for view in views:
        assert urls(view) and all(url.startswith(f"{FAKE_URL}/v1/jobs/{view['id']}/") for url in urls(view)), view
    assert views[0]["watch_url"] == f"{FAKE_URL}/v1/jobs/done/hls/index.m3u8?token=abc"
    assert views[0]["output"]["url"] == f"{FAKE_URL}/v1/jobs/done/result"


def test_live_audio_is_a_local_file_and_is_said_so(fake_cli, workdir):
    """`live --audio` takes a local file only (its PCM is sent from here), but a missing one was "does not exist
    here, and is not a URL or an absolute server path", and a URL "does not exist": a URL is refused as such, a
    missing file said without the forms `submit` takes; one line, exit 2, nothing sent."""
    live = ["live", "--avatar", "0123456789abcdef", "--audio"]
    for audio, said in (("typo.wav", "lipsync: error: input.not_found: audio file typo.wav does not exist"),
                        (str(workdir / "nowhere.wav"), f"audio file {workdir / 'nowhere.wav'} does not exist"),
                        ("https://example.com/speech.wav", "lipsync: error: input.invalid: live --audio "
                         "https://example.com/speech.wav: live audio must be a local file")):
        rc, out, err = fake_cli([*live, audio])
        assert rc == 2 and not out and len(err.strip().splitlines()) == 1 and said in err, (audio, rc, err)
        assert "server path" not in err and "not a URL or" not in err, err
        assert not fake_cli.seen, fake_cli.seen


def test_a_refused_token_says_how_to_give_one_and_whether_one_was_sent(fake_cli, monkeypatch):
    """A missing and a wrong API token were the same line, `auth.invalid_token: missing or wrong bearer token
    (Authorization: Bearer ...)`: the shell client now says whether it sent one, and how to give it."""
    def guarded(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != "Bearer right":
            return httpx.Response(401, json={"error": {"code": "auth.invalid_token", "message": "missing or wrong "
                                                       "bearer token (Authorization: Bearer ...)"}})
        return _fake_service(request)

    monkeypatch.delenv("LIPSYNC_API_TOKEN", raising=False)
    for given, said in (([], "no token was sent"), (["--token", "wrong"], "the token sent was refused")):
        rc, out, err = fake_cli(["status", "done", *given], guarded)
        assert rc == 2 and not out and len(err.strip().splitlines()) == 1, (given, rc, err)
        assert err.startswith("lipsync: error: auth.invalid_token: missing or wrong bearer token"), err
        assert f"; {said}: give the service's token with --token or LIPSYNC_API_TOKEN" in err, err
    monkeypatch.setenv("LIPSYNC_API_TOKEN", "wrong")  # the token sent from the environment
    rc, _, err = fake_cli(["download", "done", "out.mp4"], guarded)
    assert rc == 2 and "the token sent was refused" in err, err
    rc, out, err = fake_cli(["status", "done", "--token", "right"], guarded)
    assert rc == 0 and json.loads(out)["id"] == "done", err


def test_a_busy_service_or_an_expired_output_is_no_bad_input(fake_cli):
    """A probe: `submit` against a full queue (429 `service.busy`, its retries spent) and `download` of an expired
    output (410) exited 2, which the README keeps for bad input: a script could not tell "try again later" from
    "fix the command". They exit 1 now; an unknown job stays 2."""
    def answer(status: int, code: str):
        def service(request: httpx.Request) -> httpx.Response:
            return httpx.Response(status, headers={"retry-after": "0"},
                                  json={"error": {"code": code, "message": "said by the service"}})
        return service

    for command, status, code in ((["status", "done"], 429, "service.busy"),
                                  (["download", "done", "out.mp4"], 410, "output.expired"),
                                  (["status", "done"], 404, "job.not_found")):
        rc, out, err = fake_cli(command, answer(status, code))
        assert rc == (2 if status == 404 else 1) and err.strip().endswith(f"{code}: said by the service"), \
            (command, rc, err)


def test_ctrl_c_on_submit_wait_says_the_job_goes_on_and_how_to_reach_it(fake_cli, tmp_path):
    """A probe's Ctrl-C on `submit --wait` printed only "interrupted": the job renders on, its id lost in the
    output. The interruption ends only the wait, and says so with the commands to go on."""
    def service(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"id": "long", "state": "queued", "watch_url": WATCH.format(id="long")})
        raise KeyboardInterrupt  # the user's Ctrl-C, while the CLI waits for the job

    audio, video = tmp_path / "a.wav", tmp_path / "v.mp4"
    audio.write_bytes(b"RIFF")
    video.write_bytes(b"\0")
    rc, out, err = fake_cli(["submit", str(audio), str(video), "--wait", "-o", str(tmp_path / "o.mp4"), "-q"],
                            service)
    assert rc == 130, (rc, err)
    assert "job long goes on rendering on the service" in err and "lipsync wait long" in err, err
    assert f"lipsync download --wait long {tmp_path / 'o.mp4'}" in err and "lipsync cancel long" in err, err


def test_purge_removes_a_finished_jobs_files_and_prints_its_view(fake_cli):
    """`lipsync purge ID` asks the service to remove the job's files (DELETE /v1/jobs/ID/files) and prints the view
    it answers; a job still running is refused by the service (409), a mistake of the command's: exit 2."""
    def service(request: httpx.Request) -> httpx.Response:
        assert request.method == "DELETE" and request.url.path in ("/v1/jobs/done/files", "/v1/jobs/busy/files")
        if "busy" in request.url.path:
            return httpx.Response(409, json={"error": {"code": "job.not_finished", "message": "job busy is rendering"}})
        return httpx.Response(200, json={**_view("done", "succeeded"), "expired": True, "output": None})

    rc, out, err = fake_cli(["purge", "done"], service)
    assert rc == 0 and json.loads(out)["expired"] is True and len(fake_cli.seen) == 1, (rc, out, err)
    rc, out, err = fake_cli(["purge", "busy"], service)
    assert rc == 2 and not out and "job.not_finished: job busy is rendering" in err, (rc, err)


def test_cancelling_a_job_that_had_ended_says_nothing_was_cancelled(fake_cli):
    """`lipsync cancel ID` on a job that had already succeeded, failed or been cancelled printed its view and
    exited 0 without a word: it says so now on stderr (the view on stdout and exit 0 as before); a job that
    the cancel did cancel gets no such line."""
    states = {"done": "succeeded", "bad": "failed", "gone": "cancelled", "busy": "rendering"}

    def service(request: httpx.Request) -> httpx.Response:
        job_id = request.url.path.split("/")[3]
        state = states[job_id]
        if request.method == "DELETE" and not JobState(state).terminal:
            states[job_id] = state = "cancelled"
        return httpx.Response(200, json=_view(job_id, state))

    for job_id, state in (("done", "succeeded"), ("bad", "failed"), ("gone", "cancelled")):
        rc, out, err = fake_cli(["cancel", job_id], service)
        assert rc == 0 and json.loads(out)["state"] == state, (job_id, rc, err)
        assert err == f"lipsync: job {job_id} had already ended in state {state}: nothing was cancelled\n", err
    rc, out, err = fake_cli(["cancel", "busy"], service)
    assert rc == 0 and json.loads(out)["state"] == "cancelled" and not err, (rc, out, err)


def test_a_port_held_by_a_killed_services_ray_is_waited_for_and_no_other(monkeypatch):
    """`lipsync serve` waits for its port (PORT_WAIT_S) only when what holds it is the Ray of a service that has
    ended (a restart right after a SIGKILL: its Serve proxy, in a process group of its own, lets go seconds later);
    a port that a running process keeps is refused at once (a second service waited 15 s, then exited 1)."""
    import socket

    from actors.runtime import RAY_OWNER_VARIABLE
    from cluster.cli import _held_by_an_ended_service

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    listen = ("import socket, sys, time; s = socket.create_server(('127.0.0.1', 0)); print(s.getsockname()[1], "
              "flush=True); sys.stdin.read()")
    for owner, ended in ((f"{gone.pid}-0123", True), (f"{os.getpid()}-0123", False), (None, False)):
        env = {k: v for k, v in os.environ.items() if k != RAY_OWNER_VARIABLE}
        if owner is not None:
            env[RAY_OWNER_VARIABLE] = owner
        holder = subprocess.Popen([sys.executable, "-c", listen], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = int(holder.stdout.readline())
            assert _held_by_an_ended_service(port) is ended, owner
        finally:
            holder.communicate(timeout=30)
    with socket.create_server(("127.0.0.1", 0)) as held:  # this process: no Ray's
        assert _held_by_an_ended_service(held.getsockname()[1]) is False
    # a Ray process whose mark cannot be read (a new title can wipe its environment block): maybe an ended
    # service's proxy, waited for (refused at once, a restart right after a SIGKILL failed in a fresh clone)
    env = {k: v for k, v in os.environ.items() if k != RAY_OWNER_VARIABLE}
    holder = subprocess.Popen(["bash", "-c", f'exec -a "ray::ProxyActor" {sys.executable} -c "{listen}"'], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(holder.stdout.readline())
        assert _held_by_an_ended_service(port) is True
        # still held once waited for: exit 1, to be started again (exit 2 is a mistake in how it was started,
        # which OPERATIONS' systemd unit does not restart); a holder that stays: exit 2 without a wait
        from cluster import cli

        monkeypatch.setattr(cli, "PORT_WAIT_S", 1.0)
        refused = cli._port_refusal("127.0.0.1", port, "Address already in use")
        assert (refused.code, refused.exit_code, refused.retryable) == ("service.port_in_use", 1, True), refused
    finally:
        holder.communicate(timeout=30)
    with socket.create_server(("127.0.0.1", 0)) as held:
        started = time.monotonic()
        refused = cli._port_refusal("127.0.0.1", held.getsockname()[1], "Address already in use")
        assert refused.exit_code == 2 and time.monotonic() - started < 1.0, refused


def test_the_readme_shows_what_the_shell_client_and_the_sdk_take():
    """A walk through the README found: `lipsync avatar --json`, `avatars --limit/--offset` and `live --sample-rate
    /--recording/--max-seconds/--model` not shown; the SDK's `list`, `job` and `cancel` not named; the live
    snippet printing `s.stats().latency_p50_s` right after `s.send(pcm)`, which is None then (no segment has shown
    speech yet: the figures are read once the block has ended the session); `serve run` called "the same app"
    without saying that its Ray is not the private, loopback-only one of `lipsync serve`."""
    import inspect
    import re

    from cluster.cli import build_parser
    from cluster.client import AsyncClient, Client

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", readme, re.S)
    shell = "\n".join(body for kind, body in blocks if kind == "bash").replace("\\\n", " ")
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("avatar", "avatars", "live"):
        shown = {flag for line in shell.splitlines() if re.search(rf"\blipsync {name}\b", line)
                 for flag in re.findall(r"--[a-z][a-z-]*", line)}
        options = {o for action in commands[name]._actions for o in action.option_strings if o.startswith("--")}
        missing = options - {"--help", "--url", "--token", "--verbose"} - shown
        assert not missing, f"lipsync {name}: {sorted(missing)} not shown in the README"
    python = "\n".join(body for kind, body in blocks if kind == "python")
    for method in ("list", "job", "cancel"):
        assert inspect.iscoroutinefunction(getattr(AsyncClient, method)) and callable(getattr(Client, method))
        assert f"c.{method}(" in python and f"`await c.{method}(" in readme, method
    live = next(body for kind, body in blocks if kind == "python" and "client.live(" in body).splitlines()
    opened = next(i for i, line in enumerate(live) if "with client.live(" in line)
    indent = len(live[opened]) - len(live[opened].lstrip())
    code = [line.split("#")[0] for line in live[opened + 1:]]
    reads = [line for line in code if "latency_p50_s" in line]
    assert reads and all(len(line) - len(line.lstrip()) <= indent for line in reads), reads  # after the block
    said = " ".join(readme.split())
    assert "`serve run` (or a Serve config) serves the same app, but on a Ray that Ray starts or joins with its own " \
        "defaults" in said and "not on loopback only as the embedded Ray of `lipsync serve` does" in said


def test_a_services_error_reaches_the_terminal_without_its_escapes():
    """A service's error may name a path or URL as it was sent, escape sequences included: the line the shell
    client prints has them dropped (a job's error in `lipsync list`, every `lipsync: error:` line)."""
    from cluster.cli import _fail_line
    from cluster.schemas import ErrorInfo

    line = _fail_line(ErrorInfo(code="input.unreadable", message="/in/\x1b]0;pwned\x07x\x1b[2J.wav is not audio"))
    assert line == "lipsync: error: input.unreadable: /in/]0;pwnedx[2J.wav is not audio", line


def test_lipsync_avatars_says_more_only_when_there_are_more(monkeypatch, capsys):
    """`lipsync avatars --limit 1` with one avatar printed `more: lipsync avatars --offset 1`, which then
    said there were none: a full page said "more". It asks for one more than it shows now."""
    import httpx

    import cluster.cli as cli
    from cluster.client import Client

    stored = [{"id": f"av{i:04d}", "frames": 10} for i in range(3)]

    def handler(request: httpx.Request) -> httpx.Response:
        limit, offset = int(request.url.params["limit"]), int(request.url.params["offset"])
        return httpx.Response(200, json=stored[offset:offset + limit])

    monkeypatch.setattr(cli, "_client", lambda args: Client("http://api.test",
                                                            transport=httpx.MockTransport(handler)))
    for limit, offset, shown, more in ((3, 0, 3, None), (2, 0, 2, "--offset 2 --limit 2"), (1, 2, 1, None),
                                       (5, 0, 3, None), (1, 1, 1, "--offset 2 --limit 1")):
        assert cli.main(["avatars", "--limit", str(limit), "--offset", str(offset)]) == 0
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == shown, (limit, offset, out)
        assert ("more: lipsync avatars" in err) == (more is not None) and (more is None or more in err), err


def test_an_output_whose_reader_left_ends_quietly(env, workdir, monkeypatch):
    """`lipsync models | head -0` printed a BrokenPipeError traceback, and a client command (`lipsync status ID |
    head -3`) `output.unwritable: [Errno 32] Broken pipe`: the reader leaving is not the command's failure. It
    ends with no word and the status of a process that SIGPIPE ended (141), as `cat` does."""
    import io
    import subprocess

    import httpx

    import cluster.cli as cli
    from cluster.client import Client

    proc = subprocess.Popen([*CLI, "models"], env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader left before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err

    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return os.open(os.devnull, os.O_WRONLY)

    stored = [{"id": "av0001", "frames": 10}]
    monkeypatch.setattr(cli, "_client", lambda args: Client("http://api.test", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json=stored))))
    monkeypatch.setattr(sys, "stdout", Gone())
    assert cli.main(["avatars"]) == 141


def test_serve_warns_of_live_tokens_that_expire_before_a_session_may_end(monkeypatch, capsys):
    """A probe: with LIPSYNC_LIVE_TOKEN_TTL_S=20 a viewer's hls_url answered 401 from 16 s on while its session ran
    (a plain player cannot renew it); nothing said so at the start. `lipsync serve` warns (allowed: clients that
    renew their tokens are fine)."""
    import signal

    from cluster import cli

    def start_service(settings, host, port, **kw):
        raise cli.LipsyncError("stop here", code="test.stop")

    monkeypatch.setattr("service.launch.start_service", start_service)
    monkeypatch.setattr(cli, "_port_in_use", lambda host, port, wait_s=cli.PORT_WAIT_S: None)
    monkeypatch.setattr(cli, "_stop_started", lambda *a, **k: None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # serve installs its own
    try:
        monkeypatch.setenv("LIPSYNC_LIVE_TOKEN_TTL_S", "20")
        assert cli.main(["serve", "--port", "8299"]) == 1
        assert "LIVE_TOKEN_TTL_S" not in capsys.readouterr().err  # without an API token URLs are unsigned: no expiry
        monkeypatch.setenv("LIPSYNC_API_TOKEN", "secret")
        assert cli.main(["serve", "--port", "8299"]) == 1
        said = capsys.readouterr().err
        assert "warning: LIPSYNC_LIVE_TOKEN_TTL_S (20) is below LIPSYNC_LIVE_MAX_SECONDS (3600)" in said
        monkeypatch.delenv("LIPSYNC_LIVE_TOKEN_TTL_S")
        assert cli.main(["serve", "--port", "8299"]) == 1
        assert "LIVE_TOKEN_TTL_S" not in capsys.readouterr().err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_render_takes_the_sync_modes_and_crf_that_submit_takes(monkeypatch, capsys):
    """A probe: `lipsync render` took only `--loop pingpong|forward`, where `submit` and the API take five sync modes
    and a crf; `--loop` stays as the older name."""
    from cluster import cli

    seen = []
    monkeypatch.setattr(cli, "_render", lambda *a, **k: seen.append((a[4], k.get("crf"))) or 0)
    base = ["render", "--audio", "a.wav", "--video", "v.mp4", "-o", "o.mp4"]
    for extra, want in (([], ("pingpong", None)), (["--sync-mode", "loop"], ("forward", None)),
                        (["--sync-mode", "silence", "--crf", "28"], ("silence", 28)), (["--loop", "forward"],
                                                                                         ("forward", None))):
        assert cli.main(base + extra) == 0 and seen[-1] == want, (extra, seen)
    assert cli.main(base + ["--sync-mode", "remap", "--loop", "forward"]) == 2
    with pytest.raises(SystemExit):
        cli.main(base + ["--crf", "52"])
    assert "not an x264 CRF (0-51)" in capsys.readouterr().err


def test_a_mistyped_option_is_said_with_its_commands_usage_and_the_option_meant(capsys):
    """A probe's `lipsync submit a.wav b.mp4 --ouput x.mp4` got the top-level usage and no hint."""
    from cluster import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(["submit", "a.wav", "b.mp4", "--ouput", "x.mp4"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "usage: lipsync submit" in err, err
    assert "unrecognized arguments: --ouput x.mp4 (--ouput: did you mean --output?)" in err, err


def test_download_of_a_job_still_rendering_says_how_to_wait_and_waits_when_asked(fake_cli, tmp_path):
    """A probe: `lipsync download ID` of a job still rendering exited 2 (a mistake of the command's) and offered no
    way to wait. It exits 1 saying how, and `--wait` waits for the job first."""
    polls = []

    def service(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/result"):
            if len(polls) < 2:
                return httpx.Response(409, json={"error": {"code": "job.not_succeeded", "message": "not yet"}})
            return httpx.Response(200, content=b"mp4", headers={"content-length": "3"})
        polls.append(path)
        return httpx.Response(200, json=_view("slow", "rendering" if len(polls) < 2 else "succeeded"))

    out = tmp_path / "o.mp4"
    rc, _, err = fake_cli(["download", "slow", str(out)], service)
    assert rc == 1 and f"lipsync download --wait slow {out}" in err, (rc, err)
    rc, _, err = fake_cli(["download", "--wait", "slow", str(out)], service)
    assert rc == 0 and out.read_bytes() == b"mp4", (rc, err)


def test_a_server_path_that_is_no_file_here_either_is_said_to_be_a_likely_typo(fake_cli, tmp_path):
    """A probe's mistyped absolute path was sent as the server's and refused for the input roots only."""
    def service(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"code": "input.outside_roots", "field": "audio", "message":
                                                   "input path /nonexistent/abs.wav is outside the allowed roots"}})

    video = tmp_path / "v.mp4"
    video.write_bytes(b"\0")
    rc, _, err = fake_cli(["submit", "/nonexistent/abs.wav", str(video)], service)
    assert rc == 2 and "/nonexistent/abs.wav is no file on this machine either: a typo?" in err, err


def test_a_render_whose_early_avatar_outlasts_its_deadline_fails_typed_in_the_prepare_stage(inputs):
    # it raised a bare concurrent.futures.TimeoutError after chunk_timeout_s (a long template's preparation may
    # legitimately take longer), a traceback with no stage, and the render then waited for the thread at its exit
    from concurrent.futures import Future

    from cluster.cli import _avatar_prepared
    from cluster.errors import RenderTimeout
    from cluster.schemas import RenderRequest

    settings = Settings().model_copy(update={"chunk_timeout_s": 0.2, "prepare_seconds_per_template_second": 0.1})
    request = RenderRequest(audio=str(inputs["speech"]), video=str(inputs["template"]))
    never: Future = Future()
    t0 = time.monotonic()
    with pytest.raises(RenderTimeout) as caught:
        _avatar_prepared(never, request, settings)
    waited = time.monotonic() - t0
    assert 0.2 <= waited < 5, waited  # the template's deadline: 0.2 s + 0.1 s per second of it
    e = caught.value
    assert e.stage == "prepare" and e.code == "render.timeout" and str(inputs["template"]) in e.message
    done: Future = Future()
    done.set_result(None)
    _avatar_prepared(done, request, settings)  # a prepared avatar: no wait


def test_a_joined_start_takes_over_the_application_of_a_service_that_is_gone(monkeypatch, tmp_path, caplog):
    """A `lipsync serve` SIGKILLed on a joined cluster left its Serve application running, and its supervisor's
    restart with the same flags was refused (`service.in_use`, exit 2: systemd's RestartPreventExitStatus=2 then
    gave up). The restart takes it over where the service that deployed that very application is gone (its Ray
    job dead) and served the same host, port and storage root, once (the first start to claim it); not one that
    runs, one that served others, one deployed otherwise or since, nor where the record cannot be read."""
    import json
    import types

    import ray
    import ray._private.state
    import ray.experimental.internal_kv

    from cluster.config import Settings
    from cluster.errors import ServiceInUse
    from service import launch

    settings = Settings(storage_root=tmp_path / "st")
    record = {"job_id": "01000000", "host": "127.0.0.1", "port": 8795, "storage_root": str(settings.storage_root),
              "deployed_at": 1765000000.5}
    kv: dict[str, bytes] = {}
    table = [{"JobID": "01000000", "IsDead": True, "DriverPid": 4147, "DriverIPAddress": "10.0.0.5"}]
    me = ["03000000"]

    def put(key, value, overwrite=True):
        existed = key in kv
        if overwrite or not existed:
            kv[key] = value.encode() if isinstance(value, str) else value
        return existed

    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_get", lambda key: kv.get(key))
    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_put", put)
    monkeypatch.setattr(ray._private.state, "jobs", lambda: table)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_job_id=lambda: me[0]))
    deployed_at = [record["deployed_at"]]

    class Running:
        def get_serve_status(self, name):
            status = types.SimpleNamespace(status="RUNNING", deployment_timestamp=deployed_at[0])
            return types.SimpleNamespace(app_status=status)

    def start(port: int = 8795, **changed) -> None:
        launch._check_no_running_app(Running(), "127.0.0.1:6401", settings.model_copy(update=changed),
                                     host="127.0.0.1", port=port)

    with pytest.raises(ServiceInUse, match="not taken over: no record of a lipsync serve"):  # deployed otherwise
        start()
    key = launch.DEPLOYER_KEY.format(namespace=settings.namespace)
    kv[key] = b"not json"
    with pytest.raises(ServiceInUse):  # a record that cannot be read: refused as before
        start()
    kv[key] = json.dumps(record).encode()
    with pytest.raises(ServiceInUse):  # another port
        start(port=8796)
    with pytest.raises(ServiceInUse):  # another storage root
        start(storage_root=tmp_path / "other")
    table[0]["IsDead"] = False  # the service that deployed it runs
    with pytest.raises(ServiceInUse, match=r"not taken over: the lipsync serve that deployed it \(Ray job 01000000\) "
                                           r"runs"):
        start()
    table[0]["IsDead"] = True
    deployed_at[0] += 60  # deployed since by other means (or by a service whose record could not be written)
    with pytest.raises(ServiceInUse):
        start()
    deployed_at[0] -= 60
    with caplog.at_level("WARNING"):
        start()  # taken over, and said with the driver that is gone
    assert "deployed by a lipsync serve that is gone (Ray job 01000000, driver pid 4147 at 10.0.0.5)" in caplog.text
    start()  # the same start, just before it deploys: its own claim
    me[0] = "04000000"  # a second start at the same time: the first one's claim stands
    launch._taken_over.clear()
    with pytest.raises(ServiceInUse):
        start()



def test_serve_says_an_input_root_that_is_not_there_and_refuses_an_infinite_setting(env, workdir):
    """`LIPSYNC_INPUT_ROOTS=/nonexistent/dir` (a typo) was taken without a word, every path input under it then
    refused; `LIPSYNC_NODE_CACHE_GB=inf` and `LIPSYNC_MAX_INPUT_SECONDS=1e999` passed every bound."""
    missing = workdir / "no-such-inputs"
    # (ended before Ray starts by a port given twice, after the warning)
    rc, _, err, _ = run_cli([*CLI, "serve", "--port", "8797", "--metrics-port", "8797"],
                            {**env, "LIPSYNC_INPUT_ROOTS": f"{workdir}:{missing}"}, workdir, timeout=60)
    assert rc == 2 and f"warning: LIPSYNC_INPUT_ROOTS names {missing}, which is not a directory here" in err, err
    assert f"names {workdir}," not in err, err
    for name, value in (("LIPSYNC_NODE_CACHE_GB", "inf"), ("LIPSYNC_MAX_INPUT_SECONDS", "1e999")):
        rc, _, err, _ = run_cli([*CLI, "serve"], {**env, name: value}, workdir, timeout=60)
        assert rc == 2 and "settings.invalid" in err and name.removeprefix("LIPSYNC_").lower() in err.lower(), err


def test_the_start_names_as_resumed_only_the_jobs_admitted_before_it(monkeypatch):
    """`lipsync serve` lists the unfinished jobs it resumes once it is ready; a job a client sent as soon as the
    service answered, before that line, was said to be "unfinished from before"."""
    from datetime import datetime, timezone

    import cluster.client
    from cluster import cli
    from cluster.config import Settings

    def view(job_id: str, created: str) -> dict:
        return {"id": job_id, "state": "rendering", "stage": "render", "progress": 0.1, "frames_done": 1,
                "frames_total": 20, "created_at": created, "updated_at": created}

    page = {"jobs": [view("sent-now", "2026-12-08T00:14:27+00:00"), view("from-before", "2026-12-07T23:00:00+00:00"),
                     view("naive-time", "2026-12-07T22:00:00")]}  # newest first
    real = cluster.client.Client
    monkeypatch.setattr(cluster.client, "Client", lambda *a, **kw: real(
        *a, transport=httpx.MockTransport(lambda request: httpx.Response(200, json=page)), **kw))
    started = datetime(2026, 12, 8, 0, 14, 0, tzinfo=timezone.utc)
    said = cli._unfinished_jobs("http://api.test", Settings(), before=started)
    assert said == ["naive-time", "from-before"], said
    assert cli._unfinished_jobs("http://api.test", Settings()) == ["naive-time", "from-before", "sent-now"]


def test_a_joined_services_stop_ends_its_live_sessions_where_it_deployed_the_app(monkeypatch, tmp_path):
    """A joined service's stop deletes the app it deployed, and with it its live sessions' socket and stream: they
    ran on unreachable until their idle timeout, `lipsync live` cut off with a 500 (a probe). They are ended as an
    embedded service's are (`service_stopped`); a stop that found another's app running (not deployed) leaves its
    sessions. (By hand on a loopback `ray start --head`: `lipsync live` said `session.ended ... service_stopped` at
    once, the session read `ended` with its recording after the next start.)"""
    import ray
    from ray import serve

    from cluster.config import Settings
    from service import launch

    ended: list[str] = []
    monkeypatch.setattr(launch, "end_live_sessions", lambda settings, *a, **k: ended.append("ended") or True)
    monkeypatch.setattr(serve, "delete", lambda *a, **k: None)
    monkeypatch.setattr(launch, "_forget_deployer", lambda settings: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    settings = Settings(storage_root=tmp_path)
    monkeypatch.setattr(launch, "_deployed", True)
    launch.stop_service(False, settings=settings)
    assert ended == ["ended"]
    monkeypatch.setattr(launch, "_deployed", False)
    launch.stop_service(False, settings=settings)
    assert ended == ["ended"]


def test_a_ray_start_that_timed_out_is_tried_again_once_its_dashboard_port_is_free(monkeypatch, tmp_path):
    """A start of the embedded Ray that timed out (an overloaded machine) is tried again; its dashboard, still going,
    held the port asked for a few seconds more, and the next start was refused at once ("Failed to bind to
    127.0.0.1:N because it's already occupied", `lipsync serve` exit 1, seen in a suite run). The port is waited
    for first."""
    import socket
    import threading

    import ray

    from actors.runtime import start_embedded_ray
    from cluster.config import Settings
    from cluster.ports import free_port

    port = free_port()
    held = socket.create_server(("127.0.0.1", port))  # the timed-out start's dashboard, going 1 s later
    starts: list[bool] = []

    def init(**kwargs):
        if not starts:
            starts.append(False)
            threading.Timer(1.0, held.close).start()
            raise Exception("The current node timed out during startup. This could happen because ...")
        with socket.create_server(("127.0.0.1", kwargs["dashboard_port"])):  # (Ray binds it: free by now)
            starts.append(True)
        return "started"

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    ctx = start_embedded_ray(Settings(storage_root=tmp_path / "store"), num_cpus=1, include_dashboard=True,
                             dashboard_port=port, temp_dir=str(tmp_path / "ray"))
    assert ctx == "started" and starts == [False, True]
