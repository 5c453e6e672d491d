"""Resolving and running the ffmpeg binary: the one ffmpeg runner.

Every ffmpeg process is started by `FFmpeg` (deadlines, kill + reap on every way out, stderr tail
in the error, the child dies with its parent); `run_ffmpeg` runs one to completion. Every
user-supplied input is opened through `input_args` (file/pipe protocols only).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import IO

from cluster import stopping
from cluster.config import Settings, get_settings
from cluster.errors import JobCancelled, LipsyncError, MediaError, RenderTimeout

log = logging.getLogger("lipsync.ffmpeg")

#: Protocols an ffmpeg input may use: local files and our own pipes, never the network.
PROTOCOL_WHITELIST = "file,pipe"
#: How much of ffmpeg's stderr is kept in an error's `cause`.
STDERR_TAIL_CHARS = 4000


@functools.lru_cache(maxsize=8)
def _resolve(configured: str | None) -> str:
    if configured:
        return configured
    env = os.environ.get("LIPSYNC_FFMPEG")
    if env:
        return env
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_binary(settings: Settings | None = None) -> str:
    """`LIPSYNC_FFMPEG`, else `ffmpeg` on PATH, else the binary bundled by imageio-ffmpeg."""
    s = settings or get_settings()
    return _resolve(s.ffmpeg)


def file_url(path: str | os.PathLike) -> str:
    """`file:` URL of a local path, so that a name like `http:x` or `-x` is never read as a
    protocol or an option. Pipes (`-`, `pipe:N`) are returned unchanged."""
    p = os.fspath(path)
    if p == "-" or p.startswith("pipe:"):
        return p
    return "file:" + os.path.abspath(p)


def input_args(path: str | os.PathLike) -> list[str]:
    """ffmpeg arguments that open `path` as an input restricted to the file and pipe protocols."""
    return ["-protocol_whitelist", PROTOCOL_WHITELIST, "-i", file_url(path)]


def stderr_tail(data: bytes | str | None, limit: int = STDERR_TAIL_CHARS) -> str:
    """The last `limit` characters of ffmpeg's stderr, decoded leniently."""
    if not data:
        return ""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text.strip()[-limit:]


