"""A client of the local KubeRay-layout cluster of tests/test_deploy_local.py (run as
`python -m tests.deploy_driver AUDIO VIDEO FACELESS_VIDEO`, with RAY_ADDRESS and RAY_AUTH_TOKEN
set): it joins through RAY_ADDRESS as a batch client does, renders a job during which it kills the
only compositor for good (so chunks are re-dispatched and the actor replaced), then submits a
template without a face (a job that fails). Prints one JSON line with both outcomes."""
from __future__ import annotations

import json
import os
import sys
import time

import ray

from actors.runtime import Runtime, connect
from cluster.config import Settings
from cluster.schemas import RenderRequest


@ray.remote(num_cpus=0)
def _module_path() -> list[str]:
    return sys.path


def main(audio: str, video: str, faceless: str) -> dict:
    settings = Settings()
    connect(settings)
    # Ray puts its driver's working directory on its workers' module path: this one's must not be
    driver_dir_on_worker_path = os.getcwd() in ray.get(_module_path.remote(), timeout=120)
    runtime = Runtime(settings)
    runtime.ready(timeout=180)
    job = runtime.submit(RenderRequest(audio=audio, video=video))
    deadline = time.monotonic() + 180
    while True:  # kill the compositor once the job renders
        status = runtime.status(job.id)
        if status.state.value == "rendering" or status.state.terminal or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    state_at_kill = status.state.value
    ray.kill(ray.get_actor("lipsync-compositor-0", namespace=settings.namespace), no_restart=True)
    done = runtime.wait(job.id, timeout=240)
    bad = runtime.submit(RenderRequest(audio=audio, video=faceless))
    failed = runtime.wait(bad.id, timeout=120)
    return {"id": job.id, "bad_id": bad.id, "state_at_kill": state_at_kill, "state": done.state.value,
            "error": done.error.model_dump() if done.error else None,
            "frames": done.frames_total, "bad_state": failed.state.value,
            "bad_code": failed.error.code if failed.error else None,
            "driver_dir_on_worker_path": driver_dir_on_worker_path}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
