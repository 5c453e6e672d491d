"""The node of the only model worker is lost while jobs render, and the compositors left hold every
CPU, run in its own process by tests/test_multinode.py.

`ray.cluster_utils.Cluster`: a head without CPUs (the job manager needs none) and two nodes of 2 CPUs:
the model worker and a compositor on one of them (A), two compositors on the other (B). Two jobs
render; node A is removed without grace. B's CPUs are held by compositors whose chunks wait for a model worker
that has no CPU to start on: one of them must go (its chunk is dispatched again) so that the model
worker starts on B, and both jobs must end succeeded with the fault-free frames (they failed with
`render.worker_lost` at their stall timeout). Prints one JSON line with the findings.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from ray.cluster_utils import Cluster

from actors.runtime import Runtime
from cluster.config import Settings
from cluster.render import render_local
from cluster.schemas import JobState, RenderRequest
from tests.helpers import decode_all, driving, one_x264_thread
from tests.shrink_scenario import FAST_NODE_DEATH, POLL_S, _pool


def _pool_is(rt: Runtime, models: int, compositors: int, timeout: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pool = _pool(rt)
        if len(pool["models"]) == models and len(pool["compositors"]) == compositors and \
                all(h == "live" for k in pool for _, h in pool[k]):
            return True
        time.sleep(POLL_S)
    return False


def main(audio: str, video: str, out_dir: str) -> None:
    one_x264_thread()  # the reference below encodes as the compositors do (tests.helpers)
    settings = Settings(chunk_seconds=1.0, batch_size=8, batch_timeout_s=10.0, stall_timeout_s=24.0,
                        pool_reconcile_s=1.0, max_chunk_attempts=3, model="latency:25")
    reference = decode_all(str(render_local(RenderRequest(audio=audio, video=video, output=f"{out_dir}/ref.mp4"),
                                            settings).path))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": FAST_NODE_DEATH})
    result: dict = {}
    with driving(cluster, settings.namespace):
        nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes(timeout=120)
        rt = Runtime(settings)
        result["pool_started"] = _pool_is(rt, 1, 3, 180)  # 1 model worker + 3 compositors on the 4 CPUs
        worker_node = next(m["node"] for m in rt.call("workers")["models"])
        node_a = next(n for n in nodes if n.node_id == worker_node)  # the model worker and one compositor
        jobs = [rt.submit(RenderRequest(audio=audio, video=video, output=f"{out_dir}/out{i}.mp4")) for i in range(2)]
        t0 = time.monotonic()
        while rt.status(jobs[0].id).state != JobState.rendering and time.monotonic() - t0 < 120:
            time.sleep(0.1)
        result["state_at_removal"] = rt.status(jobs[0].id).state.value
        t_kill = time.monotonic()
        cluster.remove_node(node_a, allow_graceful=False)
        ends = [rt.wait(job.id, timeout=300) for job in jobs]
        result["seconds_after_removal"] = round(time.monotonic() - t_kill, 1)
        result["states"] = [st.state.value for st in ends]
        result["errors"] = [st.error.model_dump() if st.error else None for st in ends]
        result["identical"] = [bool(st.state == JobState.succeeded and np.array_equal(decode_all(st.output), reference))
                               for st in ends]
        result["pool_end"] = _pool(rt)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
