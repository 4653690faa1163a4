"""Meta-test protocol: sample test tasks, adapt with the training inner step, report returns.

For ``num_batches`` batches of ``meta_batch_size`` test tasks (seeds disjoint from
training), sample ``fast-batch-size`` episodes with phi_0 = theta, take the inner
policy-gradient step, sample again, ... up to ``num_steps`` steps. The result is the mean
undiscounted return of each task after n = 0..num_steps steps, summarised as mean and
standard error over tasks (the MAML paper's table).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from binom_rl.agents.maml_trpo import MetaLearner, derive_seed
from binom_rl.agents.training import CHECKPOINT_FILE, CONFIG_FILE, open_sampler
from binom_rl.checkpoint import load_checkpoint
from binom_rl.config import Config, ConfigError, load_yaml
from binom_rl.rl import mean_and_stderr

TEST_SEED_OFFSET = 1_000_003  # test task seeds never coincide with training ones


def load_run(run: str | os.PathLike, device: str | None = None) -> tuple[Config, dict]:
    """Config and parameters of a training run folder."""
    folder = Path(run)
    if not (folder / CHECKPOINT_FILE).is_file():
        raise ConfigError(f"{folder} has no {CHECKPOINT_FILE}: not a training run folder")
    cfg = Config.from_saved(load_yaml(folder / CONFIG_FILE))
    if device is not None:
        cfg.device = device
    state = load_checkpoint(folder / CHECKPOINT_FILE)
    params = {k: v.to(cfg.device) for k, v in state["params"].items()}
    return cfg, params


def evaluate_params(
    cfg: Config,
    params: dict[str, torch.Tensor],
    *,
    num_steps: int,
    meta_batch_size: int,
    num_batches: int,
    seed: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Returns [num_batches * meta_batch_size, num_steps + 1]: mean return per task and step."""
    for name, value in (
        ("num_steps", num_steps),
        ("meta_batch_size", meta_batch_size),
        ("num_batches", num_batches),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    seed = cfg.seed + TEST_SEED_OFFSET if seed is None else seed
    rows = []
    with open_sampler(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        for batch in tqdm(range(num_batches), desc="evaluate", disable=not progress):
            tasks = sampler.sample_tasks(meta_batch_size, seed=derive_seed(seed, batch, 0))
            result = learner.adapt(params, tasks, num_steps, seed=derive_seed(seed, batch, 1))
            per_step = [eps.returns.mean(dim=1).cpu().numpy() for eps in result.episodes]
            rows.append(np.stack(per_step, axis=1))
    return np.concatenate(rows, axis=0)


def summarize(returns: np.ndarray) -> list[dict[str, float]]:
    """Mean and standard error over tasks of the return after each number of steps."""
    mean, stderr = mean_and_stderr(returns, axis=0)
    return [
        {"step": float(k), "mean_return": float(m), "stderr": float(s)}
        for k, (m, s) in enumerate(zip(mean, stderr, strict=True))
    ]


def write_results(folder: str | os.PathLike, returns: np.ndarray) -> list[dict[str, float]]:
    """results.npz (per-task returns) and results.csv (the summary table) in ``folder``."""
    folder = Path(folder)
    summary = summarize(returns)
    np.savez(
        folder / "results.npz",
        returns=returns,
        mean=[r["mean_return"] for r in summary],
        stderr=[r["stderr"] for r in summary],
    )
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "mean_return", "stderr"])
        writer.writeheader()
        for row in summary:
            writer.writerow(
                {
                    "step": int(row["step"]),
                    "mean_return": f"{row['mean_return']:.4f}",
                    "stderr": f"{row['stderr']:.4f}",
                }
            )
    return summary


def format_table(summary: list[dict[str, float]], num_tasks: int) -> str:
    lines = [
        f"return after n inner steps, mean +- standard error over {num_tasks} test tasks",
        "| steps | mean return | std. error |",
        "|---|---|---|",
    ]
    for row in summary:
        lines.append(f"| {int(row['step'])} | {row['mean_return']:.2f} | {row['stderr']:.2f} |")
    return "\n".join(lines)
