"""Scheduling decisions (plain Python): least-loaded worker with backpressure, fair chunk order."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.scheduling import FairQueue, Health, WorkerTable


def run(coro):
    return asyncio.run(coro)


def test_least_loaded_live_worker_and_backpressure():
    async def scenario():
        t = WorkerTable(max_inflight=2)
        a, b, c = (t.add(n, object()) for n in "abc")
        await t.set_health(a, Health.live)
        await t.set_health(b, Health.live)  # c never answered: never chosen
        got = [await t.acquire(timeout=1) for _ in range(4)]
        assert sorted(m.name for m in got) == ["a", "a", "b", "b"]  # alternates, least loaded first
        assert await t.acquire(timeout=0.2) is None  # both at the limit: the caller waits, then gives up
        waiter = asyncio.ensure_future(t.acquire(timeout=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await t.release(got[0])
        assert (await asyncio.wait_for(waiter, 2)).name == got[0].name  # freed slot goes to the waiter
        return c

    c = run(scenario())
    assert c.health == Health.starting


def test_lost_worker_is_skipped_until_it_answers_again():
    async def scenario():
        t = WorkerTable(max_inflight=1)
        a, b = t.add("a", 1), t.add("b", 2)
        for m in (a, b):
            await t.set_health(m, Health.live)
        await t.set_health(a, Health.lost)
        assert (await t.acquire(1)).name == "b"
        assert await t.acquire(0.1) is None
        await t.set_health(a, Health.live)
        assert (await t.acquire(1)).name == "a"

    run(scenario())


def test_a_member_lost_and_back_keeps_counting_the_calls_still_running_on_it():
    """A compositor rendering two chunks at once (`chunks_per_compositor`) is marked lost by one
    call's failure while its other call still runs: once live again it is handed only the free
    slot, and the late call's release does not leave it under-counted."""
    async def scenario():
        t = WorkerTable(max_inflight=2)
        a = t.add("a", 1)
        await t.set_health(a, Health.live)
        first, second = await t.acquire(1), await t.acquire(1)
        assert first is second is a
        await t.set_health(a, Health.lost)  # the first call failed; the second still runs on it
        await t.release(first, ok=False)
        await t.set_health(a, Health.live)  # it answered its probe
        assert (await t.acquire(1)) is a  # the free slot
        assert await t.acquire(0.1) is None  # not a third call while the second still runs
        await t.release(second)
        assert a.inflight == 1  # the call handed out after its return, still running
        assert (await t.acquire(1)) is a

    run(scenario())


def test_all_failed_returns_at_once():
    async def scenario():
        t = WorkerTable(max_inflight=1)
        m = t.add("a", 1)
        await t.set_health(m, Health.failed, error={"message": "bad model"})
        assert t.all_failed()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await t.acquire(timeout=30) is None
        assert loop.time() - t0 < 1

    run(scenario())


def test_fair_queue_round_robin_between_jobs():
    q: FairQueue[int] = FairQueue()
    for i in range(4):
        q.push("a", i)
    for i in range(2):
        q.push("b", 10 + i)
    order = [q.pop() for _ in range(6)]
    assert order == [("a", 0), ("b", 10), ("a", 1), ("b", 11), ("a", 2), ("a", 3)]
    assert q.pop() is None


@given(st.dictionaries(st.sampled_from("abcde"), st.integers(1, 20), min_size=1))
def test_fair_queue_serves_everything_once_and_interleaves(sizes):
    q: FairQueue[int] = FairQueue()
    for job, n in sizes.items():
        for i in range(n):
            q.push(job, i)
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    assert sorted(out) == sorted((j, i) for j, n in sizes.items() for i in range(n))
    for job in sizes:  # per job, chunks come out in order
        assert [i for j, i in out if j == job] == list(range(sizes[job]))
    # While two jobs both have work, neither gets two turns in a row.
    k = len(sizes) * min(sizes.values())
    prefix = [j for j, _ in out[:k]]
    assert all(x != y for x, y in zip(prefix, prefix[1:])) or len(sizes) == 1


