"""Seeded, time-bounded chaos under load (issue 12), shared by tests/test_chaos.py (short form)
and bench/chaos.py (long form).

A stream of jobs is submitted through a `Backend` (the Ray driver `Runtime`, or the HTTP service
through the SDK) while a fault thread SIGKILLs, at seeded random times, real processes of the
deployment: model workers, compositors, the job manager, the Serve ingress replica (found by
their Ray process titles among the descendants of the deployment's root process, never any
other process on the machine), or the whole `lipsync serve` (then started again). Afterwards
every job must be terminal; a succeeded job's frames must equal its fault-free render exactly;
a failed job's error must name the fault; no output may exist for a job that did not succeed.
"""
from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import psutil

#: Ray sets an actor process's title to `ray::<Class>` while idle and `ray::<Class>.<method>` (the
#: task's name) while it runs one; the dispatcher keeps Ray's names (actors/dispatch.py).
PROCESS_TITLES = {
    "model_worker": re.compile(r"^ray::ModelWorker\b"),
    "compositor": re.compile(r"^ray::Compositor\b"),
    "job_manager": re.compile(r"^ray::(JobManager|Orchestrator)\b"),
    "serve_replica": re.compile(r"^ray::ServeReplica:[^ ]*ingress", re.IGNORECASE),
}
#: Error codes by which a failed job may name a killed process (with words saying so).
FAULT_CODES = {"render.worker_lost", "render.chunk_failed", "render.timeout", "render.failed",
               "job.abandoned", "model.load_failed"}
FAULT_WORDS = re.compile(r"died|killed|lost|exit|crash|unavailable|restart|no live|dead|SIGKILL",
                         re.IGNORECASE)


@dataclass(frozen=True)
class JobSpec:
    id: str
    audio: str
    video: str
    reference: str  # key of the fault-free frames in the references dict


@dataclass
class Outcome:
    state: str
    code: str | None = None
    message: str | None = None


class Backend(Protocol):
    def submit(self, spec: JobSpec) -> None: ...
    def outcome(self, job_id: str) -> Outcome: ...          # state and, when failed, its error
    def fetch(self, job_id: str, dest: Path) -> Path: ...   # a succeeded job's output
    def root_pid(self) -> int: ...                          # the deployment's processes descend from it


def process_title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def victims(root_pid: int, kind: str) -> list[psutil.Process]:
    """Live descendants of `root_pid` whose Ray title marks them as `kind`."""
    pattern = PROCESS_TITLES[kind]
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if pattern.search(process_title(p))]


@dataclass
class Fault:
    t: float
    kind: str
    pid: int | None
    note: str = ""


@dataclass
class ChaosReport:
    seed: int
    jobs: int
    faults: list[Fault] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    identical: int = 0
    mismatched: list[str] = field(default_factory=list)
    unnamed_failures: list[str] = field(default_factory=list)
    non_terminal: list[str] = field(default_factory=list)
    stray_outputs: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)  # the fault thread itself failed
    seconds: float = 0.0

    def faults_by_kind(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.faults if f.pid is not None))

    def states(self) -> dict[str, int]:
        return dict(Counter(o.state for o in self.outcomes.values()))

    def summary(self) -> str:
        return (f"seed {self.seed}: {self.jobs} jobs in {self.seconds:.0f} s; faults {self.faults_by_kind()}; "
                f"outcomes {self.states()}; identical to the fault-free render {self.identical}; "
                f"mismatched {len(self.mismatched)}; failures not naming a fault {len(self.unnamed_failures)}; "
                f"non-terminal {len(self.non_terminal)}; stray outputs {len(self.stray_outputs)}")

    def assert_promises(self) -> None:
        assert not self.harness_errors, f"the fault injector failed: {self.harness_errors}"
        assert not self.non_terminal, f"jobs never reached a terminal state: {self.non_terminal}"
        assert not self.mismatched, f"succeeded jobs whose frames differ from the fault-free render: {self.mismatched}"
        assert not self.unnamed_failures, f"failed jobs whose error does not name the fault: {self.unnamed_failures}"
        assert not self.stray_outputs, f"outputs of jobs that did not succeed: {self.stray_outputs}"
        assert set(self.outcomes) and all(o.state in ("succeeded", "failed") for o in self.outcomes.values()), \
            self.states()


