"""User-code task envs for the `module:EnvId-v0` tests: importing this module registers
``PointGoal-v0`` (implements the MAML-RL task protocol), ``NoTasks-v0`` (does not) and
``UnboundedActions-v0`` (an infinite action Box, which cannot be rescaled).

Run with this folder on sys.path / PYTHONPATH: ``binom_rl_test_envs:PointGoal-v0``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class PointGoalEnv(gym.Env):
    """A point on a line moves by its action (clipped to [-1, 1] * 0.1); reward -|x - goal|."""

    def __init__(self):
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._goal = 0.0
        self._x = 0.0

    def sample_tasks(self, num_tasks: int) -> list[dict]:
        return [{"goal": float(g)} for g in self.np_random.uniform(-1.0, 1.0, size=num_tasks)]

    def reset_task(self, task: dict) -> None:
        self._goal = float(task["goal"])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._x = 0.0
        return np.array([self._x], dtype=np.float32), {}

    def step(self, action):
        self._x += 0.1 * float(np.clip(np.asarray(action).reshape(-1)[0], -1.0, 1.0))
        reward = -abs(self._x - self._goal)
        return np.array([self._x], dtype=np.float32), reward, False, False, {}


class NoTasksEnv(PointGoalEnv):
    """The same dynamics without the task protocol."""

    sample_tasks = None
    reset_task = None


class UnboundedActionsEnv(PointGoalEnv):
    """The same dynamics with an unbounded action Box."""

    def __init__(self):
        super().__init__()
        self.action_space = spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)


for _id, _cls in (
    ("PointGoal-v0", PointGoalEnv),
    ("NoTasks-v0", NoTasksEnv),
    ("UnboundedActions-v0", UnboundedActionsEnv),
):
    if _id not in gym.registry:
        gym.register(_id, entry_point=_cls, max_episode_steps=10)
