"""Discrete task families of RL^2 / MAML-RL: multi-armed bandits and random tabular MDPs."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding


def _check_actions(actions, n: int, num_envs: int | None = None) -> np.ndarray:
    """Discrete actions as int64 in {0..n-1} (shape (num_envs,) when given)."""
    a = np.asarray(actions)
    a = a.astype(np.int64) if num_envs is None else a.reshape(num_envs).astype(np.int64)
    if np.any((a < 0) | (a >= n)):
        raise ValueError(f"actions must lie in {{0..{n - 1}}}, got {a}")
    return a


def _check_probs(task: dict, k: int) -> np.ndarray:
    if not isinstance(task, dict) or "probs" not in task:
        raise ValueError(f"bandit task needs a 'probs' key, got {task!r}")
    probs = np.asarray(task["probs"], dtype=np.float64)
    if probs.shape != (k,):
        raise ValueError(f"task 'probs' must have shape ({k},), got {probs.shape}")
    if not np.all((probs >= 0) & (probs <= 1)):
        raise ValueError(f"task 'probs' must lie in [0, 1], got {probs}")
    return probs


class BanditEnv(gym.Env):
    """k-armed Bernoulli bandit (Duan et al. 2016, RL^2).

    action a in {0..k-1}; reward r ~ Bernoulli(p_a) drawn from self.np_random.
    observation: the constant 0 (shape (1,)); never terminates; horizon 10 pulls (TimeLimit).
    task {"probs": p}, p ~ U[0, 1]^k.
    """

    metadata = {"render_modes": []}

    def __init__(self, k: int = 5, task: dict | None = None):
        if k < 1:
            raise ValueError(f"k (number of arms) must be >= 1, got {k}")
        self.k = k
        self.observation_space = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Discrete(k)
        self._probs = np.full(k, 0.5) if task is None else _check_probs(task, k)

    def sample_tasks(self, num_tasks: int) -> list[dict]:
        """num_tasks arm probabilities p ~ U[0, 1]^k drawn from self.np_random."""
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {num_tasks}")
        return [{"probs": p} for p in self.np_random.uniform(0.0, 1.0, size=(num_tasks, self.k))]

    def reset_task(self, task: dict) -> None:
        self._probs = _check_probs(task, self.k)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        # one uniform per pull; BanditBatchEnv makes the same draw from the same generator
        a = int(_check_actions(action, self.k))
        reward = float(self.np_random.random() < self._probs[a])
        return np.zeros(1, dtype=np.float32), reward, False, False, {}

    def make_batch_env(self, tasks: list[dict]) -> BanditBatchEnv:
        return BanditBatchEnv(tasks, self.k)


class BanditBatchEnv:
    """N bandits stepped together; env i draws from the generator reset(seed=seeds[i]) makes."""

    def __init__(self, tasks: list[dict], k: int = 5):
        if len(tasks) == 0:
            raise ValueError("BanditBatchEnv needs at least one task")
        self.num_envs = len(tasks)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Discrete(k)
        self._probs = np.stack([_check_probs(t, k) for t in tasks])
        self._rngs: list[np.random.Generator] = []

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs {self.num_envs} seeds, got {len(seeds)}")
        self._rngs = [seeding.np_random(int(s))[0] for s in seeds]
        return np.zeros((self.num_envs, 1), dtype=np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        actions = _check_actions(actions, self._probs.shape[1], self.num_envs)
        u = np.array([rng.random() for rng in self._rngs])
        reward = (u < self._probs[np.arange(self.num_envs), actions]).astype(np.float64)
        obs = np.zeros((self.num_envs, 1), dtype=np.float32)
        return obs, reward, np.zeros(self.num_envs, dtype=bool)


def _check_mdp(task: dict, S: int, A: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(task, dict):
        raise ValueError(f"tabular MDP task must be a dict, got {task!r}")
    for key in ("transitions", "rewards"):
        if key not in task:
            raise ValueError(f"tabular MDP task needs a '{key}' key, got keys {list(task)}")
    P = np.asarray(task["transitions"], dtype=np.float64)
    R = np.asarray(task["rewards"], dtype=np.float64)
    if P.shape != (S, A, S):
        raise ValueError(f"task 'transitions' must have shape ({S}, {A}, {S}), got {P.shape}")
    if np.any(P < 0) or not np.allclose(P.sum(-1), 1.0):
        raise ValueError("task 'transitions' rows must be probability vectors")
    if R.shape != (S, A) or not np.all(np.isfinite(R)):
        raise ValueError(f"task 'rewards' must be finite with shape ({S}, {A}), got {R.shape}")
    return P, R


def _next_state(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw s' = #{j : cdf_j <= u}, for cdf rows [..., S] and uniforms u [...]."""
    return np.minimum((cdf <= u[..., None]).sum(-1), cdf.shape[-1] - 1)


