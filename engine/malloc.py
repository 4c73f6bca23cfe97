"""glibc malloc settings for the processes where sites train: keep freed memory instead of re-faulting it.

A training step allocates and frees its gradients (tens of MiB for a mid-sized model)
every step. With glibc's defaults the memory of those blocks goes back to the kernel
when they are freed (unmapped, or trimmed off the top of a thread's heap), and the next
step faults every page in again, zeroed. Four sites training as threads of one process
on 2 cores (the 34 MiB MLP of ``tools/bench/vs_nvflare.py``, 20 steps a round, 8
site-rounds): 330,000-590,000 page faults and 7.33-7.83 CPU-s with the defaults, 112
faults and 6.89 CPU-s with these settings.

- ``M_TOP_PAD`` 64 MiB: a heap grows, and is trimmed back, in steps of at least that
  much, so a step's gradients find room where the previous step's were freed. This is
  the setting that removes the faults; without it the two below do little.
- ``M_MMAP_THRESHOLD`` 32 MiB (glibc's own ceiling for its moving threshold): blocks up
  to that size come from the heaps, where a freed block is reused, not from mappings of
  their own that are unmapped when freed.
- ``M_TRIM_THRESHOLD`` 32 MiB: free memory at the top of a heap is handed back only
  past that much (plus the pad).

The cost is memory a process keeps after a peak, about the pad per thread heap: in
``fedlog simulate`` (4 sites x 34 MiB x 5 rounds) the client process peaked ~0.1 GB
higher. So it is applied in ``fedlog client`` processes only, where executors run; the
server's own churn is a few arrays per round. Settings the user made win: nothing is
changed when ``GLIBC_TUNABLES`` or one of glibc's ``MALLOC_*`` variables is set, or
where the C library has no ``mallopt`` (not glibc).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MALLOC_SETTINGS", "USER_SETTINGS", "tune_malloc"]

# mallopt parameters, from <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: (name, mallopt parameter, value) applied by ``tune_malloc``
MALLOC_SETTINGS = (
    ("M_TOP_PAD", _M_TOP_PAD, 64 << 20),
    ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, 32 << 20),
    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 32 << 20),
)

#: environment variables through which a user tunes glibc malloc; any of them set: hands off
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")


def tune_malloc() -> dict[str, int]:
    """Apply ``MALLOC_SETTINGS`` to this process (early, before threads start); return what was set."""
    if any(name in os.environ for name in USER_SETTINGS):
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return {name: value for name, param, value in MALLOC_SETTINGS if mallopt(param, value) == 1}
