"""Where the control cost of a trained MuJoCo run's pre-update policy goes
(docs/results/locomotion.md, "Why HalfCheetahDir declined"):
``python docs/results/locomotion_control_cost.py RUN [RUN ...]``.

For 40 test tasks x 5 episodes sampled as the run's config samples them, prints the mean
return, the fraction of sampled actions (and of policy means) outside the bounds [-1, 1],
and the control cost per episode, ``w sum_t |a_t|^2``, on the sampled actions and on the
actions clipped to the bounds (those the physics applies; MuJoCo clamps the rest).
"""

import functools
import sys

import gymnasium as gym
import torch

from binom_rl.agents.evaluation import TEST_SEED_OFFSET, load_run
from binom_rl.agents.policies import batched_sample, make_policy
from binom_rl.agents.training import open_sampler

print(
    "| run | iteration | clip-actions | return | sampled |a| > 1 | mean |mu| > 1 "
    "| control cost / episode | of it on the applied action |"
)
print("|---|---|---|---|---|---|---|---|")
for run in sys.argv[1:]:
    cfg, params = load_run(run)
    iteration = torch.load(f"{run}/policy.pt", weights_only=False).get("iteration")
    env = gym.make(cfg.env_name, **cfg.env_kwargs)
    weight = env.unwrapped._ctrl_cost_weight  # the Gymnasium MuJoCo envs' control cost weight
    env.close()
    with open_sampler(cfg) as sampler:
        policy = make_policy(
            sampler.observation_space, sampler.action_space, cfg.hidden_sizes, cfg.nonlinearity
        )
        tasks = sampler.sample_tasks(40, seed=cfg.seed + TEST_SEED_OFFSET, split="test")
        stacked = {k: v.expand(len(tasks), *v.shape) for k, v in params.items()}
        episodes = sampler.sample(
            tasks, functools.partial(batched_sample, policy, stacked), 5, seed=1
        )
    a = episodes.actions  # [H, T, B, act_dim], the policy's own (unclipped) samples
    obs = episodes.observations.transpose(0, 1).flatten(1, 2)  # [T, H*B, obs_dim]
    with torch.no_grad():
        mean, _ = policy.mean_and_std(stacked, obs)
    cost = weight * (a**2).sum(-1).sum(0).mean()
    applied = weight * (a.clamp(-1, 1) ** 2).sum(-1).sum(0).mean()
    print(
        f"| {run} | {iteration} | {cfg.clip_actions} | {episodes.returns.mean():.1f} "
        f"| {(a.abs() > 1).float().mean():.2f} | {(mean.abs() > 1).float().mean():.2f} "
        f"| {cost:.1f} | {applied:.1f} |"
    )
