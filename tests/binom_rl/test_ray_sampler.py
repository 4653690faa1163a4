"""The Ray backend of MultiTaskSampler: the same episodes as the local sampler for every
registered task distribution and several actor counts, one round trip per actor per
sample call, and its failures (an env that raises, an actor that is killed, an env module
the actors cannot import, too few CPUs, an address that does not answer)."""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import socket
import sys
import threading
import time
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from binom_rl import ray_sampler  # noqa: E402  (needs ray)
from binom_rl.agents.policies import batched_sample, make_policy  # noqa: E402
from binom_rl.envs import registered_ids  # noqa: E402
from binom_rl.sampler import MultiTaskSampler  # noqa: E402
from tests.helpers.episodes import assert_episodes_equal  # noqa: E402

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
NAV = "binom_rl/2DNavigation-v0"
COUNTDOWN = "binom_rl_test_envs:Countdown-v0"  # a user's module: episodes end early


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray for the module; samplers find it connected and leave it running."""
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR")
    ray_sampler.reuse_actors = True  # an actor takes seconds to start on a busy machine
    yield
    ray_sampler.reuse_actors = False
    ray_sampler.release_idle_actors()
    ray.shutdown()


@pytest.fixture
def helpers(monkeypatch):
    # the actors get the driver's sys.path, so they import the user's module too
    monkeypatch.syspath_prepend(str(HELPERS))


def policy_act(sampler: MultiTaskSampler, num_tasks: int, seed: int = 0):
    """A (16,) tanh MLP policy with different parameters per task, as the meta-learner
    samples with: actions depend on the observation, the task and the generator."""
    policy = make_policy(sampler.observation_space, sampler.action_space, (16,), "tanh")
    generator = torch.Generator().manual_seed(seed)
    phi = {
        k: v + 0.5 * torch.randn(num_tasks, *v.shape, generator=generator)
        for k, v in policy.init_params(seed).items()
    }
    return functools.partial(batched_sample, policy, phi)


def zero_act(obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.zeros(*obs.shape[:2], 1)


NO_METAWORLD = pytest.mark.skipif(
    importlib.util.find_spec("metaworld") is None, reason="needs the metaworld extra"
)
CASES = [
    pytest.param(env_id, 2, True, marks=[NO_METAWORLD] if "MetaWorld" in env_id else [])
    for env_id in registered_ids()
] + [
    (NAV, 1, True),
    (NAV, 3, True),
    (COUNTDOWN, 2, True),
    (COUNTDOWN, 3, True),
    (COUNTDOWN, 2, False),  # the driver runs the policy, one round trip per env step
]


@pytest.mark.parametrize("env_id,num_workers,act_in_workers", CASES)
def test_ray_gives_the_local_episodes(helpers, env_id, num_workers, act_in_workers):
    """3 tasks x 3 episodes: 2 or 3 actors split a task's episodes between them."""
    options = {
        "max_episode_steps": 6 if env_id != COUNTDOWN else None,
        "rescale_actions": True,
        "clip_actions": True,
    }
    with MultiTaskSampler(env_id, **options) as local:
        tasks = local.sample_tasks(3, seed=1)
        act = policy_act(local, 3)
        expected = [local.sample(tasks, act, 3, seed=s) for s in (2, 3)]
    with MultiTaskSampler(
        env_id, backend="ray", num_workers=num_workers, act_in_workers=act_in_workers, **options
    ) as remote:
        assert remote.act_in_workers is act_in_workers
        for s, episodes in zip((2, 3), expected, strict=True):
            assert_episodes_equal(remote.sample(tasks, act, 3, seed=s), episodes)
    if env_id == COUNTDOWN:  # episodes of both kinds: ended early and cut at the horizon
        assert 0 < (expected[0].lengths < 10).sum() < 9


def test_a_sample_call_is_one_round_trip_per_actor(monkeypatch):
    calls = []
    send = ray_sampler.RayWorker.send
    monkeypatch.setattr(
        ray_sampler.RayWorker,
        "send",
        lambda self, cmd, *args: calls.append(cmd) or send(self, cmd, *args),
    )
    with MultiTaskSampler(NAV, backend="ray", num_workers=2, max_episode_steps=20) as sampler:
        tasks = sampler.sample_tasks(2, seed=0)
        sampler.sample(tasks, policy_act(sampler, 2), 2, seed=0)
    assert calls == ["rollout", "rollout"]


def test_closed_samplers_leave_their_actors_to_the_next():
    with MultiTaskSampler(NAV, backend="ray", num_workers=2, max_episode_steps=3) as first:
        pids = {w.pid for w in first._workers}
    with MultiTaskSampler(NAV, backend="ray", num_workers=2, max_episode_steps=3) as second:
        assert {w.pid for w in second._workers} == pids
        tasks = second.sample_tasks(2, seed=0)
        assert second.sample(tasks, policy_act(second, 2), 2, seed=0).lengths.min() == 3


