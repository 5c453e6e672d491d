"""`lipsync`: render on an embedded Ray (or the cluster at RAY_ADDRESS), or the bundled demo.

Exit status: 0 ok, 2 bad input (one line naming the file and the problem), 1 any other failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from cluster.config import Settings, unknown_variables
from cluster.errors import InputNotFound, LipsyncError, PortInUse, os_reason
from cluster.ports import PORT_WAIT_S
from cluster.ports import free_port as _free_port
from cluster.ports import port_in_use as _port_in_use
from cluster.schemas import ErrorInfo, JobState, RenderRequest
from cluster.views import state_said

#: The settings a command-line flag sets (`_settings`), named beside their variable when refused
FLAG_OF_SETTING = {"model_workers": "--workers", "compositors": "--compositors", "chunk_seconds": "--chunk-seconds",
                   "model": "--model"}


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "workers", None) is not None:
        overrides["model_workers"] = args.workers
    if getattr(args, "compositors", None) is not None:
        overrides["compositors"] = args.compositors
    if getattr(args, "chunk_seconds", None) is not None:
        overrides["chunk_seconds"] = args.chunk_seconds
    if getattr(args, "model", None):
        overrides["model"] = _model_spec(args.model)
    return Settings(**overrides)


def _model_spec(model: str) -> str:
    """'builtin[:S]' as is; a model file as an absolute path (workers do not share our cwd)."""
    from cluster.models import is_named_model

    return model if is_named_model(model) else str(Path(model).expanduser().resolve())


def _output_problem(path: Path) -> str | None:
    """Why an output file cannot be written at `path` (checked before any work), or None."""
    try:
        if path.is_dir():
            return "is a directory (give a file name, e.g. out.mp4)"
        parent = path.parent
        if not parent.is_dir():
            return f"its directory {parent} does not exist"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"its directory {parent} is not writable"
        if len(os.fsencode(path.name)) > os.pathconf(parent, "PC_NAME_MAX"):
            return f"its name is longer than its file system takes ({len(os.fsencode(path.name))} bytes)"
    except (OSError, ValueError) as e:  # a name the system refuses (NUL, too long)
        return os_reason(e)
    return None


def _refused_output(output: str | None, what: str = "output") -> bool:
    """Print why `output` cannot be written (`_output_problem`) and say so; False when it can."""
    try:
        problem = _output_problem(Path(output).expanduser().resolve()) if output else None
    except (OSError, RuntimeError, ValueError) as e:  # resolve: a symlink loop, a name the system refuses
        problem = os_reason(e)
    if problem:
        print(f"lipsync: error: input.invalid: {what} {output}: {problem}", file=sys.stderr)
    return problem is not None


def _fail_line(err: ErrorInfo) -> str:
    chunk = f", chunk {err.chunk}" if err.chunk is not None else ""
    where = f" (stage {err.stage}{chunk})" if err.stage else ""
    return f"lipsync: error: {err.code}: {_printable(err.message)}{where}"


def _printable(text: str) -> str:
    """A message as the terminal gets it: a service's error may name a path or URL as it was sent, escape
    sequences included (`cluster.views.printable`)."""
    from cluster.views import printable

    return printable(text)


class _ProgressBar:
    """A tqdm bar created on its first update, so that an input refused before any progress
    leaves exactly one line (the reason) on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None

    def show(self, done: int, total: int, postfix: str | None = None) -> None:
        from tqdm import tqdm

        if self.bar is None:
            # disable=None: tqdm draws only on a terminal (no carriage returns into a log or a pipe)
            # initial: the frames done before this bar (a job already rendering) are not counted in its rate
            self.bar = tqdm(total=total or 0, initial=done, unit="frame", desc="render",
                            disable=True if self.quiet else None, dynamic_ncols=True)
        self.bar.total = total or self.bar.total
        self.bar.n = done
        if postfix is not None:
            self.bar.set_postfix_str(postfix)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _render(audio: str, video: str, output: str, settings: Settings, loop: str, local: bool,
            quiet: bool, model: str | None = None, chunk_seconds: float | None = None,
            cluster_options: list[str] = (), ray_temp_dir: str | None = None, crf: int | None = None) -> int:
    import os

    out = Path(output).expanduser().resolve()
    if _refused_output(output):  # now, not after the whole render
        return 2
    # what this machine runs with: checked before any work (not the model: the render's own check says
    # what is wrong with it, --model or LIPSYNC_MODEL)
    if (local or not os.environ.get("RAY_ADDRESS")) and _refused_settings(settings, model=False):
        return 2
    # Per-job options travel with the job (a joined cluster has its own defaults).
    request = RenderRequest(audio=str(Path(audio).expanduser().resolve()),
                            video=str(Path(video).expanduser().resolve()), loop=loop, output=str(out),
                            model=_model_spec(model) if model else None, chunk_seconds=chunk_seconds, crf=crf)
    bar = _ProgressBar(quiet)
    embedded, watch = False, None
    try:
        from cluster.render import check_inputs

        check_inputs(request, settings)  # bad input fails here (before Ray starts, or the model loads)
        if local:
            from cluster.render import render_local

            render_local(request, settings, progress=bar.show)
            bar.close()
            print(f"wrote {out}", file=sys.stderr)
            return 0

        from actors.runtime import Runtime, connect
        from cluster.owners import process_identity
        from cluster.render import new_job_id

        early = _prepare_avatar_while(request, settings)
        from actors.runtime import embedded_ray_owner_mark

        with embedded_ray_owner_mark() as ray_mark:  # its processes findable if its raylet or GCS dies
            embedded = connect(settings, temp_dir=ray_temp_dir)
        if embedded:  # a render without its Ray waited for the job manager until its deadline
            watch = _RayWatch(ray_mark, "render.ray_lost", "the render cannot go on without it and stops now "
                                                           "(render again)")
        if not embedded and cluster_options:
            print(f"lipsync: note: {', '.join(cluster_options)} size a new job manager; the running cluster at "
                  f"RAY_ADDRESS keeps its own, so they were not applied", file=sys.stderr)
        rt = Runtime(settings, owner=process_identity() if embedded else None)
        rt.manager()  # created now, so its workers start while the avatar is still being prepared
        job_id = new_job_id()
        if early is not None:  # the job's prepare step then finds the avatar in the cache
            _avatar_prepared(early, request, settings)
        rt.submit(request, job_id=job_id)  # the inputs travel through Ray to the job manager

        def show(st) -> None:
            bar.show(st.frames_done, st.frames_total, state_said(st))

        try:
            st = rt.wait(job_id, on_status=show)
        except KeyboardInterrupt:
            rt.cancel(job_id)
            raise
        bar.close()
        if st.state == JobState.succeeded:
            rt.download_output(job_id, out)  # the output travels back the same way
            print(f"wrote {out}", file=sys.stderr)
            return 0
        err = st.error or ErrorInfo(code="unknown", message=f"job ended {st.state.value}")
        print(_fail_line(err), file=sys.stderr)
        return 2 if err.code.startswith("input.") else 1
    except LipsyncError as e:
        bar.close()
        print(_fail_line(e.to_info()), file=sys.stderr)
        return e.exit_code
    finally:
        bar.close()
        if watch is not None:  # before Ray's own stop, whose dying processes are not a loss
            watch.stop()
        if embedded:  # now, not in Ray's exit hook (which first sleeps 0.5 s for log lines we do not print)
            from actors.runtime import stop_embedded

            stop_embedded()


