"""agents.phases and agents.profiling: exclusive phase times (a fake clock), and the phase
split of real meta-iterations at tiny sizes, MAML-TRPO and ProMP side by side."""

from __future__ import annotations

import pytest
import torch

from binom_rl.agents.maml_trpo import MetaLearner
from binom_rl.agents.phases import PHASES, PhaseTimer
from binom_rl.agents.profiling import OTHER, _iteration, format_profile, profile_iterations
from binom_rl.config import Config
from binom_rl.sampler import MultiTaskSampler

TINY = {
    "env-name": "binom_rl/2DNavigation-v0",
    "max-episode-steps": 10,
    "hidden-sizes": [8],
    "meta-batch-size": 3,
    "fast-batch-size": 4,
    "cg-iters": 3,
}


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def test_nested_phases_are_charged_to_the_innermost():
    """a [0, 10) contains b [2, 5), which contains c [3, 4), and b again [6, 8): c 1, b its
    own 1 + 1 + 2 = 4, a the rest, 2 + 1 + 2 = 5."""
    clock = FakeClock()
    timer = PhaseTimer(torch.device("cpu"), clock=clock)
    timer.enabled = True
    with timer("a"):
        clock.now = 2.0
        with timer("b"):
            clock.now = 3.0
            with timer("c"):
                clock.now = 4.0
            clock.now = 5.0
        clock.now = 6.0
        with timer("b"):
            clock.now = 8.0
        clock.now = 10.0
    assert timer.spent == {"a": 5.0, "b": 4.0, "c": 1.0}
    assert sum(timer.spent.values()) == 10.0


def test_disabled_timer_reads_no_clock():
    clock = FakeClock()
    timer = PhaseTimer(torch.device("cpu"), clock=clock)
    with timer("a"), timer("b"):
        clock.now = 1.0
    assert timer.spent == {} and clock.calls == 0


@pytest.mark.parametrize("outer", ["trpo", "ppo"])
def test_phases_of_an_iteration_add_up_to_its_wall_time(outer):
    """Each phase the outer loop has takes time, the others none, and the phases (with
    other, the time outside them) add up to the iteration's wall time measured around it:
    nothing counted twice, nothing lost."""
    torch.set_num_threads(1)
    cfg = Config.from_dict({**TINY, "outer": outer, "num-steps": 2})
    with MultiTaskSampler.from_config(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        params = learner.init_params(0)
        for iteration in range(2):
            params, row = _iteration(learner, params, iteration)
    used = {"sampling", "advantages", "inner steps", "outer objective", "meta-gradient"}
    used |= {"fisher-vector products", "line search"} if outer == "trpo" else {"Adam updates"}
    assert {p for p in PHASES if row[p] > 0} == used
    assert row[OTHER] > 0
    parts = sum(row[p] for p in (*PHASES, OTHER))
    assert parts <= row["total"] and parts == pytest.approx(row["total"], rel=0.02)
    assert not learner.phases.enabled  # training afterwards is not timed


def test_profile_two_configs_side_by_side():
    torch.set_num_threads(1)
    cfgs = [Config.from_dict(TINY), Config.from_dict({**TINY, "outer": "ppo"})]
    medians = profile_iterations(cfgs, num_iterations=3, skip=1)
    assert len(medians) == 2
    assert medians[0]["line search"] > 0 and medians[0]["Adam updates"] == 0
    assert medians[1]["Adam updates"] > 0 and medians[1]["line search"] == 0
    table = format_profile(medians, ["trpo", "ppo"])
    assert "| phase | trpo s | trpo share | ppo s | ppo share |" in table
    assert "| line search |" in table and "| Adam updates |" in table
    ratio = medians[1]["total"] / medians[0]["total"]
    assert table.splitlines()[-1] == f"| total / first | 1.00 |  | {ratio:.2f} |  |"


def test_needs_more_iterations_than_skipped():
    with pytest.raises(ValueError, match="must exceed skip"):
        profile_iterations(Config.from_dict(TINY), num_iterations=2, skip=2)
