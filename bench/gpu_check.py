"""One short check of GPU execution, for a machine with an NVIDIA GPU (issue 10).

Prints and writes to `bench/results/gpu_check-<UTC time>.json` (rewritten after every step, so
a run cut short keeps what it measured):
1. providers: what onnxruntime offers, the device facts (CUDA devices, memory, TensorRT
   runtime), and what `select_providers` picks by default and with `tensorrt,cuda,cpu`;
2. the Wav2Lip-sized benchmark model (bench/wav2lip_sized.py: Wav2Lip-96's layers, random
   weights, about 36 M parameters) at batch 1, 16 and 64 on CUDA, float32 and a float16 copy: load and warm-up seconds,
   latency per batch and frames per second, and that every run used the padded batch shape;
3. a 2-worker render through the real runtime (the `lipsync render` CLI on an embedded Ray:
   2 model workers with half a GPU each, so both share the GPU with a memory limit);
4. the same model on TensorRT when onnxruntime offers it and libnvinfer loads (engine build
   time at warm-up, then batch 16 and 64), engines cached under the run's storage root.

    python bench/gpu_check.py [--out bench/results] [--iters 20] [--skip-render] [--skip-tensorrt]

On a machine without a GPU it says so, measures nothing on CUDA, and exits 0.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.wav2lip_sized import build_wav2lip_sized, parameter_count  # noqa: E402

BATCHES = (1, 16, 64)


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)


def float16_copy(src: str, dst: str) -> str:
    """A float16 export of a float32 model: float16 inputs, output and weights (what converters
    emit with keep_io_types off)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.load(src)
    for vi in [*m.graph.input, *m.graph.output]:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    for i, init in enumerate(m.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr.astype(np.float16), init.name))
    onnx.checker.check_model(m)
    onnx.save(m, dst)
    return dst


