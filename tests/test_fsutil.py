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
