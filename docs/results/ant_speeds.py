"""How fast a trained AntVel or AntDir policy runs on each test task, before and after its
one inner step (docs/results/locomotion.md, "Per-task speeds"):
``python docs/results/ant_speeds.py [RUN [PNG]]`` (default docs/results/runs/ant-vel).

The test tasks, episode seeds and inner step are evaluate.py's (``--meta-batch-size 40
--num-batches 3``; evaluate_adaptation's ``on_batch`` hook hands over each batch's
episodes), so the returns are its table's. A task's speed is the mean torso
x-velocity (qvel[0], observation entry 13, or 15 where the observation holds the torso's
x, y) over the running steps of its episodes; the
reward's velocity is the displacement per step, which this tracks but does not equal.
Prints a table by goal (AntVel: goal-speed bins; AntDir: the two directions) and writes PNG
(default docs/results/locomotion_<antvel|antdir>_speeds.png).
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import gymnasium as gym  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from binom_rl.agents.evaluation import evaluate_adaptation, load_run  # noqa: E402
from binom_rl.agents.inner_loop import AdaptationResult  # noqa: E402
from binom_rl.sampler import Episodes  # noqa: E402

META_BATCH, BATCHES = 40, 3
# per task key: the goal's name, and bins (label, lo, hi) with lo <= goal < hi
TASKS = {
    "velocity": ("goal speed", [("[0, 1)", 0.0, 1.0), ("[1, 2)", 1.0, 2.0), ("[2, 3]", 2.0, 3.1)]),
    "direction": ("direction", [("-1 (backward)", -2.0, 0.0), ("+1 (forward)", 0.0, 2.0)]),
}


def qvel_x_index(cfg) -> int:
    """Where qvel[0], the torso's x-velocity, sits in the config's Ant observation
    ``[qpos[skip:], qvel, ...]``: 13 by default, 15 with the torso's x, y included."""
    env = gym.make(cfg.env_name, **cfg.env_kwargs)
    index = env.unwrapped.observation_structure["qpos"]
    env.close()
    return index


def mean_x_velocity(episodes: Episodes, index: int) -> torch.Tensor:
    """[tasks]: qvel[0] (observation entry ``index``) averaged over the running steps of each
    task's episodes."""
    vx, mask = episodes.observations[..., index], episodes.mask  # [H, T, B, obs], [H, T, B]
    return (vx * mask).sum(dim=(0, 2)) / mask.sum(dim=(0, 2))


def main() -> None:
    run = sys.argv[1] if len(sys.argv) > 1 else "docs/results/runs/ant-vel"
    cfg, params = load_run(run)
    vx = qvel_x_index(cfg)
    keys, goal, speed = [], [], []  # per batch; speed [tasks, 2] (0 and 1 step)

    def record(tasks: list[dict], result: AdaptationResult) -> None:
        keys.append(next(k for k in TASKS if k in tasks[0]))
        goal.append([float(t[keys[-1]]) for t in tasks])
        speed.append(torch.stack([mean_x_velocity(e, vx) for e in result.episodes], 1).numpy())

    evaluation = evaluate_adaptation(
        cfg, params, num_steps=1, meta_batch_size=META_BATCH, num_batches=BATCHES,
        progress=False, on_batch=record,
    )  # fmt: skip
    key = keys[0]
    ret, length = evaluation.returns, evaluation.lengths
    goal, speed = np.concatenate(goal), np.concatenate(speed)
    goal_name, bins = TASKS[key]
    # AntVel: distance to the goal speed; AntDir: speed along the goal direction
    task_speed, task_col = (
        (np.abs(speed - goal[:, None]), "|speed - goal|")
        if key == "velocity"
        else (speed * goal[:, None], "direction x speed")
    )

    print(
        f"{run}: {len(goal)} test tasks; returns {ret[:, 0].mean():.2f} (0 steps), "
        f"{ret[:, 1].mean():.2f} (1 step)"
    )
    print(
        f"| {goal_name} | tasks | speed, 0 / 1 step | {task_col}, 0 / 1 | episode length, 0 / 1 "
        "| return, 0 / 1 |"
    )
    print("|---|---|---|---|---|---|")
    gain = ret[:, 1] - ret[:, 0]
    masks = {label: (goal >= lo) & (goal < hi) for label, lo, hi in bins}
    for label, m in masks.items():
        print(
            f"| {label} | {m.sum()} | {speed[m, 0].mean():.2f} / {speed[m, 1].mean():.2f}"
            f" | {task_speed[m, 0].mean():.2f} / {task_speed[m, 1].mean():.2f}"
            f" | {length[m, 0].mean():.1f} / {length[m, 1].mean():.1f}"
            f" | {ret[m, 0].mean():.1f} / {ret[m, 1].mean():.1f} |"
        )
    print(
        "the step's mean gain over all tasks, by bin: "
        + ", ".join(f"{label} {gain[m].sum() / len(goal):+.1f}" for label, m in masks.items())
    )
    slope = np.polyfit(goal, speed[:, 1], 1)
    print(
        f"least-squares speed after the step = {slope[0]:.3f} * {goal_name} + {slope[1]:.3f}; "
        f"correlation {np.corrcoef(goal, speed[:, 1])[0, 1]:.3f} (0 steps: "
        f"{np.corrcoef(goal, speed[:, 0])[0, 1]:.3f})"
    )
    print(f"fastest task: {speed[:, 0].max():.2f} (0 steps), {speed[:, 1].max():.2f} (1 step)")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # AntDir's goals are +-1: spread the points sideways to see them
    x = goal if key == "velocity" else goal + np.random.default_rng(0).uniform(-0.2, 0.2, len(goal))
    for k, label in enumerate(("0 steps", "1 step")):
        axes[0].scatter(x, speed[:, k], s=12, label=label)
        axes[1].scatter(x, length[:, k], s=12, label=label)
    if key == "velocity":
        axes[0].plot([0, 3], [0, 3], "k--", lw=1, label="speed = goal")
    axes[0].set(xlabel=goal_name, ylabel="mean torso x-velocity", title="speed per test task")
    axes[1].set(
        xlabel=goal_name,
        ylabel="mean episode length (of 200)",
        title="episode length per test task",
    )
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run}: {len(goal)} test tasks, {cfg.fast_batch_size} episodes each")
    fig.tight_layout()
    out = (
        Path(sys.argv[2])
        if len(sys.argv) > 2
        else Path(__file__).with_name(
            f"locomotion_ant{'vel' if key == 'velocity' else 'dir'}_speeds.png"
        )
    )
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


# the guard: sampler workers (num-workers > 1) start by importing this file
if __name__ == "__main__":
    main()
