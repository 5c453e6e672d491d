"""`lipsync serve`: start (or join) Ray, the job manager and the Serve app (`service.deployment`) on one
port, and take them down again. The CLI's `serve` command calls these."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable

import ray

from cluster.config import Settings
from cluster.errors import RenderError

log = logging.getLogger("lipsync.service")


class _DropLine(logging.Filter):
    """Drops the log records whose message holds `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def start_service(settings: Settings, host: str, port: int, *, address: str | None = None,
                  num_cpus: int | None = None, num_gpus: int | None = None, dashboard: bool = False,
                  dashboard_port: int | None = None, ray_temp_dir: str | None = None,
                  metrics_port: int | None = None, ready_timeout_s: float = 300.0,
                  on_ray_started: Callable[[], None] | None = None,
                  stop: threading.Event | None = None, port_busy: str | None = None) -> dict:
    """Start (or join) Ray, the job manager and the Serve app on host:port; the URLs, when ready.
    `port_busy`: why host:port could not be listened on before a joined cluster's Ray was reached (its
    own Serve may hold it: `_check_joined_serve`).

    `on_ray_started` runs as soon as Ray is up (e.g. to install signal handlers: Ray's own
    replaces any installed before). When `stop` is set meanwhile, the start ends early with
    `ready: False`; the caller then takes down what was started (`stop_service`)."""
    global _deployed
    from ray import serve

    from actors.runtime import (
        Runtime,
        _check_reachable,
        _enable_token_auth_when_available,
        _SignalHandlersKept,
        from_an_empty_directory,
        start_embedded_ray,
    )
    from actors.service_support import service_sidecar
    from service.deployment import build_app

    address = address or os.environ.get("RAY_ADDRESS") or None
    _deployed = False  # (this start's own; a stop after it deletes only an application it deployed)
    try:
        if address:
            _check_reachable(address, settings.actor_call_timeout_s)
            _enable_token_auth_when_available()  # (as `lipsync render` joins: a token given is a token used)
            # (SIGTERM while the service starts stops it cleanly, as embedded; started from an empty directory: a
            # file where the user started it, named like one of our modules, is not imported by its actors)
            with _SignalHandlersKept(), from_an_empty_directory():
                ctx = ray.init(address=address, namespace=settings.namespace, log_to_driver=False)
        else:  # private: loopback only, token and session directory 0600/0700; our signal handlers kept
            ctx = start_embedded_ray(settings, num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard,
                                     dashboard_port=dashboard_port, temp_dir=ray_temp_dir,
                                     keep_signal_handlers=True, metrics_port=metrics_port)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:  # (RayError: a token missing)
        hint = " (a cluster with token authentication also needs its token: RAY_AUTH_TOKEN)" if address else ""
        raise RenderError(f"cannot start or join Ray: {e}{hint}", stage="connect", cause=repr(e)) from e
    if on_ray_started is not None:
        on_ray_started()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    dash = getattr(ctx, "dashboard_url", None) or ""
    urls = {"api": url, "docs": url + "/docs", "dashboard": f"http://{dash}" if dash else None,
            "embedded": not address, "ready": False}
    stopped = lambda: stop is not None and stop.is_set()  # noqa: E731
    if stopped():  # asked to stop while Ray started: boot nothing more (no pool started only to be stopped)
        return urls
    if address:  # what of a service runs on the cluster already (a detached job manager, Serve) is reused,
        _check_joined_serve(address, host, port, port_busy, settings, stop)
        replace_other_code(settings)  # but a job manager and pool that another code (an earlier version) left there
    rt = Runtime(settings)
    rt.manager()  # the named job manager exists before the first request; it resumes unfinished jobs
    if address:
        _check_joined_manager(rt, settings)
    service_sidecar(settings)  # resumes pending callbacks
    if stopped():
        return urls
    # serve.start on a cluster whose Serve runs, and serve.run after serve.start, say "New http_options ...
    # will not be applied" although they were (the same ones: `_check_joined_serve`): an operator reads it
    # as a failure
    quiet = _DropLine("New http_options/controller_options will not be applied")
    logging.getLogger("ray.serve").addFilter(quiet)
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
        except ray.exceptions.RayActorError as e:
            # Serve's controller killed a proxy that missed its readiness checks (an overloaded machine: this
            # was a traceback and the end of the start); it starts another, which the readiness wait below
            # waits for, within its deadline
            log.warning("Ray Serve's HTTP proxy died while it started (%s); waiting for the one Serve starts "
                        "instead", str(e).splitlines()[0])
        overrides = settings.overrides()  # secrets as their values
        if stopped():
            return urls
        if address:  # again just before deploying: another service's start may have deployed meanwhile
            _check_no_running_app(_serve_client(settings), address, settings, stop, host=host, port=port)
            if stopped():
                return urls
        _deployed = True  # (from here a stop deletes the application: it may be half deployed)
        serve.run(build_app(overrides), name=APP_NAME, route_prefix="/", blocking=False)
        if address:
            _record_deployer(settings, host, port)
    finally:
        logging.getLogger("ray.serve").removeFilter(quiet)
    deadline = time.monotonic() + ready_timeout_s
    while not stopped():
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:  # noqa: S310 (our own loopback URL)
                if r.status == 200:
                    return {**urls, "ready": True}
        except OSError as e:
            if time.monotonic() > deadline:
                raise RenderError(f"the service did not answer on {url} within {ready_timeout_s:.0f} s: {e}",
                                  stage="serve") from e
        time.sleep(0.3)
    return urls


def _within(call: Callable, timeout_s: float, what: str, who: str = "Ray Serve's controller",
            on_late: Callable[[], None] | None = None):
    """`call()`'s answer (or its exception), or RenderError once it has not come within `timeout_s` (Ray
    Serve's client asks its controller with `ray.get` and no deadline: a controller that does not answer
    hung the start). `on_late`: run once the deadline has passed (e.g. kill what the call waits on), then
    the call gets `timeout_s` more."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    asking = threading.Thread(target=run, name=f"serve-{what}", daemon=True)
    asking.start()
    asking.join(timeout_s)
    if asking.is_alive() and on_late is not None:
        on_late()
        asking.join(timeout_s)
    if asking.is_alive():
        raise RenderError(f"{who} did not answer ({what}) within {timeout_s:g} s", stage="serve")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _serve_client(settings: Settings):
    """The cluster's Serve controller client, None where Serve does not run there (within a call's deadline)."""
    from ray.serve.context import _get_global_client

    return _within(lambda: _get_global_client(raise_if_no_controller_running=False), settings.actor_call_timeout_s,
                   "its client")


def _check_joined_serve(address: str, host: str, port: int, port_busy: str | None, settings: Settings,
                        stop: threading.Event | None = None) -> None:
    """On a joined cluster: Ray Serve, once started there, keeps its HTTP proxies' host and port (a
    later start with others is ignored: the service said it was ready on a port nothing listened on).
    `ServiceInUse` when it runs with others; `port_busy` (why the port could not be listened on, said
    before Ray started) is then a problem only where no Serve of the cluster is what holds it (and the
    port is waited for then, up to `PORT_WAIT_S`, as before an embedded start)."""
    from cluster.errors import PortInUse, ServiceInUse
    from cluster.ports import PORT_WAIT_S, port_in_use

    client = _serve_client(settings)
    http = getattr(client, "http_config", None) if client is not None else None
    if client is not None:
        _check_no_running_app(client, address, settings, stop, host=host, port=port)
    if http is not None and (int(http.port) != int(port) or str(http.host) != str(host)):
        raise ServiceInUse(f"Ray Serve already runs on the cluster at {address} with its HTTP proxies on "
                           f"{http.host}:{http.port}, which it keeps (this service asked for {host}:{port}): start "
                           f"it with --host {http.host} --port {http.port}, or stop Serve there first (`serve "
                           f"shutdown`, which stops every Serve application of the cluster)", stage="serve")
    if http is None and port_busy:  # not Serve's: waited for now as before an embedded start (said before Ray)
        problem = port_in_use(host, port, wait_s=PORT_WAIT_S)
        if problem:
            raise PortInUse.at(host, port, problem).with_context(stage="serve")


