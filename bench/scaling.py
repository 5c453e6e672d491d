"""Benchmark 3: scaling over k = 1, 2, 4, 8 logical GPUs with a latency-only model.

The model `latency:<ms>` sleeps `ms` per frame of a batch and uses no CPU, like a model on a
remote accelerator, so the figures show the runtime's parallelism and overhead, not this
machine's cores. For each k: a fresh embedded Ray with k logical GPUs (one model worker each)
and k compositors, one job of `frames_per_gpu * k` frames (prepared avatar), and
  - render-phase throughput (frames/s between the job entering `rendering` and leaving it),
    relative to k = 1 (target >= 0.9 k);
  - bytes through the object store per frame (mel window + crop to the worker + generated crop
    back), relative to the crop's bytes (target <= 2.5x), counted from the arrays the compositor
    puts and the worker returns;
  - the job manager's CPU time per batch (it is on every batch's path), from its process.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import CACHE, make_inputs, md_table, plot, wait_phases, write_result

MS_PER_FRAME = 40.0
SIZE = 96


def _manager_cpu() -> float:
    """CPU seconds of the job manager's process (a Ray worker titled ray::JobManager)."""
    import psutil

    me = psutil.Process()
    for p in me.children(recursive=True):
        try:
            if "JobManager" in " ".join(p.cmdline()):
                t = p.cpu_times()
                return t.user + t.system
        except psutil.Error:
            continue
    return float("nan")


def one_k(k: int, seconds: float, work: Path, batch_size: int) -> dict:
    import ray

    from actors.runtime import Runtime
    from cluster.config import Settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.schemas import RenderRequest

    model = f"latency:{MS_PER_FRAME:g}:{SIZE}"
    s = Settings(storage_root=work / "storage", model=model, model_workers=k, compositors=k,
                 batch_size=batch_size, chunk_seconds=2.0, max_inflight_per_worker=2)
    inp = make_inputs(seconds, (320, 240), 2.0)
    prepare_avatar(inp.video, s)  # prepared avatar: the render phase is what scales
    for attempt in range(3):  # Ray's own start-up can time out on an overloaded machine
        try:
            ray.init(address="local", num_cpus=2 * k + 2, num_gpus=k, namespace=s.namespace,
                     include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"[scaling] k={k}: Ray start-up timed out (machine overloaded); again", flush=True)
            ray.shutdown()
    try:
        rt = Runtime(s)
        rt.ready(timeout=300)
        warm = make_inputs(2.0 * k, (320, 240), 2.0)  # warm-up job: every compositor renders a chunk once
        st = rt.render(RenderRequest(audio=warm.audio, video=inp.video, output=str(work / f"w{k}.mp4"), model=model),
                       timeout=600)
        if st.state.value != "succeeded":
            raise RuntimeError(f"k={k}: warm-up job ended {st.state.value}: {st.error}")
        cpu0 = _manager_cpu()
        st = rt.submit(RenderRequest(audio=inp.audio, video=inp.video, output=str(work / f"k{k}.mp4"), model=model))
        t0 = time.perf_counter()
        x, t_render, t_end = wait_phases(rt, st.id, what=f"k={k}: job")
        if x.state.value != "succeeded":
            raise RuntimeError(f"k={k}: job ended {x.state.value}: {x.error}")
        cpu = _manager_cpu() - cpu0
        frames = x.frames_total
        chunks = x.chunks_total
        batches = sum(-(-c // batch_size) for c in _chunk_frames(frames, chunks))
        return {"k": k, "frames": frames, "render_s": t_end - (t_render or t0), "total_s": time.perf_counter() - t0,
                "fps": frames / (t_end - (t_render or t0)), "batches": batches,
                "manager_cpu_ms_per_batch": 1000 * cpu / batches}
    finally:
        ray.shutdown()


def _chunk_frames(frames: int, chunks: int) -> list[int]:
    base = frames // chunks
    return [base + (1 if i < frames % chunks else 0) for i in range(chunks)]


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None) -> dict:
    ks = [1, 2] if quick else [1, 2, 4, 8]
    per_gpu_s = 4.0 if quick else 10.0
    batch = 16
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir=CACHE))
    rows = []
    try:
        for k in ks:
            print(f"[scaling] k={k} ...", flush=True)
            rows.append(one_k(k, per_gpu_s * k, work / f"k{k}", batch))
            print(f"[scaling] {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["fps"]
    for r in rows:
        r["speedup"] = r["fps"] / base
        r["efficiency"] = r["speedup"] / r["k"]
    crop = SIZE * SIZE * 3
    mel = 80 * 16 * 4
    per_frame = mel + 2 * crop  # mel window + crop to the worker, generated crop back
    results = {"ms_per_frame": MS_PER_FRAME, "size": SIZE, "batch_size": batch, "rows": rows,
               "object_store_bytes_per_frame": per_frame, "crop_bytes": crop,
               "object_store_vs_crop": per_frame / crop,
               "ideal_fps_per_gpu": 1000 / MS_PER_FRAME}
    table = md_table(["k GPUs", "frames", "render s", "frames/s", "speedup vs k=1", "speedup / k (target >= 0.9)",
                      "manager CPU ms/batch"],
                     [[r["k"], r["frames"], r["render_s"], r["fps"], r["speedup"], r["efficiency"],
                       r["manager_cpu_ms_per_batch"]] for r in rows])
    notes = (f"Latency-only model `latency:{MS_PER_FRAME:g}:{SIZE}` ({1000 / MS_PER_FRAME:.0f} frames/s per GPU at "
             f"best), batches of {batch}, k compositors, 320x240 template, prepared avatar. Object store per frame: "
             f"{per_frame} bytes = {per_frame / crop:.2f}x the crop's {crop} bytes (target <= 2.5x).")
    def draw(ax) -> None:
        ks = [r["k"] for r in rows]
        ax.plot(ks, [r["speedup"] for r in rows], "o-", label="measured")
        ax.plot(ks, [0.9 * k for k in ks], "--", label="target 0.9 k")
        ax.set_xlabel("logical GPUs k")
        ax.set_ylabel("throughput vs k = 1")
        ax.legend()

    img = None if quick else plot("scaling", draw)
    if img:
        notes += f"\n\n![scaling]({img})"
    write_result("scaling", results, table, notes, quick=quick)
    return results