def run_chaos(backend: Backend, specs: list[JobSpec], references: dict[str, np.ndarray], *, seed: int,
              kinds: list[str], fault_gap_s: tuple[float, float], settle_s: float, work_dir: Path,
              actions: dict[str, Callable[[], str | None]] | None = None,
              submit_gap_s: tuple[float, float] = (0.0, 1.0),
              max_faults: int | None = None, decode: Callable[[str], np.ndarray] | None = None,
              log: Callable[[str], None] = print) -> ChaosReport:
    """Submit `specs` at seeded intervals while injecting faults every `fault_gap_s` seconds (each
    of `kinds` once per round, in a seeded order) until the last job is terminal (at most
    `max_faults`), then wait up to `settle_s` for
    every job to end, and check every promise into a `ChaosReport`. `actions` adds fault kinds
    done by a function (e.g. "serve": SIGKILL `lipsync serve` and start it again; "worker_node":
    remove a Ray node without grace): it returns what it killed, or None when there was nothing."""
    actions = actions or {}
    rng = random.Random(seed)
    report = ChaosReport(seed=seed, jobs=len(specs))
    t0 = time.monotonic()
    submitted: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def submitter() -> None:
        for spec in specs:
            time.sleep(rng.uniform(*submit_gap_s))
            for attempt in range(60):  # the service may be down (killed): resubmit, same id
                try:
                    backend.submit(spec)
                    break
                except Exception as e:
                    if attempt == 59:
                        raise
                    log(f"submit {spec.id}: {type(e).__name__}: {e}; retrying")
                    time.sleep(1.0)
            with lock:
                submitted.append(spec.id)

    def all_terminal() -> bool:
        with lock:
            ids = list(submitted)
        if len(ids) < len(specs):
            return False
        return all(_safe_outcome(backend, i).state in ("succeeded", "failed", "cancelled") for i in ids)

    frng = random.Random(seed + 1)
    order: list[str] = []  # every kind once per round, in a seeded order


    def injector() -> None:
        try:
            inject_until_stopped()
        except BaseException as e:  # noqa: BLE001 - recorded: the run then fails its promises
            report.harness_errors.append(f"{type(e).__name__}: {e}")
            log(f"fault injector failed: {type(e).__name__}: {e}")

    def inject_until_stopped() -> None:
        while not stop.is_set():
            if stop.wait(frng.uniform(*fault_gap_s)):
                return
            if max_faults is not None and len(report.faults) >= max_faults:
                return
            if not order:
                order.extend(frng.sample(kinds, len(kinds)))
            kind = order.pop(0)
            t = time.monotonic() - t0
            if kind in actions:
                what = actions[kind]()
                log(f"{t:6.1f}s fault: {kind}: {what or 'nothing to kill at that moment'}")
                report.faults.append(Fault(t, kind, 0 if what else None, what or ""))
                continue
            found = victims(backend.root_pid(), kind)
            if not found:
                report.faults.append(Fault(t, kind, None, "no such process at that moment"))
                continue
            victim = frng.choice(found)
            log(f"{t:6.1f}s fault: SIGKILL {kind} pid {victim.pid} ({process_title(victim)[:60]})")
            try:
                victim.send_signal(signal.SIGKILL)
                report.faults.append(Fault(t, kind, victim.pid))
            except psutil.NoSuchProcess:
                report.faults.append(Fault(t, kind, None, "gone before the kill"))

    sub = threading.Thread(target=submitter, name="chaos-submit", daemon=True)
    inj = threading.Thread(target=injector, name="chaos-faults", daemon=True)
    sub.start()
    inj.start()
    sub.join(timeout=settle_s)
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and not all_terminal():
        time.sleep(1.0)
    stop.set()
    inj.join(timeout=300)
    # after the last fault, give the deployment the time to finish what it resumed
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and not all_terminal():
        time.sleep(1.0)
    report.seconds = time.monotonic() - t0

    decode = decode or _decode_all
    for spec in specs:
        if spec.id not in submitted:
            report.non_terminal.append(f"{spec.id} (never submitted)")
            continue
        out = _safe_outcome(backend, spec.id)
        report.outcomes[spec.id] = out
        if out.state == "succeeded":
            dest = backend.fetch(spec.id, work_dir / f"{spec.id}.mp4")
            got, want = decode(str(dest)), references[spec.reference]
            if np.array_equal(got, want):
                report.identical += 1
            else:
                report.mismatched.append(f"{spec.id}: {_difference(got, want)}")
                _keep_evidence(backend, spec.id, work_dir / "evidence" / spec.id, log)
        elif out.state == "failed":
            text = f"{out.message}"
            if out.code not in FAULT_CODES or not FAULT_WORDS.search(text):
                report.unnamed_failures.append(f"{spec.id}: {out.code}: {text[:300]}")
        else:
            report.non_terminal.append(f"{spec.id} ({out.state})")
    if hasattr(backend, "stray_outputs"):
        report.stray_outputs = backend.stray_outputs(report.outcomes)
    log(report.summary())
    return report


