"""What the long-lived actors keep and share, tested on their classes in this process (no Ray cluster):
the model worker's models under its three threads, the sidecar's deliveries, a job's publisher started in a
thread while the job's wait is cancelled."""
from __future__ import annotations

import asyncio
import http.server
import threading
import time
from types import SimpleNamespace

import pytest


@pytest.fixture(autouse=True)
def no_actor_process_setup(monkeypatch):
    """The actors' `__init__` sets up their process (Ray metrics, log context): not this test process's,
    and asking Ray for a node id here would start a Ray."""
    from actors import metrics

    monkeypatch.setattr(metrics, "install", lambda *args, **kwargs: None)


@pytest.fixture
def worker(monkeypatch, tmp_path):
    """A ModelWorker as its actor runs it (the `latency:` model: no weights), outside Ray."""
    import ray

    from actors.model_worker import ModelWorker
    from cluster.config import Settings

    context = SimpleNamespace(get_assigned_resources=lambda: {"CPU": 1.0}, get_node_id=lambda: "node")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    return ModelWorker.__ray_metadata__.modified_class("latency:0:96", Settings(storage_root=tmp_path), "w")


def test_a_model_two_lanes_ask_for_at_once_is_loaded_once_and_health_answers_meanwhile(worker):
    """The job lane and the live lane run in two threads: both asking for a model not loaded yet loaded it
    twice, and `info` (a third thread) iterated the models while a lane added one."""
    loads = []
    real_load = worker.load_model

    def slow_load(spec):
        loads.append(spec)
        time.sleep(0.5)
        return real_load(spec)

    worker.load_model = slow_load
    got, errors = [], []

    def lane():
        try:
            got.append(worker._model("latency:1:96"))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    lanes = [threading.Thread(target=lane) for _ in range(2)]
    for t in lanes:
        t.start()
    health = []
    while any(t.is_alive() for t in lanes):
        health.append(worker.check_health())
        time.sleep(0.01)
    for t in lanes:
        t.join(10)
    assert not errors and loads == ["latency:1:96"] and got[0] is got[1], (errors, loads)
    assert all(h["ready"] for h in health) and worker.check_health()["models"] == ["latency:0:96", "latency:1:96"]


def test_the_sidecar_forgets_a_delivery_once_it_ends(tmp_path):
    """The sidecar (detached, as long-lived as the service) kept one finished task per job with a callback."""
    from actors.service_support import ServiceSidecar
    from cluster.config import Settings
    from cluster.schemas import JobState, JobStatus

    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class EndedJobs:  # the job manager's answer for a job that has ended
        async def get(self, job_id):
            return JobStatus(id=job_id, state=JobState.succeeded)

    async def scenario():
        settings = Settings(storage_root=tmp_path, allow_private_urls=True, retention_days=0)
        sidecar = ServiceSidecar.__ray_metadata__.modified_class(settings)
        sidecar.gw = EndedJobs()
        url = f"http://127.0.0.1:{server.server_port}/hook"
        for n in range(3):
            assert await sidecar.register(f"job-{n}", url)
        deadline = time.monotonic() + 30
        while sidecar._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return sidecar

    try:
        sidecar = asyncio.run(scenario())
    finally:
        server.shutdown()
    assert len(received) == 3 and not sidecar._tasks
    assert all(sidecar.record(f"job-{n}")["state"] == "delivered" for n in range(3))


def test_what_a_job_started_in_a_thread_is_closed_when_the_wait_for_it_is_cancelled():
    """A job's deadline (or its cancel) cancelled the wait for its HLS publisher's start while the start ran on
    in its thread: the publisher's threads and audio track were then left running, held by nobody."""
    from actors.jobs import started_in_thread

    closed = threading.Event()

    def start():
        time.sleep(0.3)
        return "publisher"

    async def scenario():
        waiting = asyncio.ensure_future(started_in_thread(start, closed.set))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not closed.is_set()  # not before the start ended: closing under it would race it
        for _ in range(100):
            if closed.is_set():
                return
            await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert closed.is_set()
    assert asyncio.run(started_in_thread(lambda: "ok", closed.clear)) == "ok" and closed.is_set()