def test_a_jobs_position_is_how_many_jobs_get_a_chunk_before_its_next():
    """What a waiting job's view says (`jobs_ahead`): the jobs served before its next chunk, round-robin."""
    q: FairQueue[int] = FairQueue()
    for job in "abc":
        q.push(job, 0)
        q.push(job, 1)
    assert [q.position(j) for j in "abcz"] == [0, 1, 2, None]
    served = [q.pop()[0] for _ in range(2)]  # a and b each get one: they go to the back of the line
    assert served == ["a", "b"] and [q.position(j) for j in "cab"] == [0, 1, 2]
    assert [q.pop()[0] for _ in range(3)] == ["c", "a", "b"]
    assert [q.position(j) for j in "cab"] == [0, None, None]  # a's and b's last chunks were served
    assert q.pop() == ("c", 1) and q.position("c") is None
    q.push("d", 0)
    assert q.position("d") == len(q) - 1  # behind every job that still has a chunk queued


def test_retried_chunk_goes_to_the_front_of_its_job():
    q: FairQueue[int] = FairQueue()
    q.push("a", 1)
    q.push("a", 2)
    q.push("a", 0, front=True)
    assert [q.pop()[1] for _ in range(3)] == [0, 1, 2]
    q.push("a", 5)
    assert q.drop("a") == [5] and len(q) == 0


# --- placement: what cannot be placed fails at once, naming the missing resource ------------------
def test_pool_size_defaults_follow_the_cluster():
    from cluster.scheduling import PoolSize, size_pool

    assert size_pool(cpus=8, gpus=2, model_workers=None, compositors=None, worker_gpus=1) == PoolSize(2, 6, 1.0)
    assert size_pool(cpus=2, gpus=0, model_workers=None, compositors=None, worker_gpus=1) == PoolSize(1, 1, 0.0)
    # no fixed cap (issue 19): a 16-CPU node gets 15 compositors beside its model worker
    assert size_pool(cpus=16, gpus=1, model_workers=None, compositors=None, worker_gpus=1) == PoolSize(1, 15, 1.0)
    assert size_pool(cpus=64, gpus=0, model_workers=None, compositors=None, worker_gpus=1).compositors == 63


def test_memory_and_compositor_cpus_bound_the_default_pool():
    from cluster.errors import PlacementError
    from cluster.scheduling import fit_pool, size_pool

    gib = 2**30
    kw = dict(gpus=1, model_workers=None, compositors=None, worker_gpus=1)
    # 16 CPUs, 128 GiB: the CPUs bound it; 3 GiB at 400 MiB each: the memory does (7, not 15)
    assert size_pool(16, **kw, memory_bytes=128 * gib, compositor_memory_bytes=400 * 2**20).compositors == 15
    assert size_pool(16, **kw, memory_bytes=3 * gib, compositor_memory_bytes=400 * 2**20).compositors == 7
    assert fit_pool(16, **kw, memory_bytes=3 * gib, compositor_memory_bytes=400 * 2**20).compositors == 7
    # too little memory for even one: still one (a pool without a compositor renders nothing)
    assert size_pool(16, **kw, memory_bytes=100 * 2**20, compositor_memory_bytes=400 * 2**20).compositors == 1
    # fewer, multi-threaded compositors: 2 CPUs each -> 7 on the 15 CPUs left
    assert size_pool(16, **kw, compositor_cpus=2).compositors == 7
    assert fit_pool(16, **kw, compositor_cpus=2).compositors == 7
    # an explicit count must fit the CPUs at compositor_cpus each
    with pytest.raises(PlacementError, match="CPU"):
        size_pool(16, gpus=1, model_workers=None, compositors=8, worker_gpus=1, compositor_cpus=2)
    assert fit_pool(16, gpus=1, model_workers=None, compositors=8, worker_gpus=1, compositor_cpus=2).compositors == 7
    # two chunks at once per compositor count 1.4x the memory of one: 3 GiB at 500 MiB holds 6, at 700 MiB 4
    from cluster.scheduling import compositor_memory_bytes

    assert compositor_memory_bytes(500, 1) == 500 * 2**20 and compositor_memory_bytes(500, 2) == 700 * 2**20
    assert size_pool(16, **kw, memory_bytes=3 * gib, compositor_memory_bytes=compositor_memory_bytes(500, 1)) \
        .compositors == 6
    assert size_pool(16, **kw, memory_bytes=3 * gib, compositor_memory_bytes=compositor_memory_bytes(500, 2)) \
        .compositors == 4


