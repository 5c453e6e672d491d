"""Benchmark: live sessions. Latency from an audio chunk's arrival at the session to the
publication of the live segment holding its frames (p50/p95/max), stalls (the playlist not
advancing for > 1 s), at real-time pacing (20 ms chunks). Targets: p50 <= 0.6 s, p95 <= 1.0 s, 0 stalls.

Sections (all on one warm embedded cluster, one after the other; `--only a,b` runs some of them):

- `alone`, `batch`: 640x360 avatar, built-in model, 5 minutes of speech: one session alone, one while
  batch jobs render on the same model worker and compositors (the live lane and the session's own
  compositing against job batches);
- `720p`: the same figures for a 1280x720 avatar;
- `wav2lip`: the Wav2Lip-sized model (bench/wav2lip_sized.py) on the 640x360 avatar, with its
  real-time factor on this CPU: the model workers' busy seconds per second of video they generated
  (every frame of a live stream goes through the model, idle or not);
- `ramp`: 1, 2, 3, ... sessions at once (640x360, built-in), each paced at real time for a bounded
  time, until the first count where a session misses p95 <= 1 s or stalls: the largest count that
  holds is what this machine carries (`LIPSYNC_MAX_LIVE_SESSIONS` raised for it);
- `player`: glass-to-glass delay of a named player, hls.js (the web page's vendored copy, with the
  Live tab's settings) in Chromium, over the HTTP service: the session's playlist carries
  `#EXT-X-PROGRAM-DATE-TIME` = when the speech a segment shows arrived at the session
  (`LiveSession._speech_arrival`); for each frame Chromium presents (`requestVideoFrameCallback`),
  its media time -> hls.js's fragment -> that date, and the delay is the frame's display time less
  it. It includes the session (lookahead, batching, rendering, encoding, publication), the HTTP
  hop, hls.js's playlist polling and buffer (the Live tab's `liveSyncDuration`), MSE and decoding;
  not the client -> WebSocket -> session hop before the arrival (loopback).

Except `player`, the chunks go to the session actor through Ray (`LiveSessionActor.append`, one call
per chunk, in order), as the service's socket handler does; the HTTP hop is not in those figures.
A run of some sections keeps the others' figures from the last full results (bench/results/live.json),
each row saying when it was measured.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np

from bench.common import CACHE, RESULTS, make_inputs, md_table, model_spec, write_result

CHUNK_S = 0.02
SECTIONS = ("alone", "batch", "720p", "wav2lip", "ramp", "player")
#: seconds of speech per session: (full run, --quick)
SPEECH_S = {"alone": (300.0, 20.0), "720p": (40.0, 8.0), "wav2lip": (40.0, 8.0), "ramp": (30.0, 6.0),
            "player": (40.0, 10.0)}
RAMP_MAX = (8, 2)  # the most sessions at once the ramp tries (full, --quick)
TARGET_P50, TARGET_P95 = 0.6, 1.0
RUN_LABELS = {"alone": "alone", "batch": "with batch jobs", "720p": "720p alone", "wav2lip": "Wav2Lip-sized alone"}


def _speech_pcm(path: str) -> bytes:
    from scipy.io import wavfile

    rate, data = wavfile.read(path)
    assert rate == 16000 and data.dtype == np.int16
    return data.astype("<i2").tobytes()


def _session(settings, avatar_id: str, pcm: bytes, label: str, model: str = "builtin") -> dict:
    """One session fed `pcm` at real time through its actor; its final view (the actor is then removed)."""
    import ray

    from actors.live import live_registry, session_actor

    session_id = uuid.uuid4().hex[:16]
    ray.get(live_registry(settings).create.remote(session_id, avatar_id, model, 16000, None), timeout=600)
    actor = session_actor(settings, session_id)
    chunk = int(16000 * CHUNK_S) * 2
    try:
        t0 = time.monotonic()
        waited = 0.0
        for i in range(0, len(pcm), chunk):
            answer = ray.get(actor.append.remote(pcm[i:i + chunk], i), timeout=30)
            # the session's buffer is full (it cannot keep real time), or took a part: the rest again
            while not answer["accepted"] or answer["offset"] < i + chunk:
                time.sleep(0.05)
                waited += 0.05
                answer = ray.get(actor.append.remote(pcm[i:i + chunk], i), timeout=30)
            time.sleep(max(0.0, t0 + (i + chunk) / 32000 - time.monotonic()))
            if i % (chunk * 500) == 0:
                stats = ray.get(actor.view.remote(), timeout=30)
                print(f"[live] {label}: {i / 32000:.0f} s sent, p50 {stats['latency_p50_s']} p95 "
                      f"{stats['latency_p95_s']} stalls {stats['stalls']} faults {stats['model_faults']}", flush=True)
        ray.get(actor.finish.remote(), timeout=30)
        deadline = time.monotonic() + 120
        while (stats := ray.get(actor.view.remote(), timeout=30))["state"] not in ("ended", "failed"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"session {session_id} did not end: {stats}")
            time.sleep(0.5)
    finally:
        ray.kill(actor, no_restart=True)  # its process goes (the ramp runs many)
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


def _holds(r: dict) -> bool:
    return r.get("latency_p95_s") is not None and r["latency_p95_s"] <= TARGET_P95 and r["stalls"] == 0


# --- sections -----------------------------------------------------------------------------------
def _model_counters(service) -> tuple[int, float] | None:
    """(frames generated, busy wall seconds) summed over the model workers, or None."""
    try:
        models = service.rt.call("refresh", timeout=30)["models"]
        return (sum(m["frames"] for m in models),
                sum(m["frames"] / m["fps"] for m in models if m.get("fps")))
    except Exception as e:  # noqa: BLE001 - the figure is optional; say why it is missing
        print(f"[live] model counters unavailable: {e!r}", flush=True)
        return None


def _single(service, avatar_id: str, speech_s: float, label: str, model: str = "builtin",
            size: str = "640x360") -> dict:
    pcm = _speech_pcm(make_inputs(speech_s, (640, 360), 4.0).audio)
    before = _model_counters(service)
    r = _session(service.settings, avatar_id, pcm, label, model)
    after = _model_counters(service)
    if before and after and after[0] > before[0]:
        # the model's real-time factor: its workers' busy (wall) seconds per second of video it generated
        # (every live frame goes through it, idle or speaking; < 1 is faster than real time)
        frames, busy = after[0] - before[0], after[1] - before[1]
        r.update(model_frames=frames, model_busy_s=busy, model_rtf=busy / (frames / r["fps"]))
    r["size"] = size
    print(f"[live] {label}: {r}", flush=True)
    return r


def _with_batch_jobs(service, avatar_id: str, speech_s: float, work: Path) -> dict:
    load_inp = make_inputs(10.0, (640, 360), 4.0, variant=1)
    pcm = _speech_pcm(make_inputs(speech_s, (640, 360), 4.0).audio)
    stop, done = threading.Event(), []
    loader = threading.Thread(target=_batch_load, args=(service, load_inp, stop, work, done), daemon=True)
    loader.start()
    time.sleep(5.0)  # the first job is rendering
    try:
        r = _session(service.settings, avatar_id, pcm, "with batch jobs")
    finally:
        stop.set()
        loader.join(600)
    r.update(batch_jobs_finished=len(done), batch_jobs_states=sorted(set(done)), size="640x360")
    print(f"[live] with batch jobs: {r}", flush=True)
    return r


def _ramp(service, avatar_id: str, speech_s: float, counts: list[int], model: str = "builtin") -> dict:
    """`counts[0]`, `counts[1]`, ... sessions at once (1, 2, ... by default) until one count misses
    p95 <= 1 s or stalls."""
    pcm = _speech_pcm(make_inputs(speech_s, (640, 360), 4.0).audio)
    steps = []
    most = max(counts)
    for n in counts:
        results: list = [None] * n
        errors: list = []

        def one(k: int, n: int, results: list, errors: list) -> None:
            try:
                results[k] = _session(service.settings, avatar_id, pcm, f"ramp {n}: session {k + 1}", model)
            except Exception as e:  # noqa: BLE001 - the step fails, saying why
                errors.append(f"session {k + 1}: {e!r}"[:500])

        threads = [threading.Thread(target=one, args=(k, n, results, errors), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(speech_s * 3 + 300)
        runs = [r for r in results if r is not None]
        step = {"sessions": n, "speech_s": speech_s, "errors": errors + [f"session {k + 1}: did not finish"
                                                                        for k, r in enumerate(results)
                                                                        if r is None and not errors],
                "p50_worst_s": max((r["latency_p50_s"] or float("inf") for r in runs), default=None),
                "p95_worst_s": max((r["latency_p95_s"] or float("inf") for r in runs), default=None),
                "max_s": max((r["latency_max_s"] or float("inf") for r in runs), default=None),
                "stalls": sum(r["stalls"] for r in runs), "longest_gap_s": max((r["longest_gap_s"] for r in runs),
                                                                               default=None),
                "model_faults": sum(r["model_faults"] for r in runs),
                "backpressure_waited_s": max((r["backpressure_waited_s"] for r in runs), default=None),
                "runs": runs}
        step["holds"] = len(runs) == n and not step["errors"] and all(_holds(r) for r in runs)
        steps.append(step)
        print(f"[live] ramp {n}: {'holds' if step['holds'] else 'misses'} (p95 worst {step['p95_worst_s']}, "
              f"stalls {step['stalls']}, faults {step['model_faults']})", flush=True)
        if not step["holds"]:
            break
    held = [s["sessions"] for s in steps if s["holds"]]
    return {"speech_s": speech_s, "model": model, "counts": counts, "most_tried": most, "steps": steps,
            "sessions_held": max(held) if held else 0,
            "max_live_sessions": service.settings.max_live_sessions,
            "stopped": f"{steps[-1]['sessions']} at once missed" if steps and not steps[-1]["holds"]
            else f"the ramp's limit ({most}) reached"}


PLAYER_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>live player bench</title></head>
<body><video id="v" muted autoplay playsinline width="640"></video>
<script src="HLS_SCRIPT"></script>
<script>
"use strict";
window.samples = []; window.errors = []; window.waiting = []; window.loads = [];
const video = document.getElementById("v");
video.addEventListener("waiting", () => { window.waiting.push(Date.now()); });
const hls = new Hls(HLS_CONFIG);
window.hls = hls;
hls.on(Hls.Events.ERROR, (_e, d) => {
  if (d.fatal) window.errors.push(d.type + ": " + d.details + (d.error ? " (" + d.error.message + ")" : "")
                                  + (d.reason ? " " + d.reason : ""));
});
hls.on(Hls.Events.MANIFEST_PARSED, () => video.play().catch((e) => window.errors.push("play: " + e)));
// what hls.js loaded and when (LIPSYNC_BENCH_PLAYER_LOADS=<file> keeps it): playlists, then fragments/parts
hls.on(Hls.Events.LEVEL_LOADED, (_e, d) => {
  const x = d.details;
  window.loads.push(["L", Date.now(), x.endSN, x.partList ? x.partList.length : 0,
                     x.fragmentHint ? x.fragmentHint.sn : null, x.edge, video.currentTime]);
});
hls.on(Hls.Events.FRAG_LOADED, (_e, d) => {
  window.loads.push(["F", Date.now(), d.frag.sn, d.part ? d.part.index : null, video.currentTime]);
});
hls.loadSource(HLS_URL);
hls.attachMedia(video);
function fragmentAt(t) {
  const level = hls.levels[hls.currentLevel >= 0 ? hls.currentLevel : 0];
  const d = level && level.details;
  // the stream's in-progress segment (LL-HLS: the newest, listed by its part) is the fragment hint
  const frags = d ? (d.fragmentHint ? d.fragments.concat([d.fragmentHint]) : d.fragments) : [];
  for (const f of frags) if (t >= f.start - 0.001 && t < f.start + f.duration - 0.001) return f;
  return null;
}
function onFrame(now, meta) {
  // the frame's display time on the wall clock (Date.now()'s, as the server's dates)
  const shown = Date.now() - (performance.now() - meta.expectedDisplayTime);
  const f = fragmentAt(meta.mediaTime);
  const date = f && f.rawProgramDateTime ? f.programDateTime + (meta.mediaTime - f.start) * 1000 : null;
  window.samples.push([shown, meta.mediaTime, f ? f.sn : null, date, video.playbackRate, hls.latency]);
  video.requestVideoFrameCallback(onFrame);
}
video.requestVideoFrameCallback(onFrame);
</script></body></html>
"""