def test_a_slow_control_store_neither_holds_the_job_managers_loop_nor_piles_up_reads(monkeypatch, tmp_path):
    """The pool's reconciler read Ray's resources and nodes (synchronous GCS calls) on the job manager's event
    loop every few seconds: while the GCS was slow or restarting, every call of the manager (a job's status, a
    model batch's dispatch) waited behind it. Now the read runs in a thread within `actor_call_timeout_s`, and
    a round whose read has not answered does not start another."""
    import ray

    from actors.supervision import GcsSlow, Supervisor, TaskSet
    from cluster.config import Settings

    reads = []

    def slow_resources():
        reads.append(time.monotonic())
        time.sleep(1.5)  # a GCS that answers late
        return {"CPU": 4.0}

    monkeypatch.setattr(ray, "cluster_resources", slow_resources)
    monkeypatch.setattr(ray, "nodes", lambda: [])

    def timed_with_the_loop_ticking(calls, match: str):
        """Run `calls(supervisor)` (each raising GcsSlow) on a loop that ticks every 20 ms meanwhile:
        (seconds taken, ticks seen, the supervisor)."""
        async def scenario():
            sup = Supervisor(Settings(storage_root=tmp_path, actor_call_timeout_s=0.3), TaskSet(), asyncio.Event())
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.02)
                    ticks += 1

            ticking = asyncio.ensure_future(ticker())
            t0 = time.monotonic()
            for call in calls:
                with pytest.raises(GcsSlow, match=match):
                    await call(sup)
            took = time.monotonic() - t0
            ticking.cancel()
            return took, ticks, sup

        return asyncio.run(scenario())

    took, ticks, _ = timed_with_the_loop_ticking([lambda sup: sup.reconcile()] * 2,
                                                 "gave no answer about the cluster's resources")
    assert took < 1.2 and ticks >= 10 and len(reads) == 1, (took, ticks, reads)
    # the pool's first start (tried again each round while the cluster cannot hold it) reads the GCS the same way
    monkeypatch.setattr(ray.util, "list_named_actors", lambda **kw: (time.sleep(1.5), [])[1])
    took, ticks, sup = timed_with_the_loop_ticking([lambda sup: sup.start()], "about the pool's actors")
    assert took < 1.0 and ticks >= 8 and not sup.started, (took, ticks)


@pytest.mark.parametrize("mark, skipped", [([0, 99, 64000, 80, 20, 3], 20), ([0, 99, 64000, 80], 0)])
def test_a_lost_sessions_view_counts_the_pauses_skipped_by_its_last_mark(tmp_path, mark, skipped):
    """A session whose actor is gone for good is told from its journal: the speech it published is the speech
    frames done at its last published mark plus the pauses skipped to catch up by then (the mark's 5th
    element; older journals have 4, and no skips). The skip count was read from the figures at publication,
    which held skips after the mark too."""
    from actors.live import lost_session_view, session_dir
    from cluster.config import Settings
    from cluster.live.journal import SessionJournal

    settings = Settings(storage_root=tmp_path / "store")
    journal = SessionJournal(session_dir(settings, "lost1"))
    journal.save_meta({"sample_rate": 16000, "fps": "25", "avatar_id": "abcd1234", "model": "builtin"})
    journal.write_audio(b"\0\0" * 16000 * 5)  # 5 s received
    journal.publish({"name": "seg_000010.m4s", "frames": 12, "end_frame": 132, "at": time.time(), "mark": mark,
                     "figures": {"stalls": 0, "longest_gap_s": 0.2, "model_faults": 10, "speech_underruns": 0}})
    journal.close()
    view = lost_session_view(settings, "lost1")
    assert view["state"] == "failed" and view["seconds_received"] == 5.0
    assert view["seconds_rendered"] == round((80 + skipped) / 25, 3) and view["seconds_skipped"] == skipped / 25


