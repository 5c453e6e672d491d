"""The k8s/ manifests run for real on a local Ray, laid out as on KubeRay.

A head started with the RayService's head `rayStartParams` (num-cpus 0, the `lipsync_head`
custom resource; ports, addresses and object store sized for this machine) and one worker node,
both on loopback with their own token (RAY_AUTH_MODE=token), in their own process group. On it:
- a client joins through RAY_ADDRESS, as on the batch RayCluster (tests/deploy_driver.py), renders
  a job while its only compositor is killed for good, and a job without a face; the Prometheus
  endpoints of both nodes then show every metric of actors/metrics.py, each one moved;
- `serve deploy` of exactly the RayService's serveConfigV2 (http_options added for a free
  loopback port: on KubeRay the pod's port and the Service stand in for them), then /healthz and
  one small job through the API.
Only the processes this module started are stopped (their process group), never `ray stop`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import wait_until
from tests.test_k8s import of_kind, render

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
SERVE = str(Path(sys.executable).parent / "serve")
JOB_SETTINGS = {"LIPSYNC_MODEL_WORKERS": "1", "LIPSYNC_COMPOSITORS": "1", "LIPSYNC_CHUNK_SECONDS": "1",
                "LIPSYNC_BATCH_SIZE": "8", "LIPSYNC_MODEL_THREADS": "1", "LIPSYNC_LOG_FORMAT": "json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head and one worker node started by `ray start --block`, each in a new session."""

    def __init__(self, head_params: dict, tmp: Path, storage: Path) -> None:
        self.tmp = tmp
        self.temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="rd")  # short: unix socket paths
        self.procs: list[subprocess.Popen] = []
        self.gcs_port, self.dashboard_port, self.http_port = free_port(), free_port(), free_port()
        self.metrics_ports: list[int] = []
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24),
                        PYTHONPATH=str(ROOT), LIPSYNC_STORAGE_ROOT=str(storage), RAY_USAGE_STATS_ENABLED="0",
                        **JOB_SETTINGS)
        # as the manifests set them on the pods
        self.env.update(LIPSYNC_MANAGER_RESOURCE="lipsync_head", LIPSYNC_API_TOKEN=secrets.token_hex(16))
        self.head_params = head_params

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _start(self, args: list[str], name: str) -> None:
        metrics_port = free_port()
        self.metrics_ports.append(metrics_port)
        args = [RAY, "start", "--block", "--disable-usage-stats", f"--metrics-export-port={metrics_port}",
                f"--dashboard-agent-listen-port={free_port()}", *args]
        log = open(self.tmp / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=self.tmp))

    def start(self) -> None:
        params = dict(self.head_params)
        # Kept from the manifest: num-cpus, resources. Local instead of the pod's: ports,
        # addresses, the object store (the pod's 1.8 GB is sized for its /dev/shm volume).
        for key in ("metrics-export-port", "dashboard-host", "object-store-memory"):
            params.pop(key)
        head_args = [f"--{k}={yaml.safe_load(v) if k == 'resources' else v}" for k, v in params.items()]
        self._start_node(["--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                          "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                          f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                          f"--temp-dir={self.temp_dir}", "--object-store-memory=150000000",
                          '--system-config={"metrics_report_interval_ms": 1000}', *head_args], "head")
        # A worker node like a KubeRay worker pod: 2 logical CPUs, a model worker and a compositor.
        self._start_node([f"--address={self.address}", "--num-cpus=2", "--object-store-memory=150000000"], "worker")

    def _start_node(self, args: list[str], name: str) -> None:
        """`ray start` a node until it runs, twice at most: Ray gives a raylet 30 s to register, which a
        loaded machine can miss once (the head's too)."""
        for attempt in range(2):
            self._start(args, name)
            try:
                wait_until(lambda: self._started(name), 120, 0.2, f"the Ray {name} node")
                return
            except AssertionError:
                if attempt:
                    raise
                self._kill(self.procs.pop())
                self.metrics_ports.pop()

    def _started(self, name: str) -> bool:
        """`ray start --block` has printed that its node runs (it has registered with the GCS)."""
        self.check_running()
        return "Ray runtime started" in (self.tmp / f"{name}.log").read_text()

    def check_running(self) -> None:
        for proc, name in zip(self.procs, ("head", "worker")):
            if proc.poll() is not None:
                raise AssertionError(f"ray start ({name}) exited {proc.returncode}: "
                                     f"{(self.tmp / f'{name}.log').read_text()[-3000:]}")

    def run(self, args: list[str], timeout: float, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env={**self.env, "RAY_ADDRESS": self.address, **env}, cwd=self.tmp,
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, (
                f"{args[:3]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def scrape(self) -> str:
        """Prometheus text of every node's metrics port."""
        texts = []
        for port in self.metrics_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                texts.append(response.read().decode())
        return "\n".join(texts)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """SIGKILL one `ray start` process group; nothing of it may be left behind."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        raise AssertionError(f"processes of group {proc.pid} survived SIGKILL")

    def stop(self) -> None:
        """Kill exactly the process groups this cluster started (raylets, GCS, workers, agents)."""
        for proc in reversed(self.procs):
            self._kill(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def service_manifest() -> dict:
    (service,) = of_kind(render("cpu"), "RayService")
    return service


@pytest.fixture(scope="module")
def local_cluster(service_manifest, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    head = service_manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    cluster = LocalCluster(head, tmp, tmp / "storage")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of every Prometheus series by name and the labels we care about."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ray_lipsync_"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)$", line)
        if not match:
            continue
        name, labels, value = match.groups()
        keep = dict(re.findall(r'\b(state|stage|result|code|le|part)="([^"]*)"', labels or ""))
        key = name + "".join(f"|{k}={v}" for k, v in sorted(keep.items()))
        out[key] = out.get(key, 0.0) + float(value)
    return out


@pytest.fixture(scope="module")
def faceless_video(tmp_path_factory) -> str:
    from cluster.config import Settings
    from cluster.media.ffmpeg import ffmpeg_binary

    path = tmp_path_factory.mktemp("faceless") / "flat.mp4"
    subprocess.run([ffmpeg_binary(Settings()), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi",
                    "-i", "color=c=0x808080:s=320x240:r=25:d=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(path)], check=True, timeout=60)
    return str(path)


def test_batch_client_through_ray_address_moves_every_metric(local_cluster, speech4_wav, astronaut_video,
                                                             faceless_video):
    """A client joins through RAY_ADDRESS (as on the batch RayCluster) and renders a job during
    which its only compositor is killed for good, then a job whose template has no face. Then
    every metric of actors/metrics.py is on the nodes' Prometheus endpoints, and each one moved."""
    from actors.metrics import JOB_STATES, METRICS, STAGES

    before = parse_metrics(local_cluster.scrape())
    proc = local_cluster.run([sys.executable, "-m", "tests.deploy_driver", speech4_wav, astronaut_video,
                              faceless_video], timeout=420, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state_at_kill"] == "rendering", result
    assert result["state"] == "succeeded", result
    assert (result["bad_state"], result["bad_code"]) == ("failed", "input.no_face"), result
    # a file where the client was started, named like a module of ours, would have run in the detached job
    # manager for its life (an import failure restarted it without end)
    assert result["driver_dir_on_worker_path"] is False, result

    def moved(after: dict, key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def counted(after: dict, prefix: str) -> float:
        def total(sample: dict) -> float:  # every series `prefix` (a name, and labels to match) covers
            return sum(v for k, v in sample.items() if k == prefix or k.startswith(prefix + "|"))
        return total(after) - total(before)

    def everything_moved():
        after = parse_metrics(local_cluster.scrape())
        names = {key.split("|")[0] for key in after}
        missing = [m.exported for m in METRICS.values() if not ({m.exported, m.exported + "_count"} & names)]
        done = (not missing and moved(after, "ray_lipsync_jobs|state=failed") >= 1
                and moved(after, "ray_lipsync_stage_seconds_count|stage=render") >= 1)
        return after if done else None
    after = wait_until(everything_moved, 30, 1.0, "every lipsync metric on the metrics endpoints")
    frames = moved(after, "ray_lipsync_frames_rendered_total")
    assert frames >= result["frames"] == 100, after  # 4 s at 25 fps; a re-rendered chunk adds more
    assert moved(after, "ray_lipsync_model_batch_seconds_count") >= frames / 8
    assert moved(after, "ray_lipsync_model_worker_busy_seconds_total") > 0
    assert moved(after, "ray_lipsync_object_store_bytes_per_frame_count") > 0
    chunk_s = moved(after, "ray_lipsync_compositor_seconds_total|part=chunk")
    assert chunk_s > 0 and 0 < moved(after, "ray_lipsync_compositor_seconds_total|part=model_wait") < chunk_s, after
    assert 0 <= moved(after, "ray_lipsync_compositor_seconds_total|part=encoder_wait") < chunk_s, after
    assert moved(after, "ray_lipsync_job_seconds_count|state=succeeded") == 1
    assert moved(after, "ray_lipsync_job_seconds_count|state=failed") == 1
    assert counted(after, "ray_lipsync_failures_total|code=input.no_face") == 1, after
    for stage in STAGES:
        assert moved(after, f"ray_lipsync_stage_seconds_count|stage={stage}") >= 1, stage
    assert moved(after, "ray_lipsync_avatar_cache_total|result=miss") >= 1
    assert counted(after, "ray_lipsync_redispatches_total") >= 1
    assert counted(after, "ray_lipsync_actor_replacements_total") >= 1
    assert {f"ray_lipsync_jobs|state={s}" for s in JOB_STATES} <= set(after)
    assert after["ray_lipsync_jobs|state=succeeded"] >= 1 and after["ray_lipsync_jobs|state=failed"] >= 1
    assert "ray_lipsync_queue_depth" in after
    check_structured_logs(local_cluster, result)


def check_structured_logs(cluster: LocalCluster, result: dict) -> None:
    """LIPSYNC_LOG_FORMAT=json: the actors' lines are JSON with the job id, the chunk, the actor
    and the node where they concern them; no token appears in any log file of the cluster."""
    lines, texts = [], []
    for path in Path(cluster.temp_dir).glob("session_*/logs/*"):
        if path.is_file() and path.suffix in (".err", ".out", ".log"):
            text = path.read_text(errors="replace")
            texts.append(text)
            lines += [json.loads(line) for line in text.splitlines() if line.startswith('{"ts"')]
    for secret in (cluster.env["RAY_AUTH_TOKEN"], cluster.env["LIPSYNC_API_TOKEN"]):
        assert not any(secret in text for text in texts), "a token was logged"
    ours = [line for line in lines if line.get("logger", "").startswith("lipsync")]
    assert ours and all(line.get("actor") and line.get("node") for line in ours), ours[:5]
    of_job = [line for line in ours if line.get("job_id") == result["id"]]
    assert any(line["msg"].startswith(f"job {result['id']} succeeded") for line in of_job), of_job[-5:]
    assert any("chunk" in line and line["actor"] == "lipsync-orchestrator" for line in of_job), of_job[-5:]
    assert any(line.get("job_id") == result["bad_id"] and "input.no_face" in line["msg"] for line in ours)


def test_serve_deploy_of_the_manifest_config(local_cluster, service_manifest, speech_wav, astronaut_video, tmp_path):
    config = yaml.safe_load(service_manifest["spec"]["serveConfigV2"])
    config["http_options"] = {"host": "127.0.0.1", "port": local_cluster.http_port}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    local_cluster.run([SERVE, "deploy", str(path), "--address", f"http://127.0.0.1:{local_cluster.dashboard_port}"],
                      timeout=120)
    base = f"http://127.0.0.1:{local_cluster.http_port}"

    def get(route: str) -> int:
        try:
            with urllib.request.urlopen(base + route, timeout=5) as response:
                return response.status
        except OSError:
            return 0
    wait_until(lambda: get("/healthz") == 200, 180, 1.0, "/healthz of the deployed app")
    import httpx

    before = parse_metrics(local_cluster.scrape())
    assert httpx.get(base + "/v1/jobs", timeout=30).status_code == 401  # the Secret's token is required
    token = {"Authorization": f"Bearer {local_cluster.env['LIPSYNC_API_TOKEN']}"}
    with open(speech_wav, "rb") as audio, open(astronaut_video, "rb") as video:
        response = httpx.post(base + "/v1/jobs", files={"audio": audio, "video": video}, headers=token, timeout=120)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def finished():
        body = httpx.get(f"{base}/v1/jobs/{job_id}", headers=token, timeout=30).json()
        return body if body["state"] in ("succeeded", "failed", "cancelled") else None
    status = wait_until(finished, 240, 1.0, f"job {job_id} through the API")
    assert status["state"] == "succeeded", json.dumps(status)[:3000]
    result = httpx.get(f"{base}/v1/jobs/{job_id}/result", headers=token, timeout=60)
    assert result.status_code == 200 and len(result.content) > 10_000

    def job_counted():  # the API's job shows in the metrics too
        after = parse_metrics(local_cluster.scrape())
        return after.get("ray_lipsync_job_seconds_count|state=succeeded", 0) > before.get(
            "ray_lipsync_job_seconds_count|state=succeeded", 0)
    wait_until(job_counted, 30, 1.0, "the API job in ray_lipsync_job_seconds")
    # `lipsync serve` joining this cluster (an operator starting the service by hand) must not claim a port
    # Serve does not listen on (Serve keeps its first one), deploy over the running application (stopping, it
    # then took the running service's API away), or run on another storage root than the running job
    # manager's (it keeps its settings): it said "ready" on a port nothing listened on, and rendered into the
    # old root. Refused at once, and the running service is left as it is.
    lipsync = str(Path(sys.executable).parent / "lipsync")

    def refused(port: int, says: str, **env: str) -> None:
        proc = local_cluster.run([lipsync, "serve", "--port", str(port)], timeout=120, check=False, **env)
        assert proc.returncode == 2 and "service.in_use" in proc.stderr and says in proc.stderr, proc.stderr[-3000:]
    refused(local_cluster.http_port, "a lipsync service already runs on the cluster")
    assert get("/healthz") == 200 and get("/readyz") == 200
    # its application deleted (as a stopped `lipsync serve` leaves the cluster: Serve, its proxies on their port,
    # and the detached job manager stay): another port, then another storage root
    local_cluster.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(); serve.delete('lipsync')"],
                      timeout=120)
    refused(free_port(), f"on 127.0.0.1:{local_cluster.http_port}, which it keeps")
    refused(local_cluster.http_port, "runs on the storage root", LIPSYNC_STORAGE_ROOT=str(tmp_path / "other-root"))
