"""The agent's C heap (glibc malloc): one arena for the whole process, trimmed after the
big frees.

glibc gives each thread that allocates its own arena (up to 8 per core), and each keeps
the free memory it had: the reflectors' threads decode list pages in theirs, the sync
thread builds the engine and the rules in its own. At 100,000 services that left 16-35 MiB
free but resident, more or less from run to run (RSS at the end 395-435 MiB); with one
arena, 389-390 MiB in four runs (`benches/control_plane_scale.py 100000`). The agent's
Python threads take turns under the GIL anyway, and the datapath's packet path does not
allocate (its buffers are made once), so one arena's lock costs it nothing.
"""

from __future__ import annotations

import ctypes

__all__ = ["one_malloc_arena", "trim_heap"]

_M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def one_malloc_arena() -> bool:
    """Every thread started from now on allocates from the main arena (mallopt
    M_ARENA_MAX 1; what MALLOC_ARENA_MAX=1 in the environment does). True if set."""
    libc = _libc()
    try:
        return libc is not None and libc.mallopt(_M_ARENA_MAX, 1) == 1
    except AttributeError:
        return False


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc keeps what libnftables
    freed after a large transaction or listing: ~190 MB at 10,000 services)."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass
