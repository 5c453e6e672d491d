"""The fast paths (template reuse, BGR conversion) and the benchmark package's entry points.

No speed is asserted here: benchmarks under bench/ measure speed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from cluster.config import Settings
from cluster.media.normalize import keyframe_layout, normalize_template


def test_a_template_that_is_already_normalised_is_used_as_is(tmp_path, astronaut_video):
    """A constant-rate H.264 yuv420p source with short GOPs is not re-encoded; a long-GOP one is."""
    first = normalize_template(astronaut_video, Settings(storage_root=tmp_path / "a", gop_frames=10))
    assert keyframe_layout(astronaut_video)[1] > 20  # the synthetic source has one long GOP
    assert first.path != astronaut_video and keyframe_layout(first.path)[1] <= 10  # re-encoded
    again = normalize_template(first.path, Settings(storage_root=tmp_path / "b", gop_frames=10))
    assert os.path.samefile(again.path, first.path) or \
        open(again.path, "rb").read() == open(first.path, "rb").read()  # the same bytes, no ffmpeg
    assert again.info.video.frame_count == first.info.video.frame_count == 50
    mode = os.stat(first.path).st_mode
    # a template whose GOPs are longer than twice gop_frames is re-encoded
    third = normalize_template(first.path, Settings(storage_root=tmp_path / "c", gop_frames=4))
    assert keyframe_layout(third.path)[1] <= 4
    assert os.stat(first.path).st_mode == mode


def test_decoded_frames_round_trip_through_the_segment_encoder(tmp_path, astronaut_video):
    """frame_to_bgr's chroma (one value per 2x2 block) survives the encoder's chroma averaging:
    a template frame decoded, encoded losslessly (CRF 0) and decoded again barely changes."""
    from cluster.media.decode import TemplateReader
    from cluster.media.encode import SegmentEncoder

    s = Settings(storage_root=tmp_path, crf=0)
    with TemplateReader(astronaut_video, s) as reader:
        frames = reader.read([0, 1, 2])
    out = tmp_path / "seg.mp4"
    with SegmentEncoder(out, frames.shape[2], frames.shape[1], Fraction(25), s) as enc:
        enc.write(frames)
    with TemplateReader(out, s) as reader:
        back = reader.read([0, 1, 2])
    diff = np.abs(back.astype(int) - frames)
    # (the few larger differences are colours outside the RGB gamut, clipped on the way)
    assert diff.mean() < 0.1 and (diff > 2).mean() < 0.001


def test_bench_cli_lists_the_five_benchmarks():
    from bench.__main__ import BENCHMARKS, build_parser

    assert {"classic", "floor", "scaling", "first_segment", "concurrency"} <= set(BENCHMARKS)
    args = build_parser().parse_args(["floor", "--quick", "--model", "builtin"])
    assert args.quick and args.model == ["builtin"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nonsense"])
    live = build_parser().parse_args(["live", "--only", "ramp", "--ramp", "1,4,8", "--model", "wav2lip96"])
    assert live.only == ["ramp"] and live.ramp == [1, 4, 8] and live.model == ["wav2lip96"]
    refused = subprocess.run([sys.executable, "-m", "bench", "floor", "--ramp", "2"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "for the live run only" in refused.stderr, refused.stderr
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "all" in out.stdout


def test_wav2lip_sized_model_has_the_generators_parameter_count():
    from bench.wav2lip_sized import parameter_count

    assert 35_000_000 < parameter_count() < 37_500_000  # Wav2Lip-96's generator: about 36 M


def test_bench_results_section_replaces_only_its_own_part(tmp_path, monkeypatch):
    from bench import common

    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nintro\n\n<!-- bench:floor -->\nold\n<!-- /bench:floor -->\n\nafter\n")
    monkeypatch.setattr(common, "DOCS", doc)
    common._replace_section("floor", "<!-- bench:floor -->\nnew\n<!-- /bench:floor -->")
    common._replace_section("scaling", "<!-- bench:scaling -->\nS\n<!-- /bench:scaling -->")
    text = doc.read_text()
    assert "old" not in text and "new" in text and "intro" in text and "after" in text
    assert text.index("after") < text.index("bench:scaling")


def test_bench_memory_sums_a_process_tree_and_counts_shared_pages_once():
    """The benchmarks' memory figure: two children touching the same 96 MiB of shared memory and
    48 MiB each of their own. Summed RSS counts the shared pages twice; summed PSS once."""
    from bench.common import run_measured

    child = ("import mmap, os, time; shm = mmap.mmap(-1, 96 << 20); shm[::4096] = b'x' * (24 << 10); "
             "pid = os.fork(); own = b'y' * (48 << 20); touched = shm[::4096]; "  # every shared page, no copy
             "time.sleep(3); os.waitpid(pid, 0) if pid else os._exit(0)")  # PSS is read once a second
    m = run_measured([sys.executable, "-c", child], timeout=60)
    shared, own = 96, 48
    assert m["peak_rss_mb"] >= 2 * (shared + own) - 8  # the shared pages once per process
    assert shared + 2 * own - 8 <= m["peak_pss_mb"] <= shared + 2 * own + 2 * 40  # once in all (+ Python)
    assert m["peak_pss_mb"] < m["peak_rss_mb"] - shared / 2


def test_render_chunk_submits_the_next_batch_before_waiting_for_one(tmp_path, astronaut_video, speech_wav):
    """A deferred `generate` (the cluster's) overlaps batches; the segment is the same as with an
    immediate one. The latency model (0 ms, identity) stands in for the model."""
    from cluster.media.decode import TemplateReader
    from cluster.models import load_model
    from cluster.render import prepare_job, render_chunk
    from cluster.schemas import RenderRequest

    s = Settings(storage_root=tmp_path / "s", batch_size=8, chunk_seconds=1.0, first_chunk_seconds=0)  # 25 frames
    model = load_model("latency:0:96", s)
    plan = prepare_job("deferred", RenderRequest(audio=speech_wav, video=astronaut_video), s, model_size=96)
    chunk = plan.chunks[0]
    events = []

    def deferred(mel, crops):
        k = sum(1 for e in events if e[0] == "submit")
        events.append(("submit", k))

        def result():
            events.append(("result", k))
            return model.generate(mel, crops)
        return result

    seg = render_chunk(plan, chunk, deferred, s).segment
    batches = -(-chunk.frames // 8)
    assert events[:3] == [("submit", 0), ("submit", 1), ("result", 0)]
    assert sorted(events) == sorted([("submit", k) for k in range(batches)] + [("result", k) for k in range(batches)])
    with TemplateReader(seg, s) as r:
        deferred_frames = r.read(range(chunk.frames))
    seg2 = render_chunk(plan, chunk, model.generate, s).segment
    with TemplateReader(seg2, s) as r:
        assert np.array_equal(r.read(range(chunk.frames)), deferred_frames)


def test_targets_table_takes_each_row_from_the_newest_stored_run(tmp_path, monkeypatch):
    """A partial run (one model, one length) renews its own rows and leaves the others to the runs that
    measured them, each row dated; quick runs never count; the growth of memory with length compares two
    lengths of one run only."""
    import json

    from bench import summary

    def run(model, secs, oneshot, pss=1000.0):
        situation = {"speed_vs_classic": oneshot, "peak_pss_mb": pss, "memory_vs_classic": 0.5}
        return {"model": model, "speech_s": secs, "oneshot": situation, "warm_cold": situation,
                "warm_prepared": situation}

    def store(name, date, runs):
        (tmp_path / name).write_text(json.dumps({"date": date, "figures": {"runs": runs}}))

    store("classic.json", "2026-11-29 13:57 UTC", [run("builtin", 30.0, 1.1), run("builtin", 300.0, 1.4, 1100.0),
                                                   run("wav2lip96", 30.0, 1.05)])
    store("classic.builtin30.20261206-0816.json", "2026-12-06 08:16 UTC", [run("builtin", 30.0, 1.9, 2000.0)])
    store("classic.quick.json", "2026-12-07 00:00 UTC", [run("builtin", 30.0, 9.9), run("wav2lip96", 30.0, 9.9)])
    monkeypatch.setattr(summary, "RESULTS", tmp_path)
    rows = {r[0]: r for r in summary.targets_rows()}
    assert rows["one-shot `lipsync render`, cold avatar, vs classic (builtin, 30 s)"][2:] == \
        ["1.90x", "met", "2026-12-06"]
    assert rows["one-shot `lipsync render`, cold avatar, vs classic (wav2lip96, 30 s)"][2:] == \
        ["1.05x", "**not met**", "2026-11-29"]
    assert rows["peak memory, 5 min vs 30 s (one-shot, PSS)"][2:] == ["1.10x", "met", "2026-11-29"]


def test_a_partial_run_moves_the_runs_it_does_not_renew_aside(tmp_path, monkeypatch):
    import json

    from bench import common

    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "DOCS", tmp_path / "PERFORMANCE.md")
    monkeypatch.setattr("bench.summary.RESULTS", tmp_path)
    stored = {"date": "2026-11-29 13:57 UTC", "figures": {"runs": [{"model": "builtin", "speech_s": 30.0},
                                                                    {"model": "wav2lip96", "speech_s": 30.0}]}}
    (tmp_path / "classic.json").write_text(json.dumps(stored))
    common.write_result("classic", {"runs": [{"model": "builtin", "speech_s": 30.0}]}, "| t |", started={
        "host_cpus": 2, "cpu": "x", "load_1min_at_start": 0.1})
    assert json.loads((tmp_path / "classic.20261129-1357.json").read_text()) == stored
    assert json.loads((tmp_path / "classic.json").read_text())["figures"]["runs"] == [
        {"model": "builtin", "speech_s": 30.0}]
    # a run that renews every stored row replaces the file
    common.write_result("classic", {"runs": [{"model": "builtin", "speech_s": 30.0}]}, "| t |", started={
        "host_cpus": 2, "cpu": "x", "load_1min_at_start": 0.1})
    assert sorted(p.name for p in tmp_path.glob("classic*.json")) == ["classic.20261129-1357.json", "classic.json"]
