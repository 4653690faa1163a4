"""Meta-World ML1 / ML10 / ML45 (Yu et al. 2019, v3 tasks) as MAML-RL task distributions.

Needs the extra ``pip install -e ".[metaworld]"`` (metaworld 3.1.1 with the mujoco 3.3.0
it pins; docs/metaworld.md says why). Gymnasium ids, horizon 500 (Meta-World's
``max_path_length``):

==============================  ===========================================================
``binom_rl/MetaWorldML1-v0``    one task class, 50 training goals, 50 held-out test goals;
                                ``env_kwargs: {env_name: push-v3}`` (any of the 50 v3
                                names, default ``reach-v3``)
``binom_rl/MetaWorldML10-v0``   10 training classes, 5 held-out test classes, 50 goals each
``binom_rl/MetaWorldML45-v0``   45 training classes, 5 held-out test classes, 50 goals each
==============================  ===========================================================

``benchmark_seed`` (env kwarg, default 0) is the seed Meta-World draws the benchmark's
goals with: every process (workers, a resumed run, evaluate.py) rebuilds the same tasks.

The task protocol, on ``env.unwrapped``:

- ``sample_tasks(n)`` draws from the benchmark's training tasks, ``sample_test_tasks(n)``
  from its test tasks (held-out goals for ML1, held-out classes for ML10 / ML45; the
  sampler's ``split="test"``, used by evaluate.py). Both draw from ``self.np_random``:
  task i gets the class at position i mod C of a random order of the split's C classes
  (so classes are balanced), and the goals of a class are drawn in random order without
  repeats until every goal of the class was drawn.
- A task is a dict ``{"env_name", "split", "index", "task"}``, ``task`` being Meta-World's
  picklable ``Task`` tuple; ``reset_task(task)`` accepts any v3 task, of either split.

Meta-World's reset ignores seeds: the task fixes the initial state (object and goal
positions), so the episodes of one task differ only by the policy's actions. Episodes
never terminate; ``info["success"]`` is Meta-World's per-step success flag, and the batch
env reports it to the sampler (an episode succeeds if it is set at any step). The Sawyer
envs' own path-length limit is lifted, so the sampler's horizon (``max-episode-steps``)
decides the episode length, below or above 500.

Cost (measured on the 2-core machine): building a Sawyer env takes ~0.2 s and holds its
own MuJoCo model (~23 MB), ``set_task`` + reset ~10 ms; ML1 builds in ~2 s, ML10 in
~17 s, ML45 in ~59 s. So envs are built inside the process that steps them (a pickled
Meta-World env comes back with a wrong action space), from the task's ``env_name``, and
pooled per class for reuse by later batches; the benchmark itself is built once per
process, and only where tasks are sampled (never in sampler workers).
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = [
    "BENCHMARKS",
    "MetaWorldBatchEnv",
    "MetaWorldEnv",
    "MetaWorldML1Env",
    "MetaWorldML10Env",
    "MetaWorldML45Env",
    "load_benchmark",
]

BENCHMARKS = ("ML1", "ML10", "ML45")
SPLITS = ("train", "test")
TASK_KEYS = ("env_name", "split", "index", "task")


def _metaworld():
    """The metaworld module, or a ValueError saying how to install it."""
    try:
        import metaworld
    except ImportError as err:
        raise ValueError(
            f"Meta-World envs need the metaworld extra: pip install -e '.[metaworld]' ({err})"
        ) from err
    return metaworld


def _v3_envs() -> dict[str, type]:
    """Meta-World's v3 task name -> Sawyer env class."""
    return _metaworld().env_dict.ALL_V3_ENVIRONMENTS


def _check_benchmark(benchmark: str, env_name: str | None) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
    if benchmark == "ML1" and env_name not in _v3_envs():
        raise ValueError(
            f"unknown Meta-World v3 task {env_name!r}; valid names: {', '.join(_v3_envs())}"
        )


@functools.cache
def load_benchmark(benchmark: str, env_name: str | None = None, seed: int = 0) -> Any:
    """``metaworld.ML1(env_name, seed) / ML10(seed) / ML45(seed)``, built once per process."""
    _check_benchmark(benchmark, env_name)
    metaworld = _metaworld()
    if benchmark == "ML1":
        return metaworld.ML1(env_name, seed=seed)
    # ~17 s (ML10) or ~59 s (ML45) in Meta-World's own code, which reports no progress
    print(f"building Meta-World {benchmark} (once per process)...", file=sys.stderr, flush=True)
    return getattr(metaworld, benchmark)(seed=seed)


