"""Where the time of a meta-iteration goes: wall time per phase, median over iterations.

The phases are the MetaLearner's own methods, timed by wrapping them on one instance
(nothing in the learner changes), so the split always follows the code that runs:

    sampling        MetaLearner._sample: all env steps, the policy in the loop
    advantages      MetaLearner._batch: linear-baseline fits and GAE
    meta-gradient   MetaLearner.meta_gradient: g = mean_t J_t^T grad L_out
    fisher-vector   MetaLearner.fvp_operator: building it and every product it makes (CG and
                    the step size)
    line search     MetaLearner._surrogate_and_kl: re-adaptation, surrogate and KL per try
    other           total minus the above (inner steps, CG vector algebra, logging)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from binom_rl.agents.maml_trpo import MetaLearner, _sync
from binom_rl.config import Config
from binom_rl.sampler import MultiTaskSampler

PHASES = {
    "sampling": "_sample",
    "advantages": "_batch",
    "meta-gradient": "meta_gradient",
    "fisher-vector products": "fvp_operator",
    "line search": "_surrogate_and_kl",
}


def profile_iterations(cfg: Config, num_iterations: int = 12, skip: int = 2) -> dict[str, float]:
    """Median seconds per phase (and ``total``, ``other``) over iterations skip..end."""
    if num_iterations <= skip:
        raise ValueError(f"num_iterations ({num_iterations}) must exceed skip ({skip})")
    device = torch.device(cfg.device)
    with MultiTaskSampler.from_config(cfg, device) as sampler:
        learner = MetaLearner(cfg, sampler)
        spent: dict[str, float] = {}
        for phase, method in PHASES.items():
            setattr(learner, method, _timed(getattr(learner, method), phase, spent, device))
        params = learner.init_params(cfg.seed)
        rows = []
        for iteration in range(num_iterations):
            spent.clear()
            start = time.perf_counter()
            params, _ = learner.meta_iteration(params, iteration)
            _sync(device)
            row = {phase: spent.get(phase, 0.0) for phase in PHASES}
            row["total"] = time.perf_counter() - start
            row["other"] = row["total"] - sum(row[p] for p in PHASES)
            rows.append(row)
    kept = rows[skip:]
    return {key: statistics.median(r[key] for r in kept) for key in rows[0]}


def _timed(fn: Callable, phase: str, spent: dict[str, float], device: torch.device) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _sync(device)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        _sync(device)
        spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - start
        # An operator (fvp_operator's product function) is timed into the same phase.
        return _timed(result, phase, spent, device) if callable(result) else result

    return wrapper


def format_profile(medians: dict[str, float]) -> str:
    """A markdown table: phase, median seconds, share of the total."""
    total = medians["total"]
    lines = ["| phase | median s | share |", "|---|---|---|"]
    for key in [*PHASES, "other", "total"]:
        lines.append(f"| {key} | {medians[key]:.3f} | {medians[key] / total:.0%} |")
    return "\n".join(lines)
