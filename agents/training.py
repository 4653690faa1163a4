"""The training run around the meta-learner: output folder, checkpoints, resume, TensorBoard.

Folder layout written by :func:`train`::

    <output-folder>/config.yaml     resolved configuration
    <output-folder>/policy.pt       last good checkpoint (atomic write, every iteration)
    <output-folder>/events.out.*    TensorBoard scalars: the MetaLearner.meta_iteration
                                    metrics (returns/step_k, episodes/length_step_k,
                                    metagrad/*, train/*, time/*, memory/peak_mb), one
                                    point per iteration
    <output-folder>/error.log       traceback of the last failure, if the run failed
    <output-folder>/.train.lock     held while a process trains in the folder (removed at exit)
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from binom_rl.agents.maml_trpo import MetaLearner
from binom_rl.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from binom_rl.config import Config, ConfigError, load_yaml, save_config
from binom_rl.sampler import MultiTaskSampler

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "policy.pt"
ERROR_FILE = "error.log"
RESULT_FILES = ("results.npz", "results.csv")  # what evaluate.py writes beside a policy
# What a run and its evaluation / plot write into the run folder: --overwrite removes
# exactly these (and TensorBoard event files), so the new run's curves and results are
# not mixed with the old run's; any other file in the folder is left alone.
RUN_FILES = (
    CONFIG_FILE,
    CHECKPOINT_FILE,
    ERROR_FILE,
    *RESULT_FILES,
    "training_curves.png",
)
EVENT_FILES = "events.out.tfevents.*"
LOCK_FILE = ".train.lock"


class RunComplete(Exception):
    """``--resume`` of a run that has already done its num-batches iterations."""

    def __init__(self, done: int, total: int):
        super().__init__(f"run already at iteration {done} of {total}: nothing to do")
        self.done, self.total = done, total


def open_sampler(cfg: Config, device: str | torch.device | None = None) -> MultiTaskSampler:
    """The config's :class:`MultiTaskSampler` (see ``MultiTaskSampler.from_config``). The
    sampler checks the env id, its kwargs, spaces and task protocol before any worker
    starts; what it rejects there (ValueError) is the config's, hence a ConfigError."""
    try:
        return MultiTaskSampler.from_config(cfg, device)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def prepare_run(
    cfg: Config, output_folder: str | os.PathLike, *, resume: bool, overwrite: bool
) -> tuple[Config, dict[str, Any] | None]:
    """Check the output folder before any work; on resume also return the checkpoint state.

    Raises ConfigError (nothing is written) for a non-empty folder without --resume or
    --overwrite, for --resume without a checkpoint, or for --resume with a ``cfg`` that
    differs from the saved one in more than RESUMABLE_KEYS (e.g. a larger num-batches).
    """
    folder = Path(output_folder)  # a directory: run_lock, which train holds, made sure
    non_empty = folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if resume:
        if not (folder / CHECKPOINT_FILE).is_file():
            raise ConfigError(f"--resume: no {CHECKPOINT_FILE} in {folder}")
        state = load_checkpoint(folder / CHECKPOINT_FILE)
        _check_resumable(Config.from_saved(state["config"]), cfg)
        if cfg.outer != "trpo" and not state.get("outer"):
            # checkpoints without an outer state are TRPO's (it keeps none)
            raise ConfigError(
                f"--resume: {folder / CHECKPOINT_FILE} has no outer-step state for outer "
                f"{cfg.outer}"
            )
        return cfg, state
    if non_empty and not overwrite:
        raise ConfigError(
            f"output folder {folder} is not empty: pass --resume to continue the run in it "
            "or --overwrite to start over"
        )
    return cfg, None


# Keys a resumed run may change; any other change would silently alter the run.
RESUMABLE_KEYS = (
    "num-batches",
    "device",
    "num-workers",
    "diagnose-every",
    "chunk-size",
    "sampler",
    "ray-address",
)


def _check_resumable(saved: Config, cfg: Config) -> None:
    """ConfigError unless ``cfg`` equals the checkpoint's config up to RESUMABLE_KEYS."""
    changed = cfg.diff(saved, ignore=RESUMABLE_KEYS)
    if changed:
        raise ConfigError(
            f"--resume: {'; '.join(changed)} differ from the saved run; only "
            f"{', '.join(RESUMABLE_KEYS)} may change"
        )


