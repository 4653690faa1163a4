"""Process-wide settings that the command-line scripts apply before any work.

PyTorch's CPU tensors are allocated with plain ``malloc``/``free``. A meta-iteration
allocates and frees thousands of 1-10 MB buffers (activations and their gradients for
every Hessian-vector product). glibc's malloc serves blocks above its mmap threshold
with fresh pages from the kernel, each page faulted in (and zero-filled) on first touch,
and gives memory at the top of the heap back after a free; so the same buffers are paid
for again and again, which on a virtual machine costs as much as a large part of the
arithmetic. No library exposes glibc's ``mallopt`` (allocators such as jemalloc need
LD_PRELOAD, i.e. an environment set before Python starts), hence the few ctypes lines.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap and are reused (glibc's maximum on 64-bit).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: Free memory at the heap's top is returned to the kernel only beyond this much.
TRIM_THRESHOLD_BYTES = 2**30


def reuse_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the kernel:
    mmap threshold 32 MiB, trim threshold 1 GiB. The process' resident memory stays near
    its peak instead of shrinking between phases.

    On the 2-core development machine this took about 0.08 s (8%) off a 2D-navigation
    meta-iteration (``scripts/profile_iteration.py``: meta-gradient 0.18 -> 0.12 s, inner
    steps and bookkeeping 0.12 -> 0.08 s; see docs/benchmarks.md). Returns whether the
    settings were applied: False, doing nothing, where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on an invalid value.
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        return os.cpu_count() or 1
