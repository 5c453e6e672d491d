"""Multi-node fault scenario, run in its own process by tests/test_multinode.py.

A head node plus two worker nodes (each with one logical GPU) from `ray.cluster_utils.Cluster`;
a job is started, one worker node is removed mid-job, and the job must complete on the rest
with the same frames as a fault-free in-process render. Prints one JSON line with the findings.
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
from tests.helpers import decode_all, driving, one_x264_thread, wait_until


def main(audio: str, video: str, out_dir: str) -> None:
    one_x264_thread()  # the reference below encodes as the compositors do (tests.helpers)
    settings = Settings(model_workers=2, compositors=3, chunk_seconds=1.0, batch_size=8, batch_timeout_s=10.0,
                        stall_timeout_s=60.0, max_chunk_attempts=2)
    reference = decode_all(str(render_local(RenderRequest(audio=audio, video=video, output=f"{out_dir}/ref.mp4"),
                                            settings).path))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=3, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes(timeout=120)
    with driving(cluster, settings.namespace):
        rt = Runtime(settings)
        state = rt.ready(timeout=240)
        placement = {m["name"]: m.get("node") for m in state["models"] + state["compositors"]}
        job = rt.submit(RenderRequest(audio=audio, video=video, output=f"{out_dir}/out.mp4"))
        wait_until(lambda: (lambda st: st.state == JobState.rendering and st.frames_done > 0 or st.state.terminal)(
            rt.status(job.id)), 180, what="rendering")
        # Remove the worker node that hosts the most of our actors.
        victim = max(nodes, key=lambda n: sum(1 for v in placement.values() if v == n.node_id))
        state_at_removal = rt.status(job.id).state.value
        t0 = time.monotonic()
        cluster.remove_node(victim)
        st = rt.wait(job.id, timeout=400)
        result = {
            "state": st.state.value, "error": st.error.model_dump() if st.error else None,
            "state_at_removal": state_at_removal, "recovery_s": round(time.monotonic() - t0, 1),
            "actors_on_removed_node": sorted(k for k, v in placement.items() if v == victim.node_id),
            "identical": bool(st.state == JobState.succeeded
                              and np.array_equal(decode_all(st.output), reference)),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