def _prepare_avatar_while(request: RenderRequest, settings: Settings):
    """With an embedded Ray (the job manager shares this storage root), prepare the avatar in a
    thread while Ray starts: the two overlap instead of adding up. Returns the future (its result
    raises the avatar's typed errors), or None when joining a cluster (`RAY_ADDRESS`). The thread is
    a daemon: a render that gives up on it (`_avatar_prepared`) is not held at its exit until it ends."""
    import os
    import threading
    from concurrent.futures import Future

    if os.environ.get("RAY_ADDRESS") or request.video is None:
        return None
    from cluster.faces.avatar import prepare_avatar

    future: Future = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(prepare_avatar(request.video, settings))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter, which raises it
                future.set_exception(e)

    threading.Thread(target=run, name="avatar", daemon=True).start()
    return future


def _avatar_prepared(early, request: RenderRequest, settings: Settings) -> None:
    """Wait for the avatar `_prepare_avatar_while` prepares, as long as the job's own prepare step may
    take (`prepare_deadline`: it follows the template's length); past that, a typed timeout of the
    prepare stage (it was a bare TimeoutError traceback, after `chunk_timeout_s`, shorter than a long
    template's preparation may take)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from cluster.errors import RenderTimeout
    from cluster.render import prepare_deadline

    deadline = prepare_deadline(request, settings)
    try:
        early.result(timeout=deadline)
    except FutureTimeout:
        raise RenderTimeout(f"preparing the avatar of {request.video} took more than {deadline:.0f} s (the "
                            "prepare deadline: LIPSYNC_CHUNK_TIMEOUT_S plus LIPSYNC_PREPARE_SECONDS_PER_TEMPLATE_"
                            "SECOND per second of template)", stage="prepare", path=request.video) from None


def _cluster_options(args: argparse.Namespace) -> list[str]:
    return [flag for flag, value in (("--workers", getattr(args, "workers", None)),
                                     ("--compositors", getattr(args, "compositors", None))) if value]


def cmd_render(args: argparse.Namespace) -> int:
    if args.sync_mode and args.loop:
        print("lipsync: error: input.invalid: give --sync-mode (or its older name --loop), not both", file=sys.stderr)
        return 2
    mode = args.sync_mode or args.loop or "pingpong"  # (a probe: render took only --loop, submit --sync-mode)
    return _render(args.audio, args.video, args.output, _settings(args), "forward" if mode == "loop" else mode,
                   args.local, args.quiet, args.model, args.chunk_seconds, _cluster_options(args), args.ray_temp_dir,
                   crf=args.crf)


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.synth import make_demo_inputs

    settings = _settings(args)
    audio, video = make_demo_inputs(str(settings.dir("demo")), settings=settings)
    return _render(audio, video, args.output, settings, "pingpong", args.local, args.quiet, args.model,
                   args.chunk_seconds, _cluster_options(args), args.ray_temp_dir)


# --- the service and its shell client -------------------------------------------------------------
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


#: the Ray dashboard's usual port (`lipsync serve` takes a free one when another service holds it)
DASHBOARD_PORT = 8265


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading
    import time

    if unknown := unknown_variables(os.environ):  # a misspelt LIPSYNC_API_TOKEN was a service without a token
        print(f"lipsync: error: settings.invalid: {unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
              else "") + ": docs/SETTINGS.md lists the settings", file=sys.stderr)
        return 2
    settings = Settings()
    if args.host not in LOOPBACK_HOSTS and settings.api_token is None and not args.insecure:
        print(f"lipsync: error: settings.invalid: refusing to listen on {args.host} without LIPSYNC_API_TOKEN "
              f"(set a token, or pass --insecure on a trusted network)", file=sys.stderr)
        return 2
    if warning := settings.live_token_warning():  # (allowed: a client that renews them is fine)
        print(f"lipsync: warning: {warning}", file=sys.stderr)
    embedded = not os.environ.get("RAY_ADDRESS")
    # this machine's storage root, model file and ffmpeg, when the service runs here: said now, not as
    # a job manager that restarts for ever (a service "ready" that never was) or every job failing
    if embedded and _refused_settings(settings):
        return 2
    if embedded:
        for root in settings.input_root_paths_as_written:  # (allowed: a directory mounted later is fine)
            if not root.is_dir():
                print(f"lipsync: warning: LIPSYNC_INPUT_ROOTS names {root}, which is not a directory here: path "
                      f"inputs under it are refused until it is", file=sys.stderr)
    if embedded and (holder := _hold_storage_root(settings)) is not None:
        print(f"lipsync: error: service.storage_in_use: another lipsync serve ({holder}) uses the storage root "
              f"{settings.storage_root}: two job managers on one job database would render the same jobs twice "
              f"(stop it, or give this one its own LIPSYNC_STORAGE_ROOT)", file=sys.stderr)
        return 2
    # said now, as the other start problems (not in Serve's traceback after Ray started, nor after waiting for a
    # port that a running process keeps); on a joined cluster, the cluster's own Serve (an earlier service's, kept
    # by the cluster) may be what holds it: decided once Ray is reached
    if args.metrics_port is not None and args.metrics_port in (args.port, args.dashboard_port):
        print(f"lipsync: error: settings.invalid: --metrics-port {args.metrics_port} is also the "
              f"{'API' if args.metrics_port == args.port else 'dashboard'}'s port: give each its own",
              file=sys.stderr)
        return 2
    if args.metrics_port is not None and (refused := _metrics_port_refusal(args.metrics_port, embedded)):
        print(f"lipsync: error: {refused}", file=sys.stderr)
        return 2
    problem = _port_in_use(args.host, args.port, wait_s=0)
    if problem and embedded and (refused := _port_refusal(args.host, args.port, problem)) is not None:
        print(_fail_line(refused.to_info()), file=sys.stderr)
        return refused.exit_code
    from actors.runtime import embedded_ray_owner_mark
    from service.launch import start_service, stop_service

    dashboard_port = args.dashboard_port
    if not args.no_dashboard and dashboard_port is None:  # Ray's 8265, else a free one (a second service here)
        dashboard_port = DASHBOARD_PORT if _port_in_use("127.0.0.1", DASHBOARD_PORT, wait_s=0) is None \
            else _free_port()
    stop = threading.Event()
    started_at = datetime.now(timezone.utc)
    # Installed before Ray starts and kept through its start (Ray's own SIGTERM handling would
    # abort the process mid-start or mid-shutdown): a signal at any point is a clean stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:  # its Ray's processes marked: findable if its raylet or GCS dies (`kill_embedded_ray`)
        with embedded_ray_owner_mark() as ray_mark:
            urls = start_service(settings, args.host, args.port, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                                 dashboard=not args.no_dashboard, dashboard_port=dashboard_port,
                                 ray_temp_dir=args.ray_temp_dir, stop=stop, port_busy=problem,
                                 metrics_port=args.metrics_port)
    except LipsyncError as e:
        print(_fail_line(e.to_info()), file=sys.stderr)
        _stop_started(stop_service, embedded)  # (on a joined cluster only an application it deployed goes)
        return e.exit_code
    if urls["ready"]:
        print(f"lipsync service ready\n  API:       {urls['api']}\n  docs:      {urls['docs']}", flush=True)
        if urls["dashboard"]:
            print(f"  dashboard: {urls['dashboard']}", flush=True)
        # (a probe: a restart said nothing of the jobs it took up again); not those sent since it answered
        resumed = _unfinished_jobs(urls["api"], settings, before=started_at)
        if resumed:
            print(f"lipsync: {_jobs_said(resumed)} unfinished from before resume{'s' if len(resumed) == 1 else ''} "
                  f"now: {', '.join(resumed[:5])}{' ...' if len(resumed) > 5 else ''} (lipsync list)", flush=True)
    try:
        while not stop.wait(1.0):
            if urls["embedded"] and not stop.is_set():
                # a service without its Ray answers nothing and would fail its jobs as workers lost:
                # said, ended at once (a supervisor restarts it; the jobs resume from their segments)
                _exit_if_ray_lost(ray_mark, "service.ray_lost", "the service cannot go on without it and stops "
                                  "now (unfinished jobs resume on the next start on this storage root)")
    finally:
        left = _unfinished_jobs(urls["api"], settings) if urls["ready"] else None
        going_on = ("go on in the cluster's job manager" if not urls["embedded"]  # (detached: it stays)
                    else "resumed at the next start on this storage root")
        print("lipsync: stopping the service" + (f"; {_jobs_said(left)} unfinished: {going_on}" if left else ""),
              file=sys.stderr, flush=True)
        t0 = time.monotonic()
        stop_service(urls["embedded"], owner_mark=ray_mark, settings=settings)
        print(f"lipsync: stopped in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return 0  # (`entry` then leaves without the interpreter's teardown of a Ray driver)


def _unfinished_jobs(api: str, settings, before: datetime | None = None) -> list[str] | None:
    """Ids of the service's jobs not yet ended (admitted `before` a time, where given), oldest first (a quick
    question to its own API, bounded; None where it does not answer in time: said by nothing, the jobs resume all
    the same)."""
    from cluster.client import Client

    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    try:
        with Client(api, token=token, timeout=1.0, retries=0) as c:  # (a stop has 10 s in all)
            page = c.list(state=[s.value for s in JobState if not s.terminal], limit=500)
    except Exception:  # noqa: BLE001 - a courtesy line: a service busy starting or stopping answers later
        return None
    def admitted(job) -> datetime:  # (a view's time without a zone is UTC)
        return job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=timezone.utc)

    return [j.id for j in reversed(page.jobs) if before is None or admitted(j) < before]


def _jobs_said(ids: list[str]) -> str:
    return f"{len(ids)}{'+' if len(ids) >= 500 else ''} job{'' if len(ids) == 1 else 's'}"


def _metrics_port_refusal(port: int, embedded: bool) -> str | None:
    """Why `--metrics-port PORT` cannot be had (`code: message`), or None: a joined cluster's nodes export on
    the port their `ray start --metrics-export-port` gave them; a port another process holds would leave
    Ray's metrics agent without one (the service up, its metrics nowhere)."""
    if not embedded:
        return ("settings.invalid: --metrics-port is the embedded Ray's: a joined cluster (RAY_ADDRESS) exports "
                "its metrics on the port each node was started with (ray start --metrics-export-port)")
    problem = _port_in_use("127.0.0.1", port, wait_s=0)
    if problem is None:
        return None
    return (f"{PortInUse.code}: cannot export metrics on 127.0.0.1:{port}: {problem} (another process holds it: "
            f"stop it, or pick another --metrics-port)")


