"""An hour of speech in one job through a warm service, against 5 minutes on the same service.

    python -m bench long --seconds 3600        (the reference run: about 20-40 minutes here)
    python -m bench long --quick               (4 s against 12 s: a smoke check)

One embedded Ray with the job manager and its workers up (a warm service, in this process), the
avatar prepared by a 2 s warm-up job on the same template; then the 5-minute job, then the long
one. For each: wall time from submit to the job's end, frames/s over that time and over the
rendering phase alone, and the peak PSS of the whole process tree (Ray's processes included,
`bench.common.TreeSampler`) while the job ran. Each output is downloaded and verified (frame
count by demuxing, video and audio durations against the speech's, `verify_output`) and its last
frame decoded and checked to be a picture, not a blank. The targets: the long job's peak PSS
within 1.2x of the 5-minute one's, its frames/s within 10 % of it.

Writes bench/results/long.json and the `long` section of docs/PERFORMANCE.md.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from bench.common import CACHE, RESULTS, TreeSampler, _replace_section, machine, make_inputs, md_table, wait_phases

BASE_SECONDS = 300.0
SIZE = (640, 360)
TEMPLATE_SECONDS = 10.0
MEMORY_TARGET = 1.2
SPEED_TOLERANCE = 0.10


def _render(service, inp, out: Path) -> dict:
    """One job of `inp` through the warm service: wall and phase times and peak PSS while it ran,
    then its output downloaded to `out` and verified."""
    from cluster.schemas import RenderRequest

    rt = service.rt
    with TreeSampler() as mem:
        t0 = time.perf_counter()
        st = rt.submit(RenderRequest(audio=inp.audio, video=inp.video, model="builtin"))
        final, t_render, t_final = wait_phases(rt, st.id, timeout=4 * 3600, what="long job")
        wall = time.perf_counter() - t0
    if final.state.value != "succeeded":
        raise RuntimeError(f"job {st.id} ({inp.seconds:g} s of speech) ended {final.state.value}: {final.error}")
    t_download = time.perf_counter()
    rt.download_output(st.id, out)
    download_s = time.perf_counter() - t_download
    checked = _verify(out, inp)
    render_s = (t_final or t0 + wall) - (t_render or t0)
    frames = final.frames_total
    return {"job_id": st.id, "speech_s": inp.seconds, "frames": frames, "wall_s": wall, "render_s": render_s,
            "fps": frames / wall, "render_fps": frames / render_s, **mem.figures(),
            "output_bytes": out.stat().st_size, "download_s": download_s, **checked}


def _verify(out: Path, inp) -> dict:
    """The output holds exactly the planned frames at 25 fps and the speech's duration (demuxed,
    `verify_output`), and its last frame is a picture (a face over a background, not a blank)."""
    import numpy as np

    from cluster.audio import load_audio
    from cluster.media.finalize import verify_output
    from cluster.media.probe import read_media_info

    frames = -(-round(inp.seconds * 16000) * inp.fps // 16000)
    duration = len(load_audio(inp.audio)) / 16000.0
    info = verify_output(str(out), frames_expected=frames, fps=Fraction(inp.fps), audio_duration=duration)
    last = _frame_at(out, (frames - 1) / inp.fps, inp.width, inp.height)
    if last is None or float(np.std(last)) < 10.0:
        raise RuntimeError(f"{out}: the last frame is blank or unreadable")
    return {"verified_frames": info.video.frame_count, "video_s": read_media_info(str(out)).duration,
            "last_frame_std": float(np.std(last))}


def _frame_at(path: Path, t: float, w: int, h: int):
    import subprocess

    import numpy as np

    from cluster.media.ffmpeg import ffmpeg_binary

    raw = subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-ss", f"{max(t - 0.5, 0):.3f}",
                          "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1"],
                         capture_output=True, timeout=120).stdout
    return np.frombuffer(raw, np.uint8).reshape(h, w, 3) if len(raw) == w * h * 3 else None


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None) -> dict:
    from bench.classic import WarmService

    if models and models != ["builtin"]:
        raise SystemExit("bench long runs the built-in model only")
    base_s, size = (4.0, (320, 240)) if quick else (BASE_SECONDS, SIZE)
    long_s = (seconds or [12.0 if quick else 3600.0])[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-long-", dir=CACHE))
    started = machine()
    results: dict = {"size": f"{size[0]}x{size[1]}", "template_seconds": TEMPLATE_SECONDS, "runs": []}
    try:
        service = WarmService(work / "storage")
        try:
            warm = make_inputs(2.0, size, TEMPLATE_SECONDS)
            print(f"[long] warm-up: 2 s job on the {size[0]}x{size[1]} template (avatar, model) ...", flush=True)
            _render(service, warm, work / "warmup.mp4")
            for secs in (base_s, long_s):
                inp = make_inputs(secs, size, TEMPLATE_SECONDS)
                print(f"[long] {secs:g} s of speech ({inp.frames} frames) ...", flush=True)
                row = _render(service, inp, work / f"out_{secs:g}.mp4")
                (work / f"out_{secs:g}.mp4").unlink()
                results["runs"].append(row)
                print(f"[long] {row}", flush=True)
        finally:
            service.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base, long = results["runs"]
    results["memory_ratio"] = long["peak_pss_mb"] / base["peak_pss_mb"]
    results["fps_ratio"] = long["fps"] / base["fps"]
    results["render_fps_ratio"] = long["render_fps"] / base["render_fps"]
    _report(results, started, quick)
    return results


def _report(results: dict, started: dict, quick: bool) -> None:
    import datetime as dt
    import json
    import sys

    base, long = results["runs"]
    mem_ok = results["memory_ratio"] <= MEMORY_TARGET
    fps_ok = results["fps_ratio"] >= 1 - SPEED_TOLERANCE
    rows = [[f"{r['speech_s']:g} s", r["frames"], r["wall_s"], r["fps"], r["render_fps"], r["peak_pss_mb"],
             r["peak_rss_mb"], f"{r['output_bytes'] / 2**20:.1f}", f"{r['verified_frames']} frames, "
             f"{r['video_s']:.2f} s"] for r in results["runs"]]
    table = md_table(["speech", "frames", "wall s (submit to end)", "frames/s", "frames/s (rendering phase)",
                      "peak PSS MiB (tree)", "peak RSS MiB (summed)", "output MiB", "verified"], rows)
    table += (f"\n\n| ratio {long['speech_s']:g} s / {base['speech_s']:g} s | measured | target | verdict |\n"
              f"|---|---|---|---|\n"
              f"| peak PSS | {results['memory_ratio']:.2f}x | <= {MEMORY_TARGET}x | "
              f"{'met' if mem_ok else 'NOT met'} |\n"
              f"| frames/s (submit to end) | {results['fps_ratio']:.2f}x | >= {1 - SPEED_TOLERANCE:.2f}x | "
              f"{'met' if fps_ok else 'NOT met'} |\n"
              f"| frames/s (rendering phase) | {results['render_fps_ratio']:.2f}x | | |")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m bench " + " ".join(sys.argv[1:])
    doc = {"name": "long", "date": date, "command": command, "machine": started, "figures": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("long.quick.json" if quick else "long.json")
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(table, flush=True)
    if quick:
        print(f"wrote {path} (quick run: docs/PERFORMANCE.md not updated)")
        return
    notes = (f"Built-in model, template {results['size']} {results['template_seconds']:g} s at 25 fps, "
             f"speech-like audio; one warm service (embedded Ray in the benchmark's process), the avatar "
             f"prepared by a 2 s warm-up job, then the {base['speech_s']:g} s job, then the "
             f"{long['speech_s']:g} s one. Peak memory: PSS of the whole process tree (Ray's processes "
             f"included) sampled once a second while the job ran. Each output downloaded and verified "
             f"(frames demuxed and counted, durations, last frame decoded).")
    section = (f"<!-- bench:long -->\n_Measured {date} with `{command}` on {started['host_cpus']} cores "
               f"({started['cpu']}), 1-min load at start {started['load_1min_at_start']}._\n\n"
               f"{table.strip()}\n\n{notes}\n<!-- /bench:long -->")
    _replace_section("long", section)
    print(f"wrote {path} and the long section of docs/PERFORMANCE.md")


# --- the prepare step alone: what grew with the speech's length -----------------------------------
PREPARE_CHILD = r"""
import json, resource, sys, threading, time
import psutil
from cluster.config import Settings
from cluster.render import admit, prepare_job
from cluster.schemas import RenderRequest
audio, video, root, job = sys.argv[1:5]
me, peak, stop = psutil.Process(), {"kids": 0}, threading.Event()
def sample():  # ffmpeg children's RSS every 20 ms
    while not stop.wait(0.02):
        k = 0
        for c in me.children(recursive=True):
            try:
                if "ffmpeg" in c.name():
                    k += c.memory_info().rss
            except psutil.Error:
                pass
        peak["kids"] = max(peak["kids"], k)
