"""Scheduling decisions of the job manager, as plain Python (no Ray): which worker gets the next
batch, which job's chunk runs next. The actor only wires these to real handles.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


class Health(str, enum.Enum):
    starting = "starting"   # created, not yet answered
    live = "live"
    lost = "lost"           # died or stalled; being restarted, probed until it answers
    failed = "failed"       # cannot serve (e.g. model load error); stays out


@dataclass
class Member:
    name: str
    handle: Any
    health: Health = Health.starting
    inflight: int = 0
    served: int = 0
    info: dict = field(default_factory=dict)
    error: Any = None
    lost_at: float = 0.0
    created_at: float = field(default_factory=time.monotonic)
    replacement_counted: bool = False  # its next new process is one the supervisor made (and counted)


class WorkerTable:
    """A set of actors with health and in-flight counts; hands out the least-loaded live one.

    `acquire` waits (with a deadline) while every live member is at `max_inflight`: that is the
    backpressure that keeps a bounded number of batches queued per worker.
    """

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.members: dict[str, Member] = {}
        self._changed = asyncio.Condition()

    def add(self, name: str, handle: Any) -> Member:
        m = self.members.get(name)
        if m is None:
            m = self.members[name] = Member(name, handle)
        else:
            m.handle = handle
        return m

    async def remove(self, name: str) -> Member | None:
        """Drop a member from the pool (its node left); waiters look again."""
        async with self._changed:
            member = self.members.pop(name, None)
            self._changed.notify_all()
            return member

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.health == Health.live]

    def all_failed(self) -> bool:
        return bool(self.members) and all(m.health == Health.failed for m in self.members.values())

    def pick(self, where: Callable[[Member], bool] | None = None) -> Member | None:
        """The live member (satisfying `where`) with the fewest batches in flight (ties: fewest
        served), if under the limit."""
        ready = [m for m in self.live() if m.inflight < self.max_inflight and (where is None or where(m))]
        if not ready:
            return None
        return min(ready, key=lambda m: (m.inflight, m.served, m.name))

    async def acquire(self, timeout: float, where: Callable[[Member], bool] | None = None) -> Member | None:
        """Reserve a slot on the least-loaded live member (satisfying `where`); None when none
        frees up within `timeout`."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                m = self.pick(where)
                if m is not None:
                    m.inflight += 1
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self.all_failed():
                    return None
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
                except asyncio.TimeoutError:
                    pass

    async def release(self, m: Member, ok: bool = True) -> None:
        async with self._changed:
            m.inflight = max(0, m.inflight - 1)
            if ok:
                m.served += 1
            self._changed.notify_all()

    async def set_health(self, m: Member, health: Health, info: dict | None = None, error: Any = None) -> None:
        async with self._changed:
            m.health = health
            if info is not None:
                m.info = info
            if error is not None:
                m.error = error
            if health == Health.lost:  # its slots stay counted: each holder releases its own when its
                m.lost_at = time.monotonic()  # call ends (every call has a deadline), so a member that
                # comes back live is not handed more than `max_inflight` while calls from before still run
            self._changed.notify_all()

    def snapshot(self) -> list[dict]:
        return [{"name": m.name, "health": m.health.value, "inflight": m.inflight, "served": m.served,
                 **({"error": str(m.error)} if m.error else {}), **m.info} for m in self.members.values()]

    def summary(self) -> str:
        """The members in a few words, for an error a user reads: how many in each health, and the
        last error seen (`snapshot` is the whole record, for the logs)."""
        counts = collections.Counter(m.health.value for m in self.members.values())
        errors = [m for m in self.members.values() if m.error]
        last = max(errors, key=lambda m: m.lost_at or m.created_at, default=None)
        said = ", ".join(f"{n} {health}" for health, n in sorted(counts.items())) or "none"
        return said + (f" (last error: {str(last.error)[:200]})" if last is not None else "")


@dataclass(frozen=True)
class PoolSize:
    model_workers: int
    compositors: int
    gpus_per_worker: float  # 0: CPU workers


def _asked_workers(gpus: float, model_workers: int | None, worker_gpus: float) -> int:
    """The model workers the settings ask for: `model_workers`, else one per `worker_gpus` GPUs
    (at least 1), else 1 on a cluster without GPUs."""
    # true division (with a hair of slack): 1 // 0.2 is 4.0 in floating point, not 5
    return model_workers or (max(1, int(gpus / worker_gpus + 1e-9)) if gpus else 1)