def test_a_job_whose_resumption_fails_at_the_managers_start_leaves_the_others_resumed_and_the_boot_done(
        tmp_path, caplog):
    """One unfinished job whose claim raised (a full disk as the store is written) ended the manager's boot
    before `_booted` was set: every submit then waited 30 s and failed with an empty TimeoutError, readiness
    stayed 503 for good, and the jobs after it were never resumed."""
    import types

    from actors.orchestrator import JobManager
    from cluster.config import Settings
    from cluster.errors import DiskFull

    manager_class = JobManager.__ray_metadata__.modified_class
    started: list[str] = []

    class Store:
        def unfinished_owners(self):
            return [("old-1", None, None), ("mine-2", "me", None), ("mine-3", "me", None)]

        def claim_unowned(self, job_id, owner):
            raise DiskFull("database or disk is full", stage="resume", job_id=job_id)

    fake = types.SimpleNamespace(store=Store(), owner="me", machine=types.SimpleNamespace(start=started.append))
    with caplog.at_level("ERROR"):
        failed = manager_class._resume_unfinished(fake)
    assert started == ["mine-2", "mine-3"] and failed == {"old-1"}
    assert any("job old-1: its resumption" in r.getMessage() for r in caplog.records), caplog.records

    # the one that failed is tried again later, alone, until it is made (it was left for the next start of the
    # manager: read `rendering` with nobody rendering it); one that ended meanwhile is no longer listed
    class Mending(Store):
        claims = 0

        def unfinished_owners(self):
            return [("old-1", None, None), ("mine-2", "me", None), ("mine-3", "me", None)]

        def claim_unowned(self, job_id, owner):
            Mending.claims += 1
            if Mending.claims < 3:  # the disk still full at the first retry
                raise DiskFull("database or disk is full", stage="resume", job_id=job_id)
            return True

    started.clear()
    fake.store = Mending()
    fake._resume_unfinished = types.MethodType(manager_class._resume_unfinished, fake)
    sleeps: list[float] = []

    async def no_wait(seconds):
        sleeps.append(seconds)

    async def retried():
        import actors.orchestrator as orchestrator

        real_sleep, orchestrator.asyncio.sleep = orchestrator.asyncio.sleep, no_wait
        try:
            await asyncio.wait_for(manager_class._resume_later(fake, {"old-1"}), 5)
        finally:
            orchestrator.asyncio.sleep = real_sleep

    asyncio.run(retried())
    assert started == ["old-1"] and Mending.claims == 3 and sleeps == [5.0, 10.0, 20.0], (started, sleeps)

    class Unreadable(Store):
        def unfinished_owners(self):
            raise OSError(5, "Input/output error")

        def count_by_state(self):
            return {}

    async def boot():
        class Pool:
            async def start(self):
                return None

        fake = types.SimpleNamespace(store=Unreadable(), owner="me", s=Settings(storage_root=tmp_path),
                                     pool=Pool(), tasks=types.SimpleNamespace(spawn=lambda coro: coro.close()),
                                     dispatcher=types.SimpleNamespace(run_scheduler=lambda: _nothing(), queue=[]),
                                     _boot_error=None, _store_error=None, _booted=asyncio.Event(),
                                     _expire_uploads=lambda: _nothing(),
                                     _pool_started=lambda: None)
        fake.pool.run_reconciler = lambda *a: _nothing()
        fake._resume_unfinished = types.MethodType(manager_class._resume_unfinished, fake)
        await manager_class._boot(fake)
        return fake

    booted = asyncio.run(boot())
    assert booted._booted.is_set()  # submits are answered at once, with the cause
    assert booted._store_error.stage == "boot" and "Input/output error" in booted._store_error.message
    assert booted._boot_error is None  # (the pool's: a later start of the pool does not clear the store's)


async def _nothing():
    return None


def _failure_beside_a_ticking_loop(call, error_type) -> tuple[float, Exception, float]:
    """Await `call()`, which must raise `error_type`, while another coroutine ticks every 50 ms on the same loop:
    (seconds it took, the error, the longest gap between ticks)."""
    ticks: list[float] = []

    async def scenario():
        async def tick():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        ticker = asyncio.ensure_future(tick())
        t0 = time.monotonic()
        try:
            with pytest.raises(error_type) as caught:
                await call()
        finally:
            ticker.cancel()
        return time.monotonic() - t0, caught.value

    took, error = asyncio.run(scenario())
    return took, error, max(b - a for a, b in zip(ticks, ticks[1:]))


