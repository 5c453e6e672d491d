"""A cluster without a shared filesystem, run in its own process by tests/test_multinode.py.

A head node (`ray start --head`, token authentication as Ray 2.60 sets it up, no CPUs for
actors) and two worker nodes (`ray start --address`, 2 CPUs and one logical GPU each), each inside
`unshare --mount` with an empty tmpfs over the storage root and over the client's input folder,
so they cannot see the head's files. The client joins with RAY_ADDRESS and RAY_AUTH_TOKEN only
(it turns token mode on itself), uploads its inputs through Ray, one worker node is killed
mid-job, and the output fetched back must equal a one-process render frame for frame.
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
from tests.helpers import decode_all, wait_until

SETTINGS = dict(model_workers=2, compositors=2, chunk_seconds=1.0, batch_size=8, batch_timeout_s=10.0,
                stall_timeout_s=60.0, max_chunk_attempts=2, actor_call_timeout_s=30.0)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_ports(head: bool) -> list[str]:
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    if head:
        names += ["--ray-client-server-port"]
    ports = free_ports(len(names) + 1)
    worker_lo = ports[-1]
    return [f"{n}={p}" for n, p in zip(names, ports)] + [f"--min-worker-port={worker_lo}",
                                                          f"--max-worker-port={worker_lo + 60}"]


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
    out = Path(out_dir)
    storage, inputs = out / "storage", out / "client-inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    audio = str(shutil.copy(audio, inputs / "speech.wav"))
    video = str(shutil.copy(video, inputs / "template.mp4"))
    reason = mount_namespaces_work(out / "probe")
    if reason:
        print(json.dumps({"skip": reason}))
        return
    settings = Settings(storage_root=storage, **SETTINGS)
    t0 = time.monotonic()
    reference = decode_all(str(render_local(RenderRequest(audio=audio, video=video, output=str(out / "ref.mp4")),
                                            settings.model_copy(update={"storage_root": out / "ref-storage"})).path))
    token = secrets.token_hex(24)
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="rt")
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
               "--include-dashboard=false", *ray_ports(True), *common], "head")
        address = f"127.0.0.1:{gcs_port}"
        wait_until(lambda: _port_open(gcs_port), 60, interval=0.5, what="the head's GCS port")
        isolate = (f"mount -t tmpfs tmpfs '{storage}' && mount -t tmpfs tmpfs '{inputs}' && "
                   f"test -z \"$(ls -A '{storage}')\" && exec \"$@\"")
        workers = [start(["unshare", "--mount", "--propagation", "private", "sh", "-c", isolate, "sh",
                          "ray", "start", f"--address={address}", "--num-cpus=2", "--num-gpus=1",
                          f"--resources={json.dumps({f'isolated_node_{i}': 1})}", *ray_ports(False), *common],
                         f"worker{i}") for i in range(2)]

        # The client: RAY_ADDRESS and the token only; it enables token mode itself.
        os.environ.update({"RAY_ADDRESS": address, "RAY_AUTH_TOKEN": token})
        os.environ.pop("RAY_AUTH_MODE", None)
        import ray

        from actors.runtime import Runtime, connect

        connect(settings)
        wait_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 3, 90, interval=0.5,
                   what="three live nodes")
        rt = Runtime(settings)
        state = rt.ready(timeout=240)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        head_id = next(i for i, n in nodes.items() if "node:__internal_head__" in n["Resources"])
        placement = {m["name"]: m.get("node") for m in state["models"] + state["compositors"]}
        job = rt.submit(RenderRequest(audio=audio, video=video, output=str(out / "out.mp4")))
        wait_until(lambda: (lambda st: st.state == JobState.rendering and st.chunks_done >= 1 or st.state.terminal)(
            rt.status(job.id)), 240, what="a first chunk")
        state_at_kill = rt.status(job.id).state.value
        # Kill the worker node (its whole process group: raylet, workers) that hosts the most actors.
        by_pid = {w: next(i for i, n in nodes.items() if f"isolated_node_{k}" in n["Resources"])
                  for k, w in enumerate(workers)}
        victim = max(workers, key=lambda w: sum(1 for v in placement.values() if v == by_pid[w]))
        os.killpg(victim.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        st = rt.wait(job.id, timeout=400)
        fetched = out / "fetched.mp4"
        if st.state == JobState.succeeded:
            rt.download_output(job.id, fetched)
        survivors = rt.call("refresh")["compositors"]
        result = {
            "state": st.state.value, "error": st.error.model_dump() if st.error else None,
            "state_at_kill": state_at_kill, "recovery_s": round(time.monotonic() - t_kill, 1),
            "actors_on_killed_node": sorted(k for k, v in placement.items() if v == by_pid[victim]),
            "actors_on_head": sorted(k for k, v in placement.items() if v == head_id),
            "cached_files": [c.get("cached_files") for c in survivors if c.get("health") == "live"],
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
        shutil.rmtree(temp_dir, ignore_errors=True)
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