def resume_config(output_folder: str | os.PathLike, overrides: dict[str, Any]) -> Config:
    """The saved config of a run, with command-line overrides (e.g. a larger num-batches)."""
    folder = Path(output_folder)
    if not (folder / CHECKPOINT_FILE).is_file():
        raise ConfigError(f"--resume: no {CHECKPOINT_FILE} in {folder}")
    raw = load_yaml(folder / CONFIG_FILE)
    raw.update(overrides)
    return Config.from_saved(raw)


def train(
    cfg: Config,
    output_folder: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, float]:
    """Meta-train ``cfg`` into ``output_folder``; returns the last iteration's metrics.

    ``stop_after`` ends the run after that many iterations of this call (tests use it to
    simulate a crash); the checkpoint then resumes exactly where it stopped. Raises
    ConfigError for bad input and RunComplete for a resumed run with nothing left to do,
    both before anything is written.
    """
    folder = Path(output_folder)
    with run_lock(folder):  # before the folder is read: another process may be writing it
        cfg, state = prepare_run(cfg, folder, resume=resume, overwrite=overwrite)
        if state is not None and int(state["iteration"]) >= cfg.num_batches:
            raise RunComplete(int(state["iteration"]), cfg.num_batches)
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda requested but torch.cuda.is_available() is False")
        # The sampler validates the env id and its task protocol before anything is written.
        sampler = open_sampler(cfg, device)
        try:
            learner = MetaLearner(cfg, sampler)
            if state is None:
                params = initial_params(cfg, learner)  # may refuse init-policy: first
                start = 0
                _remove_previous_run(folder)  # only reached with --overwrite or an empty folder
            else:
                params = {k: v.to(device) for k, v in state["params"].items()}
                start = int(state["iteration"])
                set_rng_state(state["rng"])
                learner.outer.load_state_dict(state.get("outer", {}))
            save_config(cfg, folder / CONFIG_FILE)
            return _loop(cfg, learner, params, start, folder, progress, stop_after)
        finally:
            sampler.close()


@contextmanager
def run_lock(output_folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``output_folder`` for one training process: a second :func:`train` on the same
    folder (``--resume`` or ``--overwrite`` while the first still runs) gets a ConfigError
    naming the holder's pid, before it reads or writes anything else there. Two processes
    on one folder would interleave checkpoints and events, and ``--overwrite`` would delete
    the running one's files.

    The lock is ``flock`` on LOCK_FILE (the kernel releases it when its holder dies, even by
    SIGKILL, so a crash leaves no stale lock); the file is removed on exit, and so are the
    folders this call created where nothing else was written in them (bad input).
    Hand-written because the ``filelock`` package leaves its file behind and cannot say who
    holds it; on NFS, Linux maps ``flock`` onto POSIX locks, which hold across hosts.
    """
    folder = Path(output_folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output folder {folder} exists and is not a directory")
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = _acquire(path, folder)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock is released: see _acquire
        os.close(fd)
        for made in created:
            try:
                made.rmdir()  # only succeeds where nothing was written
            except OSError:
                break


def _acquire(path: Path, folder: Path) -> int:
    """An fd of ``path`` holding its exclusive flock; ConfigError where another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{folder} is in use by another training process (pid {holder}): wait for "
                "it to end, or stop it (SIGTERM keeps its last checkpoint) and train again"
            ) from None
        # A holder removes the file before it releases the lock, so a lock won on a file
        # no longer at ``path`` is a lock on nothing: open the new file and try again.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def initial_params(cfg: Config, learner: MetaLearner) -> dict[str, torch.Tensor]:
    """theta_0 of a new run: the parameters of ``init-policy`` (a run folder or its
    policy.pt) where the config names one, else a fresh initialisation from ``seed``.
    ConfigError, before anything is written, for a missing or foreign file and for a policy
    whose parameter shapes or nonlinearity differ from the config's."""
    fresh = learner.init_params(cfg.seed)
    if cfg.init_policy is None:
        return fresh
    path = Path(cfg.init_policy)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"init-policy {cfg.init_policy}: neither a {CHECKPOINT_FILE} nor a run folder with one"
        )
    try:
        state = load_checkpoint(path)
    except Exception as err:  # torch.load's errors for a file that is not a checkpoint vary
        raise ConfigError(f"init-policy {path}: not a checkpoint ({err})") from err
    params = state.get("params") if isinstance(state, dict) else None
    if not isinstance(params, dict):
        raise ConfigError(f"init-policy {path}: not a binom-rl checkpoint (no params)")
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    expected = {k: tuple(v.shape) for k, v in fresh.items()}
    if shapes != expected:
        raise ConfigError(
            f"init-policy {path}: parameter shapes {shapes} differ from this config's "
            f"policy {expected} (env, hidden-sizes)"
        )
    saved = state.get("config") or {}
    if saved.get("nonlinearity", cfg.nonlinearity) != cfg.nonlinearity:
        raise ConfigError(
            f"init-policy {path}: its policy has nonlinearity {saved['nonlinearity']!r}, "
            f"this config {cfg.nonlinearity!r}"
        )
    return {k: v.to(device=fresh[k].device, dtype=fresh[k].dtype) for k, v in params.items()}