def stderr_summary(tail: str) -> str:
    """The most telling line of ffmpeg's stderr: the first that reports an error, else the last."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for line in lines:
        low = line.lower()
        if any(word in low for word in ("error", "invalid", "cannot", "could not", "no such",
                                        "not found", "unable", "failed")):
            return line
    return lines[-1] if lines else "no error output"


_PR_SET_PDEATHSIG = 1


@functools.lru_cache(maxsize=1)
def _prctl():
    """libc's prctl, looked up once in the parent (nothing is loaded between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent_hook():
    """A `preexec_fn` that makes the child receive SIGKILL when the thread that started it exits
    (Linux `PR_SET_PDEATHSIG`), so ffmpeg never outlives a killed compositor or worker; None
    where the platform has no such call. The child also exits at once if its parent is already
    gone by the time the hook runs."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(137)

    return hook


#: Run by `pdeathsig_launcher`'s shell after setpriv has set the parent-death signal: ffmpeg only if the
#: parent (its pid in $0) is still the one that started it; if it died before the signal was set (a
#: compositor SIGKILLed while setpriv loaded, on a loaded machine) the signal will never come: exit.
_EXEC_IF_PARENT_LIVES = 'test "$PPID" = "$0" || exit 137; exec "$@"'


@functools.lru_cache(maxsize=1)
def pdeathsig_launcher() -> tuple[str, ...]:
    """`setpriv --pdeathsig KILL -- sh -c _EXEC_IF_PARENT_LIVES` (util-linux), which sets the same
    parent-death signal as `die_with_parent_hook`, checks as it does that the parent is still
    there, and then execs ffmpeg: with it, no `preexec_fn` is needed, so Python starts the child
    with vfork instead of copying this process's page tables (a fork of a compositor took 5-50 ms
    per ffmpeg: issue 20's first segment). The caller appends its own pid, then ffmpeg's command
    (`launch_command`). Empty where setpriv or a shell is missing or setpriv has no --pdeathsig
    (the hook is used then)."""
    exe = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    shell = shutil.which("sh")
    if exe is None or shell is None:
        return ()
    launcher = (exe, "--pdeathsig", "KILL", "--", shell, "-c", _EXEC_IF_PARENT_LIVES)
    try:
        subprocess.run([*launcher, str(os.getpid()), "true"], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ()
    return launcher


def launch_command(cmd: list[str]) -> tuple[list[str], object]:
    """(argv, preexec_fn) that start `cmd` so that it dies with this process (`pdeathsig_launcher`,
    else `die_with_parent_hook`)."""
    launcher = pdeathsig_launcher()
    if launcher:
        return [*launcher, str(os.getpid()), *cmd], None
    return list(cmd), die_with_parent_hook()


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """`proc.wait(timeout)` that wakes when the child exits (a pidfd), not on Python's polling
    steps of up to 50 ms; raises subprocess.TimeoutExpired past `timeout`."""
    if proc.returncode is None and timeout > 0 and hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:  # already reaped elsewhere, or a kernel without pidfds
            fd = None
        if fd is not None:
            try:
                poller = select.poll()  # (select.select refuses descriptors past 1023)
                poller.register(fd, select.POLLIN)
                if not poller.poll(timeout * 1000):
                    raise subprocess.TimeoutExpired(proc.args, timeout)
            finally:
                os.close(fd)
    return proc.wait(timeout=timeout)


class FFmpeg:
    """One running ffmpeg: the only place the project starts ffmpeg.

    `ffmpeg -hide_banner -nostdin -y *args` with stdin / stdout as pipes when asked (else
    /dev/null; stdin may also be another ffmpeg's stdout, read directly), stderr to a temporary
    file (never a pipe nobody drains), and the child bound to
    this process's life (`die_with_parent_hook`). It owns the kill-and-reap on every way out:
    `wait`/`communicate` past their deadline kill, reap and raise `timeout_error`; leaving a
    `with` block by an exception kills and reaps; `check` turns a nonzero exit into `error` with
    the stderr tail as its cause.

    Command lines are built by the callers as argument lists or with ffmpeg-python
    (`ffmpeg_args`).
    """

    def __init__(self, args: list[str], *, settings: Settings | None = None, stage: str = "ffmpeg",
                 path: str | None = None, stdin: bool | IO[bytes] = False, stdout: bool = False,
                 error: type[LipsyncError] = MediaError,
                 timeout_error: type[LipsyncError] = RenderTimeout, cwd: str | os.PathLike | None = None) -> None:
        self.stage, self.path = stage, path
        self.error, self.timeout_error = error, timeout_error
        self.cmd = [ffmpeg_binary(settings), "-hide_banner", "-nostdin", "-y", *args]
        self._stderr = tempfile.TemporaryFile()
        # stdin: True a pipe of ours, a file object (another ffmpeg's stdout) read directly, else none
        child_stdin = subprocess.PIPE if stdin is True else (stdin or subprocess.DEVNULL)
        launcher = pdeathsig_launcher()  # the child dies with this process: by setpriv, else a preexec hook
        if launcher and shutil.which(self.cmd[0]) is None:  # (setpriv would report it only as exit code 127)
            self._stderr.close()
            raise error(f"cannot start ffmpeg ({self.cmd[0]}) for {stage}{self._where}: not an executable file",
                        stage=stage, path=path, cause=f"{self.cmd[0]}: not an executable file")
        argv, preexec = launch_command(self.cmd)
        self.stopped = False  # killed because its job ended (`stop`)
        try:
            self.proc = subprocess.Popen(argv, stdin=child_stdin,
                                         stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                                         stderr=self._stderr, preexec_fn=preexec, cwd=cwd)
        except OSError as exc:
            self._stderr.close()
            raise error(f"cannot start ffmpeg ({self.cmd[0]}) for {stage}{self._where}: {exc}",
                        stage=stage, path=path, cause=str(exc)) from exc
        self._job = stopping.track(self)  # the job whose work started it: killed when that job ends early

    @property
    def _where(self) -> str:
        return f" on {self.path}" if self.path else ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self) -> str:
        """The last `STDERR_TAIL_CHARS` of what ffmpeg wrote to stderr so far."""
        if self._stderr.closed:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return stderr_tail(self._stderr.read())

    def kill(self) -> None:
        """Kill (if running) and reap ffmpeg, close its pipes (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # SIGKILLed, yet not gone (stuck in the kernel, e.g. on a dead NFS)
            log.warning("ffmpeg (%s, pid %d)%s did not end within 30 s of SIGKILL; left to the kernel",
                        self.stage, self.proc.pid, self._where)

    def stop(self) -> None:
        """Kill ffmpeg because its job has ended (`cluster.stopping`; from another thread: the signal only, the
        thread that runs it reaps it and raises `JobCancelled` from `wait`, `communicate` or `check`)."""
        self.stopped = True
        try:
            self.proc.kill()
        except ProcessLookupError:  # (ended meanwhile)
            pass

    def _raise_if_stopped(self) -> None:
        if self.stopped:
            raise JobCancelled(f"ffmpeg ({self.stage}){self._where} was stopped: job {self._job} "
                               f"{stopping.stopped(self._job) or 'has ended'}", stage=self.stage, job_id=self._job)

    def _timed_out(self, timeout: float) -> LipsyncError:
        self.kill()
        return self.timeout_error(f"ffmpeg ({self.stage}){self._where} did not finish within {timeout:g} s "
                                  f"(timed out); killed", stage=self.stage, path=self.path,
                                  cause=self.stderr_tail())

    def wait(self, timeout: float) -> int:
        """The exit code; past `timeout` seconds ffmpeg is killed and reaped and `timeout_error` raised."""
        try:
            code = wait_exit(self.proc, timeout)
        except subprocess.TimeoutExpired:
            raise self._timed_out(timeout) from None
        self._raise_if_stopped()
        return code

    def communicate(self, input: bytes | memoryview | None = None, timeout: float = 60.0) -> bytes:
        """Feed `input` to stdin (when a pipe), collect stdout (when a pipe), wait; kill and reap
        on the deadline (`timeout_error`) or any exception. Returns stdout (b'' when not a pipe)."""
        try:
            out, _ = self.proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._timed_out(timeout) from None
        except BaseException:
            self.kill()
            raise
        self._raise_if_stopped()
        return out or b""

    def check(self, what: str | None = None) -> None:
        """Raise `error` (stderr tail as cause) when ffmpeg exited nonzero."""
        code = self.proc.returncode
        self._raise_if_stopped()
        if code not in (0, None):
            tail = self.stderr_tail()
            raise self.error(f"ffmpeg ({what or self.stage}){self._where} failed with exit code {code}: "
                             f"{stderr_summary(tail)}", stage=self.stage, path=self.path, cause=tail)

    def close(self) -> None:
        """Release the stderr file (after the process has ended)."""
        self._stderr.close()
        stopping.untrack(self, self._job)

    def __enter__(self) -> "FFmpeg":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.kill()
        elif self.proc.poll() is None:  # left running by the caller: never leak a child
            self.kill()
        self.close()


def ffmpeg_args(stream) -> list[str]:
    """The argument list (without the binary) of an ffmpeg-python stream specification."""
    return list(stream.get_args())


def run_ffmpeg(args: list[str], *, timeout: float, settings: Settings | None = None,
               stage: str = "ffmpeg", path: str | None = None) -> subprocess.CompletedProcess:
    """Run `ffmpeg -hide_banner -nostdin -y *args` to completion with a deadline.

    Raises `MediaError` (stderr tail in `cause`) on a nonzero exit or when the binary cannot be
    started, and `RenderTimeout` after killing and reaping ffmpeg when `timeout` passes.
    """
    with FFmpeg(args, settings=settings, stage=stage, path=path, stdout=True) as run:
        stdout = run.communicate(timeout=timeout)
        run.check()
        return subprocess.CompletedProcess(run.cmd, run.proc.returncode, stdout, run.stderr_tail().encode())


@functools.lru_cache(maxsize=16)
def _listing(binary: str, timeout: float, what: str) -> str:
    """The output of `ffmpeg -<what>` (`encoders`, `filters`); cached per binary."""
    try:
        return subprocess.run([binary, "-hide_banner", "-nostdin", f"-{what}"], capture_output=True,
                              timeout=timeout, check=True).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError) as exc:
        raise MediaError(f"cannot list the {what} of ffmpeg ({binary}): {exc}",
                         stage="ffmpeg", cause=str(exc)) from exc


@functools.lru_cache(maxsize=8)
def _codecs(binary: str, timeout: float, listing: str = "encoders") -> frozenset[str]:
    """The names in `ffmpeg -encoders` (or `-decoders`)."""
    names = set()
    for line in _listing(binary, timeout, listing).splitlines():
        parts = line.split()
        # lines look like " V....D libx264  libx264 H.264 ..."; the legend ends at "------"
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "VAS" and parts[1] != "=":
            names.add(parts[1])
    return frozenset(names)


@functools.lru_cache(maxsize=8)
def _filters(binary: str, timeout: float) -> frozenset[str]:
    # lines look like " .S zscale   V->V   Apply resizing ..." (flags, name, in->out, text)
    return frozenset(parts[1] for line in _listing(binary, timeout, "filters").splitlines()
                     if len(parts := line.split()) >= 3 and "->" in parts[2])


def ffmpeg_has_filters(*names: str, settings: Settings | None = None) -> bool:
    """Whether the resolved ffmpeg binary has every filter in `names` (e.g. `zscale`); cached."""
    s = settings or get_settings()
    have = _filters(ffmpeg_binary(s), s.probe_timeout_s)
    return all(n in have for n in names)


def encoder_problem(name: str, settings: Settings | None = None) -> str | None:
    """Why the resolved ffmpeg cannot encode H.264 with `name` here, else None: absent from its list, or a
    one-frame trial that fails (`-encoders` lists h264_nvenc in builds on machines without the driver or
    a GPU, where every segment's encode then fails: "Cannot load libcuda.so.1")."""
    from cluster.errors import LipsyncError

    s = settings or get_settings()
    if not ffmpeg_has_encoder(name, s):
        return f"the ffmpeg here ({ffmpeg_binary(s)}) has no {name} encoder"
    try:
        run_ffmpeg(["-loglevel", "error", "-f", "lavfi", "-i", "color=s=256x256:r=25:d=0.04", "-frames:v", "1",
                    "-c:v", name, "-f", "null", "-"], timeout=max(10.0, s.probe_timeout_s), settings=s,
                   stage="encoder-check")
    except LipsyncError as e:
        lines = (e.cause or e.message).strip().splitlines() or [e.message]
        said = next((line for line in lines if f"[{name} @" in line), lines[0])  # the encoder's own words
        said = said.split("] ", 1)[-1] if said.startswith("[") else said
        return f"the ffmpeg here ({ffmpeg_binary(s)}) cannot encode with {name} on this machine: {said[:300]}"
    return None


def ffmpeg_has_encoder(name: str, settings: Settings | None = None) -> bool:
    """Whether the resolved ffmpeg binary has encoder `name` (e.g. `h264_nvenc`); cached."""
    s = settings or get_settings()
    return name in _codecs(ffmpeg_binary(s), s.probe_timeout_s)


def ffmpeg_has_decoder(name: str, settings: Settings | None = None) -> bool:
    """Whether the resolved ffmpeg binary has decoder `name` (e.g. `libvpx-vp9`); cached."""
    s = settings or get_settings()
    return name in _codecs(ffmpeg_binary(s), s.probe_timeout_s, "decoders")
