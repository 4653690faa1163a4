"""Baseline comparison harness: estimators x seeds, non-meta baselines, one summary.

:func:`plan_comparison` validates everything and decides, for every run folder, what is
left to do (nothing, evaluate, resume, train); :func:`run_comparison` does it and writes
the summary. Folder layout under ``output_folder``::

    configs/<est>_seed<S>.yaml      resolved config each training run starts from
    <est>_seed<S>/                  scripts/train.py run (policy.pt, events, train.log)
                                    + results.npz / results.csv (evaluate.py protocol)
    <baseline>_seed<S>/             config.yaml, baseline.json, ppo.zip, results.npz
    summary.md, summary.csv, learning_curves.png, adaptation.png

Each estimator run is a separate process (``scripts/train.py --torch-threads 1
--no-progress``, then ``scripts/evaluate.py``), at most ``jobs`` at once; the baselines run
one after another in this process on one pool slot (they share torch's global RNG).
Every number in the summary is read back from the runs' TensorBoard events and
results.npz files: there is no second logging path.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from binom_rl.agents.evaluation import TEST_SEED_OFFSET, evaluate_params, write_results
from binom_rl.agents.maml_trpo import mean_and_stderr
from binom_rl.agents.training import CHECKPOINT_FILE, CONFIG_FILE, read_scalars
from binom_rl.checkpoint import atomic_write, load_checkpoint
from binom_rl.config import Config, ConfigError, load_yaml, save_config
from binom_rl.metagrad import METHODS

__all__ = [
    "EstimatorSpec",
    "CompareOptions",
    "RunPlan",
    "Row",
    "parse_estimators",
    "parse_seeds",
    "parse_baselines",
    "plan_comparison",
    "run_comparison",
    "aggregate",
    "write_summary",
]

BASELINES = ("pretrained", "oracle", "random")
FINAL_WINDOW = 10  # final post-adaptation return: mean of the last 10 iterations
DEFAULT_BASELINE_CAP = 1_000_000  # default PPO budget: min(one estimator run's, this)
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
BASELINE_META = "baseline.json"
LOG_FILE = "train.log"


@dataclass(frozen=True)
class EstimatorSpec:
    """One meta-gradient estimator: ``maml``, ``fomaml``, ``trunc:L`` or ``binom:L``."""

    name: str
    order: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.order is None else f"{self.name}:{self.order}"

    @property
    def key(self) -> str:
        """Folder-safe name: ``binom:2`` -> ``binom2``."""
        return self.name if self.order is None else f"{self.name}{self.order}"

    def config_keys(self, num_steps: int) -> dict[str, Any]:
        """The config's estimator and order (maml: order K, fomaml: 0)."""
        order = {"maml": num_steps, "fomaml": 0}.get(self.name, self.order)
        return {"estimator": self.name, "order": order}


