"""The Ray backend of the sampler against the local one, and what a cluster projection needs.

``python scripts/benchmark_sampler.py --ray`` runs :func:`run_ray_benchmark` after the local
benchmark. All rows are env steps per second of ``MultiTaskSampler.sample`` (the median of
``repeats`` calls after a first one with the same tasks, which builds the workers'
envs), with the same
(64, 64) tanh Gaussian MLP choosing every action, in one process run:

- local, in-process; local, ``num_workers`` processes driven step by step (the local
  default) and running the policy themselves (``act_in_workers``);
- Ray, ``num_workers`` actors running the policy themselves (the Ray default: one round
  trip per actor per sample call) and driven step by step (one round trip per env step);

for a MuJoCo task distribution (default HalfCheetahVel, 40 x 20 x 200) and for a slow
pure-Python env (:class:`SlowPointEnv`, a fixed amount of Python work per step, as
Meta-World's envs cost about 1 ms a step). Every backend must return the same episodes
as the first row (checked; the benchmark fails otherwise).

For the projection in docs/distributed.md it also measures Ray's round trip to the
actors (an empty call, and one carrying a step's actions) and the cost of the policy's
forward pass over the whole T x B batch, which every actor makes once per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from benchmarks.sampler_bench import Measurement, TanhGaussianMLP
from binom_rl.runtime import available_cores
from binom_rl.sampler import Episodes, MultiTaskSampler

SLOW_ENV_ID = "binom_rl_bench/SlowPoint-v0"


class SlowPointEnv(gym.Env):
    """A point on a line (obs (x, goal), action in [-1, 1] moves it by 0.1 a), reward
    -|x - goal|, goal ~ U[-1, 1] per task; every step also spins in pure Python for
    ``step_ms`` milliseconds: a stand-in for an env whose physics is Python code."""

    def __init__(self, step_ms: float = 1.0):
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.step_s, self._x, self._goal = step_ms / 1e3, 0.0, 0.0

    def sample_tasks(self, num_tasks: int) -> list[dict]:
        return [{"goal": float(g)} for g in self.np_random.uniform(-1.0, 1.0, size=num_tasks)]

    def reset_task(self, task: dict) -> None:
        self._goal = float(task["goal"])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._x = float(self.np_random.uniform(-0.1, 0.1))
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return np.array([self._x, self._goal], dtype=np.float32)

    def step(self, action):
        end = time.perf_counter() + self.step_s
        while time.perf_counter() < end:  # busy: the work occupies a core, as physics does
            pass
        self._x += 0.1 * float(np.clip(action[0], -1.0, 1.0))
        return self._obs(), -abs(self._x - self._goal), False, False, {}


if SLOW_ENV_ID not in gym.registry:
    gym.register(SLOW_ENV_ID, entry_point=SlowPointEnv, max_episode_steps=100)


@dataclass
class Workload:
    """One env id at one size, measured with every backend."""

    env_id: str
    num_tasks: int
    batch_size: int
    horizon: int
    env_kwargs: dict = field(default_factory=dict)

    @property
    def note(self) -> str:
        return f"{self.num_tasks} tasks x {self.batch_size} episodes x {self.horizon} steps"


BACKENDS = (  # (label, MultiTaskSampler options; num_workers filled in)
    ("local, in-process", {"backend": "local", "num_workers": 1}),
    ("local, processes stepped by the sampler", {"backend": "local"}),
    ("local, processes running the policy", {"backend": "local", "act_in_workers": True}),
    ("ray, actors running the policy (default)", {"backend": "ray"}),
    ("ray, actors stepped by the sampler", {"backend": "ray", "act_in_workers": False}),
)


def _timed_sample(
    workload: Workload, policy: TanhGaussianMLP, options: dict, repeats: int
) -> tuple[float, Episodes]:
    """(median seconds of ``repeats`` sample calls after a first one, the last episodes)."""
    with MultiTaskSampler(
        workload.env_id,
        max_episode_steps=workload.horizon,
        env_kwargs=workload.env_kwargs,
        **options,
    ) as sampler:
        tasks = sampler.sample_tasks(workload.num_tasks, seed=0)
        sampler.sample(tasks, policy.act, workload.batch_size, seed=0)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            episodes = sampler.sample(tasks, policy.act, workload.batch_size, seed=1)
            times.append(time.perf_counter() - start)
        return float(np.median(times)), episodes


def _same_episodes(a: Episodes, b: Episodes) -> bool:
    """Every field equal (``successes`` is None for envs that do not report success)."""

    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return x is y is None or (x is not None and y is not None and torch.equal(x, y))

    return all(same(getattr(a, name), getattr(b, name)) for name in vars(a))


def measure_backends(workload: Workload, num_workers: int, repeats: int = 2) -> list[Measurement]:
    """One row per backend (see the module docstring); RuntimeError if one of them does
    not return the first row's episodes."""
    probe = gym.make(workload.env_id, **workload.env_kwargs)
    policy = TanhGaussianMLP(probe.observation_space.shape[0], probe.action_space.shape[0])
    probe.close()
    rows, reference = [], None
    for label, options in BACKENDS:
        options = {"num_workers": num_workers, **options}
        seconds, episodes = _timed_sample(workload, policy, options, repeats)
        if reference is None:
            reference = episodes
        elif not _same_episodes(episodes, reference):
            raise RuntimeError(f"{label} sampled other episodes than {BACKENDS[0][0]}")
        workers = options["num_workers"]
        name = f"{label} ({workers} worker{'s' if workers > 1 else ''})"
        rows.append(Measurement(name, int(episodes.mask.sum()), seconds, workload.note))
    return rows


