"""Why float16 ran slower than float32 on CUDA (issue 19): the Wav2Lip-sized model in both
precisions, under CUDA provider options, on raw onnxruntime sessions (no adapter), for a GPU machine.

For each precision x options x batch it reports frames/s with numpy inputs (host -> device copies
each run, what the model worker does) and with I/O binding (inputs already on the GPU, output left
there: the model's own speed), and for each precision x options the nodes of the optimised graph
that ran off CUDA (Memcpy nodes onnxruntime inserts around a node placed on the CPU) and the Cast
nodes (an upcast would show as Cast to float).

    python bench/gpu_precision.py [--out bench/results] [--iters 20] [--dry-run-cpu]

Writes bench/results/gpu_precision-<UTC time>.json, rewritten after every row.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_check import _save, float16_copy  # noqa: E402
from bench.wav2lip_sized import build_wav2lip_sized  # noqa: E402

OPTIONS = {
    "default (EXHAUSTIVE, NCHW)": {},
    "prefer_nhwc": {"prefer_nhwc": "1"},
    "HEURISTIC": {"cudnn_conv_algo_search": "HEURISTIC"},
    "prefer_nhwc + HEURISTIC": {"prefer_nhwc": "1", "cudnn_conv_algo_search": "HEURISTIC"},
    "prefer_nhwc + max workspace": {"prefer_nhwc": "1", "cudnn_conv_use_max_workspace": "1"},
}
BATCHES = (16, 64)


def _graph_facts(optimized: Path) -> dict:
    import onnx

    m = onnx.load(str(optimized))
    ops = collections.Counter(n.op_type for n in m.graph.node)
    casts = collections.Counter(next((a.i for a in n.attribute if a.name == "to"), -1)
                                for n in m.graph.node if n.op_type == "Cast")
    return {"nodes": sum(ops.values()), "memcpy_nodes": ops.get("MemcpyToHost", 0) + ops.get("MemcpyFromHost", 0),
            "casts_to": {("float" if k == 1 else "float16" if k == 10 else str(k)): v for k, v in casts.items()},
            "transposes": ops.get("Transpose", 0), "top_ops": dict(ops.most_common(8))}


def _bench(path: Path, provider: list, batch: int, iters: int, dtype, device: str) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    t0 = time.monotonic()
    sess = ort.InferenceSession(str(path), so, providers=provider)
    load_s = time.monotonic() - t0
    rng = np.random.default_rng(batch)
    feeds = {"mel": rng.uniform(-4, 4, (batch, 1, 80, 16)).astype(dtype),
             "face": rng.uniform(0, 1, (batch, 6, 96, 96)).astype(dtype)}
    t0 = time.monotonic()
    sess.run(None, feeds)
    first_s = time.monotonic() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    row = {"batch": batch, "load_s": round(load_s, 2), "first_run_s": round(first_s, 2),
           "numpy_ms": round(1000 * float(np.median(times)), 2),
           "numpy_frames_per_s": round(batch / float(np.median(times)), 1)}
    if device == "cuda":
        binding = sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
        binding.bind_output("output", "cuda", 0)
        sess.run_with_iobinding(binding)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            times.append(time.perf_counter() - t0)
        row.update(bound_ms=round(1000 * float(np.median(times)), 2),
                   bound_frames_per_s=round(batch / float(np.median(times)), 1))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dry-run-cpu", action="store_true", help="check this script on the CPU (batch 4, 2 runs)")
    args = ap.parse_args()
    import onnxruntime as ort

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) / f"gpu_precision-{stamp}.json"
    work = Path(tempfile.mkdtemp(prefix="gpu-precision-"))
    m32, m16 = work / "w32.onnx", work / "w16.onnx"
    build_wav2lip_sized(m32)
    float16_copy(str(m32), str(m16))
    dry = args.dry_run_cpu
    results: dict = {"when": stamp, "onnxruntime": ort.__version__, "rows": [], "graphs": {}}
    options = {"cpu": {}} if dry else OPTIONS
    for prec, path, dtype in (("float32", m32, np.float32), ("float16", m16, np.float16)):
        for label, opts in options.items():
            provider = (["CPUExecutionProvider"] if dry
                        else [("CUDAExecutionProvider", {"device_id": 0, **opts}), "CPUExecutionProvider"])
            try:
                so = ort.SessionOptions()
                so.optimized_model_filepath = str(work / f"opt-{prec}-{len(results['graphs'])}.onnx")
                ort.InferenceSession(str(path), so, providers=provider)
                results["graphs"][f"{prec} {label}"] = _graph_facts(Path(so.optimized_model_filepath))
            except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
                results["graphs"][f"{prec} {label}"] = {"error": f"{type(e).__name__}: {e}"}
            for b in ((4,) if dry else BATCHES):
                try:
                    row = _bench(path, provider, b, 2 if dry else args.iters, dtype, "cpu" if dry else "cuda")
                except Exception as e:  # noqa: BLE001
                    row = {"batch": b, "error": f"{type(e).__name__}: {e}"}
                row = {"precision": prec, "options": label, **row}
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                _save(results, out)
    print(json.dumps(results["graphs"], indent=1), flush=True)
    _save(results, out)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
