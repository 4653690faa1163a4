"""Multi-task sampler: B episodes for each of T tasks, all T*B envs in lockstep.

Env i = t*B + b runs task t. Its reset seed is derived from (seed, t, b) only and the
policy's torch.Generator is seeded from `seed`, so the result does not depend on how
the T*B envs are split across workers. Each worker owns one BatchEnv (a slice of
contiguous envs); num_workers=1 keeps it in-process, more workers are processes
talking over Pipes with numpy arrays.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
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
        return Episodes(**{
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
            for f in fields(self)
        })


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


class _WorkerCore:
    """One BatchEnv for a slice of envs; the same code runs in-process and in worker processes."""

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


class _LocalWorker:
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


class _ProcessWorker:
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
            "'module:EnvId' id"
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


class MultiTaskSampler:
    """Samples batch_size episodes for each task, all tasks and episodes in lockstep.

    >>> with MultiTaskSampler("binom_rl/2DNavigation-v0") as sampler:
    ...     tasks = sampler.sample_tasks(20, seed=0)
    ...     episodes = sampler.sample(tasks, act_fn, batch_size=20, seed=1)
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
    ):
        self._workers: list = []
        self._closed = True  # until workers exist, close() has nothing to do
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.env_id, self.num_workers = env_id, num_workers
        self.env_kwargs = dict(env_kwargs or {})
        self.device = torch.device(device)

        # everything is validated on a probe env before any worker starts
        self._env = _make_checked(env_id, self.env_kwargs)
        self.env_spec = gym.spec(self._env.spec.id)  # registry spec: workers rebuild from it
        self.observation_space = self._env.observation_space
        self.action_space = self._env.action_space
        if not (isinstance(self.observation_space, spaces.Box)
                and len(self.observation_space.shape) == 1):
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
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        horizon = max_episode_steps or self.env_spec.max_episode_steps
        if horizon is None:
            raise ValueError(f"{env_id} has no max_episode_steps: pass max_episode_steps")
        self.horizon = int(horizon)

        self._closed = False
        _LIVE_SAMPLERS.add(self)
        try:
            if num_workers == 1:
                self._workers = [_LocalWorker(self.env_spec, self.env_kwargs)]
            else:
                ctx = _mp_context()
                for i in range(num_workers):
                    self._workers.append(_ProcessWorker(ctx, i, self.env_spec, self.env_kwargs))
        except BaseException:  # do not leak the workers already started
            self.close()
            raise

    @classmethod
    def from_config(
        cls, cfg: Config, device: str | torch.device | None = None
    ) -> MultiTaskSampler:
        """The sampler a run's config describes (env, kwargs, horizon, workers, action
        rescaling), on ``device`` (default ``cfg.device``)."""
        return cls(
            cfg.env_name,
            num_workers=cfg.num_workers,
            env_kwargs=cfg.env_kwargs,
            max_episode_steps=cfg.max_episode_steps,
            device=cfg.device if device is None else device,
            rescale_actions=cfg.rescale_actions,
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
        called once per time step for all T*B envs.
        """
        if self._closed:
            raise RuntimeError("sampler is closed")
        if len(tasks) == 0:
            raise ValueError("tasks must be a non-empty list of task dicts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        T, B, H = len(tasks), batch_size, self.horizon
        N, obs_dim = T * B, self.observation_space.shape[0]

        env_tasks = [task for task in tasks for _ in range(B)]  # env i = t*B + b
        seeds = episode_seeds(seed, T, B)
        bounds = np.linspace(0, N, self.num_workers + 1).round().astype(int)
        slices = [(w, lo, hi) for w, lo, hi in zip(self._workers, bounds[:-1], bounds[1:],
                                                   strict=True) if hi > lo]
        pending = False  # True while workers owe us a reply
        try:
            pending = True
            for w, lo, hi in slices:
                w.send("reset", env_tasks[lo:hi], seeds[lo:hi])
            obs = np.concatenate([w.recv() for w, _, _ in slices])
            pending = False
            if obs.shape != (N, obs_dim):
                raise RuntimeError(f"batch env reset returned shape {obs.shape}, "
                                   f"expected {(N, obs_dim)}")

            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
            alive = np.ones(N, dtype=bool)
            succeeded: np.ndarray | None = None  # [N] bool, for batch envs that report success
            mask = np.zeros((H, N), dtype=np.float32)
            rewards = np.zeros((H, N), dtype=np.float32)
            obs_steps, act_steps = [], []
            for h in range(H):
                obs[~alive] = 0.0
                mask[h] = alive
                obs_t = torch.from_numpy(obs).to(self.device).view(T, B, obs_dim)  # one copy
                with torch.no_grad():
                    actions = self._check_actions(act_fn(obs_t, generator), T, B)
                obs_steps.append(obs_t)
                act_steps.append(actions)
                act_np = actions.reshape(N, *self._act_shape).cpu().numpy()  # one copy back
                if self._action_scale is not None:
                    scale, offset = self._action_scale
                    act_np = (act_np * scale + offset).astype(act_np.dtype)
                pending = True
                for w, lo, hi in slices:
                    w.send("step", act_np[lo:hi])
                results = [w.recv() for w, _, _ in slices]
                pending = False
                obs = np.concatenate([r[0] for r in results])
                rewards[h] = np.where(alive, np.concatenate([r[1] for r in results]), 0.0)
                if len(results[0]) == 4:  # success on the step an episode ends still counts
                    if succeeded is None:
                        succeeded = np.zeros(N, dtype=bool)
                    succeeded |= alive & np.concatenate([r[3] for r in results])
                alive &= ~np.concatenate([r[2] for r in results])
                if not alive.any():  # all episodes over: the remaining steps stay masked
                    break
        except BaseException:  # includes KeyboardInterrupt while waiting on workers
            if pending and self.num_workers > 1:  # replies out of sync: these workers are done
                self.close()
            raise

        return self._assemble(obs_steps, act_steps, rewards, mask, succeeded, T, B)

    def _check_actions(self, actions: Any, T: int, B: int) -> torch.Tensor:
        if not isinstance(actions, torch.Tensor):
            raise ValueError(f"act_fn must return a torch.Tensor, got {type(actions).__name__}")
        expected = (T, B, *self._act_shape)
        if tuple(actions.shape) != expected:
            raise ValueError(f"act_fn returned shape {tuple(actions.shape)}, expected {expected}")
        return actions.long() if not self._act_shape else actions.float()

    def _assemble(
        self, obs_steps, act_steps, rewards, mask, succeeded, T: int, B: int
    ) -> Episodes:
        H = self.horizon
        if len(obs_steps) < H:  # steps after every episode ended: zeros
            obs_steps += [torch.zeros_like(obs_steps[0])] * (H - len(obs_steps))
            act_steps += [torch.zeros_like(act_steps[0])] * (H - len(act_steps))
        observations, actions = torch.stack(obs_steps), torch.stack(act_steps)
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
            successes=None if succeeded is None
            else torch.from_numpy(succeeded).to(self.device).view(T, B),
        )

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for w in self._workers:
            try:
                w.close()
            except Exception:  # closing must not fail halfway: the other workers still need it
                pass
        self._workers = []
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
