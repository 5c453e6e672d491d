"""A batch's one view over its jobs while its POST is still admitting audios (no Ray: a gateway of
fixed answers behind the ingress's real `Backend`)."""
from __future__ import annotations

import asyncio
from datetime import timedelta

from cluster.config import Settings
from cluster.errors import JobNotFound
from cluster.schemas import ErrorInfo, JobState, JobStatus, RenderRequest, batch_job_id, utcnow
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


def test_a_failed_batch_says_why_in_one_error(tmp_path):
    """A failed batch named no reason: its state was `failed` and the reason was somewhere in its jobs. Its view
    now carries one error: the first failed job's, counted and named; or its audios never admitted."""
    def job(i: int, state: JobState, error: ErrorInfo | None = None) -> JobStatus:
        return JobStatus(id=batch_job_id("b3", i), state=state, created_at=utcnow() - timedelta(seconds=600),
                         error=error, request=RenderRequest(audio=f"a{i}.wav", video="v.mp4",
                                                            batch_size=4 if i == 0 else None))

    no_face = ErrorInfo(code="input.no_face", message="too few template frames show a face", stage="prepare")
    too_long = no_face.model_copy(update={"code": "input.too_long"})
    jobs = {j.id: j for j in (job(0, JobState.succeeded), job(1, JobState.failed, no_face),
                              job(2, JobState.failed, too_long), job(3, JobState.rendering))}
    backend = Backend(Settings(storage_root=tmp_path / "st"), gateway=_Gateway(jobs))

    def view():
        return asyncio.run(batch_view(backend, "b3"))

    assert view().error is None  # not ended: no verdict yet
    jobs[batch_job_id("b3", 3)].state = JobState.succeeded
    failed = view()
    assert failed.state == JobState.failed and failed.error.code == "input.no_face", failed
    assert failed.error.stage == "prepare" and failed.error.message == (
        "batch b3: 2 of its 4 audios' jobs failed; the first, b3--001: too few template frames show a face")
    del jobs[batch_job_id("b3", 2)]  # an audio never admitted (refused at its POST), and one job failed
    incomplete = view()
    assert incomplete.error.message == ("batch b3: job b3--001 failed: too few template frames show a face; and "
                                        "1 of its 4 audios was never admitted (one was refused when the batch "
                                        "was submitted, with its reason, and those after it were not tried): "
                                        "correct it and send the batch again under its id (its jobs already "
                                        "admitted are answered as they are)"), incomplete.error
    jobs[batch_job_id("b3", 1)].state = JobState.succeeded
    incomplete = view()
    assert incomplete.state == JobState.failed and incomplete.error.code == "batch.incomplete", incomplete
    assert incomplete.error.message.startswith("batch b3: 1 of its 4 audios was never admitted (one was refused"), \
        incomplete.error


def _app_whose_manager_times_out_at(tmp_path, audio_index: int):
    """The real ingress app (no Ray) before a job manager whose admission of a batch's audio `audio_index`
    outlasts the gateway's wait (`ManagerUnavailable`, as `ManagerGateway.call` raises it)."""
    from actors.service_support import ManagerGateway, ManagerUnavailable
    from service.app import create_app

    settings = Settings(storage_root=tmp_path / "st")
    store: dict[str, JobStatus] = {}

    class Manager(ManagerGateway):
        async def call(self, method, *args, timeout=None, **kwargs):
            if method == "list_jobs":
                return list(store.values())
            if method == "get":
                if args[0] not in store:
                    raise JobNotFound(f"job {args[0]} does not exist", job_id=args[0])
                return store[args[0]]
            assert method == "submit", method
            job_id, request = args[0], args[1]
            if job_id.endswith(f"--{audio_index:03d}"):
                raise ManagerUnavailable(f"the job manager did not answer submit within {timeout:.0f} s")
            store[job_id] = JobStatus(id=job_id, state=JobState.succeeded, created_at=utcnow(), request=request)
            return store[job_id]

    return create_app(settings, Manager(settings)), store


def test_a_batch_answered_503_says_to_send_the_batch_again_and_is_not_failed_while_its_audio_may_be_stored(tmp_path):
    """A batch whose audio's admission outlasts the ingress's wait: the 503 told the client to submit that
    audio's job id (`<batch>--000`, an id the API refuses as reserved) and, under the batch's own id, that it
    "was not admitted" while the job manager may still store it; the batch's view then read `failed`, and
    `rendering` once the late admission was stored. Now it says to send the batch again under its id, what
    may have become of that audio, and the view waits one admission window before calling the batch failed."""
    from fastapi.testclient import TestClient

    app, store = _app_whose_manager_times_out_at(tmp_path, 1)
    with TestClient(app) as client:
        r = client.post("/v1/batches", json={"id": "b2", "audios": ["/in/a0.wav", "/in/a1.wav"], "video": "/in/v.mp4"})
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "its job may still be admitted" in message and "send the request again with id b2" in message, message
        assert "submit it again with the id" not in message, message
        backend = app.state.backend
        view = client.get("/v1/batches/b2").json()
        assert view["state"] == "rendering" and view["counts"] == {"succeeded": 1, "not_admitted": 1}, view
        backend.batches_admitted_late["b2"] = 0.0  # the admission window over: the audio was not stored
        assert client.get("/v1/batches/b2").json()["state"] == "failed"
    app, store = _app_whose_manager_times_out_at(tmp_path, 0)
    with TestClient(app) as client:  # no id: the ingress minted it, and the manager stores nothing late
        r = client.post("/v1/batches", json={"audios": ["/in/a0.wav"], "video": "/in/v.mp4"})
        message = r.json()["error"]["message"]
        assert r.status_code == 503 and "its job was not admitted" in message, message
        assert "send the request again with id " in message and "--000'" not in message, message


