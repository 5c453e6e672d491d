"""How long a retention sweep takes over a job store of N finished jobs (`python bench/retention_sweep.py 100000`):
the first sweep after a start (every finished job older than the retention is read once) and a periodic one (only
the jobs that came of age since the last cutoff). Rows are made by copying one real job's row, one every 30 s over
N x 30 s, into a temporary storage root; no job files exist, so the time is the store's and the sweep's own."""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from datetime import datetime, timedelta, timezone

from cluster.config import Settings
from cluster.jobstore import JobStore
from cluster.retention import sweep
from cluster.schemas import JobState, RenderRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", type=int, nargs="?", default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="retention-bench-") as root:
        s = Settings(storage_root=root, retention_days=30)
        store = JobStore(s.db_path)
        store.create("seed", RenderRequest(audio="/in/a.wav", video="/in/v.mp4"))
        store.transition("seed", JobState.preparing)
        store.transition("seed", JobState.failed)
        row = dict(store._conn.execute("SELECT * FROM jobs WHERE id = 'seed'").fetchone())
        cols, start = list(row), datetime.now(timezone.utc) - timedelta(seconds=30 * args.jobs)
        rows = []
        for i in range(args.jobs):
            at = (start + timedelta(seconds=30 * i)).isoformat()
            rows.append(tuple({**row, "id": f"j{i:07d}", "created_at": at, "updated_at": at}[c] for c in cols))
        with store._lock:
            store._conn.execute("BEGIN")
            store._conn.executemany(f"INSERT INTO jobs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                                    rows)
            store._conn.execute("COMMIT")
        now = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        sweep(s, store, now=now)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        sweep(s, store, now=now + timedelta(hours=1), since=now - timedelta(days=s.retention_days))
        periodic = time.perf_counter() - t0
        print(f"{args.jobs} finished jobs: first sweep {first:.2f} s, periodic sweep {periodic:.3f} s, "
              f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()