def _bench_model(path: str, settings, providers: list, batches, iters: int) -> list[dict]:
    from cluster.models import LipSyncModel

    rows = []
    for b in batches:
        t0 = time.monotonic()
        model = LipSyncModel.load(path, providers=providers, pad_batch=b)
        load_s = time.monotonic() - t0
        warm_s = model.warmup(b)
        shapes = []
        run = model._run

        def spy(mel, faces, shapes=shapes, run=run):
            shapes.append(mel.shape[0])
            return run(mel, faces)

        model._run = spy
        rng = np.random.default_rng(b)
        mel = rng.uniform(-4, 4, (b, 1, 80, 16)).astype(np.float32)
        crops = rng.integers(0, 256, (b, 96, 96, 3), dtype=np.uint8)
        model.generate(mel, crops)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model.generate(mel, crops)
            times.append(time.perf_counter() - t0)
        # the last batch of a chunk is smaller: it runs padded, at the same shape
        model.generate(mel[: max(1, b // 2 - 1)], crops[: max(1, b // 2 - 1)])
        lat = float(np.median(times))
        row = {"batch": b, "providers": model.providers, "precision": model.precision, "load_s": round(load_s, 2),
               "warmup_s": round(warm_s, 2), "latency_ms_median": round(1000 * lat, 2),
               "latency_ms_p90": round(1000 * float(np.percentile(times, 90)), 2),
               "frames_per_s": round(b / lat, 1), "shapes_seen": sorted(set(shapes))}
        print(f"  batch {b:3d}: {row['latency_ms_median']:8.2f} ms/batch  {row['frames_per_s']:8.1f} frames/s  "
              f"(warm-up {warm_s:.2f} s, providers {model.providers}, shapes {row['shapes_seen']})", flush=True)
        rows.append(row)
        del model
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-render", action="store_true")
    ap.add_argument("--skip-tensorrt", action="store_true")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="check this script without a GPU: the same steps on the CPU (batch 1 and 16, 2 runs)")
    args = ap.parse_args()

    import onnxruntime as ort

    from cluster.config import Settings
    from cluster.models.providers import CUDA, TENSORRT, device_facts, provider_name, select_providers, uses_gpu

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) / f"gpu_check-{stamp}.json"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    settings = Settings(storage_root=work / "storage")
    facts = device_facts()
    results: dict = {
        "when": stamp, "onnxruntime": ort.__version__, "available": list(facts.available),
        "cuda_devices": facts.cuda_devices, "device_memory_gib": [round(m / 2**30, 1) for m in facts.device_memory],
        "tensorrt_runtime": facts.tensorrt_runtime,
        "default_choice": [provider_name(p) for p in select_providers(None, settings, facts)],
        "tensorrt_choice": [provider_name(p) for p in select_providers(
            None, Settings(storage_root=settings.storage_root, providers="tensorrt,cuda,cpu"), facts)],
    }
    print(json.dumps(results, indent=2), flush=True)
    _save(results, out)
    dry = args.dry_run_cpu
    if dry:
        results["note"] = "dry run on the CPU: figures are not GPU figures"
    elif not uses_gpu(select_providers(None, settings, facts)):
        print("no usable CUDA device: nothing to measure on a GPU", flush=True)
        results["note"] = "no usable CUDA device"
        _save(results, out)
        return 0

    model32 = work / "wav2lip_sized.onnx"
    model16 = work / "wav2lip_sized_fp16.onnx"
    build_wav2lip_sized(model32)
    float16_copy(str(model32), str(model16))
    results["model_parameters_m"] = round(parameter_count() / 1e6, 1)

    cuda = ["CPUExecutionProvider"] if dry else [(CUDA, {"device_id": 0}), "CPUExecutionProvider"]
    for name, path in (("cuda_float32", model32), ("cuda_float16", model16)):
        print(f"{name}:", flush=True)
        try:
            results[name] = _bench_model(str(path), settings, cuda, BATCHES[:2] if dry else BATCHES,
                                         2 if dry else args.iters)
        except Exception as e:  # reported in the results, and the other steps still run
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  failed: {e}", flush=True)
        _save(results, out)

    if not args.skip_render:
        print("2-worker render (lipsync render, embedded Ray, 2 workers x 0.5 GPU):", flush=True)
        results["render_2_workers"] = _render(work, model32, gpus_per_worker=None if dry else 0.5)
        print(f"  {results['render_2_workers']}", flush=True)
        _save(results, out)

    if not args.skip_tensorrt and not dry:
        if TENSORRT in facts.available and facts.tensorrt_runtime:
            trt_settings = Settings(storage_root=settings.storage_root, providers="tensorrt,cuda,cpu")
            print("tensorrt_float32:", flush=True)
            try:
                results["tensorrt_float32"] = _bench_model(str(model32), trt_settings,
                                                           select_providers([0], trt_settings, facts), (16, 64),
                                                           args.iters)
            except Exception as e:
                results["tensorrt_float32"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"  failed: {e}", flush=True)
        else:
            results["tensorrt_float32"] = {"skipped": "TensorRT provider or libnvinfer not present"}
        _save(results, out)
    print(f"wrote {out}", flush=True)
    return 0


def _render(work: Path, model: Path, gpus_per_worker: float | None) -> dict:
    from cluster.config import Settings
    from cluster.synth import astronaut_template, speech_like, write_audio

    s = Settings(storage_root=work / "storage")
    video = astronaut_template(str(work / "template.mp4"), seconds=4.0, fps=25, size=(640, 480), settings=s)
    audio = write_audio(str(work / "speech.wav"), speech_like(12.0, seed=2), settings=s)
    env = {**os.environ, "LIPSYNC_STORAGE_ROOT": str(work / "storage"), "LIPSYNC_MODEL_WORKERS": "2",
           "LIPSYNC_MODEL": str(model),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    if gpus_per_worker is not None:
        env["LIPSYNC_WORKER_GPUS"] = str(gpus_per_worker)
    cmd = [sys.executable, "-m", "cluster.cli", "-v", "render", "--audio", audio, "--video", video,
           "-o", str(work / "out.mp4"), "-q"]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 300 s"}
    wall = time.monotonic() - t0
    logs = (p.stdout + p.stderr).splitlines()
    workers = [ln for ln in logs if "model worker" in ln and "providers=" in ln]
    return {"exit": p.returncode, "wall_s": round(wall, 1), "frames": 300,
            "frames_per_s_incl_startup": round(300 / wall, 1),
            "worker_lines": workers[-4:], "tail": logs[-5:] if p.returncode else []}


if __name__ == "__main__":
    sys.exit(main())