def _player_settings() -> tuple[str, str, float | None]:
    """(the vendored hls.js's URL path, the Live tab's hls.js configuration as written in live.js,
    the segment length the Live tab asks its sessions for)."""
    static = Path(__file__).resolve().parent.parent / "service" / "static"
    script = sorted(static.glob("vendor/hls.js-*/hls.light.min.js"))[-1]
    page = (static / "live.js").read_text()
    found = re.search(r"new window\.Hls\((\{.*?\})\);", page, re.S)
    if found is None:
        raise RuntimeError("the Live tab's hls.js settings were not found in service/static/live.js")
    segment = re.search(r"segment_seconds: ([0-9.]+)", page)
    segment_seconds = float(segment.group(1)) if segment else None
    return "/static/" + script.relative_to(static).as_posix(), found.group(1), segment_seconds


def _player(service, avatar_id: str, speech_s: float) -> dict:
    """hls.js in Chromium on a session fed over the service's WebSocket (the SDK): glass-to-glass."""
    import os

    from playwright.sync_api import sync_playwright

    from bench.first_segment import HttpService
    from cluster.client import Client

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    audio = make_inputs(speech_s, (640, 360), 4.0).audio
    script, config, segment_seconds = _player_settings()
    http = HttpService(warm=service)
    try:
        client = Client(http.url, http.token, timeout=60)
        live = client.live(avatar_id, segment_seconds=segment_seconds)
        page_url = f"{http.url}/bench/live-player.html"
        html = (PLAYER_PAGE.replace("HLS_SCRIPT", script).replace("HLS_CONFIG", config)
                .replace("HLS_URL", json.dumps(live.hls_url)))
        args = ["--autoplay-policy=no-user-gesture-required"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=args)
            try:
                page = browser.new_page()
                page.route(page_url, lambda route: route.fulfill(body=html, content_type="text/html"))
                page.goto(page_url)
                # the player plays (idle frames) before the speech starts: its steady state is measured
                page.wait_for_function("window.samples.length > 25 || window.errors.length > 0", timeout=120_000)
                if page.evaluate("window.errors"):
                    raise RuntimeError(f"hls.js: {page.evaluate('window.errors')}")
                sender: dict = {}
                thread = threading.Thread(target=lambda: sender.update(seconds=live.send_file(audio, realtime=True)),
                                          daemon=True)
                t_speech = time.time()
                thread.start()
                while thread.is_alive() and time.time() < t_speech + speech_s * 3 + 60:
                    page.wait_for_timeout(500)
                if "seconds" not in sender:
                    raise RuntimeError("the speech was not sent in time")
                live.wait_rendered(60)
                page.wait_for_timeout(4000)  # the player shows the last segments
                samples = page.evaluate("window.samples")
                if os.environ.get("LIPSYNC_BENCH_PLAYER_LOADS"):
                    Path(os.environ["LIPSYNC_BENCH_PLAYER_LOADS"]).write_text(json.dumps(page.evaluate("window.loads")))
                waiting = page.evaluate("window.waiting")
                quality = page.evaluate("(() => { const q = document.getElementById('v').getVideoPlaybackQuality();"
                                        " return [q.totalVideoFrames, q.droppedVideoFrames]; })()")
                errors = page.evaluate("window.errors")
            finally:
                browser.close()
        view = live.close().model_dump()
        client.close()
    finally:
        http.close()
    dated = [(s[0] - s[3]) / 1000 for s in samples if s[3] is not None]
    played = [s for s in samples if s[0] / 1000 >= t_speech]
    rates = sorted({round(s[4], 2) for s in played})
    behind = [s[5] for s in played if s[5] is not None]
    r = {"player": "hls.js " + script.split("hls.js-")[1].split("/")[0] + " in Chromium (headless)",
         "hls_config": " ".join(config.split()), "segment_seconds": segment_seconds, "speech_s": speech_s,
         "frames_sampled": len(samples),
         "frames_dated": len(dated), "waiting_events": sum(1 for w in waiting if w / 1000 >= t_speech),
         "hls_latency_p50_s": float(np.percentile(behind, 50)) if behind else None,
         "frames_total_dropped": quality, "errors": errors,
         "playback_rates": rates,
         "g2g_p50_s": float(np.percentile(dated, 50)) if dated else None,
         "g2g_p95_s": float(np.percentile(dated, 95)) if dated else None,
         "g2g_max_s": max(dated) if dated else None, "g2g_min_s": min(dated) if dated else None,
         "session": {k: view.get(k) for k in ("latency_p50_s", "latency_p95_s", "latency_max_s", "stalls",
                                              "longest_gap_s", "model_faults", "seconds_received")}}
    print(f"[live] player: {r}", flush=True)
    return r


