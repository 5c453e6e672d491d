"""Thread pools of an actor process, sized from the CPUs Ray gave the actor (plain Python, no Ray).

Every library a compositor or model worker uses starts a thread pool sized to the *machine* by
default: OpenCV (one thread per core), onnxruntime's intra-op pool (one per physical core),
PyAV's frame-threaded H.264 decoder, x264 (1.5 threads per core plus
lookahead) and OpenBLAS/OpenMP. With 8-16 such processes on a 16-core node that is 80+ threads
per compositor spinning and contending for 16 cores: each frame cost 1.8-3.8x the CPU it costs on
2 cores (issue 19). So each actor sizes every pool from its own Ray CPUs, explicitly:

- `thread_plan(cpus)` is the one decision (which pool gets how many threads);
- `apply_thread_plan(plan)` applies what lives in this process (OpenCV, OpenBLAS/OpenMP through
  threadpoolctl, the environment its children inherit) and remembers the plan;
- `current()` is that plan (None in a process that applied none: the CLI's in-process render and
  the classic reference pipeline keep the libraries' defaults), read where a pool is created:
  the ffmpeg encoder's `-threads` (`cluster.media.encode`), PyAV's decoder threads
  (`cluster.media.decode`), onnxruntime's intra-op threads (the MTCNN detector; a model's on a GPU
  provider and the built-in model's, `cluster.models.model_intra_op_threads`: a network on the CPU
  provider gets every core).

`Settings.size_threads=false` leaves every pool at the library default (the behaviour before
issue 19, kept to measure the difference side by side: `python -m bench throughput`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger("lipsync.threads")

#: Environment variables of the thread pools children (and libraries loaded later) read.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_applied: ThreadPlan | None = None
_blas_limits = None  # threadpoolctl's limiter, kept referenced (the limits hold while it lives)


@dataclass(frozen=True)
class ThreadPlan:
    """Threads per pool of one actor process with `cpus` whole CPUs."""
    cpus: int
    opencv: int        # cv2.setNumThreads
    onnx_intra_op: int  # onnxruntime intra-op threads per session (models, MTCNN detector)
    decoder: int       # PyAV (libavcodec) decoder threads of a template reader
    x264: int          # libx264's threads (in-process encoder, or the ffmpeg child's `-threads`)
    blas: int          # OpenBLAS / OpenMP (threadpoolctl and the children's environment)

    def as_dict(self) -> dict:
        return asdict(self)


def thread_plan(cpus: float | None) -> ThreadPlan:
    """The thread pools of a process that may use `cpus` CPUs (its Ray CPUs; a fraction counts
    as one, None or 0 as one).

    One thread per CPU for each pool: the pools of a compositor work in turn on one batch
    (decode, paste-back, encode), not at the same time, except x264, which runs on its own
    thread (or in its own process) beside the compositor's Python (measured on the GPU node: OpenCV, OpenMP and x264 at
    one thread each cut the compositors' CPU per frame from 69-86 to 42-55 ms at the same frames
    per second)."""
    n = max(1, int(cpus or 0))
    return ThreadPlan(cpus=n, opencv=n, onnx_intra_op=n, decoder=n, x264=n, blas=n)


def apply_thread_plan(plan: ThreadPlan) -> ThreadPlan:
    """Size this process's pools (OpenCV, OpenBLAS/OpenMP) and the environment its children
    inherit to `plan`, and make it `current()` for the pools created later."""
    global _applied, _blas_limits
    import cv2

    cv2.setNumThreads(plan.opencv)
    for name in THREAD_ENV:
        os.environ[name] = str(plan.blas)
    try:
        from threadpoolctl import threadpool_limits

        _blas_limits = threadpool_limits(limits=plan.blas)
    except ImportError:  # the environment above still sizes what loads later
        log.warning("threadpoolctl not installed: OpenBLAS/OpenMP already loaded keep their pools")
    _applied = plan
    return plan


def current() -> ThreadPlan | None:
    """The plan this process applied, None where none was (libraries keep their defaults)."""
    return _applied


def applied_threads() -> dict:
    """What this process's pools are really configured to, read back from the libraries:
    the plan, OpenCV's thread count and each BLAS/OpenMP library's (threadpoolctl)."""
    import cv2

    out: dict = {"plan": _applied.as_dict() if _applied else None, "opencv": cv2.getNumThreads()}
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = {f"{i['internal_api']}:{os.path.basename(i['filepath'])}": i["num_threads"]
                       for i in threadpool_info()}
    except ImportError:
        out["blas"] = None
    return out


def actor_thread_plan(assigned_cpus: float | None, enabled: bool = True) -> ThreadPlan | None:
    """Apply the plan for an actor with `assigned_cpus` Ray CPUs (`enabled`: Settings.size_threads)
    and return it; None (nothing changed) when disabled."""
    if not enabled:
        return None
    plan = apply_thread_plan(thread_plan(assigned_cpus))
    log.info("thread pools sized from %s Ray CPU(s): %s", assigned_cpus, plan.as_dict())
    return plan
