"""Keep freed memory in the process: a setting for the command line, not for the library.

glibc hands blocks above its mmap threshold back to the operating system when they are freed
and takes page faults to get them back on the next allocation. A training step frees and
re-allocates the same megabyte-sized activations every time, so a 64-member IQL ensemble spent
a fifth of its time faulting pages in. Raising the mmap and trim thresholds keeps those blocks
for reuse (`python bench/allocator.py`: 1.26x steps/s for 64 members compiled, 1.36x eager, no
change at 16 members or for d3rlpy). It is process-wide, so only entry points call it (the `dosewise`
CLI, the benchmarks); a program that imports dosewise keeps its own allocator settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024

# The same settings as environment variables, for child processes started before Python runs.
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False (and nothing changed) without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
