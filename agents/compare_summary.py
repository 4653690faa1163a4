"""A comparison's summary: read the runs' TensorBoard events and results.npz, write the
tables and plots.

:func:`aggregate` turns the finished runs of a :class:`~binom_rl.agents.compare.Plan`
into one :class:`Row` per estimator and baseline; :func:`write_summary` writes
summary.md, summary.csv, learning_curves.png and adaptation.png. Every number is read back
from the runs' own files: there is no second logging path.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from binom_rl.agents.training import read_scalars
from binom_rl.rl import mean_and_stderr

if TYPE_CHECKING:
    from binom_rl.agents.compare import Plan, RunPlan
    from binom_rl.config import Config

__all__ = ["FINAL_WINDOW", "Row", "aggregate", "format_summary", "write_summary"]

FINAL_WINDOW = 10  # final post-adaptation return: mean of the last 10 iterations


def outer_label(cfg: Config) -> str:
    """``trpo/post``, ``trpo/pre`` or ``ppo``: the outer loop a run's config selects."""
    return f"trpo/{cfg.trust_region}" if cfg.outer == "trpo" else cfg.outer


@dataclass
class Row:
    """One line of the summary: an estimator or a baseline over its seeds."""

    label: str
    kind: str
    seeds: int
    env_steps: int
    adapt_mean: list[float]  # return after 0..n adaptation steps (nan: not evaluated)
    adapt_se: list[float]
    final_mean: float = math.nan
    final_se: float = math.nan
    sampling_s: float = math.nan
    meta_step_s: float = math.nan
    peak_mb: float = math.nan
    cosine: float = math.nan
    outer: str = ""  # the meta-learners' outer loop (outer_label); blank for baselines
    inner_loss: str = ""  # the inner loss of every adaptation step; blank for oracle
    curve: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    # envs that report success (Meta-World): success rate after 0..n test steps, the last
    # iterations' success/step_K, and its curve; None / nan for the others
    success_mean: list[float] | None = None
    success_se: list[float] | None = None
    final_success: float = math.nan
    final_success_se: float = math.nan
    success_curve: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, repr=False
    )


