"""Benchmark: a node's throughput at its hardware's pace (issue 19), against the same number of
classic pipelines run side by side.

For each model, in one run under the same load:
  - warm service, prepared avatar: an embedded Ray in this process with its default pool for this
    node (compositors sized from its CPUs and memory), the avatar prepared by a short job on the
    same template, then one job of `--seconds` of speech on the 720p25 template (bench/common.py);
    run three times: with every actor's thread pools sized from its Ray CPUs (`LIPSYNC_SIZE_THREADS`,
    the default), with the libraries' defaults (one thread per core per pool, as before), and
    sized but with each segment encoded by an ffmpeg child instead of in the compositor
    (`LIPSYNC_ENCODE_IN_PROCESS=false`, as before); `--variants inflight2`: two model batches in
    flight per compositor (`LIPSYNC_BATCHES_IN_FLIGHT=2`), `--variants ultrafast`: x264's
    `ultrafast` preset (`LIPSYNC_PRESET`; more bytes per frame), `--variants wide`: half the
    compositors, each with 2 Ray CPUs and its thread pools at two threads (`LIPSYNC_COMPOSITOR_CPUS=2`:
    fewer, multi-threaded compositors against one per CPU), `--variants chunks2`: each compositor
    renders two chunks at once (`LIPSYNC_CHUNKS_PER_COMPOSITOR=2`: the next chunk starts while the
    last one's encoder finishes); none of these in the default run;
  - N classic pipelines (`bench/reference_pipeline.py`), N = the pool's compositors, started at
    once as separate processes on the same inputs: what a user could run instead with a process
    pool, the honest peer for throughput.
Reported: frames/s, CPU per output frame by process kind (compositor, its ffmpeg children, model
worker, job manager, Ray's own processes, this driver), the compositors' busy share (CPU seconds /
wall seconds: 1 - it is the time they wait), the busiest model worker's share of the run spent in
batches (near 100 %: one worker is the pool's serial limit), peak PSS per kind and per compositor,
GPU utilisation sampled each second with nvidia-smi (or "no GPU"), the pool, and the ratios side
by side.

    python -m bench throughput --seconds 180          # the issue's run (writes the docs table)
    python -m bench throughput --quick                # smoke check: 4 s, 640x360, built-in only
    python -m bench.throughput --model latency:24:256 --seconds 30 --no-classic --variants sized
                                                      # compositor idle share against a latency-only model
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

from bench.common import (
    CACHE,
    MODELS,
    bench_env,
    machine,
    make_inputs,
    md_table,
    model_spec,
    run_measured,
    write_result,
)

VARIANTS = {"sized": {"LIPSYNC_SIZE_THREADS": "true"},  # the service's environment per variant
            "library": {"LIPSYNC_SIZE_THREADS": "false"},
            "ffmpeg": {"LIPSYNC_SIZE_THREADS": "true", "LIPSYNC_ENCODE_IN_PROCESS": "false"},
            "inflight2": {"LIPSYNC_SIZE_THREADS": "true", "LIPSYNC_BATCHES_IN_FLIGHT": "2"},
            "ultrafast": {"LIPSYNC_SIZE_THREADS": "true", "LIPSYNC_PRESET": "ultrafast"},
            "wide": {"LIPSYNC_SIZE_THREADS": "true", "LIPSYNC_COMPOSITOR_CPUS": "2"},
            "chunks2": {"LIPSYNC_SIZE_THREADS": "true", "LIPSYNC_CHUNKS_PER_COMPOSITOR": "2"},
            "decoded": {"LIPSYNC_SIZE_THREADS": "true", "LIPSYNC_FRAME_CACHE": "false"}}
VARIANT_LABELS = {"sized": "thread pools from Ray CPUs", "library": "library default thread pools",
                  "ffmpeg": "thread pools from Ray CPUs, an ffmpeg child encoding each segment",
                  "inflight2": "thread pools from Ray CPUs, two model batches in flight per compositor",
                  "ultrafast": "thread pools from Ray CPUs, x264 preset ultrafast",
                  "wide": "half the compositors, 2 Ray CPUs and two threads per pool each",
                  "chunks2": "thread pools from Ray CPUs, two chunks at once per compositor",
                  "decoded": "thread pools from Ray CPUs, template frames decoded per chunk (no frame cache)"}
#: (variant, against variant, what the ratio says) printed under the table when both ran
COMPARISONS = [("sized", "library", "sized / library thread pools"),
               ("sized", "ffmpeg", "segments encoded in the compositor / by an ffmpeg child"),
               ("inflight2", "sized", "two model batches in flight / one"),
               ("ultrafast", "sized", "x264 ultrafast / superfast"),
               ("wide", "sized", "half the compositors at 2 CPUs each / one per CPU"),
               ("chunks2", "sized", "two chunks at once per compositor / one"),
               ("sized", "decoded", "template frames from the node's frame cache / decoded per chunk")]
KINDS = ("compositor", "compositor ffmpeg children", "model worker", "job manager", "ray system", "driver")


# --- who is who in the process tree --------------------------------------------------------
def _kind(p, driver_pid: int) -> str:
    if p.pid == driver_pid:
        return "driver"
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - a process that just left
        return "ray system"
    for needle, kind in (("Compositor", "compositor"), ("ModelWorker", "model worker"),
                         ("JobManager", "job manager")):
        if needle in cmd:
            return kind
    return "ray system"


def _snapshot(driver_pid: int) -> dict[int, tuple[str, float, float]]:
    """pid -> (kind, own CPU s, reaped children's CPU s) of the driver and all its descendants."""
    import psutil

    root = psutil.Process(driver_pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (_kind(p, driver_pid), t.user + t.system, t.children_user + t.children_system)
        except psutil.Error:
            pass
    return out


def cpu_by_kind(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two snapshots, by kind. A compositor's reaped children are its
    ffmpeg encoders (and probes); the driver's reaped children are not counted (none run here)."""
    out = dict.fromkeys(KINDS, 0.0)
    for pid, (kind, own, children) in after.items():
        _, own0, children0 = before.get(pid, (kind, 0.0, 0.0))
        out[kind] += own - own0
        if kind == "compositor":
            out["compositor ffmpeg children"] += children - children0
    return out


class KindSampler:
    """Peak PSS by process kind (sum) and the largest compositor's, sampled every `every_s` in a
    thread; and, where nvidia-smi exists, GPU utilisation each second."""

    def __init__(self, driver_pid: int, every_s: float = 2.0) -> None:
        self.driver_pid, self.every_s = driver_pid, every_s
        self.peak: dict[str, float] = {}
        self.peak_total = 0.0
        self.peak_compositor = 0.0
        self.gpu: list[float] | None = [] if shutil.which("nvidia-smi") else None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._mem_loop, daemon=True)]
        if self.gpu is not None:
            self._threads.append(threading.Thread(target=self._gpu_loop, daemon=True))

    def _mem_loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            sums: dict[str, float] = {}
            root = psutil.Process(self.driver_pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    pss = p.memory_full_info().pss / 2**20
                    kind = "compositor ffmpeg children" if p.name().startswith("ffmpeg") else _kind(p, self.driver_pid)
                except psutil.Error:
                    continue
                sums[kind] = sums.get(kind, 0.0) + pss
                if kind == "compositor":
                    self.peak_compositor = max(self.peak_compositor, pss)
            for k, v in sums.items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)
            self.peak_total = max(self.peak_total, sum(sums.values()))
            self._stop.wait(self.every_s)

    def _gpu_loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                vals = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
                if vals:
                    self.gpu.append(sum(vals) / len(vals))
            except (OSError, subprocess.SubprocessError):
                pass
            self._stop.wait(1.0)

    def __enter__(self) -> KindSampler:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def figures(self) -> dict:
        gpu = ({"gpu_util_mean_pct": sum(self.gpu) / len(self.gpu), "gpu_util_max_pct": max(self.gpu)}
               if self.gpu else {"gpu_util": "no GPU (nvidia-smi absent)" if self.gpu is None else "no samples"})
        return {"peak_pss_mb_by_kind": self.peak, "peak_pss_mb": self.peak_total,
                "peak_pss_mb_per_compositor": self.peak_compositor, **gpu}


def _thread_sched(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (ns on a CPU, ns runnable but waiting for a CPU) of each thread of `pid`
    (/proc/PID/task/TID/schedstat; empty where it cannot be read)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns, wait_ns = (int(x) for x in f.read().split()[:2])
            out[int(tid)] = (run_ns, wait_ns)
        except (OSError, ValueError):
            pass
    return out


def render_thread_shares(before: dict[int, dict], after: dict[int, dict], wall_s: float) -> dict:
    """Where each compositor's render thread (its thread with the most CPU in the run) spent the
    run, averaged over compositors: on a CPU, runnable but waiting for a CPU (the machine's
    contention, not the design's), and blocked (waiting for the model's batch, the encoder's pipe
    or the disk: the compositor's real idle share). Robust to a loaded machine, unlike CPU / wall."""
    shares = []
    for pid, threads in after.items():
        deltas = [(run - before.get(pid, {}).get(tid, (0, 0))[0], wait - before.get(pid, {}).get(tid, (0, 0))[1])
                  for tid, (run, wait) in threads.items()]
        if not deltas:
            continue
        run, wait = max(deltas)
        on, queued = run / 1e9 / wall_s, wait / 1e9 / wall_s
        shares.append((on, queued, max(0.0, 1 - on - queued)))
    if not shares:
        return {}
    n = len(shares)
    return {"on_cpu": sum(s[0] for s in shares) / n, "waiting_for_cpu": sum(s[1] for s in shares) / n,
            "blocked": sum(s[2] for s in shares) / n}


def worker_busy_share(before: list[dict], after: list[dict], wall_s: float) -> float | None:
    """The largest share of `wall_s` a model worker spent running batches (`generate`: its
    `info()["busy_s"]` between two pool snapshots). A worker runs one job batch at a time, so near
    1 it is the pool's serial limit (the model, or the CPU around it)."""
    if wall_s <= 0 or not after:
        return None
    was = {m.get("name"): m.get("busy_s") or 0.0 for m in before}
    return max(((m.get("busy_s") or 0.0) - was.get(m.get("name"), 0.0)) / wall_s for m in after)


def compositor_waits(before: list[dict], after: list[dict]) -> dict | None:
    """Of the time the compositors spent rendering chunks between two pool snapshots (each
    compositor's `info()["rendered"]`), the share their render thread waited for the model's
    answers and for the encoder to take frames."""
    was = {c.get("name"): c.get("rendered") or {} for c in before}
    spent = {"seconds": 0.0, "waited_model_s": 0.0, "waited_encoder_s": 0.0}
    for c in after:
        now, then = c.get("rendered") or {}, was.get(c.get("name"), {})
        for key in spent:
            spent[key] += now.get(key, 0.0) - then.get(key, 0.0)
    if spent["seconds"] <= 0:
        return None
    return {"model": spent["waited_model_s"] / spent["seconds"],
            "encoder": spent["waited_encoder_s"] / spent["seconds"], "chunk_seconds": spent["seconds"]}


# --- the runs -------------------------------------------------------------------------------
def _wait_for_frame_file(cache: Path, timeout: float) -> None:
    """Until the template's frame file (built beside the avatar's first render) is in the node
    cache, so the measured job reads it from its first chunk."""
    deadline = time.monotonic() + timeout
    while not any(cache.glob("frames-*.i420")):
        if time.monotonic() > deadline:
            print(f"warning: no template frame file in {cache} within {timeout:g} s", file=sys.stderr)
            return
        time.sleep(0.2)


def _service_run(variant: str, model: str, inp, prep, work: Path) -> dict:
    """One warm service with `variant`'s thread setting: model loaded and avatar prepared, then
    the measured job."""
    from bench.classic import WarmService
    from cluster.schemas import RenderRequest

    os.environ.update(VARIANTS[variant])
    try:
        service = WarmService(work / f"storage-{variant}")
    finally:
        for name in VARIANTS[variant]:
            os.environ.pop(name, None)
    try:
        service.render(prep.audio, inp.video, model, str(work / "prepare.mp4"))  # model loaded, avatar prepared
        if VARIANTS[variant].get("LIPSYNC_FRAME_CACHE") != "false":  # and its frames cached on the node,
            service.render(prep.audio, inp.video, model, str(work / "prepare.mp4"))  # built at a second use
            _wait_for_frame_file(work / f"storage-{variant}" / "node-cache", 120.0)
        pool = service.rt.call("refresh", timeout=60)
        me = os.getpid()
        request = RenderRequest(audio=inp.audio, video=inp.video, output=str(work / f"out-{variant}.mp4"),
                                model=model)
        with KindSampler(me) as sampler:
            before = _snapshot(me)
            comp_pids = [pid for pid, (kind, _, _) in before.items() if kind == "compositor"]
            sched0 = {pid: _thread_sched(pid) for pid in comp_pids}
            t0 = time.perf_counter()
            status = service.rt.render(request, timeout=7200)
            wall = time.perf_counter() - t0
            sched1 = {pid: _thread_sched(pid) for pid in comp_pids}
            after = _snapshot(me)
        if status.state.value != "succeeded":
            raise RuntimeError(f"job {status.id} ended {status.state.value}: {status.error}")
        cpu = cpu_by_kind(before, after)
        comps = pool.get("compositors", [])
        now = service.rt.call("refresh", timeout=60)
        waits = compositor_waits(comps, now.get("compositors", []))
        return {"wall_s": wall, "frames": inp.frames, "fps": inp.frames / wall,
                "output_bytes": os.path.getsize(request.output), "compositor_waits": waits,
                "cpu_s_by_kind": cpu, "cpu_s": sum(cpu.values()),
                "compositor_busy_share": cpu["compositor"] / (wall * max(1, len(comps))),
                "model_worker_busy_share": worker_busy_share(pool.get("models", []), now.get("models", []), wall),
                "render_thread": render_thread_shares(sched0, sched1, wall),
                **sampler.figures(),
                "pool": {"model_workers": len(pool.get("models", [])), "compositors": len(comps),
                         "threads": comps[0].get("threads") if comps else None,
                         "ray_cpus": __import__("ray").cluster_resources().get("CPU")}}
    finally:
        service.close()


def _classic_peers(n: int, model: str, inp, work: Path) -> dict:
    """`n` classic pipelines on the same inputs, started at once as separate processes."""
    results: list = [None] * n

    def one(i: int) -> None:
        try:
            results[i] = run_measured([sys.executable, "-m", "bench.reference_pipeline", "--audio", inp.audio,
                                       "--video", inp.video, "-o", str(work / f"classic-{i}.mp4"), "--model", model],
                                      env=bench_env(str(work / f"classic-storage-{i}")))
        except Exception as e:  # noqa: BLE001 - reported below, with the others' results
            results[i] = e

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=7200)
    wall = time.perf_counter() - t0
    failed = [r for r in results if not isinstance(r, dict)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} classic pipelines failed: {failed[0]!r}")
    frames = n * inp.frames
    cpu = sum(r["cpu_s"] for r in results)
    return {"n": n, "wall_s": wall, "frames": frames, "fps": frames / wall, "cpu_s": cpu,
            "peak_pss_mb_sum": sum(r["peak_pss_mb"] for r in results)}


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None,
        variants: list[str] | None = None, classic: bool = True, publish: bool = True) -> dict:
    if quick:
        secs, size, template_s = (seconds or [4.0])[0], (640, 360), 2.0
        models, variants = models or ["builtin"], variants or ["sized"]
    else:
        secs, size, template_s = (seconds or [180.0])[0], (1280, 720), 10.0
        models, variants = models or list(MODELS), variants or ["sized", "decoded", "library", "ffmpeg"]
    started = machine()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-", dir=CACHE))
    results: dict = {"size": f"{size[0]}x{size[1]}", "speech_s": secs, "runs": []}
    try:
        inp = make_inputs(secs, size, template_s)
        prep = make_inputs(2.0, size, template_s)  # same template: prepares its avatar
        for model_name in models:
            model = model_spec(model_name)
            row: dict = {"model": model_name}
            for variant in variants:
                print(f"[throughput] {model_name}: warm service, {VARIANT_LABELS[variant]} ...", flush=True)
                row[variant] = _service_run(variant, model, inp, prep, work)
                print(f"[throughput] {model_name} {variant}: {row[variant]['fps']:.1f} frames/s", flush=True)
            n = row[variants[0]]["pool"]["compositors"]
            if classic:
                print(f"[throughput] {model_name}: {n} classic pipelines side by side ...", flush=True)
                row["classic"] = _classic_peers(n, model, inp, work)
            results["runs"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(results, variants, quick, started, publish)
    return results


def _percent(share: float | None) -> str:
    return f"{100 * share:.0f} %" if share is not None else ""


def _waits(w: dict | None) -> str:
    return f"{100 * w['model']:.0f} / {100 * w['encoder']:.0f} %" if w else ""


def _blocked(m: dict) -> str:
    t = m.get("render_thread")
    return f"{100 * t['blocked']:.0f} %" if t and "blocked" in t else "?"


def _shares(t: dict | None) -> str:
    return f"{100 * t['on_cpu']:.0f} / {100 * t['waiting_for_cpu']:.0f} / {100 * t['blocked']:.0f} %" if t else ""


def _report(results: dict, variants: list[str], quick: bool, started: dict, publish: bool = True) -> None:
    header = ["model", "run", "frames/s", "vs classic xN", "CPU ms/frame", *[f"{k} ms/frame" for k in KINDS],
              "compositor busy", "busiest model worker's share in batches",
              "render thread on CPU / waiting for a CPU / blocked",
              "chunks' time waiting for the model / the encoder",
              "peak PSS MiB", "per compositor MiB", "GPU util"]
    rows = []
    for r in results["runs"]:
        c = r.get("classic")
        for v in variants:
            m = r[v]
            f = m["frames"]
            gpu = (f"{m['gpu_util_mean_pct']:.0f} % (max {m['gpu_util_max_pct']:.0f} %)"
                   if "gpu_util_mean_pct" in m else m.get("gpu_util", ""))
            rows.append([r["model"], f"warm prepared, {VARIANT_LABELS[v]}", m["fps"],
                         f"{m['fps'] / c['fps']:.2f}x" if c else "", 1000 * m["cpu_s"] / f,
                         *[1000 * m["cpu_s_by_kind"][k] / f for k in KINDS],
                         f"{100 * m['compositor_busy_share']:.0f} %", _percent(m.get("model_worker_busy_share")),
                         _shares(m.get("render_thread")),
                         _waits(m.get("compositor_waits")),
                         m["peak_pss_mb"],
                         m["peak_pss_mb_per_compositor"], gpu])
        if c:
            rows.append([r["model"], f"{c['n']} classic pipelines side by side", c["fps"], "1x",
                         1000 * c["cpu_s"] / c["frames"], *[""] * len(KINDS), "", "", "", "", c["peak_pss_mb_sum"], "",
                         ""])
    pool = results["runs"][0][variants[0]]["pool"] if results["runs"] else {}
    table = md_table(header, rows)
    ratios = []
    for r in results["runs"]:
        for new, old, label in COMPARISONS:
            if new in r and old in r:
                a, b = r[new], r[old]
                ratios.append(f"{r['model']}: {label}: frames/s {a['fps'] / b['fps']:.2f}x, CPU per frame "
                              f"{a['cpu_s'] / b['cpu_s']:.2f}x, peak PSS {a['peak_pss_mb'] / b['peak_pss_mb']:.2f}x, "
                              f"output bytes {a['output_bytes'] / b['output_bytes']:.2f}x, render thread blocked "
                              f"{_blocked(a)} against {_blocked(b)}")
        if r.get("classic"):
            v = r[variants[0]]
            ratios.append(f"{r['model']}: warm service / {r['classic']['n']} classic pipelines: frames/s "
                          f"{v['fps'] / r['classic']['fps']:.2f}x, CPU per frame "
                          f"{(v['cpu_s'] / v['frames']) / (r['classic']['cpu_s'] / r['classic']['frames']):.2f}x, "
                          f"peak PSS {v['peak_pss_mb'] / r['classic']['peak_pss_mb_sum']:.2f}x")
    notes = (f"{results['speech_s']:g} s of speech ({results['size']}, 25 fps) per run. Pool: "
             f"{pool.get('model_workers')} model worker(s), {pool.get('compositors')} compositor(s) on "
             f"{pool.get('ray_cpus')} Ray CPUs; compositor thread plan {(pool.get('threads') or {}).get('plan')} "
             f"(OpenCV reads back {(pool.get('threads') or {}).get('opencv')}).\n\n"
             + "\n".join(f"- {x}" for x in ratios))
    print("\n".join(f"[throughput] {x}" for x in ratios), flush=True)
    if publish:
        write_result("throughput", results, table, notes=notes, started=started, quick=quick)
    else:  # an ad-hoc run (other models, fewer variants): its own file, the docs table left alone
        import json

        from bench.common import RESULTS

        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "throughput.adhoc.json"
        path.write_text(json.dumps({"command": " ".join(sys.argv), "machine": started, "figures": results},
                                   indent=2, default=str) + "\n")
        print(table + "\n\n" + notes)
        print(f"wrote {path.relative_to(Path(__file__).resolve().parent.parent)} (ad-hoc run: docs left alone)")


# --- per-chunk fixed costs (no Ray): what a chunk pays once, against what each frame pays -------
def _cpu() -> float:
    """CPU seconds of this process and its reaped children (ffmpeg encoders)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def chunk_costs(size: tuple[int, int] = (1280, 720), repeats: int = 5) -> dict:
    """Per-chunk fixed costs of a compositor at one thread per pool (its plan on 1 Ray CPU), in
    CPU and wall ms (median of `repeats`), in this process: opening the normalised template
    (container, packet count, first frame), the first batch after a seek against the next batch
    read in sequence, starting and closing an encoder (one frame), and per frame: decode and
    encode (50 frames); the encoder in this process (the default) and as an ffmpeg child, taking
    turns."""
    import statistics

    from cluster.config import Settings
    from cluster.media.decode import TemplateReader
    from cluster.media.encode import SegmentEncoder
    from cluster.media.normalize import normalize_template
    from cluster.threads import apply_thread_plan, thread_plan

    apply_thread_plan(thread_plan(1))
    work = Path(tempfile.mkdtemp(prefix="bench-chunk-costs-", dir=CACHE))
    try:
        s = Settings(storage_root=work / "storage")
        template = normalize_template(make_inputs(2.0, size, 10.0).video, s).path
        out: dict[str, list] = {}

        def timed(name: str, fn, *args) -> object:
            c0, t0 = _cpu(), time.perf_counter()
            got = fn(*args)
            out.setdefault(name, []).append((1000 * (_cpu() - c0), 1000 * (time.perf_counter() - t0)))
            return got

        encoders = {"in the compositor": s, "ffmpeg child": s.model_copy(update={"encode_in_process": False})}

        def encode(name: str, frames, n: int, settings) -> None:  # frames in sequence, batches of 16
            with SegmentEncoder(work / name, size[0], size[1], Fraction(25), settings) as enc:
                for k in range(0, n, 16):
                    enc.write_yuv(frames[k:min(n, k + 16)])  # I420, as render_chunk (read only: no copy)

        for _ in range(repeats):
            reader = timed("open template (container, packet count, first frame)", TemplateReader, template, s)
            timed("first batch of 16 after a seek (mid-template)", reader.read_yuv, range(103, 119))
            timed("next batch of 16 in sequence", reader.read_yuv, range(119, 135))
            frames = reader.read_yuv(range(135, 185))
            reader.close()
            for kind, settings in encoders.items():  # taking turns, so both meet the same load
                timed(f"encoder start + close (1 frame), {kind}", encode, "one.mp4", frames, 1, settings)
                timed(f"encoder, 50 frames, {kind}", encode, "fifty.mp4", frames, 50, settings)
        med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in out.items()}
        fixed_cpu = {kind: med["open template (container, packet count, first frame)"][0]
                     + med["first batch of 16 after a seek (mid-template)"][0]
                     - med["next batch of 16 in sequence"][0] + med[f"encoder start + close (1 frame), {kind}"][0]
                     for kind in encoders}
        enc_frame = {kind: (med[f"encoder, 50 frames, {kind}"][0] - med[f"encoder start + close (1 frame), {kind}"][0])
                     / 49 for kind in encoders}
        dec_frame = med["next batch of 16 in sequence"][0] / 16
        return {"size": f"{size[0]}x{size[1]}", "median_ms_cpu_wall": med, "fixed_cpu_ms_per_chunk": fixed_cpu,
                "decode_cpu_ms_per_frame": dec_frame, "encode_cpu_ms_per_frame": enc_frame}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def classic_only(n: int, seconds: float, models: list[str]) -> int:
    """`n` classic pipelines side by side on the 720p25 inputs, per model: the peer of a service
    run measured in another invocation (a GPU machine lent for minutes runs the steps apart)."""
    import json

    from bench.common import RESULTS

    started = machine()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-classic-", dir=CACHE))
    out = {"command": " ".join(sys.argv), "machine": started, "speech_s": seconds, "runs": []}
    try:
        inp = make_inputs(seconds, (1280, 720), 10.0)
        for name in models:
            print(f"[throughput] {name}: {n} classic pipelines side by side ...", flush=True)
            got = _classic_peers(n, model_spec(name), inp, work)
            print(f"[throughput] {name}: {got['fps']:.1f} frames/s, {1000 * got['cpu_s'] / got['frames']:.1f} "
                  f"CPU ms/frame, peak PSS {got['peak_pss_mb_sum']:.0f} MiB", flush=True)
            out["runs"].append({"model": name, "classic": got})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.classic.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Extra knobs beyond `python -m bench throughput`: any model spec (e.g. `latency:24:256`),
    the variants to run, no classic peers."""
    p = argparse.ArgumentParser(prog="python -m bench.throughput",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seconds", type=float)
    p.add_argument("--model", action="append", help="builtin, wav2lip96 or any model spec (repeatable)")
    p.add_argument("--variants", default="", help="comma-separated of " + ",".join(VARIANTS))
    p.add_argument("--no-classic", action="store_true")
    p.add_argument("--chunk-costs", action="store_true", help="only the per-chunk fixed costs (no Ray)")
    p.add_argument("--classic-only", type=int, metavar="N",
                   help="only N classic pipelines side by side (no service run; e.g. N from an earlier run's pool)")
    a = p.parse_args(argv)
    if a.chunk_costs:
        import json

        got = chunk_costs()
        for k, (c, w) in got.pop("median_ms_cpu_wall").items():
            print(f"{k:55s} CPU {c:7.1f} ms   wall {w:7.1f} ms")
        print(json.dumps(got, indent=1))
        return 0
    if a.classic_only:
        return classic_only(a.classic_only, a.seconds or 180.0, a.model or ["wav2lip96"])
    run(quick=a.quick, seconds=[a.seconds] if a.seconds else None, models=a.model,
        variants=[v for v in a.variants.split(",") if v] or None, classic=not a.no_classic,
        publish=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
