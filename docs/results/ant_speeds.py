"""How fast a trained AntVel or AntDir policy runs on each test task, before and after its
one inner step (docs/results/locomotion.md, "Per-task speeds"):
``python docs/results/ant_speeds.py [RUN [PNG]]`` (default docs/results/runs/ant-vel).

The test tasks, episode seeds and inner step are evaluate.py's (``--meta-batch-size 40
--num-batches 3``), so the returns are its table's. A task's speed is the mean torso
x-velocity (qvel[0], observation entry 13) over the running steps of its episodes; the
reward's velocity is the displacement per step, which this tracks but does not equal.
Prints a table by goal (AntVel: goal-speed bins; AntDir: the two directions) and writes PNG
(default docs/results/locomotion_<antvel|antdir>_speeds.png).
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from binom_rl.agents.evaluation import TEST_SEED_OFFSET, adaptation_step_sizes, load_run  # noqa: E402
from binom_rl.agents.maml_trpo import MetaLearner, derive_seed  # noqa: E402
from binom_rl.agents.training import open_sampler  # noqa: E402

QVEL_X = 13  # Ant-v5 observation: qpos[2:] (13 entries), then qvel; qvel[0] is the torso's x
META_BATCH, BATCHES = 40, 3
# per task key: the goal's name, and bins (label, lo, hi) with lo <= goal < hi
TASKS = {
    "velocity": ("goal speed", [("[0, 1)", 0.0, 1.0), ("[1, 2)", 1.0, 2.0), ("[2, 3]", 2.0, 3.1)]),
    "direction": ("direction", [("-1 (backward)", -2.0, 0.0), ("+1 (forward)", 0.0, 2.0)]),
}


def main() -> None:
    run = sys.argv[1] if len(sys.argv) > 1 else "docs/results/runs/ant-vel"
    cfg, params = load_run(run)
    seed = cfg.seed + TEST_SEED_OFFSET
    goal, speed, length, ret = [], [], [], []  # per task; speed etc. [tasks, 2] (0 and 1 step)
    with open_sampler(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        for batch in range(BATCHES):
            tasks = sampler.sample_tasks(META_BATCH, seed=derive_seed(seed, batch, 0), split="test")
            key = next(k for k in TASKS if k in tasks[0])
            result = learner.adapt(
                params, tasks, 1, seed=derive_seed(seed, batch, 1),
                step_sizes=adaptation_step_sizes(cfg, 1),
            )  # fmt: skip
            goal.append([float(t[key]) for t in tasks])
            per_step = []
            for e in result.episodes:  # [H, T, B] mask; observations [H, T, B, obs]
                vx = (e.observations[..., QVEL_X] * e.mask).sum(dim=(0, 2)) / e.mask.sum(dim=(0, 2))
                per_step.append((vx, e.lengths.double().mean(1), e.returns.double().mean(1)))
            speed.append(torch.stack([p[0] for p in per_step], 1).numpy())
            length.append(torch.stack([p[1] for p in per_step], 1).numpy())
            ret.append(torch.stack([p[2] for p in per_step], 1).numpy())
    goal = np.concatenate(goal)
    speed, length, ret = (np.concatenate(x) for x in (speed, length, ret))
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
    for label, lo, hi in bins:
        m = (goal >= lo) & (goal < hi)
        print(
            f"| {label} | {m.sum()} | {speed[m, 0].mean():.2f} / {speed[m, 1].mean():.2f}"
            f" | {task_speed[m, 0].mean():.2f} / {task_speed[m, 1].mean():.2f}"
            f" | {length[m, 0].mean():.1f} / {length[m, 1].mean():.1f}"
            f" | {ret[m, 0].mean():.1f} / {ret[m, 1].mean():.1f} |"
        )
    print(
        "the step's mean gain over all tasks, by bin: "
        + ", ".join(f"{label} {gain[(goal >= lo) & (goal < hi)].sum() / len(goal):+.1f}"
                    for label, lo, hi in bins)
    )  # fmt: skip
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
