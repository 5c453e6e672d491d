"""How much the job manager and the GCS keep after one job (issue 23: an hour-long job's memory).

A warm service (embedded Ray in this process), the avatar prepared and two warm-up jobs, then one
job of `--seconds` of speech on a 320x240 template with the built-in model; PSS of the job
manager and of the GCS before and after it, the job manager's `smaps_rollup` (anonymous vs
shared), and what `malloc_trim(0)` in the job manager gives back. Settings come from the
environment as usual (e.g. `LIPSYNC_BATCH_SIZE=4`, `LIPSYNC_CHUNK_SECONDS=1`,
`RAY_task_events_report_interval_ms=0`, `MALLOC_ARENA_MAX=2`), so runs differ in one thing.

    python -m bench.manager_growth --seconds 240
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def _pss_mib(root, needle: str) -> float:
    import psutil

    total = 0
    for p in root.children(recursive=True):
        try:
            if needle in " ".join(p.cmdline()):
                total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 2**20


def _rollup_mib(root, needle: str) -> dict:
    import psutil

    for p in root.children(recursive=True):
        try:
            if needle in " ".join(p.cmdline()):
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    return {ln.split(":")[0]: int(ln.split()[1]) // 1024 for ln in f
                            if ln.startswith(("Pss_Anon", "Pss_Shmem", "Pss_File"))}
        except (psutil.Error, OSError):
            continue
    return {}


def _trim(self) -> int:  # runs inside the job manager (__ray_call__)
    import ctypes
    import gc

    gc.collect()
    return ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: list[str] | None = None) -> int:
    import psutil
    import ray

    from actors import ORCHESTRATOR_NAME
    from bench.classic import WarmService
    from bench.common import CACHE, make_inputs
    from cluster.schemas import RenderRequest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0)
    a = ap.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-growth-", dir=CACHE))
    me = psutil.Process()
    service = None
    try:
        inp = make_inputs(a.seconds, (320, 240), 4.0)
        warm = make_inputs(2.0, (320, 240), 4.0)
        service = WarmService(work / "storage")
        for k in range(3):  # avatar prepared, model loaded, both processes past their first jobs
            service.render(warm.audio, inp.video, "builtin", str(work / f"warm-{k}.mp4"))
        time.sleep(2)
        before = {"job_manager": _pss_mib(me, "JobManager"), "gcs": _pss_mib(me, "gcs_server"),
                  "job_manager_smaps": _rollup_mib(me, "JobManager")}
        status = service.rt.render(RenderRequest(audio=inp.audio, video=inp.video, output=str(work / "out.mp4"),
                                                 model="builtin"), timeout=4 * 3600)
        time.sleep(2)
        after = {"job_manager": _pss_mib(me, "JobManager"), "gcs": _pss_mib(me, "gcs_server"),
                 "job_manager_smaps": _rollup_mib(me, "JobManager")}
        manager = ray.get_actor(ORCHESTRATOR_NAME, namespace=service.settings.namespace)
        ray.get(manager.__ray_call__.remote(_trim), timeout=60)
        time.sleep(1)
        trimmed = _pss_mib(me, "JobManager")
        out = {"state": status.state.value, "speech_s": a.seconds, "frames": status.frames_total,
               "before_mib": before, "after_mib": after, "job_manager_after_malloc_trim_mib": trimmed,
               "job_manager_growth_kib_per_speech_s": round(1024 * (after["job_manager"] - before["job_manager"])
                                                            / a.seconds, 1),
               "gcs_growth_mib": round(after["gcs"] - before["gcs"], 1)}
        print(json.dumps(out, indent=1, default=str))
    finally:
        if service is not None:
            service.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
