"""cluster.plan: frame counts, template loops and chunks (property tests)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.plan import frame_count, frame_count_from_samples, make_chunks, template_indices

FPS = [Fraction(24), Fraction(25), Fraction(30), Fraction(30000, 1001), Fraction(24000, 1001),
       Fraction(50), Fraction(60), Fraction(60000, 1001)]
fps_st = st.sampled_from(FPS)


def test_frame_count_examples():
    assert frame_count(2.0, Fraction(25)) == 50
    assert frame_count(2.0 + 1e-9, Fraction(25)) == 50  # float noise is not a new frame
    assert frame_count(2.001, Fraction(25)) == 51
    assert frame_count(0.0, Fraction(25)) == 1
    assert frame_count(10.0, Fraction(30000, 1001)) == 300  # ceil(299.7)
    assert frame_count(0.1 + 0.2, Fraction(10)) == 3  # 0.30000000000000004 s
    with pytest.raises(ValueError):
        frame_count(float("nan"), Fraction(25))
    with pytest.raises(ValueError):
        frame_count(1.0, Fraction(0))


@given(n=st.integers(1, 10_000_000), fps=fps_st)
def test_frame_count_of_exact_frame_durations(n, fps):
    seconds = float(n / fps)  # the float nearest to n frames' duration, noise either way
    assert frame_count(seconds, fps) == n
    assert frame_count(seconds + 0.5 / float(fps), fps) == n + 1


@given(n_samples=st.integers(0, 3 * 3600 * 48000), rate=st.sampled_from([8000, 16000, 44100, 48000]), fps=fps_st)
def test_frame_count_from_samples_is_exact_ceiling(n_samples, rate, fps):
    n = frame_count_from_samples(n_samples, rate, fps)
    exact = Fraction(n_samples, rate) * fps
    assert n == max(1, math.ceil(exact))
    assert (n - 1) / fps < Fraction(n_samples, rate) or n == 1  # no extra frame
    assert n / fps >= Fraction(n_samples, rate)  # the frames cover the audio


@given(t=st.integers(1, 300), start=st.integers(0, 5000), length=st.integers(0, 2000),
       loop=st.sampled_from(["pingpong", "forward"]))
def test_template_indices_in_range_and_sliceable(t, start, length, loop):
    stop = start + length
    idx = template_indices(start, stop, t, loop)
    assert idx.dtype == np.int64 and idx.shape == (length,)
    assert np.all((idx >= 0) & (idx < t))
    whole = template_indices(0, stop, t, loop)
    np.testing.assert_array_equal(idx, whole[start:stop])


@given(t=st.integers(2, 300), n=st.integers(2, 3000))
def test_pingpong_never_jumps_or_stalls(t, n):
    idx = template_indices(0, n, t, "pingpong")
    assert np.all(np.abs(np.diff(idx)) == 1)
    assert idx[0] == 0
    if n >= t:
        assert idx[t - 1] == t - 1  # every frame is shown before turning around


@given(t=st.integers(1, 300), n=st.integers(2, 3000))
def test_forward_wraps_only_from_last_to_first(t, n):
    idx = template_indices(0, n, t, "forward")
    steps = np.diff(idx)
    wraps = steps != 1
    assert np.all(idx[:-1][wraps] == t - 1) and np.all(idx[1:][wraps] == 0)


def test_template_indices_examples():
    np.testing.assert_array_equal(template_indices(0, 10, 4), [0, 1, 2, 3, 2, 1, 0, 1, 2, 3])
    np.testing.assert_array_equal(template_indices(0, 5, 2), [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(template_indices(0, 5, 1), [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(template_indices(3, 8, 3, "forward"), [0, 1, 2, 0, 1])
    with pytest.raises(ValueError):
        template_indices(0, 5, 0)
    with pytest.raises(ValueError):
        template_indices(0, 5, 3, "bounce")


@given(total=st.integers(1, 200_000), fps=fps_st, chunk_seconds=st.floats(0.2, 30.0),
       t=st.integers(1, 400), first_seconds=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
@settings(max_examples=150)
def test_chunks_cover_frames_contiguously(total, fps, chunk_seconds, t, first_seconds):
    chunks = make_chunks(total, fps, chunk_seconds, first_seconds)
    target = max(1, round(Fraction(chunk_seconds) * fps))
    assert chunks[0].start == 0 and chunks[-1].stop == total
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for a, b in zip(chunks, chunks[1:]):
        assert a.stop == b.start
    rest = chunks
    if len(chunks) > 1 and chunks[0].frames < target:  # a short first chunk, then the plan as without it
        assert first_seconds < chunk_seconds and chunks[0].frames == max(1, round(Fraction(first_seconds) * fps))
        rest = chunks[1:]
    for c in rest[:-1]:
        assert c.frames == target
    last = rest[-1].frames
    if len(rest) > 1:
        assert target / 2 <= last < 1.5 * target  # no tiny tail
    else:
        assert last == total - rest[0].start and last < 1.5 * target
    # indices computed per chunk equal the whole plan: no jump across chunk boundaries
    per_chunk = np.concatenate([template_indices(c.start, c.stop, t) for c in chunks[:50]])
    np.testing.assert_array_equal(per_chunk, template_indices(0, chunks[min(49, len(chunks) - 1)].stop, t))


def test_chunk_examples():
    assert [(c.start, c.stop) for c in make_chunks(120, Fraction(25), 2.0)] == [(0, 50), (50, 120)]
    assert [(c.start, c.stop) for c in make_chunks(130, Fraction(25), 2.0)] == [(0, 50), (50, 100), (100, 130)]
    assert [(c.start, c.stop) for c in make_chunks(7, Fraction(25), 2.0)] == [(0, 7)]


def test_a_short_first_chunk_comes_first_then_full_chunks():
    """The first segment is ready sooner: 0.5 s first, then 2 s chunks from where it ends."""
    assert [(c.start, c.stop) for c in make_chunks(130, Fraction(25), 2.0, 0.5)] == [(0, 12), (12, 62), (62, 130)]
    assert [(c.start, c.stop) for c in make_chunks(50, Fraction(25), 2.0, 0.5)] == [(0, 50)]  # one chunk anyway
    assert make_chunks(130, Fraction(25), 2.0, 0.5)[1:] != make_chunks(130, Fraction(25), 2.0)[1:]
    assert make_chunks(130, Fraction(25), 2.0, 3.0) == make_chunks(130, Fraction(25), 2.0)  # not shorter: ignored


# --- sync modes (length mismatch) ---------------------------------------------------------------
def test_sync_frame_count_per_mode():
    from cluster.plan import sync_frame_count

    assert sync_frame_count(30, 25, "pingpong") == 30
    assert sync_frame_count(30, 25, "forward") == 30
    assert sync_frame_count(30, 25, "cut_off") == 25 and sync_frame_count(20, 25, "cut_off") == 20
    assert sync_frame_count(15, 25, "silence") == 25 and sync_frame_count(30, 25, "silence") == 30
    assert sync_frame_count(30, 25, "remap") == 30
    with pytest.raises(ValueError):
        sync_frame_count(30, 25, "bounce")


@given(st.integers(1, 300), st.integers(1, 400))
def test_remap_stretches_monotonically_over_the_whole_template(t, total):
    from cluster.plan import template_indices

    idx = template_indices(0, total, t, "remap", total)
    assert idx[0] == 0 and idx.min() >= 0 and idx.max() <= t - 1
    assert (np.diff(idx) >= 0).all()
    if total >= t:  # stretched: every template frame is shown, none skipped
        assert set(idx.tolist()) == set(range(t))
    k = total // 3
    assert (template_indices(k, total, t, "remap", total) == idx[k:]).all()


@given(st.integers(1, 5000), st.sampled_from([Fraction(25), Fraction(30000, 1001), Fraction(24)]))
def test_fitted_audio_gives_exactly_the_frames(frames, fps):
    from cluster.plan import fit_audio_samples, frame_count_from_samples

    n = fit_audio_samples(frames, fps, 16000)
    assert frame_count_from_samples(n, 16000, fps) == frames
    assert frame_count_from_samples(n + 1, 16000, fps) == frames + 1
