"""Disk space: a job that would not fit is refused before it starts, and a disk that fills while
a job runs fails that job with the same typed reason (`resource.disk`).

`check_job_disk` is the one call admission makes: it estimates what a job will write (stored
input copies, the normalised template, the segments and the finished output, which exist side by
side while the job finalises) and compares it, plus `settings.disk_reserve_bytes`, with the free
space of each filesystem involved (the storage root's and, when elsewhere, the output's).
`settings.simulate_free_bytes` replaces the filesystem's answer (drills and tests).

`disk_full_guard` wraps a render step so that running out of space mid-job (an `OSError` with
ENOSPC, or an ffmpeg / SQLite failure that says so) surfaces as `DiskFull` with the step's stage
and job id, never as an anonymous crash; the steps themselves already remove their temporaries.
"""
from __future__ import annotations

import errno
import functools
import math
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cluster.config import Settings, get_settings
from cluster.errors import DiskFull, LipsyncError
from cluster.schemas import MediaInfo

#: Bits per pixel assumed for each H.264 frame we write (normalised template, segments, output).
#: Talking-head templates measure 0.1-0.2 at the default CRF; the estimate assumes more, so that a
#: job is not admitted onto a disk it would fill.
BITS_PER_PIXEL = 0.4
#: Bytes of job bookkeeping besides media (mel features per output second, plan, markers).
OVERHEAD_BYTES = 1 << 20
#: Texts by which ffmpeg, SQLite and the C library report a full disk.
DISK_FULL_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded",
                   "file too large")

F = TypeVar("F", bound=Callable)


def free_bytes(path: str | os.PathLike, settings: Settings | None = None) -> int:
    """Free bytes for us on the filesystem holding `path` (its nearest existing ancestor), or
    `settings.simulate_free_bytes` when set."""
    s = settings or get_settings()
    if s.simulate_free_bytes is not None:
        return s.simulate_free_bytes
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _bitrate_bytes_per_s(rate: str) -> float:
    text = rate.strip().lower()
    scale = {"k": 1e3, "m": 1e6}.get(text[-1:], 1.0)
    number = text[:-1] if text[-1:] in "km" else text
    try:
        return float(number) * scale / 8.0
    except ValueError:
        return 320e3 / 8.0


def estimate_job_bytes(audio: MediaInfo, video: MediaInfo | None, settings: Settings | None = None,
                       stored_template: MediaInfo | None = None) -> tuple[int, int]:
    """(bytes under the storage root, bytes next to the output) a job will need at its peak.

    Storage root: copies of both inputs, the normalised template (when `video` is given; an
    avatar's is stored already), the segments of every output frame, mel features, and the HLS
    stream (the same video and the job's AAC again, kept until retention removes the job). Output
    directory: the finished mp4 (segments + AAC), written under a pending name while the
    segments still exist. An avatar job (`video` None) renders at its stored template's size
    (`stored_template`; without one, the largest allowed)."""
    s = settings or get_settings()
    seconds = audio.audio.duration if audio.audio else audio.duration
    width, height, fps = s.max_width, s.max_height, 60.0
    template_bytes = 0
    template = video if video is not None else stored_template  # an avatar's is stored already
    if template is not None and template.video is not None:
        v = template.video
        width, height, fps = v.width, v.height, float(v.fps)
        if template is video:  # copied, then normalised
            template_bytes = math.ceil(v.frame_count * v.width * v.height * BITS_PER_PIXEL / 8)
    frames = math.ceil(seconds * fps)
    video_bytes = math.ceil(frames * width * height * BITS_PER_PIXEL / 8)
    audio_bytes = math.ceil(seconds * _bitrate_bytes_per_s(s.audio_bitrate))
    inputs = audio.size_bytes + (video.size_bytes if video is not None else 0)
    hls_bytes = video_bytes + 2 * audio_bytes  # fragments + the AAC track (hls/audio.m4a)
    storage = inputs + template_bytes + video_bytes + hls_bytes + OVERHEAD_BYTES
    return storage, video_bytes + audio_bytes


