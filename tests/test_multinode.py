"""Remove a whole worker node (ray.cluster_utils.Cluster) during a job: it completes on the rest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def test_job_survives_removal_of_a_worker_node(speech4_wav, astronaut_video, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LIPSYNC_STORAGE_ROOT"] = str(tmp_path / "storage")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "tests.multinode_scenario", speech4_wav, astronaut_video,
                           str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["state_at_removal"] == "rendering", result
    assert result["actors_on_removed_node"], result  # the removed node really hosted our actors
    assert result["state"] == "succeeded", result
    assert result["identical"], result