def _port_refusal(host: str, port: int, problem: str) -> PortInUse | None:
    """Why an embedded service cannot listen on host:port, found busy (`problem`), or None once it is free:
    refused at once (exit 2) when what holds it stays; waited for (`PORT_WAIT_S`) when it may be an ended
    service's Ray, and refused with exit 1 when it still holds it then: a Ray slower to go, not a mistake
    in how this one was started (exit 2, which a supervisor such as OPERATIONS' systemd unit does not restart)."""
    if not _held_by_an_ended_service(port):  # a restart right after a kill: that proxy lets go seconds later
        return PortInUse.at(host, port, problem)
    problem = _port_in_use(host, port, wait_s=PORT_WAIT_S)
    if problem is None:
        return None
    refused = PortInUse.at(host, port, problem)
    refused.exit_code, refused.retryable = 1, True
    return refused


def _held_by_an_ended_service(port: int) -> bool:
    """Whether what listens on `port` may be the Serve proxy (or another process) of the embedded Ray of a
    `lipsync serve` that has ended, which lets go a few seconds later (its own process group outlives a SIGKILL
    of the service's): the owner its mark names (`embedded_ray_owner_mark`) is gone; or a Ray process whose mark
    cannot be read (a Ray process's new title can wipe the block its environment is read from); or no holder
    listed at all (its socket outliving it a moment). A holder known to stay is not waited for: a process that
    is no Ray's and carries no mark (another server), another user's (whose process is not shown), or one whose
    marked owner still runs (another `lipsync serve`). Reading "no holder listed" as one that stays failed a
    restart right after a SIGKILL (`test_queue_bound_then_kill_mid_job_and_resume`, in a fresh clone)."""
    import psutil

    from actors.runtime import RAY_OWNER_VARIABLE

    try:
        holders = {c.pid for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}
    except (psutil.Error, OSError):  # (a system that does not say)
        return True
    prefix = f"{RAY_OWNER_VARIABLE}=".encode()
    for pid in holders:
        if not pid:  # another user's (an ended service's Ray would be this user's): it stays
            return False
        try:
            holder = psutil.Process(pid)
            with open(f"/proc/{pid}/environ", "rb") as f:  # (as `kill_embedded_ray` reads it)
                mark = next((v[len(prefix):] for v in f.read().split(b"\0") if v.startswith(prefix)), None)
            if mark is None:
                command = holder.cmdline()
                if not (command and command[0].startswith("ray::")):
                    return False  # another server: it stays
                continue  # a Ray process whose mark its title wiped: as an ended service's
            try:
                owner = psutil.Process(int(mark.split(b"-", 1)[0]))
                # (a pid used again since is a process started after the holder)
                if owner.status() != psutil.STATUS_ZOMBIE and owner.create_time() <= holder.create_time():
                    return False  # a running service's
            except psutil.NoSuchProcess:
                pass
        except psutil.NoSuchProcess:  # gone meanwhile: its port with it
            continue
        except (psutil.Error, OSError, ValueError):
            continue
    return True


def _exit_if_ray_lost(mark: str, code: str, consequence: str) -> None:
    """When a vital process of the embedded Ray started under `mark` has died, say which (`code`, then
    `consequence`), kill what is left of that Ray and end this process with status 1."""
    from actors.runtime import embedded_ray_lost, kill_embedded_ray

    if (lost := embedded_ray_lost()) is None:
        return
    print(f"lipsync: error: {code}: the embedded Ray's {lost} died; {consequence}", file=sys.stderr, flush=True)
    n = kill_embedded_ray(mark)
    print(f"lipsync: stopped ({n} Ray processes left behind were killed)", file=sys.stderr, flush=True)
    logging.shutdown()  # (os._exit flushes no log handler)
    os._exit(1)


class _RayWatch:
    """`_exit_if_ray_lost` once a second on a thread of its own, until `stop` (which waits for a check under
    way: Ray's own stop, whose processes end, must not read as a loss)."""

    def __init__(self, mark: str, code: str, consequence: str) -> None:
        self._lock, self._stopped = threading.Lock(), threading.Event()
        self._args = (mark, code, consequence)
        threading.Thread(target=self._run, name="ray-watch", daemon=True).start()

    def _run(self) -> None:
        while not self._stopped.wait(1.0):
            with self._lock:
                if not self._stopped.is_set():
                    _exit_if_ray_lost(*self._args)

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()


_STORAGE_LOCK = None  # the open lock file of this process's `lipsync serve`: held until the process ends