def _seed_stats(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    mean, se = mean_and_stderr(x)
    return float(mean), float(se)


def _window_mean(series: dict[int, float], window: int) -> float:
    steps = sorted(series)[-window:]
    return float(np.mean([series[s] for s in steps])) if steps else math.nan


def _mean_excluding_first(series: dict[int, float]) -> float:
    """Mean over iterations, without the first one when there are more (warm-up)."""
    steps = sorted(series)
    steps = steps[1:] if len(steps) > 1 else steps
    return float(np.mean([series[s] for s in steps])) if steps else math.nan


def _adaptation(
    folders: list[Path], width: int, what: str = "mean"
) -> tuple[list[float], list[float]]:
    """Mean and standard error over seeds of the per-seed mean return (``what="mean"``) or
    success rate (``"success_mean"``) after n steps.

    With one seed the standard error is over its test tasks (results.npz ``stderr`` /
    ``success_stderr``).
    """
    means, ses = [], []
    se_key = "stderr" if what == "mean" else "success_stderr"
    for folder in folders:
        with np.load(folder / "results.npz") as data:
            means.append(np.asarray(data[what], dtype=np.float64))
            ses.append(np.asarray(data[se_key], dtype=np.float64))
    out_mean, out_se = [math.nan] * width, [math.nan] * width
    if not means:
        return out_mean, out_se
    stacked = np.stack(means)
    mean, se = mean_and_stderr(stacked, axis=0)
    if len(means) == 1:
        se = ses[0]
    for k in range(stacked.shape[1]):
        out_mean[k], out_se[k] = float(mean[k]), float(se[k])
    return out_mean, out_se


def aggregate(plan: Plan, exclude: set[str] | frozenset[str] = frozenset()) -> list[Row]:
    """Summary rows in the plan's order, from events and results.npz of the finished runs."""
    width = plan.options.eval_num_steps + 1
    rows: list[Row] = []
    labels = [s.label for s in plan.estimators] + plan.baselines
    for label in labels:
        runs = [
            r
            for r in plan.runs
            if r.label == label
            and r.folder.name not in exclude
            and (r.folder / "results.npz").is_file()
        ]
        if not runs:
            continue
        kind = runs[0].kind
        adapt_mean, adapt_se = _adaptation([r.folder for r in runs], width)
        row = Row(label, kind, len(runs), runs[0].env_steps, adapt_mean, adapt_se)
        cfg = runs[0].cfg
        row.outer = outer_label(cfg) if kind == "estimator" else ""
        row.inner_loss = cfg.inner_loss if label != "oracle" else ""
        if all(_has_success(r.folder) for r in runs):
            row.success_mean, row.success_se = _adaptation(
                [r.folder for r in runs], width, "success_mean"
            )
        if kind == "estimator":
            _fill_training_stats(row, runs)
        rows.append(row)
    return rows


def _has_success(folder: Path) -> bool:
    with np.load(folder / "results.npz") as data:
        return "success_mean" in data.files


def _fill_training_stats(row: Row, runs: list[RunPlan]) -> None:
    k = runs[0].cfg.num_steps
    scalars = [read_scalars(r.folder) for r in runs]
    finals = [_window_mean(s.get(f"returns/step_{k}", {}), FINAL_WINDOW) for s in scalars]
    row.final_mean, row.final_se = _seed_stats(finals)
    if len(runs) == 1:  # one seed: standard error over the last iterations
        series = scalars[0].get(f"returns/step_{k}", {})
        last = [series[s] for s in sorted(series)[-FINAL_WINDOW:]]
        row.final_se = _seed_stats(last)[1]
    row.sampling_s = float(
        np.mean([_mean_excluding_first(s.get("time/sampling_s", {})) for s in scalars])
    )
    row.meta_step_s = float(
        np.mean([_mean_excluding_first(s.get("time/meta_step_s", {})) for s in scalars])
    )
    row.peak_mb = float(
        np.mean([max(s.get("memory/peak_mb", {0: math.nan}).values()) for s in scalars])
    )
    cosines = [v for s in scalars for v in s.get("metagrad/cosine_to_exact", {}).values()]
    row.cosine = float(np.mean(cosines)) if cosines else math.nan
    row.curve = _seed_curve([s.get(f"returns/step_{k}", {}) for s in scalars])
    if all(f"success/step_{k}" in s for s in scalars):
        series = [s[f"success/step_{k}"] for s in scalars]
        row.final_success, row.final_success_se = _seed_stats(
            [_window_mean(c, FINAL_WINDOW) for c in series]
        )
        if len(runs) == 1:
            row.final_success_se = _seed_stats(
                [series[0][i] for i in sorted(series[0])[-FINAL_WINDOW:]]
            )[1]
        row.success_curve = _seed_curve(series)


def _seed_curve(
    curves: list[dict[int, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(iterations, mean, standard error) over seeds at the iterations all seeds logged."""
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if not common:
        return None
    values = np.array([[c[i] for i in common] for c in curves])
    mean, se = mean_and_stderr(values, axis=0)
    return np.asarray(common), mean, se


# ----------------------------------------------------------------------------- outputs


def _fmt(mean: float, se: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.2f}" if math.isnan(se) else f"{mean:.2f} ± {se:.2f}"


def _num(x: float, digits: int = 3) -> str:
    return "" if math.isnan(x) else f"{x:.{digits}f}"


def format_summary(plan: Plan, rows: list[Row]) -> str:
    """The markdown table (one row per estimator and baseline) with its notes."""
    n = plan.options.eval_num_steps
    cfg = plan.runs[0].cfg if plan.runs else None
    k = cfg.num_steps if cfg else 0
    head = ["method", "seeds", "env steps"]
    head += [f"{s} step{'s' if s != 1 else ''}" for s in range(n + 1)]
    head += [
        f"final train return (step {k})",
        "sampling s/iter",
        "meta-step s/iter",
        "peak MB",
        "cos to exact",
        "outer",
        "inner loss",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label, str(row.seeds), f"{row.env_steps:,}"]
        cells += [_fmt(m, s) for m, s in zip(row.adapt_mean, row.adapt_se, strict=True)]
        cells += [
            _fmt(row.final_mean, row.final_se),
            _num(row.sampling_s),
            _num(row.meta_step_s),
            _num(row.peak_mb, 0),
            _num(row.cosine, 4),
            row.outer,
            row.inner_loss,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    opts = plan.options
    tasks = opts.eval_meta_batch_size * opts.eval_num_batches
    notes = [
        "",
        f"Env: {cfg.env_name if cfg else '?'}, horizon {plan.horizon}. "
        f"Return after n inner policy-gradient steps (fast-lr {cfg.fast_lr if cfg else '?'}, "
        f"fast-batch-size {cfg.fast_batch_size if cfg else '?'} episodes per step) on {tasks} "
        "test tasks per seed; mean ± standard error over seeds (with one seed: over test "
        "tasks). Test tasks for seed S are the same for every row.",
        f"Final train return: returns/step_{k} over the last {FINAL_WINDOW} meta-iterations "
        "(± over seeds; one seed: over those iterations). Times: mean over iterations "
        "(first one left out) of time/sampling_s and time/meta_step_s; peak MB: "
        "max of memory/peak_mb (CPU: process peak RSS); cos to exact: mean of "
        "metagrad/cosine_to_exact where diagnosed (--diagnose-every), else blank. Outer: "
        "trpo/post (MAML-TRPO), trpo/pre (TRPO with the inner steps' sampling policies in "
        "the trust region) or ppo (ProMP); inner loss: vpg, lvc or dice, in training and "
        "at test time.",
        "Env steps: training budget of one run, num-batches x meta-batch x fast-batch x "
        "(num-steps + 1) x horizon (meta-learners), PPO timesteps (pretrained, oracle), "
        "0 (random); test-time adaptation steps are not counted.",
        "Baselines: pretrained = SB3 PPO on the task distribution, converted to our policy "
        "and adapted with the same inner steps; oracle = PPO with the task parameters in "
        "the observation, 0 adaptation steps; random = policy.init_params(seed), adapted.",
    ]
    return "\n".join(lines + notes + _success_table(n, k, rows)) + "\n"


def _success_table(n: int, k: int, rows: list[Row]) -> list[str]:
    """Markdown lines of the success-rate table, for envs that report success (else none)."""
    rows = [row for row in rows if row.success_mean is not None]
    if not rows:
        return []
    head = ["method", *(f"{s} step{'s' if s != 1 else ''}" for s in range(n + 1))]
    head.append(f"final train success (step {k})")
    lines = ["", "Success rate (fraction of episodes with info['success'] at some step):", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label]
        cells += [_fmt(m, s) for m, s in zip(row.success_mean, row.success_se, strict=True)]
        cells.append(_fmt(row.final_success, row.final_success_se))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Success after n steps: on the same test tasks as the returns; final train success: "
        f"success/step_{k} over the last {FINAL_WINDOW} meta-iterations.",
    ]
    return lines


def write_summary(plan: Plan, rows: list[Row]) -> None:
    """summary.md, summary.csv, learning_curves.png, adaptation.png in the output folder."""
    folder = plan.folder
    (folder / "summary.md").write_text(format_summary(plan, rows))
    n = plan.options.eval_num_steps
    fields = ["method", "kind", "seeds", "env_steps"]
    for s in range(n + 1):
        fields += [f"return_step_{s}", f"return_step_{s}_se"]
    fields += [
        "final_return",
        "final_return_se",
        "sampling_s",
        "meta_step_s",
        "peak_mb",
        "cosine_to_exact",
        "outer",
        "inner_loss",
    ]
    with_success = any(row.success_mean is not None for row in rows)
    if with_success:
        fields += [f"success_step_{s}{se}" for s in range(n + 1) for se in ("", "_se")]
        fields += ["final_success", "final_success_se"]
    with open(folder / "summary.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for row in rows:
            values: list[Any] = [row.label, row.kind, row.seeds, row.env_steps]
            for m, s in zip(row.adapt_mean, row.adapt_se, strict=True):
                values += [_num(m, 4), _num(s, 4)]
            values += [
                _num(row.final_mean, 4),
                _num(row.final_se, 4),
                _num(row.sampling_s, 4),
                _num(row.meta_step_s, 4),
                _num(row.peak_mb, 1),
                _num(row.cosine, 6),
                row.outer,
                row.inner_loss,
            ]
            if with_success:
                success = zip(row.success_mean or [math.nan] * (n + 1),
                              row.success_se or [math.nan] * (n + 1), strict=True)  # fmt: skip
                values += [_num(x, 4) for pair in success for x in pair]
                values += [_num(row.final_success, 4), _num(row.final_success_se, 4)]
            writer.writerow(values)
    _plot(plan, rows)
    if with_success:
        _plot_success(plan, rows)


def _plot(plan: Plan, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = plan.runs[0].cfg.num_steps if plan.runs else 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.curve is None:
            continue
        x, mean, se = row.curve
        (line,) = ax.plot(x, mean, label=row.label)
        ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"returns/step_{k} (post-adaptation)")
    ax.set_title("meta-training: mean ± s.e. over seeds")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(plan.folder / "learning_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = np.arange(plan.options.eval_num_steps + 1)
    for row in rows:
        mean, se = np.asarray(row.adapt_mean), np.asarray(row.adapt_se)
        if row.label == "oracle":  # 0 adaptation steps: a reference level
            line = ax.axhline(mean[0], linestyle="--", color="k", label="oracle")
            ax.axhspan(mean[0] - se[0], mean[0] + se[0], color=line.get_color(), alpha=0.1)
            continue
        style = ":" if row.kind == "baseline" else "-"
        ax.errorbar(steps, mean, yerr=se, marker="o", capsize=3, linestyle=style, label=row.label)
    ax.set_xticks(steps)
    ax.set_xlabel("adaptation steps at test time")
    ax.set_ylabel("mean return")
    ax.set_title("test-time adaptation: mean ± s.e.")
    if rows:
        ax.legend()
    fig.tight_layout()
    fig.savefig(plan.folder / "adaptation.png", dpi=120)
    plt.close(fig)


def _plot_success(plan: Plan, rows: list[Row]) -> None:
    """success_curves.png (success/step_K over meta-training) and success_adaptation.png
    (success rate after n test steps), for the rows whose env reports success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = plan.runs[0].cfg.num_steps if plan.runs else 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.success_curve is None:
            continue
        x, mean, se = row.success_curve
        (line,) = ax.plot(x, mean, label=row.label)
        ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"success/step_{k} (post-adaptation)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("meta-training success rate: mean ± s.e. over seeds")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(plan.folder / "success_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = np.arange(plan.options.eval_num_steps + 1)
    for row in rows:
        if row.success_mean is None:
            continue
        style = ":" if row.kind == "baseline" else "-"
        ax.errorbar(steps, row.success_mean, yerr=row.success_se, marker="o", capsize=3,
                    linestyle=style, label=row.label)  # fmt: skip
    ax.set_xticks(steps)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("adaptation steps at test time")
    ax.set_ylabel("success rate")
    ax.set_title("test-time adaptation: success rate, mean ± s.e.")
    if ax.lines or ax.containers:
        ax.legend()
    fig.tight_layout()
    fig.savefig(plan.folder / "success_adaptation.png", dpi=120)
    plt.close(fig)
