"""`python -m bench chaos [--quick]` (or `python -m bench.chaos`): the long chaos run of issue 12.

A Ray cluster of a head and three worker nodes (`ray.cluster_utils.Cluster`, all on this machine,
its own token) runs the job manager; a seeded stream of jobs is submitted while, at random times,
model workers, compositors, the job manager and whole worker nodes are killed (SIGKILL; a removed
node is not replaced; at least one worker node stays). Every job must end `succeeded` with frames identical to its
fault-free render, or `failed` naming the fault; none non-terminal; no stray output.

`--load N` keeps N more processes spinning on the CPUs for the whole run: the overloaded machine
under which faults interleave differently (restarts wait for CPUs, calls time out).

Writes bench/results/chaos.json (or chaos.quick.json) and prints the counts for
docs/RELIABILITY.md. Environment: LIPSYNC_CHAOS_SEED (default 12).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class BusyLoad:
    """`n` processes that each keep a CPU busy until stopped (or for at most `limit_s`)."""

    def __init__(self, n: int, limit_s: float = 3600.0) -> None:
        import multiprocessing as mp

        self.procs = [mp.get_context("spawn").Process(target=_spin, args=(limit_s,), daemon=True) for _ in range(n)]

    def __enter__(self) -> "BusyLoad":
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(timeout=10)


def run(quick: bool = False, seed: int | None = None, load: int = 0, **_) -> dict:
    with BusyLoad(load):
        return _run(quick, seed, load)


def _run(quick: bool, seed: int | None, load: int) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    from ray.cluster_utils import Cluster

    from actors.runtime import Runtime
    from cluster.config import Settings
    from cluster.render import render_local
    from cluster.schemas import RenderRequest
    from cluster.synth import astronaut_template, speech_like, write_audio
    from tests.chaos import JobSpec, RuntimeBackend, _decode_all, run_chaos

    seed = int(seed if seed is not None else os.environ.get("LIPSYNC_CHAOS_SEED", "12"))
    jobs, max_faults = (8, 6) if quick else (40, 30)
    work = Path(tempfile.mkdtemp(prefix="lipsync-chaos-"))
    settings = Settings(storage_root=work / "storage", chunk_seconds=1.0, batch_size=8, model_threads=1,
                        batch_timeout_s=15.0, stall_timeout_s=60.0, compositors=3)
    os.environ["LIPSYNC_STORAGE_ROOT"] = str(settings.storage_root)
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    video = astronaut_template(str(inputs / "template.mp4"), seconds=2.0, fps=25, size=(320, 240))
    audios = {f"a{k}": write_audio(str(inputs / f"speech{k}.wav"), speech_like(1.6 + 0.6 * k, seed=50 + k))
              for k in range(3)}
    references = {}
    for key, audio in audios.items():
        out = work / f"ref-{key}.mp4"
        render_local(RenderRequest(audio=audio, video=video, output=str(out)), settings)
        references[key] = _decode_all(str(out))

    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="rc")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "temp_dir": temp_dir,
                                                            "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(3)]
    ray.init(address=cluster.address, namespace=settings.namespace, log_to_driver=False)
    try:
        rt = Runtime(settings)
        rt.ready(timeout=300)

        def kill_worker_node() -> str | None:
            """Remove a worker node without grace (its raylet and workers die), as long as one stays.
            (Ray adds nodes only from the main thread: capacity comes back by the pool's reconcile
            onto the nodes left.)"""
            if len(nodes) <= 1:
                return None
            node = nodes.pop(0)
            cluster.remove_node(node, allow_graceful=False)
            return f"removed worker node {node.unique_id[:8]} without grace ({len(nodes)} left)"

        out_dir = work / "outputs"
        out_dir.mkdir()
        specs = [JobSpec(f"chaos{seed}-{i:03d}", audios[f"a{i % 3}"], video, f"a{i % 3}") for i in range(jobs)]
        t0 = time.monotonic()
        report = run_chaos(RuntimeBackend(rt, out_dir), specs, references, seed=seed,
                           kinds=["model_worker", "compositor", "job_manager", "worker_node"],
                           actions={"worker_node": kill_worker_node}, fault_gap_s=(2.0, 6.0),
                           settle_s=600, work_dir=work, submit_gap_s=(0.0, 2.0), max_faults=max_faults)
        result = {
            "benchmark": "chaos", "quick": quick, "seed": seed, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
            "machine": f"{platform.node()} {os.cpu_count()} cpus",
            "command": "python -m bench chaos" + (" --quick" if quick else "") + (f" --load {load}" if load else ""),
            "busy_processes": load, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "jobs": report.jobs, "faults": report.faults_by_kind(), "outcomes": report.states(),
            "identical": report.identical, "mismatched": report.mismatched,
            "unnamed_failures": report.unnamed_failures, "non_terminal": report.non_terminal,
            "stray_outputs": report.stray_outputs, "seconds": round(time.monotonic() - t0, 1),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"chaos{'.quick' if quick else ''}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        report.assert_promises()
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 jobs, 6 faults")
    p.add_argument("--seed", type=int)
    p.add_argument("--load", type=int, default=0, help="processes that keep a CPU busy for the whole run")
    args = p.parse_args(argv)
    run(quick=args.quick, seed=args.seed, load=args.load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
