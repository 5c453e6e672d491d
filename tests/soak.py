"""A bounded soak through the HTTP service (issue 12), shared by tests/test_soak.py (50 jobs) and
bench/soak.py (longer): several SDK client threads submit short jobs in bursts against a service
whose queue bound is small, so that it answers 429 with Retry-After and the SDK's retries absorb
it; every job must end `succeeded`, none lost, none run twice to different outputs (jobs with the
same inputs give byte-identical outputs); the memory of the service's process tree (the
`lipsync serve` process, its Ray head and workers) is sampled: start, peak, end."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil


def tree_rss(root_pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class CountingTransport(httpx.HTTPTransport):
    """Counts the answers by status code (the SDK retries 429 and 503 behind our back)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: Counter = Counter()
        self.retry_after: set[str] = set()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        with self._lock:
            self.statuses[resp.status_code] += 1
            if resp.status_code == 429:
                self.retry_after.add(resp.headers.get("retry-after", ""))
        return resp


@dataclass
class SoakReport:
    jobs: int
    threads: int
    statuses: dict[int, int] = field(default_factory=dict)
    retry_after: list[str] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    listed: int = 0
    distinct_outputs: dict[str, int] = field(default_factory=dict)  # inputs key -> distinct output hashes
    errors: list[str] = field(default_factory=list)
    rss_cold: int = 0     # before the warm-up jobs
    rss_start: int = 0    # after them: the baseline "flat" is judged against
    rss_peak: int = 0
    rss_end: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        mib = 2 ** 20
        return (f"{self.jobs} jobs from {self.threads} threads in {self.seconds:.0f} s; states {self.states}; "
                f"HTTP answers {dict(sorted(self.statuses.items()))}; listed {self.listed}; distinct outputs "
                f"per inputs {self.distinct_outputs}; service memory cold {self.rss_cold / mib:.0f} MiB, "
                f"start {self.rss_start / mib:.0f} MiB, "
                f"peak {self.rss_peak / mib:.0f} MiB, end {self.rss_end / mib:.0f} MiB; errors {len(self.errors)}")


def run_soak(service, inputs: dict[str, tuple[str, str]], *, jobs: int, threads: int, burst: int,
             pause_s: float, prefix: str, work_dir: Path, timeout_s: float, warmup: int = 2,
             log=print) -> SoakReport:
    """Submit `jobs` jobs (round-robin over `inputs`: key -> (audio, video)) from `threads` SDK
    clients in bursts of `burst` with `pause_s` between bursts; wait for all; download and hash
    every output; sample the service's memory throughout, from after `warmup` jobs per input
    (first-use costs: avatar preparation, imports and caches in fresh workers)."""
    from cluster.client import Client

    report = SoakReport(jobs=jobs, threads=threads)
    transport = CountingTransport()
    keys = sorted(inputs)
    ids = [f"{prefix}-{i:04d}" for i in range(jobs)]
    key_of = {job_id: keys[i % len(keys)] for i, job_id in enumerate(ids)}
    stop = threading.Event()
    root_pid = service.proc.pid
    report.rss_cold = tree_rss(root_pid)
    with Client(service.url, token=service.token, retries=40, backoff_s=0.5) as c:
        for k in keys:
            for i in range(warmup):
                c.submit(*inputs[k], id=f"{prefix}-warmup-{k}-{i}").wait(timeout=timeout_s)
    report.rss_start = report.rss_peak = tree_rss(root_pid)

    def sample() -> None:
        while not stop.wait(0.5):
            report.rss_peak = max(report.rss_peak, tree_rss(root_pid))

    def client_thread(mine: list[str]) -> None:
        with Client(service.url, token=service.token, retries=40, backoff_s=0.5, transport=transport) as c:
            for start in range(0, len(mine), burst):
                for job_id in mine[start:start + burst]:
                    audio, video = inputs[key_of[job_id]]
                    try:
                        c.submit(audio, video, id=job_id)
                    except Exception as e:  # noqa: BLE001 - recorded: a lost job fails the soak
                        report.errors.append(f"submit {job_id}: {type(e).__name__}: {e}")
                time.sleep(pause_s)
            for job_id in mine:
                try:
                    c.wait(job_id, timeout=timeout_s, poll_s=0.5, raise_on_failure=False)
                except Exception as e:  # noqa: BLE001
                    report.errors.append(f"wait {job_id}: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    workers = [threading.Thread(target=client_thread, args=(ids[k::threads],), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=timeout_s + 120)
    report.seconds = time.monotonic() - t0
    stop.set()
    sampler.join(timeout=5)
    time.sleep(1.0)
    report.rss_end = tree_rss(root_pid)

    with Client(service.url, token=service.token, retries=10) as c:
        views = {job_id: c.get(job_id) for job_id in ids}
        report.states = dict(Counter(v.state.value for v in views.values()))
        page, offset = [], 0
        while True:
            got = c.list(limit=500, offset=offset)
            page += [j.id for j in got.jobs if j.id in key_of]
            if got.next_offset is None:
                break
            offset = got.next_offset
        report.listed = len(page)
        if len(set(page)) != len(page):
            report.errors.append(f"job list has duplicates: {[i for i, n in Counter(page).items() if n > 1]}")
        hashes: dict[str, set[str]] = {k: set() for k in keys}
        for job_id, v in views.items():
            if v.state.value != "succeeded":
                report.errors.append(f"{job_id} ended {v.state.value}: {v.error}")
                continue
            dest = c.download(job_id, work_dir / f"{job_id}.mp4")
            hashes[key_of[job_id]].add(hashlib.sha256(dest.read_bytes()).hexdigest())
            dest.unlink()
    report.distinct_outputs = {k: len(v) for k, v in hashes.items()}
    report.statuses = dict(transport.statuses)
    report.retry_after = sorted(transport.retry_after)
    log(report.summary())
    return report
