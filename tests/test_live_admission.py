"""Admission of live sessions by measured render load (cluster.live.admission; no Ray)."""
from __future__ import annotations

import pytest

from cluster.live.admission import decide_admission


def test_nothing_running_admits_one_even_when_the_estimate_exceeds_the_capacity():
    decision = decide_admission([], cpus=2, share=0.01, default_load=0.5)
    assert decision.admitted and decision.running == 0 and decision.estimate == 0.5


def test_measured_loads_decide_and_a_new_session_is_estimated_at_their_mean():
    fits = decide_admission([0.3, 0.5], cpus=2, share=0.75, default_load=0.9)
    assert fits.admitted and fits.load == pytest.approx(0.8) and fits.estimate == pytest.approx(0.4)
    assert fits.capacity == pytest.approx(1.5) and "fits within" in fits.message
    full = decide_admission([0.3, 0.5, 0.4], cpus=2, share=0.75, default_load=0.9)
    assert not full.admitted  # 1.2 running + 0.4 estimated > 1.5
    assert full.message == ("3 live session(s) running take 1.20 s of rendering per second of stream (3 measured); "
                            "a new one (estimated 0.40) would exceed this node's live capacity of 1.50 (2 cores x "
                            "LIPSYNC_LIVE_CPU_SHARE=0.75)")


def test_sessions_not_yet_measured_count_at_the_default_load():
    decision = decide_admission([0.2, None], cpus=2, share=0.5, default_load=0.7)
    assert decision.load == pytest.approx(0.9) and decision.estimate == pytest.approx(0.2)
    assert not decision.admitted  # 0.9 + 0.2 > 1.0
    assert "1 measured, 1 not yet, counted at LIPSYNC_LIVE_SESSION_LOAD=0.7" in decision.message
    assert decide_admission([None], cpus=4, share=0.5, default_load=0.7).admitted  # 0.7 + 0.7 <= 2.0
    assert not decide_admission([None], cpus=2, share=0.5, default_load=0.7).admitted  # 1.4 > 1.0