@pytest.mark.parametrize("cpus,gpus,workers,compositors,worker_gpus,missing", [
    (2, 0, 2, None, 1, "CPU"),        # --workers 2 on 2 CPUs leaves no CPU for a compositor
    (4, 0, 1, 4, 1, "CPU"),
    (8, 1, 2, None, 1, "GPU"),        # two GPU workers on one GPU
    (8, 1, 3, None, 0.5, "GPU"),
])
def test_unplaceable_pools_fail_naming_the_resource(cpus, gpus, workers, compositors, worker_gpus, missing):
    from cluster.errors import PlacementError
    from cluster.scheduling import size_pool

    with pytest.raises(PlacementError) as e:
        size_pool(cpus=cpus, gpus=gpus, model_workers=workers, compositors=compositors, worker_gpus=worker_gpus)
    assert e.value.code == "cluster.unplaceable" and f"{missing}(s)" in e.value.message, e.value.message


# --- following a cluster that shrinks: no member waits for resources that are gone ---------------
@pytest.mark.parametrize("cpus,gpus,workers,compositors,expected", [
    (8, 4, None, 3, (4, 3)),   # the chaos cluster whole: one worker per GPU, 3 compositors as asked
    (4, 2, None, 3, (2, 2)),   # two nodes removed: 2 + 3 would need 5 CPUs of 4
    (4, 1, 2, 4, (1, 3)),      # explicit workers beyond the GPUs left: one per GPU that is there
    (2, 2, None, None, (1, 1)),  # a CPU stays for a compositor: without one nothing renders
    (3, 0, None, None, (1, 2)),  # the embedded default on 2 cores is unchanged
    (64, 0, None, None, (1, 63)),  # no fixed cap of 8 (issue 19)
    (17, 1, None, None, (1, 16)),  # an embedded Ray on a 16-core node declares 17 CPUs
    (1, 0, None, 2, (1, 1)),   # even below one CPU each, one of each (the pool cannot render with less)
])
def test_fit_pool_never_asks_for_more_than_the_cluster_holds(cpus, gpus, workers, compositors, expected):
    from cluster.scheduling import fit_pool, size_pool

    got = fit_pool(cpus=cpus, gpus=gpus, model_workers=workers, compositors=compositors, worker_gpus=1)
    assert (got.model_workers, got.compositors) == expected
    if cpus >= 2:
        assert got.model_workers + got.compositors <= cpus and got.model_workers <= max(gpus, 1)
        # where the settings fit, it is the pool start-up makes
        try:
            assert got == size_pool(cpus=cpus, gpus=gpus, model_workers=workers, compositors=compositors,
                                    worker_gpus=1)
        except Exception as e:  # noqa: BLE001 - PlacementError: the settings do not fit, fit_pool shrank them
            assert "CPU(s)" in str(e) or "GPU(s)" in str(e)


def test_surplus_members_drops_what_waits_first_then_only_idle_live_ones():
    from cluster.scheduling import Health, Member, surplus_members

    now = 1000.0
    lost_long = Member("lost-long", None, Health.lost, lost_at=now - 100)
    lost_new = Member("lost-new", None, Health.lost, lost_at=now - 1)
    pending = Member("pending", None, Health.starting, created_at=now - 50)
    busy = Member("busy", None, Health.live, inflight=1, served=0)
    idle_used = Member("idle-used", None, Health.live, served=9)
    idle_fresh = Member("idle-fresh", None, Health.live, served=0)
    failed = Member("failed", None, Health.failed, created_at=now - 500)
    members = [busy, idle_used, lost_new, failed, idle_fresh, pending, lost_long]

    names = lambda ms: [m.name for m in ms]  # noqa: E731
    assert surplus_members(members, 0, now, stale_after_s=15, idle_too=True) == []
    # only members that have waited past the grace, oldest first; nothing live before the surplus lasted
    assert names(surplus_members(members, 5, now, stale_after_s=15, idle_too=False)) == ["lost-long", "pending"]
    # once it lasted: idle live members too, least used first; never the busy or the failed one
    assert names(surplus_members(members, 5, now, stale_after_s=15, idle_too=True)) == \
        ["lost-long", "pending", "idle-fresh", "idle-used"]
    assert names(surplus_members(members, 1, now, stale_after_s=15, idle_too=True)) == ["lost-long"]
    # compositors whose chunks wait for a model worker that has no CPU to start on: the busy ones go too,
    # last (a node with the only model worker left: every job failed at its stall timeout instead)
    assert names(surplus_members(members, 5, now, stale_after_s=15, idle_too=True, busy_too=True)) == \
        ["lost-long", "pending", "idle-fresh", "idle-used", "busy"]


