"""A disposable, node-local cache of files keyed by content hash, for nodes that do not hold the
storage root: a compositor on such a node fetches a job's prepared files (normalised template,
face track, mel features) from the job manager once per node, through Ray, and reuses them.

Plain Python: `fetch(offset, length) -> bytes` is how bytes arrive (an actor call in the cluster).
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Callable

from cluster.errors import OutputVerificationError
from cluster.fsutil import atomic_writer, touch

FetchFn = Callable[[int, int], bytes]


DEFAULT_BUDGET_BYTES = 20 * 1024**3  # the k8s manifests give the cache an emptyDir of 50 GiB
KEEP_RECENT_S = 3600.0  # a file used this recently stays whatever the budget (a chunk may be about to read it)


def cached_file(root: Path, sha256: str, suffix: str, fetch: FetchFn, part_bytes: int,
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Path:
    """The local copy of the file with content hash `sha256` (fetched and verified on first use;
    each use renews it). Concurrent fetches on one node are harmless: each writes its own
    temporary, the rename is atomic. After a fetch the cache is cut back to `budget_bytes`, least
    recently used first (`evict`): every job's mel features are new files, and a node's disk (a
    pod's emptyDir: evicted when full) would fill."""
    path = Path(root) / f"{sha256}{suffix}"
    if path.is_file():
        touch(path)
        return path
    digest = hashlib.sha256()
    offset = 0
    with atomic_writer(path) as f:
        while True:
            data = fetch(offset, part_bytes)
            if not data:
                break
            f.write(data)
            digest.update(data)
            offset += len(data)
        if digest.hexdigest() != sha256:
            raise OutputVerificationError(f"node cache: fetched {offset} bytes whose sha256 {digest.hexdigest()} "
                                          f"is not the {sha256} asked for", path=str(path))
    evict(Path(root), budget_bytes)  # the file just fetched is recent: it stays
    return path


def _files(root: Path) -> list[tuple[float, int, Path]]:
    """(mtime, size, path) of the cache's files (not its directories); one renamed or removed while
    it is listed is left out."""
    files = []
    for p in root.iterdir() if root.is_dir() else []:
        try:
            if p.is_file():
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
        except OSError:
            continue
    return files


def cache_bytes(root: Path) -> int:
    """The bytes the cache's files hold now (what `evict` counts against its budget)."""
    return sum(size for _, size, _ in _files(root))


def evict(root: Path, budget_bytes: int, now: float | None = None) -> list[Path]:
    """Cut the cache back to `budget_bytes`: remove its least recently used files (their mtime,
    renewed at each use), never one used (or fetched) in the last `KEEP_RECENT_S`; and the working
    directories of jobs (`jobs/<id>`: a killed render's segments) untouched for a day. What it removed."""
    now = time.time() if now is None else now
    files = _files(root)
    total = sum(size for _, size, _ in files)
    removed = []
    for mtime, size, p in sorted(files, key=lambda f: f[0]):
        if total <= budget_bytes:
            break
        if now - mtime < KEEP_RECENT_S:
            continue
        p.unlink(missing_ok=True)
        total -= size
        removed.append(p)
    jobs = root / "jobs"
    for d in jobs.iterdir() if jobs.is_dir() else []:
        try:
            if now - d.stat().st_mtime > 86400:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        except OSError:
            continue
    return removed


def entries(root: Path) -> int:
    """How many files the cache holds (reported by a compositor's `info`)."""
    root = Path(root)
    return sum(1 for p in root.iterdir() if p.is_file() and not p.name.endswith(".tmp")) if root.is_dir() else 0
