"""binom_rl.runtime: the allocator settings the scripts apply."""

import ctypes
import os
import platform

import pytest
import torch

from binom_rl.runtime import available_cores, reuse_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt settings apply to glibc only")
def test_reuse_freed_memory_applies_on_glibc_and_allocation_still_works():
    assert reuse_freed_memory() is True
    assert reuse_freed_memory() is True  # idempotent
    # Tensors around and above the mmap threshold still allocate, fill and free.
    for numel in (2**18, 2**23 + 7, 2**24):
        x = torch.ones(numel)
        assert float(x.sum()) == numel
        del x


def test_reuse_freed_memory_does_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: calls.append(a))
    assert reuse_freed_memory() is False
    assert calls == []


def test_available_cores_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert available_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS / Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert available_cores() == 7
