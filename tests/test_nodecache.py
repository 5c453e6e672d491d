"""The node-local cache of a node without the storage root stays within its budget: least
recently used files go first, never one just used, and old job directories go too."""
from __future__ import annotations

import hashlib
import os
import time

from cluster.nodecache import KEEP_RECENT_S, cached_file, evict


def _fetcher(data: bytes):
    def fetch(offset: int, length: int) -> bytes:
        return data[offset:offset + length]
    return fetch


def _put(root, data: bytes, budget: int):
    return cached_file(root, hashlib.sha256(data).hexdigest(), ".bin", _fetcher(data), 1 << 20, budget_bytes=budget)


def test_the_cache_is_cut_back_to_its_budget_least_recently_used_first(tmp_path):
    old = time.time() - 2 * KEEP_RECENT_S
    a, b, c = (bytes([i]) * 1000 for i in range(3))
    pa, pb = _put(tmp_path, a, 10_000), _put(tmp_path, b, 10_000)
    for p, age in ((pa, 10), (pb, 5)):  # a used longest ago, then b; both past the keep window
        os.utime(p, (old - age, old - age))
    _put(tmp_path, a, 10_000)  # a hit renews a: b is now the least recently used
    pc = _put(tmp_path, c, 2_500)  # over budget: b goes, a (used just now) and c (just fetched) stay
    assert pc.exists() and pa.exists() and not pb.exists()
    assert evict(tmp_path, 0) == []  # everything used within the keep window: nothing goes
    (tmp_path / "jobs" / "killed").mkdir(parents=True)
    (tmp_path / "jobs" / "killed" / "00001.tmp.mp4").write_bytes(b"x")
    os.utime(tmp_path / "jobs" / "killed", (old - 86400, old - 86400))
    (tmp_path / "jobs" / "running").mkdir()
    assert evict(tmp_path, 10**9) == [tmp_path / "jobs" / "killed"]
    assert (tmp_path / "jobs" / "running").exists()
