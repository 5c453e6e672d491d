"""Lip-sync quality and throughput of the in-process render path on a larger case.

Renders a 640x480, 25 fps astronaut template with head motion (4 s, so the ping-pong loop runs)
against 20 s of speech-like audio with pauses through `render_local` (normalise, MTCNN track,
built-in model, paste-back, H.264 encode, finalise), decodes the output and prints, one line per
metric, the same quality numbers as tests/test_lipsync_quality.py, plus the render throughput:
cold (avatar preparation included) and warm (a second job on the cached avatar).

    python bench/bench_quality.py [--seconds 20] [--size 640x480] [--skin-texture] [--closed-mouth] [--png strip.png]

`--skin-texture` draws fine skin texture (grain, pores, wrinkle lines) on the photo at the frame's
resolution (`cluster.synth.add_skin_texture`): with `--size 1920x1080` a face with high-frequency
detail at high resolution, on which `lip texture ratio` is the paste-back's test (target 0.92-1.1).
`--closed-mouth` closes the photo's smile first (`cluster.synth.close_mouth`): a template whose mouth
is closed, on which the opening must appear on speech and the silent frames stay the template.
The mouth's shape by vowel class: the opening's width / height on loud frames of rounded vowels
(/o/, /u/) and of spread ones (/i/, /e/), from the synthesised speech's own syllable plan.

`--png` writes a strip, one row per frame, of the lower face at full resolution, template | output:
the loudest frames of an /a/, a rounded and a spread vowel, a closure before a syllable (/m b p/:
the lips pressed together) and a frame in the middle of the longest pause.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import cv2
import numpy as np

SILENCE_FRACTION = 0.01  # as in tests/test_lipsync_quality.py


LOWER_FACE: tuple[float, float, float, float] = (0.22, 0.58, 0.78, 0.95)
"""The lower face in the canonical crop (x0, y0, x1, y1, normalised): what the strip shows."""


def _lower_face_box(matrix: np.ndarray, size: int, shape) -> tuple[int, int, int, int]:
    """Frame-pixel box (x0, y0, x1, y1) around `LOWER_FACE` of the aligned crop, clipped."""
    x0, y0, x1, y1 = (v * size for v in LOWER_FACE)
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=np.float64)
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    p = corners @ inv[:, :2].T + inv[:, 2]
    h, w = shape[:2]
    return (max(int(p[:, 0].min()), 0), max(int(p[:, 1].min()), 0),
            min(int(np.ceil(p[:, 0].max())), w), min(int(np.ceil(p[:, 1].max())), h))


def save_side_by_side(path: str, template: np.ndarray, output: np.ndarray, matrices: np.ndarray, size: int,
                      rows: list[tuple[str, int]]) -> None:
    """One row per (label, frame index): the lower face of template | output at full resolution
    (small frames, whose lower face is under 240 px high, are enlarged 2x nearest)."""
    tiles = []
    for label, i in rows:
        x0, y0, x1, y1 = _lower_face_box(matrices[i], size, template.shape[1:3])
        k = 1 if y1 - y0 >= 240 else 2
        pair = [cv2.resize(f[i, y0:y1, x0:x1], None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST)
                for f in (template, output)]
        row = np.hstack([pair[0], np.full((pair[0].shape[0], 6, 3), 255, np.uint8), pair[1]])
        cv2.putText(row, f"{label}, frame {i}: template | output", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7,
                    (255, 255, 255), 2, cv2.LINE_AA)
        tiles.append(row)
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 6), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    if not cv2.imwrite(path, np.vstack(tiles), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"cannot write {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="speech length")
    ap.add_argument("--template-seconds", type=float, default=4.0)
    ap.add_argument("--size", default="640x480", help="template WIDTHxHEIGHT")
    ap.add_argument("--skin-texture", action="store_true", help="fine skin texture drawn at the frame's resolution")
    ap.add_argument("--closed-mouth", action="store_true", help="the photo's smile closed: a closed-mouth template")
    ap.add_argument("--png", default=None, help="write the template|output strip of loud frames and a silent one")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    from cluster.audio import frame_energy, load_audio
    from cluster.config import Settings
    from cluster.faces.align import alignment_matrices
    from cluster.faces.avatar import prepare_avatar
    from cluster.media.decode import TemplateReader, iter_frames
    from cluster.models import load_model
    from cluster.plan import template_indices
    from cluster.quality import (
        best_lag,
        chin_motion,
        lip_sharpness,
        loudest,
        mouth_motion,
        opening_shape,
        pearson,
        psnr_outside_mask,
        seam_score,
    )
    try:  # added with issue 10's built-in model; absent when measuring an older checkout
        from cluster.quality import lip_texture_ratio
    except ImportError:
        lip_texture_ratio = None
    from cluster.render import render_local
    from cluster.schemas import RenderRequest
    from cluster.synth import astronaut_template, speech_like, speech_vowels, write_audio

    with tempfile.TemporaryDirectory(prefix="lipsync-bench-quality-") as d:
        s = Settings(storage_root=os.path.join(d, "storage"))
        video = astronaut_template(os.path.join(d, "template.mp4"), seconds=args.template_seconds, fps=25,
                                   size=(width, height), seed=5, skin_texture=args.skin_texture,
                                   **({"closed_mouth": True} if args.closed_mouth else {}))
        audio = write_audio(os.path.join(d, "speech.wav"), speech_like(args.seconds, seed=11))
        model = load_model("builtin", s)

        out_path = os.path.join(d, "output.mp4")
        t0 = time.monotonic()
        info = render_local(RenderRequest(audio=audio, video=video, output=out_path), s, model=model)
        cold = time.monotonic() - t0
        t0 = time.monotonic()
        render_local(RenderRequest(audio=audio, video=video, output=os.path.join(d, "again.mp4")), s, model=model)
        warm = time.monotonic() - t0

        output = np.concatenate(list(iter_frames(out_path, 64, s)))
        n = output.shape[0]
        avatar = prepare_avatar(video, s)
        indices = template_indices(0, n, avatar.frame_count, "pingpong")
        with TemplateReader(avatar.template_path, s) as reader:
            template = reader.read(indices)
        matrices = alignment_matrices(avatar.load_track().landmarks[indices], model.size)
        energy = frame_energy(load_audio(audio, s), avatar.info.video.fps, n)
        motion = mouth_motion(output, template, matrices, model.size)
        quiet = energy < SILENCE_FRACTION * float(energy.max())
        silent = quiet & np.roll(quiet, 1) & np.roll(quiet, -1)

        textured = (" skin-textured" if args.skin_texture else "") + (" closed-mouth" if args.closed_mouth else "")
        print(f"case                 : {width}x{height}{textured} template of {avatar.frame_count} frames, "
              f"{args.seconds:g} s speech -> {n} frames ({info.video.frame_count} in the file), "
              f"model {model.size}px, crf {s.crf}")
        print(f"pearson              : {pearson(motion, energy):.3f}   (target >= 0.6)")
        print(f"best lag             : {best_lag(motion, energy)} frames   (target 0 +- 1)")
        print(f"psnr outside mask    : {psnr_outside_mask(output, template, matrices, model.size):.2f} dB   "
              f"(target >= 40)")
        print(f"seam score output    : {seam_score(output, matrices, model.size):.3f}")
        print(f"seam score untouched : {seam_score(template, matrices, model.size):.3f}   (output <= 1.1x)")
        print(f"silent mouth diff    : mean {motion[silent].mean():.2f}, max {motion[silent].max():.2f} levels "
              f"over {silent.sum()} frames   (target mean < 2)")
        print(f"speech mouth diff    : mean {motion[~quiet].mean():.2f} levels over {(~quiet).sum()} frames")
        chin = chin_motion(output, template, matrices, model.size)
        sharp = lip_sharpness(output, matrices, model.size) / lip_sharpness(template, matrices, model.size)
        top = loudest(energy, 0.2)
        print(f"chin change          : loudest fifth {chin[top].mean():.2f} / silent {chin[silent].mean():.2f} = "
              f"{chin[top].mean() / max(chin[silent].mean(), 1e-9):.2f}x, r with speech "
              f"{pearson(chin, energy):.3f}   (targets >= 2.5x, r >= 0.5; before issue 10: 1.33x)")
        print(f"lip sharpness ratio  : loudest fifth {np.median(sharp[top]):.3f}, silent {np.median(sharp[silent]):.3f}"
              f"   (no target since issue 22: it counts the template's teeth edges, which a rounded vowel's lips "
              f"now cover; the texture ratio below is the measure)")
        if lip_texture_ratio is not None:
            texture = lip_texture_ratio(output, template, matrices, model.size)
            print(f"lip texture ratio    : loudest fifth {np.median(texture[top]):.3f}, "
                  f"silent {np.median(texture[silent]):.3f}   (as above without the open mouth's inside; "
                  f"target 0.92-1.1 loud)")
        # the mouth's shape by vowel class: loud frames (the loudest half of the speech) whose time
        # lies inside a syllable of that vowel
        fps = float(avatar.info.video.fps)
        vowel_at = np.full(n, "", dtype=object)
        for t0_s, t1_s, v in speech_vowels(args.seconds, seed=11):
            vowel_at[int(np.ceil(t0_s * fps)):int(np.floor(t1_s * fps))] = v
        shape = opening_shape(output, template, matrices, model.size)
        ratio = shape[:, 0] / shape[:, 1]
        half = energy >= np.median(energy[~quiet]) if (~quiet).any() else ~quiet
        classes = {"rounded /o u/": ("o", "u"), "open /a/": ("a",), "spread /i e/": ("i", "e")}
        picks = {}
        for name, vowels in classes.items():
            sel = half & np.isin(vowel_at, vowels) & np.isfinite(ratio)
            picks[name] = sel
            print(f"opening w/h {name:<13}: median {np.median(ratio[sel]) if sel.any() else float('nan'):.2f} "
                  f"(width {np.nanmedian(shape[sel, 0]) if sel.any() else float('nan'):.0f} px, height "
                  f"{np.nanmedian(shape[sel, 1]) if sel.any() else float('nan'):.0f} px) over {sel.sum()} loud frames")
        try:  # added with issue 22's closures; absent when measuring an older checkout
            from cluster.quality import closure_frames
        except ImportError:
            closure_frames = None
        if closure_frames is not None:
            closures = closure_frames(energy)
            highest = np.nan_to_num(shape[closures, 1]).max() if closures.any() else 0.0
            print(f"closures /m b p/     : {closures.sum()} frames (near silence, next frame loud): mouth change "
                  f"mean {motion[closures].mean() if closures.any() else float('nan'):.2f} levels "
                  f"(silent {motion[silent].mean():.2f}), opening height max {highest:.0f} px "
                  f"(loud median {np.nanmedian(shape[half, 1]):.0f} px)")
        print(f"throughput cold      : {n / cold:.1f} frames/s ({cold:.1f} s, avatar preparation included)")
        print(f"throughput warm      : {n / warm:.1f} frames/s ({warm:.1f} s, cached avatar)")

        if args.png:
            rows = []
            for name, sel in picks.items():
                if sel.any():
                    i = int(np.flatnonzero(sel)[np.argmax(energy[sel])])
                    rows.append((f"loud {name}", i))
            if not rows:
                rows.append(("loud", int(np.argmax(energy))))
            runs = np.flatnonzero(np.diff(np.concatenate(([0], silent.astype(np.int8), [0]))))
            starts, stops = runs[::2], runs[1::2]
            k = int(np.argmax(stops - starts))
            pause = int((starts[k] + stops[k]) // 2)
            if closure_frames is not None and closure_frames(energy).any():
                closures = np.flatnonzero(closure_frames(energy))
                rows.append(("closure /m b p/", int(closures[np.argmax(energy[np.minimum(closures + 1, n - 1)])])))
            save_side_by_side(args.png, template, output, matrices, model.size, [*rows, ("silent", pause)])
            print(f"png                  : {args.png}")


if __name__ == "__main__":
    main()
