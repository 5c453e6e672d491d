"""Atomic writes: all or nothing, ordinary permissions."""
from __future__ import annotations

import os
import stat

import pytest

from cluster.fsutil import atomic_writer, write_atomic


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def test_written_file_has_ordinary_permissions(tmp_path):
    p = tmp_path / "out.json"
    write_atomic(p, "{}")
    assert p.read_text() == "{}"
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "track.npz"
    write_atomic(p, b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(p) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["track.npz"]


def test_lock_within_waits_a_bounded_time_for_a_held_lock(tmp_path):
    """One bounded wait for an exclusive file lock (avatar preparation, a lost session's recording)."""
    import time

    from cluster.fsutil import lock_within

    path = tmp_path / "x.lock"
    with open(path, "a+") as holder, open(path, "a+") as other:
        assert lock_within(holder, 1.0)
        t0 = time.monotonic()
        assert lock_within(other, 0.3) is False and time.monotonic() - t0 < 5
        holder.close()  # released: the next try takes it
        assert lock_within(other, 1.0)
