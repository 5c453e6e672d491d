"""Benchmark 4: prepared avatar on a warm service, time from submit until a player shows the first frame.

A warm service (Ray, the job manager and its workers up, the model loaded, the HTTP ingress on a
loopback port with a token) and an avatar prepared beforehand (`POST /v1/avatars`). Each job is
submitted over HTTP (the speech uploaded, `avatar_id`); the client then follows the job's events
(`GET /v1/jobs/{id}/events?segments=1`, as `lipsync submit --watch` and the SDK's `job.segments()`
do: the server pushes the `segment` event when the segment is published, no poll interval adds to
the figure), and on the first one a real ffmpeg reads the 202's `watch_url` (signed: no header) over
HTTP (`-live_start_index 0`, probing limited as a low-latency player does); the clock stops when it
has decoded the first frame.
Figures per job: the submit's answer, the first segment event, the first frame decoded, and the
job's own timeline (stored stage times, the mel files, chunk 0's segment and HLS marker, chunk 1's
marker: file modification times on this machine's clock), read once the first frame is decoded.
Target: first frame <= 1 s (built-in model, 2 cores).

    python -m bench first_segment                     # 10 s of speech, both models
    python -m bench first_segment --seconds 300 --model builtin   # a job of 5 minutes
Jobs longer than 60 s are cancelled once chunk 1 is published (at most 60 s after their first
frame): their total is not the point.
"""
from __future__ import annotations

import json
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import CACHE, MODELS, make_inputs, md_table, model_spec, write_result

TERMINAL = ("succeeded", "failed", "cancelled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpService:
    """The warm service (bench.classic.WarmService) with the HTTP ingress (serve_app) on a loopback port.
    `warm`: an already running warm service to put the ingress on (left running by `close`)."""

    def __init__(self, storage_root: Path | None = None, warm=None) -> None:
        from ray import serve

        from bench.classic import WarmService
        from service.deployment import build_app

        self.owns_warm = warm is None
        self.warm = warm or WarmService(storage_root)
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{_free_port()}"
        overrides = {**self.warm.settings.model_dump(mode="json"), "api_token": self.token}
        serve.start(http_options={"host": "127.0.0.1", "port": int(self.url.rsplit(":", 1)[1])})
        serve.run(build_app(overrides), name="lipsync", route_prefix="/", blocking=False)
        import httpx

        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=120, trust_env=False)
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ingress did not answer on {self.url}")
            time.sleep(0.2)

    def install_model(self, spec: str) -> str:
        """The API's name of a model spec (a file goes into the server's model directory)."""
        from cluster.schemas import is_builtin_model

        if is_builtin_model(spec):
            return spec
        models = self.warm.settings.storage_root / "models"
        models.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec, models / Path(spec).name)
        return Path(spec).stem

    def close(self) -> None:
        from ray import serve

        self.http.close()
        try:
            serve.shutdown()
        finally:
            if self.owns_warm:
                self.warm.close()


