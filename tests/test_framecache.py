"""Decoded template frames kept in the node cache (`cluster.media.framecache`): built once per node
beside the first render, read back as the decoder's very bytes, within the cache's budget, never
trusted when cut short; a chunk rendered from them is the segment a decoded chunk is."""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.config import Settings
from cluster.media import framecache
from cluster.media.decode import TemplateReader
from cluster.media.framecache import TemplateFrames, build_frame_file, frame_file
from cluster.media.normalize import normalize_template
from tests.helpers import wait_until


@pytest.fixture(scope="module")
def template(astronaut_video, tmp_path_factory) -> str:
    s = Settings(storage_root=tmp_path_factory.mktemp("framecache-templates"))
    return str(normalize_template(astronaut_video, s).path)


def frames_path(template: str, s: Settings) -> Path:
    with TemplateReader(template, s) as r:
        return frame_file(template, s.node_cache_dir, r.width, r.height, r.frame_count, r.fps)


def test_a_live_reader_builds_the_frame_file_at_once_and_later_ones_read_the_decoders_bytes(template, tmp_path):
    s = Settings(storage_root=tmp_path)
    path = frames_path(template, s)
    with TemplateFrames(template, s) as first:  # no job: a live session's, which reads for long
        assert not first.cached  # decoding, while a thread builds the file
        wait_until(lambda: path.is_file(), timeout=60, what="the frame file")
        assert not any(p.name.endswith(".lock") for p in s.node_cache_dir.iterdir())
    rng = np.random.default_rng(3)
    with TemplateFrames(template, s) as cached, TemplateReader(template, s) as decoder:
        assert cached.cached
        assert (cached.width, cached.height, cached.fps, cached.frame_count) == \
            (decoder.width, decoder.height, decoder.fps, decoder.frame_count)
        for idx in ([0, 1, 2], [cached.frame_count - 1, 0, 5, 5], rng.integers(0, cached.frame_count, 16)):
            np.testing.assert_array_equal(cached.read_yuv(idx), decoder.read_yuv(idx))
        assert cached.read_yuv([]).shape[0] == 0
        for bad in ([cached.frame_count], [-1]):
            with pytest.raises(ValueError, match="outside"):
                cached.read_yuv(bad)


def test_a_job_builds_the_frame_file_only_where_another_job_used_the_template_before(template, tmp_path):
    """A template rendered once (an upload of one job) costs no build; a second job's chunk starts it."""
    s = Settings(storage_root=tmp_path)
    path = frames_path(template, s)
    for _ in range(2):  # the first job's chunks: decoded, no build
        with TemplateFrames(template, s, user="job-1") as frames:
            assert not frames.cached
    time.sleep(0.5)
    assert not path.exists() and not list(s.node_cache_dir.glob("*.lock"))
    with TemplateFrames(template, s, user="job-2") as frames:
        assert not frames.cached
        wait_until(lambda: path.is_file(), timeout=60, what="the frame file")
    with TemplateFrames(template, s, user="job-1") as frames:
        assert frames.cached


def test_first_use_markers_older_than_a_day_are_swept(template, tmp_path, monkeypatch):
    """A service whose every job brings its own template leaves a marker per job: they do not pile up."""
    s = Settings(storage_root=tmp_path)
    seen = s.node_cache_dir / framecache.SEEN_DIR
    seen.mkdir(parents=True)
    old, recent = seen / ("0" * 20), seen / ("1" * 20)
    old.write_text("job-old")
    recent.write_text("job-recent")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    monkeypatch.setattr(framecache, "_last_sweep", 0.0)
    with TemplateFrames(template, s, user="job-new"):
        pass
    assert not old.exists() and recent.exists() and len(list(seen.iterdir())) == 2  # and the new one


