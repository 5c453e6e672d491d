"""The job manager's data plane: inputs and outputs travel through Ray, never through a shared path."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cluster.errors import InputOutsideRoots, JobConflict, JobNotReady, OutputPathInUse
from cluster.schemas import JobState, RenderRequest

pytestmark = pytest.mark.ray


def test_path_inputs_outside_input_roots_are_refused_at_once(runtime, speech_wav, astronaut_video, tmp_path):
    request = RenderRequest(audio=speech_wav, video=astronaut_video, output=str(tmp_path / "o.mp4"))
    with pytest.raises(InputOutsideRoots) as e:  # the session's manager allows no server paths
        runtime.submit(request, upload=False)
    assert e.value.code == "input.outside_roots" and speech_wav in e.value.message


def test_upload_submit_download_conflict_and_output_rules(runtime, speech_wav, astronaut_video, tmp_path):
    stored = runtime.upload(speech_wav)
    assert stored.sha256 == hashlib.sha256(Path(speech_wav).read_bytes()).hexdigest()
    assert stored.size == Path(speech_wav).stat().st_size and stored.ref.startswith("upload:")

    dest = tmp_path / "fetched" / "out.mp4"
    request = RenderRequest(audio=speech_wav, video=astronaut_video, output=str(dest))
    job = runtime.submit(request, job_id="dataplane-job-1")
    with pytest.raises(JobNotReady):  # no bytes before the job succeeded
        runtime.call("read_output", job.id, 0, 1024)
    with pytest.raises(OutputPathInUse, match=str(dest)):  # a second job to the same path, while the first runs
        runtime.submit(request)
    with pytest.raises(JobConflict, match="sync_mode loop, not pingpong"):  # the same id, other options: said
        runtime.submit(request.model_copy(update={"loop": "forward"}), job_id="dataplane-job-1")
    assert runtime.submit(request, job_id="dataplane-job-1").id == job.id  # the same request: the same job

    st = runtime.wait(job.id, timeout=300)
    assert st.state == JobState.succeeded, st.error
    server = Path(st.output)  # committed under the storage root, not at the client's path
    assert server.parent == Path(runtime.settings.storage_root) / "outputs"
    assert not dest.exists()
    runtime.download_output(job.id, dest)
    assert dest.read_bytes() == server.read_bytes() and st.output_bytes == dest.stat().st_size
    assert [p.name for p in dest.parent.iterdir()] == ["out.mp4"]  # no temporaries left
    assert [s.stage for s in st.stages] == ["admit", "prepare", "render", "finalize"]
    assert all(s.ended_at is not None and s.ended_at >= s.started_at for s in st.stages)