def _script_json(script: str, *args: str, timeout: float) -> dict:
    """Run a Python script in a new process (its own Ray) and return the JSON of its last line."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Two Rays for the tests below (each start ~10 s of the suite on 2 cores): the service's, as
# `lipsync serve` starts it, declaring 16 CPUs and a GPU; and a driver's for its jobs (`connect`, as
# `lipsync render` starts it), which renders a job on a compositor that takes two chunks at once.
_PROCESS_FACTS = (
    "    pid = ray.get(ray.remote(lambda: os.getpid()).remote(), timeout=120)\n"
    "    facts['ran'] = pid != os.getpid()\n"
    "    facts['names'] = [' '.join(p.cmdline()) for p in psutil.Process().children(recursive=True)]\n")


@pytest.fixture(scope="module")
def service_ray(tmp_path_factory) -> dict:
    """What a service's Ray (`start_embedded_ray`) with 16 logical CPUs and 1 GPU runs and sizes."""
    script = (
        "import asyncio, json, os, psutil, ray\n"
        "from actors.runtime import start_embedded_ray, stop_embedded\n"
        "from actors.supervision import Supervisor, TaskSet\n"
        "from cluster.config import Settings\n"
        f"s = Settings(storage_root={str(tmp_path_factory.mktemp('service-ray'))!r})\n"
        "start_embedded_ray(s, num_cpus=16, num_gpus=1)\n"
        "facts = {}\n"
        "try:\n"
        "    size = Supervisor(s, TaskSet(), asyncio.Event()).sizes()\n"
        "    facts.update(workers=size.model_workers, compositors=size.compositors,\n"
        "                 memory=ray.cluster_resources().get('memory', 0))\n"
        + _PROCESS_FACTS +
        "    print(json.dumps(facts))\n"
        "finally:\n"
        "    stop_embedded()\n")
    return _script_json(script, timeout=180)


@pytest.fixture(scope="module")
def jobs_ray(tmp_path_factory, speech4_wav, astronaut_video) -> dict:
    """What a driver's Ray for its jobs (`connect`) runs, and a job rendered on it with
    `chunks_per_compositor=2`, whose compositor is SIGKILLed while it holds two chunks."""
    from tests.conftest import RAY_TEST_SETTINGS

    tmp_path = tmp_path_factory.mktemp("jobs-ray")
    base = {**RAY_TEST_SETTINGS, "model_workers": 1, "compositors": 1, "keep_segments": False}
    script = (
        "import json, os, psutil, sys, time, ray\n"
        "from actors.runtime import Runtime, connect, stop_embedded\n"
        "from cluster.config import Settings\n"
        "from cluster.schemas import RenderRequest\n"
        f"s = Settings(storage_root={str(tmp_path / 'store')!r}, chunks_per_compositor=2, **{base!r})\n"
        "connect(s)\n"
        "facts = {}\n"
        "try:\n"
        + _PROCESS_FACTS +
        "    rt = Runtime(s)\n"
        "    rt.ready(timeout=240)\n"
        f"    req = RenderRequest(audio={speech4_wav!r}, video={astronaut_video!r},\n"
        f"                        output={str(tmp_path / 'two.mp4')!r})\n"
        "    job = rt.submit(req).id\n"
        "    t0 = time.monotonic()\n"
        "    while True:\n"  # until the compositor holds two chunks and has rendered two at once
        "        busy = [c for c in rt.call('refresh')['compositors']\n"
        "                if c['inflight'] == 2 and (c.get('rendered') or {}).get('most_at_once') == 2]\n"
        "        if busy:\n"
        "            break\n"
        "        assert time.monotonic() - t0 < 120 and not rt.status(job).state.terminal, rt.status(job)\n"
        "        time.sleep(0.02)\n"
        "    os.kill(busy[0]['pid'], 9)\n"
        "    st = rt.wait(job, timeout=300)\n"
        "    facts.update(state=st.state.value, error=str(st.error), output=st.output,\n"
        "                 killed_while=busy[0]['rendered'])\n"
        "    print(json.dumps(facts))\n"
        "finally:\n"
        "    stop_embedded()\n")
    facts = _script_json(script, timeout=420)
    facts["settings"], facts["tmp_path"] = base, str(tmp_path)
    return facts


