"""Throughput of the Ray runtime against the in-process render path, measured side by side.

One template (640x480 by default) and N seconds of speech; renders it
  1. in-process (`render_local`, no Ray),
  2. on the cluster with 1 model worker and 1 compositor,
  3. on the cluster with 2 model workers and 2 compositors,
  4. as two concurrent jobs on the cluster of (3),
and prints frames/s for each with ratios to (1). Each cluster configuration starts its own Ray.
Also prints what crosses the object store per frame (crop + mel + generated crop) against a
full frame, the data the design keeps out of the object store.

    python bench/bench_cluster.py [--seconds 12] [--size 640x480]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def cluster_run(settings, requests) -> float:
    import ray

    from actors.runtime import Runtime

    ray.init(num_cpus=8, namespace=settings.namespace, include_dashboard=False, log_to_driver=False)
    try:
        rt = Runtime(settings)
        rt.ready(timeout=300)
        t0 = time.perf_counter()
        jobs = [rt.submit(r) for r in requests]
        for j in jobs:
            st = rt.wait(j.id, timeout=3600)
            assert st.state.value == "succeeded", st.error
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--size", default="640x480")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as d:
        os.environ["LIPSYNC_STORAGE_ROOT"] = os.path.join(d, "storage")
        from cluster.config import Settings
        from cluster.faces.avatar import prepare_avatar
        from cluster.models import load_model
        from cluster.render import render_local
        from cluster.schemas import RenderRequest
        from cluster.synth import astronaut_template, speech_like, write_audio

        audio = write_audio(os.path.join(d, "a.wav"), speech_like(args.seconds, seed=5))
        video = astronaut_template(os.path.join(d, "t.mp4"), seconds=4.0, fps=25, size=(w, h))
        base = Settings()
        prepare_avatar(video, base)  # cached avatar: every run below measures rendering only
        frames = int(round(args.seconds * 25))

        def req(name):
            return RenderRequest(audio=audio, video=video, output=os.path.join(d, name))

        rows = []
        model = load_model("builtin", base)
        t0 = time.perf_counter()
        render_local(req("local.mp4"), base, model=model)
        rows.append(("in-process (no Ray)", frames, time.perf_counter() - t0))
        for workers in (1, 2):
            s = Settings(model_workers=workers, compositors=workers)
            rows.append((f"cluster {workers} worker(s) + {workers} compositor(s)", frames,
                         cluster_run(s, [req(f"c{workers}.mp4")])))
        s = Settings(model_workers=2, compositors=2)
        rows.append(("cluster 2+2, two jobs at once", 2 * frames, cluster_run(s, [req("j1.mp4"), req("j2.mp4")])))

        ref = rows[0][1] / rows[0][2]
        print(f"{'configuration':42s} {'frames':>7s} {'seconds':>8s} {'fps':>7s} {'vs in-process':>14s}")
        for name, n, sec in rows:
            print(f"{name:42s} {n:7d} {sec:8.1f} {n / sec:7.1f} {n / sec / ref:13.2f}x")
        s_ = model.size
        per_frame = 80 * 16 * 4 + 2 * s_ * s_ * 3
        print(f"object store per frame: {per_frame / 1024:.0f} KiB (mel + crop + generated crop at S={s_}) "
              f"vs a full frame {w * h * 3 / 1024:.0f} KiB; cores on this machine: {os.cpu_count()}")


if __name__ == "__main__":
    main()
