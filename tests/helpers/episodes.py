"""Equality of two samples, field by field (``successes`` is None for envs without success)."""

from __future__ import annotations

import torch

from binom_rl.sampler import Episodes


def assert_episodes_equal(a: Episodes, b: Episodes) -> None:
    for name in vars(a):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
