"""Benchmark 2: the floor. Each stage alone on the same frames, as CPU-seconds per frame.

Stages: decode (template frames for every output frame), detect (face detection and tracking on
every template frame, as avatar preparation does it), crop, model, paste, encode (one H.264
segment), mux (concatenate + AAC + verify). The floor is their CPU-time sum over the cores the run
may use; end to end is a warm service (Ray and workers up) rendering the same job with a cold
avatar and with a prepared one. The template's normalisation is reported but is not in the floor
(it is work the classic pipeline does not do).
"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import CACHE, MODELS, make_inputs, md_table, model_spec, write_result

STAGES = ("decode", "detect", "crop", "model", "paste", "encode", "mux")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class _Clock:
    """CPU seconds of this process (all threads) plus its reaped children, per stage."""

    def __init__(self) -> None:
        self.cpu = {k: 0.0 for k in ("normalize", *STAGES)}

    def time(self, stage: str, fn, *args, **kwargs):
        p0, c0 = time.process_time(), _children_cpu()
        out = fn(*args, **kwargs)
        self.cpu[stage] += (time.process_time() - p0) + (_children_cpu() - c0)
        return out


def stage_costs(inp, model_name: str, work: Path) -> dict:
    from cluster.audio import load_audio, mel_windows, melspectrogram
    from cluster.config import Settings
    from cluster.faces.align import alignment_matrices, cut_crops_yuv, paste_back_yuv
    from cluster.faces.mtcnn import MTCNNDetector
    from cluster.faces.track import build_track
    from cluster.media.decode import TemplateReader, iter_frames
    from cluster.media.encode import SegmentEncoder
    from cluster.media.finalize import finalize_output
    from cluster.media.normalize import normalize_template
    from cluster.models import load_model
    from cluster.plan import frame_count_from_samples, template_indices

    s = Settings(storage_root=work / "storage")
    clock = _Clock()
    model = load_model(model_spec(model_name), s)
    model.warmup(s.batch_size)
    detector = MTCNNDetector()
    template = clock.time("normalize", normalize_template, inp.video, s)
    video = template.info.video
    fps = video.fps

    # decoding the template once for detection is part of "decode"; the frames stream batch by batch
    # into detection, as avatar preparation does it (holding all of them would cost page faults that
    # the product does not pay)
    it = iter_frames(template.path, s.batch_size, s)
    n_template = 0

    def decoded():
        nonlocal n_template
        while (b := clock.time("decode", next, it, None)) is not None:
            n_template += len(b)
            yield b

    decode_before = clock.cpu["decode"]
    dets = clock.time("detect", lambda: list(detector.detect_sequence(decoded(), s.detect_interval)))
    clock.cpu["detect"] -= clock.cpu["decode"] - decode_before  # the decoding inside it, counted above
    track = clock.time("detect", build_track, dets, (video.width, video.height), s.min_face_fraction,
                       fps=float(fps))
    del dets

    wav = load_audio(inp.audio, s)
    mel = melspectrogram(wav)
    total = frame_count_from_samples(len(wav), 16000, fps)
    seg = str(work / "segment.mp4")
    size = model.size
    # the pasted frames wait for the encode stage in a file, not in memory (720p: 1.4 MB a frame, 10 GB
    # for 300 s of speech); reading them back costs the encode stage a copy from the page cache
    spill, batches = work / "pasted.i420", []
    with TemplateReader(template.path, s) as reader, open(spill, "wb") as out:
        for b0 in range(0, total, s.batch_size):
            b1 = min(b0 + s.batch_size, total)
            idx = template_indices(b0, b1, n_template, "pingpong")
            frames = clock.time("decode", reader.read_yuv, idx)  # as render_chunk: I420 frames
            matrices = clock.time("crop", alignment_matrices, track.landmarks[idx], size)
            crops = clock.time("crop", cut_crops_yuv, frames, matrices, size)
            generated = clock.time("model", model.generate, mel_windows(mel, fps, b0, b1), crops)
            pasted = clock.time("paste", paste_back_yuv, frames, generated, matrices, size, original_crops=crops)
            pasted.tofile(out)
            batches.append(pasted.shape)

    def encode() -> None:
        # alone, after the other stages: the encoder's threads (x264's own, the in-process encoder's)
        # work while the caller goes on, so timed beside the loop their CPU fell into whichever stage
        # ran then (decode read 6.2 ms per frame and encode 0.5 at 720p)
        with SegmentEncoder(seg, video.width, video.height, fps, s) as encoder, open(spill, "rb") as f:
            for shape in batches:
                encoder.write_yuv(np.fromfile(f, np.uint8, count=int(np.prod(shape))).reshape(shape))
            encoder.close()

    try:
        clock.time("encode", encode)
    finally:  # up to 10 GB for 300 s of 720p: never left behind by a failed run
        spill.unlink(missing_ok=True)
    clock.time("mux", finalize_output, [seg], inp.audio, str(work / "out.mp4"), frames_expected=total,
               fps=fps, audio_duration=len(wav) / 16000, settings=s)
    return {"frames": total, "template_frames": n_template, "cpu_s": clock.cpu}


def run(quick: bool = False, seconds: list[float] | None = None, models: list[str] | None = None) -> dict:
    from bench.classic import WarmService

    if quick:
        secs, size, template_s, models = (seconds or [4.0])[0], (640, 360), 2.0, models or ["builtin"]
    else:
        secs, size, template_s, models = (seconds or [8.0])[0], (1280, 720), 10.0, models or list(MODELS)
    cores = len(os.sched_getaffinity(0))
    inp = make_inputs(secs, size, template_s)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-floor-", dir=CACHE))
    results = {"speech_s": secs, "size": f"{size[0]}x{size[1]}", "cores": cores, "models": {}}
    try:
        per_model = {}
        # once untimed: the first pass in a process pays one-time costs (codec and thread start-up, the
        # allocator's first growth) that made its decode read about 1.5 ms per frame more
        stage_costs(inp, models[0], work / "first-pass")
        for m in models:
            print(f"[floor] stages alone, {m} ...", flush=True)
            per_model[m] = stage_costs(inp, m, work / m)
        service = WarmService(work / "warm")
        try:
            for m in models:
                spec = model_spec(m)
                service.render(inp.audio, inp.video, spec, str(work / "warmup.mp4"))  # model loaded
                service.forget_avatars()
                cold = service.render(inp.audio, inp.video, spec, str(work / "cold.mp4"))
                prepared = service.render_phases(inp.audio, inp.video, spec, str(work / "prep.mp4"))
                c = per_model[m]
                floor_s = sum(c["cpu_s"][k] for k in STAGES) / cores
                render_floor_s = sum(c["cpu_s"][k] for k in STAGES if k != "detect") / cores
                per_frame = {k: c["cpu_s"][k] / c["frames"] for k in ("normalize", *STAGES)}
                dominant = max(STAGES, key=lambda k: c["cpu_s"][k])
                results["models"][m] = {
                    **c, "cpu_ms_per_frame": {k: 1000 * v for k, v in per_frame.items()},
                    "floor_s": floor_s, "render_floor_s": render_floor_s, "dominant": dominant,
                    "warm_cold_s": cold["wall_s"], "warm_prepared_s": prepared["wall_s"],
                    "cold_vs_floor": cold["wall_s"] / floor_s,
                    "prepared_vs_floor": prepared["wall_s"] / render_floor_s,
                    "render_phase_s": prepared["render_s"], "model_busy_fraction": prepared["model_busy_fraction"]}
                print(f"[floor] {m}: {results['models'][m]}", flush=True)
        finally:
            service.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(results, quick)
    return results


def _report(results: dict, quick: bool) -> None:
    rows = []
    for m, r in results["models"].items():
        ms = r["cpu_ms_per_frame"]
        rows.append([m, *(f"{ms[k]:.1f}" for k in STAGES), f"{ms['normalize']:.1f}", r["dominant"],
                     r["floor_s"], r["warm_cold_s"], f"{r['cold_vs_floor']:.2f}x",
                     r["render_floor_s"], r["warm_prepared_s"], f"{r['prepared_vs_floor']:.2f}x",
                     "n/a" if r["model_busy_fraction"] is None else f"{100 * r['model_busy_fraction']:.0f} %"])
    table = md_table(["model", *(f"{k} ms/f" for k in STAGES), "normalize ms/f (not in floor)", "dominant",
                      "floor s", "warm, cold avatar s", "vs floor (target <= 1.25x)",
                      "floor without detect s", "warm, prepared s", "vs floor",
                      "model busy, render phase (target >= 85 % Wav2Lip-sized)"], rows)
    notes = (f"{results['speech_s']:g} s of speech ({results['size']}, 25 fps); CPU milliseconds per output "
             f"frame for each stage run alone in one process; floor = CPU sum / {results['cores']} cores.")
    write_result("floor", results, table, notes, quick=quick)
