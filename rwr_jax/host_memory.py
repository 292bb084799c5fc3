"""Keep freed host memory for reuse (glibc malloc settings), for XLA:CPU.

XLA:CPU mallocs every intermediate buffer of a step and frees it afterwards. glibc
serves large blocks with fresh mmap'd pages and trims per-thread arenas back to the
OS, so each step faults gigabytes of new pages in: on the 2-core development VM a
small-shape train step spent ~5 of its 17 CPU-seconds in the kernel doing so. One
arena, no mmap for large blocks and no trimming keep freed memory in the process, and
a warm step faults no pages at all (PyTorch's CPU tuning guide gets the same from
jemalloc / tcmalloc). The cost: the process keeps its peak heap until it exits.
"""

import ctypes
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim


def keep_freed_memory() -> bool:
    """Applies `SETTINGS` with glibc's mallopt.

    Call it before JAX starts a backend: threads choose their malloc arena at their
    first allocation. Launch scripts call it first thing.

    Returns:
      Whether every setting applied (False off glibc, e.g. macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
