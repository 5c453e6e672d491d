"""Decoded template frames kept on the node, so a prepared avatar's template is decoded once per
node instead of once per chunk.

A chunk's render decodes its template frames (PyAV, one thread): about 3 ms of CPU per 720p frame
on the 2-core machine, plus ~55 ms per chunk to open the container and decode from the keyframe
before its first frame; reading the same I420 bytes back from the page cache costs ~0.4 ms
(`docs/PERFORMANCE.md`). So the first render of a template on a node starts, on a thread beside
it, decoding the whole template once into a raw file in the node cache (`frames-<key>.i420`: the
frames one after another, `cluster.media.yuv`'s I420 layout, exactly the decoder's bytes); every
later chunk on that node (batch jobs and live sessions) reads its frames from that file with
`pread` (no mapping: the page cache is shared, nothing counts in a process's memory).

The file is a disposable cache: the node cache's budget (`Settings.node_cache_gb`) covers it,
least recently used first (`cluster.nodecache.evict`); a template whose frames would take more
than a quarter of that budget, or leave less than 1 GiB or a tenth of the disk free, is not cached
(its chunks decode, as before). The job manager's disk admission does not count these files (they
are the node's, not a job's): that margin is what keeps room for the jobs it admitted. One process
per node builds a given file (a lock file), others decode meanwhile. `Settings.frame_cache=false`
turns it off.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from cluster.config import Settings
from cluster.errors import MediaError
from cluster.media.yuv import i420_shape

log = logging.getLogger("lipsync.framecache")

#: Free space a build leaves on the cache's filesystem (a node's storage root may share it): this,
#: or a tenth of the filesystem where that is more.
FREE_MARGIN_BYTES = 1024**3
FREE_MARGIN_SHARE = 0.1
#: A template's frames take at most this share of the node cache's budget.
MAX_BUDGET_SHARE = 0.25

_building: set[Path] = set()  # files this process is building (one thread each)
_building_lock = threading.Lock()


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _key(template_path: str | os.PathLike) -> str:
    st = os.stat(template_path)
    ident = f"{os.path.realpath(template_path)}|{st.st_size}|{st.st_mtime_ns}|{_boot_id()}"
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def frame_file(template_path: str | os.PathLike, root: Path, width: int, height: int, frames: int,
               fps: Fraction) -> Path:
    """Where the decoded frames of this template (this very file: path, size, modification time)
    are kept in the node cache `root`; the name also says their size, count and rate, so a reader
    needs no decoder to use them. The key holds the machine's boot id: a file is written without
    fsync (a cache of 0.3-2 GB whose flush would stall the segments' own fsyncs), so one a power
    loss may have left short or empty is never read after the reboot (the cache's eviction removes
    it)."""
    fps = Fraction(fps)
    return Path(root) / f"frames-{_key(template_path)}-{width}x{height}x{frames}@{fps.numerator}_{fps.denominator}.i420"


_NAME = re.compile(r"frames-[0-9a-f]{20}-(\d+)x(\d+)x(\d+)@(\d+)_(\d+)\.i420")


def find_frame_file(template_path: str | os.PathLike, root: Path) -> tuple[Path, int, int, int, Fraction] | None:
    """The complete frame file of this template in `root` (path, width, height, frames, fps), if any."""
    for path in Path(root).glob(f"frames-{_key(template_path)}-*.i420"):
        m = _NAME.fullmatch(path.name)
        if not m:
            continue
        w, h, n, num, den = (int(g) for g in m.groups())
        if w > 0 and h > 0 and den > 0 and path.stat().st_size == n * int(np.prod(i420_shape(w, h))):
            return path, w, h, n, Fraction(num, den)
    return None


class FrameFileReader:
    """Template frames read from a frame file (`read_yuv`, as `TemplateReader.read_yuv`), with the
    reader's `width`, `height`, `fps`, `frame_count`."""

    def __init__(self, path: Path, width: int, height: int, frame_count: int, fps: Fraction) -> None:
        self.path, self.width, self.height, self.fps, self.frame_count = path, width, height, fps, frame_count
        self.seeks = 0
        self._shape = i420_shape(width, height)
        self._frame_bytes = int(np.prod(self._shape))
        self._fd = os.open(path, os.O_RDONLY)

    def read_yuv(self, indices) -> np.ndarray:
        """Frames `indices` (any order, repeats allowed) as `[len(indices), H * 3 // 2, W]` uint8 I420."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= self.frame_count):
            bad = wanted[(wanted < 0) | (wanted >= self.frame_count)][0]
            raise ValueError(f"frame index {bad} outside template frames {self.path} (0..{self.frame_count - 1})")
        out = np.empty((wanted.size, *self._shape), np.uint8)
        for k, i in enumerate(wanted.tolist()):
            got = os.preadv(self._fd, [out[k]], i * self._frame_bytes)
            if got != self._frame_bytes:
                raise MediaError(f"template frames {self.path}: frame {i} short ({got} of {self._frame_bytes} "
                                 f"bytes): the cache file was cut", path=str(self.path), stage="decode")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FrameFileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TemplateFrames:
    """The template's frames (`read_yuv`, `width`, `height`, `fps`, `frame_count`, `close`): from its
    frame file where this node has it, else decoded by a `TemplateReader` (the frame file's build
    then started on a thread, once per node, where the cache takes it; a reader open that long, a
    live session's, moves to the file once it is there)."""

    RECHECK_S = 1.0

    def __init__(self, template_path: str | os.PathLike, settings: Settings) -> None:
        from cluster.media.decode import TemplateReader

        self.template_path, self.settings = template_path, settings
        self.reader: TemplateReader | FrameFileReader | None = None
        self.path: Path | None = None
        self._checked = time.monotonic()
        if settings.frame_cache:
            try:
                found = find_frame_file(template_path, settings.node_cache_dir)
                if found is not None:
                    self.path, self.width, self.height, self.frame_count, self.fps = found
                    self.reader = FrameFileReader(*found)
                    _renew(self.path)
            except OSError as e:  # the cache is an optimisation: the decoder serves
                log.warning("template frames of %s unreadable: %s", template_path, e)
                self.path = None
        if self.reader is None:
            self.reader = r = TemplateReader(template_path, settings)
            self.width, self.height, self.fps, self.frame_count = r.width, r.height, r.fps, r.frame_count
            if settings.frame_cache:
                try:
                    self.path = frame_file(template_path, settings.node_cache_dir, r.width, r.height,
                                           r.frame_count, r.fps)
                    _start_build(template_path, self.path, self._size, settings)
                except OSError as e:
                    log.warning("template frames of %s not cached: %s", template_path, e)
                    self.path = None

    @property
    def _size(self) -> int:
        return self.frame_count * int(np.prod(i420_shape(self.width, self.height)))

    @property
    def cached(self) -> bool:
        """Whether frames are read from the frame file."""
        return isinstance(self.reader, FrameFileReader)

    def _use_file(self) -> bool:
        self._checked = time.monotonic()
        try:
            if self.path.stat().st_size != self._size:
                return False
            cached = FrameFileReader(self.path, self.width, self.height, self.frame_count, self.fps)
        except FileNotFoundError:
            return False
        self.reader.close()
        self.reader = cached
        _renew(self.path)
        return True

    def read_yuv(self, indices) -> np.ndarray:
        """Frames `indices` as `[len(indices), H * 3 // 2, W]` uint8 I420 (`TemplateReader.read_yuv`)."""
        if self.path is not None and not self.cached and time.monotonic() - self._checked > self.RECHECK_S:
            try:
                self._use_file()
            except OSError as e:
                log.warning("template frames %s unreadable: %s", self.path, e)
                self.path = None
        return self.reader.read_yuv(indices)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> TemplateFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def _renew(path: Path) -> None:
    try:
        os.utime(path)  # recently used: the cache's eviction keeps it
    except OSError:
        pass


def _start_build(template_path, path: Path, size: int, settings: Settings) -> None:
    with _building_lock:
        if path in _building:
            return
        _building.add(path)

    def run() -> None:
        try:
            build_frame_file(template_path, path, size, settings)
        except Exception as e:  # a cache: logged, and the chunks decode as before
            log.warning("building the template frames %s of %s failed: %s", path.name, template_path, e)
        finally:
            with _building_lock:
                _building.discard(path)

    threading.Thread(target=run, name="frame-cache-build", daemon=True).start()


def build_frame_file(template_path, path: Path, size: int, settings: Settings) -> bool:
    """Decode the whole template into `path` (atomically), unless another process of this node is
    at it or the cache cannot take it. Whether the file was written."""
    from cluster.fsutil import temporary_name
    from cluster.media.decode import TemplateReader
    from cluster.nodecache import evict

    root = path.parent
    budget = settings.node_cache_bytes
    if size > budget * MAX_BUDGET_SHARE:
        log.info("template frames of %s (%d MiB) not cached: over a quarter of the node cache's %d MiB",
                 template_path, size >> 20, budget >> 20)
        return False
    root.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_suffix(".lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process of this node builds it
            return False
        if path.is_file() and path.stat().st_size == size:
            return False
        evict(root, budget - size)
        used = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
        disk = shutil.disk_usage(root)
        if used + size > budget or disk.free - size < max(FREE_MARGIN_BYTES, FREE_MARGIN_SHARE * disk.total):
            log.info("template frames of %s (%d MiB) not cached: the node cache holds %d of %d MiB, "
                     "the disk has %d MiB free", template_path, size >> 20, used >> 20, budget >> 20, disk.free >> 20)
            return False
        tmp = temporary_name(path)
        try:
            with TemplateReader(template_path, settings) as reader, open(tmp, "wb") as f:
                step = 4  # frames at once: little memory in the thread's own malloc arena
                for first in range(0, reader.frame_count, step):
                    f.write(reader.read_yuv(range(first, min(first + step, reader.frame_count))).data)
                if f.tell() != size:
                    raise MediaError(f"template frames of {template_path}: wrote {f.tell()} bytes, expected {size}",
                                     path=str(path), stage="decode")
            os.replace(tmp, path)  # whole or absent (no fsync: see `frame_file`)
        finally:
            tmp.unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)
    log.info("template frames of %s cached on this node: %s (%d MiB)", template_path, path.name, size >> 20)
    return True
