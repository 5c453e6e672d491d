"""Multi-node runs in their own processes: worker nodes that cannot see the head's files, and a
worker node that dies mid-job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


def _scenario(module: str, speech4_wav: str, astronaut_video: str, tmp_path: Path, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["LIPSYNC_STORAGE_ROOT"] = str(tmp_path / "storage")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", module, speech4_wav, astronaut_video, str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:] + _ray_logs_of_a_failed_scenario(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    return result


def _ray_logs_of_a_failed_scenario(stderr: str) -> str:
    """The tails of the GCS's and the raylets' logs of a scenario whose driver died (Ray aborts it on a
    lost GCS: "Failed to connect to GCS within 60 seconds"), once its nodes left behind are stopped."""
    import re

    from tests.isolated_nodes_scenario import TEMP_DIR_LINE, _kill_strays

    found = re.search(re.escape(TEMP_DIR_LINE) + r"(\S+)", stderr)
    if not found:
        return ""
    temp_dir = Path(found.group(1))
    _kill_strays(str(temp_dir))
    tails = []
    logs = sorted(temp_dir.glob("session_*/logs/gcs_server.out")) + sorted(temp_dir.glob("session_*/logs/raylet*.out"))
    for log in logs:
        try:
            tails.append(f"\n--- {log} (last 1500 characters) ---\n{log.read_text(errors='replace')[-1500:]}")
        except OSError:
            continue
    return "".join(tails)


def test_nodes_without_the_storage_root_render_grow_and_survive_a_node_kill(speech4_wav, astronaut_video, tmp_path):
    """`ray start --address` worker nodes inside `unshare --mount` with empty tmpfs over the storage
    root and the client's inputs; the client joins with RAY_ADDRESS + RAY_AUTH_TOKEN only. A node
    with a logical GPU that joins mid-job gets a model worker that takes batches of that job; then
    the first node is SIGKILLed mid-job; the output fetched through Ray equals a one-process render."""
    result = _scenario("tests.isolated_nodes_scenario", speech4_wav, astronaut_video, tmp_path, timeout=560)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["new_node_worker"] and result["new_node_worker"]["frames"] > 0, result  # the pool grew
    assert result["state_at_kill"] == "rendering", result
    assert result["actors_on_killed_node"], result  # the killed node really hosted our actors
    assert result["manager_on_head"] and not result["actors_on_head"], result  # no actor saw the storage root
    assert result["state"] == "succeeded", result
    assert result["identical"], result
    assert any(n and n >= 3 for n in result["cached_files"]), result  # template, track, mel cached on the node
    assert result["client_path_untouched"], result   # the output came back through Ray, not by path
    assert result["model_file_loaded_on_isolated_node"] == 96, result  # a model file fetched through Ray


def test_job_survives_removal_of_a_worker_node(speech4_wav, astronaut_video, tmp_path):
    """The same fault on `ray.cluster_utils.Cluster` nodes (one shared disk): a removed node's
    chunks are rendered on the rest. Runs where mount namespaces are not permitted (the test
    above covers it, more strictly, where they are)."""
    from tests.isolated_nodes_scenario import mount_namespaces_work

    if mount_namespaces_work(tmp_path / "probe") is None:
        pytest.skip("covered by test_nodes_without_the_storage_root_render_grow_and_survive_a_node_kill")
    result = _scenario("tests.multinode_scenario", speech4_wav, astronaut_video, tmp_path, timeout=560)
    assert result["state_at_removal"] == "rendering", result
    assert result["actors_on_removed_node"], result
    assert result["state"] == "succeeded", result
    assert result["identical"], result


def test_pool_follows_a_cluster_that_grows_into_it_and_shrinks_below_it(speech4_wav, astronaut_video, tmp_path):
    """3 compositors asked for on a 1-CPU head: a submit is refused at once (`cluster.unplaceable`);
    two GPU nodes join and the pool starts by itself (2 workers, 3 compositors). A node leaves
    (3 CPUs, 1 GPU left): the pool becomes 1 model worker and 2 compositors, all live, none of ours
    waiting in Ray for resources that are gone; the job manager and then the model worker are
    SIGKILLed, and a job renders the fault-free frames."""
    result = _scenario("tests.shrink_scenario", speech4_wav, astronaut_video, tmp_path, timeout=560)
    assert result["refused"] and result["refused"]["code"] == "cluster.unplaceable", result
    assert result["refused"]["s"] < 30 and "CPU(s)" in result["refused"]["message"], result
    assert len(result["pool_before"]["models"]) == 2 and len(result["pool_before"]["compositors"]) == 3, result
    assert result["converged_s"] is not None, result  # within 120 s of the removal
    assert result["waiting_after"] == [], result
    assert result["reconverged_s"] is not None and result["waiting_end"] == [], result  # after both kills
    assert result["state"] == "succeeded" and result["identical"], result
    assert [h for _, h in result["pool_end"]["models"]] == ["live"], result


def test_jobs_survive_the_loss_of_the_only_model_workers_node(speech4_wav, astronaut_video, tmp_path):
    """The node of the only model worker is lost mid-job, and the compositors left hold every CPU: one of
    them goes (its chunk is dispatched again) so that the model worker starts on the node left. Every job
    rendering then failed with `render.worker_lost` at its stall timeout (an operator's report, 3 of 3)."""
    result = _scenario("tests.model_node_loss_scenario", speech4_wav, astronaut_video, tmp_path, timeout=560)
    assert result["pool_started"] and result["state_at_removal"] == "rendering", result
    assert result["states"] == ["succeeded", "succeeded"] and all(result["identical"]), result
    assert [h for _, h in result["pool_end"]["models"]] == ["live"], result
