"""Driver side of the cluster: join or start Ray, reach the job manager, submit and wait.

`Runtime.render(...)` is the Python API behind `lipsync render`; tests and benchmarks use it too.
Calls to the job manager survive its restart: they are retried until their deadline.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Callable

import ray

from actors import MAX_WAIT_S, ORCHESTRATOR_NAME
from actors.calls import Kind, outcome_sync
from cluster.config import Settings, get_settings
from cluster.errors import InputNotFound, LipsyncError, OutputVerificationError, RenderError, RenderTimeout
from cluster.inputs import is_upload_ref
from cluster.ports import port_in_use
from cluster.render import new_job_id
from cluster.schemas import JobState, JobStatus, RenderRequest, StoredInput

log = logging.getLogger("lipsync.runtime")


def embedded_cpus(settings: Settings) -> int:
    """The logical CPUs an embedded Ray declares: one more than this machine's cores, so the default
    pool has one compositor more than the cores left by the model workers (a compositor waits on
    the model and on its encoder part of the time: on 2 cores one compositor left about a fifth of
    the machine idle, and a second one rendered 17 % faster, docs/PERFORMANCE.md); and at least
    what the actors asked for need (one each), so `--workers 2` on a 2-core laptop runs,
    oversubscribed, instead of leaving the compositor unschedulable. Past four processes per core
    (`LIPSYNC_MODEL_WORKERS=50` on 2 cores) the machine cannot hold them: `PlacementError`, said
    before Ray starts (Serve's proxy, starved by 50 Python processes starting, died in a traceback)."""
    from cluster.errors import PlacementError

    cores = os.cpu_count() or 1
    asked = (settings.model_workers or 1) + (settings.compositors or 1)
    if asked > 4 * cores + 2:
        raise PlacementError(f"{settings.model_workers or 1} model worker(s) and {settings.compositors or 1} "
                             f"compositor(s) on this machine's {cores} cores: at most {4 * cores + 2} together "
                             f"(LIPSYNC_MODEL_WORKERS, LIPSYNC_COMPOSITORS; a bigger pool needs a Ray cluster)")
    return max(cores + 1, asked)


def connect(settings: Settings, address: str | None = None, num_cpus: int | None = None,
            num_gpus: int | None = None, temp_dir: str | None = None) -> bool:
    """Join `address` (or `RAY_ADDRESS`), else start an embedded Ray for this process (private
    to this machine and user, `start_embedded_ray`); True when it started an embedded Ray (the
    jobs of this run are then owned by this process).

    Ray 2.60 enables token authentication by default: an embedded Ray generates its token, and
    joining a cluster needs its token (`RAY_AUTH_TOKEN` or the token file), as Ray documents.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(namespace=settings.namespace, log_to_driver=False, include_dashboard=False)
    if address:
        _check_reachable(address, settings.actor_call_timeout_s)
        _enable_token_auth_when_available()
    try:
        if address:
            with from_an_empty_directory():
                ray.init(address=address, **kwargs)
        else:
            start_embedded_ray(settings, num_cpus=num_cpus, num_gpus=num_gpus, job_only=True, temp_dir=temp_dir)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:  # (RayError: a token missing)
        where = f"the Ray cluster at {address}" if address else "an embedded Ray"
        hint = " (a cluster with token authentication also needs its token: RAY_AUTH_TOKEN)" if address else ""
        raise RenderError(f"cannot start or join {where}: {e}{hint}", stage="connect", cause=repr(e)) from e
    return not address


#: Set while an embedded Ray starts, for the processes it starts (they inherit them).
EMBEDDED_RAY_ENV = {
    # Ray's own local-only mode (what it does on macOS and Windows): the node's IP is 127.0.0.1,
    # so the GCS, the raylet, the core workers' gRPC servers, the dashboard agent (gRPC, HTTP,
    # metrics) and the runtime-env agent bind to loopback. Ray turns ray.init(_node_ip_address=
    # "127.0.0.1") back into the machine's address (services.resolve_ip_for_localhost), so the
    # address alone cannot do it; without a cluster, get_node_ip_address returns the loopback IP.
    # (Serve replicas' own gRPC server: actors.service_support.keep_replica_grpc_on_loopback.)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Serve's shutdown waits: per tier of deployments (30 s) and per proxy (5 s); a stopping
    # service gives them `SERVE_STOP_BUDGET_S` in all (cluster/cli.py's serve, stop_service).
    "RAY_SERVE_SHUTDOWN_TIER_TIMEOUT_S": "2",
    "RAY_SERVE_PROXY_GRACEFUL_SHUTDOWN_TIMEOUT_S": "1",
}
#: Ray system settings of an embedded Ray (`ray.init(_system_config=...)`; a joined cluster keeps its own):
EMBEDDED_RAY_SYSTEM_CONFIG = {
    # Ray starts one idle task worker per CPU for the first driver; every process of ours is an
    # actor with its own worker, so on a 16-core node that was 16 Python processes booting beside
    # the actors (one-shot `lipsync render` start-up, issue 19) for nothing.
    "prestart_worker_first_driver": False,
    # The GCS keeps the events of the last N tasks for the dashboard (100000 by default, ~6-10 KiB
    # each for our calls: an hour-long job grew the GCS by hundreds of MiB, docs/PERFORMANCE.md).
    "task_events_max_num_task_in_gcs": 10000,
}


#: Ray head processes an embedded Ray started for jobs (`connect`: `lipsync render`, `lipsync demo`,
#: a driver of the Python API) goes without, as `ray._private.parameter.RayParams` names them: the
#: autoscaler's monitor (one node, nothing to scale) and the log monitor (it sends the workers' output
#: to the drivers, and ours ask for none: `log_to_driver=False`; the log files are written as before).
#: Together they cost this machine's Ray start 1.0 s of its 3.5 s and 1 s of CPU (issue 19, one-shot
#: start-up; docs/PERFORMANCE.md). `lipsync serve` keeps Ray's whole set.
JOB_ONLY_RAY_PARAMS = {"no_monitor": True, "include_log_monitor": False}

STARTUP_ATTEMPTS = 3


@contextlib.contextmanager
def _ray_params_for_jobs():
    """While ray.init runs in this block, the node it starts gets `JOB_ONLY_RAY_PARAMS` (ray.init
    passes no such options through). A Ray whose RayParams lacks one of them is left to its
    defaults for that one, with a warning (the test of the processes then fails)."""
    import inspect

    from ray._private import parameter

    init = parameter.RayParams.__init__
    known = inspect.signature(init).parameters
    applied = {k: v for k, v in JOB_ONLY_RAY_PARAMS.items() if k in known}
    if len(applied) < len(JOB_ONLY_RAY_PARAMS):
        log.warning("this Ray's node parameters lack %s: Ray starts those processes",
                    sorted(set(JOB_ONLY_RAY_PARAMS) - set(applied)))

    def for_jobs(self, *args, **kwargs):
        init(self, *args, **{**kwargs, **applied})

    parameter.RayParams.__init__ = for_jobs
    try:
        yield
    finally:
        parameter.RayParams.__init__ = init


def start_embedded_ray(settings: Settings, *, num_cpus: int | None = None, num_gpus: int | None = None,
                       include_dashboard: bool = False, dashboard_port: int | None = None,
                       temp_dir: str | None = None, keep_signal_handlers: bool = False, job_only: bool = False,
                       metrics_port: int | None = None):
    """Start this process's own Ray (`address="local"`: never a cluster another `ray start` on
    this machine registered in /tmp/ray), private to this machine and this user:

    - every socket of its processes on loopback (`EMBEDDED_RAY_ENV`), the dashboard too;
    - its token file (Ray's `RAY_AUTH_TOKEN_PATH`, else ~/.ray/auth_token) created here with mode
      0600 in a 0700 directory, or an existing one tightened to that (`private_token_file`);
    - its session directories (sockets, logs) inside a directory of mode 0700 (`private_ray_root`).

    `keep_signal_handlers`: the SIGTERM/SIGINT handlers installed now stay in force throughout
    the start (`lipsync serve` installs its own first): ray.init replaces SIGTERM's with one of
    its own, and the driver's C++ core worker installs a failure handler that dumps a stack and
    aborts on SIGTERM ("*** SIGTERM received"); a signal in that window killed the service.
    `job_only`: without the head processes that jobs do not use (`JOB_ONLY_RAY_PARAMS`).
    `metrics_port`: the port its node exports Prometheus metrics on (on loopback), else one Ray picks.
    Returns ray.init's context."""
    import ray._private.ray_constants as ray_constants

    private_token_file()
    if not os.environ.get("RAY_AUTH_MODE"):
        # Ray's own default for a new local cluster, said here: left to Ray, every start printed "Token
        # authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out" to the user of `lipsync demo`
        token_mode_on()
    root = private_ray_root(temp_dir)
    # Ray starts from an empty directory of ours (`from_an_empty_directory`); relative paths the settings
    # name are made absolute first, for the processes it starts.
    absolute_path_variables()
    # The driver's own C++ failure handler off (Ray's documented switch, read by ray.init from this
    # constant): a SIGTERM reaches Python's handler; Ray's other processes keep theirs.
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    saved_env = {k: os.environ.get(k) for k in EMBEDDED_RAY_ENV}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(EMBEDDED_RAY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable when it imported Ray
    handlers = _SignalHandlersKept() if keep_signal_handlers else contextlib.nullcontext()
    params = _ray_params_for_jobs() if job_only else contextlib.nullcontext()
    try:
        with from_an_empty_directory(root.parent), handlers, params:
            for attempt in range(1, STARTUP_ATTEMPTS + 1):
                try:
                    # a one-shot's user sees its own lines, not Ray's "Started a local Ray instance" (-v: both)
                    quiet = job_only and not log.isEnabledFor(logging.INFO)
                    ctx = ray.init(address="local", namespace=settings.namespace, log_to_driver=False,
                                   logging_level=logging.WARNING if quiet else logging.INFO,
                                   num_cpus=num_cpus or embedded_cpus(settings), num_gpus=num_gpus,
                                   include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
                                   dashboard_port=dashboard_port, _temp_dir=str(root),
                                   _metrics_export_port=metrics_port,
                                   _system_config=EMBEDDED_RAY_SYSTEM_CONFIG)
                    break
                except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this one
                    # Ray gives its raylet a fixed 30 s to register (ray/_private/node.py,
                    # `raylet_start_wait_time_s = 30`): an overloaded machine misses it; start again.
                    if "timed out during startup" not in str(e):
                        raise
                    if attempt == STARTUP_ATTEMPTS:
                        raise RuntimeError(f"{e} ({attempt} attempts)") from e
                    log.warning("Ray's start timed out (attempt %d of %d, the machine is overloaded): again",
                                attempt, STARTUP_ATTEMPTS)
                    ray.shutdown()
                    # the ports asked for, held by the timed-out start's processes a few seconds more (its dashboard
                    # still going: the next start was refused "Failed to bind to 127.0.0.1:N ... already occupied")
                    for port in (dashboard_port if include_dashboard else None, metrics_port):
                        if port:
                            port_in_use("127.0.0.1", port)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


#: Settings that name files or directories, as environment variables (`absolute_path_variables`)
PATH_VARIABLES = ("LIPSYNC_STORAGE_ROOT", "LIPSYNC_MODEL", "LIPSYNC_COMPAT_DATA_DIR", "LIPSYNC_FFMPEG",
                  "LIPSYNC_INPUT_ROOTS")


def absolute_path_variables() -> None:
    """The `PATH_VARIABLES` set in this process's environment, relative to its working directory, made
    absolute as `Settings` makes them (for processes started elsewhere: an embedded Ray's run in a
    directory of their own). Left as they are: a model's name (`builtin`, `latency:...`), an ffmpeg
    without a directory (looked up on PATH)."""
    from cluster.config import absolute_path
    from cluster.schemas import is_named_model

    for name in PATH_VARIABLES:
        value = os.environ.get(name)
        if not value or not value.strip():
            continue
        if name == "LIPSYNC_INPUT_ROOTS":
            os.environ[name] = ":".join(absolute_path(p) if p.strip() else p for p in value.split(":"))
        elif (name == "LIPSYNC_MODEL" and is_named_model(value)) or \
                (name == "LIPSYNC_FFMPEG" and os.sep not in value and not value.startswith("~")):
            continue
        else:
            os.environ[name] = absolute_path(value)


@contextlib.contextmanager
def from_an_empty_directory(parent: Path | None = None):
    """Run the block (a `ray.init`) in `workdir`, an empty directory of this user's under `parent` (by default
    the one `private_ray_root` uses), then back where this process was. Ray puts its driver's working
    directory on the module path of every worker of its job, and a detached actor (a joined cluster's job
    manager) keeps it for its life: a file there named like a module the service imports (an `av.py` or
    `actors.py` of the user's, even one written after the start) ran in the service in its place, and a
    job manager that failed to import restarted without end."""
    try:
        here = os.getcwd()
    except FileNotFoundError:  # started in a directory since removed
        here = None
    try:
        parent = parent if parent is not None else private_ray_root().parent
        workdir = parent / "workdir"
        _private_dir(workdir)
        os.chdir(workdir)
    except (OSError, RenderError) as e:  # (no such directory to be had here: Ray starts where this process is)
        log.warning("Ray starts from this process's directory (%s), which its workers then import from: %s",
                    here or "removed", e)
        yield None
        return
    try:
        yield workdir
    finally:
        if here is not None:
            os.chdir(here)


def private_ray_root(temp_dir: str | None = None) -> Path:
    """Where an embedded Ray keeps its files (sessions: sockets, logs): `ray/` inside a directory
    of this user's with mode 0700, `temp_dir` or `lipsync-UID` in the system's temporary
    directory (Ray's RAY_TMPDIR, TMPDIR, else /tmp). Ray makes its own root and session
    directories 0777 (ray/_common/utils.py, `try_make_directory_shared`:
    `os.chmod(directory_path, 0o0777)`), again in every worker process it starts, so the privacy
    comes from the directory above, which Ray never touches. Raises `RenderError` when that
    directory belongs to another user."""
    if temp_dir:
        parent = Path(temp_dir).expanduser().absolute()
    else:
        from ray._common.utils import get_default_system_temp_dir

        parent = Path(get_default_system_temp_dir()) / f"lipsync-{os.getuid()}"
    _private_dir(parent)
    if parent.stat().st_uid != os.getuid():
        raise RenderError(f"{parent} (for Ray's session files) belongs to another user: pass --ray-temp-dir "
                          f"with a directory of your own", stage="connect", path=str(parent))
    return parent / "ray"


class _SignalHandlersKept:
    """Keep this process's SIGTERM/SIGINT handlers through ray.init: Ray's own is not installed
    (ray.init calls `ray._private.utils.set_sigterm_handler` first thing), and the handlers are
    put back afterwards in case anything else replaced them."""

    def __enter__(self):
        import signal

        import ray._private.utils as ray_utils

        self.saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.ray_utils, self.ray_setter = ray_utils, ray_utils.set_sigterm_handler
        ray_utils.set_sigterm_handler = lambda handler: None
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self.ray_utils.set_sigterm_handler = self.ray_setter
        for sig, handler in self.saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _private_dir(path: Path) -> None:
    """`path` exists with mode 0700 (created so, or tightened when it is ours)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)


def private_token_file() -> Path | None:
    """The Ray token file an embedded Ray will use, private: created here (Ray's own token format)
    with mode 0600 in a 0700 directory when missing, tightened when it exists with wider modes
    (Ray itself writes ~/.ray/auth_token with the umask's 0644: readable by every local user,
    who could then run code in the cluster). None when no file is involved (`RAY_AUTH_TOKEN`
    set, or token authentication disabled)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    _private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return path
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())
    try:  # Ray caches whether it found a token
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass
    log.info("created Ray's token file %s (mode 0600)", path)
    return path


def stop_embedded() -> None:
    """Stop the embedded Ray this process started (`connect` returned True): its processes go,
    with their workers; detached actors of ours go with them (their jobs resume or end
    `job.abandoned` on the next start, see `cluster.owners`)."""
    ray.shutdown()


#: The embedded Ray's processes without which nothing of it works (`embedded_ray_lost`)
VITAL_RAY_PROCESSES = ("raylet", "gcs_server")


def embedded_ray_lost() -> str | None:
    """Which vital process of the embedded Ray this process started has died (e.g. `raylet (pid
    4242)`), else None. Its raylet SIGKILLed, the service kept running and answered nothing (an
    orphaned Serve proxy held the port); its GCS, Ray ended the process 60 s later without a word."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    try:
        dead = [(kind, proc.pid) for kind, proc in node.dead_processes() if kind in VITAL_RAY_PROCESSES]
    except Exception:  # noqa: BLE001 - Ray's own bookkeeping: a check that cannot run says nothing
        return None
    return ", ".join(f"{kind} (pid {pid})" for kind, pid in dead) or None


#: Set in the environment of a process that starts an embedded Ray (`mark_embedded_ray_owner`): every
#: process of that Ray inherits it (its raylet, GCS, workers: each its own process group), and
#: `kill_embedded_ray` finds them by it. (Not LIPSYNC_*: the settings would read it.)
RAY_OWNER_VARIABLE = "OWNER_PID_OF_LIPSYNC_RAY"


@contextlib.contextmanager
def embedded_ray_owner_mark():
    """While an embedded Ray starts, its processes inherit a mark of this process (`RAY_OWNER_VARIABLE`:
    its pid and a random token, so neither a reused pid nor another pid namespace matches); yields the
    mark for `kill_embedded_ray`. The mark is this process's only while its Ray starts: its raylet
    passes it on to the workers it starts later, and no other child of this process carries it."""
    import uuid

    mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    before = os.environ.get(RAY_OWNER_VARIABLE)
    os.environ[RAY_OWNER_VARIABLE] = mark
    try:
        yield mark
    finally:
        if before is None:
            os.environ.pop(RAY_OWNER_VARIABLE, None)
        else:
            os.environ[RAY_OWNER_VARIABLE] = before


def kill_embedded_ray(mark: str, session_dir: str | None = None) -> int:
    """SIGKILL what is left of the embedded Ray started under `mark` (`embedded_ray_owner_mark`) once a
    vital process of it died (`ray.shutdown` waits on a GCS that is gone): its workers and actors outlive
    a dead raylet, an orphaned Serve proxy still holding the API's port. A process of it carries the mark
    in its environment or holds a file open in that Ray's session directory (`session_dir`, by default
    the one of the Ray this process started): its logs (a Ray agent's new title can wipe the block its
    environment is read from, and its mark with it). Never this process; never another service's Ray;
    only this user's processes. Returns how many."""
    import psutil

    if session_dir is None:
        node = getattr(ray._private.worker, "_global_node", None)
        session_dir = node.get_session_dir_path() if node is not None else None
    me, uid, killed = os.getpid(), os.getuid(), 0
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.pid != me and proc.info["uids"].real == uid and (
                    _carries(proc, RAY_OWNER_VARIABLE, mark) or _holds_file_in(proc, session_dir)):
                proc.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


def _holds_file_in(proc, directory: str | None) -> bool:
    """Whether `proc`, a Ray process (`ray::...`, or a command of Ray's package), has a file open under
    `directory` (a user's `tail -f` of a log there is not one)."""
    if not directory:
        return False
    command = proc.cmdline()
    if not (command and command[0].startswith("ray::") or _runs_from(command, _ray_package_dir())):
        return False
    prefix = os.path.join(os.path.realpath(directory), "")
    return any(f.path.startswith(prefix) for f in proc.open_files())


def _ray_package_dir() -> str:
    return os.path.join(os.path.dirname(os.path.realpath(ray.__file__)), "")


def _runs_from(command: list[str], directory: str) -> bool:
    """Whether a command's program (its first word, or an interpreter's script: its first word after the
    interpreter's options, as in `python -u .../monitor.py`) lies in `directory` (the session directory's own
    path, under Ray's `.../ray/`, names none of them)."""
    script = next((word for word in command[1:] if not word.startswith("-")), None)
    return any(os.path.realpath(word).startswith(directory) for word in (*command[:1], script)
               if word and os.path.isabs(word))


def _carries(proc, variable: str, value: str) -> bool:
    """Whether `variable=value` is in the environment `proc` started with. Read from /proc as it is: a
    Ray process that set a long title (its agents, `ray::IDLE`) wrote NULs over the start of that block,
    where psutil's `environ()` stops and answers nothing."""
    try:
        with open(f"/proc/{proc.pid}/environ", "rb") as f:
            block = f.read()
    except FileNotFoundError:  # no /proc (not Linux)
        return proc.environ().get(variable) == value
    return f"{variable}={value}".encode() in block.split(b"\0")


def ray_token_source() -> str | None:
    """Where a Ray token is available to this process (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or
    Ray's token file ~/.ray/auth_token), else None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and Path(path).is_file():
            return path
    return None


def _enable_token_auth_when_available() -> None:
    """Join a cluster as Ray documents it: a cluster started with `ray start --head` uses token
    authentication by default, so when a token is available and RAY_AUTH_MODE is unset, turn
    token mode on here (the user need not know to set RAY_AUTH_MODE=token); say so when none is."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    source = ray_token_source()
    if source is None:
        log.warning("no Ray token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): joining a "
                    "cluster that uses token authentication (on by default in Ray 2.60) will fail")
        return
    token_mode_on()
    log.info("joining with Ray token authentication (token from %s)", source)


def token_mode_on() -> None:
    """RAY_AUTH_MODE=token in this process and the processes it starts, as Ray itself turns it on."""
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import: refresh it as Ray itself does when it turns token mode on
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:
        pass
    else:
        _enable_token_auth()


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast, with the address in the message, when nothing listens at a host:port address
    (ray.init itself keeps retrying such an address for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout, 10.0)).close()
    except OSError as e:
        raise RenderError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS): {e}", stage="connect",
                          cause=repr(e)) from e


