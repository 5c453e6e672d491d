"""The SQLite job table: durable, idempotent, forward-only states."""
from __future__ import annotations

import pytest

from cluster.errors import JobNotFound
from cluster.jobstore import InvalidTransition, JobStore
from cluster.schemas import ErrorInfo, JobState, RenderRequest

REQ = RenderRequest(audio="/a.wav", video="/v.mp4")


def test_state_survives_reopening(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    s = JobStore(db)
    s.create("j1", REQ)
    s.transition("j1", JobState.preparing)
    s.set_plan("j1", {"k": 1}, frames_total=100, chunks_total=4)
    s.transition("j1", JobState.rendering)
    s.chunk_done("j1", 0, 25, "/seg/0.mp4")
    s.chunk_done("j1", 2, 25, "/seg/2.mp4")
    s.close()
    s2 = JobStore(db)  # a restarted job manager sees exactly this
    st = s2.get("j1")
    assert st.state == JobState.rendering and st.frames_done == 50 and st.chunks_done == 2
    assert s2.done_chunks("j1") == {0: "/seg/0.mp4", 2: "/seg/2.mp4"}
    assert s2.plan("j1") == {"k": 1}
    assert [j.id for j in s2.unfinished()] == ["j1"]
    assert st.request == REQ


def test_create_is_idempotent(tmp_path):
    s = JobStore(tmp_path / "db")
    first, created = s.create("same", REQ)
    s.transition("same", JobState.preparing)
    again, created2 = s.create("same", RenderRequest(audio="/other.wav", video="/v.mp4"))
    assert created and not created2
    assert again.state == JobState.preparing and again.request == REQ


def test_states_only_move_forward(tmp_path):
    s = JobStore(tmp_path / "db")
    s.create("j", REQ)
    with pytest.raises(InvalidTransition):
        s.transition("j", JobState.finalizing)  # skipping preparing/rendering
    s.transition("j", JobState.preparing)
    s.transition("j", JobState.rendering)
    with pytest.raises(InvalidTransition):
        s.transition("j", JobState.preparing)  # rendering is left only forward
    err = ErrorInfo(code="render.chunk_failed", message="boom", stage="render", chunk=3, cause="x")
    st = s.transition("j", JobState.failed, error=err)
    assert st.error == err
    with pytest.raises(InvalidTransition):
        s.transition("j", JobState.succeeded)  # terminal is terminal
    assert s.unfinished() == []


def test_unknown_job_is_a_typed_error(tmp_path):
    s = JobStore(tmp_path / "db")
    with pytest.raises(JobNotFound):
        s.get("nope")


def test_list_filters_and_pages(tmp_path):
    s = JobStore(tmp_path / "db")
    for i in range(5):
        s.create(f"j{i}", REQ)
    s.transition("j1", JobState.cancelled)
    assert [j.id for j in s.list([JobState.queued], limit=2)] == ["j0", "j2"]
    assert [j.id for j in s.list([JobState.queued], limit=2, offset=2)] == ["j3", "j4"]
    assert [j.id for j in s.list([JobState.cancelled])] == ["j1"]
