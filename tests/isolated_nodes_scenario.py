"""A cluster without a shared filesystem, run in its own process by tests/test_multinode.py.

A head node (`ray start --head`, token authentication as Ray 2.60 sets it up, no CPUs for
actors) and worker nodes (`ray start --address`, 2 CPUs and one logical GPU each), each inside
`unshare --mount` with an empty tmpfs over the storage root and over the client's input folder,
so they cannot see the head's files. The client joins with RAY_ADDRESS and RAY_AUTH_TOKEN only
(it turns token mode on itself) and uploads its inputs through Ray. The job starts on the first
worker node; a second node joins mid-job and must get a model worker that takes batches of that
job (the pool follows the cluster); then the first node is SIGKILLed, and the output fetched back
must equal a one-process render frame for frame.
Prints one JSON line with the findings. Every process it starts is in a process group it kills.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.config import Settings
from cluster.render import render_local
from cluster.schemas import JobState, RenderRequest
from tests.helpers import decode_all, one_x264_thread, wait_until

# Pool sizes unset: they follow the cluster (one model worker per GPU, compositors on the CPUs left).
# The model answers like a remote accelerator (150 ms per frame, slept; crops returned unchanged),
# so the job lasts long enough for a node to join mid-job however fast this machine renders.
MODEL = "latency:150"
SETTINGS = dict(model=MODEL, chunk_seconds=0.5, batch_size=4, batch_timeout_s=10.0, stall_timeout_s=60.0,
                max_chunk_attempts=2,
                actor_call_timeout_s=30.0, max_inflight_per_worker=1, pool_reconcile_s=1.0)
#: The GCS declares a node dead after this many failed health checks this far apart (Ray's
#: defaults, 5 x 3 s, kept the killed node's actors "alive" about 15 s); a check still times out
#: only after Ray's 10 s.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
#: The line (on stderr) that names the scenario's Ray temp dir
TEMP_DIR_LINE = "scenario ray temp dir: "


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_ports(head: bool) -> list[str]:
    """Free ports for what Ray would otherwise put on fixed defaults (other Ray clusters run on
    this machine); the rest Ray picks at random."""
    names = ["--dashboard-agent-listen-port"] + (["--ray-client-server-port"] if head else [])
    return [f"{n}={p}" for n, p in zip(names, free_ports(len(names)))]


def mount_namespaces_work(probe_dir: Path) -> str | None:
    """None when `unshare --mount` with a tmpfs is permitted here, else the reason it is not."""
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs tmpfs '{probe_dir}' && touch '{probe_dir}/x'"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or (probe_dir / "x").exists():
        return f"mount namespaces are not permitted here: {proc.stderr.strip()[:300]}"
    return None


def main(audio: str, video: str, out_dir: str) -> None:
    one_x264_thread()  # the reference below encodes as the compositors do (tests.helpers)
    out = Path(out_dir)
    storage, inputs = out / "storage", out / "client-inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    storage.mkdir(parents=True, exist_ok=True)
    from cluster.synth import speech_like, write_audio

    audio = write_audio(str(inputs / "speech.wav"), speech_like(8.0, seed=8))  # 200 frames: time for a node to join
    video = str(shutil.copy(video, inputs / "template.mp4"))
    reason = mount_namespaces_work(out / "probe")
    if reason:
        print(json.dumps({"skip": reason}))
        return
    settings = Settings(storage_root=storage, **SETTINGS)
    t0 = time.monotonic()
    # The same identity model without the sleep gives the same frames, without the wait.
    reference = decode_all(str(render_local(RenderRequest(audio=audio, video=video, output=str(out / "ref.mp4")),
                                            settings.model_copy(update={"storage_root": out / "ref-storage",
                                                                        "model": "latency:0"})).path))
    token = secrets.token_hex(24)
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="rt")
    # told first: a driver that Ray aborts (e.g. "Failed to connect to GCS") runs no `finally`, and the
    # test then reads the nodes' logs from here and stops what is left of them
    print(f"{TEMP_DIR_LINE}{temp_dir}", file=sys.stderr, flush=True)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    node_env = {**base_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "LIPSYNC_STORAGE_ROOT": str(storage),
                "OMP_NUM_THREADS": "1"}
    gcs_port = free_ports(1)[0]
    common = ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
              "--object-store-memory=150000000"]
    groups: list[subprocess.Popen] = []
    logs = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        log = open(out / f"{name}.log", "w")
        logs.append(log)
        proc = subprocess.Popen(args, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        groups.append(proc)
        return proc

    result: dict = {}
    try:
        start(["ray", "start", "--head", f"--port={gcs_port}", "--num-cpus=0", "--num-gpus=0",
               "--include-dashboard=false", f"--system-config={json.dumps(FAST_NODE_DEATH)}", *ray_ports(True),
               *common], "head")
        address = f"127.0.0.1:{gcs_port}"
        wait_until(lambda: _port_open(gcs_port), 60, interval=0.5, what="the head's GCS port")
        # The client: RAY_ADDRESS and the token only; it enables token mode itself.
        os.environ.update({"RAY_ADDRESS": address, "RAY_AUTH_TOKEN": token})
        os.environ.pop("RAY_AUTH_MODE", None)
        import ray

        from actors.runtime import Runtime, connect

        connect(settings)
        isolate = (f"mount -t tmpfs tmpfs '{storage}' && mount -t tmpfs tmpfs '{inputs}' && "
                   f"test -z \"$(ls -A '{storage}')\" && exec \"$@\"")

        def add_node(i: int) -> subprocess.Popen:
            proc = start(["unshare", "--mount", "--propagation", "private", "sh", "-c", isolate, "sh",
                          "ray", "start", f"--address={address}", "--num-cpus=2", "--num-gpus=1",
                          f"--resources={json.dumps({f'isolated_node_{i}': 1})}", *ray_ports(False), *common],
                         f"worker{i}")
            wait_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == i + 2, 120, interval=0.5,
                       what=f"worker node {i} to join")
            return proc

        def node_id(i: int) -> str:
            return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and f"isolated_node_{i}" in n["Resources"])

        first = add_node(0)
        rt = Runtime(settings)
        rt.ready(timeout=240)
        head_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
        job = rt.submit(RenderRequest(audio=audio, video=video, output=str(out / "out.mp4")))
        add_node(1)  # mid-job: the pool must grow onto it
        joined = node_id(1)

        def new_worker_serving():
            st = rt.status(job.id)
            if st.state.terminal:
                return st
            return next((m for m in rt.call("refresh")["models"] if m.get("node") == joined and m.get("frames")), None)
        served = wait_until(new_worker_serving, 180, interval=0.5, what="a model worker on the new node to serve")
        state_at_kill = rt.status(job.id).state.value
        placement = {m["name"]: m.get("node") for k in ("models", "compositors") for m in rt.call("refresh")[k]}
        victim = node_id(0)
        os.killpg(first.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        st = rt.wait(job.id, timeout=400)
        fetched = out / "fetched.mp4"
        if st.state == JobState.succeeded:
            rt.download_output(job.id, fetched)
        after = rt.call("refresh")
        # A model file that exists only under the head's storage root: a worker on an isolated node
        # loads it by fetching it through Ray (it cannot see the path).
        from cluster.models import resolve_model_path

        user_model = storage / "models" / "user-96.onnx"
        shutil.copy(resolve_model_path("builtin:96", settings), user_model)
        remote = next((m for m in after["models"] if m.get("node") == joined and m.get("health") == "live"), None)
        model_file_loaded = None
        if remote is not None:
            worker = ray.get_actor(remote["name"], namespace=settings.namespace)
            model_file_loaded = ray.get(worker.describe.remote(str(user_model)), timeout=120)["size"]
        result = {
            "model_file_loaded_on_isolated_node": model_file_loaded,
            "state": st.state.value, "error": st.error.model_dump() if st.error else None,
            "state_at_kill": state_at_kill, "recovery_s": round(time.monotonic() - t_kill, 1),
            "new_node_worker": {k: served.get(k) for k in ("name", "frames")} if isinstance(served, dict) else None,
            "actors_on_killed_node": sorted(k for k, v in placement.items() if v == victim),
            "actors_on_head": sorted(k for k, v in placement.items() if v == head_id),
            "manager_on_head": after["manager"]["node"] == head_id,
            "cached_files": [c.get("cached_files") for c in after["compositors"] if c.get("health") == "live"],
            "client_path_untouched": not (out / "out.mp4").exists(),
            "identical": bool(st.state == JobState.succeeded and np.array_equal(decode_all(str(fetched)), reference)),
            "seconds": round(time.monotonic() - t0, 1),
        }
        ray.shutdown()
    finally:
        for proc in reversed(groups):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        _kill_strays(temp_dir)
        for log in logs:
            log.close()
        if result.get("state") == "succeeded":
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            result["ray_temp_dir"] = temp_dir
    print(json.dumps(result))


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _kill_strays(temp_dir: str) -> None:
    """Processes of this scenario's nodes that left their group (Ray may start some in their own
    session): found by the unique temp dir on their command line, killed by pid."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


if __name__ == "__main__":
    main(*sys.argv[1:4])
