"""Peak memory of a render versus audio length: it must stay flat (bounded by the batch).

Renders the same 320x240 template against 1 minute and 10 minutes of speech-like audio, each in
a fresh process (in-process render path, no Ray), and prints the peak RSS of the render process
(getrusage) and of its ffmpeg children (sampled with psutil every 50 ms) side by side, with the
ratios between the two lengths.

    python bench/bench_long_audio.py [--minutes 1 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, threading, time
import psutil
from cluster.config import Settings
from cluster.render import render_local
from cluster.schemas import RenderRequest
audio, video, out = sys.argv[1:4]
me, peak, stop = psutil.Process(), {"children": 0.0, "total": 0.0}, threading.Event()
def sample():  # RSS of this process plus its live ffmpeg children, every 50 ms
    while not stop.wait(0.05):
        kids = 0
        for c in me.children(recursive=True):
            try:  # a child caught between fork and exec still shows the parent's pages: skip it
                if "ffmpeg" in c.name():
                    kids += c.memory_info().rss
            except psutil.Error:
                pass
        peak["children"] = max(peak["children"], kids / 2**20)
        peak["total"] = max(peak["total"], (me.memory_info().rss + kids) / 2**20)
threading.Thread(target=sample, daemon=True).start()
t0 = time.time()
info = render_local(RenderRequest(audio=audio, video=video, output=out), Settings())
stop.set()
print(json.dumps({"seconds": time.time() - t0, "frames": info.video.frame_count,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_rss_mb": peak["children"], "total_rss_mb": peak["total"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0])
    args = ap.parse_args()
    from cluster.synth import astronaut_template, speech_like, write_audio

    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as d:
        env = {**os.environ, "LIPSYNC_STORAGE_ROOT": os.path.join(d, "storage")}
        video = astronaut_template(os.path.join(d, "t.mp4"), seconds=3.0, fps=25, size=(320, 240))
        rows = []
        for minutes in args.minutes:
            audio = write_audio(os.path.join(d, f"a{minutes}.wav"), speech_like(minutes * 60, seed=3))
            t0 = time.time()
            out = subprocess.run([sys.executable, "-c", CHILD, audio, video, os.path.join(d, f"o{minutes}.mp4")],
                                 env=env, capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                sys.exit(f"render of {minutes} min failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["minutes"] = minutes
            rows.append(r)
            print(f"{minutes:6.1f} min audio: {r['frames']:6d} frames in {r['seconds']:7.1f} s "
                  f"({r['frames'] / r['seconds']:6.1f} fps), peak RSS {r['rss_mb']:7.1f} MB, "
                  f"ffmpeg children peak {r['children_rss_mb']:6.1f} MB, "
                  f"process+children peak {r['total_rss_mb']:7.1f} MB "
                  f"(wall {time.time() - t0:.0f} s)")
        base = rows[0]
        for r in rows[1:]:
            print(f"ratio {r['minutes']:.0f} min / {base['minutes']:.0f} min: "
                  f"audio x{r['minutes'] / base['minutes']:.0f}, "
                  f"peak RSS x{r['rss_mb'] / base['rss_mb']:.2f}, "
                  f"ffmpeg children x{r['children_rss_mb'] / base['children_rss_mb']:.2f}, "
                  f"process+children x{r['total_rss_mb'] / base['total_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