def test_a_gcs_that_does_not_answer_a_lookup_holds_neither_the_ingress_loop_nor_the_call_past_its_deadline(tmp_path):
    """The gateway looked the job manager up with `ray.get_actor` on the event loop (Ray lets it take 60 s while
    its GCS restarts): every request of the replica, its health checks and open streams waited with it."""
    from actors.service_support import ManagerGateway, ManagerUnavailable
    from cluster.config import Settings

    gateway = ManagerGateway(Settings(storage_root=tmp_path))
    gateway._lookup_manager = lambda: time.sleep(3)  # a GCS that does not answer
    took, error, gap = _failure_beside_a_ticking_loop(lambda: gateway.call("get", "j1", timeout=1.0),
                                                      ManagerUnavailable)
    assert took < 2.5 and "did not answer get within 1 s" in error.message, (took, error)
    assert gap < 1.5  # the loop went on meanwhile (it was held 3 s)


def test_a_live_sessions_lookup_that_the_gcs_does_not_answer_is_a_503_in_time_and_holds_no_other_request(
        tmp_path, monkeypatch):
    """Each request about a live session looked its actors up (`ray.get_actor`, twice) on the ingress's event loop."""
    from actors.live import SessionActors
    from cluster.config import Settings
    from service.errors import ApiProblem
    from service.routers.sessions import _actors

    monkeypatch.setattr(SessionActors, "_lookup", lambda self: time.sleep(3))  # a GCS that does not answer
    settings = Settings(storage_root=tmp_path, actor_call_timeout_s=1.0)
    took, problem, gap = _failure_beside_a_ticking_loop(lambda: _actors(settings, "0123456789abcdef"), ApiProblem)
    assert took < 2.5 and problem.status == 503, (took, problem)
    assert gap < 1.5  # the loop went on meanwhile (it was held 3 s)


def test_a_probe_started_by_a_jobs_chunk_does_not_log_as_that_job():
    """A compositor found lost by a job's chunk was probed in a task that copied the chunk's log context: every
    line of that probe (each 30 s, for a member whose node had left) carried the job's id after the job had ended."""
    import types

    from actors.supervision import Health, Supervisor, TaskSet
    from cluster import logs

    seen: list[dict] = []

    async def probe(table, member):
        seen.append(dict(logs._context.get({})))

    async def set_health(member, health):
        member.health = health

    async def scenario():
        fake = types.SimpleNamespace(tasks=TaskSet(), probe=probe)
        member = types.SimpleNamespace(name="lipsync-compositor-1", health=Health.live)
        with logs.log_context(job_id="probe-k2", chunk=3):
            await Supervisor.lost(fake, types.SimpleNamespace(set_health=set_health), member, "no answer")
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert seen == [{}], seen


