"""binom_rl.runtime: glibc's malloc settings, checked with glibc's own mallinfo2 in a fresh
process, and the peak-memory figure."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

from binom_rl.runtime import available_cores, peak_memory_mb, reuse_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
HAS_MALLINFO2 = GLIBC and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")

# Runs in a fresh interpreter (the settings are process-wide and glibc adapts its mmap
# threshold to what the process freed before). Allocates with malloc itself and reads
# mallinfo2: hblkhd = bytes in mmapped blocks, arena = bytes of the heap.
PROBE = r"""
import ctypes, json, sys
from binom_rl import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
mode, size = sys.argv[1], int(sys.argv[2])
if mode == "reuse":
    assert runtime.reuse_freed_memory()
elif mode == "return":
    assert runtime.return_freed_memory(65536)
elif mode == "mmap-threshold-only":  # reuse's mmap threshold without its trim threshold
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    assert libc.mallopt(-3, 32 * 2**20) == 1
out = {}
for i in range(2):  # allocate, free, allocate again
    before = libc.mallinfo2()
    ptr = libc.malloc(size)
    during = libc.mallinfo2()
    libc.free(ptr)
    after = libc.mallinfo2()
    out[f"mmapped_{i}"] = during.hblkhd - before.hblkhd
    out[f"heap_grew_{i}"] = during.arena - before.arena
    out[f"heap_kept_{i}"] = after.arena - before.arena
print(json.dumps(out))
"""


def _probe(mode: str, size: int) -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(size)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return json.loads(proc.stdout)


MIB = 2**20


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2)")
def test_reuse_freed_memory_serves_16_mib_from_the_heap_and_keeps_it():
    default = _probe("default", 16 * MIB)
    assert default["mmapped_0"] >= 16 * MIB  # glibc's default: a fresh mmap...
    assert default["heap_grew_0"] == 0
    reuse = _probe("reuse", 16 * MIB)
    assert reuse["mmapped_0"] == 0 and reuse["mmapped_1"] == 0  # ...here the heap, twice
    assert reuse["heap_grew_0"] >= 16 * MIB
    assert reuse["heap_kept_0"] >= 16 * MIB  # not trimmed after the free
    assert reuse["heap_grew_1"] == 0  # the second allocation reuses the kept memory
    # the trim threshold is what keeps it: with the mmap threshold alone the heap shrinks
    assert _probe("mmap-threshold-only", 16 * MIB)["heap_kept_0"] < MIB


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2)")
def test_return_freed_memory_mmaps_every_large_block():
    # glibc's default raises its threshold after a freed mmapped block: the second 1 MiB
    # comes from the heap; with a fixed 64 KiB threshold every 1 MiB block is mmapped.
    default = _probe("default", MIB)
    assert default["mmapped_0"] >= MIB and default["mmapped_1"] == 0
    fixed = _probe("return", MIB)
    assert fixed["mmapped_0"] >= MIB and fixed["mmapped_1"] >= MIB


def test_reuse_freed_memory_does_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: calls.append(a))
    assert reuse_freed_memory() is False
    assert calls == []


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


@pytest.mark.skipif(_status_kib("VmHWM") is None, reason="needs /proc/self/status")
def test_peak_memory_mb_cpu_is_the_kernels_peak_rss():
    """Against the kernel's other record of the same peak: VmHWM in /proc/self/status."""
    before = _status_kib("VmHWM") / 1024
    got = peak_memory_mb("cpu")
    after = _status_kib("VmHWM") / 1024
    assert before - 1 <= got <= after + 1


def test_available_cores_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert available_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS / Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert available_cores() == 7
