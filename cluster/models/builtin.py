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
   rounding opens it `ROUND_OPEN` of the way further towards full, narrows the opening between the
   lips `HOLE_NARROWING` more than the lips themselves and purses the lips (a closure's press field,
   times `ROUND_PRESS`); on a template that shows its teeth (step 4a) it moves both lips over them
   instead (step 4), so the lips meet where the teeth were. So /o/, /u/ give a small, round hole
   between narrowed, pursed lips and /i/, /e/ a wide, flat opening.
3b. **Closure (/m b p/).** Before a bilabial release the lips are pressed together: the sound
   of the frame is near silence and a syllable starts right after it. press = (1 - smoothstep of
   the own speech-band energy over `PRESS_QUIET`) * smoothstep of the energy of the next ~40 ms
   over `PRESS_AHEAD`. It is 0 whenever the mouth opens (the own energy is then above the
   opening's floor) and in a pause (nothing ahead), so silence stays the template, bit for bit.
4a. **The template's own lip line.** The alignment puts a real face's lip line a few pixels off the
   canonical one (the astronaut's closed mouth: 8 px above it at S=256). In a band about the
   canonical line (`LIP_SEARCH`, columns near the mouth's centre) the graph takes each row's grey
   level, the depth of each row as a valley against the rows `VALLEY_REACH` above and below, and a
   softmax over those depths: the lip line is the darkest valley (a closed mouth's seam), rounded to
   whole pixels, and every field below moves with it. Where no row is a clear valley
   (`VALLEY_MIN`) or the band shows teeth (a row bright and unsaturated: `TEETH_SCORE`, a smile
   showing its teeth, whose opening belongs under the upper teeth) the canonical line is kept. On
   such a template the band of teeth is measured too: its rows (`TEETH_ROW`) in the run that reaches
   the canonical line (`TEETH_RUN_GAP`), counted above and below it, plus `COVER_MARGIN`, at most
   `COVER_MAX`: where the upper lip's and the lower lip's inner edges lie.
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
   close over most of them) and closed lips get thinner, pressed. Rounding on a template that shows
   its teeth adds cover * D_cover, each lip moved rigidly by its measured distance from the line
   towards it (`COVER_RIGID`, falling off by `COVER_REACH`), across the mouth within `COVER_SPAN`;
   there the rows are clamped at the lips' inner edges rather than at the line, so the teeth are
   never sampled: the lips meet over them, at a faint seam (`COVER_SEAM`), and the rounded opening
   between them is shaded as an inside.
5. **Inside of the mouth.** The opening (where the source row was clamped; an open mouth's rows
   are clamped up to `LIP_EDGE` off the lip line, so each lip's inner edge is stretched, not a
   closed mouth's dark seam) is filled with a mouth interior faded in (smoothstep) over
   `SHADE_SOFT` of opened gap at either lip, so its edge is soft and the corners, where the lips
   barely part, taper into the template's own lip line. The gap (how far past the lip line a row
   was stretched) is 0 at either lip's inner contour and largest at the lip line at the centre of
   the opening, so it is the opening's depth: the colour goes from `LIP_BGR` (a wet, reddish rim;
   `TONGUE_BGR` behind the lower lip of a wide opening) to `THROAT_BGR` (the back of the mouth)
   as the gap reaches `DEEP_GAP`: a small opening and the corners stay reddish, a wide one is dark
   at its centre. Once the opening passes `TEETH_FROM` a band of `TEETH_BGR` (upper teeth, a
   little darker deeper in) hangs under the upper lip with an edge of its own, fading out towards
   the lip line (`TEETH_END`) and the corners; pursed lips hide it, and a template that shows its
   own teeth (step 4a) gets none. A closure darkens the lip line where the lips meet by up to
   `PRESS_SEAM` (the seam).
6. **Blend.** out = ref + W * (shaded - ref), W a smooth weight that is exactly 0 outside
   `JAW_REGION`, so no pixel outside the region can change; with opening 0 the grid is the
   identity and the output equals the reference (to float rounding).

Steps 4-6 run only on `region_box`, the smallest box holding JAW_REGION's blend weight (about 13 %
of the crop); the rest of the output is the reference, copied. The graph is deterministic, has no
trained weights, and ran (v3) a batch of 16 crops of 256 px in about 13 ms of CPU (0.8 ms per
crop; 4.4 ms when steps 4-6 ran on the whole crop); v4's interior shading costs about 0.5 ms per
crop more (batch of 16, one thread, side by side on a loaded machine: v3 25.9 ms, v4 34.3 ms);
v5's closure, F2 band and softer shading about 0.3 ms per crop more (one thread, batch of 16,
side by side, loaded machine: v4 1.74, v5 2.05 ms per crop, min of 10); v6's lip-line search and
depth shading and v7's lips over the teeth: see docs/PERFORMANCE.md (`bench/builtin_cost.py`).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cluster.audio import mel_band_edges
from cluster.config import Settings, get_settings
from cluster.faces import canonical
from cluster.fsutil import write_atomic
from cluster.models.adapter import CROP_METADATA_KEY, FACE_INPUT_METADATA_KEY

# onnx (0.6-0.7 s to import: ml_dtypes) is imported where a model is built, not by every process that
# imports this module to name or find a model (the ingress, the CLI's checks)
if TYPE_CHECKING:
    import onnx

log = logging.getLogger("lipsync.models")

GENERATOR_VERSION = 7
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
DEEP_GAP = 0.034    # gap depth (fraction of S) at which the inside is darkest (the back of the mouth): shallow
                    # parts (the corners, near the lips, a small opening) stay the lighter, reddish rim colour
LIP_SEARCH = (-0.045, 0.015)  # where the template's own lip line is looked for: rows (fraction of S) about the
                              # canonical lip line (the alignment puts a real face's lip line a few pixels off)
LIP_SEARCH_HALF = 0.35  # ... over the columns within this fraction of MOUTH_HALF_WIDTH of the mouth's centre
VALLEY_REACH = 0.012    # the lip line is the darkest row relative to the rows this far (fraction of S) above
                        # and below it (a closed mouth's seam, the shadow between the lips) ...
VALLEY_MIN = (0.05, 0.10)  # ... found (fully) when that valley is deeper than these (grey, 0-1); the
                           # canonical lip line is kept where no row is that dark (e.g. teeth)
VALLEY_SHARP = 60.0     # softmax sharpness over the valley depths (grey units)
TEETH_SCORE = (0.38, 0.46)  # a row of the band whose grey minus three times its chroma (max - min of B, G, R)
                            # exceeds these shows teeth (bright, unsaturated; the astronaut's teeth 0.50-0.67 in
                            # 96-384 px crops, the bright skin above a closed mouth's lips at most 0.33): a template
                            # smiling with its teeth keeps the canonical lip line (under its upper teeth) instead of
                            # the valley above them
LIP_EDGE = 0.007        # an open mouth's lips are sampled this far (fraction of S, times the opening) off the line
TEETH_ROW = (0.2, 0.4)    # a row of the band whose teeth score (above) exceeds these is a row of teeth: on a
                          # template that shows its teeth, their rows above and below the lip line are counted ...
TEETH_RUN_GAP = 0.012  # ... the run of such rows that reaches to within this (fraction of S) of the line ...
COVER_MARGIN = 0.008  # ... and this much (fraction of S) added on either side (the teeth's blurred edge):
                      # how far the upper lip's and the lower lip's inner edges lie from the lip line
COVER_MAX = 0.025   # ... at most (a wider band of teeth is covered this far only: the warp must not fold)
COVER_SPAN = (0.55, 0.9)  # ... across the mouth: fully within this fraction of MOUTH_HALF_WIDTH of its centre,
                           # not at all beyond the second
COVER_RIGID = 0.02  # rounding on such a template moves each lip over the teeth by that much, rigidly up to this
COVER_REACH = 0.075 # far from the lip line, falling off to 0 this far from it (the skin beyond stretches)
HOLE_NARROWING = 1.2  # rounding narrows the opening between the lips this much more than the lips themselves
ROUND_PRESS = 0.3   # rounding presses the lips towards each other outside the opening (a closure's field):
                    # pursed, protruding lips around a small round opening
PRESS_QUIET = (OPEN_FLOOR - 0.8, OPEN_FLOOR)  # own speech-band energy: fully quiet below, not at all from the floor
PRESS_AHEAD = (-2.2, -1.2)  # speech-band energy of the next ~40 ms at which a closure starts / is full
PRESS_UP = 0.016    # a closure pulls the upper lip down by this (fraction of S) at the mouth centre ...
PRESS_LOW = 0.018   # ... and the lower lip up by this: the lips meet, pressed (the band between them is hidden)
PRESS_REACH = 0.05  # ... over this depth above and below the lip line
PRESS_SEAM = 0.25   # the pressed lips' seam: the lip line darkened by up to 25 % ...
COVER_SEAM = 0.1    # ... and by up to 10 % where rounding moved the lips over the teeth to meet
SEAM_HALF = 0.006   # ... over about this half-height
LIP_BGR = (0.30, 0.30, 0.56)     # the inside of the mouth just inside the lips (B, G, R): wet, reddish
THROAT_BGR = (0.05, 0.04, 0.12)  # ... and at the back, where the opening is deepest
TONGUE_BGR = (0.30, 0.32, 0.62)  # the tongue, in the lower part of a wide opening
TEETH_BGR = (0.64, 0.71, 0.77)   # the upper teeth, under the upper lip of a wide opening (warm ivory) ...
TEETH_SHADE = 0.2   # ... darker by up to this towards the back of the mouth
TEETH_END = 0.85    # the teeth end (fully) where the gap under the upper lip reaches this fraction of LIP_LIFT ...
TEETH_FADE = 0.30   # ... fading out over this much more of it
TEETH_FROM = 0.55   # ... once the opening exceeds this (fully at TEETH_FROM + 0.35)


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
    # pursed lips over a template's teeth: the upper lip moves down rigidly over the upper teeth,
    # the skin above it stretching
    # (one field: the graph scales its upper and lower halves by the teeth above and below the line);
    # across the mouth rigid up to near the corners (the teeth reach them; rounding narrows the lips, so
    # an output column within COVER_SPAN[0] shows a source column within the mouth)
    cover_cols = _smoothstep((COVER_SPAN[1] - q) / (COVER_SPAN[1] - COVER_SPAN[0]))
    cover = np.where(depth < 0, -_falloff(-depth, COVER_RIGID, COVER_REACH),
                     _falloff(depth, COVER_RIGID, COVER_REACH)) * inside
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
        "d_cover_y": cover,       # per unit of displacement (grid units), without its columns' profile:
        "cover_cols": cover_cols, # the graph scales it by the template's teeth band above / below the line
    }


