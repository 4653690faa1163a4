"""What the test files share: one torch thread, the tiny 2D-navigation run, the checkout's
benchmark harness on sys.path."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# The benchmark harness (benchmarks/) is a top-level package of the checkout, not installed:
# appended after site-packages, so that an installed binom_rl stays the one imported.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

#: A meta-training run that takes about a second per iteration on one core.
TINY_CONFIG: dict[str, Any] = {
    "env-name": "binom_rl/2DNavigation-v0",
    "max-episode-steps": 10,
    "hidden-sizes": [8],
    "meta-batch-size": 3,
    "fast-batch-size": 4,
    "num-batches": 2,
    "cg-iters": 3,
}


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread everywhere: the machines that run the suite have few cores and
    # share them, and the tiny problems gain nothing from more. Set here so that module-
    # and session-scoped fixtures (which train runs) get it too.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Give the thread count back after a test that changed it (--torch-threads)."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**overrides)``: TINY_CONFIG with overrides (``num_batches=4``)."""

    def make(**overrides: Any) -> dict[str, Any]:
        return {**TINY_CONFIG, **{k.replace("_", "-"): v for k, v in overrides.items()}}

    return make


@pytest.fixture(scope="session")
def tiny_flags(tiny_config):
    """``tiny_flags(**overrides)``: the tiny config as config flags (``--meta-batch-size 3``;
    JSON values are YAML, as the flags read them)."""

    def make(**overrides: Any) -> list[str]:
        pairs = tiny_config(**overrides).items()
        return [item for key, value in pairs for item in (f"--{key}", json.dumps(value))]

    return make
