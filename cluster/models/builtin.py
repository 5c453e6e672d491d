"""The built-in lip-sync model: a procedural ONNX graph with Wav2Lip's contract.

Inputs `mel_spectrogram` float32 [batch,1,80,16] and `video_frames` float32 [batch,6,S,S]
(channels 0-2 the crop with its lower half zeroed, 3-5 the reference crop, BGR in [0,1]); output
float32 [batch,3,S,S] in [0,1]. Only the reference crop (channels 3-5) is used.

What the graph computes, per batch item:

1. **Which mel columns.** The window of output frame i starts at the frame's own time
   (column `int(i*80/fps)`) and reaches 200 ms ahead. A model that looked at all 16 columns would
   open the mouth for sound that comes up to 200 ms later, i.e. the mouth would lead the voice.
   So the graph reads only the first `OWN_COLUMNS` = 3 columns: with hop 12.5 ms and centred STFT
   frames of 50 ms, their centres lie at +0, +12.5 and +25 ms, the sound of the frame's own
   display interval (40 ms at 25 fps, 33 ms at 30 fps). Only a closure (step 3b) also reads the
   next three (`AHEAD_COLUMNS`, centres +37.5 to +62.5 ms), and only to close the lips.
2. **Mouth opening.** Mel values are dB-normalised: v = 0.08 * dB + 4 clipped to [-4, 4]
   (silence = -4, one unit = 12.5 dB). The energy of the speech band (mel bins centred in
   300-3000 Hz) is averaged in the linear amplitude domain over bins and columns and brought back
   to the same units: E = log(mean(exp(c*v))) / c, c = ln(10)*12.5/20. The opening is
   smoothstep((E - OPEN_FLOOR) / (OPEN_FULL - OPEN_FLOOR)), clipped to [0, 1]: exactly 0 for
   silence (E = -4) and for a noise floor below about -55 dBFS; fully open for a voiced vowel at
   about -20 dBFS RMS.
3. **Lip shape.** Rounded vowels (/u/, /o/) have both formants below ~1 kHz, so the energy
   of 300-1000 Hz exceeds that of 1000-3000 Hz by more than for /a/ or /i/, /e/: rounding =
   smoothstep of that difference (same units) above `ROUND_LOW`. Spread vowels (/i/, /e/) have
   their second formant above ~1.7 kHz, /a/, /o/, /u/ below: spreading = smoothstep of the energy
   of 1700-3000 Hz over that of 1000-1700 Hz above `SPREAD_LOW` (in synthetic speech about -1.8
   for /a/, -1 for /o/, /u/, +0.4 to +0.7 for /e/, /i/). Both are gated by the opening (0 when the
   mouth is shut). Spreading also opens the jaw up to `SPREAD_CLOSE` less (/i/ is a narrow vowel);
   rounding opens it `ROUND_OPEN` of the way further towards full, so /o/, /u/ give a narrow,
   round opening and /i/, /e/ a wide, flat one.
3b. **Closure (/m b p/).** Before a bilabial release the lips are pressed together: the sound
   of the frame is near silence and a syllable starts right after it. press = (1 - smoothstep of
   the own speech-band energy over `PRESS_QUIET`) * smoothstep of the energy of the next ~40 ms
   over `PRESS_AHEAD`. It is 0 whenever the mouth opens (the own energy is then above the
   opening's floor) and in a pause (nothing ahead), so silence stays the template, bit for bit.
4. **Warp.** A `GridSample` (bilinear, align_corners=0, border padding) resamples the reference
   crop with a grid = identity + jaw_open * D_open + (rounding - SPREAD_WIDTH * spreading) *
   D_round, where the constant fields are computed here with numpy from
   `cluster.faces.canonical`: D_open lifts the upper lip by up to `LIP_LIFT` (of S) and drops
   the lower lip by up to `JAW_DROP`, both with the profile `lens` = (1 - (x/span)^2)^LENS_POWER
   between the mouth corners, so the lips part around a curved inner contour (both lips are the
   template's own, moved); below the lip it turns into a rigid jaw drop: lower lip and chin move
   down together, and the motion falls off in the neck under the chin (which is compressed,
   never folded) and towards the cheeks, all inside `canonical.JAW_REGION`. The source rows are
   clamped at the lip line, so the opening between the lips samples only the lip line (covered
   by step 5). D_round pulls the mouth horizontally towards its centre (negative multiples widen
   it); D_open and `lens` are read (with a three-channel GridSample) at the narrowed columns, so
   a rounded mouth also opens narrower. A closure adds press * D_press: the upper lip moves down
   by up to `PRESS_UP`, the lower lip up by up to `PRESS_LOW`, fading over `PRESS_REACH` from the
   lip line, so the band between the lips is hidden (on a template that shows its teeth the lips
   close over most of them) and closed lips get thinner, pressed.
5. **Inside of the mouth.** The opening (where the source row was clamped) is filled with a
   mouth interior faded in (smoothstep) over `SHADE_SOFT` of opened gap at either lip, so its
   edge is soft and the corners, where the lips barely part, taper into the template's own lip
   line instead of ending in a dark point. Its colour follows t, 0 under the upper lip to 1 over
   the lower lip (from the lift and drop times `lens` at that column): `LIP_BGR` (wet, reddish)
   in a rim along the lips, darkening towards `THROAT_BGR` half-way (the back of the mouth, a dark
   red-brown, not black), `TONGUE_BGR` in the lower part, and a band of `TEETH_BGR` (upper teeth)
   under the upper lip once the opening passes `TEETH_FROM`. A closure darkens the lip line where
   the lips meet by up to `PRESS_SEAM` (the seam).
6. **Blend.** out = ref + W * (shaded - ref), W a smooth weight that is exactly 0 outside
   `JAW_REGION`, so no pixel outside the region can change; with opening 0 the grid is the
   identity and the output equals the reference (to float rounding).

Steps 4-6 run only on `region_box`, the smallest box holding JAW_REGION's blend weight (about 13 %
of the crop); the rest of the output is the reference, copied. The graph is deterministic, has no
trained weights, and ran (v3) a batch of 16 crops of 256 px in about 13 ms of CPU (0.8 ms per
crop; 4.4 ms when steps 4-6 ran on the whole crop); v4's interior shading costs about 0.5 ms per
crop more (batch of 16, one thread, side by side on a loaded machine: v3 25.9 ms, v4 34.3 ms);
v5's closure, F2 band and softer shading about 0.3 ms per crop more (one thread, batch of 16,
side by side, loaded machine: v4 1.74, v5 2.05 ms per crop, min of 10).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cluster.audio import mel_band_edges
from cluster.config import Settings, get_settings
from cluster.faces import canonical
from cluster.fsutil import write_atomic

log = logging.getLogger("lipsync.models")

GENERATOR_VERSION = 5
"""Bump when the graph changes in a way the source hash would not catch."""
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
OPSET = 17       # GridSample needs >= 16

# mel spectrogram (Wav2Lip): 80 Slaney mel bins, 55-7600 Hz, 80 columns per second
N_MELS, MEL_STEP, FMIN, FMAX = 80, 16, 55.0, 7600.0
OWN_COLUMNS = 3
SPEECH_BAND = (300.0, 3000.0)
LOW_BAND = (300.0, 1000.0)
HIGH_BAND = (1000.0, 3000.0)
MID_BAND = (1000.0, 1700.0)   # F2 of /a/, /o/, /u/ lies here or below ...
TOP_BAND = (1700.0, 3000.0)   # ... F2 and F3 of /i/, /e/ here
AHEAD_COLUMNS = (3, 6)        # the next ~40 ms (centres +37.5 .. +62.5 ms): is a syllable about to start?
READ_COLUMNS = AHEAD_COLUMNS[1]
"""Mel columns of its window the graph reads at all (the rest never change its output): what a live
session must have final before the frame can be rendered (lookahead about 87.5 ms)."""
_DB_PER_UNIT = 12.5
_C = float(np.log(10.0) * _DB_PER_UNIT / 20.0)  # normalised units -> natural log of amplitude

OPEN_FLOOR = -2.6   # speech-band energy (normalised units) at which the mouth starts to open
OPEN_FULL = -0.4    # ... and at which it is fully open
ROUND_LOW = 1.2     # low-minus-high band energy at which rounding starts
ROUND_FULL = 2.0    # ... and is full
ROUND_GATE = 4.0    # rounding and spreading are scaled by clip(ROUND_GATE * opening, 0, 1)
SPREAD_LOW = -0.5   # top-minus-mid band energy above which the lips spread (F2 high: /i/, /e/) ...
SPREAD_FULL = 0.2   # ... fully spread
SPREAD_WIDTH = 0.5  # full spreading widens by NARROWING * SPREAD_WIDTH (about 20 %)
SPREAD_CLOSE = 0.15 # full spreading opens the jaw 15 % less (/i/ is a narrow vowel)
ROUND_OPEN = 0.7    # full rounding opens the jaw 70 % of the way further towards full (a round opening)

JAW_DROP = 0.040    # lower lip and chin drop at full opening, fraction of S (10 px at S=256)
LIP_LIFT = 0.028    # upper lip lift at full opening (7 px at S=256): the opening's upper contour curves too
NARROWING = 0.4     # sampling stretch at full rounding: the mouth gets about 74 % as wide (corners)
MOUTH_SPAN = 1.0    # horizontal half-extent of the lip opening, in MOUTH_HALF_WIDTH
LENS_POWER = 1.0    # the opening's height across the mouth: (1 - (x / span)^2) ** LENS_POWER
LIP_TO_JAW = 0.08   # below the lip line the lens-shaped lip profile turns into the jaw's over this depth
JAW_RIGID = 0.15    # the jaw moves rigidly to this depth below the lip line (to the chin's lower part) ...
JAW_END = 0.21      # ... and its motion falls off to 0 at this depth (the neck is compressed under the chin)
JAW_HALF = 0.10     # horizontally rigid within this distance of the mouth centre ...
JAW_FADE = 0.11     # ... falling to 0 this much further out (the cheeks stretch)
ROUND_AXES = (0.20, 0.075)  # the ellipse (about the lip line) in which rounding / spreading act ...
ROUND_FADE = 0.8    # ... fading from its centre over this fraction of its radius
BLEND_FADE = 0.2    # the blend weight fades from 1 to 0 over the outer 20 % of JAW_REGION
SHADE_SOFT = 0.024  # gap depth (fraction of S) over which the inside of the mouth fades in at either lip
PRESS_QUIET = (OPEN_FLOOR - 0.8, OPEN_FLOOR)  # own speech-band energy: fully quiet below, not at all from the floor
PRESS_AHEAD = (-2.2, -1.2)  # speech-band energy of the next ~40 ms at which a closure starts / is full
PRESS_UP = 0.016    # a closure pulls the upper lip down by this (fraction of S) at the mouth centre ...
PRESS_LOW = 0.018   # ... and the lower lip up by this: the lips meet, pressed (the band between them is hidden)
PRESS_REACH = 0.05  # ... over this depth above and below the lip line
PRESS_SEAM = 0.25   # the pressed lips' seam: the lip line darkened by up to 25 % ...
SEAM_HALF = 0.006   # ... over about this half-height
LIP_BGR = (0.26, 0.27, 0.52)     # the inside of the mouth just inside the lips (B, G, R): wet, reddish
THROAT_BGR = (0.08, 0.06, 0.15)  # ... and at the back, half-way between the lips
TONGUE_BGR = (0.30, 0.32, 0.62)  # the tongue, in the lower part of a wide opening
TONGUE_FROM = 0.6  # the tongue shows from this fraction of the opening's height down (fully a third further)
TEETH_BGR = (0.70, 0.76, 0.80)   # the upper teeth, under the upper lip of a wide opening
TEETH_DEPTH = 0.28  # the teeth fill this fraction of the opening's height under the upper lip ...
TEETH_FROM = 0.45   # ... once the opening exceeds this (fully at TEETH_FROM + 0.35)


# --- mel bins -------------------------------------------------------------------------------
def mel_bin_centres(n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """Centre frequency (Hz) of each Slaney mel bin: float64 [n_mels]."""
    return mel_band_edges(n_mels, fmin, fmax)[1:-1]


def band_weights() -> np.ndarray:
    """float32 [80, 5]: averaging weights over the speech, low, high, mid and top bands (columns)."""
    centres = mel_bin_centres()
    cols = []
    for lo, hi in (SPEECH_BAND, LOW_BAND, HIGH_BAND, MID_BAND, TOP_BAND):
        sel = ((centres >= lo) & (centres < hi)).astype(np.float64)
        cols.append(sel / sel.sum())
    return np.stack(cols, axis=1).astype(np.float32)


# --- constant fields ---------------------------------------------------------------------------
def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _profile(t: np.ndarray, flat: float) -> np.ndarray:
    """1 for t <= flat, cosine-squared falloff to 0 at t = 1, 0 beyond (and for t < 0)."""
    s = np.clip((t - flat) / (1.0 - flat), 0.0, 1.0)
    return np.where((t < 0) | (t >= 1), 0.0, np.cos(0.5 * np.pi * s) ** 2)


def _falloff(d: np.ndarray, rigid: float, end: float) -> np.ndarray:
    """1 for 0 <= d <= rigid, cosine-squared fall to 0 at d = end, 0 beyond and for d < 0."""
    t = np.clip((d - rigid) / (end - rigid), 0.0, 1.0)
    return np.where(d < 0, 0.0, np.cos(0.5 * np.pi * t) ** 2)


def warp_fields(size: int) -> dict[str, np.ndarray]:
    """The constant fields of the graph for crop side `size`, in GridSample's normalised
    coordinates (align_corners=0: pixel j's centre at 2*(j+0.5)/S - 1), float64 [S,S] unless noted.

    base_x [S] / base_y [S]: identity grid; d_open_y: source-row shift at full opening (upper lip
    up; lower lip, chin and jaw down together); d_round_x: source-column shift at full rounding
    (negative multiples spread the lips); clamp_lo_y / clamp_hi_y [S]: lip-line clamps per row;
    blend: the region weight (0 outside JAW_REGION); lens: the opening's height profile across the
    mouth (1 at the centre, 0 at and beyond the corners), the same on every row; d_press_y: the
    source-row shift of a full closure (upper lip down, lower lip up); seam: where the closed lips
    meet (a thin line along the lip line, 1 at the centre).
    """
    S = int(size)
    a = (np.arange(S) + 0.5) / S          # normalised x (and y) of pixel centres
    X, Y = np.meshgrid(a, a)              # [row, col]
    cx, cy, rx, ry = canonical.JAW_REGION
    mx, my = canonical.MOUTH_CENTER
    lip_y = my

    rho = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
    blend = _smoothstep((1.0 - rho) / BLEND_FADE)

    # the lips: a lens-shaped opening between the mouth corners
    span = MOUTH_SPAN * canonical.MOUTH_HALF_WIDTH
    q = np.abs(X - mx) / span
    lens = np.clip(1.0 - q * q, 0.0, 1.0) ** LENS_POWER
    # the jaw: rigid around the chin, falling off towards the cheeks and into the neck
    jaw_x = _falloff(np.abs(X - mx), JAW_HALF, JAW_HALF + JAW_FADE)
    depth = Y - lip_y
    to_jaw = _smoothstep(depth / LIP_TO_JAW)
    lower = np.where(depth >= 0, ((1.0 - to_jaw) * lens + to_jaw * jaw_x) * _falloff(depth, JAW_RIGID, JAW_END), 0.0)
    upper = np.where(depth < 0, lens * _falloff(-depth, 0.0, 0.05), 0.0)
    # every displacement ends inside the region, with a margin for the blend's fade
    inside = _smoothstep((1.0 - rho) / 0.3)
    d_open_y = (LIP_LIFT * upper - JAW_DROP * lower) * inside   # source shift (normalised crop units)

    # a closure (/m b p/): upper lip down, lower lip up, meeting at the lip line across the mouth
    lens_press = np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0))
    press = np.where(depth < 0, -PRESS_UP * _falloff(-depth, 0.0, PRESS_REACH),
                     PRESS_LOW * _falloff(depth, 0.0, PRESS_REACH)) * lens_press * inside
    seam = np.exp(-((depth + 0.5 / S) / SEAM_HALF) ** 2) * lens_press * blend

    # horizontal narrowing: sample farther from the centre -> content moves inwards
    rho_n = np.sqrt(((X - mx) / ROUND_AXES[0]) ** 2 + ((Y - lip_y) / ROUND_AXES[1]) ** 2)
    d_round_x = NARROWING * (X - mx) * _smoothstep((1.0 - rho_n) / ROUND_FADE) * inside

    row_is_below = a >= lip_y
    big = 3.0
    return {
        "base_x": 2.0 * a - 1.0,
        "base_y": 2.0 * a - 1.0,
        "d_open_y": 2.0 * d_open_y,
        "d_round_x": 2.0 * d_round_x,
        "d_press_y": 2.0 * press,
        "seam": seam,
        "clamp_lo_y": np.where(row_is_below, 2.0 * lip_y - 1.0, -big),
        "clamp_hi_y": np.where(row_is_below, big, 2.0 * lip_y - 1.0),
        "blend": blend,
        "lens": lens * (np.abs(X - mx) < span),
    }


def _check_fields(f: dict[str, np.ndarray], size: int) -> None:
    """The warp at full opening, at full rounding, at full spreading and at a full closure never
    folds (source coordinates monotone) and every displacement lies inside JAW_REGION."""
    for k in (1.0, -SPREAD_WIDTH):
        src_x = f["base_x"][None, :] + k * f["d_round_x"]
        # the opening field is read at the narrowed columns, as the graph does with GridSample
        d_open_at = np.stack([np.interp(src_x[i], f["base_x"], f["d_open_y"][i]) for i in range(size)])
        src_y = np.minimum(np.maximum(f["base_y"][:, None] + d_open_at, f["clamp_lo_y"][:, None]),
                           f["clamp_hi_y"][:, None])
        if np.any(np.diff(src_y, axis=0) < -1e-9) or np.any(np.diff(src_x, axis=1) < -1e-9):
            raise AssertionError(f"built-in warp folds at S={size} (rounding {k})")
    src_y = f["base_y"][:, None] + f["d_press_y"]
    if np.any(np.diff(src_y, axis=0) < -1e-9):
        raise AssertionError(f"built-in closure folds at S={size}")
    moved = (np.abs(f["d_open_y"]) > 0) | (np.abs(f["d_round_x"]) > 0) | (np.abs(f["d_press_y"]) > 0)
    if np.any(moved & (f["blend"] <= 0)):
        raise AssertionError(f"built-in warp displaces pixels outside JAW_REGION at S={size}")


def region_box(blend: np.ndarray) -> tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 of the smallest box that holds every pixel the blend weight
    touches (blend > 0): the only pixels the graph can change."""
    rows = np.flatnonzero((blend > 0).any(axis=1))
    cols = np.flatnonzero((blend > 0).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


# --- graph ------------------------------------------------------------------------------------
def build_builtin_model(size: int = 256, whole_crop: bool = False) -> onnx.ModelProto:
    """The built-in model for crop side `size` as an ONNX ModelProto (IR 10, opset 17),
    validated by `onnx.checker.check_model`. See the module docstring for what it computes.

    The warp, the shading and the blend run on `region_box` only (about 13 % of the crop's pixels);
    every other pixel of the output is the reference's, copied. `whole_crop=True` runs them on the
    whole crop instead: the same output, at about four times the cost (kept to test that claim).
    """
    S = int(size)
    if S < 32:
        raise ValueError(f"built-in model size must be >= 32 pixels, got {size}")
    f = warp_fields(S)
    _check_fields(f, S)
    r0, r1, c0, c1 = (0, S, 0, S) if whole_crop else region_box(f["blend"])
    h, w = r1 - r0, c1 - c0

    def const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    inits = [
        const("own_cols_starts", [0], np.int64), const("own_cols_ends", [OWN_COLUMNS], np.int64),
        const("own_cols_axes", [3], np.int64),
        const("flat_shape", [-1, N_MELS], np.int64),
        const("scalar_shape", [-1, 1, 1, 1], np.int64),
        const("c", _C), const("inv_c", 1.0 / _C),
        const("band_w", band_weights()),
        const("open_floor", OPEN_FLOOR), const("open_inv_range", 1.0 / (OPEN_FULL - OPEN_FLOOR)),
        const("round_low", ROUND_LOW), const("round_inv_range", 1.0 / (ROUND_FULL - ROUND_LOW)),
        const("round_gate", ROUND_GATE),
        const("spread_low", SPREAD_LOW), const("spread_inv_range", 1.0 / (SPREAD_FULL - SPREAD_LOW)),
        const("ahead_starts", [AHEAD_COLUMNS[0]], np.int64), const("ahead_ends", [AHEAD_COLUMNS[1]], np.int64),
        const("speech_w", band_weights()[:, :1]),
        const("quiet_from", PRESS_QUIET[0]), const("quiet_inv_range", 1.0 / (PRESS_QUIET[1] - PRESS_QUIET[0])),
        const("ahead_from", PRESS_AHEAD[0]), const("ahead_inv_range", 1.0 / (PRESS_AHEAD[1] - PRESS_AHEAD[0])),
        const("press_seam", PRESS_SEAM),
        const("spread_width", SPREAD_WIDTH), const("spread_close", SPREAD_CLOSE), const("round_open", ROUND_OPEN),
        const("lift2", 2.0 * LIP_LIFT), const("drop2", 2.0 * JAW_DROP), const("tiny", 1e-4),
        const("four", 4.0), const("lens_gain", 3.0), const("tongue_from", TONGUE_FROM),
        const("teeth_from", TEETH_FROM), const("teeth_inv_range", 1.0 / 0.35),
        const("teeth_depth", TEETH_DEPTH), const("teeth_inv_soft", 1.0 / 0.08),
        const("y_rel", (f["base_y"][r0:r1] - (2.0 * canonical.MOUTH_CENTER[1] - 1.0)).reshape(1, 1, h, 1)),
        const("zero", 0.0), const("one", 1.0), const("two", 2.0), const("three", 3.0),
        # the grid and the fields on the region's box; GridSample reads the whole reference
        const("base_x", f["base_x"][c0:c1].reshape(1, 1, w, 1)),
        const("base_y", f["base_y"][r0:r1].reshape(1, h, 1, 1)),
        const("d_fields", np.stack([f["d_open_y"], f["lens"], f["d_press_y"]]).reshape(1, 3, S, S)),
        const("batch_starts", [0], np.int64), const("batch_ends", [1], np.int64),
        const("field_tail_shape", [3, S, S], np.int64),
        const("d_round_x", f["d_round_x"][r0:r1, c0:c1].reshape(1, h, w, 1)),
        const("clamp_lo_y", f["clamp_lo_y"][r0:r1].reshape(1, h, 1, 1)),
        const("clamp_hi_y", f["clamp_hi_y"][r0:r1].reshape(1, h, 1, 1)),
        const("blend", f["blend"][r0:r1, c0:c1].reshape(1, 1, h, w)),
        const("seam", f["seam"][r0:r1, c0:c1].reshape(1, 1, h, w)),
        const("shade_inv_soft", 1.0 / (2.0 * SHADE_SOFT)),  # gap is in grid units (2 per S)
        const("lip_bgr", np.asarray(LIP_BGR).reshape(1, 3, 1, 1)),
        const("throat_minus_lip", (np.asarray(THROAT_BGR) - np.asarray(LIP_BGR)).reshape(1, 3, 1, 1)),
        const("tongue_bgr", np.asarray(TONGUE_BGR).reshape(1, 3, 1, 1)),
        const("teeth_bgr", np.asarray(TEETH_BGR).reshape(1, 3, 1, 1)),
        const("ref_starts", [3], np.int64), const("ref_ends", [6], np.int64), const("ch_axes", [1], np.int64),
        const("box_starts", [r0, c0], np.int64), const("box_ends", [r1, c1], np.int64),
        const("hw_axes", [2, 3], np.int64),
    ]
    N = helper.make_node
    nodes = [
        # 1-2. band energies of the frame's own columns: E = log(mean(exp(c*v))) / c
        N("Slice", ["mel_spectrogram", "own_cols_starts", "own_cols_ends", "own_cols_axes"], ["mel_own"]),
        N("Mul", ["mel_own", "c"], ["mel_scaled"]),
        N("Exp", ["mel_scaled"], ["mel_amp"]),
        N("ReduceMean", ["mel_amp"], ["amp_per_bin"], axes=[3], keepdims=0),     # [B,1,80]
        N("Reshape", ["amp_per_bin", "flat_shape"], ["amp_flat"]),                # [B,80]
        N("MatMul", ["amp_flat", "band_w"], ["band_amp"]),                         # [B,5]
        N("Log", ["band_amp"], ["band_log"]),
        N("Mul", ["band_log", "inv_c"], ["band_energy"]),
        N("Split", ["band_energy"], ["e_speech", "e_low", "e_high", "e_mid", "e_top"], axis=1),  # [B,1] each
        # opening = smoothstep((E - floor) / range)
        *_ramp_nodes("e_speech", "open_floor", "open_inv_range", "opening"),
        # 3. rounding = smoothstep((E_low - E_high - low) / range) * clip(gate * opening, 0, 1)
        N("Sub", ["e_low", "e_high"], ["tilt"]),
        *_ramp_nodes("tilt", "round_low", "round_inv_range", "round_s"),
        N("Mul", ["opening", "round_gate"], ["gate0"]),
        N("Clip", ["gate0", "zero", "one"], ["gate"]),
        N("Mul", ["round_s", "gate"], ["rounding"]),
        # spreading = smoothstep((top - mid - low) / range) * gate (F2 high: /i/, /e/); it narrows the
        # jaw's opening
        N("Sub", ["e_top", "e_mid"], ["f2_tilt"]),
        *_ramp_nodes("f2_tilt", "spread_low", "spread_inv_range", "spread_s"),
        N("Mul", ["spread_s", "gate"], ["spreading"]),
        N("Mul", ["spreading", "spread_width"], ["spread_x"]),
        N("Sub", ["rounding", "spread_x"], ["shape_x"]),                          # >0 narrower, <0 wider
        N("Mul", ["spreading", "spread_close"], ["close_by"]),
        N("Sub", ["one", "close_by"], ["open_scale"]),
        N("Mul", ["opening", "open_scale"], ["jaw_open0"]),
        # rounding opens the jaw further towards full (/o/, /u/: a round, taller opening)
        N("Sub", ["one", "jaw_open0"], ["jaw_rest"]),
        N("Mul", ["jaw_rest", "rounding"], ["jaw_more0"]),
        N("Mul", ["jaw_more0", "round_open"], ["jaw_more"]),
        N("Add", ["jaw_open0", "jaw_more"], ["jaw_open"]),
        N("Reshape", ["jaw_open", "scalar_shape"], ["opening4"]),                 # [B,1,1,1]
        N("Reshape", ["shape_x", "scalar_shape"], ["rounding4"]),
        # 3b. a closure (/m b p/): the frame's own sound is quiet (below the opening's floor) and a
        #     syllable starts in the next ~40 ms: press = (1 - smoothstep(own)) * smoothstep(ahead)
        N("Slice", ["mel_spectrogram", "ahead_starts", "ahead_ends", "own_cols_axes"], ["mel_ahead"]),
        N("Mul", ["mel_ahead", "c"], ["ahead_scaled"]),
        N("Exp", ["ahead_scaled"], ["ahead_amp"]),
        N("ReduceMean", ["ahead_amp"], ["ahead_per_bin"], axes=[3], keepdims=0),
        N("Reshape", ["ahead_per_bin", "flat_shape"], ["ahead_flat"]),
        N("MatMul", ["ahead_flat", "speech_w"], ["ahead_band"]),
        N("Log", ["ahead_band"], ["ahead_log"]),
        N("Mul", ["ahead_log", "inv_c"], ["e_ahead"]),                            # [B,1]
        *_ramp_nodes("e_speech", "quiet_from", "quiet_inv_range", "not_quiet"),
        N("Sub", ["one", "not_quiet"], ["quiet"]),
        *_ramp_nodes("e_ahead", "ahead_from", "ahead_inv_range", "ahead_s"),
        N("Mul", ["quiet", "ahead_s"], ["press"]),
        N("Reshape", ["press", "scalar_shape"], ["press4"]),                     # [B,1,1,1]
        # 4. sampling grid
        N("Mul", ["rounding4", "d_round_x"], ["shift_x"]),
        N("Add", ["base_x", "shift_x"], ["grid_x"]),                               # [B,S,S,1]
        # the opening field read at the narrowed columns, so the opening narrows with rounding
        N("Shape", ["grid_x"], ["grid_x_shape"]),                                 # [B,S,S,1]
        N("Expand", ["base_y", "grid_x_shape"], ["base_y_full"]),
        N("Concat", ["grid_x", "base_y_full"], ["grid_narrow"], axis=3),
        N("Slice", ["grid_x_shape", "batch_starts", "batch_ends"], ["batch_dim"]),
        N("Concat", ["batch_dim", "field_tail_shape"], ["field_shape"], axis=0),
        N("Expand", ["d_fields", "field_shape"], ["d_fields_batch"]),            # [B,3,S,S]
        N("GridSample", ["d_fields_batch", "grid_narrow"], ["d_fields_at"], mode="bilinear",
          padding_mode="border", align_corners=0),
        N("Split", ["d_fields_at"], ["d_open_at", "lens_at", "d_press_at"], axis=1),  # [B,1,h,w] each
        N("Mul", ["opening4", "d_open_at"], ["shift_open"]),
        N("Mul", ["press4", "d_press_at"], ["shift_press"]),
        N("Add", ["shift_open", "shift_press"], ["shift_nchw"]),
        N("Transpose", ["shift_nchw"], ["shift_y"], perm=[0, 2, 3, 1]),          # [B,h,w,1]
        N("Add", ["base_y", "shift_y"], ["src_y"]),
        N("Max", ["src_y", "clamp_lo_y"], ["src_y_lo"]),
        N("Min", ["src_y_lo", "clamp_hi_y"], ["grid_y"]),
        N("Concat", ["grid_x", "grid_y"], ["grid"], axis=3),                      # [B,S,S,2]
        N("Slice", ["video_frames", "ref_starts", "ref_ends", "ch_axes"], ["reference"]),  # [B,3,S,S]
        N("GridSample", ["reference", "grid"], ["warped"], mode="bilinear", padding_mode="border",
          align_corners=0),
        # 5. the inside of the opened gap (where the lip line's row was stretched), faded in at both
        #    lips: t runs from 0 under the upper lip to 1 over the lower lip (the opening's upper and
        #    lower contours are the lip lift and the drop times the lens profile at the narrowed
        #    column); darkest half-way (the back of the mouth), reddish at the lips, the tongue in
        #    the lower part, and a band of upper teeth under the upper lip once the mouth is wide open
        N("Sub", ["grid_y", "src_y"], ["gap_signed"]),
        N("Abs", ["gap_signed"], ["gap"]),                                        # [B,S,S,1] grid units
        N("Transpose", ["gap"], ["gap_nchw"], perm=[0, 3, 1, 2]),                 # [B,1,S,S]
        N("Mul", ["gap_nchw", "shade_inv_soft"], ["alpha_t0"]),
        N("Clip", ["alpha_t0", "zero", "one"], ["alpha_t"]),
        *_smoothstep_nodes("alpha_t", "alpha"),
        N("Mul", ["opening4", "lens_at"], ["open_lens"]),
        N("Mul", ["open_lens", "lift2"], ["h_up"]),
        N("Mul", ["open_lens", "drop2"], ["h_low"]),
        N("Add", ["y_rel", "h_up"], ["below_upper"]),
        N("Add", ["h_up", "h_low"], ["h_sum0"]),
        N("Add", ["h_sum0", "tiny"], ["h_sum"]),
        N("Div", ["below_upper", "h_sum"], ["t0"]),
        N("Clip", ["t0", "zero", "one"], ["t"]),
        N("Sub", ["one", "t"], ["one_minus_t"]),
        N("Mul", ["t", "one_minus_t"], ["mid0"]),
        N("Mul", ["mid0", "four"], ["mid1"]),                                     # 1 half-way, 0 at the lips
        N("Mul", ["mid1", "mid1"], ["mid"]),                                      # ... flat near the lips
        *_smoothstep_nodes("mid", "depth_s"),
        N("Mul", ["depth_s", "throat_minus_lip"], ["inner_d"]),
        N("Add", ["lip_bgr", "inner_d"], ["inner_dark"]),                         # [B,3,h,w]
        # the tongue: the lower part of the opening, faded in
        N("Sub", ["t", "tongue_from"], ["tongue_t0"]),
        N("Mul", ["tongue_t0", "three"], ["tongue_t1"]),
        N("Clip", ["tongue_t1", "zero", "one"], ["tongue_t"]),
        *_smoothstep_nodes("tongue_t", "tongue_s"),
        N("Sub", ["tongue_bgr", "inner_dark"], ["to_tongue"]),
        N("Mul", ["to_tongue", "tongue_s"], ["to_tongue_w"]),
        N("Add", ["inner_dark", "to_tongue_w"], ["inner_soft"]),
        # the upper teeth: under the upper lip, only when the opening is wide, fading at the corners
        N("Sub", ["opening4", "teeth_from"], ["teeth_o0"]),
        N("Mul", ["teeth_o0", "teeth_inv_range"], ["teeth_o1"]),
        N("Clip", ["teeth_o1", "zero", "one"], ["teeth_o"]),
        *_smoothstep_nodes("teeth_o", "teeth_on"),                                # [B,1,1,1]
        N("Sub", ["teeth_depth", "t"], ["band0"]),
        N("Mul", ["band0", "teeth_inv_soft"], ["band1"]),
        N("Clip", ["band1", "zero", "one"], ["band"]),
        N("Mul", ["lens_at", "lens_gain"], ["lens_g0"]),
        N("Clip", ["lens_g0", "zero", "one"], ["lens_g"]),
        N("Mul", ["band", "lens_g"], ["teeth_w0"]),
        N("Mul", ["teeth_w0", "teeth_on"], ["teeth_w"]),
        N("Sub", ["teeth_bgr", "inner_soft"], ["to_teeth"]),
        N("Mul", ["to_teeth", "teeth_w"], ["to_teeth_w"]),
        N("Add", ["inner_soft", "to_teeth_w"], ["inner"]),
        N("Sub", ["inner", "warped"], ["to_inner"]),
        N("Mul", ["to_inner", "alpha"], ["to_inner_a"]),
        N("Add", ["warped", "to_inner_a"], ["shaded_open"]),
        # a closure's seam: the lip line, where the pressed lips meet, a little darker
        N("Mul", ["press4", "press_seam"], ["seam_k"]),
        N("Mul", ["seam", "seam_k"], ["seam_w"]),
        N("Sub", ["one", "seam_w"], ["seam_keep"]),
        N("Mul", ["shaded_open", "seam_keep"], ["shaded"]),
        # 6. blend inside JAW_REGION only
        N("Slice", ["reference", "box_starts", "box_ends", "hw_axes"], ["reference_box"]),  # [B,3,h,w]
        N("Sub", ["shaded", "reference_box"], ["delta"]),
        N("Mul", ["delta", "blend"], ["delta_in_region"]),
        N("Add", ["reference_box", "delta_in_region"], ["blended_box"]),
        *_paste_box_nodes("reference", "blended_box", (r0, r1, c0, c1), S, "blended", inits),
        N("Clip", ["blended", "zero", "one"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, f"lipsync_builtin_s{S}",
        inputs=[helper.make_tensor_value_info("mel_spectrogram", TensorProto.FLOAT, ["batch", 1, N_MELS, MEL_STEP]),
                helper.make_tensor_value_info("video_frames", TensorProto.FLOAT, ["batch", 6, S, S])],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, S, S])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lipsync-cluster", producer_version=str(GENERATOR_VERSION),
                              doc_string="Procedural lip-sync model (mel energy -> mouth warp); Wav2Lip contract.")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"lipsync.crop": "aligned"})  # built on the canonical geometry
    onnx.checker.check_model(model, full_check=True)
    return model