#: The Serve application of the service (one per cluster: the HTTP proxies and the route `/` are shared)
APP_NAME = "lipsync"
#: Whether this process deployed the application (a joined cluster's stop deletes only its own)
_deployed = False
#: How long a joined start waits for the app a stopped service deleted to be gone
APP_DELETED_WAIT_S = 60.0


def _check_no_running_app(client, address: str, settings: Settings, stop: threading.Event | None = None,
                          host: str | None = None, port: int | None = None) -> None:
    """On a joined cluster: the Serve application `lipsync` outlives the `lipsync serve` that deployed
    it (a SIGKILL, another operator's service): a second one deploying over it, then stopping, left the
    first running with its API gone (404). `ServiceInUse` while it runs, unless the `lipsync serve` that
    deployed it is gone and served the same `host`, `port` and storage root (`_deployer_gone`: a crashed
    service restarted by its supervisor takes its application over; it was refused, exit 2, which a
    supervisor does not restart); one being deleted (the service stopped just before) is waited for,
    unless `stop` is set meanwhile (the caller then ends its start)."""
    from cluster.errors import ServiceInUse

    if client is None:
        return
    deadline = time.monotonic() + APP_DELETED_WAIT_S
    while stop is None or not stop.is_set():
        status_of_app = _within(lambda: client.get_serve_status(APP_NAME), settings.actor_call_timeout_s,
                                "the application's status").app_status
        status = status_of_app.status
        state = str(getattr(status, "value", status))  # NOT_STARTED: no such application
        if state == "NOT_STARTED":
            return
        gone, why = None, ""
        if state != "DELETING" and host is not None:
            gone, why = _deployer_gone(settings, host, port, getattr(status_of_app, "deployment_timestamp", None))
        if gone is not None:
            if gone["job_id"] in _taken_over:  # (checked again just before deploying: said once)
                return
            _taken_over.add(gone["job_id"])
            log.warning("the Ray Serve application %r on the cluster at %s was deployed by a lipsync serve that is "
                        "gone (Ray job %s, driver pid %s at %s) for the same host, port and storage root: this "
                        "service takes it over", APP_NAME, address, gone["job_id"], gone.get("driver_pid"),
                        gone.get("driver_ip"))
            return
        if state != "DELETING":
            raise ServiceInUse(f"a lipsync service already runs on the cluster at {address} (its Ray Serve "
                               f"application {APP_NAME!r} is {state}{'; not taken over: ' + why if why else ''}): "
                               f"stop that `lipsync serve` first; if its process is gone, a start with the host, port "
                               f"and LIPSYNC_STORAGE_ROOT it served takes the application over, or stop the "
                               f"application with `serve shutdown` (every Serve application of the cluster) or, from "
                               f"Python, `ray.serve.delete({APP_NAME!r})`",
                               stage="serve")
        if time.monotonic() > deadline:
            raise ServiceInUse(f"the Ray Serve application {APP_NAME!r} on the cluster at {address} is still being "
                               f"deleted after {APP_DELETED_WAIT_S:.0f} s: try again later", stage="serve")
        time.sleep(0.5)