def test_a_ray_with_16_logical_cpus_gets_more_than_8_compositors(service_ray):
    """The job manager's own sizing (`Supervisor.sizes`: Ray's CPUs, GPUs and memory resources and
    the settings) on a real Ray that declares 16 CPUs and 1 GPU: 15 compositors, not a fixed 8."""
    got = {k: service_ray[k] for k in ("workers", "compositors", "memory")}
    assert got["memory"] > 15 * 500 * 2**20, got  # this machine's memory does not bound it
    assert got["workers"] == 1 and got["compositors"] == 15 > 8, got


def test_the_ray_a_driver_starts_for_its_jobs_runs_no_monitors(service_ray, jobs_ray):
    """`connect` (what `lipsync render` and `lipsync demo` start) runs Ray without the autoscaler's
    monitor and the log monitor (`JOB_ONLY_RAY_PARAMS`: a second of a one-shot's start-up on 2
    cores), and that Ray runs work; the service's Ray (`start_embedded_ray` as `lipsync serve`
    calls it) keeps them."""
    got = {"jobs": jobs_ray, "service": service_ray}

    def running(kind: str, program: str) -> bool:
        return any(program in name for name in got[kind]["names"])

    for kind in ("jobs", "service"):
        assert got[kind]["ran"] and running(kind, "gcs_server") and running(kind, "raylet"), got[kind]["names"]
    assert not running("jobs", "autoscaler/_private/monitor.py"), got["jobs"]["names"]
    assert not running("jobs", "log_monitor.py"), got["jobs"]["names"]
    assert running("service", "autoscaler/_private/monitor.py") and running("service", "log_monitor.py"), \
        got["service"]["names"]


def test_a_compositor_asked_for_two_chunks_at_once_renders_them_together_and_the_same(jobs_ray, speech4_wav,
                                                                                      astronaut_video):
    """`chunks_per_compositor=2`: the job manager hands one compositor two chunks and the actor runs
    them on two threads at once (its own count, `most_at_once`, says so). SIGKILLed then, while two
    chunks are in its hands, it loses neither: both are rendered again, and the output is frame for
    frame the one rendered in one process, chunk after chunk (the chunks rendered side by side,
    before and after the kill, share the process's OpenCV, face tables and encoder threads)."""
    from cluster.config import Settings
    from cluster.render import render_local
    from cluster.schemas import RenderRequest
    from tests.helpers import decode_all

    got = jobs_ray
    assert got["state"] == "succeeded", got
    assert got["killed_while"]["most_at_once"] == 2, got
    reference = Path(got["tmp_path"]) / "one.mp4"
    render_local(RenderRequest(audio=speech4_wav, video=astronaut_video, output=str(reference)),
                 Settings(storage_root=Path(got["tmp_path"]) / "local", **got["settings"]))
    assert np.array_equal(decode_all(got["output"]), decode_all(str(reference)))


def test_workers_per_gpu_share_count_every_share():
    """LIPSYNC_WORKER_GPUS=0.2 on 1 GPU is 5 workers (floor division of floats gave 4), 0.4 on 2
    GPUs is 5, 1 on 3 GPUs is 3."""
    from cluster.scheduling import _asked_workers

    assert [_asked_workers(g, None, share) for g, share in ((1, 0.2), (1, 0.1), (2, 0.4), (3, 1), (1, 0.5))] == \
        [5, 10, 5, 3, 2]
    assert _asked_workers(4, 2, 0.2) == 2 and _asked_workers(0, None, 0.5) == 1