def _hold_storage_root(settings: Settings) -> str | None:
    """Hold the storage root for this `lipsync serve` (an exclusive lock on `serve.lock` in it, let
    go by the kernel when the process ends, however it ends); None when held, else who holds it."""
    import fcntl
    import os

    global _STORAGE_LOCK
    if _STORAGE_LOCK is not None:  # an earlier `serve` of this process (`cli.main` called again) has returned
        _STORAGE_LOCK.close()
        _STORAGE_LOCK = None
    path = settings.storage_root / "serve.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        return holder or "a process"
    except OSError as e:  # a filesystem without locks (NFS `nolock`, some FUSE): said, and the service runs
        f.close()
        print(f"lipsync: warning: the storage root {settings.storage_root} cannot be locked ({e.strerror or e}): "
              f"nothing stops a second lipsync serve on it", file=sys.stderr)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    _STORAGE_LOCK = f
    return None


def _refused_settings(settings: Settings, model: bool = True) -> bool:
    """Print the first of `_local_setting_problems` and say so; False when there is none."""
    problems = _local_setting_problems(settings, model)
    if problems:
        print(f"lipsync: error: settings.invalid: {problems[0]}", file=sys.stderr)
    return bool(problems)


def _local_setting_problems(settings: Settings, model: bool = True) -> list[str]:
    """What is wrong with the settings that name things on this machine: the storage root (a
    directory this user can create and write), the default model (`builtin`, a name, or a file),
    the ffmpeg binary (an executable). Each as `field: why (got ...; LIPSYNC_FIELD)`."""
    import shutil
    import tempfile

    from cluster.render import check_model

    problems = []
    root = settings.storage_root
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as e:
        problems.append(f"storage_root: not a directory this user can write: {e.strerror or e} "
                        f"(got '{root}'; LIPSYNC_STORAGE_ROOT)")
    else:
        from cluster.jobstore import storage_root_problem

        if moved := storage_root_problem(settings.db_path):
            problems.append(f"storage_root: {moved} (got '{root}'; LIPSYNC_STORAGE_ROOT)")
    if model:
        try:  # the check a job's model gets
            check_model(settings.model, settings)
        except LipsyncError as e:
            problems.append(f"model: {e.message} (got '{settings.model}'; LIPSYNC_MODEL)")
    if settings.ffmpeg and not shutil.which(settings.ffmpeg):  # a path: an executable file there; a name: on PATH
        problems.append(f"ffmpeg: not an executable file (got '{settings.ffmpeg}'; LIPSYNC_FFMPEG)")
    elif settings.video_encoder != "libx264":  # every job's segments would fail at their encode
        from cluster.media.ffmpeg import encoder_problem

        if problem := encoder_problem(settings.video_encoder, settings):
            problems.append(f"video_encoder: {problem} (got '{settings.video_encoder}'; LIPSYNC_VIDEO_ENCODER: "
                            "libx264, or name an ffmpeg that has it in LIPSYNC_FFMPEG)")
    return problems


def _stop_started(stop_service, embedded: bool) -> None:
    """Take down what a failed start left running (Ray is up when the service itself failed)."""
    import ray

    if ray.is_initialized():
        stop_service(embedded)


def _client(args: argparse.Namespace):
    from cluster.client import Client

    return Client(args.url, token=args.token)


def _print_view(view) -> None:
    """A job's view as JSON, its URLs absolute under the client's service URL (as the SDK gives every view): a
    `watch_url` taken from here plays in ffplay as `submit --watch` prints it."""
    print(view.model_dump_json(indent=2))


#: Answers that are no mistake of the command's (exit 1, as any other failure, not 2, bad input): a request that
#: timed out, a job whose output expired, a service that is busy: a script tells "try again later" from "fix it"
RETRY_LATER_STATUSES = (408, 410, 429)


