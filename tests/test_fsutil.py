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


@pytest.mark.parametrize("renewal", ["touched before the rename", "replaced before the rename",
                                     "replaced while set aside"])
def test_a_file_renewed_while_old_files_are_removed_stays(tmp_path, monkeypatch, renewal):
    """Retention removed a stored upload by its age alone: one renewed by another process between the look at
    its age and the unlink (the same bytes uploaded again) was removed all the same, and the upload's answer named
    a file that was gone. The renewal is made here in each window, as the other process would: before the old
    file is set aside (it is put back), or while it is (the new copy stays, the old one goes)."""
    import time

    from cluster import fsutil

    old, other = tmp_path / "inputs" / "abc.wav", tmp_path / "inputs" / "stale.wav"
    old.parent.mkdir()
    for f in (old, other):
        f.write_bytes(b"speech")
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    real_rename, real_unlink = os.rename, os.unlink

    def renew(path, moment):
        name = os.path.basename(path)
        if moment == "rename" and name == old.name and renewal.endswith("before the rename"):
            if renewal.startswith("touched"):
                os.utime(old)
            else:
                (tmp_path / "copy").write_bytes(b"speech")
                os.replace(tmp_path / "copy", old)
        elif moment == "unlink" and name.startswith(f".{old.name}.") and renewal == "replaced while set aside":
            (tmp_path / "copy").write_bytes(b"new speech")
            os.replace(tmp_path / "copy", old)

    monkeypatch.setattr(fsutil.os, "rename", lambda src, dst: (renew(src, "rename"), real_rename(src, dst))[1])
    monkeypatch.setattr(fsutil.os, "unlink", lambda path, *a, **k: (renew(path, "unlink"),
                                                                    real_unlink(path, *a, **k))[1])
    removed = fsutil.remove_files_older_than(old.parent, time.time() - 60)
    if renewal == "replaced while set aside":  # the old file went (counted), its new copy stays
        assert old.read_bytes() == b"new speech" and removed == 2
    else:
        assert old.read_bytes() == b"speech" and removed == 1
    assert not other.exists() and sorted(p.name for p in old.parent.iterdir()) == [old.name]  # nothing left aside
