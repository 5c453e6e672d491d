"""Disk space (issue 12, "Resources"): a job that would not fit is refused at admission with
`resource.disk` and writes nothing; a disk that fills mid-job fails that job with the same code,
leaving no temporary, no segment of the failed chunk and no output; the next job succeeds."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from cluster.config import Settings
from cluster.errors import DiskFull, EncodeError, InputUnreadable
from cluster.media.probe import probe_audio, probe_video
from cluster.render import admit, render_local
from cluster.resources import (
    as_disk_full,
    check_job_disk,
    estimate_job_bytes,
    is_disk_full,
)
from cluster.schemas import RenderRequest
from tests.helpers import run_on_small_tmpfs, unshare_works


def tree_bytes(*roots: Path) -> int:
    """Bytes of the files under `roots`, but the node cache's: the node's (decoded template frames,
    `cluster.media.framecache`), bounded by its own budget and free-space margin, not a job's writes."""
    return sum(p.stat().st_size for r in roots if r.exists() for p in r.rglob("*")
               if p.is_file() and "node-cache" not in p.relative_to(r).parts)


def test_estimate_covers_what_a_job_writes(hostile_corpus, tmp_path):
    s = Settings(storage_root=tmp_path / "store", chunk_seconds=0.5, batch_size=8, keep_segments=True)
    from cluster.models import load_model

    model = load_model("builtin", s)  # stored before counting: not part of a job
    before = tree_bytes(s.storage_root)
    out = tmp_path / "out" / "o.mp4"
    render_local(RenderRequest(audio=str(hostile_corpus.speech), video=str(hostile_corpus.template),
                               output=str(out)), s, model=model)
    written_store = tree_bytes(s.storage_root) - before  # segments kept: the peak
    storage, output = estimate_job_bytes(probe_audio(hostile_corpus.speech, s),
                                         probe_video(hostile_corpus.template, s), s)
    assert written_store <= storage <= 20 * written_store
    assert out.stat().st_size <= output <= 20 * out.stat().st_size


def test_a_job_that_would_not_fit_is_refused_before_it_starts(hostile_corpus, tmp_path):
    s = Settings(storage_root=tmp_path / "store", disk_reserve_bytes=1 << 20)
    audio, video = probe_audio(hostile_corpus.speech, s), probe_video(hostile_corpus.template, s)
    storage, output = estimate_job_bytes(audio, video, s)
    need = storage + output + s.disk_reserve_bytes
    req = RenderRequest(audio=str(hostile_corpus.speech), video=str(hostile_corpus.template),
                        output=str(tmp_path / "o.mp4"))
    tight = s.model_copy(update={"simulate_free_bytes": need - 1})
    with pytest.raises(DiskFull) as info:
        admit("tight", req, tight)
    err = info.value
    assert err.code == "resource.disk" and err.stage == "admit" and err.job_id == "tight"
    assert "MiB are free" in err.message and str(s.storage_root) in err.message
    assert not (s.storage_root / "jobs").exists() and list(tmp_path.glob("o*")) == []
    check_job_disk(audio, video, req.output, s.model_copy(update={"simulate_free_bytes": need}))


def test_an_avatar_job_is_sized_by_its_stored_template_not_the_largest_allowed(hostile_corpus, tmp_path):
    """An avatar job has no template to probe: it was estimated at 4096x4096, 60 fps (4 GiB for 30 s
    of speech, ~500 GiB for an hour: refused on most disks); its stored template gives its size."""
    from cluster.faces.avatar import prepare_avatar

    s = Settings(storage_root=tmp_path / "store", disk_reserve_bytes=1 << 20)
    audio, video = probe_audio(hostile_corpus.speech, s), probe_video(hostile_corpus.template, s)
    with_video = sum(estimate_job_bytes(audio, video, s))
    avatar = prepare_avatar(str(hostile_corpus.template), s)
    stored = sum(estimate_job_bytes(audio, None, s, avatar.info))
    assert stored < with_video  # no input copy nor normalised template: the avatar holds them
    assert stored * 100 < sum(estimate_job_bytes(audio, None, s))  # the old estimate
    req = RenderRequest(audio=str(hostile_corpus.speech), avatar_id=avatar.id)
    fits = s.model_copy(update={"simulate_free_bytes": with_video + s.disk_reserve_bytes})
    assert admit("by-avatar", req, fits).avatar_id == avatar.id


