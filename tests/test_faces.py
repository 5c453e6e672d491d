"""Faces: MTCNN detection on a real photographed face, subject tracking, alignment, paste-back, avatars."""
from __future__ import annotations

import subprocess

import av
import cv2
import numpy as np
import pytest
from skimage import data as skdata

from cluster.config import Settings
from cluster.errors import InputNotFound, NoFace
from cluster.faces import align, canonical
from cluster.faces.avatar import load_avatar, prepare_avatar
from cluster.faces.mtcnn import FaceDetection, MTCNNDetector
from cluster.faces.track import FaceTrack, build_track, smooth_one_euro
from tests.helpers import psnr

W, H, FPS = 320, 240, 25


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_bgr() -> np.ndarray:
    """The astronaut's head (a real photograph), about 100 x 112 px, BGR."""
    rgb = skdata.astronaut()[30:230, 140:320]
    return cv2.resize(rgb[:, :, ::-1], (100, 112), interpolation=cv2.INTER_AREA)


def _background(seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    rng = np.random.default_rng(seed)
    bg = np.stack([90 + 40 * x / W, 110 + 30 * y / H, 130 - 20 * x / W], axis=2)
    bg = bg + rng.normal(0, 3, bg.shape)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _frame_with_face(face: np.ndarray, x: int, y: int, seed: int = 0) -> np.ndarray:
    frame = _background(seed)
    h, w = face.shape[:2]
    frame[y:y + h, x:x + w] = face
    return frame


def _shifts(n: int) -> list[tuple[int, int]]:
    """Small per-frame translations of the face (a slowly swaying head)."""
    return [(110 + round(4 * np.sin(i / 5)), 60 + round(2 * np.cos(i / 7))) for i in range(n)]


@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return MTCNNDetector()


@pytest.fixture(scope="module")
def template_video(tmp_path_factory, face_bgr) -> str:
    """A 2 s 320x240 H.264 clip of the face with small per-frame translations."""
    path = tmp_path_factory.mktemp("faces") / "template.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for i, (x, y) in enumerate(_shifts(2 * FPS)):
            frame = av.VideoFrame.from_ndarray(_frame_with_face(face_bgr, x, y, seed=i), format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _det(landmarks: np.ndarray, box: np.ndarray, score: float = 0.99) -> FaceDetection:
    return FaceDetection(box=np.asarray(box, np.float32), score=score,
                         landmarks=np.asarray(landmarks, np.float32))


def _synthetic_face(cx: float, cy: float, side: float) -> FaceDetection:
    """A detection whose landmarks are the canonical points scaled into a box of `side` at (cx, cy)."""
    lm = (canonical.CANONICAL_5PTS - 0.5) * side + np.array([cx, cy])
    return _det(lm, [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


# --- detection -------------------------------------------------------------------------------
def test_detector_finds_the_face_with_plausible_landmarks(detector, face_bgr):
    (x, y), (x2, y2) = (110, 60), (117, 63)
    frames = [_frame_with_face(face_bgr, x, y), _frame_with_face(face_bgr, x2, y2, seed=1)]
    results = detector.detect_batch(frames)
    assert [len(r) for r in results] == [1, 1]
    d = results[0][0]
    assert d.score > 0.9
    bx1, by1, bx2, by2 = d.box
    assert x - 10 < bx1 < bx2 < x + 110 and y - 15 < by1 < by2 < y + 125
    le, re, nose, lm, rm = d.landmarks
    assert le[0] < re[0] and lm[0] < rm[0]                   # image left first
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])    # eyes above nose above mouth
    eye_dist = re[0] - le[0]
    assert 0.25 * (bx2 - bx1) < eye_dist < 0.65 * (bx2 - bx1)
    assert np.all((d.landmarks >= d.box[:2]) & (d.landmarks <= d.box[2:]))
    # the landmarks follow the face: a (7, 3) px shift moves them by (7, 3) within 1.5 px
    moved = results[1][0].landmarks - d.landmarks
    assert np.abs(moved - np.array([x2 - x, y2 - y])).max() < 1.5
    # detect() on one frame agrees with detect_batch()
    single = detector.detect(frames[0])
    assert len(single) == 1 and np.allclose(single[0].landmarks, d.landmarks, atol=1e-3)


def test_detector_finds_nothing_without_a_face(detector, face_bgr):
    blank = _background(3)
    assert detector.detect(blank) == []
    # frames of two different sizes in one batch are handled
    small = cv2.resize(_frame_with_face(face_bgr, 110, 60), (240, 180), interpolation=cv2.INTER_AREA)
    res = detector.detect_batch([blank, small])
    assert res[0] == [] and len(res[1]) == 1


def test_detector_returns_its_working_memory_after_each_call(detector):
    """Detection's shapes vary from call to call; an onnxruntime arena would keep the largest in every
    process that ever prepared an avatar (about 115 MiB after a 720p template)."""
    for name, (session, _, _) in detector._sessions.items():
        assert not session.get_session_options().enable_cpu_mem_arena, name


def test_tracking_between_keyframes_follows_the_face_and_notices_its_loss(detector, face_bgr):
    """detect_sequence: full detection on keyframes, O-Net tracking between; a face gone from a
    tracked frame sends that frame to full detection (which finds nothing)."""
    spots = [(100 + 3 * i, 55 + 2 * i) for i in range(6)]
    frames = [_frame_with_face(face_bgr, x, y, seed=i) for i, (x, y) in enumerate(spots)] + [_background(9)]
    seq = list(detector.detect_sequence([np.stack(frames[:4]), np.stack(frames[4:])], keyframe_interval=3))
    full = detector.detect_batch(frames)
    assert len(seq) == 7 and seq[6] == [] and full[6] == []
    for tracked, detected in zip(seq[:6], full[:6]):
        assert len(tracked) == 1 and tracked[0].score > 0.9
        assert np.abs(tracked[0].landmarks - detected[0].landmarks).max() < 3.0  # within 3 px of a full detection


def test_the_faces_found_do_not_depend_on_how_the_frames_are_batched(detector, tmp_path):
    """A template's track must not depend on a performance knob: detect_sequence over the same clip
    in batches of 1, 3, 8 or 50 frames (prepare_avatar batches by `settings.batch_size`) gives the
    same faces, bit for bit. (With the keyframes' pyramid floor shared per batch, batches of 4 and 8
    gave crop matrices up to 1.7 px apart and mouths up to 58 levels apart after rendering.)"""
    from cluster.media.decode import iter_frames
    from cluster.synth import astronaut_template

    clip = astronaut_template(str(tmp_path / "face.mp4"), seconds=1.0, fps=25, size=(320, 240), seed=5)

    def faces(batch_size: int) -> list:
        return [[(d.box.tobytes(), d.landmarks.tobytes()) for d in frame]
                for frame in detector.detect_sequence(iter_frames(clip, batch_size, Settings()), 5)]

    one = faces(1)
    assert len(one) == 25 and all(len(f) == 1 for f in one)
    for batch_size in (3, 8, 50):
        assert faces(batch_size) == one, batch_size


def test_keyframes_look_for_faces_near_the_known_size_and_find_a_much_smaller_one_in_full():
    """Once a face is known, a keyframe's pyramid stops at half the smallest known face (cheaper);
    a keyframe that finds fewer faces than known is detected again down to the detector's min_face."""
    head = skdata.astronaut()[30:230, 140:320][:, :, ::-1]
    big = cv2.resize(head, (330, 370), interpolation=cv2.INTER_AREA)  # found at about 180 px
    small = cv2.resize(head, (60, 67), interpolation=cv2.INTER_AREA)  # found at about 32 px

    def frame(face, x, y):
        f = np.full((480, 640, 3), 120, np.uint8)
        f[y:y + face.shape[0], x:x + face.shape[1]] = face
        return f

    class Recording(MTCNNDetector):
        floors: list = []

        def detect_batch(self, frames, min_face=None):
            self.floors.append(min_face)
            return super().detect_batch(frames, min_face)

    det = Recording()
    frames = [frame(big, 100 + 4 * i, 50 + 2 * i) for i in range(5)] + [frame(small, 260, 180)] * 2
    seq = list(det.detect_sequence([np.stack(frames[:4]), np.stack(frames[4:])], keyframe_interval=5))
    big_size = seq[0][0].size
    assert det.floors[0] is None  # nothing known yet: the whole pyramid
    assert det.floors[1] == pytest.approx(0.5 * big_size)  # keyframe 5: only faces near the known size
    assert det.floors[2:] == [None]  # ... the small face is not among them: detected again in full
    assert [len(d) for d in seq] == [1] * 7
    assert all(d[0].size > 150 for d in seq[:5]) and all(d[0].size < 45 for d in seq[5:])
    # near the known size, the cheaper pyramid finds the same face as the whole one (landmarks within
    # 3 px on a 180 px face, as close as tracking keeps them: the candidate boxes differ a little)
    full, near = det.detect_batch([frames[2]])[0], det.detect_batch([frames[2]], min_face=0.5 * big_size)[0]
    assert len(full) == len(near) == 1 and np.abs(full[0].landmarks - near[0].landmarks).max() < 3.0


# --- tracking -------------------------------------------------------------------------------
def test_track_fills_a_gap_by_interpolation():
    dets = [[_synthetic_face(100 + 2 * t, 120, 100)] for t in range(30)]
    for t in range(10, 15):
        dets[t] = []
    track = build_track(dets, (W, H), 0.5)
    assert track.landmarks.shape == (30, 5, 2) and track.boxes.shape == (30, 4)
    assert track.detected.tolist() == [not 10 <= t < 15 for t in range(30)]
    truth = np.stack([_synthetic_face(100 + 2 * t, 120, 100).landmarks for t in range(30)])
    assert np.abs(track.landmarks - truth).max() < 1.0  # the missing frames continue the motion


def test_the_mouth_is_drawn_where_the_face_is_and_never_where_it_is_gone():
    """`FaceTrack.shown`: a detector's short miss (up to MAX_FILLED_GAP_FRAMES) is drawn where the
    track interpolates the face; a longer absence (the face out of the picture), and the frames
    before the first or after the last detection, are shown as they are."""
    from cluster.faces.track import MAX_FILLED_GAP_FRAMES

    present = [t not in (0, 1) and not 10 <= t < 10 + MAX_FILLED_GAP_FRAMES
               and not 30 <= t < 31 + MAX_FILLED_GAP_FRAMES and t < 55 for t in range(60)]
    dets = [[_synthetic_face(100, 120, 100)] if p else [] for p in present]
    track = build_track(dets, (W, H), 0.5)
    shown = track.shown.tolist()
    assert shown[:2] == [False, False] and shown[55:] == [False] * 5  # before the first, after the last
    assert all(shown[10:10 + MAX_FILLED_GAP_FRAMES])  # a short miss: interpolated, drawn
    assert not any(shown[30:31 + MAX_FILLED_GAP_FRAMES])  # gone a frame longer: left alone
    assert [t for t in range(60) if shown[t] != present[t]] == list(range(10, 10 + MAX_FILLED_GAP_FRAMES))


def test_subject_lost_for_long_is_joined_again():
    # the head turns away for 60 frames (longer than the linking gap) and returns elsewhere;
    # a small face in the background is seen throughout
    background = _synthetic_face(280, 40, 30)
    dets = [[background] + ([_synthetic_face(120, 120, 100)] if t < 20 else
                            [] if t < 80 else [_synthetic_face(180, 120, 95)]) for t in range(100)]
    track = build_track(dets, (W, H), 0.3)
    assert track.detected.sum() == 40
    assert np.abs(track.landmarks[-1] - _synthetic_face(180, 120, 95).landmarks).max() < 0.5
    assert np.abs(track.landmarks[0] - _synthetic_face(120, 120, 100).landmarks).max() < 0.5


def test_no_face_in_most_frames_raises_with_counts():
    dets = [[_synthetic_face(160, 120, 90)] if t < 4 else [] for t in range(20)]
    with pytest.raises(NoFace) as info:
        build_track(dets, (W, H), 0.5, path_for_errors="clip.mp4")
    assert "16 of 20 frames" in str(info.value) and "clip.mp4" in str(info.value)
    assert info.value.code == "input.no_face"


def test_a_smaller_background_face_does_not_take_over(detector, face_bgr):
    small_face = cv2.resize(face_bgr, (50, 56), interpolation=cv2.INTER_AREA)
    frame = _frame_with_face(face_bgr, 120, 70)
    frame[10:66, 10:60] = small_face
    dets = detector.detect(frame)
    assert len(dets) == 2  # the detector sees both faces
    big = max(dets, key=lambda d: d.size)
    small = min(dets, key=lambda d: d.size)
    # the small face is seen in every frame (first in frame 0), the subject is missed in a few
    seq = [[small, big] if t not in (3, 4, 5) else [small] for t in range(12)]
    track = build_track(seq, (W, H), 0.5)
    assert np.abs(track.landmarks - big.landmarks).max() < 0.5
    assert track.detected.sum() == 9


def test_smoothing_removes_jitter_and_keeps_motion():
    rng = np.random.default_rng(1)
    t = np.arange(100) / FPS
    static = np.stack([_synthetic_face(160, 120, 100).landmarks] * 100).astype(np.float64)
    noisy = static + rng.normal(0, 1.0, static.shape)
    smoothed = smooth_one_euro(noisy, FPS, 100.0)
    assert noisy[10:-10].std(axis=0).mean() > 0.8
    assert smoothed[10:-10].std(axis=0).mean() < 0.35
    motion = static + (15 * np.sin(2 * np.pi * 0.5 * t))[:, None, None]  # a head turn of +-15 px
    follows = smooth_one_euro(motion + rng.normal(0, 1.0, static.shape), FPS, 100.0)
    assert np.abs(follows - motion)[5:-5].mean() < 0.6


def test_static_face_video_jitter_after_smoothing(detector, face_bgr):
    rng = np.random.default_rng(2)
    frame = _frame_with_face(face_bgr, 110, 60)
    frames = [np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8) for _ in range(24)]
    dets = detector.detect_batch(frames)
    raw = np.stack([d[0].landmarks for d in dets])
    track = build_track(dets, (W, H), 0.5)
    assert raw.std(axis=0).mean() > track.landmarks.std(axis=0).mean()
    assert track.landmarks.std(axis=0).max() < 0.5


def test_track_save_load_roundtrip(tmp_path):
    track = build_track([[_synthetic_face(150 + t, 120, 80)] for t in range(8)], (W, H), 0.5)
    path = tmp_path / "t" / "track.npz"
    track.save(path)
    back = FaceTrack.load(path)
    assert np.array_equal(back.landmarks, track.landmarks) and np.array_equal(back.detected, track.detected)
    assert [p.name for p in path.parent.iterdir()] == ["track.npz"]  # no temp file left


# --- alignment and paste-back ---------------------------------------------------------------
def test_alignment_puts_the_mouth_at_the_canonical_place():
    rng = np.random.default_rng(3)
    size = 96
    lms = []
    for _ in range(5):
        angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.8, 3.0)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        lms.append(canonical.canonical_points(size) @ rot.T + rng.uniform(0, 200, 2) + rng.normal(0, 0.3, (5, 2)))
    lms = np.stack(lms)
    m = align.alignment_matrices(lms, size)
    assert m.shape == (5, 2, 3) and m.dtype == np.float32
    mapped = np.einsum("nij,nkj->nki", m[:, :, :2].astype(np.float64), lms) + m[:, None, :, 2]
    mouth_err = np.linalg.norm(mapped[:, 3:] - canonical.canonical_points(size)[3:], axis=2)
    assert mouth_err.max() < 1.0
    assert np.array_equal(m, align.alignment_matrices(lms, size))  # deterministic


