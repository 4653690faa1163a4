"""How much of an Ant policy's return its action noise costs: the return and speed of each
test task's policy when it acts with its Gaussian's means (docs/results/locomotion.md,
"The inner step's size and the action noise"):
``python docs/results/ant_mean_actions.py RUN [--num-batches 1]``.

The test tasks, episode seeds and inner step are evaluate.py's (its first ``--num-batches``
batches of 40 tasks), so the "sampled" rows are its table's. The unadapted phi_0 and each
task's adapted phi_1 then run again on the same tasks and episode seeds with their log-std
set to LOG_STD_MEAN_ACTIONS: the sampler draws mean + sigma * noise with sigma = e^-20, the
mean to float precision, so the env, the action clipping, the reset noise and the episode
bookkeeping are the training runs' own (no second rollout loop to keep in step with the
sampler). Speed is ant_speeds.py's (torso qvel[0] over the running steps).
"""

import argparse

import numpy as np
import torch
from ant_speeds import mean_x_velocity, qvel_x_index  # this folder

from binom_rl.agents.evaluation import TEST_SEED_OFFSET, evaluate_adaptation, load_run
from binom_rl.agents.maml_trpo import MetaLearner, derive_seed
from binom_rl.agents.training import open_sampler

LOG_STD_MEAN_ACTIONS = -20.0
META_BATCH = 40


def mean_actions(phi: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """phi with every log-std at LOG_STD_MEAN_ACTIONS (the Gaussian's means as actions)."""
    return {
        k: torch.full_like(v, LOG_STD_MEAN_ACTIONS) if k == "log_std" else v for k, v in phi.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--num-batches", type=int, default=1, help="batches of 40 test tasks")
    args = parser.parse_args()
    cfg, params = load_run(args.run)
    if "log_std" not in params:
        raise SystemExit(f"error: {args.run} has no Gaussian policy (no log_std)")
    vx = qvel_x_index(cfg)
    batches = []  # (tasks, [phi_0, phi_1], [episodes of phi_0, of phi_1])

    def record(tasks, result) -> None:
        batches.append((tasks, result.path, result.episodes))

    evaluate_adaptation(
        cfg, params, num_steps=1, meta_batch_size=META_BATCH, num_batches=args.num_batches,
        progress=False, on_batch=record,
    )  # fmt: skip
    key = "direction" if "direction" in batches[0][0][0] else "velocity"
    columns: dict[str, list[np.ndarray]] = {}  # row name -> per batch [tasks]
    goals = []
    with open_sampler(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        for batch, (tasks, path, sampled) in enumerate(batches):
            goals.append(np.array([float(t[key]) for t in tasks]))
            sign = np.sign(goals[-1]) if key == "direction" else np.ones(len(tasks))
            goal_sign = torch.from_numpy(sign)
            for k, (phi, episodes) in enumerate(zip(path, sampled, strict=True)):
                # the episode seeds evaluate.py's step k sampled with (InnerLoop.adapt)
                seed = derive_seed(derive_seed(cfg.seed + TEST_SEED_OFFSET, batch, 1), k)
                means = learner.inner.sample(tasks, mean_actions(phi), seed)
                for how, eps in (("sampled", episodes), ("means", means)):
                    name = f"{k} step{'s' if k != 1 else ''}, {how}"
                    speed = mean_x_velocity(eps, vx).double()
                    for what, value in (
                        ("return", eps.returns.double().mean(1)),
                        ("speed", speed),
                        # AntDir: speed along the task's direction (the reward's term)
                        ("speed along the goal", speed * goal_sign),
                        ("episode length", eps.lengths.double().mean(1)),
                    ):
                        columns.setdefault(f"{name}: {what}", []).append(value.numpy())
    goal = np.concatenate(goals)
    if key == "direction":
        groups = {"backward (-1)": goal < 0, "forward (+1)": goal > 0}
    else:
        groups = {"goal < 1.5": goal < 1.5, "goal >= 1.5": goal >= 1.5}
    print(f"{args.run}: {len(goal)} test tasks, {cfg.fast_batch_size} episodes each")
    print(f"| | all tasks (mean +- s.e.) | {' | '.join(groups)} |")
    print("|---|---|" + "---|" * len(groups))
    for name, values in columns.items():
        v = np.concatenate(values)
        by_group = " | ".join(f"{v[g].mean():.2f}" for g in groups.values())
        print(f"| {name} | {v.mean():.2f} +- {v.std(ddof=1) / np.sqrt(len(v)):.2f} | {by_group} |")


# the guard: sampler workers (num-workers > 1) start by importing this file
if __name__ == "__main__":
    main()