#: The Ray jobs of gone services whose application this process took over (`_check_no_running_app`)
_taken_over: set[str] = set()
#: Ray's internal KV key of the `lipsync serve` that deployed a namespace's application (`_record_deployer`)
DEPLOYER_KEY = "lipsync-service-deployer:{namespace}"


def _record_deployer(settings: Settings, host: str, port: int) -> None:
    """On a joined cluster, once deployed: which `lipsync serve` deployed the application (its Ray job), for what
    (host, port, storage root) and when (the application's deployment timestamp, which a later deployment by any
    means changes), in the GCS's KV store, for `_deployer_gone`. Where it cannot be written (said in the log),
    the record of an earlier deployment is left, and matches no later one: a restart after a crash is then
    refused as before."""
    from ray.experimental.internal_kv import _internal_kv_put
    from ray.serve.context import _get_global_client

    def write() -> None:
        deployed_at = _get_global_client().get_serve_status(APP_NAME).app_status.deployment_timestamp
        _internal_kv_put(DEPLOYER_KEY.format(namespace=settings.namespace), json.dumps(
            {"job_id": ray.get_runtime_context().get_job_id(), "host": host, "port": int(port),
             "storage_root": str(settings.storage_root), "deployed_at": deployed_at}), overwrite=True)

    try:
        _within(write, settings.actor_call_timeout_s, "the service's record", who="Ray's GCS")
    except Exception as e:  # noqa: BLE001 - the service runs; only a takeover after a crash is lost
        log.warning("could not record this service in the cluster's GCS (a restart after a crash will be refused "
                    "as service.in_use): %r", e)


