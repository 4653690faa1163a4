"""Meta-test protocol: sample test tasks, adapt with the training inner step, report returns.

For ``num_batches`` batches of ``meta_batch_size`` test tasks (seeds disjoint from
training; the env's held-out test split where it has one, e.g. Meta-World's), sample
``fast-batch-size`` episodes with phi_0 = theta, take the inner policy-gradient step,
sample again, ... up to ``num_steps`` steps. The result is the mean undiscounted return
of each task after n = 0..num_steps steps, summarised as mean and standard error over
tasks (the MAML paper's table), and for envs that report success (Meta-World) the
fraction of each task's episodes that succeeded; the mean length of each task's episodes
too (below the horizon where episodes end early).

Step sizes (:func:`adaptation_step_sizes`): the K steps the policy was meta-trained for take
fast-lr; every step beyond them takes ``step_size_decay`` times the previous one. The
inner loss standardises each task's advantages, so a step's length does not shrink as the
policy nears the task's optimum, and steps of the training size past the K it was
meta-trained to land with oscillate around it (docs/results/2dnav_k1.md, "More test
steps"); the MAML paper's own test scripts also shrink the steps after the first.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from binom_rl.agents.inner_loop import AdaptationResult
from binom_rl.agents.maml_trpo import MetaLearner, derive_seed
from binom_rl.agents.training import CHECKPOINT_FILE, CONFIG_FILE, open_sampler
from binom_rl.checkpoint import load_checkpoint
from binom_rl.config import Config, ConfigError, load_yaml
from binom_rl.rl import mean_and_stderr

TEST_SEED_OFFSET = 1_000_003  # test task seeds never coincide with training ones
STEP_SIZE_DECAY = 0.5  # each test step beyond the meta-trained K: half the previous one


def adaptation_step_sizes(
    cfg: Config, num_steps: int, decay: float = STEP_SIZE_DECAY
) -> list[float]:
    """Step size of test steps 1..num_steps: fast-lr for the first num-steps (K) of
    training, then fast-lr * decay^j for step K + j. ``decay`` 1: every step fast-lr."""
    if not 0 < decay <= 1:
        raise ConfigError(f"step-size-decay must be in (0, 1], got {decay}")
    return [cfg.fast_lr * decay ** max(0, n - cfg.num_steps) for n in range(1, num_steps + 1)]


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


@dataclass
class Evaluation:
    """Per test task (rows) and number of inner steps (columns, 0..num_steps)."""

    returns: np.ndarray  # mean return of the task's episodes
    success: np.ndarray | None = None  # fraction of them that succeeded; None: env has none
    step_sizes: tuple[float, ...] = ()  # of steps 1..num_steps (adaptation_step_sizes)
    lengths: np.ndarray | None = None  # mean length of the task's episodes (env steps)


def _per_task_mean(episodes: Sequence, field: str) -> np.ndarray:
    """[tasks, steps]: the mean over each task's episodes of ``field`` ([tasks, episodes]
    in each step's Episodes)."""
    return np.stack(
        [getattr(e, field).double().mean(dim=1).cpu().numpy() for e in episodes], axis=1
    )


def evaluate_params(
    cfg: Config,
    params: dict[str, torch.Tensor],
    *,
    num_steps: int,
    meta_batch_size: int,
    num_batches: int,
    seed: int | None = None,
    progress: bool = True,
    step_size_decay: float = STEP_SIZE_DECAY,
) -> np.ndarray:
    """Returns [num_batches * meta_batch_size, num_steps + 1]: mean return per task and step
    (:func:`evaluate_adaptation`'s returns)."""
    return evaluate_adaptation(
        cfg, params, num_steps=num_steps, meta_batch_size=meta_batch_size,
        num_batches=num_batches, seed=seed, progress=progress, step_size_decay=step_size_decay,
    ).returns  # fmt: skip