def _remove_previous_run(folder: Path) -> None:
    """Delete a previous run's files (RUN_FILES and TensorBoard events) from ``folder``."""
    for path in [*(folder / name for name in RUN_FILES), *folder.glob(EVENT_FILES)]:
        if path.is_file():
            path.unlink()


def _loop(
    cfg: Config,
    learner: MetaLearner,
    params: dict[str, torch.Tensor],
    start: int,
    folder: Path,
    progress: bool,
    stop_after: int | None,
) -> dict[str, float]:
    # purge_step drops events a killed run logged after its last checkpoint.
    writer = SummaryWriter(log_dir=str(folder), purge_step=start if start > 0 else None)
    end = cfg.num_batches if stop_after is None else min(cfg.num_batches, start + stop_after)
    metrics: dict[str, float] = {}
    bar = tqdm(
        range(start, end),
        initial=start,
        total=cfg.num_batches,
        disable=not progress,
        desc="meta-train",
        dynamic_ncols=True,
    )
    try:
        for iteration in bar:
            diagnose = cfg.diagnose_every > 0 and iteration % cfg.diagnose_every == 0
            params, metrics = learner.meta_iteration(params, iteration, diagnose=diagnose)
            save_checkpoint(
                {
                    "params": {k: v.detach().cpu() for k, v in params.items()},
                    "iteration": iteration + 1,
                    "config": cfg.to_dict(),
                    "rng": rng_state(),
                    "metrics": metrics,
                    "outer": learner.outer.state_dict(),  # {} for TRPO
                },
                folder / CHECKPOINT_FILE,
            )
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, iteration)
            writer.flush()
            k = cfg.num_steps
            postfix = {
                "pre": f"{metrics['returns/step_0']:.1f}",
                "post": f"{metrics[f'returns/step_{k}']:.1f}",
                "kl": f"{metrics['train/kl']:.4f}",
            }
            if f"success/step_{k}" in metrics:
                postfix["success"] = f"{metrics[f'success/step_{k}']:.2f}"
            bar.set_postfix(postfix)
    finally:
        bar.close()
        writer.close()
    return metrics


# What an exported policy holds (``export_policy``); a training checkpoint holds more (RNG
# and optimiser state), which is how --overwrite tells an export from a run it must not touch.
EXPORTED_KEYS = frozenset({"params", "iteration", "config"})


