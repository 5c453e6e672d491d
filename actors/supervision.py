"""Supervision of the job manager's actors: create (or re-attach to) the detached model workers
and compositors, probe them until they answer, take lost ones out of rotation and bring them back.

Which member serves next is decided by `cluster.scheduling.WorkerTable` (plain Python); this
module only wires it to real actor handles.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import ray

from actors import metrics, task_apart
from actors.calls import Kind, outcome
from actors.compositor import Compositor
from actors.model_worker import ModelWorker
from cluster.config import Settings
from cluster.errors import ModelContractError, ModelLoadError, PlacementError
from cluster.scheduling import (
    Health,
    Member,
    PoolSize,
    WorkerTable,
    autoscaler_bundles,
    compositor_memory_bytes,
    fit_pool,
    size_pool,
    surplus_members,
)

log = logging.getLogger("lipsync.supervision")

class GcsSlow(TimeoutError):
    """Ray's control store gave no answer in time (slow, or restarting)."""


def cluster_state() -> tuple[dict, set[str]]:
    """Ray's cluster resources and the ids of its live nodes (two synchronous GCS reads)."""
    return ray.cluster_resources(), {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def cluster_gpus() -> float:
    """The GPUs Ray's cluster holds now (a synchronous GCS read)."""
    return float(ray.cluster_resources().get("GPU", 0))


def named_actor_exists(name: str, namespace: str) -> bool:
    """Whether the GCS still holds the actor `name` (alive or restarting); a synchronous GCS read."""
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        return False


MODEL_WORKER_PREFIX = "lipsync-model-worker-"
COMPOSITOR_PREFIX = "lipsync-compositor-"


class TaskSet:
    """Background coroutines of an actor: kept referenced, and any failure logged (never lost)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro, apart: bool = False) -> asyncio.Task:
        """Run `coro` in the background, in a copy of the current context (its log fields: a job's task's
        chunks carry its job id), or `apart` in a context of its own (`task_apart`)."""
        task = task_apart(coro) if apart else asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception(), exc_info=task.exception())


class Supervisor:
    """The two pools of actors (model workers, compositors) and their health."""

    def __init__(self, settings: Settings, tasks: TaskSet, work: asyncio.Event) -> None:
        self.s = settings
        self.tasks = tasks
        self.work = work  # set whenever capacity changes, so the scheduler looks again
        self.models = WorkerTable(settings.max_inflight_per_worker)
        self.compositors = WorkerTable(max_inflight=settings.chunks_per_compositor)
        self._factories: dict[str, functools.partial] = {}
        self._requested: list[dict[str, float]] = []  # the bundles asked of the autoscaler
        self._surplus_since: dict[str, float] = {}  # pool prefix -> when it first had more members than fit
        self.started = False  # the pool was created (or re-attached to)
        # Ray's control-store (GCS) reads of the reconciler and the probes: synchronous calls, made here and
        # not on the manager's event loop (they held every call of the manager while the GCS was slow or
        # restarting); a pool of their own, so reads that hang never take the threads the jobs' work runs on
        self._gcs_threads = ThreadPoolExecutor(2, thread_name_prefix="gcs-read")
        self._cluster_read: asyncio.Future | None = None
        self._asking: asyncio.Future | None = None  # the autoscaler's request in flight (`_request_capacity`)

    # --- creation ------------------------------------------------------------------------
    def _create_worker(self, name: str, gpus: float):
        opts = dict(name=name, namespace=self.s.namespace, lifetime="detached", get_if_exists=True, num_cpus=1)
        if gpus:
            opts["num_gpus"] = self.s.worker_gpus
        return ModelWorker.options(**opts).remote(self.s.model, self.s, name)

    def _create_compositor(self, name: str):
        return Compositor.options(name=name, namespace=self.s.namespace, lifetime="detached",
                                  get_if_exists=True, num_cpus=self.s.compositor_cpus,
                                  max_concurrency=self.s.chunks_per_compositor).remote(self.s, name)

    def _pool_resources(self, res: dict) -> dict:
        """`size_pool`/`fit_pool` keywords from the settings and the cluster's Ray memory (`res`: Ray's
        cluster resources, as the caller read them)."""
        return dict(memory_bytes=float(res.get("memory", 0)),
                    compositor_cpus=self.s.compositor_cpus,
                    compositor_memory_bytes=compositor_memory_bytes(self.s.compositor_memory_mb,
                                                                    self.s.chunks_per_compositor))

    def sizes(self) -> PoolSize:
        """The pool for the cluster's resources now (`PlacementError` when it cannot be placed)."""
        res = ray.cluster_resources()
        return size_pool(float(res.get("CPU", 0)), float(res.get("GPU", 0)), self.s.model_workers,
                         self.s.compositors, self.s.worker_gpus, **self._pool_resources(res))

    async def start(self) -> None:
        """Create (or re-attach to) every member and probe each until it answers.

        A first start refuses settings the cluster cannot hold (`PlacementError`, naming the
        missing resource); `run_reconciler` tries again until the cluster holds them (e.g. GPU
        worker pods that join after the head). A restarted job manager re-attaches to the members
        that exist, whatever the cluster holds now; `reconcile` then fits the pool to it. What it
        reads of the GCS is read in `_gcs_threads` (`GcsSlow` past `actor_call_timeout_s`)."""
        existing = await self._gcs_read("the pool's actors", self._existing_members)
        if existing:  # only those: creating others now would compete with them for the cluster
            log.info("re-attaching to the pool's %d existing member(s); reconcile fits it to the cluster",
                     len(existing))
            gpus_per_worker = self.s.worker_gpus if await self._gcs_read("the cluster's GPUs", cluster_gpus) else 0.0
            names = sorted(existing, key=lambda n: (n.rsplit("-", 1)[0], int(n.rsplit("-", 1)[1])))
        else:
            size = await self._gcs_read("the cluster's resources", self.sizes)
            gpus_per_worker = size.gpus_per_worker
            names = ([f"{MODEL_WORKER_PREFIX}{i}" for i in range(size.model_workers)]
                     + [f"{COMPOSITOR_PREFIX}{i}" for i in range(size.compositors)])
        for name in names:
            if name.startswith(MODEL_WORKER_PREFIX):
                self._add(self.models, name, functools.partial(self._create_worker, name, gpus_per_worker))
            else:
                self._add(self.compositors, name, functools.partial(self._create_compositor, name))
        self.started = True

    def _existing_members(self) -> set[str]:
        """Names of this namespace's model workers and compositors that Ray still has (alive,
        restarting or waiting to be placed)."""
        prefixes = (MODEL_WORKER_PREFIX, COMPOSITOR_PREFIX)
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a.get("namespace") == self.s.namespace and a["name"].startswith(prefixes)
                and a["name"].rsplit("-", 1)[-1].isdigit()}

    # --- following the cluster -------------------------------------------------------------
    async def run_reconciler(self, queue_depth: Callable[[], int], on_started: Callable[[], None]) -> None:
        """Every pool_reconcile_s: start the pool if its first start was refused (calling
        `on_started` once it is), then follow the cluster's resources (never dies)."""
        refused = None
        while True:
            await asyncio.sleep(self.s.pool_reconcile_s)
            try:
                if not self.started:
                    await self.start()
                    log.info("the cluster now holds the pool: started it")
                    on_started()
                await self.reconcile(queue_depth())
            except PlacementError as e:
                if str(e) != refused:
                    log.warning("the pool cannot start yet: %s", e)
                refused = str(e)
            except GcsSlow as e:
                log.warning("%s: the pool is fitted to the cluster again next round", e)
            except Exception:
                log.exception("pool reconciliation failed; trying again")

    async def reconcile(self, queued_chunks: int = 0) -> None:
        """Follow the cluster's resources: take members whose node left out of rotation at once
        (Ray restarts them where there is room), fit the pools to what the cluster holds now
        (`fit_pool`: a GPU node that joined gets a model worker, compositors follow the CPUs
        within the settings, and a cluster that shrank keeps no member waiting for resources
        that are gone), and ask the autoscaler for GPU bundles while chunks wait and every worker
        is busy."""
        if self._cluster_read is None or self._cluster_read.done():  # one read at a time, however long it takes
            if self._cluster_read is not None and not self._cluster_read.cancelled() and \
                    (late := self._cluster_read.exception()) is not None:  # a read that failed after its wait
                log.warning("a late read of the cluster's resources failed: %r", late)
            self._cluster_read = asyncio.get_running_loop().run_in_executor(self._gcs_threads, cluster_state)
        res, alive_nodes = await self._gcs_answer("the cluster's resources and nodes",
                                                  asyncio.shield(self._cluster_read))
        await self._mark_departed(alive_nodes)
        size = fit_pool(float(res.get("CPU", 0)), float(res.get("GPU", 0)), self.s.model_workers,
                        self.s.compositors, self.s.worker_gpus, **self._pool_resources(res))
        await self._resize(self.models, MODEL_WORKER_PREFIX, size.model_workers,
                           lambda name: functools.partial(self._create_worker, name, size.gpus_per_worker))
        await self._resize(self.compositors, COMPOSITOR_PREFIX, size.compositors,
                           lambda name: functools.partial(self._create_compositor, name))
        await self._request_capacity(queued_chunks, float(res.get("GPU", 0)))

    async def _gcs_read(self, what: str, read: Callable, *args):
        """`read(*args)`, a synchronous GCS read, run in `_gcs_threads` (`_gcs_answer`)."""
        return await self._gcs_answer(what, asyncio.get_running_loop().run_in_executor(self._gcs_threads, read,
                                                                                       *args))

    async def _gcs_answer(self, what: str, read: asyncio.Future):
        """What `read` (a GCS read in `_gcs_threads`) answers, within `actor_call_timeout_s`; `GcsSlow`
        past it."""
        try:
            return await asyncio.wait_for(read, self.s.actor_call_timeout_s)
        except asyncio.TimeoutError:
            raise GcsSlow(f"Ray's control store (GCS) gave no answer about {what} within "
                          f"{self.s.actor_call_timeout_s:g} s") from None

    async def _mark_departed(self, alive_nodes: set[str]) -> None:
        """A member that looks live but whose node has left is lost (its next batch would only
        time out); it is probed back once Ray restarts it elsewhere."""
        for table in (self.models, self.compositors):
            for member in list(table.members.values()):
                node = member.info.get("node")
                if member.health == Health.live and node and node not in alive_nodes:
                    await self.lost(table, member, f"its node {node[:8]} left the cluster")

    async def _resize(self, table: WorkerTable, prefix: str, want: int, factory_for) -> None:
        have = len(table.members)
        for _ in range(have, want):
            name = next(f"{prefix}{k}" for k in range(10_000) if f"{prefix}{k}" not in table.members)
            log.info("the cluster has room for %s: adding it", name)
            self._add(table, name, factory_for(name))
        surplus = have - want
        now = time.monotonic()
        grace = self.s.stall_timeout_s / 4
        if surplus > 0:  # idle live members go only once the surplus has lasted (a node may come back)
            since = self._surplus_since.setdefault(prefix, now)
        else:
            since = self._surplus_since.pop(prefix, now)
        lasted = now - since >= grace
        # compositors whose chunks wait for a model worker that cannot start (a node with the only one left
        # and the compositors hold every CPU): one goes even with a chunk in flight, or every job fails when
        # its stall timeout ends (its chunk is dispatched again once the model worker is up)
        no_model = table is self.compositors and not any(m.health == Health.live for m in self.models.members.values())
        drop = surplus_members(list(table.members.values()), surplus, now, stale_after_s=grace,
                               idle_too=lasted, busy_too=lasted and no_model)
        for member in drop:
            log.warning("dropping %s (%s): the cluster now holds %d of its kind, the pool had %d",
                        member.name, member.health.value, want, have)
            await table.remove(member.name)
            self._factories.pop(member.name, None)
            try:
                ray.kill(member.handle, no_restart=True)
            except Exception as e:
                log.warning("kill %s: %r", member.name, e)
        if drop or have < want:
            self.work.set()

    async def _request_capacity(self, queued_chunks: int, cluster_gpus: float) -> None:
        """Ask Ray's autoscaler for one more model worker and/or compositor while chunks wait and
        those are busy (`autoscaler_bundles`); release the request when the queue is empty. The request
        is a GCS write: made in `_gcs_threads` (on the event loop it held every call of the job manager
        while the GCS was slow)."""
        try:
            from ray.autoscaler.sdk import request_resources
        except ImportError:
            return
        bundles = autoscaler_bundles(queued_chunks, self.models, self.compositors, cluster_gpus, self.s.worker_gpus,
                                     self.s.compositor_cpus)
        if bundles != self._requested and (self._asking is None or self._asking.done()):  # (one at a time)
            if bundles:
                log.info("asking the autoscaler for %d bundle(s) %s", len(bundles), sorted(
                    {str(b) for b in bundles}))
            self._asking = asyncio.get_running_loop().run_in_executor(
                self._gcs_threads, functools.partial(request_resources, bundles=bundles))
            await self._gcs_answer("the autoscaler's request", asyncio.shield(self._asking))
            self._requested = bundles

    def _add(self, table: WorkerTable, name: str, factory: functools.partial) -> Member:
        self._factories[name] = factory
        member = table.add(name, factory())
        self.tasks.spawn(self.probe(table, member), apart=True)  # (the pool's: no job's fields)
        return member

    def _first_timeout(self, table: WorkerTable) -> float:
        return self.s.model_load_timeout_s if table is self.models else self.s.actor_call_timeout_s

    async def alive(self, name: str) -> bool:
        """Whether a named actor still exists (alive or restarting); a dead one has lost its name. Asked of
        the GCS in `_gcs_threads`; one that gives no answer in time leaves the actor taken as existing."""
        try:
            return await self._gcs_read(f"actor {name}", named_actor_exists, name, self.s.namespace)
        except GcsSlow as e:
            log.warning("%s: %s taken as still there", e, name)
            return True

    def kill_for_restart(self, member: Member) -> None:
        metrics.record_replacement(metrics.actor_kind(member.name), "restart")
        member.replacement_counted = True
        try:
            ray.kill(member.handle, no_restart=False)
        except Exception as e:  # already gone: Ray restarts it, or the probe replaces it
            log.warning("kill %s: %r", member.name, e)

    async def _replace(self, member: Member, why: str, kill: bool = False) -> None:
        """Create a member anew under its name (dead for good, or built with other settings)."""
        log.warning("replacing %s: %s", member.name, why)
        metrics.record_replacement(metrics.actor_kind(member.name), "killed" if kill else "dead")
        member.replacement_counted = True
        if kill:
            ray.kill(member.handle, no_restart=True)
            until = time.monotonic() + 10.0  # its name is freed once Ray has it dead
            while time.monotonic() < until and await self.alive(member.name):
                await asyncio.sleep(0.1)
        factory = self._factories.get(member.name)
        if factory is None:  # dropped from the pool meanwhile (the cluster no longer has room for it)
            return
        member.handle = factory()
        member.error = why

    # --- health --------------------------------------------------------------------------
    async def probe(self, table: WorkerTable, member: Member) -> None:
        """Ask a member for `info` until it answers live. A member that stays silent past the
        deadline is killed (Ray restarts it); one dead for good, or built with other settings, is
        replaced; one whose model cannot load is `failed`, and its load is retried now and then.
        A step that raises (Ray's control store briefly unreachable, a replacement whose name is
        still taken) is logged and the round tried again: a probe ends only with the member live
        or dropped from the pool, never leaving it out of rotation for good."""
        first_timeout = self._first_timeout(table)
        deadline = time.monotonic() + first_timeout
        while True:
            try:
                if table.members.get(member.name) is not member:  # dropped from the pool
                    return
                answer = await outcome(member.handle.info.remote(),
                                       timeout=min(10.0, max(1.0, deadline - time.monotonic())))
                if table.members.get(member.name) is not member:  # dropped while it was asked
                    return
                if not answer.ok:
                    if answer.kind == Kind.died and not await self.alive(member.name):
                        await self._replace(member, f"died for good: {answer.error}")
                        deadline = time.monotonic() + first_timeout
                    elif time.monotonic() > deadline:
                        log.error("%s gave no answer within %.0f s (%s): killing it for a restart", member.name,
                                  first_timeout, answer.describe(member.name, "info"))
                        self.kill_for_restart(member)
                        deadline = time.monotonic() + first_timeout
                    await asyncio.sleep(0.5)
                    continue
                info = answer.value
                if info.get("settings") != self.s.fingerprint():
                    await self._replace(member, "it was built with other settings", kill=True)
                    deadline = time.monotonic() + first_timeout
                    continue
                if info.get("ready", True):
                    before = member.info.get("pid")
                    if before and info.get("pid") and info["pid"] != before and not member.replacement_counted:
                        # a new process that the supervisor did not make: Ray restarted the actor after its
                        # process died (SIGKILL, the OOM killer), which the counter missed
                        metrics.record_replacement(metrics.actor_kind(member.name), "died")
                    member.replacement_counted = False
                    await table.set_health(member, Health.live, info=info)
                    log.info("%s live: %s", member.name, info)
                    self.work.set()
                    return
                await table.set_health(member, Health.failed, info=info, error=info.get("error"))
                self.work.set()
                await asyncio.sleep(self.s.model_retry_s)  # then try the load again: it may have been transient
                retried = await outcome(member.handle.describe.remote(self.s.model),
                                        timeout=self.s.model_load_timeout_s)
                if not retried.ok:
                    log.warning("%s still cannot load %s: %s", member.name, self.s.model,
                                retried.describe(member.name, "describe"))
                deadline = time.monotonic() + first_timeout
            except Exception:
                log.exception("probing %s failed; trying again in 1 s", member.name)
                await asyncio.sleep(1.0)

    async def lost(self, table: WorkerTable, member: Member, why: str, kill: bool = False) -> None:
        """Take a member out of rotation (killing it first where it is stuck) and probe it back."""
        if kill:
            self.kill_for_restart(member)
        if member.health == Health.lost:
            return
        log.warning("%s lost (%s)%s", member.name, why, "; killed it for a restart" if kill else "")
        await table.set_health(member, Health.lost)
        # a probe that may outlive the job whose chunk found the member lost: its lines carried that job's id,
        # every 30 s, long after the job had ended
        self.tasks.spawn(self.probe(table, member), apart=True)

    def load_error(self) -> ModelLoadError | ModelContractError:
        """Why no model worker serves, as the workers' load failed: a model that does not fit the
        contract keeps its own code (bad input, exit 2), as when it is loaded in process."""
        err = next((m.error for m in self.models.members.values() if isinstance(m.error, dict)), None) or {}
        kind = ModelContractError if err.get("code") == ModelContractError.code else ModelLoadError
        return kind(f"no model worker can serve: the model {self.s.model!r} (LIPSYNC_MODEL, or the command's "
                    f"--model) cannot be loaded: {err.get('message')}", stage="prepare", cause=err.get("cause"),
                    path=err.get("path"))

    # --- reporting -----------------------------------------------------------------------
    def settled(self) -> bool:
        """Every member has answered once (live, or failed to load)."""
        return all(m.health != Health.starting for t in (self.models, self.compositors) for m in t.members.values())

    def snapshot(self) -> dict:
        return {"models": self.models.snapshot(), "compositors": self.compositors.snapshot()}

    async def refresh(self, timeout: float) -> dict:
        """Ask every live member for fresh `info` (pid, node, frames served), then `snapshot()`."""
        async def one(member: Member) -> None:
            answer = await outcome(member.handle.info.remote(), timeout)
            if answer.ok:
                member.info = answer.value
            else:  # reported, not acted on: probes do that
                member.info = {**member.info, "stale": f"no answer to info: {answer.kind.value}"}
        await asyncio.gather(*(one(m) for t in (self.models, self.compositors) for m in t.live()))
        return self.snapshot()