def evaluate_adaptation(
    cfg: Config,
    params: dict[str, torch.Tensor],
    *,
    num_steps: int,
    meta_batch_size: int,
    num_batches: int,
    seed: int | None = None,
    progress: bool = True,
    step_size_decay: float = STEP_SIZE_DECAY,
    on_batch: Callable[[list[dict], AdaptationResult], None] | None = None,
) -> Evaluation:
    """Returns and success rates [num_batches * meta_batch_size, num_steps + 1] of the test
    tasks (module doc).

    ``on_batch(tasks, result)``, where given, sees each batch's test tasks and their
    adaptation (the episodes of every step, the adapted parameters), in order, so that an
    analysis of the episodes (docs/results/ant_speeds.py) runs on the table's own tasks and
    seeds instead of repeating this loop."""
    for name, value in (
        ("num_steps", num_steps),
        ("meta_batch_size", meta_batch_size),
        ("num_batches", num_batches),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    step_sizes = adaptation_step_sizes(cfg, num_steps, step_size_decay)
    seed = cfg.seed + TEST_SEED_OFFSET if seed is None else seed
    returns, success, lengths = [], [], []
    with open_sampler(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        for batch in tqdm(range(num_batches), desc="evaluate", disable=not progress):
            tasks = sampler.sample_tasks(
                meta_batch_size, seed=derive_seed(seed, batch, 0), split="test"
            )
            result = learner.adapt(
                params, tasks, num_steps, seed=derive_seed(seed, batch, 1), step_sizes=step_sizes
            )
            if on_batch is not None:
                on_batch(tasks, result)
            returns.append(_per_task_mean(result.episodes, "returns"))
            lengths.append(_per_task_mean(result.episodes, "lengths"))
            if result.episodes[0].successes is not None:
                success.append(_per_task_mean(result.episodes, "successes"))
    return Evaluation(
        np.concatenate(returns),
        np.concatenate(success) if success else None,
        tuple(step_sizes),
        np.concatenate(lengths),
    )


def summarize(
    returns: np.ndarray, success: np.ndarray | None = None, lengths: np.ndarray | None = None
) -> list[dict[str, float]]:
    """Mean and standard error over tasks of the return (and of the success rate, where
    given) after each number of steps; the mean episode length too, where given."""
    mean, stderr = mean_and_stderr(returns, axis=0)
    rows = [
        {"step": float(k), "mean_return": float(m), "stderr": float(s)}
        for k, (m, s) in enumerate(zip(mean, stderr, strict=True))
    ]
    if success is not None:
        rate, rate_se = mean_and_stderr(success, axis=0)
        for row, r, s in zip(rows, rate, rate_se, strict=True):
            row.update(success_rate=float(r), success_stderr=float(s))
    if lengths is not None:
        for row, n in zip(rows, lengths.mean(axis=0), strict=True):
            row["mean_length"] = float(n)
    return rows


def write_results(
    folder: str | os.PathLike,
    returns: np.ndarray,
    success: np.ndarray | None = None,
    step_sizes: Sequence[float] = (),
    lengths: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """results.npz (per-task returns, success rates and episode lengths, the test steps'
    sizes) and results.csv (the summary table of returns and success rates) in ``folder``."""
    folder = Path(folder)
    summary = summarize(returns, success, lengths)
    arrays = {
        "returns": returns,
        "step_sizes": np.asarray(step_sizes, dtype=np.float64),
        "mean": [r["mean_return"] for r in summary],
        "stderr": [r["stderr"] for r in summary],
    }
    fields = ["step", "mean_return", "stderr"]
    if success is not None:
        arrays.update(
            success=success,
            success_mean=[r["success_rate"] for r in summary],
            success_stderr=[r["success_stderr"] for r in summary],
        )
        fields += ["success_rate", "success_stderr"]
    if lengths is not None:
        arrays.update(lengths=lengths, length_mean=[r["mean_length"] for r in summary])
    np.savez(folder / "results.npz", **arrays)
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in summary:
            writer.writerow({k: int(row[k]) if k == "step" else f"{row[k]:.4f}" for k in fields})
    return summary


def format_table(
    summary: list[dict[str, float]],
    num_tasks: int,
    step_sizes: Sequence[float] = (),
    horizon: int | None = None,
) -> str:
    """The summary as a markdown table; with a column of the mean episode length where the
    summary has it and some episode ended before ``horizon`` (None: always)."""
    with_success = "success_rate" in summary[0]
    with_length = "mean_length" in summary[0] and (
        horizon is None or any(row["mean_length"] < horizon for row in summary)
    )
    what = "return and success rate" if with_success else "return"
    sizes = f" (step sizes {', '.join(f'{a:g}' for a in step_sizes)})" if step_sizes else ""
    lines = [
        f"{what} after n inner steps{sizes}, mean +- standard error over {num_tasks} test tasks",
        "| steps | mean return | std. error |"
        + (" success rate | std. error |" * with_success)
        + (" mean episode length |" * with_length),
        "|---|---|---|" + ("---|---|" * with_success) + ("---|" * with_length),
    ]
    for row in summary:
        line = f"| {int(row['step'])} | {row['mean_return']:.2f} | {row['stderr']:.2f} |"
        if with_success:
            line += f" {row['success_rate']:.3f} | {row['success_stderr']:.3f} |"
        if with_length:
            line += f" {row['mean_length']:.1f} |"
        lines.append(line)
    return "\n".join(lines)
