"""agents.profiling: the phase split of a meta-iteration at tiny sizes."""

from __future__ import annotations

import pytest
import torch

from binom_rl.agents.profiling import PHASES, format_profile, profile_iterations
from binom_rl.config import Config

TINY = {
    "env-name": "binom_rl/2DNavigation-v0",
    "max-episode-steps": 10,
    "hidden-sizes": [8],
    "meta-batch-size": 3,
    "fast-batch-size": 4,
    "cg-iters": 3,
}


def test_phases_add_up_and_every_phase_runs():
    torch.set_num_threads(1)
    medians = profile_iterations(Config.from_dict(TINY), num_iterations=3, skip=1)
    assert set(medians) == {*PHASES, "other", "total"}
    assert all(medians[p] > 0 for p in PHASES)  # each wrapped method was called
    # "other" is each iteration's remainder; with two kept iterations every median is a
    # mean, so the parts add up to the total
    assert sum(medians[p] for p in PHASES) + medians["other"] == pytest.approx(
        medians["total"], rel=1e-9
    )
    table = format_profile(medians)
    assert "| fisher-vector products |" in table and table.endswith("100% |")


def test_needs_more_iterations_than_skipped():
    with pytest.raises(ValueError, match="must exceed skip"):
        profile_iterations(Config.from_dict(TINY), num_iterations=2, skip=2)
