"""A cluster that grows into the pool's settings and then shrinks below them, run in its own
process by tests/test_multinode.py.

`ray.cluster_utils.Cluster` with 3 compositors asked for. First the head alone (1 CPU): the job
manager cannot place its pool, and a submit is refused at once with `cluster.unplaceable`. Two
worker nodes join (2 CPUs and one logical GPU each): the pool starts by itself, 2 model workers
and 3 compositors on the 5 CPUs there are. One worker node is removed without grace: 3 CPUs and
1 GPU are left, room for 1 model worker and 2 compositors. The pool must shrink to that, with no
member of ours left waiting for resources in Ray (a waiting compositor takes the CPU of a model
worker that restarts, and the pool is left without a model worker). Then the job manager is
SIGKILLed (its restart re-attaches to the pool, on a cluster smaller than its settings), and the
live model worker too; a job then renders the same frames as a fault-free in-process render.
Prints one JSON line with the findings.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
from ray.cluster_utils import Cluster

from actors.runtime import Runtime
from cluster.config import Settings
from cluster.errors import LipsyncError
from cluster.render import render_local
from cluster.schemas import JobState, RenderRequest
from tests.helpers import decode_all, driving, one_x264_thread

WAITING = {"PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY"}
#: The GCS declares a node dead after this many failed health checks this far apart (Ray's
#: defaults, 5 x 3 s, made every removal here wait about 15 s before the pool could react);
#: a check still times out only after Ray's 10 s.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
POLL_S = 0.5


def _ours_waiting(namespace: str) -> list[str]:
    """Names of this deployment's actors that Ray has not placed (waiting for resources)."""
    from ray._private.state import actors  # the GCS's own table; the state API needs a dashboard

    return sorted(a.get("Name") for a in actors().values()
                  if a.get("State") in WAITING and (a.get("Name") or "").startswith("lipsync-")
                  and a.get("RayNamespace", namespace) == namespace)


def _pool(rt: Runtime) -> dict:
    w = rt.call("refresh", 10.0, timeout=30)
    return {kind: sorted((m["name"], m["health"]) for m in w[kind]) for kind in ("models", "compositors")}


def _converge(rt: Runtime, settings: Settings, want: dict, timeout: float = 120.0) -> float | None:
    """Seconds until the pool is exactly `want`, all live, nothing of ours waiting in Ray; None
    when that does not happen within `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pool = _pool(rt)
        if (all(len(pool[k]) == n and all(h == "live" for _, h in pool[k]) for k, n in want.items())
                and not _ours_waiting(settings.namespace)):
            return round(time.monotonic() - t0, 1)
        time.sleep(POLL_S)
    return None


def main(audio: str, video: str, out_dir: str) -> None:
    one_x264_thread()  # the reference below encodes as the compositors do (tests.helpers)
    start = time.monotonic()
    timeline: dict = {}

    def mark(what: str) -> None:  # seconds since the start at the end of each phase (where the minute goes)
        timeline[what] = round(time.monotonic() - start, 1)

    settings = Settings(compositors=3, chunk_seconds=1.0, batch_size=8, batch_timeout_s=10.0,
                        stall_timeout_s=24.0, pool_reconcile_s=1.0, max_chunk_attempts=3)
    reference = decode_all(str(render_local(RenderRequest(audio=audio, video=video, output=f"{out_dir}/ref.mp4"),
                                            settings).path))
    mark("reference")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "_system_config": FAST_NODE_DEATH})
    result: dict = {}
    with driving(cluster, settings.namespace):
        rt = Runtime(settings)
        t0 = time.monotonic()
        try:
            rt.submit(RenderRequest(audio=audio, video=video, output=f"{out_dir}/refused.mp4"))
            result["refused"] = None
        except LipsyncError as e:
            result["refused"] = {"code": e.code, "message": e.message, "s": round(time.monotonic() - t0, 1)}
        mark("refused")
        nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes(timeout=120)
        mark("nodes_added")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 180:  # the pool starts by itself once the cluster holds it
            pool = _pool(rt)
            if len(pool["models"]) == 2 and all(h == "live" for k in pool for _, h in pool[k]):
                break
            time.sleep(POLL_S)
        result["pool_before"] = _pool(rt)
        mark("pool_started")
        cluster.remove_node(nodes[0], allow_graceful=False)
        want = {"models": 1, "compositors": 2}
        converged = _converge(rt, settings, want)
        result.update(pool_after=_pool(rt), waiting_after=_ours_waiting(settings.namespace), converged_s=converged)
        mark("shrunk")
        # The job manager restarts on a cluster smaller than its settings: it re-attaches.
        os.kill(rt.call("workers")["manager"]["pid"], signal.SIGKILL)
        time.sleep(1)
        # A model worker that dies now must get its CPU back (nothing of ours waits to take it).
        worker, t0 = None, time.monotonic()
        while worker is None and time.monotonic() - t0 < 120:
            worker = next((m for m in rt.call("workers", timeout=120)["models"] if m["health"] == "live"), None)
            time.sleep(0.5)
        result["manager_restart_live_s"] = round(time.monotonic() - t0, 1)
        mark("manager_restarted")
        os.kill(worker["pid"], signal.SIGKILL)
        job = rt.submit(RenderRequest(audio=audio, video=video, output=f"{out_dir}/out.mp4"))
        st = rt.wait(job.id, timeout=300)
        mark("job_done")
        result.update(
            killed=worker["name"], state=st.state.value, error=st.error.model_dump() if st.error else None,
            identical=bool(st.state == JobState.succeeded and np.array_equal(decode_all(st.output), reference)),
            reconverged_s=_converge(rt, settings, want), pool_end=_pool(rt),
            waiting_end=_ours_waiting(settings.namespace))
        mark("reconverged")
    mark("shut_down")
    result["timeline"] = timeline
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