def _paste_box_nodes(full: str, box: str, rows_cols: tuple[int, int, int, int], size: int, out: str,
                     inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """out = `full` [B,C,S,S] with rows r0:r1, columns c0:c1 replaced by `box` [B,C,h,w], built
    from slices and concatenations (no pixel is computed). Adds its slice bounds to `inits`."""
    r0, r1, c0, c1 = rows_cols
    N = helper.make_node
    nodes: list[onnx.NodeProto] = []

    def piece(name: str, starts: list[int], ends: list[int]) -> str:
        inits.extend([numpy_helper.from_array(np.asarray(starts, np.int64), f"{name}_starts"),
                      numpy_helper.from_array(np.asarray(ends, np.int64), f"{name}_ends")])
        nodes.append(N("Slice", [full, f"{name}_starts", f"{name}_ends", "hw_axes"], [name]))
        return name

    row = [piece("ref_left", [r0, 0], [r1, c0])] if c0 > 0 else []
    row.append(box)
    if c1 < size:
        row.append(piece("ref_right", [r0, c1], [r1, size]))
    column = [piece("ref_top", [0, 0], [r0, size])] if r0 > 0 else []
    if len(row) > 1:
        nodes.append(N("Concat", row, ["box_rows"], axis=3))
    column.append("box_rows" if len(row) > 1 else box)
    if r1 < size:
        column.append(piece("ref_bottom", [r1, 0], [size, size]))
    nodes.append(N("Concat", column, [out], axis=2) if len(column) > 1 else N("Identity", column, [out]))
    return nodes


def _ramp_nodes(x: str, low: str, inv_range: str, out: str) -> list[onnx.NodeProto]:
    """out = smoothstep(clip((x - low) * inv_range, 0, 1)): a soft 0 -> 1 ramp of `x` from `low`."""
    N = helper.make_node
    return [N("Sub", [x, low], [f"{out}_d"]),
            N("Mul", [f"{out}_d", inv_range], [f"{out}_t0"]),
            N("Clip", [f"{out}_t0", "zero", "one"], [f"{out}_t"]),
            *_smoothstep_nodes(f"{out}_t", out)]


def _smoothstep_nodes(t: str, out: str) -> list[onnx.NodeProto]:
    """out = t*t*(3 - 2t) for t already clipped to [0, 1]."""
    N = helper.make_node
    return [N("Mul", [t, t], [f"{out}_tt"]),
            N("Mul", [t, "two"], [f"{out}_2t"]),
            N("Sub", ["three", f"{out}_2t"], [f"{out}_k"]),
            N("Mul", [f"{out}_tt", f"{out}_k"], [out])]


# --- cached file ------------------------------------------------------------------------------
def generator_fingerprint(size: int = 256) -> str:
    """A short hash of everything the model file depends on: this generator's source, the
    canonical geometry, the version constants and the size."""
    h = hashlib.sha256()
    h.update(f"v{GENERATOR_VERSION}/ir{IR_VERSION}/op{OPSET}/s{int(size)}".encode())
    for mod_file in (__file__, canonical.__file__):
        h.update(Path(mod_file).read_bytes())
    return h.hexdigest()[:16]


def builtin_model_path(settings: Settings | None = None, size: int = 256) -> Path:
    """Path of the built-in model file for crop side `size` under `settings.dir("models")`,
    generated on first use (atomic write) and reused while the generator is unchanged."""
    s = settings or get_settings()
    path = s.dir("models") / f"builtin-s{int(size)}-{generator_fingerprint(size)}.onnx"
    if path.is_file():
        return path
    data = build_builtin_model(size).SerializeToString()
    write_atomic(path, data)
    log.info("generated the built-in model %s (%d bytes)", path, len(data))
    return path
