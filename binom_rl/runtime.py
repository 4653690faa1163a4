"""Process-wide settings and figures: glibc's malloc thresholds, peak memory.

PyTorch's CPU tensors are allocated with plain ``malloc``/``free``. A meta-iteration
allocates and frees thousands of 1-10 MB buffers (activations and their gradients for
every Hessian-vector product). glibc's malloc serves blocks above its mmap threshold
with fresh pages from the kernel, each page faulted in (and zero-filled) on first touch,
and gives memory at the top of the heap back after a free; so the same buffers are paid
for again and again, which on a virtual machine costs as much as a large part of the
arithmetic (docs/benchmarks.md has the profile). No library exposes glibc's ``mallopt``
(allocators such as jemalloc need LD_PRELOAD, i.e. an environment set before Python
starts), hence the few ctypes lines.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the allocator functions need none
    import torch

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap and are reused (glibc's maximum on 64-bit).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: Free memory at the heap's top is returned to the kernel only beyond this much.
TRIM_THRESHOLD_BYTES = 2**30


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt and malloc_trim are glibc's), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where it is absent or rejects the value."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(param, value) == 1  # 1 on success, 0 on an invalid value


def reuse_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the kernel:
    mmap threshold 32 MiB, trim threshold 1 GiB. The process' resident memory stays near
    its peak instead of shrinking between phases, and a meta-iteration stops paying page
    faults for buffers it frees and allocates again.

    Returns whether the settings were applied: False, doing nothing, where the C library
    is not glibc.
    """
    ok = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and ok


def return_freed_memory(mmap_threshold_bytes: int = 65536) -> bool:
    """The opposite of :func:`reuse_freed_memory`: blocks of ``mmap_threshold_bytes`` or more
    come from mmap and go back to the kernel when freed, as ``MALLOC_MMAP_THRESHOLD_`` does
    for a new process, so that the resident memory follows what is allocated (memory
    benchmarks). False where the C library is not glibc."""
    return _mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)


def malloc_trim() -> bool:
    """Return the heap's free pages to the kernel (glibc ``malloc_trim(0)``); False where
    the C library is not glibc or nothing was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def peak_memory_mb(device: str | torch.device) -> float:
    """MiB: the peak memory torch allocated on a CUDA ``device`` since the last
    ``torch.cuda.reset_peak_memory_stats``; on CPU the process' peak resident set."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB on Linux


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        return os.cpu_count() or 1
