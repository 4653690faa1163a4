"""How long an Ant episode lasts under zero-mean Gaussian actions, by control period and
action std (docs/results/locomotion.md, "Why the Ant runs did not learn at 0.05 s"):
``python docs/results/ant_random_action_lengths.py``. Actions ``clip(std * N(0, I), -1, 1)``
from one generator (seed 0), AntDir episodes with reset seeds 0-29, horizon 200; an episode
that ends early ends when the torso leaves the healthy range 0.2 <= z <= 1.0."""

import gymnasium as gym
import numpy as np

import binom_rl.envs  # noqa: F401  (registers binom_rl/AntDir-v0)

EPISODES, HORIZON = 30, 200

print("| frame_skip | dt (s) | action std | mean length | full 200 steps | ended z > 1 | z < 0.2 |")
print("|---|---|---|---|---|---|---|")
for frame_skip in (5, 2):
    for std in (1.0, 0.5, 0.3):
        env = gym.make("binom_rl/AntDir-v0", max_episode_steps=HORIZON, frame_skip=frame_skip)
        rng = np.random.default_rng(0)
        lengths, high, low = [], 0, 0
        for episode in range(EPISODES):
            env.reset(seed=episode)
            length = 0
            while length < HORIZON:
                action = np.clip(std * rng.normal(size=8), -1.0, 1.0)
                _, _, terminated, _, _ = env.step(action)
                length += 1
                if terminated:
                    z = env.unwrapped.data.qpos[2]
                    high, low = high + int(z > 1.0), low + int(z < 0.2)
                    break
            lengths.append(length)
        full = sum(length == HORIZON for length in lengths)
        print(
            f"| {frame_skip} | {env.unwrapped.dt:.2f} | {std} | {np.mean(lengths):.1f} "
            f"| {full}/{EPISODES} | {high} | {low} |"
        )
        env.close()
