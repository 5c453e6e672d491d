"""A batch's one view over its jobs while its POST is still admitting audios (no Ray: a gateway of
fixed answers behind the ingress's real `Backend`)."""
from __future__ import annotations

import asyncio
from datetime import timedelta

from cluster.config import Settings
from cluster.errors import JobNotFound
from cluster.schemas import JobState, JobStatus, RenderRequest, batch_job_id, utcnow
from service.backend import Backend
from service.routers.batches import batch_view


class _Gateway:
    def __init__(self, jobs: dict[str, JobStatus]) -> None:
        self.jobs = jobs

    async def get(self, job_id: str) -> JobStatus:
        if job_id not in self.jobs:
            raise JobNotFound(f"job {job_id} does not exist", job_id=job_id)
        return self.jobs[job_id]


def test_a_batch_whose_post_still_admits_audios_is_not_read_as_ended(tmp_path):
    """Its first job ended while the POST admitted a slow second audio (a URL downloading): the view read
    `failed` with that audio `not_admitted`, then `succeeded` once it rendered: a poller stopped on a state
    that was not final. While a request admits it (on this replica; or, with several ingress replicas,
    within one admission's window of its newest job) the missing audio counts as a job still queued: the
    batch has not ended."""
    first = JobStatus(id=batch_job_id("b1", 0), state=JobState.succeeded, created_at=utcnow() - timedelta(seconds=5),
                      request=RenderRequest(audio="a.wav", video="v.mp4", batch_size=2))
    backend = Backend(Settings(storage_root=tmp_path / "st"), gateway=_Gateway({first.id: first}))

    def view():
        return asyncio.run(batch_view(backend, "b1"))

    backend.batches_admitting["b1"] = 1  # its POST is admitting audio 1
    during = view()
    assert during.state == JobState.rendering and during.counts == {"succeeded": 1, "not_admitted": 1}, during
    del backend.batches_admitting["b1"]  # the POST ended without it (refused): the batch failed
    after = view()
    assert after.state == JobState.failed and after.counts == {"succeeded": 1, "not_admitted": 1}, after
    # another replica may hold the POST: its newest job's admission window decides
    backend.settings = backend.settings.model_copy(update={"serve_replicas": 2})
    assert not view().state.terminal
    first.created_at = utcnow() - timedelta(seconds=backend.admission_window_s() + 1)
    assert view().state == JobState.failed
