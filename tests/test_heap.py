"""The job manager's glibc heap (cluster/heap.py): freed big buffers go back to the system."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# In a fresh interpreter (glibc's thresholds start at their defaults): one 8 MiB block freed (an
# upload part), then four threads at once each allocate and free 4 MiB buffers; prints the growth of
# the process's anonymous memory in MiB.
SCENARIO = """
import sys, threading
sys.path.insert(0, {root!r})
from cluster.heap import pin_mmap_threshold

def anon_mib():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:")) / 1024

pinned = pin_mmap_threshold({threshold})
base = anon_mib()
block = b"u" * (8 << 20)
del block

together = threading.Barrier(4)  # all four alive at once: each has its own arena

def work():
    together.wait(30)
    for k in range(10):
        buffer = b"b" * ((4 << 20) + k * 4096)
        del buffer

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(pinned, round(anon_mib() - base, 1))
"""


def _grown(threshold: int) -> tuple[str, float]:
    run = subprocess.run([sys.executable, "-c", SCENARIO.format(root=str(ROOT), threshold=threshold)],
                         capture_output=True, text=True, timeout=60, check=True)
    pinned, grown = run.stdout.split()
    return pinned, float(grown)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_pinned_thresholds_hand_freed_buffers_back():
    pinned, grown = _grown(128 * 1024)
    dynamic, kept = _grown(0)  # glibc's own: the 8 MiB block raised its threshold
    assert pinned == "True" and dynamic == "False"
    assert kept >= 8, f"glibc's dynamic threshold kept only {kept} MiB: the scenario no longer shows it"
    assert grown < 2, f"{grown} MiB of freed buffers kept with the thresholds pinned"
