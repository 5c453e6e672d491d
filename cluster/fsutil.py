"""Writing files so that a crash never leaves a half-written one under the final name."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

log = logging.getLogger("lipsync.fsutil")

TEMPORARY_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file that another process (ffmpeg) wrote to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the names created or renamed in `directory` durable (a rename is not, until then)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # a filesystem without directory handles: nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # not supported there: as durable as it gets
            raise
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, *, synced: bool = False, sync_dir: bool = True) -> None:
    """Rename a finished temporary file into place with ordinary permissions (mkstemp makes
    0600 files; outputs should be readable as any file the user writes: 0666 less the umask),
    durably: its bytes reach the disk before the rename (`synced`: the caller did that) and the
    rename before this returns (`sync_dir=False`: a file rewritten many times a second, such as
    a live playlist, whose next version follows anyway), so a crash never leaves a published name
    on a short file (what is recorded as done is on disk)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    if not synced:
        fsync_file(tmp)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(Path(path).parent)


def lock_within(f, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Take an exclusive `flock` on the open file `f`, waiting at most `timeout_s` for another
    process that holds it (closing `f` releases it); False when it was not had in time."""
    import fcntl
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to `path` for a file written before it is renamed to `path`
    (`.NAME.<8 hex digits>.tmp`): one pattern for every writer, so that `sweep_temporaries` finds what a
    writer killed mid-write left behind."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMPORARY_SUFFIX}")


def sweep_temporaries(directory: str | os.PathLike, of: str | os.PathLike | None = None) -> list[Path]:
    """Remove the temporaries (`temporary_name`) a killed writer left in `directory` (not below
    it), or only those of the file `of` (in a directory others write to as well); call it only
    where no writer of them can be running. Returns what it removed."""
    directory = Path(directory)
    pattern = f".*{TEMPORARY_SUFFIX}" if of is None else f".{glob.escape(Path(of).name)}.{'?' * 8}{TEMPORARY_SUFFIX}"
    removed = []
    if directory.is_dir():
        for stale in directory.glob(pattern):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def touch(path: str | os.PathLike) -> None:
    """Mark `path` used now (its mtime: what caches and retention judge last use by); a file gone
    meanwhile, or a read-only store, is left as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


def remove_files_older_than(directory: str | os.PathLike, cutoff: float, log=None) -> int:
    """Remove the files directly in `directory` last changed before `cutoff` (epoch seconds); how
    many. One that cannot be removed is named in `log`'s warnings and left.

    Each is renamed aside first and removed only if it is still old then: a file renewed by another
    process between the look at its age and its removal (`touch`, or replaced by a new copy of the same
    bytes, as a finished upload is) stays, where an unlink by age alone took it."""
    removed = 0
    directory = Path(directory)
    for f in list(directory.iterdir()) if directory.is_dir() else []:
        try:
            if not f.is_file() or f.stat().st_mtime >= cutoff:
                continue
            aside = temporary_name(f)
            os.rename(f, aside)
            if aside.stat().st_mtime >= cutoff:  # renewed between the look and the rename: back, unless a newer
                with contextlib.suppress(FileExistsError):  # copy took its name meanwhile
                    os.link(aside, f)
            else:
                removed += 1
            aside.unlink()
        except FileNotFoundError:  # removed or renamed by another process meanwhile
            continue
        except OSError as e:
            if log is not None:
                log.warning("cannot remove the old file %s: %s", f, e)
    return removed


@contextmanager
def atomic_writer(path: str | os.PathLike, sync_dir: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file in `path`'s directory; on success it is fsynced and renamed to `path`
    (atomic on POSIX), on any exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path, synced=True, sync_dir=sync_dir)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str, sync_dir: bool = True) -> None:
    """Write `data` (text as UTF-8) to `path` atomically (`publish`)."""
    with atomic_writer(path, sync_dir) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def store_name(path: str | os.PathLike, name: str | None, limit: int = 200) -> None:
    """Write `name`, as people are shown it (`cluster.views.display_name`: printable, at most `limit`), as
    the text of `path`, atomically; nothing when nothing printable is left. A name (an upload's, an
    avatar's) is a convenience beside what it names: a disk that refuses it is logged, not raised."""
    from cluster.views import display_name

    shown = display_name(name, limit)
    if shown:
        try:
            write_atomic(path, shown, sync_dir=False)
        except OSError as e:
            log.warning("cannot store the name %r in %s: %s", shown, path, e)


def read_name(path: str | os.PathLike, limit: int = 200) -> str | None:
    """The name `store_name` wrote to `path` (cleaned again: one written before names were cleaned may hold
    a terminal's escapes), or None."""
    from cluster.views import display_name

    try:
        return display_name(Path(path).read_text(encoding="utf-8"), limit)
    except (OSError, UnicodeDecodeError):
        return None


def file_sha256(path: str | os.PathLike, block: int = 4 * 1024 * 1024) -> str:
    """SHA-256 hex digest of a file's bytes, read in blocks (content addresses of templates,
    uploads, prepared files and model files). Remembered per process for the same file unchanged
    (device, inode, size, modification time): every job of an avatar hashes its template and
    track again between its prepare and its first chunk (0.1-0.4 s for a 100 MB template)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    known = _SHA256_SEEN.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    if len(_SHA256_SEEN) >= 4096:
        _SHA256_SEEN.clear()
    _SHA256_SEEN[key] = sha = digest.hexdigest()
    return sha


_SHA256_SEEN: dict[tuple[int, int, int, int], str] = {}
