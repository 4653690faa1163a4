"""Multi-task sampler: B episodes for each of T tasks, all T*B envs in lockstep.

Env i = t*B + b runs task t. Its reset seed is derived from (seed, t, b) only and the
policy's torch.Generator is seeded from `seed`, so the result does not depend on how
the T*B envs are split across workers. Each worker owns one BatchEnv (a slice of
contiguous envs) through a _WorkerCore; num_workers=1 keeps it in-process, more workers
are processes talking over Pipes with numpy arrays (backend "local") or Ray actors
(backend "ray", binom_rl.ray_sampler, on one machine or a cluster).

Two ways to drive the workers, with the same episodes: the sampler runs the policy and
sends every worker one step at a time (one round trip per env step), or every worker
runs the policy for its own slice for a whole sample call (one round trip per call;
``act_in_workers``, the Ray backend's default). Both step the envs through one loop,
:func:`_step_envs`.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import pickle
import signal
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec

from binom_rl.envs import registered_ids
from binom_rl.envs.batch import BatchEnv, check_task_protocol, make_batch_env

if TYPE_CHECKING:
    from binom_rl.config import Config

ActFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Episodes:
    """Episodes of T tasks x B episodes, time-major.

    mask[h, t, b] = 1 while the episode is running at step h, 0 after it terminated;
    rewards, observations and actions are 0 where the mask is 0.
    returns[t, b] = sum_h rewards[h, t, b] (undiscounted), lengths[t, b] = sum_h mask[h, t, b].
    successes[t, b]: the env reported success at some running step of the episode, for envs
    whose batch env reports success (Meta-World); None for the others.
    """

    observations: torch.Tensor  # [H, T, B, obs_dim] float32
    actions: torch.Tensor  # [H, T, B, act_dim] float32 or [H, T, B] int64
    rewards: torch.Tensor  # [H, T, B] float32
    mask: torch.Tensor  # [H, T, B] float32
    returns: torch.Tensor  # [T, B] float32
    lengths: torch.Tensor  # [T, B] int64
    successes: torch.Tensor | None = None  # [T, B] bool

    def to(self, device: str | torch.device) -> Episodes:
        return Episodes(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in fields(self)
            }
        )


def episode_seeds(seed: int, num_tasks: int, batch_size: int) -> list[int]:
    """Reset seeds of episodes (t, b), flattened t-major: word b of SeedSequence(seed, key t).

    generate_state is prefix-stable (its first b words do not depend on how many are asked
    for), so the seed of (t, b) depends on (seed, t, b) only, and one hash per task is
    ~20x cheaper than one per episode.
    """
    return [
        int(x)
        for t in range(num_tasks)
        for x in np.random.SeedSequence(seed, spawn_key=(t,)).generate_state(batch_size)
    ]


@dataclass(frozen=True)
class RolloutPlan:
    """What a worker needs to run the policy for its own envs ``lo:hi`` of the T x B batch."""

    lo: int
    hi: int
    num_tasks: int
    batch_size: int
    horizon: int
    obs_dim: int
    act_shape: tuple[int, ...]  # () for Discrete actions
    action_scale: tuple[np.ndarray, np.ndarray] | None  # (scale, offset), see the sampler
    seed: int
    action_bounds: tuple[np.ndarray, np.ndarray] | None = None  # (low, high) to clip to


def _checked_actions(actions: Any, expected: tuple[int, ...], discrete: bool) -> torch.Tensor:
    if not isinstance(actions, torch.Tensor):
        raise ValueError(f"act_fn must return a torch.Tensor, got {type(actions).__name__}")
    if tuple(actions.shape) != expected:
        raise ValueError(f"act_fn returned shape {tuple(actions.shape)}, expected {expected}")
    return actions.long() if discrete else actions.float()


def _checked_obs(obs: Any, num_envs: int, obs_dim: int) -> np.ndarray:
    obs = np.asarray(obs)
    if obs.shape != (num_envs, obs_dim):
        raise RuntimeError(
            f"batch env reset returned shape {obs.shape}, expected {(num_envs, obs_dim)}"
        )
    return obs


# What a sample call's stepping produced: observations and actions [h, N, ...] (h <= the
# horizon), rewards and mask [horizon, N], success [N] bool or None (see _step_envs).
_Steps = tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, "np.ndarray | None"]


def _step_envs(
    obs: np.ndarray,
    policy: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
    step: Callable[[np.ndarray], tuple[np.ndarray, ...]],
    horizon: int,
    action_scale: tuple[np.ndarray, np.ndarray] | None,
    action_bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray, np.ndarray, np.ndarray | None]:
    """Run n envs from their first observations ``obs`` [n, obs_dim] for ``horizon`` steps
    or until every episode has ended: the one loop that masks episodes, whoever steps.

    ``policy(obs)`` -> (the observations as recorded, the actions [n, ...]), tensors;
    ``step(env_actions)`` -> (obs, reward, terminated[, success]) of the n envs. An env's
    observation is 0 from the step after its episode ended (the policy sees zeros there),
    its reward 0. Returns the recorded observations and actions per step (up to the last
    step in which some episode ran), rewards, mask [horizon, n] float32, and, where ``step``
    reports success, whether each episode succeeded at some running step ([n] bool; the
    step an episode ends on counts), else None. The env gets the actions rescaled by
    ``action_scale`` (scale, offset) and then clipped to ``action_bounds`` (low, high),
    where given; the recorded actions are the policy's own.
    """
    n = len(obs)
    alive = np.ones(n, dtype=bool)
    mask = np.zeros((horizon, n), dtype=np.float32)
    rewards = np.zeros((horizon, n), dtype=np.float32)
    obs_steps, act_steps = [], []
    succeeded: np.ndarray | None = None
    for h in range(horizon):
        # a new array: the batch env may hand out (and later reuse) its own buffer
        obs = np.where(alive[:, None], obs, np.float32(0)).astype(np.float32, copy=False)
        mask[h] = alive
        obs_t, actions = policy(obs)
        obs_steps.append(obs_t)
        act_steps.append(actions)
        act_np = actions.cpu().numpy()  # one copy back
        if action_scale is not None:
            scale, offset = action_scale
            act_np = (act_np * scale + offset).astype(act_np.dtype)
        if action_bounds is not None:
            act_np = np.clip(act_np, *action_bounds)  # float32 bounds: stays float32
        out = step(act_np)
        obs, reward, terminated = out[:3]
        rewards[h] = np.where(alive, reward, 0.0)
        if len(out) == 4:
            if succeeded is None:
                succeeded = np.zeros(n, dtype=bool)
            succeeded |= alive & np.asarray(out[3], dtype=bool)
        alive &= ~np.asarray(terminated, dtype=bool)
        if not alive.any():  # all episodes over: the remaining steps stay masked
            break
    return obs_steps, act_steps, rewards, mask, succeeded


class _WorkerCore:
    """One BatchEnv for a slice of envs; the same code runs in-process, in worker processes
    and in Ray actors."""

    def __init__(self, env_spec: EnvSpec, env_kwargs: dict[str, Any]):
        self.env_spec, self.env_kwargs = env_spec, env_kwargs
        self.env: BatchEnv | None = None
        self._tasks_key: bytes | None = None

    def reset(self, tasks: list[dict], seeds: list[int]) -> np.ndarray:
        # the K+1 sample calls of one meta-step share their tasks: rebuild only when they change
        key = pickle.dumps(tasks)
        if key != self._tasks_key:
            self.close()
            self.env = make_batch_env(self.env_spec, tasks, self.env_kwargs)
            self._tasks_key = key
        return np.asarray(self.env.reset(seeds), dtype=np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """(obs, reward, terminated) and, where the batch env reports it, success."""
        out = self.env.step(actions)
        result = (
            np.asarray(out[0], dtype=np.float32),
            np.asarray(out[1], dtype=np.float64),
            np.asarray(out[2], dtype=bool),
        )
        return result + (np.asarray(out[3], dtype=bool),) if len(out) == 4 else result

    def rollout(
        self, tasks: list[dict], seeds: list[int], act_fn: ActFn, plan: RolloutPlan
    ) -> dict[str, np.ndarray]:
        """Reset this worker's envs (``plan.lo:plan.hi`` of the batch) and run their
        episodes with ``act_fn`` choosing every action, here: one call per sample.

        act_fn sees the whole [T, B] batch, zeros in the rows of the other workers' envs,
        and this worker keeps its own rows. Those are the actions the sampler would get
        by calling act_fn once for all envs, as long as an env's action depends only on
        its own observation and on the generator (whose stream is the same here: seeded
        alike, drawn for the same shape).
        Returns observations and actions [h, n, ...] (h <= horizon, the steps in which
        one of these episodes ran) and rewards and mask [horizon, n], numpy.
        """
        lo, hi, T, B = plan.lo, plan.hi, plan.num_tasks, plan.batch_size
        obs = _checked_obs(self.reset(tasks, seeds), hi - lo, plan.obs_dim)
        generator = torch.Generator().manual_seed(plan.seed)
        expected, discrete = (T, B, *plan.act_shape), not plan.act_shape

        def policy(obs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            batch = np.zeros((T * B, plan.obs_dim), dtype=np.float32)
            batch[lo:hi] = obs
            with torch.no_grad():
                actions = act_fn(torch.from_numpy(batch).view(T, B, -1), generator)
            actions = _checked_actions(actions, expected, discrete)
            return torch.from_numpy(obs), actions.reshape(T * B, *plan.act_shape)[lo:hi]

        obs_steps, act_steps, rewards, mask, succeeded = _step_envs(
            obs, policy, self.step, plan.horizon, plan.action_scale, plan.action_bounds
        )
        result = {
            "observations": torch.stack(obs_steps).numpy(),
            "actions": torch.stack(act_steps).numpy(),
            "rewards": rewards,
            "mask": mask,
        }
        if succeeded is not None:
            result["success"] = succeeded
        return result

    def close(self) -> None:
        if self.env is not None and callable(getattr(self.env, "close", None)):
            self.env.close()
        self.env, self._tasks_key = None, None


def _worker_main(conn, env_spec: EnvSpec, env_kwargs: dict[str, Any]) -> None:
    """Serve (command, args) requests until 'close' or until the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which closes us
    torch.set_num_threads(1)
    core = _WorkerCore(env_spec, env_kwargs)
    try:
        while True:
            try:
                cmd, args = conn.recv()
            except (EOFError, OSError):  # parent is gone
                break
            except Exception:  # arguments that cannot be unpickled here, e.g. an act_fn
                conn.send(("error", traceback.format_exc()))  # from a module we cannot import
                continue
            if cmd == "close":
                break
            try:
                conn.send(("ok", getattr(core, cmd)(*args)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        try:
            core.close()
        finally:
            conn.close()


class _Worker:
    """What the sampler asks of a worker: send a _WorkerCore command, receive its result."""

    def send(self, cmd: str, *args: Any) -> None:
        raise NotImplementedError

    def recv(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def gather(workers: Sequence[_Worker]) -> list[Any]:
        """Every worker's pending result, in order."""
        return [w.recv() for w in workers]

    def close(self) -> None:
        raise NotImplementedError


class _LocalWorker(_Worker):
    """In-process worker: no pickling, no process; the fastest choice on 2 cores."""

    def __init__(self, env_spec: EnvSpec, env_kwargs: dict[str, Any]):
        self.core = _WorkerCore(env_spec, env_kwargs)
        self._result: Any = None

    def send(self, cmd: str, *args: Any) -> None:
        try:
            self._result = getattr(self.core, cmd)(*args)
        except Exception as exc:
            raise RuntimeError(f"sampler env raised {type(exc).__name__}: {exc}") from exc

    def recv(self) -> Any:
        return self._result

    def close(self) -> None:
        self.core.close()


class _ProcessWorker(_Worker):
    """Worker process behind a Pipe; recv never hangs on a worker that died."""

    POLL_S = 0.05

    def __init__(self, ctx, index: int, env_spec: EnvSpec, env_kwargs: dict[str, Any]):
        self.index = index
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main,
            args=(child_conn, env_spec, env_kwargs),
            name=f"binom_rl-sampler-{index}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def _died(self) -> RuntimeError:
        # A broken pipe can come before the process' exit code does (through the fork
        # server): wait for it briefly, so the message can say how the worker ended.
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is not None and code < 0:  # a signal: killed from outside, or out of memory
            try:
                how = signal.Signals(-code).name
            except ValueError:
                how = f"signal {-code}"
            return RuntimeError(f"sampler worker {self.index} died (exit code {code}): {how}")
        return RuntimeError(
            f"sampler worker {self.index} died (exit code {code}); if the env "
            "is defined in a module workers cannot import, use num_workers=1 or a "
            "'module:EnvId' id; a script that opens the sampler at its top level needs "
            'an `if __name__ == "__main__":` guard (workers start by importing the '
            "main module)"
        )

    def send(self, cmd: str, *args: Any) -> None:
        try:
            self.conn.send((cmd, args))
        except (BrokenPipeError, EOFError, OSError) as exc:
            raise self._died() from exc

    def recv(self) -> Any:
        # poll returns as soon as data arrives, so the timeout adds no latency
        while not self.conn.poll(self.POLL_S):
            if not self.process.is_alive() and not self.conn.poll():
                raise self._died()
        try:
            status, result = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc
        if status == "error":
            raise RuntimeError(f"sampler worker {self.index} raised:\n{result}")
        return result

    @staticmethod
    def gather(workers: Sequence[_ProcessWorker]) -> list[Any]:
        """Every worker's result, taken as it arrives: a worker that dies is reported at
        once, not after the others have finished their (possibly long) commands."""
        results: dict[int, Any] = {}
        while len(results) < len(workers):
            waiting = [w for i, w in enumerate(workers) if i not in results]
            handles = [h for w in waiting for h in (w.conn, w.process.sentinel)]
            ready = mp_connection.wait(handles, timeout=_ProcessWorker.POLL_S)
            for w in waiting:
                if w.conn in ready or w.process.sentinel in ready:
                    results[workers.index(w)] = w.recv()
        return [results[i] for i in range(len(workers))]

    def close(self) -> None:
        try:
            if self.process.is_alive():
                self.conn.send(("close", ()))
        except (BrokenPipeError, EOFError, OSError):
            pass
        self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


_LIVE_SAMPLERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all_samplers() -> None:
    for sampler in list(_LIVE_SAMPLERS):
        sampler.close()


BACKENDS = ("local", "ray")


class MultiTaskSampler:
    """Samples batch_size episodes for each task, all tasks and episodes in lockstep.

    >>> with MultiTaskSampler("binom_rl/2DNavigation-v0") as sampler:
    ...     tasks = sampler.sample_tasks(20, seed=0)
    ...     episodes = sampler.sample(tasks, act_fn, batch_size=20, seed=1)

    ``backend="local"``: ``num_workers`` processes on this machine (1: in-process);
    ``"ray"``: ``num_workers`` Ray actors, on this machine or a cluster (``ray_address``:
    None starts a local Ray unless ``RAY_ADDRESS`` is set, ``"auto"`` or ``"host:port"``
    joins a running cluster; see binom_rl.ray_sampler). ``act_in_workers``: the workers
    run act_fn for their own envs, one round trip per sample call instead of one per env
    step (same episodes; act_fn must then be picklable, and gets its observations on the
    CPU); default: True for Ray, False for local processes.
    """

    def __init__(
        self,
        env_id: str,
        *,
        num_workers: int = 1,
        env_kwargs: dict | None = None,
        max_episode_steps: int | None = None,
        device: str | torch.device = "cpu",
        rescale_actions: bool = False,
        clip_actions: bool = False,
        backend: str = "local",
        ray_address: str | None = None,
        act_in_workers: bool | None = None,
    ):
        self._workers: list[_Worker] = []
        self._in_flight = False  # True while workers owe a reply
        self._closed = True  # until workers exist, close() has nothing to do
        self._ray = None  # binom_rl.ray_sampler, once the Ray backend is connected
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if ray_address is not None and backend != "ray":
            raise ValueError(f"ray_address {ray_address!r} is set but the backend is {backend!r}")
        self.env_id, self.num_workers, self.backend = env_id, num_workers, backend
        self.env_kwargs = dict(env_kwargs or {})
        self.device = torch.device(device)
        # an in-process worker is driven step by step: running act_fn "in the worker" would
        # be the same call in the same process
        in_process = backend == "local" and num_workers == 1
        self.act_in_workers = (backend == "ray") if act_in_workers is None else act_in_workers
        self.act_in_workers = self.act_in_workers and not in_process
        # where act_fn receives its observations (and must keep its parameters)
        self.act_device = torch.device("cpu") if self.act_in_workers else self.device
        ray_sampler = _import_ray_backend() if backend == "ray" else None

        # everything is validated on a probe env before any worker starts
        self._env = _make_checked(env_id, self.env_kwargs)
        self.env_spec = gym.spec(self._env.spec.id)  # registry spec: workers rebuild from it
        self.observation_space = self._env.observation_space
        self.action_space = self._env.action_space
        if not (
            isinstance(self.observation_space, spaces.Box)
            and len(self.observation_space.shape) == 1
        ):
            raise ValueError(f"observation space must be a 1-D Box, got {self.observation_space}")
        if isinstance(self.action_space, spaces.Discrete):
            self._act_shape: tuple[int, ...] = ()
        elif isinstance(self.action_space, spaces.Box) and len(self.action_space.shape) == 1:
            self._act_shape = self.action_space.shape
        else:
            raise ValueError(f"action space must be Discrete or a 1-D Box, got {self.action_space}")
        # rescale_actions: env action = low + (a + 1) (high - low) / 2 for policy actions a,
        # rllab's normalize() (MAML paper). Applied here to the [N, act_dim] batch, once per
        # step, because the batched envs cannot be wrapped in gymnasium's RescaleAction.
        self._action_scale: tuple[np.ndarray, np.ndarray] | None = None
        if rescale_actions and self._act_shape:
            low, high = self.action_space.low, self.action_space.high
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                raise ValueError(
                    f"rescale_actions needs finite action bounds, {env_id} has {self.action_space}"
                )
            if not (low == -1).all() or not (high == 1).all():
                self._action_scale = ((high - low) / 2, (high + low) / 2)
        # clip_actions: the env gets its actions clipped to its bounds (after rescaling), as
        # rllab's normalize() clipped them, so an env's control cost is paid on the action
        # the physics applies; the episodes record the policy's unclipped sample, whose
        # log-probability the losses use (stable-baselines3 does the same).
        self._action_bounds: tuple[np.ndarray, np.ndarray] | None = None
        if clip_actions and self._act_shape:
            low, high = self.action_space.low, self.action_space.high
            if np.isfinite(low).any() or np.isfinite(high).any():
                self._action_bounds = (low.astype(np.float32), high.astype(np.float32))
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        horizon = max_episode_steps or self.env_spec.max_episode_steps
        if horizon is None:
            raise ValueError(f"{env_id} has no max_episode_steps: pass max_episode_steps")
        self.horizon = int(horizon)

        self._closed = False
        _LIVE_SAMPLERS.add(self)
        try:
            if ray_sampler is not None:
                ray_sampler.connect(ray_address, num_workers)
                self._ray = ray_sampler
                self._workers = ray_sampler.start_workers(
                    num_workers, self.env_spec, self.env_kwargs
                )
            elif num_workers == 1:
                self._workers = [_LocalWorker(self.env_spec, self.env_kwargs)]
            else:
                ctx = _mp_context()
                for i in range(num_workers):
                    self._workers.append(_ProcessWorker(ctx, i, self.env_spec, self.env_kwargs))
        except BaseException:  # do not leak the workers already started
            self.close()
            raise

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device | None = None) -> MultiTaskSampler:
        """The sampler a run's config describes (env, kwargs, horizon, workers, action
        rescaling and clipping, backend), on ``device`` (default ``cfg.device``)."""
        return cls(
            cfg.env_name,
            num_workers=cfg.num_workers,
            env_kwargs=cfg.env_kwargs,
            max_episode_steps=cfg.max_episode_steps,
            device=cfg.device if device is None else device,
            rescale_actions=cfg.rescale_actions,
            clip_actions=cfg.clip_actions,
            backend=cfg.sampler,
            ray_address=cfg.ray_address,
        )

    def sample_tasks(self, num_tasks: int, seed: int, split: str = "train") -> list[dict]:
        """num_tasks tasks from the env's task distribution; the same seed gives the same tasks.

        ``split="test"``: from the env's held-out test tasks where it has them
        (``unwrapped.sample_test_tasks``, e.g. Meta-World), else from the same distribution.
        """
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {num_tasks}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self._env.reset(seed=seed)
        env = self._env.unwrapped
        if split == "test" and callable(getattr(env, "sample_test_tasks", None)):
            return env.sample_test_tasks(num_tasks)
        return env.sample_tasks(num_tasks)

    def sample(
        self, tasks: Sequence[dict], act_fn: ActFn, batch_size: int, *, seed: int
    ) -> Episodes:
        """batch_size episodes of `horizon` steps for each task; act_fn runs under no_grad.

        act_fn(obs [T, B, obs_dim], generator) -> actions [T, B, act_dim] (or [T, B] int),
        called once per time step for all T*B envs, on ``act_device``. With
        ``act_in_workers`` each worker makes that call for its own envs (see
        :meth:`_WorkerCore.rollout`), which gives the same episodes for any act_fn whose
        action for an env depends only on that env's observation and on the generator.
        """
        if self._closed:
            raise RuntimeError("sampler is closed")
        if len(tasks) == 0:
            raise ValueError("tasks must be a non-empty list of task dicts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        T, B = len(tasks), batch_size
        N = T * B
        env_tasks = [task for task in tasks for _ in range(B)]  # env i = t*B + b
        seeds = episode_seeds(seed, T, B)
        bounds = np.linspace(0, N, self.num_workers + 1).round().astype(int)
        slices = [
            (w, int(lo), int(hi))
            for w, lo, hi in zip(self._workers, bounds[:-1], bounds[1:], strict=True)
            if hi > lo
        ]
        try:
            if self.act_in_workers:
                steps = self._sample_in_workers(slices, env_tasks, seeds, act_fn, T, B, seed)
            else:
                steps = self._sample_stepwise(slices, env_tasks, seeds, act_fn, T, B, seed)
        except BaseException:  # includes KeyboardInterrupt while waiting on workers
            # workers that owe a reply (failed or interrupted mid-command) are out of sync
            if self._in_flight and not isinstance(self._workers[0], _LocalWorker):
                self.close()
            raise
        return self._assemble(*steps, T, B)

    def _send(
        self,
        slices: Sequence[tuple[_Worker, int, int]],
        cmd: str,
        args: Callable[[int, int], tuple],
    ) -> None:
        """Send ``cmd`` with ``args(lo, hi)`` to every worker of ``slices``."""
        self._in_flight = True
        for w, lo, hi in slices:
            w.send(cmd, *args(lo, hi))

    def _gather(self, slices: Sequence[tuple[_Worker, int, int]]) -> list[Any]:
        workers = [w for w, _, _ in slices]
        results = type(workers[0]).gather(workers)
        self._in_flight = False
        return results

    def _sample_stepwise(
        self, slices, env_tasks, seeds, act_fn: ActFn, T: int, B: int, seed: int
    ) -> _Steps:
        """The sampler runs act_fn for all envs and sends each worker its actions, one
        round trip per step."""
        N, obs_dim = T * B, self.observation_space.shape[0]
        self._send(slices, "reset", lambda lo, hi: (env_tasks[lo:hi], seeds[lo:hi]))
        obs = _checked_obs(np.concatenate(self._gather(slices)), N, obs_dim)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed))
        expected, discrete = (T, B, *self._act_shape), not self._act_shape

        def policy(obs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            obs_t = torch.from_numpy(obs).to(self.device)  # one copy
            with torch.no_grad():
                actions = act_fn(obs_t.view(T, B, obs_dim), generator)
            actions = _checked_actions(actions, expected, discrete)
            return obs_t, actions.reshape(N, *self._act_shape)

        def step(act_np: np.ndarray) -> tuple[np.ndarray, ...]:
            self._send(slices, "step", lambda lo, hi: (act_np[lo:hi],))
            results = self._gather(slices)
            return tuple(np.concatenate(parts) for parts in zip(*results, strict=True))

        obs_steps, act_steps, rewards, mask, succeeded = _step_envs(
            obs, policy, step, self.horizon, self._action_scale, self._action_bounds
        )
        return torch.stack(obs_steps), torch.stack(act_steps), rewards, mask, succeeded

    def _sample_in_workers(
        self, slices, env_tasks, seeds, act_fn: ActFn, T: int, B: int, seed: int
    ) -> _Steps:
        """Every worker runs its envs' episodes with act_fn itself: one round trip per call."""
        shared = self._ray.put(act_fn) if self._ray is not None else act_fn  # sent once
        obs_dim = self.observation_space.shape[0]

        def args(lo: int, hi: int) -> tuple:
            plan = RolloutPlan(
                lo,
                hi,
                T,
                B,
                self.horizon,
                obs_dim,
                tuple(self._act_shape),
                self._action_scale,
                int(seed),
                self._action_bounds,
            )
            return env_tasks[lo:hi], seeds[lo:hi], shared, plan

        self._send(slices, "rollout", args)
        parts = self._gather(slices)
        # the per-step arrays joined along the env axis, padded with zeros to the longest
        # slice's number of steps; success ([n] per worker, where reported) along its only axis
        steps = max(len(part["observations"]) for part in parts)
        joined = {
            key: np.concatenate([_pad_steps(part[key], steps) for part in parts], axis=1)
            for key in ("observations", "actions", "rewards", "mask")
        }
        succeeded = (
            np.concatenate([part["success"] for part in parts]) if "success" in parts[0] else None
        )
        return (
            torch.from_numpy(joined["observations"]).to(self.device),
            torch.from_numpy(joined["actions"]).to(self.device),
            joined["rewards"],
            joined["mask"],
            succeeded,
        )

    def _assemble(
        self,
        observations: torch.Tensor,
        actions: torch.Tensor,
        rewards: np.ndarray,
        mask: np.ndarray,
        succeeded: np.ndarray | None,
        T: int,
        B: int,
    ) -> Episodes:
        """Episodes from the steps' observations and actions [h, N, ...] (h <= horizon),
        rewards, mask [horizon, N] and success [N] (or None)."""
        H = self.horizon
        if len(observations) < H:  # steps after every episode ended: zeros
            observations = _pad_steps(observations, H)
            actions = _pad_steps(actions, H)
        observations = observations.view(H, T, B, -1)
        actions = actions.view(H, T, B, *self._act_shape)
        if mask.min() < 1:  # zero the actions after the end (the policy still saw zeros there)
            ended = torch.from_numpy(mask == 0).to(self.device).view(H, T, B)
            actions[ended] = 0
        # the small reductions in numpy: torch's thread pool costs ms per op on a busy CPU
        return Episodes(
            observations=observations,
            actions=actions,
            rewards=torch.from_numpy(rewards).to(self.device).view(H, T, B),
            mask=torch.from_numpy(mask).to(self.device).view(H, T, B),
            returns=torch.from_numpy(rewards.sum(0)).to(self.device).view(T, B),
            lengths=torch.from_numpy(mask.sum(0).astype(np.int64)).to(self.device).view(T, B),
            successes=None
            if succeeded is None
            else torch.from_numpy(succeeded).to(self.device).view(T, B),
        )

    def close(self) -> None:
        """Stop the workers (idempotent); a Ray connection this sampler made is closed."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for w in self._workers:
            try:
                w.close()
            except Exception:  # closing must not fail halfway: the other workers still need it
                pass
        self._workers = []
        if self._ray is not None:
            self._ray.disconnect()
            self._ray = None
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()

    def __enter__(self) -> MultiTaskSampler:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _pad_steps(x: Any, steps: int) -> Any:
    """x [h, ...] (numpy or torch) with zero rows appended up to [steps, ...]."""
    if len(x) >= steps:
        return x
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x.new_zeros((steps - len(x), *x.shape[1:]))])
    return np.concatenate([x, np.zeros((steps - len(x), *x.shape[1:]), dtype=x.dtype)])


def _import_ray_backend():
    """binom_rl.ray_sampler, or a ValueError naming the extra when Ray is not installed."""
    try:
        from binom_rl import ray_sampler
    except ImportError as exc:
        if exc.name != "ray" and not str(exc.name).startswith("ray."):
            raise
        raise ValueError(
            'the ray sampler needs Ray: pip install -e ".[ray]" (the ray extra of binom-rl)'
        ) from exc
    return ray_sampler


def _mp_context():
    """forkserver where available (never forks the threaded parent), else spawn.

    The fork server imports torch and the envs once (preload); each worker is then a cheap
    fork of it, where spawn would re-import torch in every worker.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["binom_rl.sampler"])  # only used when the server starts
        return ctx
    return mp.get_context("spawn")


def _make_checked(env_id: str, env_kwargs: dict[str, Any]) -> gym.Env:
    """gym.make with errors a user can act on: unknown ids list the binom_rl ids."""
    try:
        env = gym.make(env_id, **env_kwargs)
    except gym.error.Error as exc:
        raise ValueError(
            f"unknown env id {env_id!r} ({exc}); binom_rl ids: {', '.join(registered_ids())}, "
            "or any registered id / 'module:EnvId-v0' whose env has sample_tasks and reset_task"
        ) from exc
    except ModuleNotFoundError as exc:
        if ":" not in env_id:
            raise
        raise ValueError(f"cannot import the module of env id {env_id!r}: {exc}") from exc
    try:
        check_task_protocol(env)
    except ValueError:
        env.close()
        raise
    return env
