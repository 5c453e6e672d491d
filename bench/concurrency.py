"""Benchmark 5: 8 jobs at once against the same 8 jobs one after another, on a warm service.

Same template (prepared avatar) and speech for every job. Reports both wall times and their
ratio (> 1: running them together finishes sooner), and each job's latency when run at once.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import CACHE, make_inputs, md_table, model_spec, write_result

JOBS = 8


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None) -> dict:
    from bench.classic import WarmService
    from cluster.schemas import RenderRequest

    size, template_s = ((320, 240), 2.0) if quick else ((640, 360), 4.0)
    secs = (seconds or [2.0 if quick else 4.0])[0]
    models = models or ["builtin"]
    inp = make_inputs(secs, size, template_s)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-conc-", dir=CACHE))
    results: dict = {"size": f"{size[0]}x{size[1]}", "speech_s": secs, "jobs": JOBS, "models": {}}
    service = WarmService(work / "warm")
    try:
        for m in models:
            spec = model_spec(m)

            def req(name: str, spec=spec) -> RenderRequest:
                return RenderRequest(audio=inp.audio, video=inp.video, model=spec, output=str(work / f"{name}.mp4"))

            service.render(inp.audio, inp.video, spec, str(work / "prepare.mp4"))  # avatar + model ready
            t0 = time.perf_counter()
            for i in range(JOBS):
                st = service.rt.render(req(f"seq{i}"), timeout=3600)
                assert st.state.value == "succeeded", st.error
            sequential = time.perf_counter() - t0

            t0 = time.perf_counter()
            ids = [service.rt.submit(req(f"par{i}")).id for i in range(JOBS)]
            latency = {}
            while len(latency) < JOBS:
                for j in ids:
                    if j not in latency:
                        x = service.rt.status(j)
                        if x.state.terminal:
                            assert x.state.value == "succeeded", x.error
                            latency[j] = time.perf_counter() - t0
                time.sleep(0.1)
            together = time.perf_counter() - t0
            results["models"][m] = {"sequential_s": sequential, "together_s": together,
                                    "speedup": sequential / together,
                                    "latency_together_s": sorted(latency.values())}
            print(f"[concurrency] {m}: {results['models'][m]}", flush=True)
    finally:
        service.close()
        shutil.rmtree(work, ignore_errors=True)
    rows = [[m, r["sequential_s"], r["together_s"], f"{r['speedup']:.2f}x", min(r["latency_together_s"]),
             statistics.median(r["latency_together_s"]), max(r["latency_together_s"])]
            for m, r in results["models"].items()]
    table = md_table(["model", "8 one after another s", "8 at once s", "at once vs one after another",
                      "first job done s", "median job s", "last job s"], rows)
    notes = f"{JOBS} jobs of {secs:g} s speech each, template {results['size']} prepared, warm service."
    write_result("concurrency", results, table, notes, quick=quick)
    return results