def test_a_job_view_does_not_tell_where_the_service_keeps_its_files():
    """A job failed by a full disk said `... No space left on device: '/srv/lipsync/jobs/ID/segments/00023.tmp.mp4'`
    to every client (and to its callback): the storage root is written `$LIPSYNC_STORAGE_ROOT` in views."""
    from cluster.views import job_view

    where = "/srv/lipsync/jobs/j1/segments/00023.ea029449.tmp.mp4"
    error = ErrorInfo(code="resource.disk", message=f"[Errno 28] No space left on device: '{where}'", stage="encode",
                      cause=f"OSError(28, {where!r})", path=where)
    st = JobStatus(id="j1", state=JobState.failed, created_at=utcnow(), error=error)
    shown = job_view(st, storage_root="/srv/lipsync/").error
    assert "/srv/lipsync" not in shown.model_dump_json(), shown
    assert shown.path == "$LIPSYNC_STORAGE_ROOT/jobs/j1/segments/00023.ea029449.tmp.mp4" and shown.code == error.code
    assert job_view(st).error == error  # (the job manager's own view, and its log, keep it)


def test_the_storage_root_is_said_as_a_whole_path_part_only():
    """`text_without_root`: /data/lipsync2 beside the root /data/lipsync stays as it is (a plain replace made it
    `$LIPSYNC_STORAGE_ROOT2`), and a root of / is not written into every gap of the message."""
    from cluster.views import text_without_root

    said = text_without_root("'/data/lipsync/jobs/a' /data/lipsync2/b /data/lipsync-in/c at /data/lipsync",
                             "/data/lipsync/")
    assert said == "'$LIPSYNC_STORAGE_ROOT/jobs/a' /data/lipsync2/b /data/lipsync-in/c at $LIPSYNC_STORAGE_ROOT", said
    assert text_without_root("no space: /x", "/") == "no space: /x"


def test_a_job_waiting_for_its_first_compositor_says_so_and_how_many_jobs_go_first():
    """A probe: 20-30 jobs at once sat `rendering` at 0 frames for up to 6.6 s, nothing saying they only waited.
    A rendering job none of whose chunks has reached a compositor reads stage `waiting` with `jobs_ahead`; once it
    renders (or in any other state) the stage is its state's and `jobs_ahead` is null."""
    from cluster.views import job_view

    def view(state: JobState, jobs_ahead: int | None):
        return job_view(JobStatus(id="j1", state=state, created_at=utcnow(), frames_total=50, jobs_ahead=jobs_ahead))

    waiting = view(JobState.rendering, 3)
    assert (waiting.stage, waiting.jobs_ahead) == ("waiting", 3)
    assert (view(JobState.rendering, 0).stage, view(JobState.rendering, 0).jobs_ahead) == ("waiting", 0)
    assert (view(JobState.rendering, None).stage, view(JobState.rendering, None).jobs_ahead) == ("render", None)
    for state, stage in ((JobState.queued, "queued"), (JobState.finalizing, "finalize"), (JobState.succeeded, "done")):
        assert (view(state, 3).stage, view(state, 3).jobs_ahead) == (stage, None)


def test_an_ended_job_without_a_stream_on_disk_has_no_watch_url(tmp_path):
    """A job purged whose output lies outside the storage root (`lipsync render -o`, kept: not `expired`) still
    gave a watch_url to a stream that answered 410; so did a job that ended before its first segment. The job
    manager says an ended job's stream is gone where its first chunk's marker is not on disk (`stream_published`)."""
    from cluster.hls import hls_dir, stream_published
    from cluster.views import job_view

    job = tmp_path / "jobs" / "j1"
    assert not stream_published(job)
    hls_dir(job).mkdir(parents=True)
    assert not stream_published(job)  # a directory before its first segment is no stream (a rendered job's is
    # tests/test_hls.py::test_a_rendered_jobs_stream_is_published_until_its_files_are_removed)
    kept = JobStatus(id="j1", state=JobState.succeeded, output="/home/me/out.mp4", output_bytes=1000)
    assert job_view(kept, watch_url="/v1/jobs/j1/hls/index.m3u8").watch_url == "/v1/jobs/j1/hls/index.m3u8"
    purged = kept.model_copy(update={"stream_gone": True})
    view = job_view(purged, watch_url="/v1/jobs/j1/hls/index.m3u8")
    assert view.watch_url is None and view.expired is False and view.output is not None
    failed = JobStatus(id="j2", state=JobState.failed, stream_gone=True)
    assert job_view(failed, watch_url="/v1/jobs/j2/hls/index.m3u8").watch_url is None


