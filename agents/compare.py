"""Baseline comparison harness: estimators x seeds, non-meta baselines, one summary.

:func:`plan_comparison` validates everything and decides, for every run folder, what is
left to do (nothing, evaluate, resume, train); :func:`run_comparison` does it and writes
the summary (:mod:`binom_rl.agents.compare_summary`). Folder layout under
``output_folder``::

    configs/<est>_seed<S>.yaml      resolved config each training run starts from
    <est>_seed<S>/                  binom-rl-train run (policy.pt, events, train.log)
                                    + results.npz / results.csv (binom-rl-evaluate)
    <baseline>_seed<S>/             config.yaml, baseline.json, ppo.zip, results.npz
    summary.md, summary.csv, learning_curves.png, adaptation.png
    success_curves.png, success_adaptation.png   (envs that report success: Meta-World)

Each estimator run is a separate process (``python -m binom_rl.agents.cli.train
--torch-threads 1 --no-progress``, then ``binom_rl.agents.cli.evaluate``: the installed
package, wherever it is), at most ``jobs`` at once; the baselines run one after another
in this process on one pool slot (they share torch's global RNG).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from binom_rl.agents.compare_summary import Row, aggregate, write_summary
from binom_rl.agents.evaluation import (
    STEP_SIZE_DECAY,
    TEST_SEED_OFFSET,
    evaluate_adaptation,
    write_results,
)
from binom_rl.agents.sb3_baselines import BASELINES
from binom_rl.agents.training import CHECKPOINT_FILE, CONFIG_FILE, run_budget
from binom_rl.checkpoint import atomic_write, load_checkpoint
from binom_rl.config import Config, ConfigError, load_yaml, save_config
from binom_rl.metagrad import METHODS, effective_order

__all__ = [
    "EstimatorSpec",
    "CompareOptions",
    "RunPlan",
    "Plan",
    "parse_estimators",
    "parse_seeds",
    "parse_baselines",
    "plan_comparison",
    "run_comparison",
]

DEFAULT_BASELINE_CAP = 1_000_000  # default PPO budget: min(one estimator run's, this)
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
        return {"estimator": self.name, "order": effective_order(self.name, self.order, num_steps)}


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
            try:
                effective_order(name, order, num_steps)
            except ValueError as err:
                raise ConfigError(f"--estimators: {item} (num-steps {num_steps}): {err}") from err
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
    eval_step_size_decay: float = STEP_SIZE_DECAY  # test steps beyond K (evaluation.py)
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
    diff = cfg.diff(Config.from_saved(load_yaml(folder / CONFIG_FILE)), ignore=["num-batches"])
    if diff:
        raise ConfigError(
            f"{folder} was trained with different settings ({'; '.join(diff)}): use another "
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
    if not 0 < options.eval_step_size_decay <= 1:
        raise ConfigError(
            f"--eval-step-size-decay must be in (0, 1], got {options.eval_step_size_decay}"
        )
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
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # evaluate: torch's default threads
    # `python -m` puts the working directory first on sys.path; a checkout there (its
    # binom_rl/ folder) would then shadow the installed package the runs must use.
    env["PYTHONSAFEPATH"] = "1"
    return env


def _command(name: str) -> list[str]:
    """How a run starts one of the package's commands (train, evaluate): this interpreter
    with the installed package, not a script path that only a checkout has."""
    return [sys.executable, "-m", f"binom_rl.agents.cli.{name}"]


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
    opts = plan.options
    common = ["--output-folder", str(run.folder), "--torch-threads", "1", "--no-progress"]
    train = _command("train")
    log = run.folder / LOG_FILE
    if run.action in ("train", "overwrite"):
        config_path = plan.folder / "configs" / f"{run.folder.name}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, config_path)
        if run.folder.is_dir():  # no checkpoint in it (planned so): leftovers of a crash
            shutil.rmtree(run.folder)
        run.folder.mkdir(parents=True)
        log.write_text("")
        # the folder now holds the log: train needs --overwrite to start in it
        cmd = [*train, "--config", str(config_path), *common, "--overwrite"]
        _run_logged(cmd, log, f"training {run.folder.name}")
    elif run.action == "resume":
        cmd = [*train, "--resume", *common, "--num-batches", str(run.cfg.num_batches)]
        _run_logged(cmd, log, f"resuming {run.folder.name}")
    evaluate = [
        *_command("evaluate"), "--run", str(run.folder),
        "--num-steps", str(opts.eval_num_steps),
        "--meta-batch-size", str(opts.eval_meta_batch_size),
        "--num-batches", str(opts.eval_num_batches),
        "--step-size-decay", str(opts.eval_step_size_decay),
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
    success = None
    if run.label == "oracle":
        returns = sb.evaluate_oracle(cfg, model, seed=test_seed, **sizes)
    else:
        if run.label == "random":
            params = sb.random_params(cfg, run.seed)
        else:
            params = sb.sb3_to_params(model, sb.policy_for(cfg))
        sb.save_params(params, folder / "params.pt")
        result = evaluate_adaptation(
            cfg, params, num_steps=opts.eval_num_steps, seed=test_seed, progress=False,
            step_size_decay=opts.eval_step_size_decay, **sizes,
        )  # fmt: skip
        returns, success = result.returns, result.success
        write_results(folder, returns, success, result.step_sizes)
        return
    write_results(folder, returns, success)


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