def _keep_evidence(backend: Backend, job_id: str, dest: Path, log: Callable[[str], None]) -> None:
    """A mismatched job's directory (its plan, segments, HLS, log) and its view, copied next to the
    test's other files (pytest keeps the last runs' temporary directories), for whoever looks next."""
    import shutil

    root = getattr(getattr(backend, "service", None), "storage_root", None)
    if root is None and hasattr(backend, "runtime"):
        root = backend.runtime.settings.storage_root
    try:
        if root is not None and (Path(root) / "jobs" / job_id).is_dir():
            shutil.copytree(Path(root) / "jobs" / job_id, dest, dirs_exist_ok=True)
        dest.mkdir(parents=True, exist_ok=True)
        if root is not None and (Path(root) / "avatars").is_dir():  # the face tracks the chunks read
            shutil.copytree(Path(root) / "avatars", dest / "avatars", dirs_exist_ok=True)
        service_log = getattr(getattr(backend, "service", None), "log", None)
        if service_log is not None and Path(service_log).is_file():
            (dest / "serve.log").write_bytes(Path(service_log).read_bytes()[-2_000_000:])
        for log_file in (Path(root).rglob("*.log") if root is not None else []):  # the job manager's, if any
            if log_file.stat().st_size and job_id.encode() in log_file.read_bytes():
                shutil.copy(log_file, dest / log_file.name)
        (dest / "outcome.txt").write_text(repr(_safe_outcome(backend, job_id)))
        log(f"{job_id}: evidence kept in {dest}")
    except OSError as e:  # the evidence is a courtesy: the mismatch itself is reported regardless
        log(f"{job_id}: could not keep evidence in {dest}: {e!r}")


def _difference(got: np.ndarray, want: np.ndarray) -> str:
    """How two decoded videos differ: frame counts, or which frames and by how much."""
    if got.shape != want.shape:
        return f"shape {got.shape} instead of {want.shape}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16)).reshape(len(got), -1).max(axis=1)
    bad = np.flatnonzero(diff)
    return f"{len(bad)} of {len(got)} frames differ (first {bad[:8].tolist()}, max {int(diff.max())})"


def _safe_outcome(backend: Backend, job_id: str) -> Outcome:
    for _ in range(30):
        try:
            return backend.outcome(job_id)
        except Exception:  # noqa: BLE001 - the deployment may be restarting: ask again
            time.sleep(1.0)
    return backend.outcome(job_id)