def test_by_default_a_closed_sampler_ends_its_actors(monkeypatch):
    monkeypatch.setattr(ray_sampler, "reuse_actors", False)
    with MultiTaskSampler(NAV, backend="ray", num_workers=1, max_episode_steps=3) as sampler:
        pid = sampler._workers[0].pid
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


def test_env_error_in_an_actor_raises_and_closes_the_sampler():
    sampler = MultiTaskSampler(NAV, backend="ray", num_workers=2, max_episode_steps=5)
    tasks = sampler.sample_tasks(1, seed=0) + [{"goal": np.zeros(3)}]  # a bad goal shape
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)worker 1 raised.*goal"):
        sampler.sample(tasks, policy_act(sampler, 2), 2, seed=0)
    assert time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match="closed"):
        sampler.sample(tasks[:1], policy_act(sampler, 1), 2, seed=0)


def test_killed_actor_is_one_error_within_seconds(helpers):
    """Actor 1 is killed 0.5 s into a sample call whose rollouts take 2 s: the call fails
    naming the dead worker, well before the other actor is done, and a new sampler works."""
    tasks = [{"goal": 0.0, "steps": 10}] * 2
    options = {"backend": "ray", "num_workers": 2, "env_kwargs": {"delay": 0.1}}
    with MultiTaskSampler(COUNTDOWN, **options) as sampler:
        victim = sampler._workers[1].pid
        timer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
        start = time.monotonic()
        timer.start()
        with pytest.raises(RuntimeError, match="worker 1 \\(a Ray actor\\) died"):
            sampler.sample(tasks, zero_act, batch_size=2, seed=0)
        elapsed = time.monotonic() - start
        timer.join()
        print(f"killed actor reported {elapsed - 0.5:.2f} s after the kill")
        assert elapsed < 10, elapsed
        with pytest.raises(RuntimeError, match="closed"):
            sampler.sample(tasks, zero_act, batch_size=2, seed=0)
    with MultiTaskSampler(COUNTDOWN, **{**options, "num_workers": 1}) as sampler:
        assert sampler._workers[0].pid != victim
        assert sampler.sample(tasks, zero_act, batch_size=1, seed=0).lengths.tolist() == [[10]] * 2


def test_env_module_the_actors_cannot_import_is_a_value_error(monkeypatch):
    module = types.ModuleType("binom_rl_driver_only_envs")  # exists in this process only
    sys.path.insert(0, str(HELPERS))
    try:
        from binom_rl_test_envs import PointGoalEnv
    finally:
        sys.path.remove(str(HELPERS))
    module.DriverOnlyEnv = type("DriverOnlyEnv", (PointGoalEnv,), {"__module__": module.__name__})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    gym.register(
        "binom_rl_test/DriverOnly-v0", entry_point=module.DriverOnlyEnv, max_episode_steps=5
    )
    try:
        with pytest.raises(
            ValueError,
            match="cannot load env binom_rl_test/DriverOnly-v0.*binom_rl_driver_only_envs",
        ):
            MultiTaskSampler("binom_rl_test/DriverOnly-v0", backend="ray", num_workers=1)
    finally:
        del gym.registry["binom_rl_test/DriverOnly-v0"]


def test_more_actors_than_cpus_is_refused_before_starting_any():
    with pytest.raises(
        ValueError, match="num_workers 50 Ray actors need 50 CPUs, the Ray cluster has 3"
    ):
        MultiTaskSampler(NAV, backend="ray", num_workers=50)
    assert ray_sampler._state["users"] == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_fast(monkeypatch):
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        ray_sampler._check_reachable(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what 'auto' honours first
    with pytest.raises(ValueError, match=rf"found by 'auto': [^)]*:{port}\)"):
        ray_sampler._check_reachable("auto")
    assert time.monotonic() - start < 2 * ray_sampler.REACH_TIMEOUT_S
    with pytest.raises(ValueError, match="'auto', 'host:port' or 'local'"):
        ray_sampler._check_reachable("no-port-here")


def test_other_ray_failures_are_one_line_naming_the_worker():
    message = ray_sampler._failure_message(3, ray.exceptions.RaySystemError("lost\ndetails"))
    assert message.startswith("sampler worker 3 (a Ray actor) failed (RaySystemError: ")
    assert "lost" in message and "details" not in message and "\n" not in message
    assert "--resume continues" in message


def test_join_error_explains_token_authentication(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    message = ray_sampler._join_error("10.0.0.1:6379", ConnectionError("Failed to connect"))
    assert "Failed to connect" in message and "RAY_AUTH_MODE=token" in message
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "RAY_AUTH_MODE" not in ray_sampler._join_error("10.0.0.1:6379", ConnectionError("x"))
