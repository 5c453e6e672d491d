"""Benchmark: a live session's latency before and after a fault, with and without catching up
(`LIPSYNC_LIVE_CATCH_UP`), measured as a user would: `python -m bench.live_catch_up`.

For each fault (a SIGKILL of the model worker; of the session's own actor, which its standby takes over)
and each setting, a real `lipsync serve` on a free loopback port (its own storage root and Ray) runs one
session fed 22 s of speech in real time through the SDK: 0.9 s phrases and 0.7 s of a quiet room, over
and over. The fault comes 5 s in. A poller reads the live playlist every 50 ms as a player would; a
segment's latency is when it first appeared less its `#EXT-X-PROGRAM-DATE-TIME` (when the speech its
first frame shows arrived at the session). Printed: the median latency of the segments seen before the
fault, in the 3 s after it, and from 3 s after it on; the seconds of pauses left out; speech received and
rendered. Four service starts: 4-5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

PHRASES = 14  # 0.9 s of speech + 0.7 s of a quiet room each: 22.4 s
KILL_AFTER_S = 5.0


def _media(root: Path) -> tuple[str, str]:
    import numpy as np

    from cluster.synth import astronaut_template, speech_like, write_audio

    face = root / "face.mp4"
    astronaut_template(str(face), seconds=2.0, fps=25, size=(320, 240))
    rng = np.random.default_rng(4)
    parts = []
    for i in range(PHRASES):
        parts.append(np.asarray(speech_like(0.9, seed=i), np.float32))
        parts.append((rng.standard_normal(int(0.7 * 16000)) * 3e-4).astype(np.float32))  # about -70 dBFS
    talk = write_audio(str(root / "talk.wav"), np.concatenate(parts))
    return str(face), talk


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _victim(serve_pid: int, kill: str, session_id: str) -> int:
    """The PID to SIGKILL: the model worker, or the session's actor (the parent of the ffmpeg that encodes
    its stream in `sessions/<id>/hls`)."""
    import psutil

    for child in _descendants(serve_pid):
        try:
            if kill == "model" and " ".join(child.cmdline()).startswith("ray::ModelWorker"):
                return child.pid
            if kill == "session" and child.name().startswith("ffmpeg") \
                    and child.cwd().endswith(f"/sessions/{session_id}/hls"):
                return child.ppid()
        except psutil.Error:
            continue
    raise RuntimeError(f"no {kill} process found")


def _watch(hls_url: str, seen: dict, stop: threading.Event) -> None:
    import httpx

    pattern = re.compile(r"#EXT-X-PROGRAM-DATE-TIME:(\S+)\n(?:#[^\n]*\n)*?#EXTINF[^\n]*\n(\S+)")
    while not stop.is_set():
        try:
            text = httpx.get(hls_url, timeout=10).text
        except httpx.HTTPError:
            stop.wait(0.05)
            continue
        now = time.time()
        for m in pattern.finditer(text):
            if m.group(2) not in seen:
                arrived = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
                seen[m.group(2)] = (now, now - arrived)
        stop.wait(0.05)


def one_run(root: Path, face: str, talk: str, kill: str, catch_up: bool) -> dict:
    import numpy as np

    from cluster.client import Client
    from cluster.ports import free_port

    port, token = free_port(), "bench-catch-up"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_") and k != "RAY_ADDRESS"}
    env.update(LIPSYNC_API_TOKEN=token, LIPSYNC_STORAGE_ROOT=str(root / f"store-{kill}-{catch_up}"),
               LIPSYNC_LIVE_CATCH_UP=str(catch_up).lower())
    ray_dir = tempfile.mkdtemp(prefix="lcu", dir="/tmp")
    log = open(root / f"serve-{kill}-{catch_up}.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--no-dashboard",
                              "--ray-temp-dir", ray_dir], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError(f"lipsync serve not ready (see {log.name})")
            time.sleep(1)
        seen: dict = {}
        with Client(url, token=token) as client:
            avatar = client.prepare_avatar(face)
            session = client.live(avatar.id)
            stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(session.hls_url, seen, stop), daemon=True)
            watcher.start()
            sender = threading.Thread(target=session.send_file, args=(talk,), kwargs={"realtime": True})
            sender.start()
            time.sleep(KILL_AFTER_S)
            killed = time.time()
            os.kill(_victim(serve.pid, kill, session.id), signal.SIGKILL)
            sender.join(120)
            session.wait_rendered(timeout=120)
            time.sleep(1.5)
            stop.set()
            watcher.join(10)
            final = session.close()
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(30)
        log.close()
    rows = sorted(seen.values())

    def median(a: float, b: float) -> float | None:
        values = [lat for t, lat in rows if a <= t - killed < b]
        return round(float(np.median(values)), 2) if values else None

    return {"kill": kill, "catch_up": catch_up, "before_s": median(-1e9, 0), "first_3s_s": median(0, 3),
            "after_3s_s": median(3, 1e9), "seconds_skipped": final.seconds_skipped,
            "received": final.seconds_received, "rendered": final.seconds_rendered,
            "model_faults": final.model_faults, "restarts": final.restarts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill", choices=("model", "session"), action="append",
                        help="the faults to run (default both)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-catch-up-"))
    face, talk = _media(root)
    results = [one_run(root, face, talk, kill, catch_up)
               for kill in (args.kill or ["model", "session"]) for catch_up in (False, True)]
    print(f"\n_Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `python -m bench.live_catch_up` "
          f"on {os.cpu_count()} cores, 1-min load at the end {os.getloadavg()[0]:.1f}._\n")
    print("| SIGKILLed | catch-up | latency before (s) | first 3 s after (s) | from 3 s after on (s) | pauses left "
          "out (s) | speech received / rendered (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {'model worker' if r['kill'] == 'model' else 'session actor (takeover)'} | "
              f"{'on' if r['catch_up'] else 'off'} | {r['before_s']} | {r['first_3s_s']} | {r['after_3s_s']} | "
              f"{r['seconds_skipped']} | {r['received']} / {r['rendered']} |")
    print("\n" + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