def _client_call(args: argparse.Namespace, fn) -> int:
    """`fn(c)` with a client of the service (`--url`, `--token`): its exit status, or each error said in one
    line and its status."""
    import httpx
    from websockets.exceptions import WebSocketException

    from cluster.client import ApiError, JobFailed, WaitTimeout

    c = None
    try:
        with _client(args) as c:
            return fn(c)
    except JobFailed as e:
        _print_view(e.job)
        print(f"lipsync: error: {e.code}: {e.message}", file=sys.stderr)
        return 2 if e.code.startswith("input.") else 1
    except ApiError as e:
        hint = ""
        if e.status == 401:  # the service's answer to its bearer token (not a live socket's 4401: a session's token)
            hint = ("; the token sent was refused" if "Authorization" in c.headers else "; no token was sent") + \
                ": give the service's token with --token or LIPSYNC_API_TOKEN"
        given = getattr(args, e.field, None) if e.field in ("audio", "video") else None
        if e.code in ("input.outside_roots", "input.not_found") and isinstance(given, str) and \
                not os.path.exists(os.path.expanduser(given)):  # sent as the server's, being none here (a probe)
            hint += f"; {given} is no file on this machine either: a typo?"
        print(f"lipsync: error: {e.code}: {e.message}" + (f" (field {e.field})" if e.field else "") + hint,
              file=sys.stderr)
        return 2 if 400 <= e.status < 500 and e.status not in RETRY_LATER_STATUSES else 1
    except WaitTimeout as e:
        print(f"lipsync: error: wait.timeout: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:  # the SDK checks a request against the shared schema before sending it
        for err in e.errors():  # (the server's code for the same refusal)
            field = ".".join(str(p) for p in err["loc"]) or e.title
            print(f"lipsync: error: input.invalid: {field}: {err['msg']} (got {err.get('input')!r})",
                  file=sys.stderr)
        return 2
    except LipsyncError as e:  # a local file the SDK reads (live --audio): missing, unreadable
        for problem in getattr(e, "problems", None) or [None]:  # a request refused field by field: a line each
            print(_fail_line(e.to_info()) if problem is None else f"lipsync: error: {e.code}: {problem}",
                  file=sys.stderr)
        return e.exit_code
    except httpx.HTTPError as e:  # a URL it cannot use, a server that never answered
        print(f"lipsync: error: connection.failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except TimeoutError as e:  # (an OSError: not a file's problem) a socket that did not answer in time
        print(f"lipsync: error: connection.timeout: {e or 'no answer in time'}", file=sys.stderr)
        return 1
    except WebSocketException as e:  # a live session's audio socket that failed in a way the SDK does not name
        print(f"lipsync: error: connection.failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the output's reader left (`lipsync list | head`): not the command's failure
        return _stdout_gone()
    except OSError as e:  # a local file it cannot write (a download's destination)
        print(f"lipsync: error: output.unwritable: {e}", file=sys.stderr)
        return 1


def _stdout_gone() -> int:
    """Standard output's reader went away (`| head`): stop quietly, with the status a process killed by SIGPIPE
    has (128 + 13), as `cat` does; what is still buffered goes nowhere instead of raising again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.client import local_input_error

    if args.avatar and args.video:
        print("lipsync: error: input.invalid: give a video or --avatar, not both", file=sys.stderr)
        return 2
    if not args.avatar and not args.video:
        print("lipsync: error: input.invalid: a job needs a video (or --avatar)", file=sys.stderr)
        return 2
    for value, name in ((args.audio, "audio"), (args.video, "video")):
        problem = None if value is None else local_input_error(name, value)
        if problem:
            print(f"lipsync: error: {problem.code}: {problem}", file=sys.stderr)
            return 2
    if _refused_output(args.output):
        return 2

    def run(c) -> int:
        job = c.submit(args.audio, args.video, avatar=args.avatar, id=args.id, sync_mode=args.sync_mode,
                       model=args.model, crf=args.crf, callback_url=args.callback_url)
        if args.watch:  # the watch URL on stdout as soon as the first segment exists
            print(job.id, file=sys.stderr)
            segments = job.segments(timeout=args.timeout)
            try:
                first = next(segments, None)
            finally:
                segments.close()
            if first is None:
                view = job.status()
                ended = f"job {job.id} ended {view.state.value} before publishing a segment"
                print(_fail_line(view.error.model_copy(update={"message": f"{ended}: {view.error.message}"}))
                      if view.error else f"lipsync: error: {ended}", file=sys.stderr)
                return 2 if view.error and view.error.code.startswith("input.") else 1  # as `wait` says
            print(job.watch_url, flush=True)
        if not (args.wait or args.output):
            if not args.watch:
                print(job.id)
            return 0
        if not args.watch:
            print(job.id, file=sys.stderr)
        view = None
        try:
            view = job.wait(progress=not args.quiet, timeout=args.timeout)
            if args.output:
                job.download(args.output)
                print(f"wrote {args.output}", file=sys.stderr)
        except KeyboardInterrupt:  # only this wait ends (a probe: "interrupted", and the job's id lost in the output)
            more = f" {shlex.quote(args.output)}" if args.output else ""
            if view is not None:  # (it had ended: the download was cut)
                print(f"\nlipsync: interrupted: job {job.id} ended {view.state.value}; lipsync download "
                      f"{job.id}{more} fetches its output", file=sys.stderr)
            else:
                print(f"\nlipsync: interrupted: job {job.id} goes on rendering on the service (lipsync wait "
                      f"{job.id}; lipsync download --wait {job.id}{more}; lipsync cancel {job.id})", file=sys.stderr)
            return 130
        _print_view(view)
        return 0
    return _client_call(args, run)


def cmd_status(args: argparse.Namespace) -> int:
    def run(c) -> int:
        _print_view(c.get(args.id))
        return 0
    return _client_call(args, run)


def cmd_list(args: argparse.Namespace) -> int:
    """The service's jobs, newest first: one line each (id, state, frames, age, inputs or error), or
    the page as JSON; the next page's `--before` on stderr when there is one."""
    def run(c) -> int:
        page = c.list(state=args.state, limit=args.limit, before=args.before)
        if args.json:  # (the views' URLs absolute, as `status` prints them)
            print(page.model_dump_json(indent=2))  # (its views' URLs absolute, as the SDK gives them)
        else:
            now = datetime.now(timezone.utc)
            width = max((len(view.id) for view in page.jobs), default=0)  # the columns line up
            for view in page.jobs:
                what = (f"{view.error.code}: {_printable(view.error.message)}" if view.error
                        else " ".join(f"{k}={v}" for k, v in (view.inputs or {}).items()))
                if view.expired:  # succeeded, its output removed since: said where the state is read
                    what = "output expired  " + what
                elif view.waiting_for:  # rendering, the pool without a live worker of a kind
                    what = f"{state_said(view)}  " + what
                elif view.jobs_ahead is not None:  # rendering, nothing of it on a compositor yet
                    what = f"waiting, {view.jobs_ahead} job(s) ahead  " + what
                print(f"{view.id:<{width}}  {view.state.value:<10}  {view.frames_done:>6}/{view.frames_total:<6}  "
                      f"{_age(now - view.created_at):>4} ago  {what}")
            if not page.jobs:
                print("no jobs" + (f" in state {', '.join(args.state)}" if args.state else ""), file=sys.stderr)
        if page.next_before:  # the same filters, the next page
            given = "".join(f" --state {s}" for s in args.state or []) + \
                (f" --limit {args.limit}" if args.limit != 20 else "")
            print(f"more: lipsync list{given} --before {page.next_before}", file=sys.stderr)
        return 0
    return _client_call(args, run)


def cmd_avatar(args: argparse.Namespace) -> int:
    """Prepare an avatar of a template video (face tracked, crops cut once): its id on stdout, what
    `submit --avatar` and `live --avatar` take; the view as JSON with --json."""
    from cluster.client import local_input_error

    problem = local_input_error("video", args.video)
    if problem:
        print(f"lipsync: error: {problem.code}: {problem}", file=sys.stderr)
        return 2

    def run(c) -> int:
        if sys.stderr.isatty():
            print(f"preparing an avatar of {args.video} (its face tracked through every frame)...", file=sys.stderr)
        view = c.prepare_avatar(args.video)
        if args.json:
            print(view.model_dump_json(indent=2))
        else:
            print(view.id)
            print(f"avatar {view.id}: {_avatar_line(view)}", file=sys.stderr)
        return 0
    return _client_call(args, run)


AVATARS_PAGE_MAX = 1000  # GET /v1/avatars' largest limit


def cmd_avatars(args: argparse.Namespace) -> int:
    """The prepared avatars: one line each (id, size, rate, length, frames, name), or the list as JSON."""
    def run(c) -> int:
        # one more than shown, to tell whether there are more (a full page said "more" when there were none)
        asked = min(args.limit + 1, AVATARS_PAGE_MAX)
        views = c.avatars(limit=asked, offset=args.offset)
        more = len(views) > args.limit or len(views) == asked == args.limit
        views = views[:args.limit]
        if args.json:
            import json

            print(json.dumps([v.model_dump(mode="json") for v in views], indent=2))
        else:
            for view in views:
                print(f"{view.id}  {_avatar_line(view)}")
            if not views:
                print("no avatars" + (f" past the first {args.offset}" if args.offset else ""), file=sys.stderr)
        if more:
            print(f"more: lipsync avatars --offset {args.offset + args.limit}"
                  + (f" --limit {args.limit}" if args.limit != 100 else ""), file=sys.stderr)
        return 0
    return _client_call(args, run)


def cmd_sessions(args: argparse.Namespace) -> int:
    """The live sessions not yet ended: one line each (id, state, avatar, speech received, latency, watch URL)."""
    def run(c) -> int:
        views = c.sessions()
        if args.json:
            import json

            print(json.dumps([v.model_dump(mode="json") for v in views], indent=2))
            return 0
        for v in views:
            p50 = f"{v.latency_p50_s:.2f} s" if v.latency_p50_s is not None else "-"
            print(f"{v.id}  {v.state}  avatar {v.avatar_id}  {v.seconds_received:.1f} s received  latency p50 {p50}  "
                  f"{v.hls_url}")
        if not views:
            print("no live sessions", file=sys.stderr)
        return 0
    return _client_call(args, run)


def _avatar_line(view) -> str:
    size = f"{view.width}x{view.height}" if view.width and view.height else "?x?"
    rate = f"{view.fps:g} fps" if view.fps else "? fps"
    length = f"{view.duration:.1f} s" if view.duration is not None else "? s"
    return f"{size}  {rate}  {length}  {view.frames} frames" + (f"  {view.name}" if view.name else "")


def _age(delta) -> str:
    """A duration as its largest unit: 42s, 7m, 3h, 12d."""
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_wait(args: argparse.Namespace) -> int:
    def run(c) -> int:
        _print_view(c.wait(args.id, progress=not args.quiet, timeout=args.timeout))
        return 0
    return _client_call(args, run)


def cmd_download(args: argparse.Namespace) -> int:
    if _refused_output(args.output):
        return 2

    def run(c) -> int:
        from cluster.client import ApiError

        if args.wait:
            c.wait(args.id, progress=False, timeout=args.timeout)
        try:
            c.download(args.id, args.output)
        except ApiError as e:
            view = c.get(args.id) if e.code == "job.not_succeeded" else None
            if view is None or view.state.terminal:
                raise
            # not yet: no mistake of the command's (exit 1, not 2), and how to wait for it (a probe)
            print(f"lipsync: error: {e.code}: job {args.id} is still {view.state.value}: lipsync download --wait "
                  f"{args.id} {shlex.quote(args.output)} waits for it", file=sys.stderr)
            return 1
        print(f"wrote {args.output}", file=sys.stderr)
        return 0
    return _client_call(args, run)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job: its view on stdout; a job that had already ended (the service answers its view as it is)
    or that ended otherwise meanwhile (one committing its output finishes as succeeded) said so on stderr."""
    def run(c) -> int:
        before = c.get(args.id)  # (the answer to a cancel cannot tell "cancelled now" from "cancelled before")
        view = c.cancel(args.id)
        _print_view(view)
        if before.state.terminal or (view.state.terminal and view.state != JobState.cancelled):
            print(f"lipsync: job {view.id} had already ended in state {view.state.value}: nothing was cancelled",
                  file=sys.stderr)
        return 0
    return _client_call(args, run)


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove a finished job's files on the service now: its view (a succeeded job's reads `expired`) on stdout."""
    def run(c) -> int:
        _print_view(c.purge(args.id))
        return 0
    return _client_call(args, run)


def _recording_hint(session, c, recording: str, token_given: bool, when: str) -> str:
    """Where the recording `lipsync live` could not download is fetched from, and `when` (the token itself is
    never printed; `token_given`: it came from --token, not $LIPSYNC_API_TOKEN)."""
    import shlex

    url = c.absolute(f"/v1/sessions/{session.id}/recording")
    auth = ""
    if "Authorization" in c.headers:
        auth = '-H "Authorization: Bearer ' + ("<your token>" if token_given else "$LIPSYNC_API_TOKEN") + '" '
    return (f"; its recording (--recording {recording}) was not downloaded: {when}"
            f"fetch it with curl -f {auth}-o {shlex.quote(recording)} {url}")


def _ended_by_a_stop(error, session, c, recording: str | None, token_given: bool) -> BaseException | None:
    """The session ended (`error`: its socket closed as ended) and the service no longer answers: it was
    stopped, which ends its sessions. Said at once, with where the recording is fetched from, instead of the
    half minute of retries that asking for its final view took; None while the service answers."""
    import httpx

    from cluster.client import CLOSE_AFTER_ERROR_TIMEOUT, ApiError

    try:
        r = c.http.request("GET", f"/v1/sessions/{session.id}", timeout=CLOSE_AFTER_ERROR_TIMEOUT)
        if r.status_code != 200 or r.json().get("reason") != "service_stopped":
            return None  # (ended by itself, or by its limit: said by the view, as before)
        said = f"live session {session.id} was ended by its service's stop (reason service_stopped)"
    except httpx.TransportError as e:
        said = f"live session {session.id} ended and its service stopped answering ({type(e).__name__})"
    except ValueError:  # an answer that is not a view: the usual close says what it is
        return None
    said += ": its stream and recording hold what it had rendered"
    if recording:
        said += _recording_hint(session, c, recording, token_given, "once the service is back, ")
    return ApiError(0, "session.ended", said)


def _closed_after(error: BaseException, session, c, recording: str | None, token_given: bool) -> BaseException:
    """`lipsync live` failed with `error` (its audio socket lost, the service gone, a wait past its bound):
    the session is ended with one DELETE (not the half minute of retries against a service that stopped,
    whose failure said only that the DELETE failed) and `error` is what is raised, saying whether the
    session was ended (and, when not, whether the service answered) and, with --recording, where its
    recording is fetched from (`token_given`: the token came from --token, not $LIPSYNC_API_TOKEN)."""
    from cluster.client import ApiError

    session.close(error=error)
    if not isinstance(error, (ApiError, TimeoutError)):
        return error
    said = ""
    failure = session.end_error
    if failure is not None and failure.status == 0:  # no answer: refused, timed out
        said = ("; the session could not be ended either (DELETE: no answer): the service has stopped or "
                "restarts, and ends it by itself: a killed service reads it failed (session.actor_lost) once back, "
                "one that runs on ends it once idle")
    elif failure is not None:  # answered: what it said (a token it refuses now, a session it does not know)
        said = (f"; the session could not be ended either (DELETE answered {failure.status} {failure.code}: "
                f"{failure.message})")
    if recording:
        when = ""
        if failure is not None:
            when = ("once the service is back and the session has ended, " if failure.status == 0
                    else "once the session has ended, ")
        said += _recording_hint(session, c, recording, token_given, when)
    if not said:
        return error
    if isinstance(error, ApiError):
        return ApiError(error.status, error.code, error.message + said, error.field)
    return type(error)(f"{error}{said}")


def cmd_live(args: argparse.Namespace) -> int:
    """A live session on a prepared avatar driven by an audio file: the playlist URL first, the
    latency figures at the end."""
    from cluster.client import local_input_error

    if "://" in args.audio:  # its PCM is sent from here: the server fetches nothing for a live session
        print(f"lipsync: error: input.invalid: live --audio {args.audio}: live audio must be a local file (not a "
              f"URL: download it first)", file=sys.stderr)
        return 2
    problem = local_input_error("audio", args.audio)  # before a session is created for it
    # (a server path, an upload's ref: not for a live session; said without the URLs and server paths
    # `submit` takes)
    if isinstance(problem, InputNotFound) or (problem is None and not Path(args.audio).expanduser().is_file()):
        problem = InputNotFound(f"audio file {args.audio} does not exist", path=str(args.audio), field="audio")
    if problem:
        print(f"lipsync: error: {problem.code}: {problem}", file=sys.stderr)
        return 2
    if _refused_output(args.recording, "recording"):
        return 2
    from cluster.media.probe import probe_audio

    try:  # empty, not media, no audio stream: said now, not after a session (and its actors) started for it
        probe_audio(Path(args.audio).expanduser())
    except LipsyncError as e:
        print(_fail_line(e.to_info()), file=sys.stderr)
        return e.exit_code

    from cluster.client import ApiError

    def run(c) -> int:
        session = c.live(args.avatar, model=args.model, sample_rate=args.sample_rate, rtmp_url=args.rtmp,
                         segment_seconds=args.segment_seconds, max_seconds=args.max_seconds)
        print(session.hls_url, flush=True)
        ended = None  # the session ended before the audio did: --max-seconds, or an idle timeout
        try:
            seconds = session.send_file(args.audio, realtime=args.realtime)
            session.wait_rendered(timeout=max(60.0, seconds * 2))
        except BaseException as e:  # the socket lost, the service gone, a wait past its bound, Ctrl-C
            if isinstance(e, KeyboardInterrupt) and args.recording:  # ended, and what it made kept as asked (a probe:
                # "interrupted", the recording neither downloaded nor said where it was)
                session.close(error=e)
                try:
                    session.download_recording(args.recording, timeout=30)
                    print(f"\nlipsync: interrupted: the session ended; wrote {args.recording}", file=sys.stderr)
                except Exception:  # noqa: BLE001 - said, with where to fetch it
                    print("\nlipsync: interrupted: the session ended"
                          + _recording_hint(session, c, args.recording, args.token is not None, "once it has ended, "),
                          file=sys.stderr)
                return 130
            if not (isinstance(e, ApiError) and e.code == "session.ended"):
                said = _closed_after(e, session, c, args.recording,  # the session ended with one DELETE
                                     token_given=args.token is not None)
                if said is e:
                    raise
                raise said from e
            ended = e
            stopped = _ended_by_a_stop(e, session, c, args.recording, token_given=args.token is not None)
            if stopped is not None:
                raise stopped from e
        view = session.close()
        if ended is not None:
            if view.reason != "max_seconds":  # not the limit the user set: a failure, said as one
                raise ended
            print(f"lipsync: the session reached --max-seconds ({args.max_seconds:g} s) before the end of "
                  f"{args.audio}: it ended then, and its stream and recording hold what it had rendered by then "
                  f"({view.seconds_rendered:.2f} of the {view.seconds_received:.2f} s of speech it received)",
                  file=sys.stderr)
        if args.recording:
            session.download_recording(args.recording)
            print(f"wrote {args.recording}", file=sys.stderr)
        print(f"session {view.id} {view.state} ({view.reason}): {view.seconds_received:.2f} s of speech received, "
              f"{view.seconds_rendered:.2f} s rendered"
              + (f" ({view.seconds_skipped:.2f} s of pauses left out to catch up)" if view.seconds_skipped else "")
              + f"; latency p50 {view.latency_p50_s} s, p95 "
              f"{view.latency_p95_s} s, max {view.latency_max_s} s over {view.latency_samples} chunks; "
              f"stalls {view.stalls}, longest playlist gap {view.longest_gap_s} s; segments <= "
              f"{view.segment_seconds} s"
              + (f"; RTMP {view.rtmp_state} to {view.rtmp_url}" + (f" ({view.rtmp_error})" if view.rtmp_error
                                                                    else "") if view.rtmp_url else ""))
        return 0 if view.state == "ended" else 1
    return _client_call(args, run)


def cmd_models(args: argparse.Namespace) -> int:
    """List the models in the model directory: contract, crop recipe, precision, device."""
    import json

    from cluster.models import list_models

    settings = _settings(args)
    try:
        rows = list_models(settings)
    except LipsyncError as e:
        print(_fail_line(e.to_info()), file=sys.stderr)
        return 2
    except OSError as e:  # its models directory cannot be made or read: the storage root is not one
        print(f"lipsync: error: settings.invalid: storage_root: {e.strerror or e} ({e.filename}; "
              f"LIPSYNC_STORAGE_ROOT)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"models in {settings.dir('models')} (put Wav2Lip-class .onnx files there; a job names one by its "
          f"name, a local render also by its path):")
    for r in rows:
        where = f" ({r['model']})" if r["model"] != r["name"] else ""
        if "error" in r:
            print(f"  {r['name']}{where}: cannot load: {r['error']}")
            continue
        print(f"  {r['name']}{where}: S={r['size']} batch={r['batch']} crop={r['crop']} ({r['crop_from']}) "
              f"{r['precision']} device={r['device'].replace('ExecutionProvider', '')}")
    return 0


def _bounded_int(low: int, high: int | None, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value
    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value:g} is not a number of seconds above 0")
    return value


_port_number = _bounded_int(1, 65535, "a TCP port (1-65535)")
_positive_int = _bounded_int(1, None, "1 or more")
_crf = _bounded_int(0, 51, "an x264 CRF (0-51)")
_count = _bounded_int(0, None, "0 or more")


RAY_TEMP_DIR_HELP = ("a directory of yours for the embedded Ray's sessions (made 0700; they go in its ray/; a short "
                     "path; default: lipsync-UID in the temporary directory)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lipsync", description="Lip-sync rendering cluster.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (also taken after the command)")
    # the client commands' --url and --token, also taken before the command (`lipsync --token T status ID`)
    p.add_argument("--url", default=None, help="service URL, for the client commands (also taken after them)")
    p.add_argument("--token", default=None, help="API token, for the client commands (also taken after them)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-o", "--output", required=True, help="output .mp4")
        sp.add_argument("--model", help="'builtin' (default) or a Wav2Lip-class .onnx file")
        sp.add_argument("--workers", type=int, help="model workers (default: one per GPU, else 1)")
        sp.add_argument("--compositors", type=int, help="compositor actors (default: from CPUs)")
        sp.add_argument("--chunk-seconds", type=float, help="seconds of output per chunk (default 2)")
        sp.add_argument("--local", action="store_true", help="render in this process, without Ray")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        sp.add_argument("--ray-temp-dir", help=RAY_TEMP_DIR_HELP)

    r = sub.add_parser("render", help="render a lip-synced video")
    r.add_argument("--audio", required=True, help="speech audio (any format ffmpeg reads)")
    r.add_argument("--video", required=True, help="template video of the person")
    r.add_argument("--sync-mode", choices=["pingpong", "loop", "cut_off", "silence", "remap"],
                   help="when audio and video differ in length, as the API's sync_mode (default pingpong)")
    r.add_argument("--loop", choices=["pingpong", "forward"], help=argparse.SUPPRESS)  # (--sync-mode's older name)
    r.add_argument("--crf", type=_crf, help="output quality (x264 CRF 0-51; lower is better; default LIPSYNC_CRF)")
    common(r)
    r.set_defaults(func=cmd_render)

    d = sub.add_parser("demo", help="render the bundled example (generated speech + a real face)")
    common(d)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="list the models in the model directory and how they would run")
    m.add_argument("--json", action="store_true", help="one JSON list instead of lines")
    m.set_defaults(func=cmd_models)

    sv = sub.add_parser("serve", help="start Ray (or join RAY_ADDRESS) and the HTTP service")
    sv.add_argument("--host", default="127.0.0.1", help="the address the API listens on (default 127.0.0.1; "
                    "another needs LIPSYNC_API_TOKEN or --insecure)")
    sv.add_argument("--port", type=_port_number, default=8000, help="the API's port (default 8000)")
    sv.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    sv.add_argument("--num-cpus", type=_positive_int, help="logical CPUs of the embedded Ray head")
    sv.add_argument("--num-gpus", type=_count, help="logical GPUs of the embedded Ray head")
    sv.add_argument("--no-dashboard", action="store_true", help="no Ray dashboard (faster start)")
    sv.add_argument("--dashboard-port", type=_port_number, default=None,
                    help=f"the Ray dashboard's port (default {DASHBOARD_PORT}, or a free one when another process "
                         f"holds it)")
    sv.add_argument("--metrics-port", type=_port_number, default=None,
                    help="the port the embedded Ray exports Prometheus metrics on, on loopback (default: one Ray "
                         "picks at each start, named in its session directory)")
    sv.add_argument("--ray-temp-dir", help=RAY_TEMP_DIR_HELP)
    sv.set_defaults(func=cmd_serve)

    def remote(sp: argparse.ArgumentParser) -> None:  # (SUPPRESS: no default that would undo one given before)
        sp.add_argument("--url", default=argparse.SUPPRESS,
                        help="service URL (default $LIPSYNC_URL or http://127.0.0.1:8000)")
        sp.add_argument("--token", default=argparse.SUPPRESS, help="API token (default $LIPSYNC_API_TOKEN)")
        sp.set_defaults(remote=True)

    sb = sub.add_parser("submit", help="submit a job to the service")
    sb.add_argument("audio", help="local file (uploaded), http(s) URL, or a path under the server's input roots")
    sb.add_argument("video", nargs="?", help="template video (same forms as audio)")
    sb.add_argument("--avatar", help="a prepared avatar id instead of a video")
    sb.add_argument("--id", help="client-chosen job id (resubmission is idempotent)")
    sb.add_argument("--sync-mode", choices=["pingpong", "loop", "cut_off", "silence", "remap"])
    sb.add_argument("--model", help="'builtin' or a model name on the server")
    sb.add_argument("--crf", type=_crf, help="output quality (x264 CRF 0-51; lower is better)")
    sb.add_argument("--callback-url", help="POSTed the final status (signed) when the job ends")
    sb.add_argument("--watch", action="store_true", help="print the job's HLS watch URL (for a player) as soon as "
                    "its first segment exists")
    sb.add_argument("--wait", action="store_true", help="wait for the job to end")
    sb.add_argument("-o", "--output", help="download the result here (implies --wait)")
    sb.add_argument("--timeout", type=_positive_seconds, default=None, help="seconds to wait at most")
    sb.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    remote(sb)
    sb.set_defaults(func=cmd_submit)

    for name, fn, hlp in (("status", cmd_status, "a job's status (JSON)"), ("wait", cmd_wait, "wait for a job"),
                          ("cancel", cmd_cancel, "cancel a job"),
                          ("purge", cmd_purge, "remove a finished job's files on the service now (output, stream, "
                                               "inputs), as retention does; its record stays")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("id")
        if name == "wait":
            sp.add_argument("--timeout", type=_positive_seconds, default=None,
                            help="seconds to wait at most (default: until the job ends, 6 h at most)")
            sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        remote(sp)
        sp.set_defaults(func=fn)
    ls = sub.add_parser("list", help="the service's jobs, newest first")
    ls.add_argument("--state", action="append", choices=[s.value for s in JobState],
                    help="only jobs in this state (repeatable)")
    ls.add_argument("--limit", type=_bounded_int(1, 500, "1-500"), default=20, help="jobs per page (default 20)")
    ls.add_argument("--before", metavar="ID", help="the page after this job (what the last page printed)")
    ls.add_argument("--json", action="store_true", help="the page as JSON (JobPage)")
    remote(ls)
    ls.set_defaults(func=cmd_list)
    av = sub.add_parser("avatar", help="prepare an avatar of a template video once; prints its id (for submit "
                        "--avatar and live --avatar)")
    av.add_argument("video", help="local file (uploaded) or http(s) URL of the template video")
    av.add_argument("--json", action="store_true", help="the avatar as JSON instead of its id")
    remote(av)
    av.set_defaults(func=cmd_avatar)
    avs = sub.add_parser("avatars", help="the service's prepared avatars")
    avs.add_argument("--limit", type=_bounded_int(1, 1000, "1-1000"), default=100, help="avatars listed (default 100)")
    avs.add_argument("--offset", type=_count, default=0, help="skip this many (the next page)")
    avs.add_argument("--json", action="store_true", help="the list as JSON")
    remote(avs)
    avs.set_defaults(func=cmd_avatars)
    ses = sub.add_parser("sessions", help="the service's live sessions not yet ended (to watch or end one)")
    ses.add_argument("--json", action="store_true", help="the list as JSON")
    remote(ses)
    ses.set_defaults(func=cmd_sessions)
    lv = sub.add_parser("live", help="stream an audio file into a live session; prints the HLS URL and latency")
    lv.add_argument("--avatar", required=True, help="a prepared avatar id (`lipsync avatar VIDEO` prints one)")
    lv.add_argument("--audio", required=True, help="a local audio file (sent as PCM over the session's socket)")
    lv.add_argument("--realtime", action="store_true", help="pace the audio at real time (as a microphone would)")
    lv.add_argument("--sample-rate", type=int, choices=[16000, 24000, 48000], default=16000)
    lv.add_argument("--model", help="'builtin' or a model name on the server")
    lv.add_argument("--recording", help="download the session's recording (mp4) here at the end")
    lv.add_argument("--segment-seconds", type=float, metavar="S",
                    help="the stream's longest HLS segment, 0.2-6 s (server default 0.5; shorter: closer to live, "
                    "more bitrate)")
    lv.add_argument("--max-seconds", type=float, metavar="S", help="end the session after this long")
    lv.add_argument("--rtmp", metavar="URL", help="also push the stream to this RTMP server "
                    "(rtmp://host/app/stream-key, e.g. a live-stream platform's ingest URL)")
    remote(lv)
    lv.set_defaults(func=cmd_live)
    dl = sub.add_parser("download", help="download a job's result")
    dl.add_argument("id")
    dl.add_argument("output")
    dl.add_argument("--wait", action="store_true", help="wait for the job to end first")
    dl.add_argument("--timeout", type=_positive_seconds, default=None, help="seconds to wait at most (with --wait)")
    remote(dl)
    dl.set_defaults(func=cmd_download)
    for sp in sub.choices.values():  # -v also after the command, as --url and --token (SUPPRESS: as in `remote`)
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    return p


def _unknown_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """Exit 2 naming `unknown` with the usage of the command they were given to, and the option that is nearest to
    a mistyped one (`--ouput`: `--output`)."""
    import difflib

    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    command = commands.get(getattr(args, "command", None), parser)
    options = [o for action in command._actions for o in action.option_strings]
    hints = []
    for given in unknown:
        near = difflib.get_close_matches(given.split("=")[0], options, n=1, cutoff=0.6) if given.startswith("-") else []
        if near:
            hints.append(f"{given}: did you mean {near[0]}?")
    command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own usage, with the option meant (a probe got the top-level usage only)
        _unknown_arguments(parser, args, unknown)
    given = [flag for flag, value in (("--url", args.url), ("--token", args.token)) if value is not None]
    if not getattr(args, "remote", False) and given:
        parser.error(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for the client commands, "
                     f"not {args.command}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lipsync.client").setLevel(logging.INFO)  # a retry says what it waits for
    if args.command != "serve":  # (which refuses them)
        for problem in unknown_variables(os.environ):
            print(f"lipsync: warning: {problem}: ignored", file=sys.stderr)
    try:
        # every lipsync.* line one JSON object, as the service's are (the settings read only when it is asked
        # for: a client command does not fail on a server setting it never uses)
        if os.environ.get("LIPSYNC_LOG_FORMAT") and _log_format() == "json":
            from cluster import logs

            logs.configure("json", logging.INFO if args.verbose else logging.WARNING)
        return args.func(args)
    except KeyboardInterrupt:
        print("lipsync: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # what reads the output went away (`| head`): said by the shell's convention
        return _stdout_gone()
    except ValidationError as e:  # a setting (LIPSYNC_* or a flag that sets one) out of its range
        for err in e.errors():
            if not err["loc"]:  # settings that disagree with each other: the message names them
                print(f"lipsync: error: settings.invalid: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
                continue
            field = ".".join(str(p) for p in err["loc"])
            flag = f" or {FLAG_OF_SETTING[field]}" if field in FLAG_OF_SETTING and args.command in ("render", "demo") \
                else ""  # (the commands with those flags)
            print(f"lipsync: error: settings.invalid: {field}: {err['msg']} (got {err.get('input')!r}; "
                  f"LIPSYNC_{field.upper()}{flag})", file=sys.stderr)
        return 2


def _log_format() -> str:
    """The log format the settings say; text where they are invalid (a command that needs them says so
    itself; a client command never reads them)."""
    try:
        return Settings().log_format
    except ValidationError:
        return "text"


def entry() -> None:
    """The `lipsync` command (and `python -m cluster.cli`): `main`, then exit with its status.
    A process that ran a Ray driver leaves with `os._exit` once its logs and output are flushed:
    everything of ours is stopped by then (the embedded Ray by `stop_embedded` / `stop_service`),
    and the interpreter's own teardown of a Ray driver (the destructors of Ray's core worker and
    gRPC; py-spy: the main thread in C code, no Python frame) took ~1 s after `lipsync render` and
    2-8 s after `lipsync serve` (idle / after one job): time a supervisor's SIGTERM grace period
    or a one-shot render's user spent on nothing."""
    code = main()
    if "ray" not in sys.modules:
        sys.exit(code)
    import os

    if (framecache := sys.modules.get("cluster.media.framecache")) is not None:
        framecache.abandon_builds()  # (atexit does not run past os._exit) no half-written frame file left

    logging.shutdown()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _stdout_gone()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    entry()