def test_live_session_failovers_in_threads_at_once_do_not_trip_over_each_other(tmp_path, monkeypatch):
    """Failovers (`SessionActors.failed`) run in lookup threads: several purging the same stale death at once
    raised KeyError (a 500 to players, and `GET /v1/sessions` failed whole)."""
    import threading
    import types

    from actors.live import SessionActors
    from cluster.config import Settings

    settings = Settings(storage_root=tmp_path)
    handles = [types.SimpleNamespace(_actor_id=f"a{n}") for n in range(2)]
    monkeypatch.setattr(SessionActors, "_lookup", lambda self: handles)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def fail_over() -> None:
        try:
            actors = SessionActors(settings, "0123456789abcdef")
            start.wait(10)
            actors.failed()
        except BaseException as e:  # noqa: BLE001 - counted
            errors.append(e)

    stale = time.monotonic() - settings.live_restart_wait_s - 1
    SessionActors._died.update({f"gone-{n}": stale for n in range(50_000)})  # deaths long past, purged by each
    threads = [threading.Thread(target=fail_over) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    SessionActors._died.clear()
    assert not errors, errors[:3]


def test_a_call_serve_cancelled_with_its_request_is_a_cancellation_not_the_services_failure(tmp_path):
    """A client that dropped its event stream: Ray Serve cancels the request and its calls, and the job manager's
    `wait` came back as `RayTaskError(TaskCancelledError)` before the request's own cancellation, wrapped as
    `render.failed` and logged "unexpected error" with its traceback (plus asyncio's "never retrieved" of the
    request's task): 5 of 40 dropped streams in a run. It is the request's cancellation now. A call cancelled
    while its request is not (a review: a callee's own cancellation) is the error it was."""
    import types

    from ray.exceptions import RayTaskError, TaskCancelledError

    from actors.service_support import ManagerGateway
    from cluster.config import Settings
    from cluster.errors import RenderError

    def call_failing_with(error: BaseException, request_cancelled: bool):
        async def scenario():
            gateway = ManagerGateway(Settings(storage_root=tmp_path))
            answer = asyncio.get_running_loop().create_future()
            gateway._handle = types.SimpleNamespace(wait=types.SimpleNamespace(remote=lambda *a: answer))
            request = asyncio.ensure_future(gateway.call("wait", "j1", 0.5, timeout=5))
            await asyncio.sleep(0.05)
            answer.set_exception(error)  # the call's cancellation comes first
            await asyncio.sleep(0.02)
            if request_cancelled:
                request.cancel()  # then the request's own
            try:
                return await request
            finally:
                assert request.cancelled() == request_cancelled
        return asyncio.run(scenario())

    cancelled = RayTaskError("JobManager.wait", "Traceback: ...", TaskCancelledError())
    for error in (cancelled, TaskCancelledError()):
        with pytest.raises(asyncio.CancelledError):
            call_failing_with(error, request_cancelled=True)
    with pytest.raises(RenderError, match="job manager wait failed: TaskCancelledError"):
        call_failing_with(cancelled, request_cancelled=False)
    with pytest.raises(RenderError, match="job manager wait failed: ValueError"):
        call_failing_with(RayTaskError("JobManager.wait", "Traceback: ...", ValueError("a bug")), False)


def test_a_job_that_ends_while_its_step_waits_for_a_compositor_does_not_run_the_step(tmp_path):
    """A review: a job cancelled while its prepare waited for a compositor (busy with other jobs' prepares, the
    queue an overloaded machine has) had no step running to stop, and the prepare ran to its end once a
    compositor was free (the 9 GB normalisation the stop was made for). It is not started now."""
    import types

    from actors.dispatch import Dispatcher
    from actors.jobs import JobRuntime
    from cluster.config import Settings
    from cluster.errors import JobCancelled
    from cluster.scheduling import Health, WorkerTable

    started: list[str] = []

    async def scenario():
        table = WorkerTable(max_inflight=1)
        member = table.add("lipsync-compositor-0", types.SimpleNamespace(
            prepare=types.SimpleNamespace(remote=lambda *a: started.append("prepare"))))
        member.health, member.info = Health.live, {"node": "n1"}
        dispatcher = object.__new__(Dispatcher)
        dispatcher.s = Settings(storage_root=tmp_path, stall_timeout_s=30.0)
        dispatcher.pool = types.SimpleNamespace(compositors=table)
        dispatcher.node_id, dispatcher._steps_waiting = "n1", 0
        other = await table.acquire(timeout=1)  # another job's prepare holds the compositor
        job = JobRuntime("j-cancelled")
        step = asyncio.ensure_future(dispatcher.run_step("prepare", job, "j-cancelled", None, 96, None, timeout=20))
        await asyncio.sleep(0.2)
        job.finished = True  # cancelled meanwhile
        await table.release(other)
        with pytest.raises(JobCancelled, match="its prepare is not run"):
            await asyncio.wait_for(step, 5)
        assert table.members["lipsync-compositor-0"].inflight == 0  # handed back

    asyncio.run(scenario())
    assert started == []