def test_a_compat_submission_the_manager_does_not_answer_in_time_is_busy_and_a_minted_code_is_not_stored_late(
        tmp_path):
    """/easy/submit whose admission outlasts the gateway's wait answered 9999, a failure for good to the stock
    client, while a code it chose may still render; and a code the server minted was passed as chosen, so the
    job manager stored a late admission that rendered with no client polling it."""
    from fastapi.testclient import TestClient

    from actors.service_support import ManagerGateway, ManagerUnavailable
    from service.app import create_app

    asked: list[dict] = []

    class Manager(ManagerGateway):
        async def call(self, method, *args, timeout=None, **kwargs):
            if method == "submit":
                asked.append(kwargs)
                raise ManagerUnavailable(f"the job manager did not answer submit within {timeout:.0f} s")
            assert method == "list_jobs", method  # (the queue's count before admission)
            return []

    settings = Settings(storage_root=tmp_path / "st")
    app = create_app(settings, Manager(settings))
    with TestClient(app) as client:
        chosen = client.post("/easy/submit", json={"audio_url": "/in/a.wav", "video_url": "/in/v.mp4",
                                                   "code": "mine"}).json()
        minted = client.post("/easy/submit", json={"audio_url": "/in/a.wav", "video_url": "/in/v.mp4"}).json()
    for answer in (chosen, minted):
        assert answer["code"] == 10001 and answer["success"] is True, answer  # busy: the client asks again
        assert answer["msg"].startswith("busy: service.unavailable: the job manager did not answer"), answer
    assert "job mine may still be admitted" in chosen["msg"] and "was not admitted" in minted["msg"], minted
    assert asked[0] == {} and asked[1]["within_s"] > 0, asked  # a minted code's late admission is not stored


def test_a_job_whose_pool_has_no_live_worker_of_a_kind_says_what_it_waits_for():
    """A rendering job whose compositors were all lost (their node gone) read `rendering`, stage `render`, for the
    whole wait before it failed: only /readyz said the pool had none. Its view says what it lacks, since when and
    how long it waits (stage `waiting`), and not once the pool is back."""
    import re
    import time
    import types

    from actors.jobs import JobMachine
    from cluster.scheduling import Health, WorkerTable
    from cluster.views import job_view

    models, compositors = WorkerTable(2), WorkerTable(2)
    models.add("lipsync-model-worker-0", object()).health = Health.live
    compositors.add("lipsync-compositor-0", object()).health = Health.lost
    machine = types.SimpleNamespace(pool=types.SimpleNamespace(models=models, compositors=compositors),
                                    s=Settings(stall_timeout_s=120))
    job = types.SimpleNamespace(capacity_seen=time.monotonic() - 35)
    compositors.members["lipsync-compositor-0"].lost_at = time.monotonic() - 30  # the last one went 30 s ago
    lacking = JobMachine._lacking(machine, job)
    since = time.strftime("%H:%M:%S", time.gmtime(time.time() - 30))
    fails = time.strftime("%H:%M:%S", time.gmtime(time.time() - 35 + 120))
    assert re.fullmatch(r"no live compositor since (\S+) UTC \(1 lost\); the job fails if none is back by about "
                        r"(\S+) UTC \(LIPSYNC_STALL_TIMEOUT_S, 120 s\)", lacking), lacking
    said_since, said_fails = re.findall(r"(\d\d:\d\d:\d\d) UTC", lacking)
    assert _apart(said_since, since) <= 2 and _apart(said_fails, fails) <= 2
    view = job_view(JobStatus(id="j1", state=JobState.rendering, created_at=utcnow(), frames_total=50,
                              waiting_for=lacking))
    assert (view.stage, view.waiting_for) == ("waiting", lacking)
    compositors.members["lipsync-compositor-0"].health = Health.live
    assert JobMachine._lacking(machine, job) is None
    ended = job_view(JobStatus(id="j1", state=JobState.failed, created_at=utcnow(), waiting_for=lacking))
    assert (ended.stage, ended.waiting_for) == ("done", None)


def _apart(a: str, b: str) -> int:
    """Seconds between two times of day (HH:MM:SS), across midnight too."""
    def seconds(clock: str) -> int:
        h, m, sec = (int(x) for x in clock.split(":"))
        return h * 3600 + m * 60 + sec
    d = abs(seconds(a) - seconds(b))
    return min(d, 86400 - d)