def _forget_deployer(settings: Settings) -> None:
    """The record of this service's deployment, deleted with its application (best effort: a record left
    matches no later deployment)."""
    from ray.experimental.internal_kv import _internal_kv_del

    try:
        _within(lambda: _internal_kv_del(DEPLOYER_KEY.format(namespace=settings.namespace)), 2.0,
                "the service's record", who="Ray's GCS")
    except Exception as e:  # noqa: BLE001 - stopping anyway
        log.info("the service's record in the cluster's GCS was not deleted: %r", e)


def _deployer_gone(settings: Settings, host: str, port: int | None,
                   deployed_at: float | None) -> tuple[dict | None, str]:
    """The record of the `lipsync serve` that deployed the running application (`_record_deployer`), with its
    driver's pid and address, where it is that application's (its deployment timestamp `deployed_at`), Ray's job
    table says its job is dead, it served this `host`, `port` and storage root, and no other start has taken it
    over (claimed once, in the KV store), and ""; else None and why not (no record: deployed
    otherwise, e.g. `serve deploy`; a record of an earlier deployment; a service that runs; one that served
    others; a record that cannot be read: refused as before)."""
    from ray._private.state import jobs
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    key = DEPLOYER_KEY.format(namespace=settings.namespace)

    def read() -> tuple[dict | None, str]:
        raw = _internal_kv_get(key)
        record = json.loads(raw) if raw else None
        if not isinstance(record, dict):
            return None, "no record of a lipsync serve that deployed it (deployed by other means?)"
        if not deployed_at or record.get("deployed_at") != deployed_at:
            return None, "it was deployed again since the lipsync serve that recorded itself (by other means?)"
        if (record.get("host"), record.get("port"), record.get("storage_root")) != (host, port,
                                                                                 str(settings.storage_root)):
            return None, (f"it serves {record.get('host')}:{record.get('port')} on the storage root "
                          f"{record.get('storage_root')}")
        job = next((j for j in jobs() if j.get("JobID") == record.get("job_id")), None)
        if job is None or not job.get("IsDead"):
            return None, (f"the lipsync serve that deployed it (Ray job {record.get('job_id')}) runs, as far as Ray "
                          f"knows (a process killed just now is known dead within seconds: start again then)")
        me = ray.get_runtime_context().get_job_id()  # the first start to claim it takes it over, alone
        claim = f"{key}:taken:{record['job_id']}"
        if _internal_kv_put(claim, me, overwrite=False) and _internal_kv_get(claim) != me.encode():
            return None, "another start took it over"
        return {**record, "driver_pid": job.get("DriverPid"), "driver_ip": job.get("DriverIPAddress")}, ""

    try:
        return _within(read, settings.actor_call_timeout_s, "the service's record", who="Ray's GCS")
    except Exception as e:  # noqa: BLE001 - not known: refused as before
        log.warning("the record of the service that deployed the running application could not be read: %r", e)
        return None, f"the record of the lipsync serve that deployed it could not be read: {e!r}"


def _code_here() -> str:
    """`cluster.code_version` of the process this runs in (a task: the code of the node it is placed on)."""
    from cluster import code_version

    return code_version()


