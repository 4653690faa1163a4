"""Is a run's data inside the binomial expansion's regime? fast-lr x ||H_k|| on each data set.

BinomMAML drops the expansion's terms with more than L Hessians; they scale like
(a ||H_k||)^l (a = fast-lr), so the products can be accurate only where a ||H_k|| is well
below 1. The meta-gradient uses all inner data; TRPO's Fisher-vector products use a
subsample (``fvp-subsample``), of whole episodes or of time steps. :func:`curvature_table`
measures a ||H_k|| on each, as is and with the advantages re-centred on the kept steps,
which shows where large curvature comes from: the inner loss -mean(log pi * A) has
advantages normalised to mean 0 over each task's steps, which cancels the mean(A) x
(-hess log pi) part of its Hessian; a subsample of whole episodes keeps a clearly non-zero
mean of A, and -hess log pi grows like 1 / sigma^2 as the policy sharpens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from binom_rl.agents.maml_trpo import MetaLearner, derive_seed, fvp_subsample
from binom_rl.agents.training import open_sampler
from binom_rl.config import Config
from binom_rl.metagrad import Params, hessian_norms
from binom_rl.rl import masked_mean_per_task


@dataclass
class CurvatureRow:
    """One data set: advantage mean relative to its RMS and a ||H_k||, median and max over
    the K steps x T tasks."""

    data: str
    advantage_mean_over_rms: float
    alpha_hessian_norm_median: float
    alpha_hessian_norm_max: float


def centred_advantages(data: dict[str, Tensor]) -> dict[str, Tensor]:
    """``data`` with each task's advantages minus their mean over its valid steps."""
    mean = masked_mean_per_task(data["advantages"], data["mask"])
    shape = (-1,) + (1,) * (data["advantages"].dim() - 1)
    return {**data, "advantages": (data["advantages"] - mean.view(shape)) * data["mask"]}


def _row(
    learner: MetaLearner, name: str, path: list[Params], inner_data: list[dict[str, Any]],
    iters: int,
) -> CurvatureRow:  # fmt: skip
    ratios = []
    for d in inner_data:
        mean = masked_mean_per_task(d["advantages"], d["mask"])
        rms = masked_mean_per_task(d["advantages"].square(), d["mask"]).sqrt()
        ratios.append(mean.abs() / rms.clamp_min(torch.finfo(rms.dtype).tiny))
    norms = learner.cfg.fast_lr * hessian_norms(
        learner.inner_loss, path, inner_data, iters=iters,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return CurvatureRow(
        name, float(torch.stack(ratios).median()), float(norms.median()), float(norms.max())
    )


def curvature_table(
    cfg: Config, params: Params, *, meta_batch_size: int | None = None, seed: int = 0,
    iters: int = 20,
) -> list[CurvatureRow]:  # fmt: skip
    """Sample ``meta_batch_size`` tasks (default: the config's), take the K inner steps from
    ``params``, and measure every data set the meta-step may use: all inner data, every
    ``fvp-subsample``-th episode and every ``fvp-subsample``-th time step (n = 5 when the
    config has no subsample), each as is and with re-centred advantages."""
    n = cfg.fvp_subsample if cfg.fvp_subsample > 1 else 5
    with open_sampler(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        tasks = sampler.sample_tasks(meta_batch_size or cfg.meta_batch_size, seed=seed)
        adaptation = learner.adapt(params, tasks, cfg.num_steps, seed=derive_seed(seed, 1))
        path, inner = adaptation.path, adaptation.inner_data
        sets = {
            "all inner data (the meta-gradient's)": inner,
            f"1 in {n} whole episodes": [fvp_subsample(d, n, "episodes") for d in inner],
            f"1 in {n} time steps": [fvp_subsample(d, n, "steps") for d in inner],
        }
        rows = []
        for name, data in sets.items():
            rows.append(_row(learner, name, path, data, iters))
            centred = [centred_advantages(d) for d in data]
            rows.append(_row(learner, f"{name}, advantages re-centred", path, centred, iters))
    return rows


def format_curvature_table(rows: list[CurvatureRow]) -> str:
    lines = [
        "| data | abs(mean A) / rms A | a norm(H_k), median | a norm(H_k), max |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.data} | {r.advantage_mean_over_rms:.3f} | {r.alpha_hessian_norm_median:.3f} "
            f"| {r.alpha_hessian_norm_max:.3f} |"
        )
    return "\n".join(lines)
