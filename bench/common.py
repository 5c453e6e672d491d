"""What every benchmark shares: inputs, the two models, measuring a process tree, writing results.

Each benchmark writes `bench/results/NAME.json` (machine, date, command, figures) and replaces its
own section of `docs/PERFORMANCE.md` (between `<!-- bench:NAME -->` markers).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs" / "PERFORMANCE.md"
CACHE = Path(os.environ.get("LIPSYNC_BENCH_CACHE", REPO / "bench" / ".cache"))

#: The two models every benchmark runs with: the built-in near-free one and a random-weight model
#: of the Wav2Lip-96 generator's size (built on first use, cached under bench/.cache).
MODELS = ("builtin", "wav2lip96")


@dataclass(frozen=True)
class Inputs:
    """Template and speech of a benchmark (generated once, cached by their parameters)."""
    audio: str
    video: str
    seconds: float
    width: int
    height: int
    fps: int
    template_seconds: float

    @property
    def frames(self) -> int:
        return round(self.seconds * self.fps)


def make_inputs(seconds: float, size: tuple[int, int] = (1280, 720), template_seconds: float = 10.0,
                fps: int = 25, variant: int = 0) -> Inputs:
    """A `size` template of a real photographed face with head motion (`template_seconds` long) and
    `seconds` of speech-like audio. `variant` makes a template with other bytes (a cold avatar)."""
    from cluster.synth import astronaut_template, speech_like, write_audio

    d = CACHE / "inputs"
    d.mkdir(parents=True, exist_ok=True)
    w, h = size
    audio = d / f"speech_{seconds:g}s.wav"
    video = d / f"template_{w}x{h}_{template_seconds:g}s_{fps}_{variant}.mp4"
    if not audio.is_file():
        tmp = audio.with_name(f".{audio.name}.{os.getpid()}.wav")
        write_audio(str(tmp), speech_like(seconds, seed=11))
        os.replace(tmp, audio)
    if not video.is_file():
        tmp = video.with_name(f".{video.name}.{os.getpid()}.mp4")
        astronaut_template(str(tmp), seconds=template_seconds, fps=fps, size=(w, h), seed=3 + variant)
        os.replace(tmp, video)
    return Inputs(str(audio), str(video), seconds, w, h, fps, template_seconds)


def model_spec(name: str) -> str:
    """The `--model` value of a benchmark model name."""
    if name == "builtin":
        return "builtin"
    if name == "wav2lip96":
        from bench.wav2lip_sized import build_wav2lip_sized

        return build_wav2lip_sized(CACHE / "models" / "wav2lip96_sized.onnx")
    return name


def model_size(name: str) -> int:
    return 96 if name == "wav2lip96" else 256


# --- jobs ---------------------------------------------------------------------------------
def wait_phases(rt, job_id: str, timeout: float = 1800.0, what: str = "job"):
    """Poll a job until it is terminal (bounded by `timeout`): (final status, time it entered
    `rendering`, time it left it), in `time.perf_counter()` seconds (None where not seen)."""
    t0 = time.perf_counter()
    t_render = t_final = None
    while True:
        status = rt.status(job_id)
        now = time.perf_counter()
        if status.state.value == "rendering" and t_render is None:
            t_render = now
        if status.state.value in ("finalizing", "succeeded") and t_final is None:
            t_final = now
        if status.state.terminal:
            return status, t_render, t_final
        if now - t0 > timeout:
            raise TimeoutError(f"{what} {job_id} still {status.state.value} after {timeout:.0f} s")
        time.sleep(0.05)


# --- measuring ---------------------------------------------------------------------------
def _tree_usage(proc, pss: bool = True) -> tuple[int, int | None, float]:
    """(summed RSS bytes, summed PSS bytes or None, summed CPU seconds) of `proc` and its
    descendants, in one pass over the process table.

    RSS counts a page once per process that maps it: the shared libraries every Python process of
    a Ray tree loads (NumPy, OpenCV, onnxruntime, Ray itself) and the object store's shared memory
    are counted many times over. PSS (proportional set size) splits each shared page among the
    processes that map it, so the PSS sum is the memory the tree really holds; it is what the
    memory ratios compare. Reading PSS walks each process's mappings (about 2 ms per Ray process
    here, against 0.1 ms for RSS), so `pss=False` skips it. (A process whose PSS cannot be read
    counts its RSS.)
    """
    import psutil

    rss, pss_sum, cpu = 0, 0, 0.0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0 if pss else None, 0.0
    for p in procs:
        try:
            with p.oneshot():
                r = p.memory_info().rss
                rss += r
                if pss:
                    try:
                        pss_sum += p.memory_full_info().pss
                    except psutil.AccessDenied:
                        pss_sum += r
                t = p.cpu_times()
            cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return rss, pss_sum if pss else None, cpu


class TreeSampler:
    """Samples the summed RSS (every `every_s`) and PSS (every `pss_every_s`: reading it costs the
    measured machine more) of a process and all its descendants in a thread, keeping each one's
    peak (`peak` RSS, `peak_pss`, bytes). A render's memory rises and falls over seconds (chunks),
    so a PSS sample a second catches its plateaus."""

    def __init__(self, pid: int | None = None, every_s: float = 0.1, pss_every_s: float = 1.0) -> None:
        import psutil

        self.proc = psutil.Process(pid or os.getpid())
        self.every_s, self.pss_every_s = every_s, pss_every_s
        self.peak = self.peak_pss = 0
        self._next_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> float:
        """Take one sample now (peaks updated; PSS when it is due); returns the tree's CPU seconds."""
        now = time.monotonic()
        due = now >= self._next_pss
        rss, pss, cpu = _tree_usage(self.proc, pss=due)
        self.peak = max(self.peak, rss)
        if due:
            self.peak_pss, self._next_pss = max(self.peak_pss, pss), now + self.pss_every_s
        return cpu

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def cpu(self) -> float:
        return _tree_usage(self.proc, pss=False)[2]

    def figures(self) -> dict:
        return {"peak_rss_mb": self.peak / 2**20, "peak_pss_mb": self.peak_pss / 2**20}

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._next_pss = 0.0
        self.sample()  # the end state too


