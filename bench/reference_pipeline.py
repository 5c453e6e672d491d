"""The classic single-process lip-sync pipeline, written plainly (the way Wav2Lip's inference.py does it).

The baseline of benchmark 1: read every template frame into memory with cv2, detect the face on
every frame (the same MTCNN models as the product), smooth the boxes over 5 frames, pad them by
(top 0, bottom 10, left 0, right 0), compute the same mel features, run the model in batches of
128, paste each generated face back as a hard box, write the frames to a temporary AVI with
`cv2.VideoWriter`, then mux it with the audio in one ffmpeg call.

    python -m bench.reference_pipeline --audio A --video V -o OUT.mp4 [--model builtin|X.onnx]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import cv2
import numpy as np

PADS = (0, 10, 0, 0)  # top, bottom, left, right
SMOOTH_FRAMES = 5
MODEL_BATCH = 128
DETECT_BATCH = 16


def read_frames(path: str) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise SystemExit(f"no frames in {path}")
    return frames, fps


def smoothed(boxes: np.ndarray, window: int) -> np.ndarray:
    out = boxes.copy()
    for i in range(len(boxes)):
        win = boxes[len(boxes) - window:] if i + window > len(boxes) else boxes[i:i + window]
        out[i] = np.mean(win, axis=0)
    return out


def detect_faces(frames: list[np.ndarray]) -> list[tuple[int, int, int, int]]:
    from cluster.faces.mtcnn import MTCNNDetector

    detector = MTCNNDetector()
    boxes = []
    for i in range(0, len(frames), DETECT_BATCH):
        for k, dets in enumerate(detector.detect_batch(frames[i:i + DETECT_BATCH])):
            if not dets:
                raise SystemExit(f"face not detected in frame {i + k}")
            boxes.append(dets[0].box)
    h, w = frames[0].shape[:2]
    top, bottom, left, right = PADS
    padded = []
    for x1, y1, x2, y2 in boxes:
        padded.append([max(0, y1 - top), min(h, y2 + bottom), max(0, x1 - left), min(w, x2 + right)])
    return [tuple(int(v) for v in b) for b in smoothed(np.array(padded, dtype=np.float64), SMOOTH_FRAMES)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audio", required=True)
    ap.add_argument("--video", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--model", default="builtin")
    args = ap.parse_args(argv)

    from fractions import Fraction

    from cluster.audio import load_audio, mel_windows, melspectrogram
    from cluster.media.ffmpeg import ffmpeg_binary
    from cluster.models import load_model
    from cluster.plan import frame_count_from_samples

    frames, fps = read_frames(args.video)
    boxes = detect_faces(frames)

    wav = load_audio(args.audio)
    mel = melspectrogram(wav)
    rate = Fraction(fps).limit_denominator(1001)
    n_out = frame_count_from_samples(len(wav), 16000, rate)
    windows = mel_windows(mel, rate, 0, n_out)

    model = load_model(args.model)
    size = model.size
    h, w = frames[0].shape[:2]
    with tempfile.TemporaryDirectory(prefix="classic-") as tmp:
        avi = os.path.join(tmp, "result.avi")
        writer = cv2.VideoWriter(avi, cv2.VideoWriter_fourcc(*"DIVX"), fps, (w, h))
        for b0 in range(0, n_out, MODEL_BATCH):
            idx = [i % len(frames) for i in range(b0, min(b0 + MODEL_BATCH, n_out))]
            crops = np.stack([cv2.resize(frames[i][y1:y2, x1:x2], (size, size))
                              for i in idx for (y1, y2, x1, x2) in [boxes[i]]])
            generated = model.generate(windows[b0:b0 + len(idx)], crops)
            for i, g in zip(idx, generated):
                y1, y2, x1, x2 = boxes[i]
                frame = frames[i].copy()
                frame[y1:y2, x1:x2] = cv2.resize(g, (x2 - x1, y2 - y1))
                writer.write(frame)
        writer.release()
        subprocess.run([ffmpeg_binary(), "-y", "-loglevel", "error", "-i", args.audio, "-i", avi,
                        "-strict", "-2", "-q:v", "1", args.output], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
