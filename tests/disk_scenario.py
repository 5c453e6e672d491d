"""A disk that is too small, or fills up mid-job (run by tests/test_resources.py inside
`unshare --mount --map-root-user`, with a small tmpfs mounted over the storage root).

usage: python disk_scenario.py STORAGE_ROOT AUDIO VIDEO
Prints one JSON line: what each step raised and which temporaries were left.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cluster.config import Settings
from cluster.errors import LipsyncError
from cluster.models import load_model
from cluster.render import admit, finalize_job, prepare_job, render_chunk, render_local
from cluster.schemas import RenderRequest

TEMP_MARKS = (".tmp", ".pending", ".template-", ".ffconcat", ".out-")


def fill(root: Path) -> Path:
    """Write zeros under `root` until the filesystem refuses more."""
    ballast = root / "ballast.bin"
    block = b"\0" * (1 << 16)
    with open(ballast, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError:
            pass
    return ballast


def outcome(fn) -> dict:
    try:
        fn()
        return {"ok": True}
    except LipsyncError as e:
        return {"ok": False, "code": e.code, "stage": e.stage, "job_id": e.job_id, "message": e.message}


def temporaries(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if any(m in p.name for m in TEMP_MARKS))


def main() -> None:
    root, audio, video = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    s = Settings(storage_root=root / "store", chunk_seconds=0.5, batch_size=8, disk_reserve_bytes=0)
    model = load_model("builtin", s)  # stored under the root before the disk is filled
    report: dict = {}

    def request(name: str) -> RenderRequest:
        return RenderRequest(audio=audio, video=video, output=str(root / "out" / f"{name}.mp4"))

    # 1. too big for the disk at all: refused at admission, nothing written
    huge = s.model_copy(update={"disk_reserve_bytes": 1 << 40})
    report["admit_refused"] = outcome(lambda: admit("toobig", request("toobig"), huge))
    report["admit_refused_left_job_dir"] = (root / "store" / "jobs" / "toobig").exists()

    # 2. the disk fills after admission: prepare fails with resource.disk
    admitted = admit("prep", request("prep"), s)
    ballast = fill(root)
    report["prepare_full"] = outcome(lambda: prepare_job("prep", admitted, s, model_size=model.size))
    ballast.unlink()

    # 3. the disk fills between chunks: the chunk fails with resource.disk, no segment is left
    admitted = admit("mid", request("mid"), s)
    plan = prepare_job("mid", admitted, s, model_size=model.size)
    render_chunk(plan, plan.chunks[0], model.generate, s)
    ballast = fill(root)
    report["render_full"] = outcome(lambda: render_chunk(plan, plan.chunks[1], model.generate, s))
    report["segments_after_render_full"] = sorted(p.name for p in Path(plan.job_dir, "segments").iterdir())
    ballast.unlink()

    # 4. the disk fills before finalising: no output, no pending output
    for chunk in plan.chunks[1:]:
        render_chunk(plan, chunk, model.generate, s)
    ballast = fill(root)
    report["finalize_full"] = outcome(lambda: finalize_job(plan, s))
    report["output_exists"] = Path(plan.output_path).exists()
    ballast.unlink()

    # 5. space again: the next job succeeds
    report["after"] = outcome(lambda: render_local(request("after"), s, model=model, job_id="after"))
    report["after_output"] = os.path.getsize(root / "out" / "after.mp4") if (root / "out" / "after.mp4").exists() else 0
    report["temporaries"] = temporaries(root)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
