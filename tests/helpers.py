"""Small helpers shared by the tests."""
from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np


def lipsync_command() -> str:
    """The `lipsync` console script beside this interpreter (else the one on PATH)."""
    import os
    import shutil

    return shutil.which("lipsync", path=os.path.dirname(sys.executable)) or "lipsync"


def one_x264_thread() -> None:
    """Encode in this process at one x264 thread wherever no thread plan says otherwise, as a compositor of
    one Ray CPU does (its plan): the in-process references the Ray tests compare bit for bit encoded at
    x264's default (1.5 threads per core), with which x264 wrote another bitstream for the same frames in
    3 of about 25 loaded full suites (ONE_X264_THREAD in tests/test_media.py). Called by tests/conftest.py
    in every test process and by the scenario scripts in theirs; idempotent."""
    from cluster.media import encode

    if getattr(encode.x264_threads, "one_thread", False):
        return
    planned = encode.x264_threads

    def threads() -> int:
        return planned() or 1

    threads.one_thread, threads.planned = True, planned
    encode.x264_threads = threads


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, peak 255) of two images or frame stacks; infinite when they are identical."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = float(np.mean(d * d))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def decode_all(path: str) -> np.ndarray:
    """Every video frame of a file as one BGR array."""
    from cluster.media.decode import iter_frames

    return np.concatenate(list(iter_frames(path, 32)))


def uploads_left_after_sweep(storage_root, within_s: float) -> list[str]:
    """Upload part files (`uploads/*.part`) still there after waiting up to `within_s`: an upload
    whose client (an ingress replica, a whole service) was killed mid-way is removed by the job
    manager once idle for `LIPSYNC_UPLOAD_IDLE_TIMEOUT_S`; live uploads finish in that time."""
    from pathlib import Path

    uploads = Path(storage_root) / "uploads"
    deadline = time.monotonic() + within_s
    while True:
        left = sorted(str(p) for p in uploads.glob("*.part")) if uploads.is_dir() else []
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def unshare_works() -> bool:
    """Whether `unshare --mount --map-root-user` is permitted here (a private mount namespace)."""
    import subprocess

    try:
        return subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True,
                              timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_on_small_tmpfs(scenario: str, args: list[str], timeout: float, size: str = "12m") -> dict:
    """Run `tests/<scenario>` with a real tmpfs of `size` mounted at a fresh folder (its first
    argument, before `args`) in a private mount namespace; assert it exited 0 and return the JSON
    of its last output line."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    mountpoint = tempfile.mkdtemp(dir="/tmp", prefix="lipsync-tmpfs-")
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = (f"mount -t tmpfs -o size={size} tmpfs {mountpoint} && exec {sys.executable} "
              f"{repo / 'tests' / scenario} {mountpoint} {' '.join(map(str, args))}")
    try:
        proc = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        os.rmdir(mountpoint)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decoded_counts(container) -> tuple[int, int]:
    """(video frames, audio samples) a PyAV container decodes to (its first video and audio streams)."""
    import av

    frames = samples = 0
    for frame in container.decode(video=0, audio=0):
        if isinstance(frame, av.VideoFrame):
            frames += 1
        else:
            samples += frame.samples
    return frames, samples


def writer_killed_mid_write(path: Path) -> Path:
    """Run `atomic_writer(path)` in a child process that is SIGKILLed mid-write; return what it left."""
    before = set(path.parent.iterdir())
    code = ("import os, signal, sys; from cluster.fsutil import atomic_writer\n"
            "with atomic_writer(sys.argv[1]) as f:\n"
            "    f.write(b'half a file'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], timeout=60)
    assert proc.returncode == -9
    (left,) = set(path.parent.iterdir()) - before
    return left


def hold_event_stream(http, job_id: str, stack, timeout: float = 15.0):
    """Open the job's event stream on the httpx client `http` and keep it open until `stack` (an
    ExitStack) closes: (the response, its line iterator; the stack keeps the iterator, since one
    let go closes the connection). Retried while the service refuses it with 429 (a stream closed just before may
    still count for its 0.5 s poll); its first event read (a running stream: it counts)."""
    held = []

    def opened() -> bool:
        ctx = http.stream("GET", f"/v1/jobs/{job_id}/events")
        r = ctx.__enter__()
        if r.status_code != 200:
            ctx.__exit__(None, None, None)
            assert r.status_code == 429, r.status_code
            return False
        stack.callback(ctx.__exit__, None, None, None)
        lines = r.iter_lines()
        stack.callback(lambda keep=lines: keep)  # referenced until the stack closes, whatever the caller keeps
        assert next(lines).startswith("event: status")
        held.append((r, lines))
        return True

    wait_until(opened, timeout=timeout, interval=0.3, what=f"an event stream of job {job_id}")
    return held[0]


@contextlib.contextmanager
def driving(cluster, namespace: str):
    """This process as the driver of a `ray.cluster_utils.Cluster` (the multi-node scenarios): connected
    while the block runs, then disconnected and the cluster shut down, however the block ends."""
    import ray

    ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()