def test_crops_and_paste_back(detector, face_bgr):
    size = 96
    frames = np.stack([_frame_with_face(face_bgr, x, y, seed=i) for i, (x, y) in enumerate(_shifts(3))])
    lms = np.stack([d[0].landmarks for d in detector.detect_batch(frames)])
    mats = align.alignment_matrices(lms, size)
    crops = align.cut_crops(frames, mats, size)
    assert crops.shape == (3, size, size, 3) and crops.dtype == np.uint8
    # a 3x larger frame (the strong-downscale path) gives the same crop
    big = np.stack([cv2.resize(f, (3 * W, 3 * H), interpolation=cv2.INTER_CUBIC) for f in frames])
    big_crops = align.cut_crops(big, align.alignment_matrices((lms + 0.5) * 3 - 0.5, size), size)
    assert np.abs(big_crops.astype(int) - crops).mean() < 4
    # the crop shows the face: detecting on the (upscaled) crop finds the mouth near its canonical place
    up = cv2.resize(crops[0], (4 * size, 4 * size), interpolation=cv2.INTER_CUBIC)
    found = detector.detect(up)
    assert found
    mouth = found[0].landmarks[3:].mean(axis=0) / 4
    assert np.linalg.norm(mouth - np.array(canonical.MOUTH_CENTER) * size) < 0.05 * size

    # mask: 1 on the mouth region, 0 at the crop edge, smooth
    mask = align.paste_mask(size)
    mx, my = (np.array(canonical.MOUTH_CENTER) * size).astype(int)
    c = (np.arange(size) + 0.5) / size
    gx, gy = np.meshgrid(c, c)
    rcx, rcy, rrx, rry = canonical.MOUTH_REGION
    assert np.all(mask[((gx - rcx) / rrx) ** 2 + ((gy - rcy) / rry) ** 2 <= 1] == 1.0)  # the model's region
    assert mask[my, mx] == 1.0 and mask[0].max() == mask[-1].max() == mask[:, 0].max() == mask[:, -1].max() == 0
    assert np.abs(np.diff(mask, axis=0)).max() < 0.36 and np.abs(np.diff(mask, axis=1)).max() < 0.36

    # generated == original: the original frames come back; outside the mask bit-identical
    same = align.paste_back(frames, crops.copy(), mats, size, original_crops=crops)
    assert np.abs(same.astype(int) - frames).max() <= 2
    # a changed mouth changes pixels only inside the warped mask, around the mouth
    changed = crops.copy()
    for c in changed:
        cv2.ellipse(c, (mx, my), (12, 6), 0, 0, 360, (30, 20, 60), -1)
    out = align.paste_back(frames, changed, mats, size, original_crops=crops)
    for i in range(3):
        inv = cv2.warpAffine(mask, mats[i], (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        outside = inv == 0
        assert np.array_equal(out[i][outside], frames[i][outside])
        diff = np.abs(out[i].astype(int) - frames[i]).max(axis=2)
        assert diff.max() > 60  # the dark mouth is there
        mouth_frame = cv2.invertAffineTransform(mats[i].astype(np.float64)) @ np.array([mx, my, 1.0])
        ys, xs = np.nonzero(diff > 0)
        assert np.hypot(xs - mouth_frame[0], ys - mouth_frame[1]).max() < 0.4 * (lms[i, 1, 0] - lms[i, 0, 0]) + 25
    # colour drift of the model output is matched to the surroundings
    drift = np.clip(crops * np.array([0.85, 1.0, 0.9]) + np.array([0, 12, 0]), 0, 255).astype(np.uint8)
    matched = align.paste_back(frames, drift, mats, size, original_crops=crops)
    assert np.abs(matched.astype(int) - frames).max() <= 4


# --- avatars --------------------------------------------------------------------------------
class CountingDetector(MTCNNDetector):
    """The real detector, counting the frames it detects in full and those it tracks."""
    calls = 0
    full_frames = 0
    tracked_frames = 0

    def detect_batch(self, frames, min_face=None):
        frames = list(frames)
        self.calls += 1
        self.full_frames += len(frames)
        return super().detect_batch(frames, min_face)

    def refine_batch(self, frames, candidates):
        frames = list(frames)
        self.tracked_frames += len(frames)
        return super().refine_batch(frames, candidates)


def test_a_large_face_is_prescaled_bilinearly_when_it_shrinks_little_and_still_not_aliased(monkeypatch):
    """`cut_crops` pre-scales a face region bilinearly where it shrinks it little
    (`PRESCALE_LINEAR_MIN`, a seventh of INTER_AREA's cost): the crop is INTER_AREA's within 45 dB
    on a photographed face, and stripes at the frame's finest frequency are filtered nearly as well
    as INTER_AREA filters them (1.3x the amplitude left), far better than by a warp without the
    pre-scale."""
    size, scale = 256, 0.55  # crop pixels per frame pixel: pre-scale 0.825 (the 720p bench face's 0.82)
    photo = cv2.resize(skdata.astronaut()[:, :, ::-1], (1024, 1024), interpolation=cv2.INTER_CUBIC)
    stripes = np.zeros((1024, 1024, 3), np.uint8)
    stripes[:, ::2] = 255  # period 2 px: the frame's Nyquist frequency
    m = np.array([[scale, 0.0, -300 * scale], [0.0, scale, -200 * scale]], np.float32)[None]

    def crops(frame: np.ndarray, linear_min: float) -> np.ndarray:
        monkeypatch.setattr(align, "PRESCALE_LINEAR_MIN", linear_min)
        return align.cut_crops(frame[None], m, size)[0]

    linear_min = align.PRESCALE_LINEAR_MIN
    assert linear_min <= 0.825
    fast, area = crops(photo, linear_min), crops(photo, 2.0)  # 2.0: every pre-scale by INTER_AREA
    assert not np.array_equal(fast, area)  # the bilinear path ran
    assert psnr(fast, area) > 45, psnr(fast, area)
    direct = cv2.warpAffine(stripes, m[0].astype(np.float64), (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)
    left = {name: float(c.astype(np.float64).std()) for name, c in
            (("fast", crops(stripes, linear_min)), ("area", crops(stripes, 2.0)), ("no pre-scale", direct))}
    assert left["fast"] <= 1.4 * left["area"] and left["fast"] < 0.7 * left["no pre-scale"], left


def test_a_template_prepared_by_two_jobs_at_once_is_prepared_once(tmp_path, template_video):
    """The jobs of a batch share a template: two preparations at once (threads here, processes on a
    node alike: a file lock) normalise and detect once; the second reads what the first stored
    (the files were replaced under a job that had hashed them, and a remote node's copy failed its hash)."""
    import threading

    settings = Settings(storage_root=tmp_path / "store", batch_size=16, detect_interval=5)
    det = CountingDetector()
    results: list = []
    barrier = threading.Barrier(2)

    def prepare() -> None:
        barrier.wait(timeout=30)
        results.append(prepare_avatar(template_video, settings, detector=det))

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and sorted(a.cached for a in results) == [False, True]
    assert det.full_frames == 10 + ROLL_CHECK_FRAMES  # detected once
    assert results[0].model_dump(exclude={"cached"}) == results[1].model_dump(exclude={"cached"})


def test_a_damaged_video_without_a_face_says_it_decodes_with_errors(tmp_path, astronaut_video):
    """300 bytes flipped in a template: ffmpeg decodes it with 40 errors, no frame shows a face, and the
    refusal said only "no face found" (helper's report: the real problem is the damage). 5 of its 50 frames do
    not decode at all, more than `DAMAGED_SHARE`: it is refused as damaged, naming how many (a probe: such
    frames were concealed as the frame before, a freeze with a moving mouth)."""
    import random
    from pathlib import Path

    from cluster.errors import InputUnreadable

    data = bytearray(Path(astronaut_video).read_bytes())
    rng = random.Random(3)
    for i in rng.sample(range(2000, len(data) - 2000), 300):
        data[i] ^= 0xFF
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(data)
    for _attempt in ("first", "again"):
        with pytest.raises(InputUnreadable, match=r"damaged.mp4 is damaged: \d+ of its 50 frames do not decode "
                                                  r"whole \(ffmpeg: .+\); export or copy it again"):
            prepare_avatar(str(damaged), Settings(storage_root=tmp_path / "store"))


def test_a_video_whose_frames_decode_patched_up_is_refused_as_damaged(tmp_path, astronaut_video):
    """A probe's template with 3000 bytes changed in its last tenth rendered blocks of colour for 5 s and the job
    succeeded: its frames decoded, patched up by the decoder (concealed: PyAV's `is_corrupt`), and only those that
    failed outright counted as damage (7 of 1500). Here 40 bytes in the second half: no frame fails, 9 of 50 are
    concealed; they count as damaged now, over `DAMAGED_SHARE`."""
    import random
    from pathlib import Path

    from cluster.errors import InputUnreadable
    from cluster.media.normalize import undecodable_frames

    data = bytearray(Path(astronaut_video).read_bytes())
    rng = random.Random(2)
    for i in rng.sample(range(len(data) // 2, len(data) - 2000), 40):
        data[i] ^= 0xFF
    damaged = tmp_path / "patched.mp4"
    damaged.write_bytes(data)
    lost, packets = undecodable_frames(str(damaged))
    assert packets == 50 and lost > 5, (lost, packets)
    with pytest.raises(InputUnreadable, match=r"patched.mp4 is damaged: \d+ of its 50 frames do not decode whole"):
        prepare_avatar(str(damaged), Settings(storage_root=tmp_path / "store"))


ROLL_CHECK_FRAMES = 3 * 3  # `_check_upright`: 3 frames of the track, each region in 3 orientations


def test_a_face_lying_on_its_side_is_refused_and_a_tilted_one_rendered(tmp_path, astronaut_video):
    """A face on its side (a phone clip that lost its rotation flag, a person lying down) was found by
    MTCNN with landmarks placed as if upright: a mouth drawn on the cheek, the real one still, and the
    job `succeeded`. It is refused, saying which way to turn the video; a head tilted 50 degrees still
    renders (its landmarks align the crop)."""
    from cluster.errors import FaceSideways
    from cluster.media.ffmpeg import ffmpeg_binary

    settings = Settings(storage_root=tmp_path / "store")
    made = {}
    for name, vf in (("sideways", "transpose=1"), ("other_side", "transpose=2"), ("upside_down", "hflip,vflip"),
                     ("tilted", "rotate=50*PI/180")):
        made[name] = tmp_path / f"{name}.mp4"
        subprocess.run([ffmpeg_binary(settings), "-v", "error", "-i", astronaut_video, "-vf", vf, "-c:v", "libx264",
                        str(made[name])], check=True, timeout=60)
    with pytest.raises(FaceSideways, match=r"sideways.mp4 lies on its side .* turn the video a quarter "
                                           r"counter-clockwise"):
        prepare_avatar(str(made["sideways"]), settings)
    # faces MTCNN finds on too few frames as they are (these were refused as no face): found turned (a probe)
    with pytest.raises(FaceSideways, match=r"other_side.mp4 lies on its side.* turn the video a quarter clockwise"):
        prepare_avatar(str(made["other_side"]), settings)
    with pytest.raises(FaceSideways, match=r"upside_down.mp4 lies upside down.* turn the video half a turn"):
        prepare_avatar(str(made["upside_down"]), settings)
    # found on enough frames to make a track, an upside-down face reads 100-106 degrees from level: it was said to
    # lie on its side, "turn a quarter" (a review); the turn that shows it upright says
    with pytest.raises(FaceSideways, match=r"upside_down.mp4 lies upside down .* turn the video half a turn"):
        prepare_avatar(str(made["upside_down"]), settings.model_copy(update={"min_face_fraction": 0.3}))
    # a template over 250 frames is first looked at in 12 frames spread over it: none with a face was no face
    longer = tmp_path / "other_side_long.mp4"
    subprocess.run([ffmpeg_binary(settings), "-v", "error", "-stream_loop", "5", "-i", str(made["other_side"]),
                    "-c", "copy", str(longer)], check=True, timeout=60)
    with pytest.raises(FaceSideways, match=r"other_side_long.mp4 lies on its side.* a quarter clockwise"):
        prepare_avatar(str(longer), settings)
    tilted = prepare_avatar(str(made["tilted"]), settings)
    eyes = tilted.load_track().landmarks[:, 1] - tilted.load_track().landmarks[:, 0]  # left eye to right eye
    roll = np.degrees(np.arctan2(eyes[:, 1], eyes[:, 0]))
    assert 35 < np.median(roll) < 65, np.median(roll)  # its eye line, as the track has it


def test_an_avatar_stored_at_a_rate_now_out_of_bounds_is_refused_by_id_and_prepared_again(tmp_path,
                                                                                           astronaut_video):
    """Templates are brought within 10-60 fps; an avatar prepared before at 1000 fps rendered at 1000 fps by
    its id. By id it is refused, saying how to make it again; from its video it is prepared again."""
    import json

    settings = Settings(storage_root=tmp_path / "store")
    avatar = prepare_avatar(astronaut_video, settings)
    meta = tmp_path / "store" / "avatars" / avatar.id / "avatar.json"
    stored = json.loads(meta.read_text())
    stored["info"]["video"]["fps_num"], stored["info"]["video"]["fps_den"] = 1000, 1  # as stored before
    meta.write_text(json.dumps(stored))
    with pytest.raises(InputNotFound, match=r"prepared at 1000 fps, .* prepare it again from its video"):
        load_avatar(avatar.id, settings)
    again = prepare_avatar(astronaut_video, settings)
    assert not again.cached and again.id == avatar.id and load_avatar(avatar.id, settings).info.video.fps == 25


def test_prepare_avatar_detects_every_frame_and_caches(tmp_path, template_video):
    settings = Settings(storage_root=tmp_path / "store", batch_size=16, detect_interval=5)
    det = CountingDetector()
    avatar = prepare_avatar(template_video, settings, detector=det)
    assert not avatar.cached and avatar.frame_count == 2 * FPS
    # every 5th frame detected in full, the 40 between tracked (none lost on this steady face); the face's
    # roll checked on 3 of its frames, each region searched in 3 orientations
    assert (det.full_frames, det.tracked_frames) == (10 + ROLL_CHECK_FRAMES, 40)
    track = avatar.load_track()
    assert len(track) == 2 * FPS and track.detected.mean() > 0.9
    # landmarks follow the sway of the face: the eye x moves with the frame's shift
    eye_x = track.landmarks[:, 0, 0]
    shift_x = np.array([x for x, _ in _shifts(2 * FPS)], dtype=float)
    assert np.corrcoef(eye_x, shift_x)[0, 1] > 0.9
    assert (tmp_path / "store" / "avatars" / avatar.id / "avatar.json").is_file()

    again = prepare_avatar(template_video, settings, detector=det)
    assert again.cached and det.full_frames == 10 + ROLL_CHECK_FRAMES and again.id == avatar.id
    assert again.model_dump(exclude={"cached"}) == avatar.model_dump(exclude={"cached"})
    loaded = load_avatar(avatar.id, settings)
    assert loaded.track_path == avatar.track_path
    with pytest.raises(InputNotFound):
        load_avatar("0123456789abcdef", settings)
    with pytest.raises(InputNotFound):
        load_avatar("../etc", settings)


def test_faces_found_on_the_source_while_it_is_normalised_and_checked_against_it(tmp_path, template_video,
                                                                                 monkeypatch):
    """The fixture's one long GOP is re-encoded; its frames map one for one, so detection runs on the
    source's own frames meanwhile. A source that yields a frame fewer than the normalised template
    is detected again on the template: the track always has one entry per template frame."""
    import cluster.faces.avatar as avatar_mod

    detect = avatar_mod._detect
    calls = []

    def short_by_one_on_the_source(detector, path, s):
        calls.append(path)
        found = detect(detector, path, s)
        return found[:-1] if path == template_video else found

    monkeypatch.setattr(avatar_mod, "_detect", short_by_one_on_the_source)
    avatar = prepare_avatar(template_video, Settings(storage_root=tmp_path / "store", detect_interval=5))
    assert calls == [template_video, avatar.template_path]  # the source first (in parallel), then the fallback
    assert avatar.frame_count == 2 * FPS and len(avatar.load_track()) == 2 * FPS


# --- the `wav2lip` crop recipe ------------------------------------------------------------------
def _original_wav2lip_boxes(detections, frame_size) -> np.ndarray:
    """A plain reimplementation of Wav2Lip's inference crop: per-frame detector box plus pads
    (top/bottom/left/right), clipped to the frame, then each box averaged with the next T-1
    (`get_smoothened_boxes`, T=5, the window held at the end)."""
    w, h = frame_size
    top, bottom, left, right = canonical.WAV2LIP_PADS
    rects = []
    for dets in detections:
        x1, y1, x2, y2 = max(dets, key=lambda d: d.size).box
        bw, bh = x2 - x1, y2 - y1
        rects.append([max(0, x1 - left * bw), max(0, y1 - top * bh), min(w, x2 + right * bw), min(h, y2 + bottom * bh)])
    boxes = np.array(rects, np.float64)
    T = canonical.WAV2LIP_SMOOTH_FRAMES
    out = boxes.copy()
    for i in range(len(boxes)):
        window = boxes[len(boxes) - T:] if i + T > len(boxes) else boxes[i:i + T]
        out[i] = window.mean(axis=0)
    return out


def _iou_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(0)
    ih = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(0)
    inter = iw * ih
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def astronaut_track(astronaut_video, detector):
    """Decoded frames of the real photographed face with head motion, raw detections, track."""
    from tests.helpers import decode_all

    frames = decode_all(astronaut_video)
    detections = detector.detect_batch(frames)
    track = build_track(detections, (frames.shape[2], frames.shape[1]), 0.5, fps=FPS)
    return frames, detections, track


def test_wav2lip_crop_box_matches_the_original_recipe(astronaut_track):
    frames, detections, track = astronaut_track
    size = (frames.shape[2], frames.shape[1])
    ours = align.wav2lip_boxes(track.boxes, size)
    reference = _original_wav2lip_boxes(detections, size)
    iou = _iou_rows(ours, reference)
    print(f"\n[faces] wav2lip box IoU vs the original recipe: min {iou.min():.3f}, "
          f"median {np.median(iou):.3f}, >= 0.9 on {np.mean(iou >= 0.9):.0%} of {len(iou)} frames")
    assert np.mean(iou >= 0.9) >= 0.95
    # the crop stretches the box to S x S; the mouth lies in the lower half the model regenerates
    mats = align.crop_matrices(track.landmarks, track.boxes, 96, "wav2lip", size)
    mouth = np.einsum("nij,nkj->nki", mats[:, :, :2].astype(np.float64), track.landmarks[:, 3:]) + mats[:, None, :, 2]
    assert np.all((mouth[..., 1] > 0.55 * 96) & (mouth[..., 1] < 0.8 * 96))
    assert np.allclose(mats[:, 0, 1], 0) and np.allclose(mats[:, 1, 0], 0)  # axis-aligned
    # the matrix maps the box edges onto the crop edges, as cv2.resize of frame[y1:y2, x1:x2]
    x1, y1, x2, y2 = ours[0]
    corners = mats[0, :, :2] @ np.array([[x1 - 0.5, x2 - 0.5], [y1 - 0.5, y2 - 0.5]]) + mats[0, :, 2:]
    np.testing.assert_allclose(corners, [[-0.5, 95.5], [-0.5, 95.5]], atol=1e-3)


def test_wav2lip_paste_back_round_trips_and_stays_inside_its_mask(astronaut_track):
    frames, _, track = astronaut_track
    size, n = 96, 8
    frames = frames[:n]
    mats = align.crop_matrices(track.landmarks[:n], track.boxes[:n], size, "wav2lip", (W, H))
    crops = align.cut_crops(frames, mats, size)
    # an identity-contract model gives the template back exactly
    same = align.paste_back(frames, crops.copy(), mats, size, original_crops=crops, recipe="wav2lip")
    assert np.array_equal(same, frames)
    # a changed lower face: pixels outside the recipe's mask are bit-identical
    mask = align.paste_mask(size, "wav2lip")
    assert mask[: size // 2 - 1].max() == 0  # only the lower half, which the model regenerates
    assert not np.array_equal(mask, align.paste_mask(size, "aligned"))
    changed = crops.copy()
    for c in changed:  # a dark open mouth where the mouth is
        cv2.ellipse(c, (48, 64), (14, 6), 0, 0, 360, (30, 20, 60), -1)
    out = align.paste_back(frames, changed, mats, size, original_crops=crops, recipe="wav2lip")
    for i in range(n):
        inv = cv2.warpAffine(mask, mats[i], (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        assert np.array_equal(out[i][inv == 0], frames[i][inv == 0])
        assert np.abs(out[i].astype(int) - frames[i])[inv > 0.99].max() > 60
    with pytest.raises(ValueError, match="unknown crop recipe 'tight'"):
        align.paste_back(frames, crops, mats, size, original_crops=crops, recipe="tight")


@pytest.mark.parametrize("size, recipe", [(256, "aligned"), (96, "wav2lip")])
def test_paste_back_on_the_mask_rect_equals_paste_back_on_the_whole_crop(astronaut_track, monkeypatch, size,
                                                                         recipe):
    """Paste-back computes in crop space only on `_work_rect` (the mask's rect widened by the
    blur's reach): the frames it gives are those of the same steps on the whole crop, to within
    1 level on a few pixels (rounding of the shifted warp), for a mouth that moves (optical flow)."""
    frames, _, track = astronaut_track
    n = 8
    frames = frames[:n]
    mats = align.crop_matrices(track.landmarks[:n], track.boxes[:n], size, recipe, (W, H))
    crops = align.cut_crops(frames, mats, size)
    moved = crops.copy()  # the lower face shifted down 3 px (a jaw drop) and a dark gap
    lower = slice(int(0.6 * size), size)
    moved[:, lower] = np.roll(crops[:, lower], 3, axis=1)
    for c in moved:
        cv2.ellipse(c, (size // 2, int(0.72 * size)), (size // 8, size // 30), 0, 0, 360, (30, 20, 60), -1)
    r0, r1, c0, c1 = align._work_rect(size, recipe)
    assert (r1 - r0) * (c1 - c0) < 0.75 * size * size  # the point of it
    on_rect = align.paste_back(frames, moved, mats, size, original_crops=crops, recipe=recipe)
    monkeypatch.setattr(align, "_work_rect", lambda s, r: (0, s, 0, s))
    on_crop = align.paste_back(frames, moved, mats, size, original_crops=crops, recipe=recipe)
    diff = np.abs(on_rect.astype(int) - on_crop)
    assert np.abs(on_crop.astype(int) - frames).max() > 60  # the change is there
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-4 * diff.size, (diff.max(), np.count_nonzero(diff))


def test_paste_back_does_not_depend_on_what_the_process_pasted_before():
    """Paste-back's optical flow must be a function of its inputs only. OpenCV's DIS object keeps
    state between `calc` calls: one call on a small changed box (a closure's few changed pixels)
    changed the flow of the next, larger one by up to 3 px, so a chunk re-rendered after a fault on
    another compositor, whose earlier jobs differed, came out different (the service chaos test's
    mismatch, docs/RELIABILITY.md). The same paste before and after a small one: bit for bit."""
    from cluster.synth import textured_face

    frame, landmarks = textured_face((320, 240), seed=2)
    size = 256
    matrices = align.alignment_matrices(landmarks[None], size)
    crop = align.cut_crops(frame[None], matrices, size)
    mx, my = (int(v * size) for v in canonical.MOUTH_CENTER)
    large = crop.copy()  # a wide, shifted mouth region: a large changed box
    large[0, my - 12:my + 14, mx - 40:mx + 40] = np.roll(crop[0, my - 12:my + 14, mx - 40:mx + 40], 3, axis=0)
    small = crop.copy()  # a few changed pixels: a small changed box
    small[0, my:my + 4, mx:mx + 4] = 255 - crop[0, my:my + 4, mx:mx + 4]
    first = align.paste_back(frame[None].copy(), large, matrices, size, original_crops=crop)
    align.paste_back(frame[None].copy(), small, matrices, size, original_crops=crop)
    again = align.paste_back(frame[None].copy(), large, matrices, size, original_crops=crop)
    assert np.array_equal(first, again), int(np.abs(first.astype(int) - again.astype(int)).max())


@pytest.mark.parametrize("size, recipe", [(256, "aligned"), (96, "wav2lip")])
def test_crops_and_paste_back_of_i420_frames_are_those_of_their_bgr(astronaut_video, astronaut_track, size, recipe):
    """A render keeps its frames as the decoder's yuv420p (`cut_crops_yuv`, `paste_back_yuv`): the
    crops are those cut from the frames in BGR, the pasted pixels those of BGR paste-back converted
    (to within a level on a few pixels: the region's shifted warps round differently), and outside
    the paste mask every byte is the decoder's own (a whole-frame BGR round trip moved some)."""
    from cluster.media import yuv
    from cluster.media.decode import TemplateReader

    frames, _, track = astronaut_track
    n = 8
    with TemplateReader(astronaut_video) as reader:
        planes = reader.read_yuv(range(n))
    bgr = np.stack([yuv.to_bgr(p) for p in planes])
    assert np.array_equal(bgr, frames[:n])
    mats = align.crop_matrices(track.landmarks[:n], track.boxes[:n], size, recipe, (W, H))
    crops = align.cut_crops(bgr, mats, size)
    crops_diff = np.abs(align.cut_crops_yuv(planes, mats, size).astype(int) - crops)
    assert crops_diff.max() <= 1 and np.count_nonzero(crops_diff) <= 1e-4 * crops.size
    moved = crops.copy()  # the lower face shifted down 3 px (a jaw drop) and a dark gap
    lower = slice(int(0.6 * size), size)
    moved[:, lower] = np.roll(crops[:, lower], 3, axis=1)
    for c in moved:
        cv2.ellipse(c, (size // 2, int(0.72 * size)), (size // 8, size // 30), 0, 0, 360, (30, 20, 60), -1)
    expected = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2YUV_I420) for f in
                         align.paste_back(bgr, moved, mats, size, original_crops=crops, recipe=recipe)])
    got = align.paste_back_yuv(planes.copy(), moved, mats, size, original_crops=crops, recipe=recipe)
    mask = align.paste_mask(size, recipe)
    for i in range(n):
        weight = cv2.warpAffine(mask, mats[i], (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        (gy, gu, gv), (ey, eu, ev), (oy, ou, ov) = (yuv.planes(f[i]) for f in (got, expected, planes))
        inside, blocks = weight > 0, cv2.resize(weight, (W // 2, H // 2), interpolation=cv2.INTER_AREA) > 0
        assert np.abs(gy.astype(int) - oy)[inside].max() > 60  # the mouth changed
        assert np.array_equal(gy[~inside], oy[~inside])
        assert np.array_equal(gu[~blocks], ou[~blocks]) and np.array_equal(gv[~blocks], ov[~blocks])
        for g, e in ((gy, ey), (gu, eu), (gv, ev)):
            d = np.abs(g.astype(int) - e)
            inner = inside if g is gy else blocks
            assert np.count_nonzero(d[inner] > 1) <= 1e-3 * d.size, np.count_nonzero(d[inner] > 1)
    # an identity-contract model: the frames come back, the mask's pixels through BGR and back (which
    # moves a few colours outside BGR's gamut by some levels), every other byte as it was
    same = align.paste_back_yuv(planes.copy(), crops.copy(), mats, size, original_crops=crops, recipe=recipe)
    round_trip = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2YUV_I420) for f in bgr])
    assert np.all((same == planes) | (same == round_trip))


def _changed_masks(size: int) -> list[np.ndarray]:
    """Changed-pixel masks for the flow's helpers: a mouth in the middle, one at a crop corner, one
    along the bottom edge."""
    masks = []
    for (cy, cx), (ry, rx) in [((0.72, 0.5), (0.06, 0.15)), ((0.97, 0.02), (0.05, 0.05)), ((0.99, 0.5), (0.03, 0.4))]:
        m = np.zeros((size, size), np.uint8)
        cv2.ellipse(m, (int(cx * size), int(cy * size)), (max(1, int(rx * size)), max(1, int(ry * size))), 0, 0, 360,
                    1, -1)
        masks.append(m.astype(bool))
    return masks


@pytest.mark.parametrize("size", [96, 256, 512])
def test_flow_weight_on_the_changed_box_equals_the_whole_crops(size):
    """`_near` computes the flow's weight (changed pixels dilated and blurred) on their box widened
    by the filters' reach: bit for bit what the whole crop gives, in the middle and at its edges."""
    for changed in _changed_masks(size):
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        whole = cv2.GaussianBlur(cv2.dilate(changed.astype(np.float32), np.ones((5, 5), np.uint8)), (0, 0),
                                 size / 128.0)
        got = align._near(changed, rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
        assert got.shape == whole.shape and np.array_equal(got, whole)


def _flow_case(size: int, seed: int = 0):
    """A crop-space flow that is 0 outside a box, as `_motion` returns it, with that box."""
    rng = np.random.default_rng(seed)
    r0, r1, c0, c1 = int(0.55 * size), int(0.9 * size), int(0.25 * size), int(0.75 * size)
    flow = np.zeros((size, size, 2), np.float32)
    flow[r0:r1, c0:c1] = cv2.GaussianBlur(rng.normal(0, 2.5, (r1 - r0, c1 - c0, 2)).astype(np.float32), (0, 0), 3)
    return flow, (r0, r1, c0, c1)


def test_a_crop_moved_by_the_flow_is_sampled_only_in_the_flows_box():
    """`_moved_crop` resamples the crop only where the flow's box meets the work rect: the result is
    bit for bit the whole rect's resampling (elsewhere the flow is 0 and a pixel is itself)."""
    size = 256
    crop = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    flow, box = _flow_case(size)
    for rect in [(128, 256, 27, 230), (0, size, 0, size), (0, 100, 0, size)]:
        r0, r1, c0, c1 = rect
        map_x = flow[r0:r1, c0:c1, 0] + np.arange(c0, c1, dtype=np.float32)[None, :]
        map_y = flow[r0:r1, c0:c1, 1] + np.arange(r0, r1, dtype=np.float32)[:, None]
        whole = cv2.remap(crop.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        unmoved = crop[r0:r1, c0:c1].astype(np.float32)
        got = align._moved_crop(crop, flow, box, rect, unmoved)
        assert np.array_equal(got, whole)
        assert np.array_equal(unmoved, crop[r0:r1, c0:c1])  # its input is not changed


def test_the_frames_detail_moves_only_where_the_flow_reaches_and_as_on_the_whole_region():
    """`_move_detail` brings the flow to the frame region only on the region's pixels that can see
    the flow's box: every other pixel keeps its detail bit for bit, and the moved ones are those of
    the whole region's computation but where the warp, started at another origin, rounds a
    coordinate to the neighbouring 1/32 px (a level or two on a few pixels)."""
    size = 256
    flow, box = _flow_case(size, seed=2)
    # region -> crop: a face of ~470 frame px, turned a little; the region's middle at the crop's mouth
    m_roi = np.array([[0.55, 0.08, -19.2], [-0.08, 0.55, 94.7]])
    h, w = 380, 480
    detail = np.random.default_rng(3).normal(0, 20, (h, w, 3)).astype(np.float32)
    flow_roi = cv2.warpAffine(flow, m_roi, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT)
    assert np.count_nonzero(flow_roi[..., 0]) > 0.1 * h * w  # the flow reaches a good part of the region
    a_inv = np.linalg.inv(m_roi[:, :2]).astype(np.float32)
    map_x = flow_roi[..., 0] * a_inv[0, 0] + flow_roi[..., 1] * a_inv[0, 1] + np.arange(w, dtype=np.float32)
    map_y = flow_roi[..., 0] * a_inv[1, 0] + flow_roi[..., 1] * a_inv[1, 1] + np.arange(h, dtype=np.float32)[:, None]
    whole = cv2.remap(detail, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
    got = align._move_detail(detail.copy(), flow, box, m_roi)
    reached = np.abs(flow_roi).max(axis=2) > 0
    assert np.array_equal(got[~reached], detail[~reached]) and np.array_equal(whole[~reached], detail[~reached])
    moved = np.abs(got - whole).max(axis=2) > 0
    assert np.count_nonzero(moved) <= 0.002 * np.count_nonzero(reached), np.count_nonzero(moved)


def test_an_avatar_stored_by_an_older_version_is_brought_up_to_date(tmp_path, template_video):
    """Avatars stored before full-range templates were converted, and before colour tags were read, are
    updated in place on first use (the template converted frame for frame, the tags read), not served as
    they were (washed out, untagged) and not lost (their source video is not kept)."""
    import json
    import os
    import subprocess

    from cluster.media.ffmpeg import ffmpeg_binary
    from cluster.media.probe import probe

    s = Settings(storage_root=tmp_path)
    first = prepare_avatar(template_video, s)
    template = first.template_path
    full = template + ".full.mp4"  # the template as the old normalisation left a full-range one
    subprocess.run([ffmpeg_binary(), "-v", "error", "-y", "-i", template, "-vf", "scale=out_range=full",
                    "-pix_fmt", "yuvj420p", "-color_range", "pc", "-c:v", "libx264", full], check=True, timeout=60)
    os.replace(full, template)
    meta = tmp_path / "avatars" / first.id / "avatar.json"
    stored = json.loads(meta.read_text())
    stored["info"]["video"]["pix_fmt"] = "yuvj420p"
    del stored["info"]["video"]["color"]  # not read by the older version
    meta.write_text(json.dumps(stored))
    again = load_avatar(first.id, s)
    assert again.id == first.id and again.frame_count == first.frame_count
    v = probe(again.template_path, s).video
    assert v.pix_fmt == "yuv420p" and not v.full_range and v.frame_count == first.frame_count, v
    assert "color" in json.loads(meta.read_text())["info"]["video"]  # stored again: done once


def test_an_avatar_keeps_the_first_name_it_was_given_without_control_characters(tmp_path):
    """`name_avatar`: the file's name or the URL's last part, unquoted, no query; printable characters
    only; the first name stays; nothing is written for an avatar that is not stored."""
    from cluster.config import Settings
    from cluster.faces.avatar import avatar_name, name_avatar

    s = Settings(storage_root=tmp_path)
    (s.dir("avatars") / "ab12cd34").mkdir(parents=True)
    name_avatar("ab12cd34", "https://cdn.example/people/Anna%20B%1B[31m.mp4?sig=1", s)
    assert avatar_name("ab12cd34", s) == "Anna B[31m.mp4"
    name_avatar("ab12cd34", "/data/in/other.mp4", s)
    assert avatar_name("ab12cd34", s) == "Anna B[31m.mp4"
    name_avatar("ffff0000", "x.mp4", s)
    assert avatar_name("ffff0000", s) is None and not (s.dir("avatars") / "ffff0000").exists()


def test_an_avatar_prepared_before_the_recipe_its_video_needs_is_prepared_again(tmp_path, astronaut_video):
    """A review: an avatar prepared by an older version from a file with a small proxy stream first kept the proxy
    (its template, track and size) for every later job that sent the same file. Sent again, such a file's avatar
    is prepared again from its default stream; by `avatar_id` it is used as it is (no file to look at)."""
    from pathlib import Path

    from cluster.config import Settings
    from cluster.faces.avatar import load_avatar, prepare_avatar
    from cluster.media.ffmpeg import ffmpeg_binary
    from cluster.media.normalize import RECIPE_FILE

    s = Settings(storage_root=tmp_path / "store")
    two = tmp_path / "proxy_first.mp4"
    subprocess.run([ffmpeg_binary(s), "-v", "error", "-i", astronaut_video, "-filter_complex",
                    "[0:v]split[a][b];[a]scale=160:120[p]", "-map", "[p]", "-map", "[b]", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-disposition:v:0", "0", "-disposition:v:1", "default", str(two)],
                   check=True, timeout=60)
    first = prepare_avatar(str(two), s)
    assert (first.info.video.width, first.info.video.height) == (320, 240)
    (Path(first.template_path).parent / RECIPE_FILE).unlink()  # as an older version left it
    assert prepare_avatar(str(two), s).cached is False  # prepared again (its frames the default stream's)
    assert load_avatar(first.id, s).info.video.width == 320
    assert prepare_avatar(str(two), s).cached is True  # and kept from then on


def test_a_long_template_without_a_face_is_refused_from_a_few_frames(tmp_path, monkeypatch):
    """A probe's 2-minute 720p video without a face was refused after 130 s of detecting on every frame (the same
    with 60 s: 119 s here, 1.8 s now). A template of more than FACE_SAMPLE_FROM_FRAMES frames is first looked at
    in FACE_SAMPLES frames spread over it: none shows a face, so no track could be made (it needs one on half of
    them): refused before normalising or detecting on all of them."""
    from cluster.faces import avatar
    from cluster.media.ffmpeg import ffmpeg_binary

    path = tmp_path / "testsrc.mp4"
    subprocess.run([ffmpeg_binary(), "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=320x240:rate=25:duration=12", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)

    def everything(*_a, **_k):
        raise AssertionError("detected on every frame")

    monkeypatch.setattr(avatar, "_detect", everything)
    monkeypatch.setattr(avatar, "normalize_template", everything)
    with pytest.raises(NoFace, match=f"none in {avatar.FACE_SAMPLES} frames spread over its 300 frames"):
        avatar.prepare_avatar(str(path), Settings(storage_root=tmp_path / "store"))
