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
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Admission:
    admitted: bool
    running: int  # sessions running
    measured: int  # ...of which have measured their load
    load: float  # their render load (measured, or the default for those not yet measured)
    estimate: float  # a new session's estimated load
    capacity: float  # cpus * share
    cpus: float
    share: float
    default_load: float

    @property
    def message(self) -> str:
        measured = (f"{self.measured} measured" if self.measured == self.running else
                    f"{self.measured} measured, {self.running - self.measured} not yet, counted at "
                    f"LIPSYNC_LIVE_SESSION_LOAD={self.default_load:g}")
        verdict = "fits within" if self.admitted else "would exceed"
        return (f"{self.running} live session(s) running take {self.load:.2f} s of rendering per second of stream "
                f"({measured}); a new one (estimated {self.estimate:.2f}) {verdict} this node's live capacity "
                f"of {self.capacity:.2f} ({self.cpus:g} cores x LIPSYNC_LIVE_CPU_SHARE={self.share:g})")


def decide_admission(loads: list[float | None], cpus: float, share: float, default_load: float) -> Admission:
    """`loads`: each running session's measured render load, None where not yet measured."""
    measured = [float(x) for x in loads if x is not None]
    load = sum(measured) + default_load * (len(loads) - len(measured))
    estimate = sum(measured) / len(measured) if measured else default_load
    capacity = cpus * share
    admitted = not loads or load + estimate <= capacity
    return Admission(admitted=admitted, running=len(loads), measured=len(measured), load=round(load, 4),
                     estimate=round(estimate, 4), capacity=round(capacity, 4), cpus=cpus, share=share,
                     default_load=default_load)
