"""Ray actors: thin shells that hold state (a loaded model, the job table) and call `cluster/`."""

ORCHESTRATOR_NAME = "lipsync-orchestrator"
#: The longest one `JobManager.wait` call holds (a client that waits longer calls again).
MAX_WAIT_S = 10.0


def task_cause(e: BaseException) -> BaseException:
    """The exception a remote task raised (a RayTaskError's `cause`), else `e` itself: our typed
    errors cross process boundaries as themselves, with code, stage and chunk intact."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


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