def run_measured(cmd: list[str], env: dict | None = None, timeout: float = 3600.0) -> dict:
    """Run `cmd` as a child; wall seconds, peak RSS and PSS of its process tree (see `_tree_usage`),
    its CPU seconds and its exit status."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sampler = TreeSampler(proc.pid)
    cpu = 0.0
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = t0 + timeout
    while proc.poll() is None:
        cpu = max(cpu, sampler.sample())
        if time.perf_counter() > deadline:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
            raise TimeoutError(f"{cmd[:4]} ran past {timeout:g} s")
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    try:  # whatever the command left running in its session (Ray's processes) goes with it
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    text = (out[0] if out else b"").decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}): {text[-3000:]}")
    return {"wall_s": wall, **sampler.figures(), "cpu_s": cpu, "output": text[-2000:]}


# --- results -----------------------------------------------------------------------------
def machine() -> dict:
    import onnxruntime

    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                   platform.processor())
    except OSError:
        cpu = platform.processor()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"host_cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "system": platform.platform(),
            "load_1min_at_start": load}


def write_result(name: str, figures: dict, table_md: str, notes: str = "", started: dict | None = None,
                 quick: bool = False) -> Path:
    """Write bench/results/NAME.json and replace NAME's section of docs/PERFORMANCE.md.

    A `quick` run (small inputs, a smoke check) writes bench/results/NAME.quick.json only."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    mach = started or machine()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m bench " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("__main__.py") \
        else " ".join([Path(sys.executable).name, *sys.argv])
    doc = {"name": name, "date": date, "command": command, "machine": mach, "figures": figures}
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    if not quick:
        _keep_runs_not_renewed(path, figures)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if quick:
        print(table_md)
        print(f"wrote {path.relative_to(REPO)} (quick run: docs/PERFORMANCE.md not updated)")
        return path
    section = (f"<!-- bench:{name} -->\n"
               f"_Measured {date} with `{command}` on {mach['host_cpus']} cores ({mach['cpu']}), "
               f"1-min load at start {mach['load_1min_at_start']}._\n\n{table_md.strip()}\n"
               + (f"\n{notes.strip()}\n" if notes.strip() else "")
               + f"<!-- /bench:{name} -->")
    _replace_section(name, section)
    try:
        from bench.summary import write_targets

        write_targets()
    except Exception as e:  # noqa: BLE001 - one benchmark's results must not be lost to the summary
        print(f"targets table not rebuilt: {e!r}", file=sys.stderr)
    print(table_md)
    print(f"wrote {path.relative_to(REPO)} and the {name} section of {DOCS.relative_to(REPO)}")
    return path


def _keep_runs_not_renewed(path: Path, figures: dict) -> None:
    """Before a run replaces NAME.json, move the stored result aside as NAME.<date>.json when it holds runs
    (model, speech length) or models the new one does not measure: a partial run (`--model builtin`)
    renews its own rows of the targets table (bench/summary.py reads them all) and loses none of the others."""
    def keys(fig: dict) -> set:  # what a result measured: runs (model, speech length), or models
        return {(r["model"], r["speech_s"]) for r in fig.get("runs", [])} | set(fig.get("models") or {})

    try:
        old = json.loads(path.read_text())
        old_keys = keys(old["figures"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if old_keys - keys(figures):
        stamp = _dt.datetime.strptime(old["date"], "%Y-%m-%d %H:%M UTC").strftime("%Y%m%d-%H%M")
        path.rename(path.with_name(f"{path.stem}.{stamp}.json"))


def _replace_section(name: str, section: str) -> None:
    text = DOCS.read_text() if DOCS.is_file() else "# Performance\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start in text and end in text:
        a = text.index(start)
        b = text.index(end) + len(end)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot(name: str, draw) -> str | None:
    """Save a matplotlib figure drawn by `draw(ax)` to docs/img/NAME.png (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[dev]'): no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    fig.tight_layout()
    out = DOCS.parent / "img" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f"img/{name}.png"


def bench_env(storage_root: str, **settings) -> dict:
    """Environment for a child process: its own storage root and LIPSYNC_* settings."""
    env = {"LIPSYNC_STORAGE_ROOT": storage_root, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env.update({f"LIPSYNC_{k.upper()}": str(v) for k, v in settings.items()})
    return env
