"""User-code task envs for the `module:EnvId-v0` tests: importing this module registers
``PointGoal-v0`` (implements the MAML-RL task protocol), ``NoTasks-v0`` (does not),
``UnboundedActions-v0`` (an infinite action Box, which cannot be rescaled),
``SuccessPointGoal-v0`` (a batch env that reports success, with a held-out test split) and
``Countdown-v0`` (episodes that end early; a step can be made slow).

Run with this folder on sys.path / PYTHONPATH: ``binom_rl_test_envs:PointGoal-v0``.
"""

from __future__ import annotations

import time

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


class CountdownEnv(PointGoalEnv):
    """PointGoal whose episode terminates after ``task["steps"]`` steps (drawn from 1..12,
    so that some episodes end before a horizon of 10 and some do not); each step sleeps
    ``delay`` seconds (a constructor argument), for tests that need a slow env."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay, self._steps, self._t = delay, 3, 0

    def sample_tasks(self, num_tasks: int) -> list[dict]:
        goals = super().sample_tasks(num_tasks)
        steps = self.np_random.integers(1, 13, size=num_tasks)
        return [{**g, "steps": int(n)} for g, n in zip(goals, steps, strict=True)]

    def reset_task(self, task: dict) -> None:
        super().reset_task(task)
        self._steps = int(task["steps"])

    def reset(self, *, seed=None, options=None):
        self._t = 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        if self.delay:
            time.sleep(self.delay)
        obs, reward, _, truncated, info = super().step(action)
        self._t += 1
        return obs, reward, self._t >= self._steps, truncated, info


class SuccessPointGoalEnv(PointGoalEnv):
    """PointGoal that succeeds while |x - goal| < 0.05 (``info["success"]``) and terminates
    after ``end`` steps. Training goals lie in [-0.3, 0), test goals in (0, 0.3]."""

    SUCCESS_RADIUS = 0.05

    def __init__(self):
        super().__init__()
        self._end, self._t = 10, 0

    def _tasks(self, num_tasks: int, sign: float) -> list[dict]:
        goals = sign * self.np_random.uniform(0.01, 0.3, size=num_tasks)
        ends = self.np_random.integers(2, 12, size=num_tasks)
        return [{"goal": float(g), "end": int(e)} for g, e in zip(goals, ends, strict=True)]

    def sample_tasks(self, num_tasks: int) -> list[dict]:
        return self._tasks(num_tasks, -1.0)

    def sample_test_tasks(self, num_tasks: int) -> list[dict]:
        return self._tasks(num_tasks, 1.0)

    def reset_task(self, task: dict) -> None:
        super().reset_task(task)
        self._end = int(task["end"])

    def reset(self, *, seed=None, options=None):
        self._t = 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, _, _, _ = super().step(action)
        self._t += 1
        success = abs(float(obs[0]) - self._goal) < self.SUCCESS_RADIUS
        return obs, reward, self._t >= self._end, False, {"success": float(success)}

    def make_batch_env(self, tasks: list[dict]) -> SuccessBatchEnv:
        return SuccessBatchEnv(tasks)


class SuccessBatchEnv:
    """One SuccessPointGoalEnv per task; step appends info["success"] as a 4th array."""

    def __init__(self, tasks: list[dict]):
        self.envs = [SuccessPointGoalEnv() for _ in tasks]
        for env, task in zip(self.envs, tasks, strict=True):
            env.reset_task(task)
        self.num_envs = len(self.envs)
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space

    def reset(self, seeds):
        return np.stack(
            [env.reset(seed=int(s))[0] for env, s in zip(self.envs, seeds, strict=True)]
        )

    def step(self, actions):
        # the sampler masks what ended envs report, so stepping them on does no harm here
        out = [env.step(a) for env, a in zip(self.envs, actions, strict=True)]
        return (
            np.stack([o[0] for o in out]),
            np.array([o[1] for o in out]),
            np.array([o[2] for o in out]),
            np.array([o[4]["success"] > 0 for o in out]),
        )


for _id, _cls in (
    ("PointGoal-v0", PointGoalEnv),
    ("NoTasks-v0", NoTasksEnv),
    ("UnboundedActions-v0", UnboundedActionsEnv),
    ("SuccessPointGoal-v0", SuccessPointGoalEnv),
    ("Countdown-v0", CountdownEnv),
):
    if _id not in gym.registry:
        gym.register(_id, entry_point=_cls, max_episode_steps=10)
