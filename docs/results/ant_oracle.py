"""How fast can an ant run in our AntDir / AntVel envs when it is told the task? An SB3 PPO
oracle (the task's direction or goal speed appended to the observation, no adaptation)
trained on the config's task distribution, then run on evaluate.py's test tasks
(docs/results/locomotion.md, "The oracle: what speed the env allows"):

``python docs/results/ant_oracle.py --config configs/ant-dir.yaml --timesteps 4000000
--output-folder runs/oracle-antdir``

It separates the env from the meta-learner: if the oracle runs at the speeds the MAML
paper's returns need (about 2.5 m/s for AntDir's 499), the meta-learner is what falls short.
PPO is SB3's defaults (``train_ppo``) with the config's policy architecture and init std,
with ``--normalize`` on SB3's VecNormalize (observations and returns, as SB3's zoo trains
MuJoCo). ``model.zip`` (and its normalisation statistics) is saved in the folder every 500k
steps and at the end; SB3's training curve (``rollout/ep_rew_mean``) goes to TensorBoard
there. ``--evaluate-only`` evaluates the folder's ``model.zip`` again. The test tasks and
episode seeds are evaluate.py's (``--meta-batch-size 40 --num-batches 3``, the config's 20
episodes per task); the speed of a task is ant_speeds.py's (torso qvel[0] over the running
steps).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from binom_rl.agents import sb3_baselines as sb
from binom_rl.agents.evaluation import TEST_SEED_OFFSET
from binom_rl.agents.training import read_scalars
from binom_rl.config import Config, ConfigError, load_yaml

sys.path.insert(0, str(Path(__file__).parent))
from ant_speeds import BATCHES, META_BATCH, TASKS, mean_x_velocity, qvel_x_index  # noqa: E402

CHECKPOINT_EVERY = 500_000


def train(cfg, timesteps: int, folder: Path, normalize: bool):
    from stable_baselines3.common.callbacks import BaseCallback

    class Progress(BaseCallback):
        """A tqdm bar over env steps, and model.zip every CHECKPOINT_EVERY steps."""

        def _on_training_start(self) -> None:
            self.bar = tqdm(total=timesteps, unit="step", smoothing=0.05)

        def _on_step(self) -> bool:
            self.bar.update(1)
            if self.num_timesteps % CHECKPOINT_EVERY == 0:
                sb.save_ppo(self.model, folder / "model.zip")
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    return sb.train_ppo(
        cfg, timesteps, seed=cfg.seed, append_task=True, save_path=folder / "model.zip",
        tensorboard_log=folder, callback=Progress(), normalize=normalize,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="an AntDir or AntVel config")
    parser.add_argument("--timesteps", type=int, default=4_000_000)
    parser.add_argument("--output-folder", required=True, type=Path)
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate model.zip")
    parser.add_argument(
        "--normalize", action="store_true", help="train on VecNormalize (as SB3's zoo does)"
    )
    parser.add_argument("--plot", type=Path, help="PNG path (default <output-folder>/oracle.png)")
    args = parser.parse_args()
    try:
        cfg = Config.from_dict(load_yaml(args.config))
    except ConfigError as err:
        parser.error(str(err))
    if not any(k in cfg.env_name for k in ("AntDir", "AntVel")):
        parser.error(f"{args.config}: env {cfg.env_name} is not AntDir or AntVel")
    if args.timesteps < 1:
        parser.error(f"--timesteps must be >= 1, got {args.timesteps}")
    torch.set_num_threads(1)
    if args.evaluate_only:
        if not (args.output_folder / "model.zip").is_file():
            parser.error(f"{args.output_folder}/model.zip does not exist")
        model = sb.load_ppo(cfg, args.output_folder / "model.zip", append_task=True)
    else:
        if (args.output_folder / "model.zip").exists():
            parser.error(
                f"{args.output_folder}/model.zip exists; use --evaluate-only or another folder"
            )
        args.output_folder.mkdir(parents=True, exist_ok=True)
        model = train(cfg, args.timesteps, args.output_folder, args.normalize)

    keys, goals, speeds, lengths = [], [], [], []  # per batch
    vx = qvel_x_index(cfg)

    def record(tasks, episodes) -> None:
        keys.append(next(k for k in TASKS if k in tasks[0]))
        goals.append(np.array([float(t[keys[-1]]) for t in tasks]))
        speeds.append(mean_x_velocity(episodes, vx).numpy())
        lengths.append(episodes.lengths.float().mean(1).numpy())

    returns = sb.evaluate_oracle(
        cfg, model, meta_batch_size=META_BATCH, num_batches=BATCHES,
        seed=cfg.seed + TEST_SEED_OFFSET, on_batch=record,
    )[:, 0]  # fmt: skip
    goal, speed, length = map(np.concatenate, (goals, speeds, lengths))
    key = keys[0]
    goal_name, bins = TASKS[key]
    se = returns.std(ddof=1) / np.sqrt(len(returns))
    print(
        f"{args.output_folder}: oracle on {len(returns)} test tasks x {cfg.fast_batch_size} "
        f"episodes: return {returns.mean():.2f} +- {se:.2f}, speed {speed.mean():.2f}, "
        f"episode length {length.mean():.1f}"
    )
    print(f"| {goal_name} | tasks | speed | episode length | return |")
    print("|---|---|---|---|---|")
    for label, lo, hi in bins:
        m = (goal >= lo) & (goal < hi)
        print(
            f"| {label} | {m.sum()} | {speed[m].mean():.2f} | {length[m].mean():.1f} "
            f"| {returns[m].mean():.1f} |"
        )
    print(
        f"correlation of speed with {goal_name} {np.corrcoef(goal, speed)[0, 1]:.3f}; "
        f"fastest task {speed.max():.2f}, slowest {speed.min():.2f}"
    )
    out = args.plot or args.output_folder / "oracle.png"
    plot(args.output_folder, key, goal, speed, length, out)
    print(f"wrote {out}")


def plot(folder: Path, key: str, goal, speed, length, out: Path) -> None:
    """SB3's training curve against env steps, and the test tasks' speeds and lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(next(folder.glob("PPO_*")))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for tag, ax in zip(("rollout/ep_rew_mean", "rollout/ep_len_mean"), axes[:2], strict=True):
        steps = sorted(scalars[tag])
        ax.plot(np.array(steps) / 1e6, [scalars[tag][s] for s in steps])
        ax.set(xlabel="env steps (millions)", title=f"training: {tag} (last 100 episodes)")
        ax.grid(alpha=0.3)
    # AntDir's goals are +-1: spread the points sideways to see them
    x = goal if key == "velocity" else goal + np.random.default_rng(0).uniform(-0.2, 0.2, len(goal))
    points = axes[2].scatter(x, speed, c=length, s=14, vmin=0, vmax=200)
    fig.colorbar(points, ax=axes[2], label="mean episode length")
    if key == "velocity":
        axes[2].plot([0, 3], [0, 3], "k--", lw=1, label="speed = goal")
        axes[2].legend()
    axes[2].set(
        xlabel=TASKS[key][0], ylabel="mean torso x-velocity", title="test tasks: speed per task"
    )
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"{folder}: PPO oracle, task in the observation")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# the guard: sampler workers (num-workers > 1) start by importing this file
if __name__ == "__main__":
    main()
