"""Decoded template frames kept on the node, so a prepared avatar's template is decoded once per
node instead of once per chunk.

A chunk's render decodes its template frames (PyAV, one thread): about 3 ms of CPU per 720p frame
on the 2-core machine, plus ~55 ms per chunk to open the container and decode from the keyframe
before its first frame; reading the same I420 bytes back from the page cache costs ~0.4 ms
(`docs/PERFORMANCE.md`). So when a second job renders a template on a node (the first one only
leaves a marker: a template rendered once, such as an upload used by one job, costs no build; in a
one-shot `lipsync render` on 2 cores the build cost 3-6 % of the wall time), or a live session uses
it, a thread beside the render decodes the whole template once into a raw file in the node cache
(`frames-<key>-WxHxN@fps.i420`: the frames one after another, `cluster.media.yuv`'s I420 layout,
exactly the decoder's bytes); every later chunk on that node (batch jobs and live sessions) reads
its frames from that file with `pread` (no mapping: the page cache is shared, nothing counts in a
process's memory).

The file is a disposable cache: the node cache's budget (`Settings.node_cache_gb`) covers it,
least recently used first (`cluster.nodecache.evict`). A template's frames are not cached where
they would take more than a quarter of that budget or of the disk's free space, or leave less than
1 GiB or a tenth of the disk free: its chunks decode, as before. The job manager's disk admission
does not count these files (they are the node's, not a job's), so a build can still take space a
rendering job counted on; those bounds keep that to a quarter of what is free. One build runs at a
time per node (a lock in the cache), so the checks hold while it writes; a build refused or failed
is not tried again by that process for 5 minutes; a frame file that cannot be read sends its
readers back to decoding. `Settings.frame_cache=false` turns it off.
"""
from __future__ import annotations

import atexit
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
from cluster.fsutil import touch
from cluster.media.yuv import i420_shape

log = logging.getLogger("lipsync.framecache")

#: Free space a build leaves on the cache's filesystem (a node's storage root may share it): this,
#: or a tenth of the filesystem where that is more.
FREE_MARGIN_BYTES = 1024**3
FREE_MARGIN_SHARE = 0.1
#: A template's frames take at most this share of the node cache's budget, and of the free space.
MAX_BUDGET_SHARE = 0.25
MAX_FREE_SHARE = 0.25
#: A build refused (no room) or failed is not tried again by this process for this long; one
#: skipped because another process of the node was building, for this long.
RETRY_AFTER_S = 300.0
BUSY_RETRY_S = 10.0
#: The build thread's niceness above its process's: the renders of its process and node go first.
BUILD_NICENESS = 10
#: Where a template's first job leaves its marker (`_used_before`), and how long one is kept.
SEEN_DIR = ".frames-build/seen"
MARKER_TTL_S = 86400.0
_last_sweep = 0.0
#: One build at a time per node (its budget and free-space checks hold while it writes), under
#: this lock in the node cache (a directory: the cache's eviction never removes it).
BUILD_LOCK = ".frames-build/lock"

_building: set[Path] = set()  # files this process is building (one thread each)
_not_before: dict[Path, float] = {}  # files this process could not build, and when to try again
_building_lock = threading.Lock()
#: Set when the process exits: a build still writing stops and removes its temporary (a one-shot
#: `lipsync render` would otherwise leave a half-written frame file behind until the next build).
_exiting = threading.Event()
_build_threads: set[threading.Thread] = set()
#: How long the process's exit waits for its builds to stop (each stops within a few frames).
EXIT_WAIT_S = 2.0


class BuildAbandoned(Exception):
    """A build stopped because its process exits."""


