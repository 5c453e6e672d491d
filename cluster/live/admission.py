"""Admission of live sessions by measured throughput (plain Python; `actors.live.LiveRegistry`
asks it before creating a session).

Each running session measures its render load: seconds of rendering (compositing, the model's
answer, handing the batch to the encoder) per second of stream, lately
(`LiveSession.render_load`). A node's live capacity is its cores times the share live sessions
may take (`LIPSYNC_LIVE_CPU_SHARE`; the rest is left to batch jobs). A new session is admitted
when the running sessions' load plus a new session's estimate (the mean of the measured ones)
fits; a session not yet measured counts at `LIPSYNC_LIVE_SESSION_LOAD`, which is also the
estimate before any is measured. With no session running one is always admitted (nothing
measured says it would not fit; its own figures decide the next).

Memory too: each running session reports the resident memory of its processes (its actor and its
warm standby, `LIPSYNC_LIVE_STANDBY`) and the memory its node has available; a new session, estimated
at the running ones' mean (`LIPSYNC_LIVE_SESSION_MEMORY_MB` before any reported), must leave
`LIPSYNC_LIVE_MEMORY_RESERVE_MB` available for batch jobs and the system.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Admission:
    running: int  # sessions running
    measured: int  # ...of which have measured their load
    load: float  # their render load (measured, or the default for those not yet measured)
    estimate: float  # a new session's estimated load
    capacity: float  # cpus * share
    cpus: float
    share: float
    default_load: float
    memory_estimate: float = 0.0  # a new session's memory, bytes
    available: float | None = None  # the node's available memory, bytes (None: not known)
    reserve: float = 0.0  # bytes that must stay available

    @property
    def load_fits(self) -> bool:
        """A new session's estimated load fits beside the running ones' (with none running, always)."""
        return self.running == 0 or self.load + self.estimate <= self.capacity

    @property
    def memory_fits(self) -> bool:
        return self.available is None or self.available - self.memory_estimate >= self.reserve

    @property
    def admitted(self) -> bool:
        """With no session running one is always admitted; else its load and its memory must fit."""
        return self.running == 0 or (self.load_fits and self.memory_fits)

    @property
    def message(self) -> str:
        measured = (f"{self.measured} measured" if self.measured == self.running else
                    f"{self.measured} measured, {self.running - self.measured} not yet, counted at "
                    f"LIPSYNC_LIVE_SESSION_LOAD={self.default_load:g}")
        verdict = "fits within" if self.load_fits else "would exceed"
        text = (f"{self.running} live session(s) running take {self.load:.2f} s of rendering per second of stream "
                f"({measured}); a new one (estimated {self.estimate:.2f}) {verdict} this node's live capacity "
                f"of {self.capacity:.2f} ({self.cpus:g} cores x LIPSYNC_LIVE_CPU_SHARE={self.share:g})")
        if not self.memory_fits:
            mib = 1 << 20
            text += (f"; its memory (estimated {self.memory_estimate / mib:.0f} MiB with its standby) would leave "
                     f"{(self.available - self.memory_estimate) / mib:.0f} MiB of the node's {self.available / mib:.0f}"
                     f" MiB available, under LIPSYNC_LIVE_MEMORY_RESERVE_MB={self.reserve / mib:.0f}")
        return text


def decide_admission(loads: list[float | None], cpus: float, share: float, default_load: float,
                     memories: list[float | None] | None = None, available: float | None = None,
                     reserve: float = 0.0, default_memory: float = 0.0) -> Admission:
    """`loads`: each running session's measured render load, None where not yet measured;
    `memories`: their processes' resident bytes (None: not reported); `available`: the node's
    available memory in bytes as they report it (None: unknown, memory is not checked)."""
    measured = [float(x) for x in loads if x is not None]
    load = sum(measured) + default_load * (len(loads) - len(measured))
    estimate = sum(measured) / len(measured) if measured else default_load
    capacity = cpus * share
    sizes = [float(m) for m in (memories or []) if m]
    return Admission(running=len(loads), measured=len(measured), load=load, estimate=estimate, capacity=capacity,
                     cpus=cpus, share=share, default_load=default_load,
                     memory_estimate=sum(sizes) / len(sizes) if sizes else float(default_memory),
                     available=None if available is None else float(available), reserve=float(reserve))