def _default_compositors(room_cpus: float, memory_bytes: float, compositor_cpus: float,
                         compositor_memory_bytes: float) -> int:
    """Compositors the cluster has room for: the CPUs left (`compositor_cpus` each) and, where
    the cluster's memory is known (`memory_bytes` > 0), no more than it holds at
    `compositor_memory_bytes` each; at least 1 (a pool without a compositor renders nothing)."""
    by_cpu = int(room_cpus / compositor_cpus + 1e-9)
    by_memory = int(memory_bytes // compositor_memory_bytes) if memory_bytes > 0 and compositor_memory_bytes > 0 \
        else by_cpu
    return max(1, min(by_cpu, by_memory))


#: What each chunk a compositor renders at once beyond the first adds to its memory, as a share of
#: `compositor_memory_mb` (its batches and a second libx264: +130-200 MiB measured at 720p against
#: 330-340 MiB for one chunk, docs/PERFORMANCE.md).
EXTRA_CHUNK_MEMORY_SHARE = 0.4


def compositor_memory_bytes(compositor_memory_mb: float, chunks_at_once: int) -> float:
    """The memory the pool sizing counts per compositor: `compositor_memory_mb` for one chunk at a
    time, and `EXTRA_CHUNK_MEMORY_SHARE` of it more for each further chunk it renders at once."""
    return compositor_memory_mb * 2**20 * (1 + EXTRA_CHUNK_MEMORY_SHARE * (chunks_at_once - 1))


def size_pool(cpus: float, gpus: float, model_workers: int | None, compositors: int | None,
              worker_gpus: float, *, memory_bytes: float = 0, compositor_cpus: float = 1.0,
              compositor_memory_bytes: float = 400 * 2**20) -> PoolSize:
    """How many model workers (1 CPU each, plus `worker_gpus` where the cluster has GPUs) and
    compositors (`compositor_cpus` each) to run on a cluster with `cpus`, `gpus` and
    `memory_bytes` (Ray's `memory` resource; 0: unknown). Defaults: one worker per GPU (else 1),
    compositors on the CPUs left and within the memory (`_default_compositors`: at least 1, no
    fixed upper bound: a 16-core node gets 15, issue 19).

    Raises `PlacementError` naming the missing resource when the actors asked for cannot all be
    placed, instead of letting a job wait for an actor that will never start."""
    from cluster.errors import PlacementError

    n_workers = _asked_workers(gpus, model_workers, worker_gpus)
    if model_workers is None:  # the default (one per GPU share) leaves a CPU for a compositor, as fit_pool does
        n_workers = max(1, min(n_workers, int(cpus + 1e-9) - 1))
    per_worker = worker_gpus if gpus else 0.0
    if per_worker and n_workers * per_worker > gpus + 1e-9:
        raise PlacementError(f"{n_workers} model worker(s) need {n_workers * per_worker:g} GPU(s) "
                             f"({worker_gpus:g} each, LIPSYNC_WORKER_GPUS); the cluster has {gpus:g} GPU(s)")
    n_comp = compositors or _default_compositors(cpus - n_workers, memory_bytes, compositor_cpus,
                                                 compositor_memory_bytes)
    need = n_workers + n_comp * compositor_cpus
    if need > cpus + 1e-9:
        raise PlacementError(f"{n_workers} model worker(s) and {n_comp} compositor(s) need {need:g} "
                             f"CPU(s) (1 per worker, {compositor_cpus:g} per compositor); the cluster has "
                             f"{cpus:g} CPU(s). Ask for fewer workers (--workers/--compositors) or add CPUs")
    return PoolSize(n_workers, n_comp, per_worker)


def fit_pool(cpus: float, gpus: float, model_workers: int | None, compositors: int | None,
             worker_gpus: float, *, memory_bytes: float = 0, compositor_cpus: float = 1.0,
             compositor_memory_bytes: float = 400 * 2**20) -> PoolSize:
    """The pool that fits the cluster's resources *now*, for a running job manager whose cluster
    may have shrunk (a node left) or grown: what the settings ask for (`size_pool`'s defaults),
    but never more than the GPUs and CPUs that are there, so that no member waits for resources
    forever. A pending member is worse than a missing one: when a live member restarts, Ray gives
    the freed CPU to whichever pending actor it picks, and a compositor that takes a restarting
    model worker's CPU leaves the pool without a model worker (docs/RELIABILITY.md).

    Model workers keep their place first (at least one, and one CPU left for a compositor);
    compositors get the CPUs left (and the memory, as in `size_pool`), at least one, at most what
    was asked for. Never raises: at start-up `size_pool` refuses a pool that does not fit; this
    follows the cluster afterwards."""
    per_worker = worker_gpus if gpus else 0.0
    n_workers = _asked_workers(gpus, model_workers, worker_gpus)
    if per_worker:
        n_workers = min(n_workers, int(gpus / per_worker + 1e-9))
    n_cpus = int(cpus + 1e-9)
    n_workers = max(1, min(n_workers, n_cpus - 1))
    room = max(1, _default_compositors(n_cpus - n_workers, memory_bytes, compositor_cpus,
                                       compositor_memory_bytes))
    n_comp = min(compositors, int((n_cpus - n_workers) / compositor_cpus + 1e-9) or 1) if compositors else room
    return PoolSize(n_workers, n_comp, per_worker)


def autoscaler_bundles(queued_chunks: int, models: WorkerTable, compositors: WorkerTable, cluster_gpus: float,
                       worker_gpus: float, compositor_cpus: float) -> list[dict[str, float]]:
    """What to ask Ray's autoscaler for (`ray.autoscaler.sdk.request_resources`: the whole set of
    bundles the cluster should be able to hold; [] releases the request): while chunks wait and
    every live model worker is at its limit, one more model worker's bundle (a GPU in it only on a
    cluster that has GPUs: a CPU cluster's autoscaler cannot place one); while more chunks wait
    than the compositors take and every live compositor is at its limit, one more compositor's.
    The pool then grows into the nodes that join (`fit_pool`)."""
    if queued_chunks <= 0:
        return []
    bundles: list[dict[str, float]] = []
    live_models, live_comps = models.live(), compositors.live()
    models_busy = all(m.inflight >= models.max_inflight for m in live_models)
    comps_busy = all(m.inflight >= compositors.max_inflight for m in live_comps)
    if models_busy and queued_chunks > len(live_comps):
        worker = {"CPU": 1.0, "GPU": worker_gpus} if cluster_gpus > 0 else {"CPU": 1.0}
        bundles += [worker] * (len(models.members) + 1)
    if comps_busy and queued_chunks > len(live_comps) * compositors.max_inflight:
        bundles += [{"CPU": compositor_cpus}] * (len(compositors.members) + 1)
    return bundles


def surplus_members(members: list[Member], surplus: int, now: float, stale_after_s: float,
                    idle_too: bool, busy_too: bool = False) -> list[Member]:
    """Which members to drop when a pool has `surplus` more members than the cluster holds, best
    first: members that are not live (lost or still starting: waiting for a node or a restart)
    for longer than `stale_after_s`; then, when `idle_too` (the surplus has lasted that long),
    live members with nothing in flight, the least used first; then, when `busy_too` (their work
    cannot go on: compositors whose chunks wait for a model worker that has no CPU to start on),
    live members with work in flight, the least loaded first (their chunks are dispatched again).
    Never a `failed` member (it carries the model-load error jobs report)."""
    if surplus <= 0:
        return []
    stale = [m for m in members if m.health in (Health.lost, Health.starting)
             and now - (m.lost_at or m.created_at) > stale_after_s]
    stale.sort(key=lambda m: m.lost_at or m.created_at)
    idle = sorted((m for m in members if m.health == Health.live and m.inflight == 0),
                  key=lambda m: (m.served, m.name)) if idle_too else []
    busy = sorted((m for m in members if m.health == Health.live and m.inflight > 0),
                  key=lambda m: (m.inflight, m.served, m.name)) if busy_too else []
    return (stale + idle + busy)[:surplus]


class SilenceWatch:
    """When to give up on a process that stopped answering (a job manager stopped, deadlocked, its event loop
    blocked): `heard(now)` at each answer, `silent(now)` at each unanswered ask; `silent` is True once nothing
    has been heard for `limit_s` (then the watch starts over, and waits `limit_s` twice before the next time:
    a process killed for it restarts, and its start must not be taken for the same silence)."""

    def __init__(self, limit_s: float, now: float) -> None:
        self.limit_s = limit_s
        self.last_heard = now
        self.grace_until = now

    def heard(self, now: float) -> None:
        self.last_heard = now

    def silent(self, now: float) -> bool:
        if now < self.grace_until or now - self.last_heard < self.limit_s:
            return False
        self.last_heard, self.grace_until = now, now + 2 * self.limit_s
        return True


class FairQueue(Generic[K]):
    """Per-job FIFO queues served round-robin across jobs, so concurrent jobs share the cluster."""

    def __init__(self) -> None:
        self._queues: "collections.OrderedDict[str, collections.deque[K]]" = collections.OrderedDict()

    def push(self, job_id: str, item: K, front: bool = False) -> None:
        q = self._queues.setdefault(job_id, collections.deque())
        q.appendleft(item) if front else q.append(item)

    def pop(self) -> tuple[str, K] | None:
        """The next item of the job after the one served last (round-robin)."""
        for job_id in list(self._queues):
            q = self._queues[job_id]
            if not q:
                del self._queues[job_id]
                continue
            item = q.popleft()
            self._queues.move_to_end(job_id)  # this job goes to the back of the line
            if not q:
                del self._queues[job_id]
            return job_id, item
        return None

    def position(self, job_id: str) -> int | None:
        """How many other jobs get an item before `job_id`'s next one (None: it has none queued)."""
        ahead = 0
        for other, q in self._queues.items():
            if other == job_id:
                return ahead if q else None
            ahead += bool(q)
        return None

    def drop(self, job_id: str) -> list[K]:
        return list(self._queues.pop(job_id, ()))

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())
