"""glibc's heap in a long-lived process: big transient buffers go back to the system when freed.

glibc serves an allocation of `M_MMAP_THRESHOLD` bytes or more (128 KiB at start) with its own
mapping, unmapped when freed. But the threshold is dynamic: once such a mapped block is freed,
the threshold rises to its size (up to 32 MiB) and the heap's trim threshold to twice that. The
job manager frees blocks of several MiB early (upload and download parts of
`transfer_part_bytes`, hashing blocks), so from then on every buffer below that size came from
the heaps of its threads' arenas, and each arena kept up to twice that size of freed memory
resident: its PSS grew during a job and stayed (docs/PERFORMANCE.md, an hour of speech).
`pin_mmap_threshold` fixes both thresholds, which turns the dynamic adjustment off.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("lipsync.heap")

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024**2  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def pin_mmap_threshold(nbytes: int) -> bool:
    """From now on, allocations of `nbytes` or more get their own mapping (returned to the system
    when freed) and a heap whose free top exceeds `nbytes` is trimmed; glibc's dynamic thresholds
    are off. 0 leaves glibc's defaults. False where it did not apply (not glibc, or 0)."""
    if nbytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library: its own policy stands
        log.info("not glibc: the heap's thresholds are left as they are")
        return False
    nbytes = min(int(nbytes), MAX_MMAP_THRESHOLD)
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(M_TRIM_THRESHOLD, nbytes))