s = Settings(storage_root=root)
req = admit(job, RenderRequest(audio=audio, video=video), s)
threading.Thread(target=sample, daemon=True).start()
t0 = time.time()
plan = prepare_job(job, req, s, model_size=256)
stop.set()
print(json.dumps({"seconds": time.time() - t0, "frames": plan.frames_total,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "ffmpeg_peak_rss_mb": peak["kids"] / 2**20}))
"""


def prepare_memory(lengths: list[float]) -> list[dict]:
    """Peak RSS of a job's prepare step (decode the speech, mel features, plan) for each speech
    length, each in a fresh process, the avatar prepared beforehand (so that only what depends on
    the speech is compared)."""
    import json
    import subprocess
    import sys

    from bench.common import bench_env

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=CACHE))
    rows = []
    try:
        for i, secs in enumerate([lengths[0], *lengths]):  # the first run prepares the avatar
            inp = make_inputs(secs, SIZE, TEMPLATE_SECONDS)
            out = subprocess.run([sys.executable, "-c", PREPARE_CHILD, inp.audio, inp.video, str(work / "storage"),
                                  f"job{i}"], env={**__import__("os").environ, **bench_env(str(work / "storage"))},
                                 capture_output=True, text=True, timeout=3600, check=True)
            if i:
                rows.append({"speech_s": secs, **json.loads(out.stdout.strip().splitlines()[-1])})
                print(f"[prepare] {secs:g} s of speech: {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":  # python -m bench.long --prepare 300 3600
    import argparse

    ap = argparse.ArgumentParser(description="peak memory of the prepare step against the speech's length")
    ap.add_argument("--prepare", type=float, nargs="+", required=True, metavar="SECONDS")
    prepare_memory(ap.parse_args().prepare)
