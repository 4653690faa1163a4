"""Sampler throughput benchmark: MultiTaskSampler vs one env x cores, the physics limit and
gymnasium vector envs.

All figures are env steps per second (one env step = ``frame_skip`` physics substeps),
measured in the same process run, with a (64, 64) tanh Gaussian MLP policy choosing
every action (plain torch, one batched forward per time step):

- **sampler**: ``MultiTaskSampler.sample`` with ``num_workers`` processes and, for
  comparison, in-process (``num_workers=1``; the summary line uses the faster one), for
  ``num_tasks x batch_size`` episodes of ``horizon`` steps (steps counted from the
  episode masks). A first ``sample`` call with the same tasks warms up (it builds the
  workers' batch envs, which MAML-RL reuses for the K + 1 sample calls of a
  meta-step); the second one is timed.
- **one env x cores**: one gymnasium env of the family (one task) stepped in a tight loop
  with fixed random actions, resets included, no policy, ``rate x cores``: what perfect
  parallel stepping of that env would reach. The reference for envs stepped in Python
  (Meta-World), where the physics is a small part of a step.
- **physics limit** (envs with a MuJoCo ``model`` and ``frame_skip``): ``mujoco.mj_step``
  on one MjData of the env's model in a tight loop on one thread, ``rate / frame_skip x
  cores``: what perfect parallel stepping with zero overhead (no policy, no observations)
  would reach.
- **gymnasium SyncVectorEnv / AsyncVectorEnv** over the same env id and tasks (a
  subset: ``vec_envs`` envs for ``vec_steps`` steps), same policy in the loop.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import torch
from torch import nn

import binom_rl.envs  # noqa: F401  (registers the binom_rl/ ids)
from binom_rl.sampler import MultiTaskSampler


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class TanhGaussianMLP(nn.Module):
    """``a ~ N(mu(obs), diag(exp(log_std))^2)``, ``mu`` a tanh MLP (hidden sizes given)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: tuple[int, ...] = (64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        last = obs_dim
        for size in hidden_sizes:
            layers += [nn.Linear(last, size), nn.Tanh()]
            last = size
        layers.append(nn.Linear(last, act_dim))
        self.mean = nn.Sequential(*layers)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = self.mean(obs)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + self.log_std.exp() * noise


@dataclass
class Measurement:
    name: str
    env_steps: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.env_steps / self.seconds


def measure_sampler(
    env_id: str,
    policy: TanhGaussianMLP,
    num_tasks: int,
    batch_size: int,
    horizon: int,
    num_workers: int,
    seed: int = 0,
    env_kwargs: dict | None = None,
) -> Measurement:
    """Env steps/s of ``MultiTaskSampler.sample`` (second call; the first warms up)."""
    with MultiTaskSampler(
        env_id, num_workers=num_workers, max_episode_steps=horizon, env_kwargs=env_kwargs
    ) as sampler:
        tasks = sampler.sample_tasks(num_tasks, seed=seed)
        sampler.sample(tasks, policy.act, batch_size, seed=seed)
        start = time.perf_counter()
        episodes = sampler.sample(tasks, policy.act, batch_size, seed=seed + 1)
        seconds = time.perf_counter() - start
    steps = int(episodes.mask.sum().item())
    note = f"{num_tasks} tasks x {batch_size} episodes x {horizon} steps"
    return Measurement(f"MultiTaskSampler (num_workers={num_workers})", steps, seconds, note)


def measure_single_env(
    env_id: str,
    task: dict,
    cores: int,
    horizon: int,
    seconds: float = 1.0,
    env_kwargs: dict | None = None,
) -> Measurement:
    """One env's step rate on ``task`` (fixed random actions, a reset every ``horizon``
    steps, timed too), as env steps/s x ``cores``."""
    env = gym.make(env_id, **(env_kwargs or {})).unwrapped
    env.reset_task(task)
    space = env.action_space
    space.seed(0)
    actions = [space.sample() for _ in range(256)]
    env.reset(seed=0)
    for action in actions[:20]:  # warm caches
        env.step(action)
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        env.reset(seed=steps)
        for h in range(horizon):
            env.step(actions[h % len(actions)])
        steps += horizon
    env.close()
    per_core = steps / elapsed
    note = f"{per_core:,.0f} env-steps/s of one env x {cores}"
    return Measurement("one env x cores", int(round(per_core * cores * elapsed)), elapsed, note)


def has_physics_limit(env_id: str, env_kwargs: dict | None = None) -> bool:
    """Whether the env exposes a MuJoCo ``model`` and ``frame_skip`` to time mj_step on."""
    env = gym.make(env_id, **(env_kwargs or {})).unwrapped
    try:
        return isinstance(getattr(env, "model", None), mujoco.MjModel) and hasattr(
            env, "frame_skip"
        )
    finally:
        env.close()


def measure_physics_limit(env_id: str, cores: int, seconds: float = 1.0) -> Measurement:
    """Raw ``mj_step`` rate on one thread, as env steps/s x ``cores``."""
    env = gym.make(env_id).unwrapped
    model, frame_skip = env.model, int(env.frame_skip)
    data = mujoco.MjData(model)
    data.qpos[:] = env.init_qpos
    data.ctrl[:] = np.random.default_rng(0).uniform(-1.0, 1.0, model.nu)
    mujoco.mj_step(model, data, nstep=1000)  # warm caches
    nstep, total, start = 2000, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        mujoco.mj_step(model, data, nstep=nstep)
        total += nstep
    env.close()
    per_core = total / elapsed / frame_skip
    note = f"{per_core:,.0f} env-steps/s per core (mj_step / frame_skip {frame_skip}) x {cores}"
    return Measurement("physics limit", int(round(per_core * cores * elapsed)), elapsed, note)


def _make_task_env(env_id: str, task: dict, horizon: int, env_kwargs: dict) -> gym.Env:
    env = gym.make(env_id, max_episode_steps=horizon, **env_kwargs)
    env.unwrapped.reset_task(task)
    return env


def measure_vector_env(
    env_id: str,
    policy: TanhGaussianMLP,
    tasks: list[dict],
    num_steps: int,
    asynchronous: bool,
    horizon: int,
    env_kwargs: dict | None = None,
) -> Measurement:
    """Env steps/s of a gymnasium Sync/AsyncVectorEnv (one env per task), policy in the loop."""
    fns = [functools.partial(_make_task_env, env_id, task, horizon, env_kwargs or {})
           for task in tasks]  # fmt: skip
    cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    # SAME_STEP autoreset: no ignored actions or zero-reward steps after an episode ends.
    vec = cls(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    try:
        obs, _ = vec.reset(seed=0)
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(num_steps):
            actions = policy.act(torch.as_tensor(obs, dtype=torch.float32), generator)
            obs, _, _, _, _ = vec.step(actions.numpy())
        seconds = time.perf_counter() - start
    finally:
        vec.close()
    name = "gymnasium AsyncVectorEnv" if asynchronous else "gymnasium SyncVectorEnv"
    return Measurement(name, len(tasks) * num_steps, seconds, f"{len(tasks)} envs x {num_steps}")


def run_benchmark(
    env_id: str = "binom_rl/HalfCheetahVel-v0",
    num_tasks: int = 40,
    batch_size: int = 20,
    horizon: int = 200,
    num_workers: int | None = None,
    vec_envs: int = 20,
    vec_steps: int = 200,
    physics_seconds: float = 2.0,
    extra_in_process: bool = True,
    env_kwargs: dict | None = None,
) -> dict:
    """All measurements of one run; see the module docstring. ``physics`` is None (and
    ``ratio_physics`` nan) for envs without a MuJoCo model to time."""
    torch.manual_seed(0)
    # One intra-op thread: the (64, 64) MLP gains nothing from more at these batch sizes,
    # and extra threads would compete with MuJoCo's rollout pool and the vector envs.
    torch.set_num_threads(1)
    cores = available_cores()
    num_workers = cores if num_workers is None else num_workers
    env_kwargs = dict(env_kwargs or {})
    probe = gym.make(env_id, **env_kwargs)
    policy = TanhGaussianMLP(probe.observation_space.shape[0], probe.action_space.shape[0])
    probe.reset(seed=0)
    vec_tasks = probe.unwrapped.sample_tasks(vec_envs)
    probe.close()

    single = measure_single_env(env_id, vec_tasks[0], cores, horizon, physics_seconds,
                                env_kwargs)  # fmt: skip
    physics = None
    if has_physics_limit(env_id, env_kwargs):
        physics = measure_physics_limit(env_id, cores, physics_seconds)
    measure = functools.partial(measure_sampler, env_id, policy, num_tasks, batch_size, horizon,
                                env_kwargs=env_kwargs)  # fmt: skip
    sampler = measure(num_workers)
    rows = [sampler]
    if extra_in_process and num_workers != 1:
        rows.append(measure(1))
        # The summary reports the sampler's best configuration, as it does for gymnasium.
        sampler = max(rows, key=lambda row: row.rate)
    sync = measure_vector_env(env_id, policy, vec_tasks, vec_steps, False, horizon, env_kwargs)
    asyn = measure_vector_env(env_id, policy, vec_tasks, vec_steps, True, horizon, env_kwargs)
    rows += [single, *([physics] if physics else []), sync, asyn]
    best_vec = max(sync.rate, asyn.rate)
    return {
        "env_id": env_id,
        "env_kwargs": env_kwargs,
        "cores": cores,
        "rows": rows,
        "sampler": sampler,
        "single_env": single,
        "physics": physics,
        "best_vector": best_vec,
        "ratio_single_env": sampler.rate / single.rate,
        "ratio_physics": sampler.rate / physics.rate if physics else float("nan"),
        "ratio_vector": sampler.rate / best_vec,
    }


def summary_line(result: dict) -> str:
    """``sampler: N env-steps/s = Q x (one env x cores)[, R x physics limit], S x best
    gymnasium vector env``.

    N: the sampler's best configuration; Q = N / (one env's rate x cores); R = N / physics
    limit (MuJoCo envs only); S = N / max(Sync, Async).
    """
    physics = ""
    if result["physics"] is not None:
        physics = f"{result['ratio_physics']:.2f} x physics limit, "
    return (
        f"sampler: {result['sampler'].rate:.0f} env-steps/s = {result['ratio_single_env']:.2f} x "
        f"(one env x {result['cores']} cores), {physics}"
        f"{result['ratio_vector']:.2f} x best gymnasium vector env"
    )


def write_markdown(result: dict, path: str | Path) -> None:
    """The measurements as a markdown table, plus the summary line."""
    kwargs = f" {result['env_kwargs']}" if result.get("env_kwargs") else ""
    lines = [
        f"# Sampler benchmark: {result['env_id']}{kwargs}",
        "",
        f"{result['cores']} CPU cores; env steps per second (one env step = frame_skip "
        "physics substeps); a (64, 64) tanh Gaussian MLP chooses every action.",
        "",
        "| what | env-steps/s | x (one env x cores) | x physics limit | setting |",
        "|---|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        single = row.rate / result["single_env"].rate
        physics = "" if result["physics"] is None else f"{row.rate / result['physics'].rate:.2f}"
        lines.append(f"| {row.name} | {row.rate:,.0f} | {single:.2f} | {physics} | {row.note} |")
    lines += [
        "",
        f"Summary (sampler = {result['sampler'].name}):",
        "",
        summary_line(result),
        "",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