def test_the_default_pool_on_more_gpus_than_cpus_leaves_a_cpu_for_a_compositor():
    """8 GPUs and 4 CPUs: the default (one worker per GPU) was refused with "ask for fewer workers"
    although none were asked for; it now takes 3 workers and 1 compositor, as the running pool would."""
    from cluster.scheduling import fit_pool, size_pool

    assert size_pool(4, 8, None, None, 1.0) == fit_pool(4, 8, None, None, 1.0)
    assert (size_pool(4, 8, None, None, 1.0).model_workers, size_pool(4, 8, None, None, 1.0).compositors) == (3, 1)
    with pytest.raises(Exception, match="fewer workers"):  # asked for: refused as before
        size_pool(4, 8, 8, None, 1.0)


def _table(max_inflight: int, inflight: list[int]) -> WorkerTable:
    table = WorkerTable(max_inflight)
    for i, n in enumerate(inflight):
        member = table.add(f"m{i}", None)
        member.health, member.inflight = Health.live, n
    return table


def test_the_autoscaler_is_asked_for_what_the_cluster_can_place_and_for_compositors_too():
    from cluster.scheduling import autoscaler_bundles

    busy_models, busy_comps = _table(2, [2]), _table(1, [1, 1])
    # a CPU cluster: a model worker's bundle without a GPU (one with a GPU could never be placed)
    cpu = autoscaler_bundles(8, busy_models, busy_comps, cluster_gpus=0, worker_gpus=1.0, compositor_cpus=1.0)
    assert cpu == [{"CPU": 1.0}] * 2 + [{"CPU": 1.0}] * 3
    gpu = autoscaler_bundles(8, busy_models, busy_comps, cluster_gpus=1, worker_gpus=0.5, compositor_cpus=2.0)
    assert gpu == [{"CPU": 1.0, "GPU": 0.5}] * 2 + [{"CPU": 2.0}] * 3
    # compositors with room: only the model worker; model workers with room: only compositors
    assert autoscaler_bundles(8, busy_models, _table(1, [1, 0]), 1, 1.0, 1.0) == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert autoscaler_bundles(8, _table(2, [1]), busy_comps, 1, 1.0, 1.0) == [{"CPU": 1.0}] * 3
    # nothing waiting, or no more chunks than the compositors take: nothing asked (the request released)
    assert autoscaler_bundles(0, busy_models, busy_comps, 1, 1.0, 1.0) == []
    assert autoscaler_bundles(2, busy_models, busy_comps, 1, 1.0, 1.0) == []


def test_an_embedded_ray_refuses_a_pool_the_machine_cannot_hold(monkeypatch, tmp_path):
    """LIPSYNC_MODEL_WORKERS=50 on 2 cores declared 51 logical CPUs: 50 Python processes starting
    starved Serve's proxy, and `lipsync serve` died in a 35-line traceback. Now one typed refusal,
    before Ray starts; a pool of a few processes per core still runs, oversubscribed."""
    import os

    from actors.runtime import embedded_cpus
    from cluster.config import Settings
    from cluster.errors import PlacementError

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(PlacementError, match="LIPSYNC_MODEL_WORKERS"):
        embedded_cpus(Settings(storage_root=tmp_path, model_workers=50))
    assert embedded_cpus(Settings(storage_root=tmp_path, model_workers=2, compositors=2)) == 4
    assert embedded_cpus(Settings(storage_root=tmp_path)) == 3


def test_a_tables_summary_is_a_few_words_with_the_last_error():
    """A job failed for lack of workers said `model workers [{...}]`: 1,310 characters of dumped member
    records naming no cause (the whole record goes to the log). Its error now counts them by health and
    names the last error seen."""
    t = WorkerTable(max_inflight=2)
    assert t.summary() == "none"
    for name, health, error, lost_at in (("w0", Health.live, None, 0.0), ("w1", Health.lost, "died: SIGKILL", 5.0),
                                         ("w2", Health.lost, "no answer to a probe in 10 s", 9.0)):
        member = t.add(name, object())
        member.health, member.error, member.lost_at = health, error, lost_at
        member.info = {"pid": 4242, "node": "n" * 56, "models": ["builtin"]}
    assert t.summary() == "1 live, 2 lost (last error: no answer to a probe in 10 s)"