def test_disk_full_errors_are_recognised():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(EncodeError("encoding failed", cause="av_interleaved_write_frame(): No space left on device"))
    assert not is_disk_full(InputUnreadable("x.mp4 is not a readable file"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    err = as_disk_full(EncodeError("encoding failed", stage="encode", chunk=3, cause="No space left on device"),
                       "render", "job1")
    assert (err.code, err.stage, err.chunk, err.job_id) == ("resource.disk", "encode", 3, "job1")


@pytest.mark.skipif(not unshare_works(), reason="mount namespaces (unshare --mount) are not permitted here")
def test_a_disk_that_fills_mid_job_fails_that_job_cleanly(hostile_corpus):
    """A real 12 MiB tmpfs over the storage root (in a private mount namespace), filled by a
    ballast file after admission, before prepare, between chunks and before finalising."""
    r = run_on_small_tmpfs("disk_scenario.py", [hostile_corpus.speech, hostile_corpus.template], timeout=180)
    assert r["admit_refused"]["code"] == "resource.disk" and not r["admit_refused_left_job_dir"]
    for step, job in (("prepare_full", "prep"), ("render_full", "mid"), ("finalize_full", "mid")):
        assert r[step]["code"] == "resource.disk", r[step]
        assert r[step]["job_id"] == job and "disk filled up" in r[step]["message"]
    assert r["segments_after_render_full"] == ["00000.mp4"]  # the failed chunk left nothing
    assert not r["output_exists"]
    assert r["after"] == {"ok": True} and r["after_output"] > 0
    assert r["temporaries"] == []


@pytest.mark.parametrize("layout", ["v2", "v1", "none"])
def test_a_containers_cpu_and_memory_limits_bound_what_live_admission_sees(tmp_path, layout):
    """A pod limited to 2 CPUs and 1 GiB on a big node: live sessions' admission counts the pod's
    CPUs and the memory left under its limit, not the host's (it admitted sessions until the OOM)."""
    import os

    import psutil

    from cluster.resources import available_memory_bytes, usable_cpus

    root = tmp_path / "cgroup"
    limit, usage, cache = 1 << 30, 300 << 20, 600 << 20  # reclaimable page cache: not taken
    if layout == "v2":
        root.mkdir()
        (root / "cpu.max").write_text("200000 100000\n")
        (root / "memory.max").write_text(f"{limit}\n")
        (root / "memory.current").write_text(f"{usage + cache}\n")  # usage counts the page cache
        (root / "memory.stat").write_text(f"anon {usage}\nfile {cache}\ninactive_file {cache}\n")
    elif layout == "v1":
        (root / "cpu").mkdir(parents=True)
        (root / "memory").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
        (root / "memory" / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (root / "memory" / "memory.usage_in_bytes").write_text(f"{usage + cache}\n")
        (root / "memory" / "memory.stat").write_text(f"cache {cache}\ntotal_inactive_file {cache}\n")
    host_cpus = len(os.sched_getaffinity(0))
    if layout == "none":
        assert usable_cpus(root) == host_cpus
        assert available_memory_bytes(root) > 0
        return
    assert usable_cpus(root) == min(2.0, host_cpus)
    assert available_memory_bytes(root) == min(limit - usage, psutil.virtual_memory().available)


def test_an_admission_whose_copy_fails_leaves_nothing_behind(hostile_corpus, tmp_path, monkeypatch):
    """The disk fills while a job's input is copied: `resource.disk`, and neither the half copy nor
    the job's directory stays (it has no row: nothing would ever remove it)."""
    import shutil

    s = Settings(storage_root=tmp_path / "store")
    real_copy = shutil.copyfile

    def full_disk(src, dst, *a, **kw):
        if str(dst).endswith(".tmp") and "video" in str(dst):
            Path(dst).write_bytes(b"half a copy")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    req = RenderRequest(audio=str(hostile_corpus.speech), video=str(hostile_corpus.template))
    with pytest.raises(DiskFull):
        admit("copy-fails", req, s)
    assert not (s.storage_root / "jobs" / "copy-fails").exists()


def test_jobs_admitted_but_not_rendering_yet_keep_their_space(hostile_corpus, tmp_path):
    """The jobs of a batch were each checked against the same free space, and the disk filled
    mid-render: an admitted job keeps its estimated space promised until it renders (or ends), and
    the next admission counts it; the message says so."""
    from cluster.resources import RESERVATIONS

    s = Settings(storage_root=tmp_path / "store", disk_reserve_bytes=1 << 20)
    audio, video = probe_audio(hostile_corpus.speech, s), probe_video(hostile_corpus.template, s)
    need = sum(estimate_job_bytes(audio, video, s)) + s.disk_reserve_bytes
    room_for_one = s.model_copy(update={"simulate_free_bytes": int(need * 1.5)})
    req = RenderRequest(audio=str(hostile_corpus.speech), video=str(hostile_corpus.template))
    try:
        admit("first", req, room_for_one)
        with pytest.raises(DiskFull, match="promised to 1 admitted job"):
            admit("second", req, room_for_one)
        assert not (s.storage_root / "jobs" / "second").exists()
        admit("first", req, room_for_one)  # its own promise does not count against it (a retried admission)
        RESERVATIONS.release("first")  # it renders: its writes show in the free space from now on
        admit("second", req, room_for_one)
    finally:
        RESERVATIONS.release("first")
        RESERVATIONS.release("second")