def replace_other_code(settings: Settings, timeout_s: float | None = None) -> list[str]:
    """On a joined cluster: the detached actors of this namespace (the job manager, the service's sidecar, the
    model workers and compositors) outlive a service's stop, and the next `lipsync serve` reused them whatever code
    they ran: after an upgrade, the new service's routes called an earlier version's job manager and pool. Where the
    job manager runs other code than this one (`cluster.code_version`), they are killed for good (the names this
    service creates again); its unfinished jobs resume under the new job manager (the chunks that were rendering are
    rendered again). "Other" is against what the cluster runs now (a task's `code_version` where the job manager is
    placed: its nodes' installation, not this client's). One that does not answer is left to the checks that
    follow, and so is a cluster whose code cannot be read. Returns the names killed."""
    from actors import ORCHESTRATOR_NAME
    from actors.service_support import SIDECAR_NAME
    from actors.supervision import COMPOSITOR_PREFIX, MODEL_WORKER_PREFIX

    timeout_s = timeout_s or settings.actor_call_timeout_s
    try:
        manager = ray.get_actor(ORCHESTRATOR_NAME, namespace=settings.namespace)
    except ValueError:
        return []
    try:
        theirs = ray.get(manager.workers.remote(), timeout=timeout_s)["manager"]
    except Exception as e:  # noqa: BLE001 - dead, restarting or hung: not this check's to judge
        log.info("the job manager on the cluster did not say which code it runs (%r): kept", e)
        return []
    try:  # what a job manager made now would run: the cluster's code (its nodes' installation, not this client's)
        from actors.orchestrator import storage_node_placement

        current = ray.get(ray.remote(num_cpus=0)(_code_here).options(**storage_node_placement(settings)).remote(),
                          timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - cannot tell: kept
        log.info("the cluster's code could not be read (%r): its job manager is kept", e)
        return []
    if theirs.get("code") == current:
        return []
    def named_here() -> list[str]:  # the named actors of this service's namespace
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a.get("namespace") == settings.namespace]

    names = [name for name in named_here() if name in (ORCHESTRATOR_NAME, SIDECAR_NAME)
             or name.startswith((MODEL_WORKER_PREFIX, COMPOSITOR_PREFIX))]
    log.warning("the job manager on this cluster runs other code (%s, the cluster's now %s: an earlier version?): it "
                "and its pool (%d actors) are replaced; its unfinished jobs resume under the new one",
                theirs.get("code") or "from before code versions", current, len(names))
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=settings.namespace), no_restart=True)
        except ValueError:  # gone meanwhile
            continue
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # their names are free once Ray has them dead (a new one of that name)
        if not set(named_here()) & set(names):
            break
        time.sleep(0.2)
    return names


def _check_joined_manager(rt, settings: Settings) -> None:
    """On a joined cluster: the namespace's job manager is detached (it outlives a service's stop, and its
    jobs resume); one that runs on another storage root than this service's would serve the cluster
    with its own settings while this service says it uses these. `ServiceInUse` then."""
    from cluster.errors import ServiceInUse

    theirs = rt.call("workers")["manager"].get("storage_root")
    if theirs is not None and theirs != str(settings.storage_root):
        raise ServiceInUse(f"the job manager of namespace {settings.namespace!r} on this cluster runs on the storage "
                           f"root {theirs}, not {settings.storage_root} (LIPSYNC_STORAGE_ROOT): it keeps the settings "
                           f"it was started with: give this service that storage root (one service runs on a "
                           f"cluster: its Serve application and route are the cluster's)", stage="serve")


#: Seconds a stopping service gives Serve to stop the app's replicas and its proxies (an open SSE
#: stream holds a replica up to the app's graceful_shutdown_timeout_s, 20 s by default, and Serve's
#: controller waited 30 s) before the embedded Ray is taken down with everything on it.
SERVE_STOP_BUDGET_S = 2.0
#: Seconds `ray.shutdown` gets (about 1 s on 2 cores) before what is left of an embedded Ray is killed
RAY_SHUTDOWN_BUDGET_S = 4.0


#: How long a stopping service gives its running live sessions, together, to end (their streams ended, their
#: recordings made); past it what is left is cut off with the embedded Ray (read `failed` after the next start)
LIVE_STOP_BUDGET_S = 5.0


#: How long a stopping service asks Ray for its live sessions' registry (a GCS that answers does so in milliseconds)
REGISTRY_LOOKUP_S = 2.0