def test_a_chunk_whose_compositor_asks_for_nothing_is_given_up_as_frozen_not_at_its_deadline():
    """A probe SIGSTOPped a compositor mid-chunk: the chunk, and its job, waited for the 15-minute chunk deadline
    while the other compositor sat idle. The dispatcher now gives a chunk up as frozen once its compositor has sent
    no batch and got none back for `stall_timeout_s` while none of its batches is at the model and its process does
    not answer; a chunk that keeps sending batches, or whose batch waits at the model, is waited for, and so is one
    whose process answers `info` (a review: a compositor rendering another chunk, or fetching a template from
    another node, was killed)."""
    import time
    import types

    from actors.dispatch import Dispatcher
    from actors.jobs import JobRuntime
    from cluster.config import Settings
    from cluster.schemas import Chunk

    dispatcher = Dispatcher.__new__(Dispatcher)  # its scheduling logic, no Ray
    dispatcher.s = Settings(stall_timeout_s=0.4, chunk_timeout_s=30, batch_timeout_s=10)
    chunk = Chunk(index=0, start=0, stop=25)

    class Process:  # the compositor's `info`: answers at once, or never (a stopped process)
        def __init__(self, answers: bool) -> None:
            self.answers = answers

        def remote(self):
            answer = asyncio.get_running_loop().create_future()
            if self.answers:
                answer.set_result({"name": "compositor-0"})
            return answer

    async def case(activity, answers: bool = False) -> tuple[str, bool, float]:
        job = JobRuntime("j")
        job.activity[0] = [0, time.monotonic()]
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        keeper = asyncio.ensure_future(activity(job, answer))
        member = types.SimpleNamespace(name="compositor-0", handle=types.SimpleNamespace(info=Process(answers)))
        t0 = time.monotonic()
        try:
            outcome, frozen = await dispatcher._await_chunk(answer, job, chunk, member)
        finally:
            keeper.cancel()
        return outcome.kind.value, frozen, time.monotonic() - t0

    async def silent(job, answer):  # a stopped process: nothing comes
        await asyncio.sleep(60)

    async def sends_batches(job, answer):  # a batch every 0.2 s for 1.5 s, then its answer
        for _ in range(7):
            await asyncio.sleep(0.2)
            job.activity[0][1] = time.monotonic()
        answer.set_result("rendered")

    async def waits_at_the_model(job, answer):  # one batch out for 1.5 s (the model worker's deadline rules it)
        job.activity[0][0] = 1
        await asyncio.sleep(1.5)
        job.activity[0] = [0, time.monotonic()]
        answer.set_result("rendered")

    async def busy_elsewhere(job, answer):  # no batch of this chunk for 1.5 s, its process answering meanwhile
        await asyncio.sleep(1.5)
        answer.set_result("rendered")

    kind, frozen, took = run(case(silent))
    assert (kind, frozen) == ("stalled", True) and 0.4 < took < 2.0, (kind, frozen, took)
    kind, frozen, took = run(case(busy_elsewhere, answers=True))
    assert (kind, frozen) == ("answered", False) and took >= 1.4, (kind, frozen, took)
    for busy in (sends_batches, waits_at_the_model):
        kind, frozen, took = run(case(busy))
        assert (kind, frozen) == ("answered", False) and took >= 1.4, (busy.__name__, kind, frozen, took)


def test_a_silent_process_is_given_up_once_per_silence_and_not_while_it_restarts():
    """The sidecar's watch of the job manager (`SilenceWatch`): a probe SIGSTOPped the manager and every API call
    answered 503 for as long as it was stopped (190 s), nothing replacing it. Given up after `limit_s` of silence;
    not again while the one killed for it restarts (twice that)."""
    from cluster.scheduling import SilenceWatch

    watch = SilenceWatch(limit_s=10, now=0)
    for t in range(0, 60, 5):  # answering
        watch.heard(t)
        assert not watch.silent(t + 1)
    assert [watch.silent(t) for t in (60, 64, 66)] == [False, False, True]  # heard at 55: silent past 65
    assert not any(watch.silent(t) for t in range(67, 86, 2))  # restarting: its start is not the same silence
    assert watch.silent(87)  # still nothing, past twice the limit: given up again
    watch.heard(90)
    assert not watch.silent(99) and watch.silent(130)
