"""How much the job manager and the GCS keep after one job (issue 23: an hour-long job's memory).

A warm service (embedded Ray in this process), the avatar prepared and three warm-up jobs, then one
job of `--seconds` of speech on a 320x240 template with the built-in model; PSS of the job
manager and of the GCS before and after it, the job manager's anonymous memory (`Pss_Anon` of
`smaps_rollup`: read this one on a shared machine, where the libraries' file pages in PSS move
as other processes come and go) before, once submitted, at its peak and after, where that memory
is (`_heap`, run inside the manager), and what `malloc_trim(0)` in the job manager gives back. Settings come from the
environment as usual (e.g. `LIPSYNC_BATCH_SIZE=4`, `LIPSYNC_CHUNK_SECONDS=1`,
`RAY_task_events_report_interval_ms=0`, `MALLOC_ARENA_MAX=2`), so runs differ in one thing.

    python -m bench.manager_growth --seconds 240
    python -m bench.manager_growth --seconds 240 --baseline 9954d01   # that commit's code, then this tree's

`--baseline` runs this measurement twice, one after the other, each in its own process and its own
embedded Ray: on the code of a commit (checked out into a temporary git worktree) and on this tree,
and prints both side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pss_mib(root, needle: str) -> float:
    import psutil

    total = 0
    for p in root.children(recursive=True):
        try:
            if needle in " ".join(p.cmdline()):
                total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 2**20


def _rollup_mib(root, needle: str) -> dict:
    import psutil

    for p in root.children(recursive=True):
        try:
            if needle in " ".join(p.cmdline()):
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    return {ln.split(":")[0]: int(ln.split()[1]) // 1024 for ln in f
                            if ln.startswith(("Pss_Anon", "Pss_Shmem", "Pss_File"))}
        except (psutil.Error, OSError):
            continue
    return {}


def _heap(self) -> dict:  # runs inside the job manager (__ray_call__): where its memory is
    """glibc's arenas (mallinfo2: in use / free, mmapped), pymalloc's arenas (allocated vs the
    bytes in its live blocks), the threads, and the Python object types that grew most."""
    import collections
    import ctypes
    import gc
    import os
    import re
    import sys
    import tempfile
    import threading

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    mi = libc.mallinfo2()
    fd, path = tempfile.mkstemp()
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    text = open(path).read()
    os.unlink(path)

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1).replace(",", "")) if m else -1
    gc.collect()  # garbage in reference cycles is not held
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    fd, path = tempfile.mkstemp()  # glibc's own account, arena by arena
    os.close(fd)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    xml = open(path).read()
    os.unlink(path)
    arenas = []
    for nr, body in re.findall(r'<heap nr="(\d+)">(.*?)</heap>', xml, re.S):
        size = re.search(r'<system type="current" size="(\d+)"', body)
        free = sum(int(x) for x in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', body))
        arenas.append((int(nr), round(int(size.group(1)) / 2 ** 20, 1) if size else -1, round(free / 2 ** 20, 1)))
    kinds = collections.Counter()  # resident KiB of the process's mappings, by kind
    start = name = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                lo = int(head[0].split("-")[0], 16)
                perms, path = head[1], (head[5] if len(head) > 5 else "")
                if path:
                    name = "file" if path.startswith("/") else path
                elif "w" not in perms:
                    name = "anon-readonly"
                else:  # glibc's thread arenas are heaps aligned to 64 MiB (HEAP_MAX_SIZE)
                    name = "anon-glibc-thread-arena" if lo % (64 * 2 ** 20) == 0 else "anon-other"
                start = lo
            elif head[0] == "Rss:" and start is not None:
                kinds[name] += int(head[1])
    mib = 2 ** 20
    return {"glibc_in_use_mib": round(mi.uordblks / mib, 1), "glibc_free_mib": round(mi.fordblks / mib, 1),
            "glibc_mmapped_mib": round(mi.hblkhd / mib, 1), "glibc_arena_bytes_mib": round(mi.arena / mib, 1),
            "pymalloc_arenas_mib": grab(r"(\d[\d,]*) arenas \* "),
            "pymalloc_live_blocks_mib": round(grab(r"# bytes in allocated blocks\s*=\s*([\d,]+)") / mib, 1),
            "threads": threading.active_count(), "os_threads": len(os.listdir("/proc/self/task")),
            "glibc_arenas_mib_size_free": [a for a in arenas if a[1] >= 1],
            "rss_by_mapping_mib": {k: round(v / 1024, 1) for k, v in sorted(kinds.items())},
            "objects": dict(counts)}


def _trim(self) -> int:  # runs inside the job manager (__ray_call__)
    import ctypes
    import gc

    gc.collect()
    return ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: list[str] | None = None) -> int:
    import psutil
    import ray

    from actors import ORCHESTRATOR_NAME
    from bench.classic import WarmService
    from bench.common import CACHE, make_inputs
    from cluster.schemas import RenderRequest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--idle", type=float, default=0.0,
                    help="instead of a job, leave the warm service idle this many seconds (its status polled)")
    ap.add_argument("--baseline", metavar="COMMIT",
                    help="measure COMMIT's code, then this tree's, one after the other; print both")
    a = ap.parse_args(argv)
    if a.baseline:
        return compare(a.baseline, a.seconds)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-growth-", dir=CACHE))
    me = psutil.Process()
    service = None
    try:
        inp = make_inputs(a.seconds, (320, 240), 4.0)
        warm = make_inputs(2.0, (320, 240), 4.0)
        service = WarmService(work / "storage")
        for k in range(3):  # avatar prepared, model loaded, both processes past their first jobs
            service.render(warm.audio, inp.video, "builtin", str(work / f"warm-{k}.mp4"))
        time.sleep(2)
        manager = ray.get_actor(ORCHESTRATOR_NAME, namespace=service.settings.namespace)
        heap = lambda: ray.get(manager.__ray_call__.remote(_heap), timeout=120)  # noqa: E731
        before = {"job_manager": _pss_mib(me, "JobManager"), "gcs": _pss_mib(me, "gcs_server"),
                  "job_manager_smaps": _rollup_mib(me, "JobManager"), "job_manager_heap": heap()}
        if a.idle:
            st = service.rt.render(RenderRequest(audio=warm.audio, video=inp.video, output=str(work / "idle.mp4"),
                                                 model="builtin"), timeout=600)
        else:
            st = service.rt.submit(RenderRequest(audio=inp.audio, video=inp.video, output=str(work / "out.mp4"),
                                                 model="builtin"))
        anon = lambda: _rollup_mib(me, "JobManager").get("Pss_Anon", 0)  # noqa: E731
        submitted = {"job_manager": _pss_mib(me, "JobManager"), "job_manager_anon": anon()}  # inputs uploaded
        peak, peak_anon, late, t0 = 0.0, 0, None, time.monotonic()
        deadline = t0 + (a.idle or 4 * 3600)
        while not (status := service.rt.status(st.id)).state.terminal or (a.idle and time.monotonic() < deadline):
            if time.monotonic() > deadline and not a.idle:
                raise TimeoutError(f"job {st.id} still {status.state.value} after 4 h")
            peak, peak_anon = max(peak, _pss_mib(me, "JobManager")), max(peak_anon, anon())
            if late is None and status.frames_total and status.frames_done >= 0.9 * status.frames_total and (
                    not a.idle or time.monotonic() > t0 + 0.9 * a.idle):
                late = {"job_manager": _pss_mib(me, "JobManager"), "job_manager_heap": heap()}
            time.sleep(2)
        time.sleep(2)
        after = {"job_manager": _pss_mib(me, "JobManager"), "gcs": _pss_mib(me, "gcs_server"),
                 "job_manager_smaps": _rollup_mib(me, "JobManager"), "job_manager_heap": heap()}
        ray.get(manager.__ray_call__.remote(_trim), timeout=60)
        time.sleep(1)
        trimmed = _pss_mib(me, "JobManager")
        trimmed_heap = heap()
        trimmed_heap.pop("objects")
        grown = {k: sorted(((n - before["job_manager_heap"]["objects"].get(k2, 0), k2)
                            for k2, n in late_or_after["job_manager_heap"]["objects"].items()), reverse=True)[:10]
                 for k, late_or_after in (("at_90_percent", late or after), ("after", after))}
        for snap in (before, late, after):
            if snap:
                snap["job_manager_heap"].pop("objects")
        out = {"state": status.state.value, "speech_s": a.seconds, "frames": status.frames_total,
               "before_mib": before, "submitted_mib": submitted, "at_90_percent_mib": late, "after_mib": after,
               "job_manager_peak_mib": round(peak, 1), "job_manager_peak_anon_mib": peak_anon,
               "job_manager_after_malloc_trim_mib": trimmed,
               "job_manager_heap_after_malloc_trim": trimmed_heap,
               "object_types_grown": grown,
               "job_manager_anon_peak_growth_kib_per_speech_s": round(
                   1024 * (peak_anon - before["job_manager_smaps"]["Pss_Anon"]) / a.seconds, 1),
               "job_manager_anon_growth_kib_per_speech_s": round(
                   1024 * (after["job_manager_smaps"]["Pss_Anon"] - before["job_manager_smaps"]["Pss_Anon"])
                   / a.seconds, 1),
               "job_manager_peak_growth_kib_per_speech_s": round(1024 * (peak - before["job_manager"]) / a.seconds, 1),
               "job_manager_growth_kib_per_speech_s": round(1024 * (after["job_manager"] - before["job_manager"])
                                                            / a.seconds, 1),
               "gcs_growth_mib": round(after["gcs"] - before["gcs"], 1)}
        print(json.dumps(out, indent=1, default=str))
    finally:
        if service is not None:
            service.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _measure_in(root: Path, seconds: float) -> dict:
    """This measurement in a child process whose code (and its Ray workers') is that of `root`."""
    from bench.common import CACHE

    env = {**os.environ, "PYTHONPATH": str(root), "LIPSYNC_BENCH_CACHE": str(CACHE)}  # the same inputs
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--seconds", str(seconds)], cwd=root,
                         env=env, capture_output=True, text=True, timeout=4 * 3600)
    if run.returncode != 0:
        raise RuntimeError(f"the measurement on {root} failed ({run.returncode}): {run.stderr[-3000:]}")
    return json.loads(run.stdout[run.stdout.index("{"):])


