"""2D navigation (Finn et al. 2017): a point robot must reach a goal it cannot see."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

MAX_ACTION = 0.1
GOAL_LOW, GOAL_HIGH = -0.5, 0.5


def _nav_step(
    pos: np.ndarray, goal: np.ndarray, action: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One step for positions [..., 2]: next = pos + clip(a), reward = -||next - goal||_2.

    Shared by the single env and the batched env so that both paths do the
    same floating-point operations and agree bit for bit.
    """
    nxt = pos + np.clip(np.asarray(action, dtype=np.float64), -MAX_ACTION, MAX_ACTION)
    d = nxt - goal
    # sqrt(dx^2 + dy^2) written out (not np.linalg.norm) so scalar and batch agree exactly
    reward = -np.sqrt(d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1])
    return nxt, reward


def _check_goal(task: dict) -> np.ndarray:
    if not isinstance(task, dict) or "goal" not in task:
        raise ValueError(f"2D navigation task needs a 'goal' key, got {task!r}")
    goal = np.asarray(task["goal"], dtype=np.float64)
    if goal.shape != (2,) or not np.all(np.isfinite(goal)):
        raise ValueError(f"task 'goal' must be 2 finite numbers, got {task['goal']!r}")
    return goal


class Navigation2DEnv(gym.Env):
    """Point robot in the plane, goal hidden from the agent (MAML-RL task family).

    state s_t in R^2 (the position), s_0 = 0; observation = s_t.
    action a_t in [-0.1, 0.1]^2 (clipped), s_{t+1} = s_t + clip(a_t).
    reward r_t = -||s_{t+1} - g||_2; never terminates; horizon 100 (TimeLimit).
    task {"goal": g}, g ~ U[-0.5, 0.5]^2.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: dict | None = None):
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-MAX_ACTION, MAX_ACTION, shape=(2,), dtype=np.float32)
        # a fixed default task so a freshly made env is usable and deterministic
        self._goal = np.zeros(2) if task is None else _check_goal(task)
        self._pos = np.zeros(2)

    def sample_tasks(self, num_tasks: int) -> list[dict]:
        """num_tasks goals g ~ U[-0.5, 0.5]^2 drawn from self.np_random."""
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {num_tasks}")
        goals = self.np_random.uniform(GOAL_LOW, GOAL_HIGH, size=(num_tasks, 2))
        return [{"goal": g} for g in goals]

    def reset_task(self, task: dict) -> None:
        self._goal = _check_goal(task)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = np.zeros(2)
        return self._pos.astype(np.float32), {"task": {"goal": self._goal.copy()}}

    def step(self, action):
        self._pos, reward = _nav_step(self._pos, self._goal, action)
        return self._pos.astype(np.float32), float(reward), False, False, {}

    def make_batch_env(self, tasks: list[dict]) -> Navigation2DBatchEnv:
        return Navigation2DBatchEnv(tasks)


class Navigation2DBatchEnv:
    """N 2D-navigation envs stepped together in numpy (BatchEnv protocol)."""

    def __init__(self, tasks: list[dict]):
        if len(tasks) == 0:
            raise ValueError("Navigation2DBatchEnv needs at least one task")
        self.num_envs = len(tasks)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-MAX_ACTION, MAX_ACTION, shape=(2,), dtype=np.float32)
        self._goals = np.stack([_check_goal(t) for t in tasks])
        self._pos = np.zeros((self.num_envs, 2))

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs {self.num_envs} seeds, got {len(seeds)}")
        # s_0 = 0 and the dynamics are deterministic: the seeds do not change anything
        self._pos = np.zeros((self.num_envs, 2))
        return self._pos.astype(np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs, 2):
            raise ValueError(f"actions must have shape ({self.num_envs}, 2), got {actions.shape}")
        self._pos, reward = _nav_step(self._pos, self._goals, actions)
        return self._pos.astype(np.float32), reward, np.zeros(self.num_envs, dtype=bool)
