"""Resolving and running the ffmpeg binary.

Every ffmpeg run goes through `run_ffmpeg` (deadline, kill + reap on timeout, stderr tail in the
error) and every user-supplied input is opened through `input_args` (file/pipe protocols only).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess

from cluster.config import Settings, get_settings
from cluster.errors import MediaError, RenderTimeout

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


def run_ffmpeg(args: list[str], *, timeout: float, settings: Settings | None = None,
               stage: str = "ffmpeg", path: str | None = None) -> subprocess.CompletedProcess:
    """Run `ffmpeg -hide_banner -nostdin -y *args` with a deadline.

    Raises `MediaError` (stderr tail in `cause`) on a nonzero exit or when the binary cannot be
    started, and `RenderTimeout` after killing and reaping ffmpeg when `timeout` passes.
    """
    cmd = [ffmpeg_binary(settings), "-hide_banner", "-nostdin", "-y", *args]
    where = f" on {path}" if path else ""
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise MediaError(f"cannot start ffmpeg ({cmd[0]}) for {stage}{where}: {exc}",
                         stage=stage, path=path, cause=str(exc)) from exc
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()  # reap; the pipes close with the killed process
        raise RenderTimeout(f"ffmpeg ({stage}){where} did not finish within {timeout:g} s; killed",
                            stage=stage, path=path, cause=stderr_tail(stderr)) from None
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        tail = stderr_tail(stderr)
        raise MediaError(f"ffmpeg ({stage}){where} failed with exit code {proc.returncode}: "
                         f"{stderr_summary(tail)}", stage=stage, path=path, cause=tail)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@functools.lru_cache(maxsize=8)
def _encoders(binary: str, timeout: float) -> frozenset[str]:
    try:
        out = subprocess.run([binary, "-hide_banner", "-nostdin", "-encoders"], capture_output=True,
                             timeout=timeout, check=True).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError) as exc:
        raise MediaError(f"cannot list the encoders of ffmpeg ({binary}): {exc}",
                         stage="ffmpeg", cause=str(exc)) from exc
    names = set()
    for line in out.splitlines():
        parts = line.split()
        # lines look like " V....D libx264  libx264 H.264 ..."; the legend ends at "------"
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "VAS" and parts[1] != "=":
            names.add(parts[1])
    return frozenset(names)


def ffmpeg_has_encoder(name: str, settings: Settings | None = None) -> bool:
    """Whether the resolved ffmpeg binary has encoder `name` (e.g. `h264_nvenc`); cached."""
    s = settings or get_settings()
    return name in _encoders(ffmpeg_binary(s), s.probe_timeout_s)