def parse_estimators(text: str, num_steps: int) -> list[EstimatorSpec]:
    """``"maml,fomaml,trunc:2,binom:1"`` -> specs; ConfigError on a bad name or order."""
    specs: list[EstimatorSpec] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            raise ConfigError(f"--estimators: empty entry in {text!r}")
        name, _, order_text = item.partition(":")
        if name not in METHODS:
            raise ConfigError(f"--estimators: unknown estimator {name!r}; use {', '.join(METHODS)}")
        order: int | None = None
        if name in ("trunc", "binom"):
            if not order_text:
                raise ConfigError(f"--estimators: {name} needs an order, e.g. {name}:1")
            try:
                order = int(order_text)
            except ValueError as err:
                raise ConfigError(f"--estimators: order of {item!r} is not an int") from err
            if not 0 <= order <= num_steps:
                raise ConfigError(f"--estimators: {item} needs 0 <= L <= num-steps ({num_steps})")
        elif order_text:
            raise ConfigError(f"--estimators: {name} takes no order, got {item!r}")
        spec = EstimatorSpec(name, order)
        if spec in specs:
            raise ConfigError(f"--estimators: {item} given twice")
        specs.append(spec)
    return specs


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; ConfigError on non-ints, negatives or repeats."""
    seeds = []
    for item in (s.strip() for s in text.split(",")):
        try:
            seed = int(item)
        except ValueError as err:
            raise ConfigError(f"--seeds: {item!r} is not an int") from err
        if seed < 0 or seed in seeds:
            raise ConfigError(f"--seeds: {seed} is negative or repeated")
        seeds.append(seed)
    return seeds


def parse_baselines(text: str | None) -> list[str]:
    """``"pretrained,oracle,random"`` -> names (empty or None: none)."""
    if not text:
        return []
    names = [s.strip() for s in text.split(",")]
    for name in names:
        if name not in BASELINES:
            raise ConfigError(f"--baselines: unknown baseline {name!r}; use {', '.join(BASELINES)}")
    if len(set(names)) != len(names):
        raise ConfigError("--baselines: a baseline is given twice")
    return names


@dataclass
class CompareOptions:
    """Everything a comparison needs (the script's flags, unparsed lists as given)."""

    config: str | os.PathLike | None  # YAML config (MAML-RL keys) or None: defaults
    overrides: dict[str, Any]  # config keys given as flags
    estimators: str
    seeds: str
    output_folder: str | os.PathLike
    baselines: str | None = None
    jobs: int = 1
    eval_num_steps: int = 3
    eval_meta_batch_size: int = 40
    eval_num_batches: int = 2
    baseline_timesteps: int | None = None
    progress: bool = True


@dataclass
class RunPlan:
    """One run folder and what is left to do in it."""

    label: str  # estimator label or baseline name
    kind: str  # "estimator" or "baseline"
    seed: int
    folder: Path
    cfg: Config
    action: str  # "skip", "evaluate", "resume", "train", "overwrite"
    env_steps: int  # training env steps (budget) of this run


@dataclass
class Plan:
    """The validated comparison: runs in order, evaluation sizes, budgets."""

    options: CompareOptions
    folder: Path
    estimators: list[EstimatorSpec]
    seeds: list[int]
    baselines: list[str]
    runs: list[RunPlan]
    horizon: int
    baseline_timesteps: int


def _env_horizon(cfg: Config) -> int:
    try:
        env = gym.make(cfg.env_name, **cfg.env_kwargs)
    except Exception as err:  # unknown id, bad kwargs, missing module
        raise ConfigError(f"cannot make env {cfg.env_name!r}: {err}") from err
    try:
        horizon = cfg.max_episode_steps or (env.spec.max_episode_steps if env.spec else None)
    finally:
        env.close()
    if horizon is None:
        raise ConfigError(f"{cfg.env_name} has no registered horizon: pass --max-episode-steps")
    return int(horizon)


def run_budget(cfg: Config, horizon: int, iterations: int | None = None) -> int:
    """Env steps of meta-training: iterations x meta-batch x fast-batch x (K + 1) x horizon."""
    iterations = cfg.num_batches if iterations is None else iterations
    return iterations * cfg.meta_batch_size * cfg.fast_batch_size * (cfg.num_steps + 1) * horizon


def _results_ok(folder: Path, num_tasks: int, num_steps: int) -> bool:
    path = folder / "results.npz"
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return data["returns"].shape == (num_tasks, num_steps + 1)
    except (OSError, ValueError, KeyError):
        return False


def _estimator_action(folder: Path, cfg: Config, num_tasks: int, eval_steps: int) -> str:
    if not folder.is_dir() or not any(folder.iterdir()):
        return "train"
    if not (folder / CHECKPOINT_FILE).is_file():
        return "overwrite"  # crashed before its first checkpoint
    saved = Config.from_saved(load_yaml(folder / CONFIG_FILE)).to_dict()
    wanted = cfg.to_dict()
    diff = [k for k in wanted if k != "num-batches" and saved.get(k) != wanted[k]]
    if diff:
        raise ConfigError(
            f"{folder} was trained with different settings ({', '.join(diff)}): use another "
            "--output-folder or delete that run"
        )
    done = int(load_checkpoint(folder / CHECKPOINT_FILE)["iteration"])
    if done > cfg.num_batches:
        raise ConfigError(
            f"{folder} has {done} iterations, more than num-batches {cfg.num_batches}"
        )
    if done < cfg.num_batches:
        return "resume"
    return "skip" if _results_ok(folder, num_tasks, eval_steps) else "evaluate"


def _baseline_meta(name: str, cfg: Config, timesteps: int) -> dict[str, Any]:
    """What a baseline result depends on (meta-training length and estimator do not count)."""
    config = {
        k: v for k, v in cfg.to_dict().items() if k not in ("num-batches", "estimator", "order")
    }
    return {"baseline": name, "timesteps": timesteps if name != "random" else 0, "config": config}


def _baseline_action(folder: Path, meta: dict[str, Any], num_tasks: int, eval_steps: int) -> str:
    path = folder / BASELINE_META
    if not path.is_file() or json.loads(path.read_text()) != meta:
        return "train"
    return "skip" if _results_ok(folder, num_tasks, eval_steps) else "evaluate"


def plan_comparison(options: CompareOptions) -> Plan:
    """Validate every argument and existing run folder; nothing is written. ConfigError if bad."""
    for key in ("estimator", "order", "seed"):
        if key in options.overrides:
            raise ConfigError(f"--{key} is set per run here: use --estimators / --seeds")
    base = load_yaml(options.config) if options.config else {}
    base.update(options.overrides)
    for name, value, low in (
        ("--jobs", options.jobs, 1),
        ("--eval-num-steps", options.eval_num_steps, 1),
        ("--eval-meta-batch-size", options.eval_meta_batch_size, 1),
        ("--eval-num-batches", options.eval_num_batches, 1),
    ):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    # estimator and order are set per run: validate the rest with a neutral choice
    neutral = {"estimator": "fomaml", "order": 0}
    probe = Config.from_dict({**base, **neutral})
    estimators = parse_estimators(options.estimators, probe.num_steps)
    seeds = parse_seeds(options.seeds)
    baselines = parse_baselines(options.baselines)
    horizon = _env_horizon(probe)
    per_run = run_budget(probe, horizon)
    timesteps = options.baseline_timesteps
    if timesteps is None:
        timesteps = min(per_run, DEFAULT_BASELINE_CAP)
    if timesteps < 1:
        raise ConfigError(f"--baseline-timesteps must be >= 1, got {timesteps}")
    if "oracle" in baselines:
        env = gym.make(probe.env_name, **probe.env_kwargs)
        try:
            from binom_rl.agents.sb3_baselines import task_features

            task_features(env.unwrapped.sample_tasks(1)[0])
        except (ValueError, AttributeError) as err:
            raise ConfigError(f"oracle baseline: {err}") from err
        finally:
            env.close()

    folder = Path(options.output_folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output folder {folder} exists and is not a directory")
    num_tasks = options.eval_meta_batch_size * options.eval_num_batches
    runs: list[RunPlan] = []
    for spec in estimators:
        for seed in seeds:
            raw = {**base, **spec.config_keys(probe.num_steps), "seed": seed}
            cfg = Config.from_dict(raw)
            run_folder = folder / f"{spec.key}_seed{seed}"
            action = _estimator_action(run_folder, cfg, num_tasks, options.eval_num_steps)
            runs.append(RunPlan(spec.label, "estimator", seed, run_folder, cfg, action, per_run))
    for name in baselines:
        for seed in seeds:
            cfg = Config.from_dict({**base, **neutral, "seed": seed})
            run_folder = folder / f"{name}_seed{seed}"
            meta = _baseline_meta(name, cfg, timesteps)
            steps = 0 if name == "oracle" else options.eval_num_steps
            action = _baseline_action(run_folder, meta, num_tasks, steps)
            runs.append(RunPlan(name, "baseline", seed, run_folder, cfg, action, meta["timesteps"]))
    return Plan(options, folder, estimators, seeds, baselines, runs, horizon, timesteps)


# ----------------------------------------------------------------------------- execution


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # evaluate.py: torch's default threads
    return env


def _run_logged(cmd: list[str], log: Path, what: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=_subprocess_env(), check=False
        ).returncode
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
        raise RuntimeError(f"{what} failed (exit code {rc}); log {log}:\n{tail}")


def _execute_estimator(run: RunPlan, plan: Plan) -> None:
    opts, py = plan.options, sys.executable
    common = ["--output-folder", str(run.folder), "--torch-threads", "1", "--no-progress"]
    train = str(SCRIPTS_DIR / "train.py")
    log = run.folder / LOG_FILE
    if run.action in ("train", "overwrite"):
        config_path = plan.folder / "configs" / f"{run.folder.name}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, config_path)
        if run.folder.is_dir():  # no checkpoint in it (planned so): leftovers of a crash
            shutil.rmtree(run.folder)
        run.folder.mkdir(parents=True)
        log.write_text("")
        # the folder now holds the log: train.py needs --overwrite to start in it
        cmd = [py, train, "--config", str(config_path), *common, "--overwrite"]
        _run_logged(cmd, log, f"training {run.folder.name}")
    elif run.action == "resume":
        cmd = [py, train, "--resume", *common, "--num-batches", str(run.cfg.num_batches)]
        _run_logged(cmd, log, f"resuming {run.folder.name}")
    evaluate = [
        py, str(SCRIPTS_DIR / "evaluate.py"), "--run", str(run.folder),
        "--num-steps", str(opts.eval_num_steps),
        "--meta-batch-size", str(opts.eval_meta_batch_size),
        "--num-batches", str(opts.eval_num_batches),
        "--seed", str(run.seed + TEST_SEED_OFFSET), "--no-progress",
    ]  # fmt: skip
    _run_logged(evaluate, log, f"evaluating {run.folder.name}")


def _execute_baseline(run: RunPlan, plan: Plan) -> None:
    from binom_rl.agents import sb3_baselines as sb

    opts, cfg = plan.options, run.cfg
    folder = run.folder
    folder.mkdir(parents=True, exist_ok=True)
    meta = _baseline_meta(run.label, cfg, plan.baseline_timesteps)
    model_path = folder / "ppo.zip"
    model = None
    if run.label != "random":
        if run.action == "evaluate" and model_path.is_file():
            from stable_baselines3 import PPO

            model = PPO.load(str(model_path), device="cpu")
        else:
            (folder / BASELINE_META).unlink(missing_ok=True)
            model = sb.train_ppo(
                cfg,
                plan.baseline_timesteps,
                seed=run.seed,
                append_task=run.label == "oracle",
                save_path=model_path,
            )
    save_config(cfg, folder / CONFIG_FILE)
    atomic_write(folder / BASELINE_META, lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    test_seed = run.seed + TEST_SEED_OFFSET
    sizes = dict(meta_batch_size=opts.eval_meta_batch_size, num_batches=opts.eval_num_batches)
    if run.label == "oracle":
        returns = sb.evaluate_oracle(cfg, model, seed=test_seed, **sizes)
    else:
        if run.label == "random":
            params = sb.random_params(cfg, run.seed)
        else:
            params = sb.sb3_to_params(model, sb.policy_for(cfg))
        sb.save_params(params, folder / "params.pt")
        returns = evaluate_params(
            cfg, params, num_steps=opts.eval_num_steps, seed=test_seed, progress=False, **sizes
        )
    write_results(folder, returns)


def run_comparison(options: CompareOptions) -> tuple[Plan, list[Row], list[str]]:
    """Plan, run what is left, aggregate, write the summary files.

    Returns the plan, the summary rows and the failures (one message per failed run;
    failed runs are left out of the summary).
    """
    plan = plan_comparison(options)
    plan.folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the baselines run in this process
    for run in plan.runs:
        if run.action == "skip":
            print(f"reuse {run.folder} (finished and evaluated)", flush=True)
    todo_est = [r for r in plan.runs if r.kind == "estimator" and r.action != "skip"]
    todo_base = [r for r in plan.runs if r.kind == "baseline" and r.action != "skip"]
    failures: dict[str, str] = {}  # run folder name -> message
    lock = threading.Lock()
    bar = tqdm(total=len(plan.runs), desc="runs", disable=not options.progress, dynamic_ncols=True)
    bar.update(len(plan.runs) - len(todo_est) - len(todo_base))

    def guarded(run: RunPlan) -> None:
        try:
            if run.kind == "estimator":
                _execute_estimator(run, plan)
            else:
                _execute_baseline(run, plan)
        except Exception as err:  # one failed run must not stop the others
            with lock:
                failures[run.folder.name] = str(err)
        with lock:
            bar.update(1)

    def baseline_chain() -> None:
        for run in todo_base:
            guarded(run)

    try:
        with ThreadPoolExecutor(max_workers=options.jobs) as pool:
            futures = [pool.submit(baseline_chain)] if todo_base else []
            futures += [pool.submit(guarded, run) for run in todo_est]
            for future in as_completed(futures):
                future.result()
    finally:
        bar.close()
    rows = aggregate(plan, exclude=set(failures))
    write_summary(plan, rows)
    return plan, rows, [f"{name}: {msg}" for name, msg in failures.items()]


# ----------------------------------------------------------------------------- aggregation


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


def outer_label(cfg: Config) -> str:
    """``trpo/post``, ``trpo/pre`` or ``ppo``: the outer loop a run's config selects."""
    return f"trpo/{cfg.trust_region}" if cfg.outer == "trpo" else cfg.outer


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


def _adaptation(folders: list[Path], width: int) -> tuple[list[float], list[float]]:
    """Mean and standard error over seeds of the per-seed mean return after n steps.

    With one seed the standard error is over its test tasks (results.npz ``stderr``).
    """
    means, ses = [], []
    for folder in folders:
        with np.load(folder / "results.npz") as data:
            means.append(np.asarray(data["mean"], dtype=np.float64))
            ses.append(np.asarray(data["stderr"], dtype=np.float64))
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
        if kind == "estimator":
            _fill_training_stats(row, runs)
        rows.append(row)
    return rows


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
    curves = [s.get(f"returns/step_{k}", {}) for s in scalars]
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if common:
        values = np.array([[c[i] for i in common] for c in curves])
        mean, se = mean_and_stderr(values, axis=0)
        row.curve = (np.asarray(common), mean, se)


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
    return "\n".join(lines + notes) + "\n"


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
            writer.writerow(values)
    _plot(plan, rows)


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