class DiskReservations:
    """The disk space promised to admitted jobs that have not started rendering (this process's:
    the job manager's), counted against the storage root at each admission: the jobs of a batch
    were each checked against the same free space, and the disk filled mid-render. A job's
    promise ends when it starts rendering (what it writes then shows in the free space) or ends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.admission = threading.Lock()  # held across a check and its promise
        self._bytes: dict[str, tuple[str, int]] = {}  # job id -> (storage root, bytes)

    def reserve(self, job_id: str, root: str, nbytes: int) -> None:
        with self.lock:
            self._bytes[job_id] = (root, max(0, int(nbytes)))

    def release(self, job_id: str) -> None:
        with self.lock:
            self._bytes.pop(job_id, None)

    def held(self, root: str, excluding: str | None = None) -> tuple[int, int]:
        """(bytes, jobs) promised under the storage root `root`, `excluding` one job's."""
        with self.lock:
            held = [b for j, (r, b) in self._bytes.items() if r == root and j != excluding]
        return sum(held), len(held)


RESERVATIONS = DiskReservations()


def check_job_disk(audio: MediaInfo, video: MediaInfo | None, output: str | None,
                   settings: Settings | None = None, job_id: str | None = None,
                   stored_template: MediaInfo | None = None, reserve: bool = False) -> None:
    """Raise `DiskFull` when the job's estimated needs plus `disk_reserve_bytes` exceed the free
    space of the storage root's filesystem (and of the output's, counted together when they are
    the same filesystem), less what admitted jobs that have not started rendering were promised
    (`RESERVATIONS`). `reserve`: promise this job its needs too (checked and promised at once:
    two admissions at the same time do not both take the same space). Writes nothing."""
    s = settings or get_settings()
    storage, output_bytes = estimate_job_bytes(audio, video, s, stored_template)
    needs: dict[str, int] = {str(s.storage_root): storage}
    out_dir = str(Path(output).parent) if output else str(s.storage_root)
    if _same_filesystem(out_dir, str(s.storage_root)) or s.simulate_free_bytes is not None:
        needs[str(s.storage_root)] += output_bytes
    else:
        needs[out_dir] = output_bytes
    with RESERVATIONS.admission:  # one check-and-promise at a time
        promised, promised_jobs = RESERVATIONS.held(str(s.storage_root), excluding=job_id)
        for where, need in needs.items():
            free = free_bytes(where, s)
            others = promised if where == str(s.storage_root) else 0
            if need + s.disk_reserve_bytes + others > free:
                held = (f"; {_mib(others)} MiB of them are promised to {promised_jobs} admitted job(s) that "
                        f"have not started rendering") if others else ""
                raise DiskFull(
                    f"not enough disk space for this job under {where}: it needs about "
                    f"{_mib(need)} MiB plus a reserve of {_mib(s.disk_reserve_bytes)} MiB, "
                    f"{_mib(free)} MiB are free{held}", stage="admit", job_id=job_id, path=where)
        if reserve and job_id is not None:
            inputs = audio.size_bytes + (video.size_bytes if video is not None else 0)  # copied at admission
            RESERVATIONS.reserve(job_id, str(s.storage_root), storage + output_bytes - inputs)