def export_policy(run: str | os.PathLike, dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """A trained run's policy alone, for sharing: ``dest/config.yaml`` and ``dest/policy.pt``
    with the parameters, iteration and config (no RNG state, metrics or events), which
    ``evaluate.py --run dest`` loads.

    ``dest`` must not hold a run already (ConfigError), unless ``overwrite`` and what it
    holds is an earlier export (never a training run, nor ``run`` itself): then both files
    are replaced (each atomically) and the old policy's results.npz / results.csv removed.
    """
    src, out = Path(run), Path(dest)
    if not (src / CHECKPOINT_FILE).is_file():
        raise ConfigError(f"{src} has no {CHECKPOINT_FILE}: not a training run folder")
    held = any((out / name).exists() for name in (CHECKPOINT_FILE, CONFIG_FILE))
    if held and not overwrite:
        raise ConfigError(
            f"{out} already holds a {CHECKPOINT_FILE} or {CONFIG_FILE} (--overwrite replaces "
            "an earlier export)"
        )
    if held:
        _check_is_export(out, src)
    state = load_checkpoint(src / CHECKPOINT_FILE)
    cfg = Config.from_saved(load_yaml(src / CONFIG_FILE))
    out.mkdir(parents=True, exist_ok=True)
    policy = {"params": state["params"], "iteration": state["iteration"], "config": state["config"]}
    save_checkpoint(policy, out / CHECKPOINT_FILE)
    save_config(cfg, out / CONFIG_FILE)
    for name in RESULT_FILES:  # evaluate.py's, of the policy replaced
        (out / name).unlink(missing_ok=True)
    return out


def _check_is_export(folder: Path, run: Path) -> None:
    """ConfigError unless ``folder`` holds an earlier export, which --overwrite may replace."""
    if folder.resolve() == run.resolve():
        raise ConfigError(f"{folder} is the run itself: export to another folder")
    if any(folder.glob(EVENT_FILES)):
        raise ConfigError(f"{folder} holds TensorBoard events: a training run, not an export")
    path = folder / CHECKPOINT_FILE
    if path.exists():
        try:
            keys = set(load_checkpoint(path))
        except Exception as err:
            raise ConfigError(f"{path} is not a readable policy ({err}): left as it is") from err
        if keys != EXPORTED_KEYS:
            raise ConfigError(
                f"{path} is a training checkpoint (it holds {sorted(keys - EXPORTED_KEYS)}), "
                "not an export: left as it is"
            )


def read_scalars(folder: str | os.PathLike) -> dict[str, dict[int, float]]:
    """TensorBoard scalars of a run folder: tag -> {step: value} (later events win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: {int(e.step): float(e.value) for e in acc.Scalars(tag)}
        for tag in acc.Tags().get("scalars", [])
    }


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    n = len(values)
    sums = np.convolve(np.asarray(values, dtype=float), np.ones(window))[:n]
    return (sums / np.minimum(np.arange(1, n + 1), window)).tolist()


def _save_line_plot(
    curves: Sequence[tuple[Sequence[int], Sequence[float], str]],
    output: str | os.PathLike,
    ylabel: str,
    title: str | None = None,
    env_steps: EnvSteps | None = None,
) -> Path:
    """One PNG of (iterations, values, label) curves against the meta-iteration, with a
    second x-axis of env steps where ``env_steps`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for steps, values, label in curves:
        ax.plot(steps, values, label=label)
    ax.set_xlabel("meta-iteration")
    if env_steps is not None:
        iterations, millions = env_steps.iterations, env_steps.steps / 1e6
        top = ax.secondary_xaxis("top", functions=(
            lambda i: _interpolate(i, iterations, millions),
            lambda m: _interpolate(m, millions, iterations),
        ))  # fmt: skip
        top.set_xlabel(
            "env steps sampled (millions)"
            if env_steps.exact
            else "env steps sampled (millions; upper bound: full-horizon episodes)"
        )
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def plot_runs(
    folders: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tag: str = "returns/step_1",
    smooth: int = 1,
    labels: Sequence[str] | None = None,
    offsets: Sequence[int] | None = None,
) -> Path:
    """PNG of one scalar ``tag`` of several runs against the meta-iteration, each curve a
    moving average over ``smooth`` iterations, labelled by ``labels`` (default: folder
    names) and shifted right by ``offsets`` iterations (default 0; e.g. a run started with
    ``init-policy`` from another run's iteration 235 drawn from 235 on). Every folder is
    read and checked before anything is drawn."""
    if smooth < 1:
        raise ConfigError(f"smooth must be >= 1, got {smooth}")
    if labels is not None and len(labels) != len(folders):
        raise ConfigError(f"{len(labels)} labels for {len(folders)} runs")
    if offsets is not None and len(offsets) != len(folders):
        raise ConfigError(f"{len(offsets)} offsets for {len(folders)} runs")
    if offsets is not None and min(offsets) < 0:
        raise ConfigError(f"offsets must be >= 0, got {list(offsets)}")
    names = labels or [Path(f).name for f in folders]
    curves = []
    for folder, name, offset in zip(folders, names, offsets or [0] * len(folders), strict=True):
        scalars = read_scalars(folder)
        if tag not in scalars:
            have = ", ".join(sorted(t for t in scalars if "/" in t)) or "no scalars"
            raise ConfigError(f"{folder} has no {tag!r} scalar (it has: {have})")
        steps = sorted(scalars[tag])
        values = _moving_average([scalars[tag][s] for s in steps], smooth)
        curves.append(([s + offset for s in steps], values, name))
    ylabel = tag + (f" ({smooth}-iteration moving average)" if smooth > 1 else "")
    return _save_line_plot(curves, output, ylabel)


def plot_training_curves(folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """PNG of returns/step_0..K against the meta-iteration, read from the run's events."""
    scalars = read_scalars(folder)
    tags = sorted(
        (t for t in scalars if t.startswith("returns/step_")),
        key=lambda t: int(t.rsplit("_", 1)[1]),
    )
    if not tags:
        raise ConfigError(f"{folder} has no returns/step_* scalars: not a training run folder")
    curves = []
    for tag in tags:
        steps = sorted(scalars[tag])
        label = f"after {tag.rsplit('_', 1)[1]} inner steps"
        curves.append((steps, [scalars[tag][s] for s in steps], label))
    return _save_line_plot(
        curves, output, "mean return of the sampled episodes", title=str(Path(folder).name),
        env_steps=_env_steps_sampled(folder, scalars),
    )  # fmt: skip


@dataclass(frozen=True)
class EnvSteps:
    """Env steps sampled before each meta-iteration: ``steps[i]`` before iteration i, for
    i = 0..n, so ``steps[-1]`` is the run's total; ``exact`` where counted from the logged
    episode lengths, False for the full-horizon upper bound."""

    steps: np.ndarray
    exact: bool

    @property
    def iterations(self) -> np.ndarray:
        """0..n, the iterations ``steps`` is indexed by."""
        return np.arange(len(self.steps))


def _env_steps_sampled(
    folder: str | os.PathLike, scalars: dict[str, dict[int, float]]
) -> EnvSteps | None:
    """The run's env steps against the meta-iteration, from its saved config and scalars.

    Iteration i samples meta-batch x fast-batch episodes at each of the K + 1 steps, so
    meta-batch x fast-batch x sum_k episodes/length_step_k[i] env steps; that is exact
    wherever every iteration 0..n-1 logged every length. Otherwise (runs that predate the
    length scalars) it is meta-batch x fast-batch x (K + 1) x horizon per iteration, the
    count when no episode ends early, an upper bound. None without a saved config, or
    without lengths and a horizon (max-episode-steps null)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    cfg = Config.from_saved(load_yaml(path))
    episodes = cfg.meta_batch_size * cfg.fast_batch_size
    n = len(scalars.get("returns/step_0", {}))
    lengths = [scalars.get(f"episodes/length_step_{k}", {}) for k in range(cfg.num_steps + 1)]
    if n and all(set(by_it) >= set(range(n)) for by_it in lengths):
        per_iteration = [episodes * sum(by_it[i] for by_it in lengths) for i in range(n)]
        return EnvSteps(np.concatenate([[0.0], np.cumsum(per_iteration)]), exact=True)
    if not n or cfg.max_episode_steps is None:
        return None
    per_iteration = run_budget(cfg, cfg.max_episode_steps, iterations=1)
    return EnvSteps(per_iteration * np.arange(n + 1, dtype=float), exact=False)


def _interpolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear map through (xp, fp), xp increasing, continued past both ends along
    the end segments (np.interp alone would clamp, and a plot's margins lie outside)."""
    x = np.asarray(x, dtype=float)
    y = np.interp(x, xp, fp)
    if len(xp) < 2:
        return y
    lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, y)


def run_budget(cfg: Config, horizon: int, iterations: int | None = None) -> int:
    """Env steps of meta-training: iterations x meta-batch x fast-batch x (K + 1) x horizon."""
    iterations = cfg.num_batches if iterations is None else iterations
    return iterations * cfg.meta_batch_size * cfg.fast_batch_size * (cfg.num_steps + 1) * horizon