# --------------------------------------------------------------------- Sawyer env pool

# Free Sawyer envs of this process by task name. Building one costs ~0.2 s and set_task
# fully re-targets it, so the batch envs of later meta-iterations reuse them.
_POOL: dict[str, list[Any]] = defaultdict(list)


def _acquire(env_name: str) -> Any:
    free = _POOL[env_name]
    if free:
        return free.pop()
    env = _v3_envs()[env_name]()
    # The sampler (or a TimeLimit) decides the horizon; Meta-World's own limit would raise
    # past 500 steps. Nothing else reads it.
    env.max_path_length = sys.maxsize
    return env


def _release(env_name: str, env: Any) -> None:
    _POOL[env_name].append(env)


def pooled_env_count() -> int:
    """Free Sawyer envs held by this process' pool (for tests and memory accounting)."""
    return sum(len(envs) for envs in _POOL.values())


def _check_task(task: Any) -> dict[str, Any]:
    """ValueError unless ``task`` is a task dict of this module; returns it."""
    if not isinstance(task, dict) or any(k not in task for k in TASK_KEYS):
        raise ValueError(
            f"a Meta-World task must be a dict with keys {', '.join(TASK_KEYS)} "
            f"(from sample_tasks), got {task!r:.200}"
        )
    inner = task["task"]
    if getattr(inner, "env_name", None) != task["env_name"] or not isinstance(
        getattr(inner, "data", None), bytes
    ):
        raise ValueError(f"task['task'] must be Meta-World's Task for {task['env_name']!r}")
    if task["env_name"] not in _v3_envs():
        raise ValueError(f"unknown Meta-World v3 task {task['env_name']!r}")
    return task


# --------------------------------------------------------------------- gymnasium env


class MetaWorldEnv(gym.Env):
    """One Meta-World Sawyer env behind the MAML-RL task protocol (see the module doc)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, benchmark: str, env_name: str | None = None, benchmark_seed: int = 0):
        _check_benchmark(benchmark, env_name)
        if isinstance(benchmark_seed, bool) or not isinstance(benchmark_seed, int):
            raise ValueError(f"benchmark_seed must be an int, got {benchmark_seed!r}")
        self.benchmark, self.env_name, self.benchmark_seed = benchmark, env_name, benchmark_seed
        # The spaces are those of every v3 env: take them from one of the training classes
        # without building the benchmark (the sampler probes envs often).
        first = env_name if benchmark == "ML1" else next(iter(self._class_names("train")))
        self._sawyer_name, self._sawyer = first, _acquire(first)
        self.observation_space = self._sawyer.observation_space
        self.action_space = self._sawyer.action_space
        self._task: dict[str, Any] | None = None

    def _class_names(self, split: str) -> list[str]:
        if self.benchmark == "ML1":
            return [self.env_name]
        return list(getattr(_metaworld().env_dict, f"{self.benchmark}_V3")[split])

    def _benchmark(self) -> Any:
        return load_benchmark(self.benchmark, self.env_name, self.benchmark_seed)

    # -- task protocol

    def sample_tasks(self, num_tasks: int) -> list[dict[str, Any]]:
        """``num_tasks`` training tasks, classes balanced (module doc)."""
        return self._draw(num_tasks, "train")

    def sample_test_tasks(self, num_tasks: int) -> list[dict[str, Any]]:
        """``num_tasks`` held-out test tasks, classes balanced (module doc)."""
        return self._draw(num_tasks, "test")

    def _draw(self, num_tasks: int, split: str) -> list[dict[str, Any]]:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)):
            raise ValueError(f"num_tasks must be an integer, got {num_tasks!r}")
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {num_tasks}")
        bench = self._benchmark()
        pool = bench.train_tasks if split == "train" else bench.test_tasks
        by_class: dict[str, list[int]] = defaultdict(list)
        for index, task in enumerate(pool):
            by_class[task.env_name].append(index)
        names = list(by_class)
        order = self.np_random.permutation(len(names))
        slots = [names[order[i % len(names)]] for i in range(num_tasks)]
        drawn: dict[str, list[int]] = {}
        for name in (n for n in names if n in slots):  # all C classes unless n < C
            count, indices = slots.count(name), by_class[name]
            # whole permutations of the class' goals: no repeat before every goal was drawn
            rounds = -(-count // len(indices))
            picks = np.concatenate([self.np_random.permutation(len(indices))
                                    for _ in range(rounds)])[:count]  # fmt: skip
            drawn[name] = [indices[p] for p in picks]
        tasks = []
        for name in slots:
            index = drawn[name].pop(0)
            tasks.append({"env_name": name, "split": split, "index": index, "task": pool[index]})
        return tasks

    def reset_task(self, task: dict[str, Any]) -> None:
        """Switch to ``task`` (any v3 task); takes effect at the next reset."""
        task = _check_task(task)
        if task["env_name"] != self._sawyer_name:
            _release(self._sawyer_name, self._sawyer)
            self._sawyer_name, self._sawyer = task["env_name"], _acquire(task["env_name"])
        self._sawyer.set_task(task["task"])
        self._task = task

    @property
    def task(self) -> dict[str, Any] | None:
        return self._task

    # -- gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Seeds ``np_random`` (task sampling). Without a task set yet, takes the
        benchmark's first training task. The initial state is the task's (module doc)."""
        super().reset(seed=seed)
        if self._task is None:
            first = self._benchmark().train_tasks[0]
            self.reset_task({"env_name": first.env_name, "split": "train", "index": 0,
                             "task": first})  # fmt: skip
        obs, info = self._sawyer.reset()
        return np.asarray(obs, dtype=np.float64), info

    def step(self, action: np.ndarray):
        obs, reward, _, _, info = self._sawyer.step(np.asarray(action, dtype=np.float64))
        return np.asarray(obs, dtype=np.float64), float(reward), False, False, info

    def make_batch_env(self, tasks: list[dict[str, Any]]) -> MetaWorldBatchEnv:
        return MetaWorldBatchEnv(tasks)

    def close(self) -> None:
        if self._sawyer is not None:
            _release(self._sawyer_name, self._sawyer)
            self._sawyer = None


