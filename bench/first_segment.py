"""Benchmark 4: prepared avatar on a warm service, time from submit to the first finished segment.

A warm service (Ray, the job manager and its workers up, the model loaded) and an avatar prepared
by an earlier job; the job's status is polled every 20 ms from submit (admission included) until
its first chunk is reported done. Target: <= 1 s.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import CACHE, MODELS, make_inputs, md_table, model_spec, write_result


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None) -> dict:
    from bench.classic import WarmService
    from cluster.schemas import RenderRequest

    size, template_s = ((640, 360), 2.0) if quick else ((1280, 720), 10.0)
    models = models or (["builtin"] if quick else list(MODELS))
    repeats = 2 if quick else 3
    inp = make_inputs((seconds or [10.0])[0], size, template_s)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-first-", dir=CACHE))
    results: dict = {"size": f"{size[0]}x{size[1]}", "speech_s": inp.seconds, "models": {}}
    service = WarmService(work / "warm")
    try:
        for m in models:
            spec = model_spec(m)
            service.render(inp.audio, inp.video, spec, str(work / "prepare.mp4"))  # avatar + model ready
            firsts, totals = [], []
            for i in range(repeats):
                t0 = time.perf_counter()
                st = service.rt.submit(RenderRequest(audio=inp.audio, video=inp.video, model=spec,
                                                     output=str(work / f"{m}{i}.mp4")))
                first = None
                while True:
                    x = service.rt.status(st.id)
                    if first is None and (x.chunks_done >= 1 or x.state.value == "succeeded"):
                        first = time.perf_counter() - t0
                    if x.state.terminal:
                        break
                    time.sleep(0.02)
                if x.state.value != "succeeded":
                    raise RuntimeError(f"job {st.id} ended {x.state.value}: {x.error}")
                firsts.append(first)
                totals.append(time.perf_counter() - t0)
            results["models"][m] = {"first_segment_s": firsts, "median_first_segment_s": statistics.median(firsts),
                                    "total_s": totals}
            print(f"[first_segment] {m}: {results['models'][m]}", flush=True)
    finally:
        service.close()
        shutil.rmtree(work, ignore_errors=True)
    rows = [[m, r["median_first_segment_s"], min(r["first_segment_s"]), max(r["first_segment_s"]),
             "met" if r["median_first_segment_s"] <= 1.0 else "NOT met", statistics.median(r["total_s"])]
            for m, r in results["models"].items()]
    table = md_table(["model", "median s to first segment", "min", "max", "target <= 1 s", "job total s (median)"],
                     rows)
    notes = (f"{results['speech_s']:g} s of speech, template {results['size']} prepared, {repeats} jobs per model "
             "one after another on a warm service.")
    write_result("first_segment", results, table, notes, quick=quick)
    return results