class _Echo:
    def echo(self, x=None):
        return x


def _round_trip_s(actors: list, arg, repeats: int) -> float:
    import ray

    ray.get([a.echo.remote(arg) for a in actors])
    start = time.perf_counter()
    for _ in range(repeats):
        ray.get([a.echo.remote(arg) for a in actors])
    return (time.perf_counter() - start) / repeats


def measure_ray_round_trips(
    num_workers: int,
    act_dim: int,
    num_envs: int,
    repeats: int = 200,
    actor_counts: tuple[int, ...] = (1, 2, 4, 8),
) -> dict:
    """Seconds per Ray round trip to ``num_workers`` actors at once: an empty call, and a
    call carrying (and returning) one step's actions for num_envs / num_workers envs each;
    and an empty call to each of ``actor_counts`` actors (which reserve no CPU, so that
    more actors than cores fit), for how the cost grows with the number of actors."""
    import ray

    echo = ray.remote(_Echo)
    actors = [echo.options(num_cpus=1).remote() for _ in range(num_workers)]
    payload = np.zeros((max(num_envs // num_workers, 1), act_dim), dtype=np.float32)
    result: dict = {
        "empty_call_s": _round_trip_s(actors, None, repeats),
        "step_call_s": _round_trip_s(actors, payload, repeats),
    }
    for actor in actors:
        ray.kill(actor)
    free = [echo.options(num_cpus=0).remote() for _ in range(max(actor_counts))]
    ray.get([a.echo.remote() for a in free])  # all started: none is still importing
    result["empty_call_s_by_actors"] = {
        n: _round_trip_s(free[:n], None, repeats) for n in actor_counts
    }
    for actor in free:
        ray.kill(actor)
    return result


def measure_policy_forward(obs_dim: int, act_dim: int, num_envs: int, repeats: int = 200) -> float:
    """Seconds per action draw of the benchmark policy for ``num_envs`` observations."""
    policy = TanhGaussianMLP(obs_dim, act_dim)
    obs, generator = torch.zeros(num_envs, obs_dim), torch.Generator().manual_seed(0)
    policy.act(obs, generator)
    start = time.perf_counter()
    for _ in range(repeats):
        policy.act(obs, generator)
    return (time.perf_counter() - start) / repeats


def run_ray_benchmark(
    env_id: str = "binom_rl/HalfCheetahVel-v0",
    num_tasks: int = 40,
    batch_size: int = 20,
    horizon: int = 200,
    num_workers: int | None = None,
    slow: Workload | None = None,
    repeats: int = 2,
    actor_counts: tuple[int, ...] = (1, 2, 4, 8),
) -> dict:
    """Both workloads with every backend, the round trips (to ``actor_counts`` actors too)
    and the policy forward; one local Ray instance (``num_workers`` CPUs) for the run."""
    import ray

    torch.set_num_threads(1)
    num_workers = available_cores() if num_workers is None else num_workers
    main = Workload(env_id, num_tasks, batch_size, horizon)
    slow = slow or Workload(SLOW_ENV_ID, 10, 4, 100, {"step_ms": 1.0})
    probe = gym.make(env_id)
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    from binom_rl import ray_sampler

    ray.init(address="local", num_cpus=num_workers, include_dashboard=False, logging_level="ERROR")
    # the samplers of the rows share one set of actors: the rows time sampling, and the
    # actors' start is reported on its own
    ray_sampler.reuse_actors = True
    try:
        started = time.perf_counter()
        with MultiTaskSampler(env_id, backend="ray", num_workers=num_workers):
            actors_start_s = time.perf_counter() - started
        workloads = {w.env_id: (w, measure_backends(w, num_workers, repeats)) for w in (main, slow)}
        ray_sampler.release_idle_actors()  # their CPUs go to the round-trip actors
        result = {
            "cores": available_cores(),
            "num_workers": num_workers,
            "workloads": workloads,
            "round_trips": measure_ray_round_trips(
                num_workers, act_dim, num_tasks * batch_size, actor_counts=actor_counts
            ),
            "policy_forward_s": measure_policy_forward(obs_dim, act_dim, num_tasks * batch_size),
            "actors_start_s": actors_start_s,
        }
    finally:
        ray_sampler.reuse_actors = False
        ray_sampler.release_idle_actors()
        ray.shutdown()
    return result


def overhead_ratios(rows: list[Measurement]) -> dict[str, float]:
    """Ray's default (rows in BACKENDS order) against the fastest local row and against
    the local default (processes stepped by the sampler)."""
    ray_rate = rows[3].rate
    return {
        "vs_best_local": ray_rate / max(row.rate for row in rows[:3]),
        "vs_local_default": ray_rate / rows[1].rate,
    }


def summary_lines(result: dict) -> list[str]:
    lines = []
    for env_id, (_, rows) in result["workloads"].items():
        ratios = overhead_ratios(rows)
        lines.append(
            f"ray sampler on {env_id}: {ratios['vs_best_local']:.2f} x the fastest "
            f"local configuration, {ratios['vs_local_default']:.2f} x local processes "
            "stepped by the sampler"
        )
    trips = result["round_trips"]
    lines.append(
        f"ray round trip to {result['num_workers']} actors: "
        f"{trips['empty_call_s'] * 1e3:.2f} ms empty, "
        f"{trips['step_call_s'] * 1e3:.2f} ms with a step's actions; policy forward "
        f"over the whole batch {result['policy_forward_s'] * 1e3:.2f} ms"
    )
    by_actors = ", ".join(f"{n}: {s * 1e3:.2f}" for n, s in trips["empty_call_s_by_actors"].items())
    lines.append(f"ray empty round trip by number of actors, ms: {by_actors}")
    return lines


def markdown(result: dict) -> str:
    """The Ray section of docs/benchmark_sampler.md."""
    lines = [
        "## Ray backend",
        "",
        f"{result['cores']} CPU cores, {result['num_workers']} workers (processes or Ray "
        "actors, one CPU each), one local Ray instance; every row sampled the same episodes "
        f"as the first row of its table. Starting {result['num_workers']} actors took "
        f"{result['actors_start_s']:.1f} s (once per run).",
        "",
    ]
    for env_id, (workload, rows) in result["workloads"].items():
        lines += [
            f"### {env_id}, {workload.note}",
            "",
            "| backend | env-steps/s | x first row |",
            "|---|---:|---:|",
        ]
        for row in rows:
            lines.append(f"| {row.name} | {row.rate:,.0f} | {row.rate / rows[0].rate:.2f} |")
        lines.append("")
    lines += [f"- {line}" for line in summary_lines(result)] + [""]
    return "\n".join(lines)


def append_markdown(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.write_text(path.read_text().rstrip("\n") + "\n\n" + markdown(result))
