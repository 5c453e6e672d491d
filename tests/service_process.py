"""A real `lipsync serve` in a subprocess on a free loopback port (its own Ray, token and storage).

Used by the session fixture `service` (tests/conftest.py) and by tests that kill and restart a
service. The process runs in its own session; stopping it ends exactly that process group.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import lipsync_command

UPLOAD_IDLE_TIMEOUT_S = 5  # uploads orphaned by a killed ingress or service are swept after this
SERVICE_ENV = dict(LIPSYNC_MODEL_WORKERS="1", LIPSYNC_COMPOSITORS="2", LIPSYNC_CHUNK_SECONDS="1",
                   LIPSYNC_BATCH_SIZE="8", LIPSYNC_MODEL_THREADS="1", OMP_NUM_THREADS="1",
                   LIPSYNC_STALL_TIMEOUT_S="60", LIPSYNC_MAX_UPLOAD_BYTES=str(4 * 1024**2),
                   LIPSYNC_UPLOAD_IDLE_TIMEOUT_S=str(UPLOAD_IDLE_TIMEOUT_S))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`lipsync serve` on 127.0.0.1:<port> with `storage_root`; `url`, `token`, `storage_root`. `as_a_user`:
    with the service's own defaults on the machine's real cores (a benchmark's), not the tests' small pool
    (`SERVICE_ENV`) on 4 logical CPUs."""

    def __init__(self, root: Path, env: dict[str, str | None] | None = None, token: str | None = None,
                 dashboard: bool = False, as_a_user: bool = False) -> None:
        self.root = Path(root)
        self.storage_root = self.root / "storage"
        self.input_root = self.root / "inputs"
        self.compat_dir = self.root / "compat"
        for d in (self.storage_root, self.input_root, self.compat_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.token = token or secrets.token_hex(16)
        self.port = free_port()
        self.metrics_port = free_port()  # Prometheus' target (`--metrics-port`): the same across restarts
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})  # a value None removes the variable
        self.dashboard = dashboard
        self.as_a_user = as_a_user
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "serve.log"
        self._ray_dirs: list[str] = []
        self._ready_once = False  # a start that failed to bind its port moves to another only before this

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_") and k != "RAY_ADDRESS"}
        env.update({} if self.as_a_user else SERVICE_ENV)
        env.update(LIPSYNC_STORAGE_ROOT=str(self.storage_root), LIPSYNC_API_TOKEN=self.token,
                   LIPSYNC_INPUT_ROOTS=str(self.input_root), LIPSYNC_COMPAT_DATA_DIR=str(self.compat_dir),
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        env.update(self.extra_env)
        return {k: v for k, v in env.items() if v is not None}

    def launch(self) -> "ServiceProcess":
        """Start `lipsync serve` without waiting for it to be ready."""
        ray_dir = tempfile.mkdtemp(dir="/tmp", prefix="rs")
        self._ray_dirs.append(ray_dir)
        cmd = [lipsync_command(), "serve", "--port", str(self.port),
               *([] if self.as_a_user else ["--num-cpus", "4", "--num-gpus", "0"]),
               "--ray-temp-dir", ray_dir, "--metrics-port", str(self.metrics_port),
               # a free port: `lipsync serve` asks Ray for exactly 8265 by default, which another Ray
               # on a shared machine may hold
               *(["--dashboard-port", str(free_port())] if self.dashboard else ["--no-dashboard"])]
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def start(self, timeout: float = 240.0) -> "ServiceProcess":
        self.launch()
        deadline = time.monotonic() + timeout
        moves = 0
        while b"lipsync service ready" not in self.log.read_bytes():
            if self.proc.poll() is not None:
                # `free_port` cannot reserve the port: another process (e.g. a second pytest-xdist
                # worker's Ray) may take it before Serve binds it. A first start moves to another
                # port; a restart keeps its URL (the tests that restart a service rely on it).
                lost_port = b"Failed to bind to address" in self.log.read_bytes()
                if b"cannot export metrics on" in self.log.read_bytes() and moves < 3:  # (before Ray starts)
                    moves += 1
                    self.metrics_port = free_port()
                    self.log.write_bytes(b"")
                    self.launch()
                    continue
                if lost_port and not self._ready_once and moves < 3:
                    moves += 1
                    self.kill()  # what the failed start left of its process group (its Ray)
                    self.port = free_port()
                    self.url = f"http://127.0.0.1:{self.port}"
                    self.log.write_bytes(b"")
                    self.launch()
                    continue
                raise RuntimeError(f"lipsync serve exited {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"lipsync serve not ready within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)
        # the next start's readiness is judged on its own lines
        self.log.write_bytes(b"")
        self._ready_once = True
        return self

    def actor_pids(self, title: str) -> list[int]:
        """PIDs of this service's processes (descendants of its `lipsync serve`) whose Ray title starts with
        `title` (e.g. `ray::ModelWorker`)."""
        import psutil

        pids = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if " ".join(child.cmdline()).startswith(title):
                    pids.append(child.pid)
            except psutil.Error:
                continue
        return pids

    def session_actor_pid(self, session_id: str) -> int | None:
        """The PID of a live session's own actor: the parent of the ffmpeg that writes its stream (the encoder
        runs in `<storage root>/sessions/<id>/hls`)."""
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.name().startswith("ffmpeg") and child.cwd().endswith(f"/sessions/{session_id}/hls"):
                    return child.ppid()
            except psutil.Error:
                continue
        return None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode("utf-8", "replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group (the service, its Ray head and workers)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._wait_group_gone(self.proc.pid, 30)
        self.proc = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (clean stop), then SIGKILL of whatever of the group is left."""
        if self.proc is None:
            return None
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        try:
            os.killpg(pid, signal.SIGKILL)  # Ray agents that outlive their raylet
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        self._wait_group_gone(pid, 30)
        self.proc = None
        return rc

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            time.sleep(0.1)

    def cleanup(self) -> None:
        self.stop()
        for d in self._ray_dirs:
            shutil.rmtree(d, ignore_errors=True)
