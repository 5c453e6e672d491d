"""Ray actors: thin shells that hold state (a loaded model, the job table) and call `cluster/`."""

ORCHESTRATOR_NAME = "lipsync-orchestrator"
#: The longest one `JobManager.wait` call holds (a client that waits longer calls again).
MAX_WAIT_S = 10.0


def task_cause(e: BaseException) -> BaseException:
    """The exception a remote task raised (a RayTaskError's `cause`), else `e` itself: our typed
    errors cross process boundaries as themselves, with code, stage and chunk intact."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


#: How long a call's cancellation by Ray waits for its request's own (Serve cancels both; either comes first)
CANCELLATION_GRACE_S = 0.1


async def raise_if_cancelled(e: BaseException) -> None:
    """Raise `asyncio.CancelledError` where `e` is Ray's word that the awaited task was cancelled because this
    request was (Ray Serve cancels a request's asyncio task and its calls when its client goes away: a dropped
    event stream's `JobManager.wait`). Taken for the service's failure, it was an ERROR traceback ("unexpected
    error", and asyncio's "never retrieved" of the request's task) at about a fifth of the dropped streams. A
    call cancelled while this request is not (a callee's own cancellation) returns here: the caller's error
    path goes on with it, as before."""
    import asyncio

    from ray.exceptions import TaskCancelledError

    if not (isinstance(e, TaskCancelledError) or isinstance(task_cause(e), TaskCancelledError)):
        return
    task = asyncio.current_task()
    if task is not None and getattr(task, "cancelling", lambda: 0)():  # (Python 3.11+; else the grace below)
        raise asyncio.CancelledError(f"the request was cancelled: {type(e).__name__}") from None
    await asyncio.sleep(CANCELLATION_GRACE_S)  # the request's own cancellation, on its way, is raised here


def task_apart(coro):
    """An asyncio task of `coro` in a context of its own, not the caller's (asyncio copies the caller's): what
    outlives the request or the job that started it carries neither its log fields (a job's id on a pool probe's
    lines for good) nor Ray's task of that request (Ray cancels a cancelled request's calls: a read that every
    viewer shares went with the first one). (`create_task(context=)` is Python 3.11's.)"""
    import asyncio
    import contextvars

    return contextvars.Context().run(asyncio.ensure_future, coro)


#: The threads of `gcs_lookup` (made on first use)
_lookups = None
GCS_LOOKUP_THREADS = 4


async def gcs_lookup(fn, *args, timeout: float):
    """`fn(*args)`, a synchronous lookup in Ray's control store (`ray.get_actor`, a named actor's creation), in
    threads of its own, within `timeout` (asyncio.TimeoutError past it). On an event loop it held every request
    of the process (Ray lets one take 60 s while its GCS restarts); in the loop's default threads, lookups left
    waiting on such a GCS held the uploads, downloads and file moves that share them."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    global _lookups
    if _lookups is None:
        _lookups = ThreadPoolExecutor(GCS_LOOKUP_THREADS, thread_name_prefix="gcs-lookup")
    return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(_lookups, fn, *args), timeout)


def actor_restarted() -> bool:
    """Whether this actor's process is a restart of one that died (Ray's `was_current_actor_reconstructed`, whose
    own implementation reads a deprecated property: that warning, from `ray.runtime_context` only, is filtered once
    at import, not with a `catch_warnings` block, which swaps the process's filters and races other threads)."""
    import ray

    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _quiet_ray_deprecation() -> None:
    import warnings

    try:
        from ray.util.annotations import RayDeprecationWarning
    except ImportError:  # (another Ray: nothing to filter)
        return
    warnings.filterwarnings("ignore", category=RayDeprecationWarning, module="ray.runtime_context")


_quiet_ray_deprecation()