def test_a_reader_open_before_the_file_was_built_moves_to_it(template, tmp_path, monkeypatch):
    """A live session keeps its reader for its whole life: it reads the file once it is there."""
    s = Settings(storage_root=tmp_path)
    monkeypatch.setattr(framecache, "_start_build", lambda *a: None)
    monkeypatch.setattr(TemplateFrames, "RECHECK_S", 0.0)
    with TemplateFrames(template, s) as frames:
        before = frames.read_yuv([3, 4])
        assert not frames.cached
        assert build_frame_file(template, frames.path, frames._size, s)
        np.testing.assert_array_equal(frames.read_yuv([3, 4]), before)
        assert frames.cached


def test_a_live_reader_refused_a_build_while_another_ran_asks_again_and_moves_to_the_file(template, tmp_path,
                                                                                         monkeypatch):
    """A live session whose build met another template's (the node's one builder) asked only once, and
    decoded for its whole life (up to an hour); it now asks again once that build is over."""
    s = Settings(storage_root=tmp_path)
    monkeypatch.setattr(framecache, "BUSY_RETRY_S", 0.2)
    monkeypatch.setattr(TemplateFrames, "RECHECK_S", 0.0)
    lock = s.node_cache_dir / framecache.BUILD_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:  # another template's build holds the node's builder (from before the session)
        fcntl.flock(held, fcntl.LOCK_EX)
        frames = TemplateFrames(template, s)
        wait_until(lambda: frames.path in framecache._not_before, timeout=30, what="the refused build")
        assert not frames.path.exists()
    with frames:
        before = frames.read_yuv([1, 2])
        wait_until(lambda: frames.read_yuv([1, 2]) is not None and frames.cached, timeout=60, interval=0.1,
                   what="the session reading the frame file")
        np.testing.assert_array_equal(frames.read_yuv([1, 2]), before)


def test_a_cut_frame_file_is_not_read_and_off_means_no_file(template, tmp_path, monkeypatch):
    s = Settings(storage_root=tmp_path)
    path = frames_path(template, s)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0" * 1000)  # a build cut short (the real ones are renamed into place whole)
    monkeypatch.setattr(framecache, "_start_build", lambda *a: None)
    with TemplateFrames(template, s) as frames, TemplateReader(template, s) as decoder:
        assert not frames.cached
        np.testing.assert_array_equal(frames.read_yuv([7]), decoder.read_yuv([7]))
    path.unlink()
    off = s.model_copy(update={"frame_cache": False})
    with TemplateFrames(template, off) as frames:
        assert not frames.cached and frames.path is None
    assert not path.exists()