# --- results -------------------------------------------------------------------------------------
def _previous() -> dict:
    """The last full run's figures, each section stamped with when it was measured."""
    path = RESULTS / "live.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    figures = doc.get("figures", {})
    for part in [*figures.get("runs", {}).values(), figures.get("ramp"), figures.get("player")]:
        if isinstance(part, dict):
            part.setdefault("measured", doc.get("date"))
            part.setdefault("command", doc.get("command"))
    return figures


def _report(results: dict, quick: bool, date: str) -> tuple[str, str]:
    runs = results["runs"]
    alone_run = runs.get("alone") or {}

    def stamp(label: str, r: dict) -> str:
        return label if r.get("measured", date) == date else f"{label} (measured {r['measured']})"

    def earlier(r: dict) -> str:
        return "" if r.get("measured", date) == date else f"measured {r['measured']}; "

    def vs_alone(r: dict):  # side by side in one run only
        if alone_run.get("measured", date) != r.get("measured", date) or not alone_run.get("latency_p50_s"):
            return "-"
        return (r["latency_p50_s"] or float("nan")) / alone_run["latency_p50_s"]

    rows = []
    for key, label in RUN_LABELS.items():
        r = runs.get(label)
        if r is None:
            continue
        p50, p95 = r["latency_p50_s"], r["latency_p95_s"]
        met = "met" if (p50 is not None and p50 <= TARGET_P50 and p95 <= TARGET_P95 and r["stalls"] == 0) else "NOT met"
        rows.append([stamp(label, r), r.get("size", "640x360"), "Wav2Lip-sized" if key == "wav2lip" else "built-in",
                     r["seconds_received"], p50, p95, r["latency_max_s"], vs_alone(r),
                     r["stalls"], r["longest_gap_s"], r["encoder_delay_p50_s"], r["model_faults"],
                     r.get("model_rtf", "-"), r.get("backpressure_waited_s", "-"), r.get("batch_jobs_finished", "-"),
                     met])
    header = ["session", "avatar", "model", "speech s", "latency p50 s", "p95 s", "max s", "p50 vs alone",
              "stalls", "longest playlist gap s", "encoder delay p50 s", "batches without model",
              "model RTF (busy s per video s)", "sender held back s", "batch jobs done meanwhile",
              "target p50 <= 0.6, p95 <= 1.0, 0 stalls"]
    parts = [md_table(header, rows)] if rows else []
    ramp = results.get("ramp")
    if ramp:
        rows = [[s["sessions"], s["speech_s"], s["p50_worst_s"], s["p95_worst_s"], s["max_s"], s["stalls"],
                 s["longest_gap_s"], s["model_faults"], s["backpressure_waited_s"],
                 "holds" if s["holds"] else "misses" + (f" ({'; '.join(s['errors'])})" if s["errors"] else "")]
                for s in ramp["steps"]]
        name = "Wav2Lip-sized" if "wav2lip" in str(ramp.get("model", "builtin")) else "built-in"
        parts.append(f"**Sessions at once** ({earlier(ramp)}640x360, {name}, each "
                     f"{ramp['speech_s']:g} s of speech at real time; stopped: {ramp['stopped']}): "
                     f"**{ramp['sessions_held']}** held p95 <= 1 s with 0 stalls.\n\n"
                     + md_table(["sessions at once", "speech s each", "worst p50 s", "worst p95 s", "max s",
                                 "stalls (all)", "longest playlist gap s", "batches without model (all)",
                                 "backpressure waited s (most)", "p95 <= 1 s, 0 stalls"], rows))
    player = results.get("player")
    if player:
        ses = player["session"]
        share = (player["g2g_p50_s"] - ses["latency_p50_s"]) if player["g2g_p50_s"] is not None \
            and ses.get("latency_p50_s") is not None else None
        segments = (f", its sessions' segments {player['segment_seconds']:g} s" if player.get("segment_seconds")
                    else "")
        parts.append(f"**Glass-to-glass** ({earlier(player)}{player['player']}, the Live tab's settings "
                     f"`{player['hls_config']}`{segments}):\n\n" + md_table(
                         ["player", "speech s", "glass-to-glass p50 s", "p95 s", "max s",
                          "session latency p50 s (same session)", "p95 s", "player's part of p50 s",
                          "hls.js latency p50 s", "frames dated", "waiting events during speech",
                          "frames shown / dropped", "playback rates seen"],
                         [[player["player"], player["speech_s"], player["g2g_p50_s"], player["g2g_p95_s"],
                           player["g2g_max_s"], ses["latency_p50_s"], ses["latency_p95_s"], share,
                           player.get("hls_latency_p50_s"), player["frames_dated"], player["waiting_events"],
                           "/".join(str(v) for v in player["frames_total_dropped"]),
                           ", ".join(f"{v:g}" for v in player["playback_rates"])]]))
    notes = ("Speech sent in 20 ms chunks at real time; default live settings (batches of 4 frames, 0.48 s segments "
             "= 12-frame GOPs, x264 veryfast zerolatency); templates 4 s. Latency = chunk arrival at the session -> "
             "the published playlist lists the segment holding its last frame; 'encoder delay' = a segment's "
             "publication - when the batch closing it was handed to ffmpeg. 'with batch jobs': while 10 s batch "
             "jobs (640x360) render one after another. 'model RTF': the model workers' busy (wall) seconds per "
             "second of video they generated during the session (every live frame, idle or speaking, goes through "
             "the model; < 1 is faster than real time; on a loaded machine busy wall time includes waiting for a "
             "core; batches the session gave up on after LIPSYNC_LIVE_BATCH_TIMEOUT_S count too). 'sender held back': "
             "seconds the sender waited because the session's buffer of unrendered speech was full (it could not "
             "keep real time). "
             "Ramp: n sessions started together (created one after another), each fed the same speech. "
             "Glass-to-glass: the playlist's #EXT-X-PROGRAM-DATE-TIME is the arrival at the session of the speech "
             "a segment shows; Chromium's requestVideoFrameCallback gives each presented frame's media time and "
             "display time, hls.js's fragment at that media time gives its date; delay = display time - date, over "
             "every presented frame of a segment showing speech. It includes the session, the HTTP hop, hls.js's "
             "playlist polling and its live buffer, MSE and decoding; not the hop from the client's WebSocket to "
             "the session (loopback). Rows not run in this invocation (`--only`) keep their figures from the last "
             "run, with their date.")
    return "\n\n".join(parts), notes


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None,
        only: list[str] | None = None, ramp: list[int] | None = None) -> dict:
    """`seconds`: each session's speech (every section; default `SPEECH_S`); `ramp`: the session
    counts the ramp tries (default 1..8, --quick 1..2), with `models[0]` (default the built-in one):
    on a GPU node, e.g. `--only ramp --ramp 1,4,8,12,16 --model wav2lip96 --seconds 20` gives the
    sessions one GPU holds (bench/gpu_node.sh runs it)."""
    import datetime as dt

    from bench.classic import WarmService
    from cluster.faces.avatar import prepare_avatar

    unknown = [s for s in only or () if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown live sections {unknown} (choose from {', '.join(SECTIONS)})")
    sections = [s for s in SECTIONS if s in (only or SECTIONS)]  # in this order whatever the order asked
    q = 1 if quick else 0
    speech = {k: v[q] for k, v in SPEECH_S.items()}
    if seconds:
        speech = {k: seconds[0] for k in speech}
    counts = ramp or list(range(1, RAMP_MAX[q] + 1))
    ramp_model = model_spec(models[0]) if models else "builtin"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results: dict = {} if quick else _previous()
    results.update(chunk_s=CHUNK_S, sections_run=sections)
    results.setdefault("runs", {})
    for stale in ("size", "speech_s", "model"):  # the first version's top-level figures
        results.pop(stale, None)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-live-", dir=CACHE))
    # the ramp runs more sessions at once than the default admits, by count and by measured load
    # (admission would refuse a third 640x360 session on 2 cores: the ramp measures what holds instead)
    service = WarmService(work / "warm", max_live_sessions=max(16, max(counts) + 1), live_cpu_share=1.0,
                          live_node_cpus=1000.0)
    failed: dict[str, str] = {}
    try:
        avatar = prepare_avatar(make_inputs(speech["alone"], (640, 360), 4.0).video, service.settings).id

        def hd_single():
            hd = prepare_avatar(make_inputs(speech["720p"], (1280, 720), 4.0).video, service.settings).id
            return _single(service, hd, speech["720p"], "720p alone", size="1280x720")

        runners = {  # section: (where its figures go, how they are measured)
            "alone": (("runs", "alone"), lambda: _single(service, avatar, speech["alone"], "alone")),
            "batch": (("runs", "with batch jobs"), lambda: _with_batch_jobs(service, avatar, speech["alone"], work)),
            "720p": (("runs", "720p alone"), hd_single),
            "wav2lip": (("runs", "Wav2Lip-sized alone"),
                        lambda: _single(service, avatar, speech["wav2lip"], "Wav2Lip-sized alone",
                                        model=model_spec("wav2lip96"))),
            "ramp": (("ramp",), lambda: _ramp(service, avatar, speech["ramp"], counts, ramp_model)),
            "player": (("player",), lambda: _player(service, avatar, speech["player"])),
        }
        for name in sections:
            where, measure = runners[name]
            t0 = time.monotonic()
            try:
                figures = {**measure(), "measured": date}
            except Exception as e:  # noqa: BLE001 - the other sections' figures are still written
                traceback.print_exc()
                failed[name] = f"{type(e).__name__}: {e}"[:500]
                continue
            print(f"[live] section {name}: {time.monotonic() - t0:.0f} s", flush=True)
            target = results
            for key in where[:-1]:
                target = target[key]
            target[where[-1]] = figures
    finally:
        service.close()
        shutil.rmtree(work, ignore_errors=True)
    results["failed"] = failed
    table, notes = _report(results, quick, date)
    if failed:
        notes += " **Failed in this run** (their rows, if any, are from before): " + "; ".join(
            f"{k}: {v}" for k, v in failed.items())
    write_result("live", results, table, notes, quick=quick)
    if failed:
        raise RuntimeError(f"live sections failed: {failed}")
    return results