def _same_filesystem(a: str, b: str) -> bool:
    def dev(p: str) -> int | None:
        q = Path(p)
        while not q.exists() and q != q.parent:
            q = q.parent
        try:
            return q.stat().st_dev
        except OSError:
            return None
    return dev(a) == dev(b)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception (ours or the OS's) says the disk or a quota is full."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return True  # (a read-only filesystem takes no byte either: the same refusal, and no retry helps)
    texts = [str(exc)]
    if isinstance(exc, LipsyncError) and exc.cause:
        texts.append(exc.cause)
    return any(t in text.lower() for text in texts for t in DISK_FULL_TEXTS)


def is_read_only(exc: BaseException) -> bool:
    """Whether an exception (ours or the OS's) says the storage is read-only: `is_disk_full` counts it,
    but unlike a full disk no later attempt finds room."""
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return True
    texts = [str(exc)] + ([exc.cause] if isinstance(exc, LipsyncError) and exc.cause else [])
    return any("read-only" in text.lower() for text in texts)


def as_disk_full(exc: BaseException, stage: str | None = None, job_id: str | None = None) -> DiskFull:
    """`DiskFull` for an exception `is_disk_full` recognised, keeping its stage, chunk and path."""
    if isinstance(exc, DiskFull):
        return exc.with_context(stage=stage, job_id=job_id)  # type: ignore[return-value]
    info = {"stage": stage, "job_id": job_id, "chunk": None, "path": getattr(exc, "filename", None)}
    if isinstance(exc, LipsyncError):
        info.update(stage=exc.stage or stage, job_id=exc.job_id or job_id, chunk=exc.chunk,
                    path=exc.path)
    where = f" during {info['stage']}" if info["stage"] else ""
    cause = (exc.cause if isinstance(exc, LipsyncError) else None) or str(exc)
    what = "the storage is read-only" if is_read_only(exc) else "the disk filled up"
    return DiskFull(f"{what}{where}: {exc}", cause=cause[-2000:], **info)


def as_typed(exc: BaseException, stage: str | None = None, job_id: str | None = None) -> LipsyncError | None:
    """`exc` as one of our typed errors: a full disk as `DiskFull` (whatever raised it), ours as
    itself; None for anything else (the caller says what that is)."""
    if is_disk_full(exc):
        return as_disk_full(exc, stage, job_id)
    return exc if isinstance(exc, LipsyncError) else None


def disk_full_guard(stage: str) -> Callable[[F], F]:
    """Decorate a render step taking (job_id | plan, ...): a full disk becomes `DiskFull`."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (OSError, LipsyncError) as exc:
                if not is_disk_full(exc) or isinstance(exc, DiskFull):
                    raise
                first = args[0] if args else None
                job_id = first if isinstance(first, str) else getattr(first, "job_id", None)
                raise as_disk_full(exc, stage, job_id) from exc
        return inner  # type: ignore[return-value]
    return wrap


# --- a container's limits (Kubernetes pods: cgroups), not the host's ----------------------------
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> float:
    """The CPUs this process may use: its CPU affinity, bounded by its container's CPU quota
    (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`): a pod limited to 2 CPUs on
    a 64-core node has 2, not 64."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    quota = period = None
    v2 = _read(cgroup_root / "cpu.max")
    if v2:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            quota, period = parts
    else:
        v1 = cgroup_root / "cpu"
        quota, period = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
    try:
        if quota is not None and period is not None and int(quota) > 0 and int(period) > 0:
            cpus = min(cpus, int(quota) / int(period))
    except ValueError:
        pass
    return max(cpus, 0.01)


def available_memory_bytes(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Memory this process's container can still take: the system's available memory (psutil),
    bounded by the container's limit less its usage (cgroup v2 `memory.max` / `memory.current`,
    v1 `memory.limit_in_bytes` / `memory.usage_in_bytes`)."""
    import psutil

    memory = psutil.virtual_memory()
    available = memory.available
    for limit_file, usage_file, stat_file, inactive_key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        limit, usage = _read(cgroup_root / limit_file), _read(cgroup_root / usage_file)
        if limit is None or usage is None:
            continue
        try:
            limit_n, usage_n = int(limit), int(usage)
        except ValueError:  # "max": no limit
            continue
        # the usage counts the page cache; its inactive part is reclaimable (the kubelet's working set)
        inactive = 0
        for line in (_read(cgroup_root / stat_file) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key and value.strip().isdigit():
                inactive = int(value)
        if limit_n < memory.total:  # v1 writes a huge number for "no limit"
            available = min(available, max(0, limit_n - max(0, usage_n - inactive)))
        break
    return available
