"""Quality metrics on synthetic frames with known answers."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from cluster.quality import (
    best_lag,
    frame_mouth_region,
    frame_paste_mask,
    mouth_motion,
    pearson,
    psnr_outside_mask,
    seam_score,
)

SIZE = 96
H, W = 240, 320


def frame_to_crop(angle_deg: float, scale: float, centre=(160.0, 125.0)) -> np.ndarray:
    """A frame -> crop similarity: the crop square of side SIZE covers SIZE*scale frame pixels
    around `centre`, rotated by `angle_deg`."""
    crop_to_frame = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle_deg, scale)
    crop_to_frame[:, 2] += np.array(centre) - np.array([SIZE / 2, SIZE / 2])
    return cv2.invertAffineTransform(crop_to_frame).astype(np.float32)


def textured_frames(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random texture (blurred noise) with a mild gradient, uint8 [n,H,W,3]."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        noise = cv2.GaussianBlur(rng.normal(0, 40, (H, W)).astype(np.float32), (0, 0), 1.5)
        base = 110 + noise + np.linspace(0, 30, W)[None, :]
        frames.append(np.clip(np.stack([base, base * 0.9, base * 1.1], axis=2), 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.fixture(scope="module")
def scene():
    frames = textured_frames(4)
    matrices = np.stack([frame_to_crop(a, s) for a, s in ((0, 1.6), (5, 1.6), (-8, 1.5), (3, 1.7))])
    return frames, matrices


def test_best_lag_recovers_a_known_shift_with_its_sign():
    rng = np.random.default_rng(1)
    b = np.convolve(rng.normal(size=140), np.ones(3) / 3, mode="same")
    a = np.empty_like(b)
    a[2:] = b[:-2]          # a[t] = b[t - 2]: a lags b by 2 frames
    a[:2] = b[0]
    a += rng.normal(0, 0.05, a.size)
    assert best_lag(a, b) == 2
    assert best_lag(b, a) == -2
    assert best_lag(b, b) == 0
    assert best_lag(a, b, max_lag=1) == 1
    assert best_lag(np.ones(20), b[:20]) == 0  # undefined everywhere


def test_pearson_matches_numpy_and_is_nan_when_undefined():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.ones(10), a[:10]))
    with pytest.raises(ValueError):
        pearson(a, b[:10])


def test_psnr_outside_mask(scene):
    frames, matrices = scene
    assert psnr_outside_mask(frames, frames.copy(), matrices, SIZE) == math.inf
    # changes where the paste mask is > 0 do not count
    inside = frames.copy()
    for i, m in enumerate(matrices):
        inside[i][frame_paste_mask(frames.shape[1:3], m, SIZE) > 0] = 0
    assert psnr_outside_mask(inside, frames, matrices, SIZE) == math.inf
    # one changed pixel outside does, with the textbook value
    outside = frames.copy()
    outside[0, 2, 3] = (frames[0, 2, 3].astype(int)
                        + np.array([20, -20, 10]).clip(-frames[0, 2, 3], 255 - frames[0, 2, 3]))
    zero = sum(int((frame_paste_mask(frames.shape[1:3], m, SIZE) <= 0).sum()) for m in matrices)
    sq = float(((outside[0, 2, 3].astype(float) - frames[0, 2, 3]) ** 2).sum())
    expected = 10 * math.log10(255 ** 2 / (sq / (zero * 3)))
    assert psnr_outside_mask(outside, frames, matrices, SIZE) == pytest.approx(expected, rel=1e-9)
    # a stricter threshold only excludes more pixels
    assert psnr_outside_mask(inside, frames, matrices, SIZE, mask_threshold=0.5) < math.inf


def test_frame_masks_follow_the_alignment(scene):
    frames, matrices = scene
    for m in matrices:
        paste = frame_paste_mask(frames.shape[1:3], m, SIZE)
        mouth = frame_mouth_region(frames.shape[1:3], m, SIZE)
        assert paste.dtype == np.float32 and paste.shape == (H, W)
        assert paste.max() == pytest.approx(1.0) and paste.min() == 0.0
        # the mouth region lies inside the fully weighted part of the paste mask
        assert np.all(paste[mouth > 0.99] > 0.99)
        # the region's centre maps back to the canonical mouth centre
        ys, xs = np.nonzero(mouth > 0.5)
        centre = m.astype(np.float64) @ np.array([xs.mean(), ys.mean(), 1.0])
        from cluster.faces import canonical
        cx, cy, _, _ = canonical.MOUTH_REGION
        assert np.allclose(centre / SIZE, [cx, cy], atol=0.02)


def test_mouth_motion_measures_change_in_the_mouth_only(scene):
    frames, matrices = scene
    out = frames.astype(np.int16)
    for i, m in enumerate(matrices):
        region = frame_mouth_region(frames.shape[1:3], m, SIZE) > 0
        out[i][region] += 10 * i         # frame i: +10*i inside the mouth
    out[:, :20, :20] = 0                 # far from the mouth: ignored
    motion = mouth_motion(np.clip(out, 0, 255).astype(np.uint8), frames, matrices, SIZE)
    assert motion.shape == (4,)
    np.testing.assert_allclose(motion, [0, 10, 20, 30], atol=0.5)
    far = np.stack([frame_to_crop(0, 1.0, centre=(-500.0, -500.0))] * 4)
    assert np.all(np.isnan(mouth_motion(frames, frames, far, SIZE)))


def test_seam_score_is_high_for_a_hard_edge(scene):
    frames, matrices = scene
    soft = frames.astype(np.float32)
    hard = frames.astype(np.float32)
    for i, m in enumerate(matrices):
        mask = frame_paste_mask(frames.shape[1:3], m, SIZE)
        soft[i] += 10 * mask[..., None]               # a feathered, small colour offset
        hard[i] += 40 * (mask > 0)[..., None]          # a hard pasted edge
    as_u8 = lambda x: np.clip(np.rint(x), 0, 255).astype(np.uint8)  # noqa: E731
    untouched_score = seam_score(frames, matrices, SIZE)
    soft_score = seam_score(as_u8(soft), matrices, SIZE)
    hard_score = seam_score(as_u8(hard), matrices, SIZE)
    assert 0.8 < untouched_score < 1.3, untouched_score
    assert soft_score < 1.3, soft_score
    assert hard_score > 3.0 and hard_score > 2.5 * soft_score, (untouched_score, soft_score, hard_score)
    assert math.isnan(seam_score(frames, np.stack([frame_to_crop(0, 1.0, centre=(-500.0, -500.0))] * 4), SIZE))


@pytest.mark.parametrize("closed_mouth", [False, True], ids=["smiling", "closed-mouth"])
def test_metrics_on_a_builtin_render_pasted_back(tmp_path, closed_mouth):
    """End to end on a real face, smiling with its teeth or with its mouth closed
    (`cluster.synth.close_mouth`): built-in model -> paste-back -> metrics. Silence is the frame,
    bit for bit; speech opens a dark mouth that grows with loudness."""
    import skimage.data

    from cluster.config import Settings
    from cluster.faces.align import alignment_matrices, cut_crops, paste_back
    from cluster.models import load_model
    from cluster.quality import opening_shape
    from cluster.synth import close_mouth

    # skimage's astronaut photograph and its 5 MTCNN landmarks
    landmarks = np.array([[203.3, 101.2], [247.6, 103.5], [223.4, 128.7], [200.3, 139.7], [245.7, 143.0]], np.float32)
    photo = np.ascontiguousarray(skimage.data.astronaut()[:, :, ::-1])
    frames = np.repeat((close_mouth(photo) if closed_mouth else photo)[None], 4, axis=0)
    size = 256
    matrices = alignment_matrices(np.repeat(landmarks[None], 4, axis=0), size)
    crops = cut_crops(frames, matrices, size)
    model = load_model("builtin", Settings(storage_root=tmp_path), providers=["CPUExecutionProvider"])
    loudness = np.array([-4.0, -2.0, -1.2, 0.0], np.float32)  # silence .. loud (normalised mel units)
    mels = np.repeat(loudness[:, None, None, None], 80 * 16, axis=3).reshape(4, 1, 80, 16)
    out = paste_back(frames, model.generate(mels, crops), matrices, size, original_crops=crops)

    motion = mouth_motion(out, frames, matrices, size)
    assert motion[0] < 0.5 and np.all(np.diff(motion) > 0) and motion[-1] > 5, motion
    assert pearson(motion, loudness) > 0.9
    assert psnr_outside_mask(out, frames, matrices, size) == math.inf
    assert seam_score(out, matrices, size) < 1.3
    assert np.array_equal(out[0], frames[0])
    heights = np.nan_to_num(opening_shape(out, frames, matrices, size)[:, 1])
    assert heights[0] == 0 and heights[-1] >= 6 and heights[-1] >= heights[1], heights


def test_lip_texture_survives_paste_back_on_a_textured_1080p_face(tmp_path):
    """On a 1080p face with fine skin texture (grain, pores, 1-2 px wrinkles: detail far finer
    than the 256 px crop), the loud frames of speech keep the lips' and skin's texture through
    the built-in model and paste-back: `lip_texture_ratio` between 0.92 and 1.1 of the template's
    (median over the loudest frames; 0.2-0.45 when paste-back resampled the frame's detail
    bilinearly and dropped it near any change, 0.89 with the fast preset's coarser flow)."""
    from cluster.audio import frame_energy, mel_windows, melspectrogram
    from cluster.config import Settings
    from cluster.faces.align import alignment_matrices, cut_crops, paste_back
    from cluster.models import load_model
    from cluster.quality import lip_texture_ratio
    from cluster.synth import speech_like, textured_face

    face, landmarks = textured_face((1920, 1080), seed=4)
    wav = speech_like(3.0, seed=11)
    fps = 25
    energy = frame_energy(wav, fps, 75)
    frames_at = np.sort(np.argsort(energy)[-6:])  # the 6 loudest frames
    mel = melspectrogram(wav)
    mels = np.concatenate([mel_windows(mel, fps, int(i), int(i) + 1) for i in frames_at])
    size = 256
    n = len(frames_at)
    frames = np.repeat(face[None], n, axis=0)
    matrices = alignment_matrices(np.repeat(landmarks[None], n, axis=0), size)
    crops = cut_crops(frames, matrices, size)
    model = load_model("builtin", Settings(storage_root=tmp_path), providers=["CPUExecutionProvider"])
    out = paste_back(frames, model.generate(mels, crops), matrices, size, original_crops=crops)
    assert mouth_motion(out, frames, matrices, size).min() > 5  # the mouth did open on every one
    texture = lip_texture_ratio(out, frames, matrices, size)
    print(f"\n[quality] lip texture ratio on a textured 1080p face, loud frames: {np.round(texture, 3)}")
    assert 0.92 <= np.median(texture) <= 1.1, texture
