"""The canonical aligned-face geometry shared by crops, paste-back and the built-in model.

All coordinates are normalised to [0, 1] of the square crop side S (x right, y down), so the
same geometry serves S = 96, 256 and 384. A similarity transform maps a frame's 5 landmarks onto
`CANONICAL_5PTS`; the mouth then sits at a fixed place in every crop, entirely in the lower half
(the half Wav2Lip-class models regenerate).
"""
from __future__ import annotations

import numpy as np

# ArcFace's 112x112 five-point template, loosened (x0.78 about the centre, raised 0.03) so that the
# crop holds the brows to below the chin, like a Wav2Lip face-box crop.
_ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64) / 112.0
_SCALE, _SHIFT_Y = 0.78, -0.03
CANONICAL_5PTS: np.ndarray = (0.5 + (_ARCFACE_112 - 0.5) * _SCALE + np.array([0.0, _SHIFT_Y])).astype(np.float32)
"""left eye, right eye, nose tip, left mouth corner, right mouth corner; normalised."""

MOUTH_CENTER: tuple[float, float] = (float(CANONICAL_5PTS[3:, 0].mean()), float(CANONICAL_5PTS[3:, 1].mean()))
MOUTH_HALF_WIDTH: float = float(CANONICAL_5PTS[4, 0] - CANONICAL_5PTS[3, 0]) / 2.0

# The mouth (an ellipse: cx, cy, rx, ry): where quality metrics measure mouth motion.
MOUTH_REGION: tuple[float, float, float, float] = (MOUTH_CENTER[0], MOUTH_CENTER[1] + 0.01, 0.17, 0.12)

# The region a model may change: mouth, lower lip and jaw down to below the chin (at y ~ 0.89 on a
# typical face). The built-in model writes only inside it; the paste-back mask covers it fully
# (weight 1) and feathers out beyond it.
JAW_REGION: tuple[float, float, float, float] = (MOUTH_CENTER[0], 0.787, 0.22, 0.143)

# The lower-face paste mask (jaw and mouth), an ellipse with a feathered edge: weight 1 down to
# 0.945; the feather is cut short by the crop's edge (the mask is forced to 0 there).
LOWER_FACE_MASK: tuple[float, float, float, float] = (MOUTH_CENTER[0], 0.775, 0.29, 0.17)
MASK_FEATHER: float = 0.06
"""Feather width (normalised) outside LOWER_FACE_MASK over which the weight falls from 1 to 0."""


def canonical_points(size: int) -> np.ndarray:
    """CANONICAL_5PTS in pixel coordinates of an S x S crop."""
    return CANONICAL_5PTS * float(size)


# --- the `wav2lip` crop recipe ------------------------------------------------------------------
# Wav2Lip-96-family models were trained on axis-aligned face-detector boxes padded at the bottom
# (pads top/bottom/left/right = 0/10/0/0 px in the original inference, on faces of about 100 px),
# resized to S x S without keeping the aspect ratio. Pads here are fractions of the box height /
# width, so the recipe does not depend on the resolution.
WAV2LIP_PADS: tuple[float, float, float, float] = (0.0, 0.10, 0.0, 0.0)
"""top, bottom (fractions of the box height), left, right (of the width)."""
WAV2LIP_SMOOTH_FRAMES = 5
"""The original inference averaged each box with the next 4; our face track is smoothed instead."""
# In that crop (MTCNN box + 10 % bottom pad) the mouth lies at about y = 0.65, the chin near 0.9:
# the paste mask covers mouth and jaw, entirely in the lower half the model regenerates.
WAV2LIP_LOWER_FACE_MASK: tuple[float, float, float, float] = (0.5, 0.72, 0.36, 0.16)