def compare(commit: str, seconds: float) -> int:
    """Baseline (COMMIT's code) and this tree, one after the other; the figures side by side."""
    where = Path(tempfile.mkdtemp(prefix="bench-growth-baseline-"))
    tree = where / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True, timeout=120)
    try:
        runs = {f"baseline {commit}": _measure_in(tree, seconds), "this tree": _measure_in(ROOT, seconds)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True,
                       timeout=120)
        shutil.rmtree(where, ignore_errors=True)
    rows = [
        ("job manager anonymous memory (Pss_Anon) before -> once submitted -> peak -> after, MiB",
         lambda r: "{} -> {} -> {} -> {}".format(r["before_mib"]["job_manager_smaps"]["Pss_Anon"],
                                                 r["submitted_mib"]["job_manager_anon"],
                                                 r["job_manager_peak_anon_mib"],
                                                 r["after_mib"]["job_manager_smaps"]["Pss_Anon"])),
        ("anonymous memory: peak growth, KiB per second of speech",
         lambda r: r["job_manager_anon_peak_growth_kib_per_speech_s"]),
        ("anonymous memory: growth after the job, KiB per second of speech",
         lambda r: r["job_manager_anon_growth_kib_per_speech_s"]),
        ("job manager PSS before the job, MiB", lambda r: r["before_mib"]["job_manager"]),
        ("job manager PSS once submitted (inputs uploaded), MiB", lambda r: r["submitted_mib"]["job_manager"]),
        ("job manager PSS peak during the job, MiB", lambda r: r["job_manager_peak_mib"]),
        ("job manager PSS after the job, MiB", lambda r: r["after_mib"]["job_manager"]),
        ("job manager PSS after malloc_trim(0), MiB", lambda r: r["job_manager_after_malloc_trim_mib"]),
        ("PSS: peak growth, KiB per second of speech", lambda r: r["job_manager_peak_growth_kib_per_speech_s"]),
        ("PSS: growth after the job, KiB per second of speech", lambda r: r["job_manager_growth_kib_per_speech_s"]),
        ("glibc thread arenas RSS before -> at 90 %, MiB", lambda r: "{} -> {}".format(
            r["before_mib"]["job_manager_heap"]["rss_by_mapping_mib"].get("anon-glibc-thread-arena"),
            (r["at_90_percent_mib"] or r["after_mib"])["job_manager_heap"]["rss_by_mapping_mib"].get(
                "anon-glibc-thread-arena"))),
        ("glibc in use before -> at 90 %, MiB", lambda r: "{} -> {}".format(
            r["before_mib"]["job_manager_heap"]["glibc_in_use_mib"],
            (r["at_90_percent_mib"] or r["after_mib"])["job_manager_heap"]["glibc_in_use_mib"])),
        ("job manager file-backed PSS (Pss_File) before -> after, MiB", lambda r: "{} -> {}".format(
            r["before_mib"]["job_manager_smaps"]["Pss_File"], r["after_mib"]["job_manager_smaps"]["Pss_File"])),
        ("GCS growth, MiB", lambda r: r["gcs_growth_mib"]),
    ]
    names = list(runs)
    print(f"\none job of {seconds:g} s of speech, 320x240, built-in model, warm service; runs one after the other\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, get in rows:
        print(f"| {label} | " + " | ".join(str(get(runs[n])) for n in names) + " |")
    print(json.dumps(runs, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
