"""Chaos under load, short and bounded (issue 12): a seeded stream of jobs through the job manager
while model workers, compositors and the job manager itself are SIGKILLed at random times. The
long form is `python -m bench chaos`."""
from __future__ import annotations

import pytest

from cluster.render import render_local
from cluster.schemas import RenderRequest
from tests.chaos import JobSpec, RuntimeBackend, run_chaos
from tests.helpers import decode_all

pytestmark = pytest.mark.ray

SEED = 12


@pytest.fixture(scope="module")
def chaos_inputs(media_dir, astronaut_video):
    from cluster.synth import speech_like, write_audio

    return {f"a{k}": write_audio(str(media_dir / f"chaos{k}.wav"), speech_like(1.6 + 0.4 * k, seed=40 + k))
            for k in range(2)}, astronaut_video


@pytest.fixture(scope="module")
def chaos_references(chaos_inputs, ray_settings, tmp_path_factory):
    audios, video = chaos_inputs
    d = tmp_path_factory.mktemp("chaos-ref")
    refs = {}
    for key, audio in audios.items():
        out = d / f"{key}.mp4"
        render_local(RenderRequest(audio=audio, video=video, output=str(out)), ray_settings)
        refs[key] = decode_all(str(out))
    return refs


def test_jobs_survive_random_kills_of_workers_compositors_and_the_job_manager(
        runtime, chaos_inputs, chaos_references, tmp_path):
    audios, video = chaos_inputs
    specs = [JobSpec(f"chaos{SEED}-{i:02d}", audios[f"a{i % 2}"], video, f"a{i % 2}") for i in range(4)]
    report = run_chaos(RuntimeBackend(runtime, tmp_path), specs, chaos_references, seed=SEED,
                       kinds=["model_worker", "compositor", "job_manager"], fault_gap_s=(0.8, 1.6),
                       settle_s=240, work_dir=tmp_path, submit_gap_s=(0.0, 1.5), max_faults=3)
    report.assert_promises()
    assert set(report.faults_by_kind()) == {"model_worker", "compositor", "job_manager"}, report.faults
    assert runtime.ready(timeout=120)  # and the cluster serves on
