"""Keep the process's native (non-tensor) memory flat over a long task loop on CPU.

Why: on CPU, a run's memory grew task after task while its live tensors stayed flat (``bench/task_cost``). Two
native causes, neither a leak of the framework's own objects:

- oneDNN (and PyTorch's ideep layer above it) keep one compiled kernel per input shape, up to 1024 each. A
  continual run meets new shapes every task (routed sub-batches of new row counts, new token widths), so these caches
  grow for the whole run. :func:`cap_kernel_caches` lowers both capacities (least recently used shapes are dropped
  and rebuilt when met again; the kernels compute the same values either way).
- glibc's malloc keeps freed memory for reuse; freed blocks scattered between live ones are not reused for larger
  requests, so the resident set creeps up. :func:`release_free_heap` hands free heap pages back (``malloc_trim``),
  which the task loop calls after every stage and every test.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from functools import cache

#: Kernel-cache entries kept per cache. In ``bench/task_cost`` (2 threads) the heap in use grows 3 % from task 2 to 10
#: with 64 against 57 % with 1024, for 1-3 % more training time; with none it is flat but small matmuls run 2x slower.
KERNEL_CACHE_CAPACITY = 64
#: oneDNN's primitive cache and PyTorch's ideep cache read these once, at their first use.
KERNEL_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def cap_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """Set the CPU kernel caches' capacity unless the environment already names one; returns the values in force.

    The caches read the variables at their first use, so this must run before the process's first CPU matmul
    (``conpet_lightning`` calls it on import). Set the variables yourself to choose another capacity (1024 is
    the libraries' own default).
    """
    for name in KERNEL_CACHE_ENV:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in KERNEL_CACHE_ENV}


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim`` (glibc), or None where it has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``); False where there is none."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