class Runtime:
    """A handle on the cluster's job manager (created on first use, named and detached).

    `owner`: who runs the job manager this handle creates: None for a cluster deployment (its
    jobs resume after a restart), or `cluster.owners.process_identity()` for an embedded run
    (its jobs end `job.abandoned` when this process is gone).
    """

    def __init__(self, settings: Settings | None = None, owner: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.owner = owner

    def manager(self):
        from actors.orchestrator import create_job_manager

        try:
            return ray.get_actor(ORCHESTRATOR_NAME, namespace=self.settings.namespace)
        except ValueError:
            return create_job_manager(self.settings, self.owner)

    def call(self, method: str, *args, timeout: float | None = None, **kwargs):
        """Call the job manager, retrying while it restarts, until `timeout` (default actor_call_timeout_s)."""
        deadline = time.monotonic() + (timeout or self.settings.actor_call_timeout_s)
        while True:
            answer = outcome_sync(getattr(self.manager(), method).remote(*args, **kwargs),
                                  timeout=max(deadline - time.monotonic(), 0.1))
            if answer.ok:
                return answer.value
            if answer.kind == Kind.raised:  # the manager raised: surface our typed error as itself
                if isinstance(answer.cause, LipsyncError):
                    raise answer.cause from None
                raise answer.error
            if answer.kind == Kind.lost or time.monotonic() >= deadline:
                raise RenderTimeout(f"the job manager did not answer {method} within the deadline: "
                                    f"{answer.describe('the job manager', method)}",
                                    cause=str(answer.error)[:2000]) from answer.error
            time.sleep(0.5)

    def ready(self, timeout: float = 120.0) -> dict:
        return self.call("ready", timeout, timeout=timeout + 5)

    # --- bytes through Ray -------------------------------------------------------------------
    def upload(self, path: str | os.PathLike) -> StoredInput:
        """Send a local file to the job manager in parts; its content-addressed reference."""
        path = Path(path)
        part = self.settings.transfer_part_bytes
        digest = hashlib.sha256()
        try:
            f = open(path, "rb")
        except OSError as e:
            raise InputNotFound(f"input file {path} cannot be read: {e.strerror}", path=str(path)) from e
        upload_id = self.call("upload_begin", path.name)
        try:
            with f:
                offset = 0
                while data := f.read(part):
                    digest.update(data)
                    self.call("upload_part", upload_id, data, offset,
                              timeout=max(60.0, self.settings.actor_call_timeout_s))
                    offset += len(data)
            return self.call("upload_finish", upload_id, digest.hexdigest(), timeout=120.0)
        except BaseException:
            try:
                self.call("upload_abort", upload_id)
            except LipsyncError as e:
                log.warning("upload_abort %s: %s", upload_id, e)
            raise

    def download_output(self, job_id: str, dest: str | os.PathLike) -> Path:
        """Fetch a succeeded job's output to `dest` (atomic: a temporary in dest's directory,
        renamed once every byte arrived and the length is verified)."""
        from cluster.fsutil import atomic_writer

        st = self.status(job_id)
        dest = Path(dest).expanduser().resolve()
        part = self.settings.transfer_part_bytes
        received = 0
        with atomic_writer(dest) as f:
            while True:
                data = self.call("read_output", job_id, received, part,
                                 timeout=max(60.0, self.settings.actor_call_timeout_s))
                if not data:
                    break
                f.write(data)
                received += len(data)
            if st.output_bytes is not None and received != st.output_bytes:
                raise OutputVerificationError(f"job {job_id}: received {received} bytes of its output, expected "
                                              f"{st.output_bytes}", job_id=job_id, path=str(dest))
        return dest

    # --- jobs --------------------------------------------------------------------------------
    def upload_request(self, request: RenderRequest) -> RenderRequest:
        """The request with each local input file uploaded and replaced by its reference."""
        update, sources = {}, dict(request.sources)
        for key in ("audio", "video"):
            value = getattr(request, key)
            if value is None or is_upload_ref(value):
                continue
            stored = self.upload(value)
            update[key] = stored.ref
            sources[stored.ref] = value
        return request.model_copy(update={**update, "sources": sources})

    def submit(self, request: RenderRequest, job_id: str | None = None, upload: bool = True) -> JobStatus:
        """Send the inputs (unless `upload` is False: then they are paths under the manager's
        input_roots) and hand the job to the manager, which admits it (typed errors for bad input)."""
        job_id = job_id or new_job_id()
        if upload:
            request = self.upload_request(request)
        return self.call("submit", job_id, request, self.owner, timeout=max(120.0, self.settings.actor_call_timeout_s))

    def status(self, job_id: str) -> JobStatus:
        return self.call("get", job_id)

    def cancel(self, job_id: str) -> JobStatus:
        return self.call("cancel", job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.25,
             on_status: Callable[[JobStatus], None] | None = None) -> JobStatus:
        """Wait until the job is terminal (the manager answers as soon as it ends); raises
        RenderTimeout past `timeout` (default job_timeout_s). `on_status` gets the status at least
        every `poll_s` seconds while the job runs, and its final one."""
        deadline = time.monotonic() + (timeout or self.settings.job_timeout_s)
        while True:
            window = max(0.0, min(poll_s if on_status is not None else MAX_WAIT_S, deadline - time.monotonic()))
            st = self.call("wait", job_id, window,
                           timeout=window + max(self.settings.actor_call_timeout_s, 60.0))
            if on_status is not None:
                on_status(st)
            if st.state.terminal:
                return st
            if time.monotonic() > deadline:
                raise RenderTimeout(f"job {job_id} still {st.state.value} after the deadline", job_id=job_id)

    def render(self, request: RenderRequest, timeout: float | None = None,
               on_status: Callable[[JobStatus], None] | None = None) -> JobStatus:
        """Submit, wait, and (when the request names an output) fetch the output there; the
        returned status then names that local file as `output`."""
        st = self.wait(self.submit(request).id, timeout=timeout, on_status=on_status)
        if st.state == JobState.succeeded and request.output:
            st.output = str(self.download_output(st.id, request.output))
        return st

    def workers(self) -> dict:
        return self.call("workers")
