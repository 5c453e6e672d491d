"""Thread pools sized from an actor's Ray CPUs (issue 19): the configured values, read back from
the libraries and the processes themselves (not psutil thread counts, which also hold Ray's own
threads and miss the ffmpeg children)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from cluster import threads
from cluster.threads import ThreadPlan, thread_plan


@pytest.fixture
def plan_of(monkeypatch):
    """Make `plan` this process's current plan for the test only (what `apply_thread_plan` leaves
    for the pools created later), without resizing the test process's own OpenCV/BLAS pools; the
    product's encoder threads as they are (not the test processes' one x264 thread: tests.helpers)."""
    from cluster.media import encode

    monkeypatch.setattr(encode, "x264_threads", getattr(encode.x264_threads, "planned", encode.x264_threads))

    def use(plan: ThreadPlan | None) -> ThreadPlan | None:
        monkeypatch.setattr(threads, "_applied", plan)
        return plan
    return use


def test_thread_plan_is_one_thread_per_ray_cpu():
    assert thread_plan(1) == ThreadPlan(cpus=1, opencv=1, onnx_intra_op=1, decoder=1, x264=1, blas=1)
    assert thread_plan(0.5).cpus == 1 and thread_plan(None).cpus == 1  # a fraction still runs on a thread
    p = thread_plan(4)
    assert (p.opencv, p.onnx_intra_op, p.decoder, p.x264, p.blas) == (4, 4, 4, 4, 4)


def test_encoder_args_and_the_running_ffmpeg_get_the_x264_threads(tmp_path, plan_of):
    from cluster.config import Settings
    from cluster.media.encode import SegmentEncoder, encoder_args

    s = Settings(storage_root=tmp_path)
    plan_of(None)
    assert "-threads" not in encoder_args(s, Fraction(25), 64, 48)  # no plan: the encoder's default
    args = encoder_args(s, Fraction(25), 64, 48, threads=3)
    assert args[args.index("-threads") + 1] == "3"
    plan_of(thread_plan(1))
    enc = SegmentEncoder(tmp_path / "seg.mp4", 64, 48, Fraction(25), s.model_copy(update={"encode_in_process": False}))
    try:  # the ffmpeg child really runs with one encoder thread (once it is ffmpeg: it may be
        # started through `setpriv --pdeathsig`, which then execs it)
        from cluster.media.ffmpeg import ffmpeg_binary
        from tests.helpers import wait_until

        def ffmpeg_cmdline():
            argv = open(f"/proc/{enc._sink._proc.pid}/cmdline", "rb").read().split(b"\0")
            return argv if argv[0] == ffmpeg_binary(s).encode() else None
        cmdline = wait_until(ffmpeg_cmdline, 10, 0.01, "the encoder's ffmpeg to run")
        assert cmdline[cmdline.index(b"-threads") + 1] == b"1"
        assert cmdline.index(b"-threads") > cmdline.index(b"-i")  # an output (encoder) option
        enc.write(np.full((5, 48, 64, 3), 128, np.uint8))
    finally:
        assert enc.close() == 5


def test_the_in_process_encoder_gets_the_x264_threads(tmp_path, plan_of):
    from cluster.config import Settings
    from cluster.media.encode import SegmentEncoder

    s = Settings(storage_root=tmp_path)
    for plan, want in ((thread_plan(1), 1), (thread_plan(3), 3), (None, 0)):  # 0: libx264's own choice
        plan_of(plan)
        with SegmentEncoder(tmp_path / "seg.mp4", 64, 48, Fraction(25), s) as enc:
            assert enc._sink._stream.codec_context.thread_count == want  # the opened libx264's
            enc.write(np.full((5, 48, 64, 3), 128, np.uint8))


def test_decoder_threads_follow_the_plan_and_frames_do_not_change(astronaut_video, plan_of):
    from cluster.media.decode import TemplateReader

    plan_of(None)
    with TemplateReader(astronaut_video) as r:
        want = r.read([0, 7, 30])
    for n in (1, 5):
        plan_of(thread_plan(n))
        with TemplateReader(astronaut_video) as r:
            assert r._stream.codec_context.thread_count == n
            assert np.array_equal(r.read([0, 7, 30]), want)


def test_onnxruntime_sessions_get_the_planned_intra_op_threads(tmp_path, plan_of):
    from cluster.config import Settings
    from cluster.faces.mtcnn import MTCNNDetector
    from cluster.models import load_model, model_intra_op_threads

    s = Settings(storage_root=tmp_path, providers="cpu")
    plan_of(thread_plan(1))
    assert load_model("builtin:96", s).intra_op_threads == 1  # the light built-in model: the plan
    assert load_model("builtin:96", s.model_copy(update={"model_threads": 2})).intra_op_threads == 2  # explicit wins
    plan_of(None)
    assert load_model("builtin:96", s).intra_op_threads == 0  # no plan: onnxruntime's default
    # with a GPU provider the worker's CPU threads only feed the GPU: its plan
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert model_intra_op_threads(s, thread_plan(1), cuda) == 1
    assert model_intra_op_threads(s, thread_plan(3), cuda) == 3
    assert model_intra_op_threads(s, None, cuda) == 0
    # a network on the CPU provider is the CPU work the compositors wait for: every core
    assert model_intra_op_threads(s, thread_plan(1), ["CPUExecutionProvider"]) == 0
    assert model_intra_op_threads(s, thread_plan(1), ["CPUExecutionProvider"], light=True) == 1
    assert model_intra_op_threads(s.model_copy(update={"model_threads": 4}), thread_plan(1), cuda) == 4
    det = MTCNNDetector(intra_op_threads=1)
    assert all(sess.get_session_options().intra_op_num_threads == 1 for sess, _, _ in det._sessions.values())


def test_actors_size_their_pools_from_their_ray_cpus(runtime):
    """In the session's compositors and model workers (1 Ray CPU each): OpenCV and every BLAS /
    OpenMP pool at one thread, read back inside the actor; the built-in model's session at one
    intra-op thread, a network's (on the CPU provider here) at onnxruntime's default
    (`model_intra_op_threads`)."""
    import ray

    ns = runtime.settings.namespace
    comp = ray.get(ray.get_actor("lipsync-compositor-0", namespace=ns).info.remote(), timeout=60)["threads"]
    assert comp["plan"] == thread_plan(1).as_dict()
    assert comp["opencv"] == 1
    assert comp["blas"] and set(comp["blas"].values()) == {1}, comp
    worker = ray.get(ray.get_actor("lipsync-model-worker-0", namespace=ns).info.remote(), timeout=60)["threads"]
    assert worker["plan"]["cpus"] == 1 and worker["opencv"] == 1
    intra = worker["onnx_intra_op"]  # the session's worker may also hold other tests' networks
    assert intra.get("builtin") == 1, worker  # the light built-in model: the plan's one thread
    assert all(v == 0 for k, v in intra.items() if not k.startswith("builtin")), worker  # a network: every core


def test_cuda_provider_options_come_from_the_settings_and_typos_are_refused(tmp_path):
    """LIPSYNC_CUDA_OPTIONS reaches the CUDA provider's options (what to try for float16 on a GPU:
    prefer_nhwc, cuDNN's algorithm search), checked on a CPU machine with injected device facts."""
    from cluster.config import Settings
    from cluster.errors import ModelLoadError
    from cluster.models.providers import CPU, CUDA, DeviceFacts, select_providers

    facts = DeviceFacts(available=(CUDA, CPU), cuda_devices=1, device_memory=(80 * 2**30,))
    s = Settings(storage_root=tmp_path, cuda_options="prefer_nhwc=1, cudnn_conv_algo_search=EXHAUSTIVE")
    got = select_providers(gpu_ids=[0], settings=s, facts=facts)
    assert got == [(CUDA, {"prefer_nhwc": "1", "cudnn_conv_algo_search": "EXHAUSTIVE", "device_id": 0}), CPU]
    # NHWC by default (measured faster on an H200); '' gives onnxruntime's own defaults
    assert select_providers(gpu_ids=[0], settings=Settings(storage_root=tmp_path), facts=facts)[0] == \
        (CUDA, {"prefer_nhwc": "1", "device_id": 0})
    assert select_providers(gpu_ids=[0], settings=Settings(storage_root=tmp_path, cuda_options=""),
                            facts=facts)[0] == (CUDA, {"device_id": 0})
    for bad in ("prefer_nchw=1", "prefer_nhwc"):
        with pytest.raises(ModelLoadError, match="LIPSYNC_CUDA_OPTIONS"):
            select_providers(gpu_ids=[0], settings=Settings(storage_root=tmp_path, cuda_options=bad), facts=facts)


def test_a_live_session_actor_sizes_its_pools_as_one_cpu(tmp_path):
    """A live session's actor asks Ray for no CPU; its OpenCV, decoder and BLAS pools are sized as one
    CPU's (a live batch is a few frames' face regions), not to the machine. In a child process: the
    plan is process-wide."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from cluster.config import Settings\n"
        "from actors.live import LiveSessionActor\n"
        "from cluster.threads import applied_threads\n"
        "actor = LiveSessionActor.__ray_metadata__.modified_class('t', Settings(storage_root=sys.argv[1]))\n"
        "print(json.dumps(applied_threads()))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    applied = json.loads(out.strip().splitlines()[-1])
    assert applied["plan"]["opencv"] == applied["plan"]["decoder"] == 1 and applied["opencv"] == 1, applied
    assert all(n == 1 for n in (applied["blas"] or {}).values()), applied
