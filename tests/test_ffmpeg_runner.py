"""The one ffmpeg runner: kill and reap on every way out, children that die with their parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cluster.errors import EncodeError, MediaError, RenderTimeout
from cluster.media.ffmpeg import FFmpeg, die_with_parent_hook, ffmpeg_args, file_url

ENDLESS = ["-re", "-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25", "-f", "null", "-"]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"  # a zombie is dead too
    except FileNotFoundError:
        return True


def test_a_child_whose_parent_died_before_its_death_signal_was_set_does_not_run():
    """The window `setpriv --pdeathsig` leaves (the parent SIGKILLed while setpriv loads, before the
    signal is set: the signal then never comes) is closed as `die_with_parent_hook` closes it: the
    launcher runs the command only if the process that started it is still its parent."""
    from cluster.media.ffmpeg import launch_command, pdeathsig_launcher

    if not pdeathsig_launcher():
        pytest.skip("no setpriv with --pdeathsig here: the preexec hook is used (it checks the same)")
    argv, _ = launch_command(["sleep", "30"])
    t0 = time.monotonic()
    parent = argv.index(str(os.getpid()))
    orphan = subprocess.run([*argv[:parent], "1", *argv[parent + 1:]], timeout=20)  # as if reparented to init
    assert orphan.returncode == 137 and time.monotonic() - t0 < 10
    assert subprocess.run(launch_command(["true"])[0], timeout=20).returncode == 0


def test_runner_kills_and_reaps_on_timeout_and_on_exceptions():
    run = FFmpeg(ENDLESS, stage="t")
    with pytest.raises(RenderTimeout, match="timed out"):
        run.wait(0.3)
    assert run.proc.returncode is not None  # reaped
    with pytest.raises(RuntimeError), FFmpeg(ENDLESS, stage="t") as run2:
        raise RuntimeError("caller failed")
    assert run2.proc.returncode is not None
    with FFmpeg(ENDLESS, stage="t", timeout_error=EncodeError) as run3:
        with pytest.raises(EncodeError):
            run3.communicate(timeout=0.3)
    with FFmpeg(["-f", "lavfi", "-i", "nosuchfilter", "-f", "null", "-"], stage="bad") as run4:
        run4.communicate(timeout=30)
        with pytest.raises(MediaError) as err:
            run4.check()
    assert err.value.stage == "bad" and "nosuchfilter" in err.value.cause


def test_command_lines_from_ffmpeg_python():
    import ffmpeg

    args = ffmpeg_args(ffmpeg.input(file_url("/tmp/-x.wav"), protocol_whitelist="file").output("pipe:1", f="f32le"))
    assert args[:4] == ["-protocol_whitelist", "file", "-i", "file:/tmp/-x.wav"] and args[-1] == "pipe:1"


@pytest.mark.skipif(not sys.platform.startswith("linux") or die_with_parent_hook() is None,
                    reason="PR_SET_PDEATHSIG is Linux-only")
def test_ffmpeg_dies_with_a_killed_parent():
    """A process (think: a compositor) starts ffmpeg and is SIGKILLed: its ffmpeg dies with it."""
    code = textwrap.dedent(f"""
        import sys, time
        from cluster.media.ffmpeg import FFmpeg
        run = FFmpeg({ENDLESS!r})
        print(run.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), f"ffmpeg {child} outlived its killed parent"
    finally:
        parent.kill()
        parent.wait(timeout=10)


def test_a_jobs_work_is_stopped_where_it_runs_once_the_job_has_ended():
    """`cluster.stopping`: a step's ffmpeg (normalising a long template) ran on to its end after its job was
    cancelled. `stop(job)` kills the job's running ffmpeg processes (its thread's `communicate` then raises
    `JobCancelled`), one started after the stop is killed at once, its loops leave at their next `check`, and
    another job's work goes on; the registry keeps no process that has ended."""
    import threading

    from cluster import stopping
    from cluster.errors import JobCancelled
    from cluster.media.ffmpeg import run_ffmpeg

    outcome: dict[str, object] = {}

    def work(job_id: str) -> None:
        with stopping.work_of(job_id):
            try:
                run_ffmpeg(ENDLESS, timeout=60, stage="normalize")
                outcome[job_id] = "ended"
            except Exception as e:  # noqa: BLE001 - what the step raised
                outcome[job_id] = e

    threads = {j: threading.Thread(target=work, args=(j,)) for j in ("job-stopped", "job-other")}
    for t in threads.values():
        t.start()
    deadline = time.monotonic() + 20
    while len(stopping._running) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(stopping._running) == {"job-stopped", "job-other"}
    t0 = time.monotonic()
    assert stopping.stop("job-stopped", "was cancelled") == 1
    threads["job-stopped"].join(10)
    assert time.monotonic() - t0 < 5 and not threads["job-stopped"].is_alive()
    error = outcome["job-stopped"]
    assert isinstance(error, JobCancelled) and "job job-stopped was cancelled" in error.message, error
    assert threads["job-other"].is_alive() and "job-other" not in outcome  # another job's work goes on
    # a process the stopped job starts afterwards is killed at once; its loops leave at their next check
    with stopping.work_of("job-stopped"):
        with pytest.raises(JobCancelled):
            run_ffmpeg(ENDLESS, timeout=60)
        with pytest.raises(JobCancelled, match="its work was stopped"):
            list(stopping.checked(range(3)))
    assert stopping.stop("job-other") == 1
    threads["job-other"].join(10)
    assert isinstance(outcome["job-other"], JobCancelled)
    assert not stopping._running  # (nothing kept of processes that ended)
    # work outside any job, a job never stopped, and one stopped long ago (its id used again once its record went:
    # LIPSYNC_RECORD_RETENTION_DAYS) are left alone
    assert stopping.stopped("job-never") is None
    stopping._stopped["job-again"] = ("was cancelled", time.monotonic() - stopping.REMEMBERED_STOP_S - 1)
    assert stopping.stopped("job-again") is None
    with stopping.work_of("job-never"):
        stopping.check()
        run_ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25", "-frames:v", "2", "-f", "null", "-"],
                   timeout=30)
    assert not stopping._running