def _check_fields(f: dict[str, np.ndarray], size: int) -> None:
    """The warp at full opening, at full rounding, at full spreading, at a full closure and with
    the upper lip over the teeth never folds (source coordinates monotone) and every displacement
    lies inside JAW_REGION."""
    for k in (1.0, -SPREAD_WIDTH):
        src_x = f["base_x"][None, :] + k * f["d_round_x"]
        # the opening field is read at the narrowed columns, as the graph does with GridSample
        d_open_at = np.stack([np.interp(src_x[i], f["base_x"], f["d_open_y"][i]) for i in range(size)])
        src_y = np.minimum(np.maximum(f["base_y"][:, None] + d_open_at, f["clamp_lo_y"][:, None]),
                           f["clamp_hi_y"][:, None])
        if np.any(np.diff(src_y, axis=0) < -1e-9) or np.any(np.diff(src_x, axis=1) < -1e-9):
            raise AssertionError(f"built-in warp folds at S={size} (rounding {k})")
    cover = 2.0 * COVER_MAX * f["d_cover_y"] * f["cover_cols"]
    for name, field in (("closure", f["d_press_y"]), ("cover", cover)):  # pucker: a weaker closure
        src_y = f["base_y"][:, None] + field
        if np.any(np.diff(src_y, axis=0) < -1e-9):
            raise AssertionError(f"built-in {name} folds at S={size}")
    moved = ((np.abs(f["d_open_y"]) > 0) | (np.abs(f["d_round_x"]) > 0) | (np.abs(f["d_press_y"]) > 0)
             | (np.abs(f["d_cover_y"] * f["cover_cols"]) > 0))
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
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    S = int(size)
    if S < 32:
        raise ValueError(f"built-in model size must be >= 32 pixels, got {size}")
    f = warp_fields(S)
    _check_fields(f, S)
    r0, r1, c0, c1 = (0, S, 0, S) if whole_crop else region_box(f["blend"])
    h, w = r1 - r0, c1 - c0
    # the band of the reference in which the template's lip line is looked for (step 4a)
    mx, lip_y = canonical.MOUTH_CENTER
    vk = max(1, int(round(VALLEY_REACH * S)))
    lr0, lr1 = int(round((lip_y + LIP_SEARCH[0]) * S)) - vk, int(round((lip_y + LIP_SEARCH[1]) * S)) + vk
    half_w = LIP_SEARCH_HALF * canonical.MOUTH_HALF_WIDTH
    lc0, lc1 = int(round((mx - half_w) * S)), max(int(round((mx + half_w) * S)), int(round((mx - half_w) * S)) + 1)
    band_rows = (np.arange(lr0, lr1) + 0.5) / S  # the band's row centres, normalised
    band_above = band_rows < lip_y               # ... above the canonical lip line

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
        const("press_seam", PRESS_SEAM), const("cover_seam", COVER_SEAM),
        const("spread_width", SPREAD_WIDTH), const("spread_close", SPREAD_CLOSE), const("round_open", ROUND_OPEN),
        const("lens_gain", 3.0), const("side_k", 1.0 / (2.0 * 0.003)),
        const("teeth_from", TEETH_FROM), const("teeth_inv_range", 1.0 / 0.35),
        const("teeth_end", 2.0 * TEETH_END * LIP_LIFT), const("teeth_fade_inv", 1.0 / (2.0 * TEETH_FADE * LIP_LIFT)),
        const("deep_inv", 1.0 / (2.0 * DEEP_GAP)), const("teeth_edge_inv", 1.0 / (2.0 * 0.004)),
        const("teeth_shade", TEETH_SHADE),
        const("hole_narrowing", HOLE_NARROWING),
        const("mouth_x", 2.0 * mx - 1.0), const("inv_span", 1.0 / (2.0 * MOUTH_SPAN * canonical.MOUTH_HALF_WIDTH)),
        const("nchw_shape", [-1, 1, h, w], np.int64), const("nhwc_shape", [-1, h, w, 1], np.int64),
        const("base_y_col", f["base_y"][r0:r1].reshape(1, 1, h, 1)),
        const("seam_off", 1.0 / S), const("seam_inv", 1.0 / (2.0 * SEAM_HALF)),
        const("seam_cols", np.sqrt(np.clip(1.0 - ((f["base_x"][c0:c1] - (2.0 * mx - 1.0))
                                                 / (2.0 * MOUTH_SPAN * canonical.MOUTH_HALF_WIDTH)) ** 2, 0.0, 1.0))
              .reshape(1, 1, 1, w)),
        const("lip_band_starts", [lr0, lc0], np.int64), const("lip_band_ends", [lr1, lc1], np.int64),
        const("valley_up_starts", [0], np.int64), const("valley_up_ends", [lr1 - lr0 - 2 * vk], np.int64),
        const("valley_mid_starts", [vk], np.int64), const("valley_mid_ends", [lr1 - lr0 - vk], np.int64),
        const("valley_dn_starts", [2 * vk], np.int64), const("valley_dn_ends", [lr1 - lr0], np.int64),
        const("row_axis", [1], np.int64), const("half", 0.5), const("valley_sharp", VALLEY_SHARP),
        const("valley_from", VALLEY_MIN[0]), const("valley_inv_range", 1.0 / (VALLEY_MIN[1] - VALLEY_MIN[0])),
        const("valley_rows", (2.0 * (np.arange(lr0 + vk, lr1 - vk) + 0.5) / S - 2.0 * lip_y).reshape(-1, 1)),
        const("lip_g", 2.0 * lip_y - 1.0), const("half_s", S / 2.0), const("two_over_s", 2.0 / S),
        const("teeth_row_from", TEETH_ROW[0]), const("teeth_row_inv", 1.0 / (TEETH_ROW[1] - TEETH_ROW[0])),
        const("rows_above", band_above), const("rows_below", ~band_above),
        const("row_pitch_up", np.where(band_above, 2.0 / S, 0.0).reshape(-1, 1)),
        const("row_pitch_dn", np.where(band_above, 0.0, 2.0 / S).reshape(-1, 1)),
        const("near_line", np.abs(band_rows - lip_y) < TEETH_RUN_GAP),
        const("tiny", 1e-4), const("row_axis_scalar", 1, np.int64),
        const("cover_cols", f["cover_cols"][0, c0:c1].reshape(1, 1, 1, w)),
        const("cover_cols_x", f["cover_cols"][0, c0:c1].reshape(1, 1, w, 1)),
        const("lips_lens", f["lens"][0, c0:c1].reshape(1, 1, w, 1)),
        const("row_shape", [-1, 1, h, 1], np.int64),
        const("cover_margin", 2.0 * COVER_MARGIN), const("cover_max", 2.0 * COVER_MAX),
        const("lip_edge", 2.0 * LIP_EDGE), const("teeth_score_from", TEETH_SCORE[0]),
        const("teeth_score_inv", 1.0 / (TEETH_SCORE[1] - TEETH_SCORE[0])), const("big", 3.0),
        const("minus_big", -3.0), const("round_press", ROUND_PRESS),
        const("zero", 0.0), const("one", 1.0), const("two", 2.0), const("three", 3.0),
        # the grid and the fields on the region's box; GridSample reads the whole reference
        const("base_x", f["base_x"][c0:c1].reshape(1, 1, w, 1)),
        const("base_y", f["base_y"][r0:r1].reshape(1, h, 1, 1)),
        const("d_fields", np.stack([f["d_open_y"], f["d_press_y"], f["d_cover_y"]]).reshape(1, 3, S, S)),
        const("stacked_grid_shape", [1, -1, w, 2], np.int64),
        const("d_round_x", f["d_round_x"][r0:r1, c0:c1].reshape(1, h, w, 1)),
        const("blend", f["blend"][r0:r1, c0:c1].reshape(1, 1, h, w)),
        const("shade_inv_soft", 1.0 / (2.0 * SHADE_SOFT)),  # gap is in grid units (2 per S)
        const("lip_bgr", np.asarray(LIP_BGR).reshape(1, 3, 1, 1)),
        const("throat_bgr", np.asarray(THROAT_BGR).reshape(1, 3, 1, 1)),
        const("tongue_minus_lip", (np.asarray(TONGUE_BGR) - np.asarray(LIP_BGR)).reshape(1, 3, 1, 1)),
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
        N("Reshape", ["rounding", "scalar_shape"], ["round_only4"]),
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
        # 4a. the template's own lip line: the darkest row (against the rows VALLEY_REACH above and
        #     below) of a band about the canonical lip line at the mouth's centre, by a softmax over the
        #     valley depths; kept at the canonical line where no row is a clear valley. Every field
        #     below is moved down by lip_dy, so the lips part where the template's lips meet
        N("Slice", ["video_frames", "ref_starts", "ref_ends", "ch_axes"], ["reference"]),  # [B,3,S,S]
        N("Slice", ["reference", "lip_band_starts", "lip_band_ends", "hw_axes"], ["lip_band"]),
        N("ReduceMean", ["lip_band"], ["lip_grey"], axes=[1], keepdims=0),       # [B,rows,cols]
        N("ReduceMean", ["lip_grey"], ["lip_profile"], axes=[2], keepdims=0),     # [B,rows]
        N("ReduceMax", ["lip_band"], ["lip_max"], axes=[1], keepdims=0),
        N("ReduceMin", ["lip_band"], ["lip_min"], axes=[1], keepdims=0),
        N("Sub", ["lip_max", "lip_min"], ["lip_chroma"]),
        N("ReduceMean", ["lip_chroma"], ["chroma_profile"], axes=[2], keepdims=0),
        N("Mul", ["chroma_profile", "three"], ["chroma3"]),
        N("Sub", ["lip_profile", "chroma3"], ["teeth_score"]),
        N("ReduceMax", ["teeth_score"], ["teeth_score_max"], axes=[1], keepdims=1),  # [B,1]
        *_ramp_nodes("teeth_score_max", "teeth_score_from", "teeth_score_inv", "teeth_seen"),
        # the band of teeth: its rows above and below the canonical lip line, counted (grid units)
        # (only the run of teeth rows that touches the line: a product over the rows between a row and
        # the line, as the exponential of a cumulative sum of logarithms)
        *_ramp_nodes("teeth_score", "teeth_row_from", "teeth_row_inv", "teeth_row"),    # [B,rows]
        N("Max", ["teeth_row", "near_line"], ["teeth_row_near"]),                 # rows next to the line join
        N("Max", ["teeth_row_near", "tiny"], ["teeth_row_pos"]),
        N("Log", ["teeth_row_pos"], ["teeth_row_log"]),
        N("Mul", ["teeth_row_log", "rows_above"], ["teeth_log_up"]),
        N("Mul", ["teeth_row_log", "rows_below"], ["teeth_log_dn"]),
        N("CumSum", ["teeth_log_up", "row_axis_scalar"], ["teeth_run_up_log"], reverse=1),
        N("CumSum", ["teeth_log_dn", "row_axis_scalar"], ["teeth_run_dn_log"]),
        N("Exp", ["teeth_run_up_log"], ["teeth_run_up"]),
        N("Exp", ["teeth_run_dn_log"], ["teeth_run_dn"]),
        N("MatMul", ["teeth_run_up", "row_pitch_up"], ["teeth_up0"]),              # [B,1]
        N("MatMul", ["teeth_run_dn", "row_pitch_dn"], ["teeth_dn0"]),
        N("Add", ["teeth_up0", "cover_margin"], ["teeth_up1"]),
        N("Add", ["teeth_dn0", "cover_margin"], ["teeth_dn1"]),
        N("Clip", ["teeth_up1", "zero", "cover_max"], ["teeth_up"]),
        N("Clip", ["teeth_dn1", "zero", "cover_max"], ["teeth_dn"]),
        N("Reshape", ["teeth_up", "scalar_shape"], ["teeth_up4"]),
        N("Reshape", ["teeth_dn", "scalar_shape"], ["teeth_dn4"]),
        N("Slice", ["lip_profile", "valley_up_starts", "valley_up_ends", "row_axis"], ["prof_up"]),
        N("Slice", ["lip_profile", "valley_mid_starts", "valley_mid_ends", "row_axis"], ["prof_mid"]),
        N("Slice", ["lip_profile", "valley_dn_starts", "valley_dn_ends", "row_axis"], ["prof_dn"]),
        N("Add", ["prof_up", "prof_dn"], ["prof_around0"]),
        N("Mul", ["prof_around0", "half"], ["prof_around"]),
        N("Sub", ["prof_around", "prof_mid"], ["valley"]),                         # [B,rows-2k]
        N("Mul", ["valley", "valley_sharp"], ["valley_s"]),
        N("Softmax", ["valley_s"], ["valley_w"], axis=1),
        N("MatMul", ["valley_w", "valley_rows"], ["lip_dy0"]),                     # [B,1] grid units
        N("ReduceMax", ["valley"], ["valley_max"], axes=[1], keepdims=1),
        *_ramp_nodes("valley_max", "valley_from", "valley_inv_range", "valley_found"),
        N("Sub", ["one", "teeth_seen"], ["no_teeth"]),
        N("Reshape", ["no_teeth", "scalar_shape"], ["no_teeth4"]),
        # rounding purses the lips: a closure's press, weaker, outside the (narrower) opening (on a
        # template that shows its teeth the lips cover them instead: step 4)
        N("Mul", ["round_only4", "round_press"], ["pucker0"]),
        N("Mul", ["pucker0", "no_teeth4"], ["pucker4"]),
        N("Add", ["press4", "pucker4"], ["lips_press4"]),
        N("Mul", ["valley_found", "no_teeth"], ["lip_found"]),
        N("Mul", ["lip_dy0", "lip_found"], ["lip_dy1"]),
        N("Mul", ["lip_dy1", "half_s"], ["lip_dy_px0"]),                          # whole pixels: the fields'
        N("Round", ["lip_dy_px0"], ["lip_dy_px"]),                                # step at the lip line moves
        N("Mul", ["lip_dy_px", "two_over_s"], ["lip_dy"]),                        # with the rows' clamp
        N("Reshape", ["lip_dy", "scalar_shape"], ["lip_dy4"]),                    # [B,1,1,1]
        N("Add", ["lip_g", "lip_dy4"], ["lip_at"]),
        N("GreaterOrEqual", ["base_y", "lip_at"], ["row_below"]),                 # [B,h,1,1]
        # 4. sampling grid
        N("Mul", ["rounding4", "d_round_x"], ["shift_x"]),
        N("Add", ["base_x", "shift_x"], ["grid_x"]),                               # [B,S,S,1]
        # the opening field read at columns narrowed more than the lips are (HOLE_NARROWING more
        # when rounded), so a rounded mouth opens a small round hole between the lips
        N("Mul", ["round_only4", "hole_narrowing"], ["hole_k"]),
        N("Mul", ["hole_k", "d_round_x"], ["hole_shift_x"]),
        N("Add", ["grid_x", "hole_shift_x"], ["field_x"]),
        N("Shape", ["grid_x"], ["grid_x_shape"]),                                 # [B,S,S,1]
        N("Expand", ["base_y", "grid_x_shape"], ["base_y_full"]),
        N("Sub", ["base_y_full", "lip_dy4"], ["field_y"]),
        N("Concat", ["field_x", "field_y"], ["grid_narrow"], axis=3),
        # the constant fields sampled once for the whole batch (the batch's grids stacked as rows of
        # one grid: no copy of the fields per item)
        N("Reshape", ["grid_narrow", "stacked_grid_shape"], ["grid_stacked"]),   # [1,B*h,w,2]
        N("GridSample", ["d_fields", "grid_stacked"], ["d_fields_at"], mode="bilinear",
          padding_mode="border", align_corners=0),                                # [1,3,B*h,w]
        N("Split", ["d_fields_at"], ["d_open_st", "d_press_st", "d_cover_st"], axis=1),
        N("Reshape", ["d_open_st", "nchw_shape"], ["d_open_at"]),                # [B,1,h,w]
        N("Reshape", ["d_press_st", "nchw_shape"], ["d_press_at"]),
        N("Reshape", ["d_cover_st", "nchw_shape"], ["d_cover_at"]),
        # the lens profile (the opening's height across the mouth) at the narrowed columns, computed
        N("Sub", ["field_x", "mouth_x"], ["lens_d"]),
        N("Mul", ["lens_d", "inv_span"], ["lens_q"]),
        N("Mul", ["lens_q", "lens_q"], ["lens_qq"]),
        N("Sub", ["one", "lens_qq"], ["lens_0"]),
        N("Clip", ["lens_0", "zero", "one"], ["lens_nhwc"]),
        N("Reshape", ["lens_nhwc", "nchw_shape"], ["lens_at"]),                  # [B,1,h,w]
        N("Mul", ["opening4", "d_open_at"], ["shift_open"]),
        N("Mul", ["lips_press4", "d_press_at"], ["shift_press"]),
        N("Add", ["shift_open", "shift_press"], ["shift_op"]),
        # rounding on a template that shows its teeth: each lip moves over its teeth (the band's
        # measured extent above / below the lip line), so the lips meet where the mouth is not open
        N("Sub", ["one", "no_teeth4"], ["teeth_seen4"]),
        N("Mul", ["round_only4", "teeth_seen4"], ["cover4"]),
        N("Mul", ["cover4", "teeth_up4"], ["cover_up4"]),                         # [B,1,1,1]
        N("Mul", ["cover4", "teeth_dn4"], ["cover_dn4"]),
        N("Reshape", ["row_below", "row_shape"], ["row_below_nchw"]),             # [B,1,h,1]
        N("Where", ["row_below_nchw", "cover_dn4", "cover_up4"], ["cover_rows"]),
        N("Mul", ["cover_rows", "cover_cols"], ["cover_amp"]),                   # [B,1,h,w]
        N("Mul", ["cover_amp", "d_cover_at"], ["shift_cover"]),
        N("Add", ["shift_op", "shift_cover"], ["shift_nchw"]),
        N("Reshape", ["shift_nchw", "nhwc_shape"], ["shift_y"]),                 # [B,h,w,1]
        # an opened mouth samples each lip's inner edge, up to LIP_EDGE off the line (not the line
        # itself: a closed mouth's dark seam would be stretched over the opening)
        N("Mul", ["opening4", "lip_edge"], ["lip_edge4"]),
        # (across the lips at the output's columns, not the opening's narrower ones: a rounded opening
        # would sample a closed mouth's seam at its sides)
        N("Mul", ["lips_lens", "lip_edge4"], ["lip_edge_y"]),                     # [B,1,w,1]
        # ... and where the lips cover teeth, never the teeth: the clamp moves to the lips' inner edges
        N("Mul", ["cover_up4", "cover_cols_x"], ["cover_up_y"]),                  # [B,1,w,1]
        N("Mul", ["cover_dn4", "cover_cols_x"], ["cover_dn_y"]),
        N("Add", ["lip_edge_y", "cover_dn_y"], ["lip_edge_dn"]),
        N("Add", ["lip_edge_y", "cover_up_y"], ["lip_edge_up"]),
        N("Add", ["lip_at", "lip_edge_dn"], ["lip_lower_edge"]),
        N("Sub", ["lip_at", "lip_edge_up"], ["lip_upper_edge"]),
        N("Where", ["row_below", "lip_lower_edge", "minus_big"], ["clamp_lo_y"]),
        N("Where", ["row_below", "big", "lip_upper_edge"], ["clamp_hi_y"]),
        N("Add", ["base_y", "shift_y"], ["src_y"]),
        N("Max", ["src_y", "clamp_lo_y"], ["src_y_lo"]),
        N("Min", ["src_y_lo", "clamp_hi_y"], ["grid_y"]),
        N("Concat", ["grid_x", "grid_y"], ["grid"], axis=3),                      # [B,S,S,2]
        N("GridSample", ["reference", "grid"], ["warped"], mode="bilinear", padding_mode="border",
          align_corners=0),
        # 5. the inside of the opened gap (where the lip line's row was stretched), faded in at both
        #    lips; the gap (how far past the lip line the row was stretched) is 0 at either lip's
        #    inner contour and largest at the lip line in the middle of the opening: the inside's
        #    colour goes with it from a reddish rim (the tongue's colour behind the lower lip of a
        #    wide opening) to the dark back of the mouth, and a band of upper teeth hangs under the
        #    upper lip once the mouth is wide open
        N("Sub", ["grid_y", "src_y"], ["gap_signed"]),                           # < 0 under the upper lip
        N("Reshape", ["gap_signed", "nchw_shape"], ["gap_s_nchw"]),               # [B,1,h,w] grid units
        N("Abs", ["gap_s_nchw"], ["gap_nchw"]),                                   # 0 at either lip
        N("Mul", ["gap_nchw", "shade_inv_soft"], ["alpha_t0"]),
        N("Clip", ["alpha_t0", "zero", "one"], ["alpha_t"]),
        *_smoothstep_nodes("alpha_t", "alpha"),
        # which side of the lip line: the upper teeth hang from the upper lip, the tongue lies behind
        # the lower one
        N("Mul", ["gap_s_nchw", "side_k"], ["side0"]),
        N("Clip", ["side0", "zero", "one"], ["lower_side"]),
        N("Neg", ["side0"], ["side1"]),
        N("Clip", ["side1", "zero", "one"], ["upper_side"]),
        # the wide opening shows teeth and tongue
        *_ramp_nodes("opening4", "teeth_from", "teeth_inv_range", "teeth_on0"),  # [B,1,1,1]
        N("Sub", ["one", "round_only4"], ["unrounded4"]),
        N("Mul", ["teeth_on0", "unrounded4"], ["teeth_on1"]),                     # pursed lips hide them
        N("Mul", ["teeth_on1", "no_teeth4"], ["teeth_on"]),                       # the template shows its own
        # the rim (just inside the lips): wet, reddish; behind the lower lip the tongue's colour
        N("Mul", ["lower_side", "teeth_on"], ["tongue_w"]),
        N("Mul", ["tongue_w", "tongue_minus_lip"], ["rim_d"]),
        N("Add", ["lip_bgr", "rim_d"], ["rim"]),                                  # [B,3,h,w]
        # darker the deeper the opening is there (gap: 0 at either lip, most at the lip line at the
        # centre): a small opening and the corners stay the rim's colour, a wide one is dark at the back
        N("Mul", ["gap_nchw", "deep_inv"], ["deep_t0"]),
        N("Clip", ["deep_t0", "zero", "one"], ["deep_t"]),
        *_smoothstep_nodes("deep_t", "depth_s"),
        N("Sub", ["throat_bgr", "rim"], ["to_throat"]),
        N("Mul", ["to_throat", "depth_s"], ["to_throat_d"]),
        N("Add", ["rim", "to_throat_d"], ["inner"]),
        N("Sub", ["inner", "warped"], ["to_inner"]),
        N("Mul", ["to_inner", "alpha"], ["to_inner_a"]),
        N("Add", ["warped", "to_inner_a"], ["shaded_inner"]),
        # the upper teeth: a lighter band under the upper lip of a wide opening, with an edge of its own
        # right under the lip, fading out towards the lip line and at the corners
        N("Mul", ["gap_nchw", "teeth_edge_inv"], ["teeth_e0"]),
        N("Clip", ["teeth_e0", "zero", "one"], ["teeth_e"]),
        N("Sub", ["teeth_end", "gap_nchw"], ["teeth_f0"]),
        N("Mul", ["teeth_f0", "teeth_fade_inv"], ["teeth_f1"]),
        N("Clip", ["teeth_f1", "zero", "one"], ["teeth_f"]),
        N("Mul", ["lens_at", "lens_gain"], ["lens_g0"]),
        N("Clip", ["lens_g0", "zero", "one"], ["lens_g"]),
        N("Mul", ["teeth_e", "teeth_f"], ["teeth_w0"]),
        N("Mul", ["teeth_w0", "upper_side"], ["teeth_w1"]),
        N("Mul", ["teeth_w1", "lens_g"], ["teeth_w2"]),
        N("Mul", ["teeth_w2", "teeth_on"], ["teeth_w"]),
        N("Mul", ["depth_s", "teeth_shade"], ["teeth_dim0"]),
        N("Sub", ["one", "teeth_dim0"], ["teeth_dim"]),
        N("Mul", ["teeth_bgr", "teeth_dim"], ["teeth_col"]),
        N("Sub", ["teeth_col", "shaded_inner"], ["to_teeth"]),
        N("Mul", ["to_teeth", "teeth_w"], ["to_teeth_w"]),
        N("Add", ["shaded_inner", "to_teeth_w"], ["shaded_open"]),
        # a closure's seam: the lip line, where the pressed lips meet, a little darker
        N("Mul", ["press4", "press_seam"], ["seam_k"]),
        N("Sub", ["base_y_col", "lip_at"], ["seam_d0"]),                          # [B,1,h,1]
        N("Add", ["seam_d0", "seam_off"], ["seam_d1"]),
        N("Mul", ["seam_d1", "seam_inv"], ["seam_d2"]),
        N("Mul", ["seam_d2", "seam_d2"], ["seam_d3"]),
        N("Neg", ["seam_d3"], ["seam_d4"]),
        N("Exp", ["seam_d4"], ["seam_rows"]),
        # (lips moved over the teeth meet too, where they were moved)
        N("Mul", ["seam_k", "seam_cols"], ["seam_press_cols"]),                  # [B,1,1,w]
        N("Mul", ["cover4", "cover_seam"], ["cover_seam_k"]),
        N("Mul", ["cover_seam_k", "cover_cols"], ["seam_cover_cols"]),
        N("Add", ["seam_press_cols", "seam_cover_cols"], ["seam_cols_k"]),
        N("Mul", ["seam_rows", "seam_cols_k"], ["seam_w"]),                      # [B,1,h,w]
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
    # built on the canonical geometry; reads only the reference crop (channels 3-5)
    helper.set_model_props(model, {CROP_METADATA_KEY: "aligned", FACE_INPUT_METADATA_KEY: "reference"})
    onnx.checker.check_model(model, full_check=True)
    return model