class MetaWorldML1Env(MetaWorldEnv):
    """ML1: the goals of one task class (``env_name``)."""

    def __init__(self, env_name: str = "reach-v3", benchmark_seed: int = 0):
        super().__init__("ML1", env_name, benchmark_seed)


class MetaWorldML10Env(MetaWorldEnv):
    """ML10: 10 training classes, 5 held-out test classes."""

    def __init__(self, benchmark_seed: int = 0):
        super().__init__("ML10", None, benchmark_seed)


class MetaWorldML45Env(MetaWorldEnv):
    """ML45: 45 training classes, 5 held-out test classes."""

    def __init__(self, benchmark_seed: int = 0):
        super().__init__("ML45", None, benchmark_seed)


# --------------------------------------------------------------------- batch env


class MetaWorldBatchEnv:
    """BatchEnv of N pooled Sawyer envs, one per task, stepped in a Python loop (Meta-World
    steps its physics and rewards in Python: no batched simulator applies). ``step``
    returns the per-step success as a 4th array; episodes never terminate."""

    def __init__(self, tasks: list[dict[str, Any]]):
        if len(tasks) == 0:
            raise ValueError("MetaWorldBatchEnv needs at least one task")
        tasks = [_check_task(t) for t in tasks]
        self._names = [t["env_name"] for t in tasks]
        self.envs: list[Any] = []
        try:
            for task in tasks:
                self.envs.append(_acquire(task["env_name"]))
                self.envs[-1].set_task(task["task"])
        except BaseException:
            self.close()
            raise
        self.num_envs = len(self.envs)
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space

    def reset(self, seeds) -> np.ndarray:
        """Initial observations [N, 39]; the seeds do not matter (module doc)."""
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs {self.num_envs} seeds, got {len(seeds)}")
        return np.stack([env.reset()[0] for env in self.envs]).astype(np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(obs [N, 39] float32, reward [N], terminated [N] (all False), success [N] bool)."""
        if len(actions) != self.num_envs:
            raise ValueError(f"step needs {self.num_envs} actions, got {len(actions)}")
        obs = np.empty((self.num_envs, *self.observation_space.shape), dtype=np.float32)
        reward = np.empty(self.num_envs)
        success = np.empty(self.num_envs, dtype=bool)
        for i, env in enumerate(self.envs):
            o, reward[i], _, _, info = env.step(np.asarray(actions[i], dtype=np.float64))
            obs[i], success[i] = o, bool(info["success"])
        return obs, reward, np.zeros(self.num_envs, dtype=bool), success

    def close(self) -> None:
        for name, env in zip(self._names, self.envs, strict=False):
            _release(name, env)
        self.envs = []
