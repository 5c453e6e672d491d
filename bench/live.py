"""Benchmark: live sessions. Latency from an audio chunk's arrival at the session to the
publication of the live segment holding its frames (p50/p95/max), stalls (the playlist not
advancing for > 1 s), at real-time pacing (20 ms chunks), 640x360 avatar, built-in model.

Two sessions one after the other on the same warm embedded cluster, side by side: one alone, one
while batch jobs render on the same model worker and compositors (the live lane and the
session's own compositing against job batches). Targets: p50 <= 0.6 s, p95 <= 1.0 s, 0 stalls.

The chunks go to the session actor through Ray (`LiveSessionActor.append`, one call per chunk,
in order), as the service's socket handler does; the HTTP hop is not in these figures.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from bench.common import CACHE, make_inputs, md_table, write_result

CHUNK_S = 0.02


def _speech_pcm(path: str) -> bytes:
    from scipy.io import wavfile

    rate, data = wavfile.read(path)
    assert rate == 16000 and data.dtype == np.int16
    return data.astype("<i2").tobytes()


def _session(settings, avatar_id: str, pcm: bytes, label: str) -> dict:
    import ray

    from actors.live import live_registry, session_actor

    session_id = uuid.uuid4().hex[:16]
    ray.get(live_registry(settings).create.remote(session_id, avatar_id, "builtin", 16000, None), timeout=600)
    actor = session_actor(settings, session_id)
    chunk = int(16000 * CHUNK_S) * 2
    t0 = time.monotonic()
    waited = 0.0
    for i in range(0, len(pcm), chunk):
        answer = ray.get(actor.append.remote(pcm[i:i + chunk], i), timeout=30)
        while not answer["accepted"]:  # the session's buffer is full: it cannot keep real time
            time.sleep(0.05)
            waited += 0.05
            answer = ray.get(actor.append.remote(pcm[i:i + chunk], i), timeout=30)
        time.sleep(max(0.0, t0 + (i + chunk) / 32000 - time.monotonic()))
        if i % (chunk * 500) == 0:
            stats = ray.get(actor.view.remote(), timeout=30)
            print(f"[live] {label}: {i / 32000:.0f} s sent, p50 {stats['latency_p50_s']} p95 {stats['latency_p95_s']} "
                  f"stalls {stats['stalls']} faults {stats['model_faults']}", flush=True)
    ray.get(actor.finish.remote(), timeout=30)
    deadline = time.monotonic() + 120
    while (stats := ray.get(actor.view.remote(), timeout=30))["state"] not in ("ended", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"session {session_id} did not end: {stats}")
        time.sleep(0.5)
    stats["backpressure_waited_s"] = waited
    return stats


def _batch_load(service, inp, stop: threading.Event, work: Path, done: list) -> None:
    from cluster.schemas import RenderRequest

    i = 0
    while not stop.is_set():
        st = service.rt.render(RenderRequest(audio=inp.audio, video=inp.video, model="builtin",
                                             output=str(work / f"load{i % 2}.mp4")), timeout=3600)
        done.append(st.state.value)
        i += 1


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None) -> dict:
    from bench.classic import WarmService
    from cluster.faces.avatar import prepare_avatar

    speech_s = (seconds or [20.0 if quick else 300.0])[0]
    inp = make_inputs(speech_s, (640, 360), 4.0)
    load_inp = make_inputs(10.0, (640, 360), 4.0, variant=1)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-live-", dir=CACHE))
    service = WarmService(work / "warm")
    results: dict = {"size": "640x360", "speech_s": speech_s, "chunk_s": CHUNK_S, "model": "builtin", "runs": {}}
    try:
        avatar = prepare_avatar(inp.video, service.settings)
        pcm = _speech_pcm(inp.audio)
        results["runs"]["alone"] = _session(service.settings, avatar.id, pcm, "alone")
        print(f"[live] alone: {results['runs']['alone']}", flush=True)
        stop, done = threading.Event(), []
        loader = threading.Thread(target=_batch_load, args=(service, load_inp, stop, work, done), daemon=True)
        loader.start()
        time.sleep(5.0)  # the first job is rendering
        try:
            results["runs"]["with batch jobs"] = _session(service.settings, avatar.id, pcm, "with batch jobs")
        finally:
            stop.set()
            loader.join(600)
        results["runs"]["with batch jobs"]["batch_jobs_finished"] = len(done)
        results["runs"]["with batch jobs"]["batch_jobs_states"] = sorted(set(done))
        print(f"[live] with batch jobs: {results['runs']['with batch jobs']}", flush=True)
    finally:
        service.close()
        shutil.rmtree(work, ignore_errors=True)
    alone = results["runs"]["alone"]["latency_p50_s"] or float("nan")
    rows = []
    for label, r in results["runs"].items():
        p50, p95 = r["latency_p50_s"], r["latency_p95_s"]
        met = "met" if (p50 is not None and p50 <= 0.6 and p95 <= 1.0 and r["stalls"] == 0) else "NOT met"
        rows.append([label, r["seconds_received"], p50, p95, r["latency_max_s"], (p50 or float("nan")) / alone,
                     r["stalls"], r["longest_gap_s"], r["encoder_delay_p50_s"], r["model_faults"],
                     r.get("batch_jobs_finished", "-"), met])
    table = md_table(["session", "speech s", "latency p50 s", "p95 s", "max s", "p50 vs alone", "stalls",
                      "longest playlist gap s", "encoder delay p50 s", "batches without model",
                      "batch jobs done meanwhile", "target p50 <= 0.6, p95 <= 1.0, 0 stalls"], rows)
    notes = (f"{speech_s:g} s of speech per session sent in {CHUNK_S * 1000:.0f} ms chunks at real time to the "
             "session actor; 640x360 avatar (4 s template), built-in model, default live settings "
             "(batches of 4 frames, 0.48 s segments = 12-frame GOPs, x264 veryfast zerolatency). Latency = "
             "chunk arrival at the session -> the published playlist lists the segment holding its last frame; "
             "'encoder delay' = a segment's publication - when the batch closing it was handed to ffmpeg. "
             "The second session runs while 10 s batch jobs (640x360) render one after another.")
    write_result("live", results, table, notes, quick=quick)
    return results