def _decode_all(path: str) -> np.ndarray:
    from cluster.media.decode import iter_frames

    return np.concatenate(list(iter_frames(path, 32)))


# --- backends ---------------------------------------------------------------------------------
class RuntimeBackend:
    """Jobs through the Ray driver API (`actors.runtime.Runtime`) in this process: inputs are
    uploaded through Ray, outputs committed under the storage root and fetched through Ray."""

    def __init__(self, runtime, out_dir: Path) -> None:
        self.runtime = runtime
        self.out_dir = out_dir

    def submit(self, spec: JobSpec) -> None:
        from cluster.schemas import RenderRequest

        self.runtime.submit(RenderRequest(audio=spec.audio, video=spec.video), job_id=spec.id)

    def outcome(self, job_id: str) -> Outcome:
        st = self.runtime.status(job_id)
        err = st.error
        return Outcome(st.state.value, err.code if err else None,
                       f"{err.message} {err.cause or ''}" if err else None)

    def fetch(self, job_id: str, dest: Path) -> Path:
        return Path(self.runtime.download_output(job_id, dest))

    def root_pid(self) -> int:
        return os.getpid()

    def stray_outputs(self, outcomes: dict[str, Outcome]) -> list[str]:
        """Committed outputs of jobs that did not succeed, and pending outputs left anywhere."""
        root = self.runtime.settings.storage_root
        stray = [str(p) for p in root.rglob("*") if ".pending" in p.name]
        stray += [str(p) for job_id, o in outcomes.items() if o.state != "succeeded"
                  for p in (root / "outputs").glob(f"{job_id}*")]
        stray += [str(p) for p in self.out_dir.iterdir() if p.name.endswith((".tmp", ".part"))]
        return stray


class ServiceBackend:
    """Jobs through the HTTP service with the SDK (`cluster.client.Client`); the deployment is the
    `lipsync serve` process tree of a `tests.service_process.ServiceProcess`."""

    def __init__(self, service) -> None:
        from cluster.client import Client

        self.service = service
        self.client = Client(service.url, token=service.token, retries=10, backoff_s=1.0)

    def submit(self, spec: JobSpec) -> None:
        self.client.submit(spec.audio, spec.video, id=spec.id)

    def outcome(self, job_id: str) -> Outcome:
        view = self.client.get(job_id)
        err = view.error
        return Outcome(view.state.value, err.code if err else None,
                       f"{err.message} {err.cause or ''}" if err else None)

    def fetch(self, job_id: str, dest: Path) -> Path:
        return self.client.download(job_id, dest)

    def root_pid(self) -> int:
        return self.service.proc.pid

    def restart(self) -> str:
        """SIGKILL the whole `lipsync serve` process group, then start it again on the same port
        and storage root."""
        pid = self.service.proc.pid
        self.service.kill()
        self.service.start()
        return f"SIGKILLed lipsync serve (process group {pid}); started again as {self.service.proc.pid}"

    def stray_outputs(self, outcomes: dict[str, Outcome]) -> list[str]:
        """Files of jobs that did not succeed under the storage root's outputs, and pending ones."""
        from tests.helpers import uploads_left_after_sweep
        from tests.service_process import UPLOAD_IDLE_TIMEOUT_S

        # uploads cut off by a kill are swept by the job manager once idle: a few seconds here
        stray = uploads_left_after_sweep(self.service.storage_root, UPLOAD_IDLE_TIMEOUT_S + 10)
        stray += [str(p) for p in self.service.storage_root.rglob("*") if ".pending" in p.name]
        for job_id, o in outcomes.items():
            if o.state != "succeeded":
                stray += [str(p) for p in self.service.storage_root.rglob(f"*{job_id}*.mp4")
                          if "inputs" not in p.parts and "segments" not in p.parts]
        return stray
