"""The Ray runtime end to end: concurrent jobs, real processes killed mid-job, bounded failures."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from cluster.schemas import JobState, RenderRequest
from tests.helpers import decode_all, wait_until

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def reference(ray_settings, speech4_wav, astronaut_video, tmp_path_factory):
    """The fault-free output of the same job, rendered in-process without Ray."""
    from cluster.render import render_local

    out = tmp_path_factory.mktemp("ref") / "reference.mp4"
    render_local(RenderRequest(audio=speech4_wav, video=astronaut_video, output=str(out)), ray_settings)
    return decode_all(str(out))


#: Jobs that a test acts on while they render: an identity model that takes 60 ms a frame (the 4 s job's
#: 100 frames are 3 s of model time on the two workers), so that they are still rendering by construction
#: when the test kills, stops or cancels (with the built-in model the job ended 0.7-0.9 s after its first
#: frame, unloaded: a starved test process could act on a finished job). `slow_reference` is its output.
SLOW = "latency:60:96"


@pytest.fixture(scope="module")
def slow_reference(ray_settings, speech4_wav, astronaut_video, tmp_path_factory):
    """The fault-free output of a SLOW job: the same identity model without the sleep, in-process."""
    from cluster.render import render_local

    out = tmp_path_factory.mktemp("ref") / "slow-reference.mp4"
    render_local(RenderRequest(audio=speech4_wav, video=astronaut_video, output=str(out), model="latency:0:96"),
                 ray_settings)
    return decode_all(str(out))


def _request(audio, video, tmp_path, name="out.mp4", **kw) -> RenderRequest:
    return RenderRequest(audio=audio, video=video, output=str(tmp_path / name), **kw)


def _wait_rendering(runtime, job_id, min_frames=1):
    return wait_until(lambda: (lambda st: st.state == JobState.rendering and st.frames_done >= min_frames
                               or st.state.terminal)(runtime.status(job_id)), 120, what=f"{job_id} rendering")


def _model_members(runtime):
    return runtime.call("refresh")["models"]


def test_workers_one_per_logical_gpu_on_cpu_provider(runtime):
    # the fixture waits for one live worker; the second may still be starting (it was once, beside
    # another xdist worker's tests)
    members = wait_until(lambda: (lambda ms: ms if len(ms) == 2 and all(m["health"] == "live" for m in ms) else None)(
        _model_members(runtime)), 120, interval=0.5, what="both model workers to be live")
    assert len(members) == 2, members
    assert all("gpus" in m for m in members), members
    assert sorted(g for m in members for g in m["gpus"]) == ["0", "1"]  # one worker per GPU
    from cluster.config import Settings
    from cluster.models.providers import provider_name, select_providers

    for m in members:  # the provider this machine should pick for those GPUs: CPU for logical ones
        expected = [provider_name(p) for p in select_providers(m["gpus"], Settings())]
        assert m["providers"] == expected, m


def test_two_jobs_together_each_get_their_own_output(runtime, reference, speech_wav, speech4_wav,
                                                     astronaut_video, tmp_path, ray_settings):
    a = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, "a.mp4"))
    b = runtime.submit(_request(speech_wav, astronaut_video, tmp_path, "b.mp4", loop="forward"))
    sa, sb = runtime.wait(a.id, timeout=300), runtime.wait(b.id, timeout=300)
    assert sa.state == JobState.succeeded, sa.error
    assert sb.state == JobState.succeeded, sb.error
    fa, fb = decode_all(sa.output), decode_all(sb.output)
    assert np.array_equal(fa, reference)
    assert len(fb) == 80  # 3.2 s at 25 fps
    assert sa.frames_done == sa.frames_total == 100
    # ended jobs leave nothing behind in the job manager: no runtime (plan, chunk books, HLS
    # publisher), no file open in their directories (the AAC packets' unnamed file)
    manager = runtime.call("workers")["manager"]["pid"]
    from cluster.render import job_dir

    job_dirs = [str(job_dir(a.id, ray_settings)), str(job_dir(b.id, ray_settings))]
    assert ray.get(runtime.manager().__ray_call__.remote(lambda self: [j for j in (a.id, b.id)
                                                                     if j in self.machine.jobs]), timeout=60) == []
    open_there = [os.readlink(f"/proc/{manager}/fd/{fd}") for fd in os.listdir(f"/proc/{manager}/fd")
                  if os.path.lexists(f"/proc/{manager}/fd/{fd}")]
    assert not [f for f in open_there if any(f.startswith(d) for d in job_dirs)], open_there
    # each compositor counts what it rendered and where its render thread waited (bench throughput reads it)
    rendered = [c["rendered"] for c in runtime.call("refresh")["compositors"] if c.get("rendered")]
    assert sum(r["frames"] for r in rendered) >= 180 and sum(r["chunks"] for r in rendered) >= 4, rendered
    assert 0 < sum(r["waited_model_s"] for r in rendered) < sum(r["seconds"] for r in rendered), rendered
    assert all(0 <= r["waited_encoder_s"] <= r["seconds"] for r in rendered), rendered


def test_sigkill_model_worker_mid_job(runtime, slow_reference, speech4_wav, astronaut_video, tmp_path):
    job = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, model=SLOW))
    _wait_rendering(runtime, job.id)
    victim = _model_members(runtime)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    assert not runtime.status(job.id).state.terminal  # the kill landed mid-job
    st = runtime.wait(job.id, timeout=300)
    assert st.state == JobState.succeeded, st.error
    assert np.array_equal(decode_all(st.output), slow_reference)
    # Ray restarts the worker; it comes back live with a new process and serves again.
    def back():
        m = next(m for m in _model_members(runtime) if m["name"] == victim["name"])
        return m if m["health"] == "live" and m["pid"] != victim["pid"] else None
    restarted = wait_until(back, 180, interval=1, what="the killed worker to come back")
    again = runtime.wait(runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, "again.mp4")).id,
                         timeout=300)
    assert again.state == JobState.succeeded
    served = next(m for m in _model_members(runtime) if m["name"] == victim["name"])
    assert served["pid"] == restarted["pid"] and served["frames"] > 0


def test_sigkill_compositor_mid_job(runtime, slow_reference, speech4_wav, astronaut_video, tmp_path):
    job = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, model=SLOW))
    _wait_rendering(runtime, job.id)
    busy = [c for c in runtime.call("refresh")["compositors"] if c["inflight"]]
    assert busy
    for c in busy:  # kill every compositor that is busy: their chunks must be re-rendered elsewhere
        os.kill(c["pid"], signal.SIGKILL)
    assert not runtime.status(job.id).state.terminal
    st = runtime.wait(job.id, timeout=300)
    assert st.state == JobState.succeeded, st.error
    assert np.array_equal(decode_all(st.output), slow_reference)


def test_stalled_worker_is_bypassed(runtime, slow_reference, speech4_wav, astronaut_video, tmp_path):
    """SIGSTOP a model worker: its batches time out and are re-dispatched; the job completes."""
    job = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, model=SLOW))
    _wait_rendering(runtime, job.id)
    victim = _model_members(runtime)[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        st = runtime.wait(job.id, timeout=300)
    finally:
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert st.state == JobState.succeeded, st.error
    assert np.array_equal(decode_all(st.output), slow_reference)
    # The watchdog gave up on the frozen process and had it restarted: a new pid serves again.
    wait_until(lambda: any(m["name"] == victim["name"] and m["health"] == "live" and m["pid"] != victim["pid"]
                           for m in _model_members(runtime)), 180, interval=1, what="the stalled worker's restart")


def test_orchestrator_restart_resumes_from_segments(runtime, slow_reference, speech4_wav, astronaut_video, tmp_path):
    job = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, model=SLOW))
    wait_until(lambda: runtime.status(job.id).chunks_done >= 1 or runtime.status(job.id).state.terminal, 180,
               what="a first segment")
    seg_dir = Path(runtime.settings.storage_root) / "jobs" / job.id / "segments"
    before = {p.name: p.stat().st_mtime_ns for p in seg_dir.glob("[0-9][0-9][0-9][0-9][0-9].mp4")}
    assert before
    assert not runtime.status(job.id).state.terminal
    ray.kill(runtime.manager(), no_restart=False)
    st = runtime.wait(job.id, timeout=300)
    assert st.state == JobState.succeeded, st.error
    assert np.array_equal(decode_all(st.output), slow_reference)
    after = {p.name: p.stat().st_mtime_ns for p in seg_dir.glob("[0-9][0-9][0-9][0-9][0-9].mp4")}
    for name, mtime in before.items():  # segments finished before the restart were kept, not redone
        assert after[name] == mtime


def test_orchestrator_restart_with_inputs_gone_fails_precisely(runtime, speech4_wav, astronaut_video, tmp_path):
    # a model that takes 60 ms a frame (no CPU): the job is still rendering when its inputs go
    job = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, model="latency:60:96"))
    _wait_rendering(runtime, job.id)
    manager = runtime.manager()
    ray.kill(manager, no_restart=False)
    mel = Path(runtime.settings.storage_root) / "jobs" / job.id / "mel.npy"
    audio = Path(runtime.status(job.id).request.audio)
    mel.unlink()
    audio.unlink()
    st = runtime.wait(job.id, timeout=300)
    assert st.state == JobState.failed
    assert st.error.code == "job.inputs_missing"
    assert job.id in st.error.message


def _failing_model(path: Path, size: int = 96) -> str:
    """A Wav2Lip-shaped model with a dynamic batch that raises on any batch not a multiple of 8 frames."""
    import onnx
    from onnx import TensorProto, helper

    mel = helper.make_tensor_value_info("mel_spectrogram", TensorProto.FLOAT, ["b", 1, 80, 16])
    face = helper.make_tensor_value_info("video_frames", TensorProto.FLOAT, ["b", 6, size, size])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 3, size, size])
    nodes = [
        helper.make_node("Slice", ["video_frames", "starts", "ends", "axes"], ["ref"]),
        helper.make_node("Reshape", ["ref", "groups"], ["grouped"]),  # B must be a multiple of 8
        helper.make_node("Reshape", ["grouped", "shape"], ["output"]),
    ]
    inits = [helper.make_tensor("starts", TensorProto.INT64, [1], [3]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [6]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("groups", TensorProto.INT64, [5], [-1, 8, 3, size, size]),
             helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 3, size, size])]
    graph = helper.make_graph(nodes, "fails_on_short_batches", [mel, face], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


def test_chunk_failing_repeatedly_fails_its_job_only(runtime, speech_wav, speech4_wav, astronaut_video, tmp_path):
    bad_model = _failing_model(tmp_path / "fails.onnx")
    # 3.2 s -> chunks of 25 frames: the last batch of each chunk has 1 frame, and the model raises.
    bad = runtime.submit(_request(speech_wav, astronaut_video, tmp_path, "bad.mp4", model=bad_model))
    good = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, "good.mp4"))
    sb, sg = runtime.wait(bad.id, timeout=300), runtime.wait(good.id, timeout=300)
    assert sg.state == JobState.succeeded, sg.error
    assert sb.state == JobState.failed
    err = sb.error
    assert err.code == "render.chunk_failed"
    assert err.stage == "render" and err.chunk is not None
    assert "Reshape" in (err.cause or "") or "reshape" in (err.cause or "").lower()
    assert not Path(tmp_path / "bad.mp4").exists()


def test_model_that_cannot_load_fails_jobs_clearly(runtime, speech_wav, astronaut_video, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx file")
    st = runtime.wait(runtime.submit(_request(speech_wav, astronaut_video, tmp_path, model=str(broken))).id,
                      timeout=240)
    assert st.state == JobState.failed
    assert st.error.code == "model.load_failed"
    assert str(broken) in st.error.message


def test_cancel_mid_job_stops_it_and_the_cluster_keeps_working(runtime, speech4_wav, astronaut_video, tmp_path):
    job = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, "cancelled.mp4", model=SLOW))
    _wait_rendering(runtime, job.id)
    shown = runtime.status(job.id).frames_done
    st = runtime.cancel(job.id)
    assert st.state == JobState.cancelled and st.error.code == "cancelled"
    assert runtime.wait(job.id, timeout=30).state == JobState.cancelled  # stays cancelled
    # its progress does not go back at the end (it showed frames of chunks in flight, then only done ones)
    assert runtime.status(job.id).frames_done >= shown > 0
    assert not (tmp_path / "cancelled.mp4").exists()
    after = runtime.wait(runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, "next.mp4")).id, timeout=300)
    assert after.state == JobState.succeeded, after.error


def test_cancel_while_preparing_stops_the_steps_ffmpeg_on_its_compositor(runtime, speech4_wav, astronaut_video,
                                                                         tmp_path):
    """A job cancelled while its template was normalised ended at once, but the compositor's ffmpeg ran on to its
    end (a hostile template's grew to 9 GB after the cancel), holding the compositor: it is killed now, and the
    compositor takes the next job."""
    import hashlib
    import subprocess
    import time

    import psutil

    from cluster.media.ffmpeg import ffmpeg_binary

    gap = tmp_path / "gap.mp4"  # 2 s of face whose second second starts an hour later: minutes to normalise
    subprocess.run([ffmpeg_binary(runtime.settings), "-v", "error", "-y", "-i", astronaut_video, "-vf",
                    "setpts='if(gt(N,25),PTS+3600/TB,PTS)'", "-fps_mode", "vfr", "-c:v", "libx264", "-preset",
                    "ultrafast", str(gap)], check=True, timeout=60)

    template_dir = f"/templates/{hashlib.sha256(gap.read_bytes()).hexdigest()[:16]}/.template-"

    def normalising() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(template_dir in arg for arg in p.info["cmdline"] or ()):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    job = runtime.submit(_request(speech4_wav, str(gap), tmp_path, "gap-out.mp4"))
    wait_until(lambda: normalising() or runtime.status(job.id).state.terminal, 240, what="its template's ffmpeg")
    assert runtime.status(job.id).state == JobState.preparing
    time.sleep(1.0)
    assert normalising(), "normalised already"
    cancelled_at = time.monotonic()
    assert runtime.cancel(job.id).state == JobState.cancelled
    wait_until(lambda: not normalising(), 15, what="the cancelled job's ffmpeg to be killed")
    assert time.monotonic() - cancelled_at < 15
    after = runtime.wait(runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, "after-gap.mp4")).id,
                         timeout=300)
    assert after.state == JobState.succeeded, after.error
    assert runtime.status(job.id).state == JobState.cancelled


def test_an_answer_its_caller_stopped_reading_leaves_no_unhandled_error(runtime, monkeypatch, tmp_path):
    """A chunk that ended (cancelled) with a batch in flight dropped that batch's answer unread: its StaleAttempt
    was Ray's "Unhandled error" traceback in the compositor's log (37 in a probe's 40 minutes). `UnreadAnswers`
    reads each such answer when it comes."""
    import time

    import ray._private.worker as ray_worker

    from actors.calls import UnreadAnswers

    seen: list[Exception] = []
    monkeypatch.setattr(ray_worker, "_unhandled_error_handler", seen.append)

    @ray.remote(num_cpus=0)
    def stale(n: int, marker: str):
        Path(marker).touch()
        raise ValueError(f"this attempt is no longer wanted ({n})")

    def freed_unread(n: int, unread: UnreadAnswers | None) -> None:
        marker = tmp_path / f"answered-{n}"
        ref = stale.remote(n, str(marker))
        if unread is not None:
            unread.add(ref)
            unread.drop()
        wait_until(marker.exists, 60, what="the call to answer")  # (not `ray.wait`ed: that counts as a read)
        time.sleep(1.0)

    freed_unread(1, None)  # (as before: said by Ray once freed)
    deadline = time.monotonic() + 20
    while not seen and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen and "(1)" in str(seen[0]), seen
    seen.clear()
    freed_unread(2, UnreadAnswers())
    time.sleep(3)
    assert not seen, seen


def test_wait_answers_when_the_job_ends_not_when_its_window_does(runtime, speech4_wav, astronaut_video, tmp_path):
    """`JobManager.wait` is a long poll: a running job's status comes back when the window ends, an
    ending job's as soon as it ends (not up to a poll interval later); unknown jobs raise as `get`."""
    import threading
    import time

    from scipy.io import wavfile

    from actors import MAX_WAIT_S
    from cluster.errors import JobNotFound

    with pytest.raises(JobNotFound):
        runtime.call("wait", "no-such-job", 1.0)
    rate, speech = wavfile.read(speech4_wav)
    long_speech = tmp_path / "speech20.wav"  # a job that is still rendering when it is cancelled
    wavfile.write(long_speech, rate, np.tile(speech, 5))
    job = runtime.submit(_request(str(long_speech), astronaut_video, tmp_path, "waited.mp4", model=SLOW))
    _wait_rendering(runtime, job.id)
    assert not runtime.call("wait", job.id, 0.2).state.terminal  # the window ended first
    answered = {}

    def waiter():
        answered["status"] = runtime.call("wait", job.id, MAX_WAIT_S, timeout=MAX_WAIT_S + 60)
        answered["at"] = time.monotonic()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)  # the waiter is inside its 10 s window
    cancelled_at = time.monotonic()
    runtime.cancel(job.id)
    thread.join(timeout=MAX_WAIT_S + 60)
    assert answered["status"].state == JobState.cancelled
    assert answered["at"] - cancelled_at < MAX_WAIT_S / 2  # at the end, not when the window closed


def test_submit_with_same_id_is_idempotent(runtime, speech4_wav, astronaut_video, tmp_path):
    req = _request(speech4_wav, astronaut_video, tmp_path, "idem.mp4")
    first = runtime.submit(req, job_id="idempotent-job-1")
    second = runtime.submit(req, job_id="idempotent-job-1")
    assert first.id == second.id == "idempotent-job-1"
    assert runtime.wait(first.id, timeout=300).state == JobState.succeeded
    assert len([j for j in runtime.call("list_jobs") if j.id == "idempotent-job-1"]) == 1
    # its prepared files (template, track, mel) are served to nodes while it runs, not for the manager's life
    held = ray.get(runtime.manager().__ray_call__.remote(
        lambda self: [sha in self.machine.blobs for sha in self.store.plan("idempotent-job-1")["blobs"].values()]),
        timeout=60)
    assert held and not any(held), held


def test_compositor_dead_for_good_is_replaced(runtime, slow_reference, speech4_wav, astronaut_video, tmp_path):
    """ray.kill(no_restart=True) on a busy compositor: the job manager creates a new one."""
    job = runtime.submit(_request(speech4_wav, astronaut_video, tmp_path, model=SLOW))
    _wait_rendering(runtime, job.id)
    busy = [c for c in runtime.call("refresh")["compositors"] if c["inflight"]]
    assert busy
    victim = busy[0]
    ray.kill(ray.get_actor(victim["name"], namespace=runtime.settings.namespace), no_restart=True)
    st = runtime.wait(job.id, timeout=300)
    assert st.state == JobState.succeeded, st.error
    assert np.array_equal(decode_all(st.output), slow_reference)
    wait_until(lambda: any(c["name"] == victim["name"] and c["health"] == "live" and c["pid"] != victim["pid"]
                           for c in runtime.call("refresh")["compositors"]), 120, interval=1,
               what="a replacement compositor")


def test_model_worker_retries_a_failed_load_and_keeps_its_default(runtime, ray_settings, tmp_path):
    """A model file that appears after a failed load is loaded on retry; loading other models
    never evicts the default one (info keeps answering ready)."""
    import shutil

    from actors.model_worker import ModelWorker
    from cluster.models.builtin import builtin_model_path

    late = tmp_path / "late.onnx"
    late.write_bytes(b"still being copied")
    s = ray_settings.model_copy(update={"model_retry_s": 3.0, "models_per_worker": 1})
    worker = ModelWorker.options(num_cpus=0).remote(str(late), s, "probe-worker")
    try:
        info = ray.get(worker.info.remote(), timeout=120)
        assert info["ready"] is False and info["error"]["code"] == "model.load_failed"
        shutil.copyfile(builtin_model_path(s, 96), late)
        with pytest.raises(ray.exceptions.RayTaskError):  # inside the retry interval: the cached error
            ray.get(worker.describe.remote(str(late)), timeout=60)
        import time

        time.sleep(3.2)
        assert ray.get(worker.describe.remote(str(late)), timeout=120)["size"] == 96
        assert ray.get(worker.describe.remote("builtin:64"), timeout=120)["size"] == 64  # beyond models_per_worker
        info = ray.get(worker.info.remote(), timeout=60)
        assert info["ready"] is True and info["size"] == 96 and str(late) in info["models"]
    finally:
        ray.kill(worker)


@ray.remote(num_cpus=0)
class _Answers:
    """A pool member that answers its probe live (the supervisor's `info` contract)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def info(self) -> dict:
        return {"settings": self.fingerprint, "ready": True, "pid": os.getpid()}


def test_a_probe_whose_replacement_fails_once_tries_again_and_brings_the_member_back(runtime, ray_settings):
    """A member dead for good is replaced by its factory; when that raises once (the name still
    taken, Ray's control store briefly away), the probe logs it and tries again instead of
    dying and leaving the member out of rotation until the job manager restarts."""
    import asyncio

    from actors.supervision import Supervisor, TaskSet
    from cluster.scheduling import Health

    fingerprint = ray_settings.fingerprint()
    calls = []

    def factory():
        calls.append(len(calls))
        if len(calls) == 2:  # the first replacement
            raise ValueError("The name probe-member (namespace=test) is already taken")
        return _Answers.remote(fingerprint)

    async def scenario():
        sup = Supervisor(ray_settings, TaskSet(), asyncio.Event())
        member = sup._add(sup.compositors, "probe-member-never-named", factory)
        for _ in range(300):
            if member.health == Health.live:
                break
            await asyncio.sleep(0.1)
        assert member.health == Health.live
        first = member.handle
        ray.kill(first, no_restart=True)  # dead for good
        for _ in range(300):  # ray.kill returns before the actor is gone: a probe could still get its answer
            try:
                await asyncio.wait_for(first.info.remote(), timeout=5)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                break
            await asyncio.sleep(0.1)
        await sup.lost(sup.compositors, member, "test: killed for good")
        for _ in range(300):  # live again on a new handle (a probe of the killed one may still answer first)
            if member.health == Health.live and member.handle is not first:
                break
            await asyncio.sleep(0.1)
        return member, first

    member, first = asyncio.run(scenario())
    assert member.health == Health.live and member.handle is not first
    assert len(calls) == 3  # created, the replacement that raised, the one that answered


@ray.remote(num_cpus=0)
class _EndedSession:
    """A live session's actor as the registry sees one that ended long ago (`LiveSessionActor.load`)."""

    def load(self) -> dict:
        return {"ended_for": 1000.0, "render_load": 0.0, "cores": 1, "memory_bytes": 0, "available_bytes": 0}


def test_the_live_registry_removes_ended_sessions_without_waiting_for_a_new_one(runtime, ray_settings):
    """An ended session's actors go `live_keep_ended_s` after its end even when no other session is
    created (they were removed only when one was, so a service used now and then kept them)."""
    import uuid

    from actors.live import SESSION_PREFIX, LiveRegistry
    from tests.helpers import wait_until

    s = ray_settings.model_copy(update={"live_keep_ended_s": 2.0})
    name = SESSION_PREFIX + uuid.uuid4().hex[:16]
    ended = _EndedSession.options(name=name, namespace=s.namespace).remote()
    ray.get(ended.load.remote(), timeout=60)
    registry = LiveRegistry.options(name=f"test-registry-{uuid.uuid4().hex[:8]}", namespace=s.namespace).remote(s)
    try:
        def gone() -> bool:
            try:
                ray.get_actor(name, namespace=s.namespace)
                return False
            except ValueError:
                return True

        wait_until(gone, 30, 0.2, "the ended session's actor to be removed")
    finally:
        ray.kill(registry, no_restart=True)


@ray.remote(num_cpus=0)
class _TakingOverSession:
    """A live session's actor that does not answer (dying, restarting, or a standby that refuses)."""

    def load(self) -> dict:
        raise RuntimeError("standing by")


def test_a_session_whose_actors_do_not_answer_still_counts_until_its_journal_ends_it(runtime, ray_settings):
    """Admission counts running sessions (`LIPSYNC_MAX_LIVE_SESSIONS`, the node's load): one whose
    actor is being restarted or taken over answers no load, and was not counted, so a session too
    many could be admitted meanwhile. It counts (at the default load) while its journal has not ended
    it; once the journal holds its end it does not."""
    import json
    import uuid

    from actors.live import SESSION_PREFIX, LiveRegistry, session_dir

    s = ray_settings
    sid = uuid.uuid4().hex[:16]
    journal = session_dir(s, sid)
    journal.mkdir(parents=True)
    (journal / "session.json").write_text(json.dumps({"avatar_id": "a", "sample_rate": 16000}))
    silent = _TakingOverSession.options(name=SESSION_PREFIX + sid, namespace=s.namespace).remote()
    registry = LiveRegistry.options(name=f"test-registry-{uuid.uuid4().hex[:8]}", namespace=s.namespace).remote(s)
    try:
        running = ray.get(registry.running.remote(), timeout=60)
        assert running.get(sid) == {"render_load": None, "cores": None, "memory_bytes": None,
                                    "available_bytes": None}, running
        (journal / "final.json").write_text(json.dumps({"state": "ended"}))
        assert sid not in ray.get(registry.running.remote(), timeout=60)
    finally:
        ray.kill(registry, no_restart=True)
        ray.kill(silent, no_restart=True)


def test_a_model_with_its_weights_in_another_file_is_refused_by_name(runtime, tmp_path):
    """A model saved with external data (`model.onnx` + `model.onnx.data`) would load on the job
    manager's node and fail on every other (only the .onnx travels): refused everywhere, naming
    the weights file and how to save the model as one file."""
    import onnx

    from cluster.errors import ModelLoadError
    from tests.test_models import wav2lip_like

    single = wav2lip_like(str(tmp_path / "one.onnx"), "audio_sequences", "face_sequences", "output", 96)
    onnx.save(onnx.load(single), str(tmp_path / "split.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="split.onnx.data", size_threshold=0)
    with pytest.raises(ModelLoadError, match=r"split\.onnx\.data.*save_as_external_data=False"):
        runtime.call("model_blob", str(tmp_path / "split.onnx"))
    assert runtime.call("model_blob", single)["sha256"]  # one file: fine


def test_the_manager_holds_the_queue_bound_for_submissions_arriving_at_once(runtime, speech4_wav, astronaut_video,
                                                                           tmp_path):
    """The service checks its queue bound before the inputs travel; a burst could pass that check
    together. The job manager counts again as it admits (jobs being admitted included): of three
    submissions sent at once where one more job fits, one is admitted and two get `service.busy`."""
    import uuid

    from cluster.errors import QueueFull

    unfinished = len(runtime.call("list_jobs", [s for s in JobState if not s.terminal], 1000, 0))
    requests = [runtime.upload_request(_request(speech4_wav, astronaut_video, tmp_path, f"q{i}.mp4")) for i in range(3)]
    refs = [runtime.manager().submit.remote(f"bound-{uuid.uuid4().hex[:8]}", r, None, unfinished + 1) for r in requests]
    admitted, refused = [], []
    for i, ref in enumerate(refs):
        try:
            admitted.append((i, ray.get(ref, timeout=120)))
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            assert isinstance(cause, QueueFull), e
            refused.append(cause)
    assert len(admitted) == 1 and len(refused) == 2, (admitted, refused)
    assert all(e.code == "service.busy" and f"LIPSYNC_MAX_QUEUED_JOBS={unfinished + 1}" in e.message for e in refused)
    # a resubmission of the admitted job is not refused by the bound (a client's retry)
    (i, job), = admitted
    again = runtime.manager().submit.remote(job.id, requests[i], None, unfinished + 1)
    assert ray.get(again, timeout=120).id == job.id
    # a new id sent twice at once (a retry while the first is being admitted): the retry waits for that
    # admission and answers its job, instead of admitting the same inputs a second time beside it
    twin = f"twin-{uuid.uuid4().hex[:8]}"
    other = requests[(i + 1) % 3]
    refs = [runtime.manager().submit.remote(twin, other, None, None) for _ in range(2)]
    assert [ray.get(r, timeout=120).id for r in refs] == [twin, twin]
    assert runtime.wait(job.id, timeout=300).state == JobState.succeeded
    assert runtime.wait(twin, timeout=300).state == JobState.succeeded


def test_only_an_admission_under_a_minted_id_is_refused_when_it_ends_late(tmp_path):
    """An admission that outlasted the gateway's wait (a large input copied from slow storage) was refused
    for every id, and a client's retry with its own id redid the whole admission and was refused again,
    for ever. Only an id the service minted (its client learns it from the 503) gets a deadline; under a
    chosen id a late admission is stored, and the retry is answered it: its 503 says the job may still be
    admitted (it said "was not admitted", and the job then rendered)."""
    import asyncio

    from actors.service_support import ManagerGateway, ManagerUnavailable
    from cluster.config import Settings

    gateway = ManagerGateway(Settings(storage_root=tmp_path))
    calls = []

    async def call(method, *args, timeout=None, **kwargs):
        calls.append((method, kwargs))
        raise ManagerUnavailable(f"the job manager did not answer {method} within {timeout:.0f} s")

    gateway.call = call
    told = []
    for job_id, chosen in (("chosen", True), ("minted", False)):
        with pytest.raises(ManagerUnavailable) as raised:
            asyncio.run(gateway.submit(job_id, None, id_chosen=chosen))
        told.append(raised.value.message)
    assert calls[0] == ("submit", {}) and calls[1][1]["within_s"] >= 60, calls
    assert "job chosen may still be admitted: submit it again with the id 'chosen'" in told[0], told
    assert "job minted was not admitted: submit it again with the id 'minted'" in told[1], told


def test_an_admission_that_ends_after_its_caller_stopped_waiting_is_not_stored(runtime, ray_settings, speech4_wav,
                                                                              astronaut_video, tmp_path):
    """The service's gateway waits a bounded time for an admission, then answers 503; the manager's
    admission (probing, copying the inputs) went on and started a job its caller had been told was not
    admitted, under an id it never heard (a retry then rendered it twice). Told how long its caller
    waits, the manager stores no admission that ends later."""
    import uuid

    from cluster.errors import AdmissionTooLate, JobNotFound

    request = runtime.upload_request(_request(speech4_wav, astronaut_video, tmp_path, "late.mp4"))
    job_id = f"late-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(runtime.manager().submit.remote(job_id, request, None, None, within_s=0.0), timeout=120)
    cause = raised.value.as_instanceof_cause()
    assert isinstance(cause, AdmissionTooLate) and cause.code == "service.unavailable", cause
    assert cause.job_id == job_id and "longer than its caller waited" in cause.message
    with pytest.raises(JobNotFound):
        runtime.call("get", job_id)
    assert job_id not in [j.id for j in runtime.call("list_jobs")]
    # nor its input copies: a later submission of the id with other speech took them for its own
    from cluster.render import job_dir

    assert not job_dir(job_id, ray_settings).exists()


def test_a_ray_daemon_run_by_an_interpreter_with_options_is_known_as_ray(tmp_path):
    """`kill_embedded_ray`'s fallback knows a Ray process holding files in its session directory by its
    program or its interpreter's script in Ray's package: `python -u .../autoscaler/_private/monitor.py` (the
    option was taken for the script), not a `tail -f` of a log there, nor `python -c <code>`."""
    from types import SimpleNamespace

    from actors.runtime import _holds_file_in, _ray_package_dir

    session = tmp_path / "ray" / "session_1"
    log = str(session / "logs" / "monitor.log")

    def process(*command: str):
        return SimpleNamespace(cmdline=lambda: list(command), open_files=lambda: [SimpleNamespace(path=log)])

    ray_dir, python = _ray_package_dir(), sys.executable
    assert _holds_file_in(process(python, "-u", ray_dir + "autoscaler/_private/monitor.py", "--logs-dir=x"), session)
    assert _holds_file_in(process(python, ray_dir + "dashboard/dashboard.py"), session)
    assert _holds_file_in(process(ray_dir + "core/src/ray/raylet/raylet", "--raylet_socket_name=x"), session)
    assert not _holds_file_in(process("/usr/bin/tail", "-f", log), session)
    assert not _holds_file_in(process(python, "-B", "-c", "from multiprocessing.forkserver import main"), session)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=4)
class _StandInManager:
    """What the sidecar's watch asks of a job manager: `ping`, answered from its event loop."""

    async def ping(self) -> bool:
        return True

    async def pid(self) -> int:
        return os.getpid()

    async def pause(self, seconds: float) -> None:  # a manager busy with other calls: its ping answers late
        import time

        time.sleep(seconds)  # (blocks the event loop, as a long synchronous step would)


def test_the_sidecar_kills_a_job_manager_that_answers_nothing(runtime, ray_settings):
    """A probe's SIGSTOPped job manager was never replaced (every API call waited 30 s, then 503, for as long as it
    was stopped). The service sidecar's watch (`watch_manager`) on a real actor: one that answers late but within
    the limit is left alone; one SIGSTOPped is killed after `stall_timeout_s` and Ray restarts it."""
    import asyncio
    import time

    from actors.service_support import watch_manager
    from cluster.config import Settings

    ns = f"watch-{os.getpid()}"
    manager = _StandInManager.options(name="stand-in-manager", namespace=ns).remote()
    first = ray.get(manager.pid.remote(), timeout=60)
    settings = Settings(namespace=ns, stall_timeout_s=4.0)

    async def watched(act, seconds: float):
        task = asyncio.ensure_future(watch_manager(settings, name="stand-in-manager"))
        try:
            await asyncio.to_thread(act)
            await asyncio.sleep(seconds)
        finally:
            task.cancel()

    try:
        def busy():  # its event loop blocked 3 s, twice: pings answered late, each within the 4 s limit
            for _ in range(2):
                ray.get(manager.pause.remote(3.0), timeout=30)
                time.sleep(0.5)

        asyncio.run(watched(busy, 3.0))
        assert ray.get(manager.pid.remote(), timeout=30) == first  # not taken for silent

        os.kill(first, signal.SIGSTOP)
        stopped = time.monotonic()
        asyncio.run(watched(lambda: None, 12.0))
        while True:  # (a restart still under way on a loaded machine answers "restarting": asked again)
            try:
                again = ray.get(manager.pid.remote(), timeout=60)
                break
            except ray.exceptions.ActorUnavailableError:
                assert time.monotonic() - stopped < 60, "the stopped manager was not restarted"
                time.sleep(0.2)
        assert again != first, "the stopped manager was not replaced"
        assert time.monotonic() - stopped < 60
    finally:
        try:
            os.kill(first, signal.SIGCONT)
        except ProcessLookupError:
            pass
        ray.kill(manager, no_restart=True)


@ray.remote(num_cpus=0)
class _StandInDetached:
    """A named actor a service left on a joined cluster; as a job manager, `workers` says which code it runs."""

    def __init__(self, code: str | None = None) -> None:
        self.code = code

    def workers(self) -> dict:
        return {"manager": {"storage_root": "/x", **({"code": self.code} if self.code else {})}}


def test_a_service_joining_a_cluster_replaces_another_codes_job_manager_and_pool(runtime):
    """On a joined cluster the job manager, the sidecar and the pool are detached and were reused by the next
    `lipsync serve` whatever code they ran: after an upgrade, the new routes called the earlier version's actors.
    Where the job manager runs other code, they are killed for good (and made again by the new service); where it
    runs this code, or in another namespace, nothing is touched."""
    from actors import ORCHESTRATOR_NAME
    from actors.service_support import SIDECAR_NAME
    from cluster import code_version
    from cluster.config import Settings
    from service.launch import replace_other_code

    ns, other = f"upgrade-{os.getpid()}", f"upgrade-other-{os.getpid()}"
    names = [ORCHESTRATOR_NAME, SIDECAR_NAME, "lipsync-model-worker-0", "lipsync-compositor-3"]

    def leave(namespace: str, code: str | None):
        actors = [_StandInDetached.options(name=n, namespace=namespace, lifetime="detached").remote(
            code if n == ORCHESTRATOR_NAME else None) for n in names]
        ray.get([a.workers.remote() for a in actors], timeout=60)
        return actors

    def alive(namespace: str) -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == namespace}

    kept = leave(other, None)
    try:
        same = leave(ns, code_version())
        assert replace_other_code(Settings(namespace=ns)) == [] and alive(ns) == set(names)  # this code: reused
        for a in same:
            ray.kill(a, no_restart=True)
        wait_until(lambda: not alive(ns), 60, what="the names free")
        leave(ns, None)  # a version from before code versions
        assert sorted(replace_other_code(Settings(namespace=ns))) == sorted(names)
        assert not alive(ns) and alive(other) == set(names)
    finally:
        for a in kept:
            ray.kill(a, no_restart=True)
        for n in alive(ns):
            ray.kill(ray.get_actor(n, namespace=ns), no_restart=True)