class TabularMDPEnv(gym.Env):
    """Random tabular MDP (Duan et al. 2016, RL^2; MAML-RL's TabularMDP).

    S = 10 states, A = 5 actions; start state s_0 = 0 (deterministic).
    s_{t+1} ~ P(. | s_t, a_t) (drawn from self.np_random); reward r_t = R(s_t, a_t),
    the task's mean reward (deterministic). observation: one-hot of s_t; never
    terminates; horizon 10 (TimeLimit).
    task {"transitions": P [S, A, S], "rewards": R [S, A]}, P(.|s,a) ~ Dirichlet(1),
    R(s, a) ~ N(1, 1).
    """

    metadata = {"render_modes": []}

    def __init__(self, num_states: int = 10, num_actions: int = 5, task: dict | None = None):
        if num_states < 1 or num_actions < 1:
            raise ValueError(
                f"num_states and num_actions must be >= 1, got {num_states}, {num_actions}"
            )
        self.num_states, self.num_actions = num_states, num_actions
        self.observation_space = spaces.Box(0.0, 1.0, shape=(num_states,), dtype=np.float32)
        self.action_space = spaces.Discrete(num_actions)
        if task is None:  # a fixed default task so a freshly made env is deterministic
            task = self._draw(np.random.default_rng(0), 1)[0]
        self.reset_task(task)
        self._state = 0

    def _draw(self, rng: np.random.Generator, n: int) -> list[dict]:
        S, A = self.num_states, self.num_actions
        P = rng.dirichlet(np.ones(S), size=(n, S, A))
        R = rng.normal(1.0, 1.0, size=(n, S, A))
        return [{"transitions": P[i], "rewards": R[i]} for i in range(n)]

    def sample_tasks(self, num_tasks: int) -> list[dict]:
        """num_tasks MDPs (P ~ Dirichlet(1) per (s, a), R ~ N(1, 1)) drawn from self.np_random."""
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {num_tasks}")
        return self._draw(self.np_random, num_tasks)

    def reset_task(self, task: dict) -> None:
        P, self._rewards = _check_mdp(task, self.num_states, self.num_actions)
        self._cdf = np.cumsum(P, axis=-1)

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.num_states, dtype=np.float32)
        obs[self._state] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = 0
        return self._obs(), {}

    def step(self, action):
        a = int(_check_actions(action, self.num_actions))
        reward = float(self._rewards[self._state, a])
        u = np.asarray(self.np_random.random())
        self._state = int(_next_state(self._cdf[self._state, a], u))
        return self._obs(), reward, False, False, {}

    def make_batch_env(self, tasks: list[dict]) -> TabularMDPBatchEnv:
        return TabularMDPBatchEnv(tasks, self.num_states, self.num_actions)


class TabularMDPBatchEnv:
    """N tabular MDPs stepped together; same draws as N TabularMDPEnv seeded with `seeds`."""

    def __init__(self, tasks: list[dict], num_states: int = 10, num_actions: int = 5):
        if len(tasks) == 0:
            raise ValueError("TabularMDPBatchEnv needs at least one task")
        S, A = num_states, num_actions
        self.num_envs = len(tasks)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(S,), dtype=np.float32)
        self.action_space = spaces.Discrete(A)
        checked = [_check_mdp(t, S, A) for t in tasks]
        self._cdf = np.cumsum(np.stack([P for P, _ in checked]), axis=-1)  # [N, S, A, S]
        self._rewards = np.stack([R for _, R in checked])  # [N, S, A]
        self._states = np.zeros(self.num_envs, dtype=np.int64)
        self._rngs: list[np.random.Generator] = []

    def _obs(self) -> np.ndarray:
        return np.eye(self._cdf.shape[1], dtype=np.float32)[self._states]

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs {self.num_envs} seeds, got {len(seeds)}")
        self._rngs = [seeding.np_random(int(s))[0] for s in seeds]
        self._states = np.zeros(self.num_envs, dtype=np.int64)
        return self._obs()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = _check_actions(actions, self._rewards.shape[2], self.num_envs)
        idx = np.arange(self.num_envs)
        reward = self._rewards[idx, self._states, a]
        u = np.array([rng.random() for rng in self._rngs])
        self._states = _next_state(self._cdf[idx, self._states, a], u)
        return self._obs(), reward, np.zeros(self.num_envs, dtype=bool)
