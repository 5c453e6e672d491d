"""A disposable, node-local cache of files keyed by content hash, for nodes that do not hold the
storage root: a compositor on such a node fetches a job's prepared files (normalised template,
face track, mel features) from the job manager once per node, through Ray, and reuses them.

Plain Python: `fetch(offset, length) -> bytes` is how bytes arrive (an actor call in the cluster).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from cluster.errors import OutputVerificationError
from cluster.fsutil import atomic_writer

FetchFn = Callable[[int, int], bytes]


def cached_file(root: Path, sha256: str, suffix: str, fetch: FetchFn, part_bytes: int) -> Path:
    """The local copy of the file with content hash `sha256` (fetched and verified on first use).
    Concurrent fetches on one node are harmless: each writes its own temporary, the rename is atomic."""
    path = Path(root) / f"{sha256}{suffix}"
    if path.is_file():
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
    return path


def entries(root: Path) -> int:
    """How many files the cache holds (reported by a compositor's `info`)."""
    root = Path(root)
    return sum(1 for p in root.iterdir() if p.is_file() and not p.name.endswith(".tmp")) if root.is_dir() else 0