def first_frame(service: HttpService, audio: str, avatar_id: str, model: str, cancel: bool) -> dict:
    """One job: seconds from submit to the 202, to the first segment event, to ffmpeg's first frame."""
    from cluster.config import Settings
    from cluster.media.ffmpeg import ffmpeg_binary

    wall0, t0 = time.time(), time.perf_counter()
    with open(audio, "rb") as f:
        r = service.http.post("/v1/jobs", files={"audio": ("speech.wav", f)},
                              data={"avatar_id": avatar_id, "model": model})
    r.raise_for_status()
    accepted = time.perf_counter() - t0
    job_id, watch = r.json()["id"], service.url + r.json()["watch_url"]
    event = None
    with service.http.stream("GET", f"/v1/jobs/{job_id}/events", params={"segments": 1}, timeout=120) as events:
        for line in events.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event == "segment":
                break
            elif line.startswith("data: ") and event == "status" and json.loads(line[6:])["state"] in TERMINAL:
                raise RuntimeError(f"job {job_id} ended without a segment: {line[6:]}")
        else:
            raise RuntimeError(f"the events of job {job_id} ended without a segment")
    listed = time.perf_counter() - t0
    frame_bytes = None
    # as a low-latency player: stream parameters from the init segment, no probing of ~5 s of media
    # first (ffmpeg's default, which on a live playlist waits for later segments to appear)
    proc = subprocess.Popen([ffmpeg_binary(Settings()), "-v", "error", "-probesize", "32", "-analyzeduration", "0",
                             "-allowed_extensions", "ALL", "-live_start_index", "0", "-i", watch, "-map", "0:v:0",
                             "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        frame_bytes = proc.stdout.read(1)  # the first byte of the first decoded frame
        decoded = time.perf_counter() - t0
        timeline = job_timeline(service, job_id, wall0)  # before the job ends (its segments go at commit)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if not frame_bytes:
        raise RuntimeError(f"ffmpeg decoded nothing from {watch}: {proc.stderr.read().decode()[-1000:]}")
    second = _second_marker(service, job_id)  # when a player can go on past the short first segment
    if cancel:
        deadline = time.monotonic() + 60
        while not second.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        service.http.delete(f"/v1/jobs/{job_id}")
        total = None
        _wait_chunks_drained(service, job_id)
    else:
        while (view := service.http.get(f"/v1/jobs/{job_id}").json())["state"] not in TERMINAL:
            time.sleep(0.1)
        if view["state"] != "succeeded":
            raise RuntimeError(f"job {job_id} ended {view['state']}: {view.get('error')}")
        total = time.perf_counter() - t0
    if second.exists():
        timeline["chunk1_published"] = round(second.stat().st_mtime - wall0, 3)
    return {"accepted_s": accepted, "listed_s": listed, "first_frame_s": decoded, "total_s": total,
            "timeline": timeline}


TIMELINE_COLUMNS = {"prepare_started": "prepare started", "mel_head_written": "mel head written",
                    "prepare_ended": "prepared", "chunk0_rendered": "chunk 0 rendered",
                    "chunk0_published": "chunk 0 published", "mel_written": "whole mel written",
                    "chunk1_published": "chunk 1 published"}


def _median_of(jobs: list[dict], key: str):
    values = [j["timeline"][key] for j in jobs if key in j["timeline"]]
    return statistics.median(values) if values else "-"


def _wait_chunks_drained(service: HttpService, job_id: str, timeout: float = 120.0) -> None:
    """After a cancel: until the job is terminal and no chunk of it is still being rendered (a
    chunk in progress writes `<segment>.<id>.tmp.mp4` and cannot be interrupted), so that the next
    job measured does not wait behind the cancelled one's last chunks."""
    from cluster.render import job_dir

    segments = job_dir(job_id, service.warm.settings) / "segments"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = service.http.get(f"/v1/jobs/{job_id}").json()["state"]
        if state in TERMINAL and not list(segments.glob("*.tmp.mp4")):
            return
        time.sleep(0.1)
    raise RuntimeError(f"cancelled job {job_id} still had chunks rendering after {timeout:.0f} s")


def _second_marker(service: HttpService, job_id: str) -> Path:
    from cluster.hls import hls_dir
    from cluster.render import job_dir

    return hls_dir(job_dir(job_id, service.warm.settings)) / "00001.json"


def job_timeline(service: HttpService, job_id: str, wall0: float) -> dict:
    """Seconds from the submit's start (wall clock) to each step the job manager recorded or wrote:
    its stored stage starts and ends, the mel files, chunk 0's rendered segment and its HLS marker,
    chunk 1's marker (file modification times, on this machine's clock)."""
    from cluster.hls import hls_dir
    from cluster.jobstore import JobStore
    from cluster.render import job_dir

    settings = service.warm.settings
    out: dict = {}
    store = JobStore(settings.db_path)
    try:
        for stage in store.get(job_id).stages:
            out[f"{stage.stage}_started"] = stage.started_at.timestamp() - wall0
            if stage.ended_at is not None:
                out[f"{stage.stage}_ended"] = stage.ended_at.timestamp() - wall0
    finally:
        store.close()
    jd = job_dir(job_id, settings)
    hls = hls_dir(jd)
    for name, path in (("mel_head_written", jd / "mel-head.npy"), ("mel_written", jd / "mel.npy"),
                       ("chunk0_rendered", jd / "segments" / "00000.mp4"), ("chunk0_published", hls / "00000.json"),
                       ("chunk1_published", hls / "00001.json")):
        try:
            out[name] = path.stat().st_mtime - wall0
        except OSError:
            pass
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: kv[1])}


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None) -> dict:
    size, template_s = ((640, 360), 2.0) if quick else ((1280, 720), 10.0)
    models = models or (["builtin"] if quick else list(MODELS))
    repeats = 2 if quick else 5
    lengths = seconds or [10.0]
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-first-", dir=CACHE))
    results: dict = {"size": f"{size[0]}x{size[1]}", "runs": []}
    service = HttpService(work / "warm")
    try:
        for m in models:
            spec = model_spec(m)
            warm = make_inputs(min(lengths[0], 10.0), size, template_s)
            service.warm.render(warm.audio, warm.video, spec, str(work / "prepare.mp4"))  # model + avatar ready
            with open(warm.video, "rb") as f:
                avatar = service.http.post("/v1/avatars", files={"video": ("face.mp4", f)})
            avatar.raise_for_status()
            avatar_id, name = avatar.json()["id"], service.install_model(spec)
            inputs = {length: make_inputs(length, size, template_s) for length in lengths}
            runs: dict[float, list[dict]] = {length: [] for length in lengths}
            for _ in range(repeats):  # the lengths in turn: a load that drifts weighs on each alike
                for length in lengths:
                    runs[length].append(first_frame(service, inputs[length].audio, avatar_id, name,
                                                    cancel=length > 60))
            for length in lengths:
                row = {"model": m, "speech_s": length, "jobs": runs[length],
                       "median_first_frame_s": statistics.median(r["first_frame_s"] for r in runs[length])}
                results["runs"].append(row)
                print(f"[first_segment] {m} {length:g} s: {row}", flush=True)
    finally:
        service.close()
        shutil.rmtree(work, ignore_errors=True)
    rows, steps = [], []
    for row in results["runs"]:
        jobs = row["jobs"]
        totals = [j["total_s"] for j in jobs if j["total_s"] is not None]
        rows.append([row["model"], row["speech_s"], statistics.median(j["accepted_s"] for j in jobs),
                     statistics.median(j["listed_s"] for j in jobs), row["median_first_frame_s"],
                     min(j["first_frame_s"] for j in jobs), max(j["first_frame_s"] for j in jobs),
                     "met" if row["median_first_frame_s"] <= 1.0 else "NOT met",
                     statistics.median(totals) if totals else "cancelled"])
        steps.append([row["model"], row["speech_s"], *(_median_of(jobs, key) for key in TIMELINE_COLUMNS)])
    table = md_table(["model", "speech s", "202 s", "first segment event s", "first frame decoded s (median)",
                      "min", "max", "target <= 1 s", "job total s (median)"], rows)
    table += "\n\nThe job's own timeline, seconds from the submit's start (medians; - where no job had it):\n\n"
    table += md_table(["model", "speech s", *TIMELINE_COLUMNS.values()], steps)
    for m in models:
        mine = sorted((r for r in results["runs"] if r["model"] == m), key=lambda r: r["speech_s"])
        if len(mine) > 1:  # does the first frame wait longer for a longer job? (same run, lengths in turn)
            ratio = mine[-1]["median_first_frame_s"] / mine[0]["median_first_frame_s"]
            results.setdefault("length_ratio", {})[m] = ratio
            table += (f"\n\n{m}: first frame of {mine[-1]['speech_s']:g} s of speech vs {mine[0]['speech_s']:g} s, "
                      f"medians in this run: **{ratio:.2f}x**")
    notes = (f"Template {results['size']} prepared as an avatar, {repeats} jobs per row on a warm "
             "service over HTTP (loopback, token on; the player reads the signed watch_url without a header), "
             "the lengths in turn; "
             "times from the start of the submit (the speech upload included). Jobs over 60 s are cancelled once "
             "chunk 1 is published (at most 60 s after their first frame).")
    write_result("first_segment", results, table, notes, quick=quick)
    return results
