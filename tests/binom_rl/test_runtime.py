"""binom_rl.runtime: the allocator settings the scripts apply."""

import ctypes
import platform

import pytest
import torch

from binom_rl.runtime import reuse_freed_memory

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
