"""The ``auto`` vmap chunk size: the rule, its config spelling, and step selection by slices."""

from __future__ import annotations

import os

import pytest
import torch

from binom_rl.config import Config, ConfigError
from binom_rl.metagrad import (
    _select_steps,
    default_chunk_size,
    device_memory_bytes,
    mlp_hvp_bytes,
)

GIB = 2**30


def test_default_chunk_size_rule():
    # everything fits in a quarter of 80 GiB: one vmap call
    assert default_chunk_size(400, 10 * 2**20, memory_bytes=80 * GIB) is None
    # 400 HVPs of 1 GiB in a 20 GiB budget: chunks of 20
    assert default_chunk_size(400, GIB, memory_bytes=80 * GIB) == 20
    # one HVP larger than the budget still runs, one at a time
    assert default_chunk_size(4, 100 * GIB, memory_bytes=8 * GIB) == 1
    assert default_chunk_size(10, GIB, memory_bytes=8 * GIB, memory_fraction=1.0) == 8
    with pytest.raises(ValueError):
        default_chunk_size(0, GIB)
    with pytest.raises(ValueError):
        default_chunk_size(4, GIB, memory_fraction=0.0)


def test_half_cheetah_meta_batch_fits_a_quarter_of_an_h100():
    # 40 tasks x K = 10 steps, 20 episodes x 200 steps, (64, 64) policy on obs 17 / act 6
    per_hvp = mlp_hvp_bytes(20 * 200, [17, 64, 64, 6])
    assert 10 * 2**20 < per_hvp < 100 * 2**20
    chunk = default_chunk_size(400, per_hvp, memory_bytes=80 * GIB)
    assert chunk is None or chunk * per_hvp <= 20 * GIB
    assert mlp_hvp_bytes(10, [1, 1], torch.float64) == 2 * mlp_hvp_bytes(10, [1, 1])


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None


@pytest.mark.skipif(_mem_total_bytes() is None, reason="needs /proc/meminfo")
def test_device_memory_bytes_cpu_is_the_kernels_total_ram():
    # the kernel's MemTotal counts the same RAM in KiB: equal to within a page
    assert abs(device_memory_bytes("cpu") - _mem_total_bytes()) <= os.sysconf("SC_PAGE_SIZE")


def test_device_memory_bytes_cpu_without_sysconf(monkeypatch):
    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    assert device_memory_bytes("cpu") == 8 * GIB  # the documented fallback


def test_config_chunk_size_auto_and_errors():
    assert Config.from_dict({"chunk-size": "auto"}).chunk_size == "auto"
    assert Config.from_dict({"chunk-size": 8}).chunk_size == 8
    assert Config.from_dict({"chunk-size": None}).chunk_size is None
    for bad in ("big", 0, True, 1.5):
        with pytest.raises(ConfigError):
            Config.from_dict({"chunk-size": bad})


@pytest.mark.parametrize("steps", [[0, 1, 2, 3], [2, 3], [3, 2, 1, 0], [1], [0, 2, 3]])
def test_select_steps_matches_index_tensor(steps):
    x = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    out = _select_steps({"x": x}, steps)["x"]
    torch.testing.assert_close(out, x[:, torch.tensor(steps)])
