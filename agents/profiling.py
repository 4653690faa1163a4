"""Where the time of a meta-iteration goes: wall time per phase, median over iterations.

The phases are the ones the meta-learner's parts declare (``binom_rl.agents.phases.PHASES``:
sampling, advantages, inner steps, outer objective, meta-gradient, Fisher-vector products,
line search, Adam updates); profiling turns the learner's :class:`PhaseTimer` on, and time
outside every declared phase (task sampling, metrics, the step's vector algebra) is charged
to ``other``, so the parts of an iteration add up to its wall time. Several configurations
are profiled in one process with their iterations interleaved (a, b, a, b, ...), so that
the load of a shared machine falls on all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from binom_rl.agents.maml_trpo import MetaLearner
from binom_rl.agents.phases import PHASES, sync
from binom_rl.config import Config
from binom_rl.sampler import MultiTaskSampler

OTHER = "other"


def _iteration(learner: MetaLearner, params: dict, iteration: int) -> tuple[dict, dict[str, float]]:
    """One meta-iteration with the phase timer on: new params and seconds per phase, with
    ``other`` (outside every phase) and ``total`` (measured around the call)."""
    timer = learner.phases
    timer.enabled, timer.spent = True, {}
    start = time.perf_counter()
    with timer(OTHER):
        params, _ = learner.meta_iteration(params, iteration)
    sync(learner.device)
    row = {phase: timer.spent.get(phase, 0.0) for phase in (*PHASES, OTHER)}
    row["total"] = time.perf_counter() - start
    timer.enabled = False
    return params, row


def profile_iterations(
    cfgs: Config | Sequence[Config], num_iterations: int = 12, skip: int = 2
) -> list[dict[str, float]]:
    """Median seconds per phase (and ``other``, ``total``) over iterations skip..end, one
    dict per config; the configs' iterations alternate."""
    cfgs = [cfgs] if isinstance(cfgs, Config) else list(cfgs)
    if not 0 <= skip < num_iterations:
        raise ValueError(f"num_iterations ({num_iterations}) must exceed skip ({skip}) >= 0")
    samplers = [MultiTaskSampler.from_config(cfg, torch.device(cfg.device)) for cfg in cfgs]
    try:
        learners = [MetaLearner(cfg, s) for cfg, s in zip(cfgs, samplers, strict=True)]
        params = [learner.init_params(learner.cfg.seed) for learner in learners]
        rows: list[list[dict[str, float]]] = [[] for _ in cfgs]
        for iteration in range(num_iterations):
            for i, learner in enumerate(learners):
                params[i], row = _iteration(learner, params[i], iteration)
                rows[i].append(row)
    finally:
        for sampler in samplers:
            sampler.close()
    return [
        {key: statistics.median(r[key] for r in kept[skip:]) for key in kept[0]} for kept in rows
    ]


def format_profile(medians: Sequence[dict[str, float]], names: Sequence[str]) -> str:
    """A markdown table: phase, then median seconds and share of the total per config
    (phases no config spends time in are left out); with several configs, a last row of
    each total over the first's."""
    head = ["phase"] + [f"{name} {col}" for name in names for col in ("s", "share")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in [*PHASES, OTHER, "total"]:
        if key in PHASES and not any(m[key] > 0 for m in medians):
            continue
        cells = [c for m in medians for c in (f"{m[key]:.3f}", f"{m[key] / m['total']:.0%}")]
        lines.append("| " + " | ".join([key, *cells]) + " |")
    if len(medians) > 1:
        cells = [c for m in medians for c in (f"{m['total'] / medians[0]['total']:.2f}", "")]
        lines.append("| " + " | ".join(["total / first", *cells]) + " |")
    return "\n".join(lines)
