"""How long an Ant episode lasts under Gaussian actions, by control period, action std and
the initial policy's means (docs/results/locomotion.md, "Why the Ant runs did not learn"):
``python docs/results/ant_random_action_lengths.py``. AntDir episodes with reset seeds
0-29, horizon 200; an episode that ends early ends when the torso leaves the healthy range
0.2 <= z <= 1.0. First table: actions ``clip(std * N(0, I), -1, 1)`` (zero mean) from one
generator (seed 0). Second table: the Ant configs' initial policy ((100, 100) ReLU, std 1.0,
``init_params(seed)`` for seeds 0-29, one per episode), actions
``clip(mu(s) + N(0, I), -1, 1)``, at init-output-scale 1.0 (Xavier, MAML-RL) and 0.01. Third
table: the same at 0.02 s with the paper's observation (the torso's x, y and the contact
forces added, ``PAPER_OBS``) beside Ant-v5's, over the 30 seeds' policies and for the one
policy of seed 0 (the training runs' initial policy at ``seed: 0``) on every episode."""

import gymnasium as gym
import numpy as np
import torch

import binom_rl.envs  # noqa: F401  (registers binom_rl/AntDir-v0)
from binom_rl.agents.policies import make_policy

EPISODES, HORIZON = 30, 200
PAPER_OBS = {
    "include_cfrc_ext_in_observation": True,
    "contact_cost_weight": 5.0e-4,
    "exclude_current_positions_from_observation": False,
}


def episode_end(env: gym.Env, seed: int, act) -> tuple[int, int, int]:
    """(length, ended with z > 1, ended with z < 0.2) of one episode; act(obs) -> action."""
    obs, _ = env.reset(seed=seed)
    for length in range(1, HORIZON + 1):
        obs, _, terminated, _, _ = env.step(act(obs))
        if terminated:
            z = env.unwrapped.data.qpos[2]
            return length, int(z > 1.0), int(z < 0.2)
    return HORIZON, 0, 0


def zero_mean(std: float, rng: np.random.Generator):
    return lambda obs: np.clip(std * rng.normal(size=8), -1.0, 1.0)


def initial_policy(policy, params, rng: np.random.Generator, abs_means: list[float]):
    def act(obs):
        with torch.no_grad():
            mean = policy.mode(params, torch.as_tensor(obs, dtype=torch.float32))
        abs_means.append(mean.abs().mean().item())
        return np.clip(mean.numpy() + rng.normal(size=8), -1.0, 1.0)

    return act


def row(results: list[tuple[int, int, int]]) -> str:
    lengths = [r[0] for r in results]
    full = sum(length == HORIZON for length in lengths)
    high, low = sum(r[1] for r in results), sum(r[2] for r in results)
    return f"{np.mean(lengths):.1f} | {full}/{EPISODES} | {high} | {low} |"


print("| frame_skip | dt (s) | action std | mean length | full 200 steps | ended z > 1 | z < 0.2 |")
print("|---|---|---|---|---|---|---|")
for frame_skip in (5, 2):
    for std in (1.0, 0.5, 0.3):
        env = gym.make("binom_rl/AntDir-v0", max_episode_steps=HORIZON, frame_skip=frame_skip)
        rng = np.random.default_rng(0)
        results = [episode_end(env, seed, zero_mean(std, rng)) for seed in range(EPISODES)]
        print(f"| {frame_skip} | {env.unwrapped.dt:.2f} | {std} | {row(results)}")
        env.close()


def initial_policy_row(env_kwargs: dict, scale: float, policy_seed: int | None = None) -> str:
    """mean |mu(s)| and the episode-length columns of the configs' initial policy: the
    policy of ``init_params(seed)`` for reset seed ``seed``, or one policy for every episode
    where ``policy_seed`` is given."""
    env = gym.make("binom_rl/AntDir-v0", max_episode_steps=HORIZON, **env_kwargs)
    policy = make_policy(env.observation_space, env.action_space, [100, 100], "relu",
                         init_std=1.0, init_output_scale=scale)  # fmt: skip
    rng = np.random.default_rng(0)
    abs_means: list[float] = []

    def params(seed: int) -> dict:
        return policy.init_params(seed if policy_seed is None else policy_seed)

    results = [
        episode_end(env, seed, initial_policy(policy, params(seed), rng, abs_means))
        for seed in range(EPISODES)
    ]
    env.close()
    return f"{np.mean(abs_means):.3f} | {row(results)}"


print()
print(
    "| frame_skip | dt (s) | init-output-scale | mean abs(mu(s)) | mean length "
    "| full 200 steps | ended z > 1 | z < 0.2 |"
)
print("|---|---|---|---|---|---|---|---|")
for frame_skip in (5, 2):
    for scale in (1.0, 0.01):
        dt = gym.make("binom_rl/AntDir-v0", frame_skip=frame_skip).unwrapped.dt
        print(f"| {frame_skip} | {dt:.2f} | {scale} | "
              f"{initial_policy_row({'frame_skip': frame_skip}, scale)}")  # fmt: skip

print()
print(
    "| observation (0.02 s) | size | init-output-scale | policies | mean abs(mu(s)) | mean length "
    "| full 200 steps | ended z > 1 | z < 0.2 |"
)
print("|---|---|---|---|---|---|---|---|---|")
for name, kwargs in (("Ant-v5's", {}), ("the paper's", PAPER_OBS)):
    size = gym.make("binom_rl/AntDir-v0", **kwargs).observation_space.shape[0]
    for scale in (1.0, 0.01):
        for policy_seed in (None, 0):
            policies = "seeds 0-29" if policy_seed is None else "seed 0"
            columns = initial_policy_row({"frame_skip": 2, **kwargs}, scale, policy_seed)
            print(f"| {name} | {size} | {scale} | {policies} | {columns}")
