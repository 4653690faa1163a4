"""Batched simulation protocol: N environments of one task family, one task each.

The sampler only talks to ``BatchEnv``. Env classes may offer a fast path as
``env.unwrapped.make_batch_env(tasks) -> BatchEnv``; any other env that implements
``sample_tasks`` / ``reset_task`` goes through the generic ``GymBatchEnv``.
(Importing this module runs binom_rl/envs/__init__.py, which registers the ids.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec


@runtime_checkable
class BatchEnv(Protocol):
    """N environments of one task family stepped together (one task each).

    ``observation_space`` / ``action_space`` are those of one env.
    """

    num_envs: int
    observation_space: gym.Space
    action_space: gym.Space

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """obs [N, obs_dim] float32; row i equals gym env i's obs after
        ``reset_task(task_i)`` then ``reset(seed=seeds[i])``."""
        ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """(obs [N, obs_dim] float32, reward [N], terminated [N] bool), equal (to float
        tolerance) to the gymnasium env's step for the same action. Envs with a success
        signal (Meta-World's ``info["success"]``) append success [N] bool of this step."""
        ...


class GymBatchEnv:
    """BatchEnv over a plain list of gymnasium envs, one per task.

    Not a gymnasium SyncVectorEnv: every env here runs exactly one episode per
    ``reset``, so autoreset (NEXT_STEP by default in gymnasium 1.x) would only add
    bookkeeping, and a plain list lets us stop stepping envs that have terminated
    and call ``reset_task`` on each env directly. Truncation is ignored: the caller
    decides the horizon.
    """

    def __init__(
        self,
        env_id: str | EnvSpec,
        tasks: Sequence[dict],
        env_kwargs: dict[str, Any] | None = None,
    ):
        if len(tasks) == 0:
            raise ValueError("GymBatchEnv needs at least one task")
        self.envs = [gym.make(env_id, **(env_kwargs or {})) for _ in tasks]
        for env, task in zip(self.envs, tasks, strict=True):
            env.unwrapped.reset_task(task)
        self.num_envs = len(self.envs)
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space
        self._obs_shape = self.observation_space.shape
        self._done = np.zeros(self.num_envs, dtype=bool)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs {self.num_envs} seeds, got {len(seeds)}")
        self._done[:] = False
        return np.stack(
            [env.reset(seed=int(s))[0] for env, s in zip(self.envs, seeds, strict=True)]
        ).astype(np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(actions) != self.num_envs:
            raise ValueError(f"step needs {self.num_envs} actions, got {len(actions)}")
        obs = np.zeros((self.num_envs, *self._obs_shape), dtype=np.float32)
        reward = np.zeros(self.num_envs)
        for i, env in enumerate(self.envs):
            if self._done[i]:  # a terminated env is not stepped again; it reports zeros
                continue
            obs[i], reward[i], self._done[i], _, _ = env.step(actions[i])
        return obs, reward, self._done.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()


def check_task_protocol(env: gym.Env) -> None:
    """Raise ValueError unless env.unwrapped implements sample_tasks and reset_task."""
    missing = [
        m for m in ("sample_tasks", "reset_task") if not callable(getattr(env.unwrapped, m, None))
    ]
    if missing:
        raise ValueError(
            f"{type(env.unwrapped).__name__} does not implement the task protocol: "
            f"missing {', '.join(missing)} (see binom_rl.envs)"
        )


def make_batch_env(
    env_id: str | EnvSpec,
    tasks: Sequence[dict],
    env_kwargs: dict[str, Any] | None = None,
) -> BatchEnv:
    """The env's own ``unwrapped.make_batch_env(tasks)`` if it has one, else GymBatchEnv."""
    if len(tasks) == 0:
        raise ValueError("make_batch_env needs at least one task")
    probe = gym.make(env_id, **(env_kwargs or {}))
    try:
        check_task_protocol(probe)
        fast = getattr(probe.unwrapped, "make_batch_env", None)
        if callable(fast):
            return fast(list(tasks))
    finally:
        probe.close()
    return GymBatchEnv(env_id, tasks, env_kwargs)