def end_live_sessions(settings: Settings, budget_s: float = LIVE_STOP_BUDGET_S) -> bool:
    """End the running live sessions of a stopping service, within `budget_s` (a session cannot go on after
    its service: it read `failed`, "its actor is gone", after the next start, and its playlist was left open).
    False where Ray's GCS did not answer at all (it is stopping: a SIGTERM to the whole process group)."""
    from actors.live import REGISTRY_NAME
    from actors.runtime import embedded_ray_lost

    if embedded_ray_lost() is not None:  # its sessions went with it
        return False

    def registry():
        try:
            return ray.get_actor(REGISTRY_NAME, namespace=settings.namespace)
        except ValueError:  # no session was ever started here: nothing to end (and no registry made now)
            return None

    try:  # asked on its own, briefly: a SIGTERM to the whole process group (systemd's) stops the GCS too, and
        # the lookup then held the stop 8 s, past its 10 s, with a warning of sessions that never were (a probe)
        found = _within(registry, REGISTRY_LOOKUP_S, "the live sessions' registry", who="Ray's GCS")
    except Exception as e:  # noqa: BLE001 - stopping anyway
        log.info("the live sessions were not ended before the stop: Ray's GCS does not answer (%s): it is stopping "
                 "already (its process group was signalled too), and they with it", e)
        return False
    if found is None:
        return True
    try:  # (bounded as a whole: a GCS that does not answer must not hold the stop)
        states = _within(lambda: ray.get(found.stop_all.remote("service_stopped", budget_s), timeout=budget_s + 2.0),
                         budget_s + 3.0, "the end of the live sessions", who="Ray")
    except Exception as e:  # noqa: BLE001 - stopping anyway: those sessions read failed after the next start
        log.warning("the running live sessions were not ended before the stop: %r", e)
        return True
    if states:
        log.info("live sessions at the stop: %s", ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    return True


def stop_service(embedded: bool, serve_budget_s: float = SERVE_STOP_BUDGET_S, owner_mark: str | None = None,
                 settings: Settings | None = None) -> None:
    """Take the app down; an embedded Ray goes with it (unfinished jobs resume on the next start).

    With `settings`, embedded or on a joined cluster where this process deployed the app: its running live sessions
    are ended first (`end_live_sessions`, reason `service_stopped`), as they cannot resume on the next start.

    Embedded: Serve's controller gets `serve_budget_s` to stop the app and the proxies (requests
    in flight may finish), then `ray.shutdown` ends every process of the tree: a SIGTERM stops
    the service in a few seconds, also with event streams open (they are cut). `ray.shutdown` gets
    `RAY_SHUTDOWN_BUDGET_S`: past it (a SIGTERM to the whole process group, as systemd sends it,
    reaches Ray's processes too, and its driver's shutdown waited 8 s on them), and at once where the
    embedded Ray's raylet or GCS has died, what is left of it is killed (`owner_mark`, the mark it
    was started under). Joined cluster: the
    app is deleted without waiting for its replicas to drain (the cluster's controller finishes
    that); the cluster itself stays."""
    from ray import serve

    from actors.runtime import embedded_ray_lost, kill_embedded_ray

    # (on a joined cluster too, where this service deployed the app it deletes: its sessions' socket and stream go
    # with the app, and they ran on unreachable until their idle timeout, `lipsync live` cut off with a 500, a probe)
    ended = end_live_sessions(settings) if settings is not None and (embedded or _deployed) else True
    if embedded and not ended and owner_mark is not None:
        # its GCS answers nothing (stopping: a SIGTERM to the whole process group, as systemd sends it): Serve's
        # controller and Ray's shutdown would wait on it in turn (9 s, past the 10 s with the rest)
        kill_embedded_ray(owner_mark)
        return
    try:
        if embedded:
            from ray.serve.context import _get_global_client

            client = _get_global_client(raise_if_no_controller_running=False)
            if client is not None:
                # past its budget Serve says "Controller failed to shut down within 2.0s": the budget is
                # ours and what is left goes with the embedded Ray just below (an operator read it as a failure)
                budget_over = _DropLine("Controller failed to shut down within")
                logging.getLogger("ray.serve").addFilter(budget_over)
                try:
                    client.shutdown(timeout_s=serve_budget_s)
                finally:
                    logging.getLogger("ray.serve").removeFilter(budget_over)
        elif _deployed:  # (not another service's, found running: `_check_no_running_app`)
            serve.delete(APP_NAME, _blocking=False)
            _forget_deployer(settings)
    except Exception as e:  # shutting down anyway
        log.warning("serve shutdown: %r", e)
    if embedded and owner_mark is not None and (lost := embedded_ray_lost()) is not None:
        log.info("the embedded Ray's %s has gone already: its other processes are killed", lost)
        kill_embedded_ray(owner_mark)
        return
    # bounded: with its workers gone before it (a SIGTERM to the whole process group, as systemd sends it,
    # reaches them too), Ray's driver shutdown waited 8 s on a raylet that was shutting down itself
    def kill_the_rest() -> None:
        log.info("Ray's shutdown took more than %.0f s: what is left of the embedded Ray is killed",
                 RAY_SHUTDOWN_BUDGET_S)
        kill_embedded_ray(owner_mark)

    try:
        _within(ray.shutdown, RAY_SHUTDOWN_BUDGET_S, "its shutdown", who="Ray",
                on_late=kill_the_rest if embedded and owner_mark is not None else None)
    except RenderError as e:  # stopping anyway (the CLI leaves without waiting for the rest)
        log.warning("%s", e.message)
