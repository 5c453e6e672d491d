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


def test_a_session_whose_memory_would_eat_the_reserve_is_refused_naming_the_figures():
    """Each running session reports its processes' resident memory (its actor and its standby) and
    the node's available memory: a new one, estimated at their mean, must leave the reserve."""
    mib = 1 << 20
    common = dict(cpus=16, share=0.75, default_load=0.5, reserve=1024 * mib, default_memory=450 * mib)
    fits = decide_admission([0.2, 0.2], memories=[400 * mib, 500 * mib], available=2000 * mib, **common)
    assert fits.admitted and fits.memory_estimate == 450 * mib  # 2000 - 450 >= 1024
    full = decide_admission([0.2, 0.2], memories=[400 * mib, 500 * mib], available=1400 * mib, **common)
    assert not full.admitted and not full.memory_fits  # 1400 - 450 < 1024, though the cores have room
    assert "fits within this node's live capacity" in full.message
    assert full.message.endswith("; its memory (estimated 450 MiB with its standby) would leave 950 MiB of the "
                                 "node's 1400 MiB available, under LIPSYNC_LIVE_MEMORY_RESERVE_MB=1024")
    # not reported yet: the default estimate; unknown availability: memory is not checked
    assert not decide_admission([0.2], memories=[None], available=1400 * mib, **common).admitted
    assert decide_admission([0.2], memories=[None], available=None, **common).admitted
    assert decide_admission([], available=10 * mib, **common).admitted  # nothing running: the first is admitted