def _paste_box_nodes(full: str, box: str, rows_cols: tuple[int, int, int, int], size: int, out: str,
                     inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """out = `full` [B,C,S,S] with rows r0:r1, columns c0:c1 replaced by `box` [B,C,h,w], built
    from slices and concatenations (no pixel is computed). Adds its slice bounds to `inits`."""
    from onnx import helper, numpy_helper

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
    from onnx import helper

    N = helper.make_node
    return [N("Sub", [x, low], [f"{out}_d"]),
            N("Mul", [f"{out}_d", inv_range], [f"{out}_t0"]),
            N("Clip", [f"{out}_t0", "zero", "one"], [f"{out}_t"]),
            *_smoothstep_nodes(f"{out}_t", out)]


def _smoothstep_nodes(t: str, out: str) -> list[onnx.NodeProto]:
    """out = t*t*(3 - 2t) for t already clipped to [0, 1]."""
    from onnx import helper

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


def builtin_model_file(settings: Settings, size: int = 256) -> Path:
    """Where this version's built-in model file for crop side `size` is (or will be); not generated."""
    return settings.dir("models") / f"builtin-s{int(size)}-{generator_fingerprint(size)}.onnx"


def builtin_model_file_for(spec: str, settings: Settings) -> str:
    """This version's built-in model file for the model spec `spec` (`builtin[:S]`: `builtin_model_file`), "" for
    any other spec: what a job's plan names as the model it was planned with."""
    from cluster.schemas import BUILTIN_MODEL

    m = BUILTIN_MODEL.match(spec.strip())
    return str(builtin_model_file(settings, int(m.group(1) or 256))) if m else ""


def builtin_model_path(settings: Settings | None = None, size: int = 256) -> Path:
    """Path of the built-in model file for crop side `size` under `settings.dir("models")`,
    generated on first use (atomic write) and reused while the generator is unchanged."""
    s = settings or get_settings()
    path = builtin_model_file(s, size)
    if path.is_file():
        return path
    data = build_builtin_model(size).SerializeToString()
    write_atomic(path, data)
    log.info("generated the built-in model %s (%d bytes)", path, len(data))
    return path
