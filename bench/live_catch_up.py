"""Benchmark: a live session's latency before and after a fault, with and without catching up
(`LIPSYNC_LIVE_CATCH_UP`), measured as a user would: `python -m bench.live_catch_up`.

For each fault (a SIGKILL of the model worker; of the session's own actor, which its standby takes over)
and each setting, a real `lipsync serve` on a free loopback port (its own storage root and Ray:
tests/service_process.py's `ServiceProcess` with the service's own defaults on the real cores) runs one
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
    from tests.service_process import ServiceProcess

    service = ServiceProcess(root / f"service-{kill}-{catch_up}",
                             env={"LIPSYNC_LIVE_CATCH_UP": str(catch_up).lower()}, as_a_user=True).start()
    try:
        seen: dict = {}
        with Client(service.url, token=service.token) as client:
            avatar = client.prepare_avatar(face)
            session = client.live(avatar.id)
            stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(session.hls_url, seen, stop), daemon=True)
            watcher.start()
            sender = threading.Thread(target=session.send_file, args=(talk,), kwargs={"realtime": True})
            sender.start()
            time.sleep(KILL_AFTER_S)
            victim = next(iter(service.actor_pids("ray::ModelWorker")), None) if kill == "model" else \
                service.session_actor_pid(session.id)
            if victim is None:
                raise RuntimeError(f"no {kill} process of the service found")
            killed = time.time()
            os.kill(victim, signal.SIGKILL)
            sender.join(120)
            session.wait_rendered(timeout=120)
            time.sleep(1.5)
            stop.set()
            watcher.join(10)
            final = session.close()
    finally:
        service.stop(timeout=60)
        service.cleanup()
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
