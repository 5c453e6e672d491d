"""`python -m bench soak [--quick]` (or `python -m bench.soak`): the long soak of issue 12.

A real `lipsync serve` on a loopback port (its own Ray, token and storage, queue bound 4) takes
short jobs in bursts from 8 SDK client threads (300 jobs; --quick: 50 from 5): every job must
succeed exactly once (jobs with the same inputs give byte-identical outputs), 429s are absorbed
by the SDK's retries, and the service's memory (its whole process tree) is reported at start,
peak and end. Writes bench/results/soak.json (or soak.quick.json).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def run(quick: bool = False, **_) -> dict:
    from cluster.synth import astronaut_template, speech_like, write_audio
    from tests.service_process import ServiceProcess
    from tests.soak import run_soak

    jobs, threads = (50, 5) if quick else (300, 8)
    work = Path(tempfile.mkdtemp(prefix="lipsync-soak-"))
    svc = ServiceProcess(work, env={"LIPSYNC_MAX_QUEUED_JOBS": "4", "LIPSYNC_RETRY_AFTER_S": "1"}).start()
    try:
        root = svc.input_root
        video = astronaut_template(str(root / "face.mp4"), seconds=0.6, fps=25, size=(192, 144))
        inputs = {f"a{k}": (write_audio(str(root / f"s{k}.wav"), speech_like(0.2 + 0.08 * k, seed=70 + k)), video)
                  for k in range(3)}
        out = work / "downloads"
        out.mkdir()
        report = run_soak(svc, inputs, jobs=jobs, threads=threads, burst=5, pause_s=0.5, prefix="soak",
                          work_dir=out, timeout_s=1800)
    finally:
        svc.cleanup()
    mib = 2 ** 20
    result = {
        "benchmark": "soak", "quick": quick, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "command": "python -m bench soak" + (" --quick" if quick else ""),
        "jobs": report.jobs, "threads": report.threads, "seconds": round(report.seconds, 1),
        "states": report.states, "http_statuses": report.statuses, "listed": report.listed,
        "distinct_outputs_per_inputs": report.distinct_outputs, "errors": report.errors[:20],
        "memory_mib": {"cold": round(report.rss_cold / mib), "start": round(report.rss_start / mib),
                       "peak": round(report.rss_peak / mib), "end": round(report.rss_end / mib)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"soak{'.quick' if quick else ''}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert not report.errors and report.states == {"succeeded": jobs}, report.summary()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="50 jobs from 5 threads")
    run(quick=p.parse_args(argv).quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