def test_the_cache_takes_a_template_only_within_its_budget_and_one_builder_per_node(template, tmp_path):
    s = Settings(storage_root=tmp_path)
    with TemplateReader(template, s) as r:
        size = r.frame_count * r.width * r.height * 3 // 2
    path = frames_path(template, s)
    # a template over a quarter of the node cache's budget is decoded, never cached
    small = s.model_copy(update={"node_cache_gb": 3 * size / 1024**3})
    assert not build_frame_file(template, path, size, small)
    assert not path.exists()
    # another process of the node is building (this or another template): this one leaves it alone
    lock = s.node_cache_dir / framecache.BUILD_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert build_frame_file(template, path, size, s) is None
    assert not path.exists()
    # more than a quarter of the free space, or less than 1 GiB left free: not cached
    for free in (3 * size, 1024**3 + size // 2):
        assert build_frame_file(template, path, size, s.model_copy(update={"simulate_free_bytes": free})) is False
    assert not path.exists()
    # a build killed mid-way left its temporary: the next build removes it
    stale = path.parent / f".{path.name}.0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    # the least recently used files of the cache make room for it
    old = s.node_cache_dir / "old-mel.npy"
    old.write_bytes(b"x" * int(3.5 * size))
    os.utime(old, (1, 1))
    fits = s.model_copy(update={"node_cache_gb": 4.2 * size / 1024**3})
    assert build_frame_file(template, path, size, fits) is True
    assert path.stat().st_size == size and not old.exists() and not stale.exists()


def test_a_fetched_template_renewed_by_the_node_cache_keeps_its_frame_file(template, tmp_path):
    """A node without the storage root renews a fetched template's mtime at each use (its LRU order):
    the frame file's key must not move with it, or each chunk would build another copy."""
    s = Settings(storage_root=tmp_path)
    path = frames_path(template, s)
    os.utime(template, (1, 1))
    assert frames_path(template, s) == path
    assert build_frame_file(template, path, os.path.getsize(path) if path.exists() else _size(template, s), s)
    os.utime(template)
    with TemplateFrames(template, s, user="job-9") as frames:
        assert frames.cached


def test_a_frame_file_that_cannot_be_read_sends_its_reader_back_to_decoding(template, tmp_path):
    s = Settings(storage_root=tmp_path)
    path = frames_path(template, s)
    assert build_frame_file(template, path, _size(template, s), s)
    with TemplateFrames(template, s, user="job-1") as frames, TemplateReader(template, s) as decoder:
        assert frames.cached
        os.truncate(path, 1000)  # cut under it (a disk error reads the same way)
        np.testing.assert_array_equal(frames.read_yuv([9, 10]), decoder.read_yuv([9, 10]))
        assert not frames.cached


def _size(template: str, s: Settings) -> int:
    with TemplateReader(template, s) as r:
        return r.frame_count * r.width * r.height * 3 // 2


def test_a_chunk_rendered_from_cached_frames_is_the_segment_a_decoded_chunk_is(astronaut_video, speech_wav, tmp_path):
    from cluster.models import load_model
    from cluster.render import admit, prepare_job, render_chunk
    from cluster.schemas import RenderRequest

    s = Settings(storage_root=tmp_path / "store", chunk_seconds=1.0, frame_cache=False)
    model = load_model("builtin", s)
    request = admit("framecache", RenderRequest(audio=speech_wav, video=astronaut_video), s)
    plan = prepare_job("framecache", request, s, model_size=model.size)
    chunk = plan.chunks[1]

    def segment(settings: Settings) -> str:
        result = render_chunk(plan, chunk, model.generate, settings)
        digest = hashlib.sha256(Path(result.segment).read_bytes()).hexdigest()
        Path(result.segment).unlink()
        return digest

    decoded = segment(s)
    on = s.model_copy(update={"frame_cache": True})
    path = frames_path(plan.template_path, on)
    assert build_frame_file(plan.template_path, path, plan.template_frames * plan.width * plan.height * 3 // 2, on)
    with TemplateFrames(plan.template_path, on) as frames:
        assert frames.cached
    assert segment(on) == decoded


def test_the_build_runs_on_a_thread_that_lets_the_renders_go_first(template, tmp_path, monkeypatch):
    import threading

    niceness = []

    def build(template_path, path, size, settings):  # what the build thread runs, observed
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return True

    monkeypatch.setattr(framecache, "build_frame_file", build)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    with TemplateFrames(template, Settings(storage_root=tmp_path)):
        wait_until(lambda: niceness, timeout=30, what="the build thread")
    assert niceness == [min(19, before + framecache.BUILD_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the process's own threads unchanged


def test_a_build_still_writing_when_its_process_exits_stops_and_leaves_nothing(template, tmp_path, monkeypatch):
    """A one-shot `lipsync render` that ends while its frame file is being built left the half-written
    temporary in the node cache until the next build; the process's exit now stops the build and
    removes it (atexit; `lipsync`'s own exit calls it too, as `os._exit` skips atexit)."""
    import threading

    s = Settings(storage_root=tmp_path)
    monkeypatch.setattr(framecache, "_exiting", threading.Event())  # this test's "exit", not the process's
    slow_read = TemplateReader.read_yuv

    def read_yuv(self, indices):
        time.sleep(0.05)
        return slow_read(self, indices)

    monkeypatch.setattr(TemplateReader, "read_yuv", read_yuv)
    with TemplateFrames(template, s) as frames:  # a live session's reader: its build starts at once
        cache = s.node_cache_dir
        wait_until(lambda: list(cache.glob(".frames-*.tmp")), timeout=30, what="the build writing")
        framecache.abandon_builds()
        assert not list(cache.glob(".frames-*.tmp")) and not frames.path.exists()
        assert not any(t.is_alive() for t in framecache._build_threads)