@atexit.register
def abandon_builds() -> None:
    """Stop this process's builds and remove their temporaries (at its exit; bounded by `EXIT_WAIT_S`)."""
    _exiting.set()
    deadline = time.monotonic() + EXIT_WAIT_S
    with _building_lock:
        threads = list(_build_threads)
    for thread in threads:
        if thread.is_alive():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _key(template_path: str | os.PathLike) -> str:
    # not its times: the node cache renews a fetched template's mtime at each use (its LRU order);
    # templates are written whole under a new name or inode (content-addressed), never in place
    st = os.stat(template_path)
    ident = f"{os.path.realpath(template_path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{_boot_id()}"
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def frame_file(template_path: str | os.PathLike, root: Path, width: int, height: int, frames: int,
               fps: Fraction) -> Path:
    """Where the decoded frames of this template (this very file: path, device, inode, size) are
    kept in the node cache `root`; the name also says their size, count and rate, so a reader
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


def _used_before(template_path, root: Path, user: str | None) -> bool:
    """Whether to build the template's frame file now: for `user` (a job id) when another job used
    the template on this node before (the first one only leaves a marker naming itself, so a
    template rendered once, an upload used by one job, costs no build), at once for a live session
    (`user` None: it reads the template for as long as it runs)."""
    if user is None:
        return True
    from cluster.fsutil import write_atomic

    seen = Path(root) / SEEN_DIR
    marker = seen / _key(template_path)
    try:
        return marker.read_text() != user
    except FileNotFoundError:
        seen.mkdir(parents=True, exist_ok=True)
        _sweep_markers(seen)
        # whole or not at all (a reader beside it never sees it empty, which would read as another
        # job's); two first readers at once (one job's chunks) write the same name
        write_atomic(marker, user, sync_dir=False)
        return False


def _sweep_markers(seen: Path) -> None:
    """Markers older than `MARKER_TTL_S` go (at most once an hour per process): a service whose every
    job brings its own template would otherwise keep one per job for ever."""
    global _last_sweep
    from cluster.fsutil import remove_files_older_than

    now = time.time()
    if now - _last_sweep >= 3600:
        _last_sweep = now
        remove_files_older_than(seen, now - MARKER_TTL_S, log)


class TemplateFrames:
    """The template's frames (`read_yuv`, `width`, `height`, `fps`, `frame_count`, `close`): from its
    frame file where this node has it, else decoded by a `TemplateReader` (the frame file's build
    then started on a thread, once per node, where the cache takes it and the template is used
    again, `_used_before`; a reader open that long, a live session's, moves to the file once it is
    there). `user`: the job reading (None: a live session)."""

    RECHECK_S = 1.0

    def __init__(self, template_path: str | os.PathLike, settings: Settings, user: str | None = None) -> None:
        from cluster.media.decode import TemplateReader

        self.template_path, self.settings = template_path, settings
        self.reader: TemplateReader | FrameFileReader | None = None
        self.path: Path | None = None
        self._checked = time.monotonic()
        self._wants_build = False  # the file is wanted here: its build is asked for again if refused
        if settings.frame_cache:
            try:
                found = find_frame_file(template_path, settings.node_cache_dir)
                if found is not None:
                    self.path, self.width, self.height, self.frame_count, self.fps = found
                    self.reader = FrameFileReader(*found)
                    touch(self.path)  # recently used: the cache's eviction keeps it
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
                    if _used_before(template_path, settings.node_cache_dir, user):
                        self._wants_build = True
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
        touch(self.path)
        return True

    def read_yuv(self, indices) -> np.ndarray:
        """Frames `indices` as `[len(indices), H * 3 // 2, W]` uint8 I420 (`TemplateReader.read_yuv`)."""
        if self.path is not None and not self.cached and time.monotonic() - self._checked > self.RECHECK_S:
            try:
                if not self._use_file() and self._wants_build:
                    # a build refused while another template's ran (or past its back-off) is asked
                    # for again: a live session reads for up to an hour
                    _start_build(self.template_path, self.path, self._size, self.settings)
            except OSError as e:
                log.warning("template frames %s unreadable: %s", self.path, e)
                self.path = None
        try:
            return self.reader.read_yuv(indices)
        except (OSError, MediaError) as e:
            if not self.cached:
                raise
            from cluster.media.decode import TemplateReader

            log.warning("template frames %s unreadable (%s): decoding %s instead", self.path, e, self.template_path)
            self.reader.close()
            self.reader, self.path = TemplateReader(self.template_path, self.settings), None
            return self.reader.read_yuv(indices)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> TemplateFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_build(template_path, path: Path, size: int, settings: Settings) -> None:
    with _building_lock:
        if path in _building or time.monotonic() < _not_before.get(path, 0.0):
            return
        _building.add(path)

    def run() -> None:
        built = None
        try:
            try:  # this thread only (Linux: a thread's id names it): the renders beside it go first
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BUILD_NICENESS))
            except (OSError, AttributeError):
                pass
            built = build_frame_file(template_path, path, size, settings)
        except BuildAbandoned:  # its temporary removed; the next process of the node builds it
            built = None
        except Exception as e:  # a cache: logged, and the chunks decode as before
            built = False
            log.warning("building the template frames %s of %s failed: %s", path.name, template_path, e)
        finally:
            with _building_lock:
                _building.discard(path)
                _build_threads.discard(threading.current_thread())
                if built is not True:  # no room, or failed: not for a while; another builder: soon
                    _not_before[path] = time.monotonic() + (RETRY_AFTER_S if built is False else BUSY_RETRY_S)

    try:
        thread = threading.Thread(target=run, name="frame-cache-build", daemon=True)
        with _building_lock:
            _build_threads.add(thread)
        thread.start()
    except RuntimeError as e:  # no thread to be had: the chunks decode
        log.warning("template frames of %s not cached: %s", template_path, e)
        with _building_lock:
            _building.discard(path)
            _build_threads.discard(thread)


def build_frame_file(template_path, path: Path, size: int, settings: Settings) -> bool | None:
    """Decode the whole template into `path` (atomically), one build per node at a time. True: the
    file was written; None: another process of the node is building (one, maybe this one's, later);
    False: the cache cannot take it (over its share of the budget or of the free space)."""
    from cluster.fsutil import TEMPORARY_SUFFIX, temporary_name
    from cluster.media.decode import TemplateReader
    from cluster.nodecache import cache_bytes, evict
    from cluster.resources import free_bytes

    root = path.parent
    budget = settings.node_cache_bytes
    if size > budget * MAX_BUDGET_SHARE:
        log.info("template frames of %s (%d MiB) not cached: over a quarter of the node cache's %d MiB",
                 template_path, size >> 20, budget >> 20)
        return False
    lock_path = root / BUILD_LOCK
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process of this node builds (this or another template)
            return None
        if path.is_file() and path.stat().st_size == size:
            return True
        for stale in root.glob(f".frames-*{TEMPORARY_SUFFIX}"):  # a build killed mid-way: none runs now
            stale.unlink(missing_ok=True)
        free, total = free_bytes(root, settings), shutil.disk_usage(root).total
        disk_takes_it = size <= free * MAX_FREE_SHARE and free - size >= max(FREE_MARGIN_BYTES,
                                                                             FREE_MARGIN_SHARE * total)
        used = cache_bytes(root)
        if disk_takes_it and used + size > budget:
            evict(root, budget - size)  # least recently used first, never one used in the last hour
            used = cache_bytes(root)
        if not disk_takes_it or used + size > budget:
            log.info("template frames of %s (%d MiB) not cached: the node cache holds %d of %d MiB, the disk "
                     "has %d MiB free", template_path, size >> 20, used >> 20, budget >> 20, free >> 20)
            return False
        tmp = temporary_name(path)
        try:
            with TemplateReader(template_path, settings) as reader, open(tmp, "wb") as f:
                step = 4  # frames at once: little memory in the thread's own malloc arena
                for first in range(0, reader.frame_count, step):
                    if _exiting.is_set():
                        raise BuildAbandoned(f"template frames of {template_path}: the process exits")
                    f.write(reader.read_yuv(range(first, min(first + step, reader.frame_count))).data)
                if f.tell() != size:
                    raise MediaError(f"template frames of {template_path}: wrote {f.tell()} bytes, expected {size}",
                                     path=str(path), stage="decode")
            os.replace(tmp, path)  # whole or absent (no fsync: see `frame_file`)
        finally:
            tmp.unlink(missing_ok=True)
    log.info("template frames of %s cached on this node: %s (%d MiB)", template_path, path.name, size >> 20)
    return True
