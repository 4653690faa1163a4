"""MultiTaskSampler: shapes, masks, hand-computed rewards, determinism across workers, failures."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import binom_rl
from binom_rl.agents.policies import batched_sample, make_policy
from binom_rl.sampler import MultiTaskSampler, episode_seeds
from tests.helpers.episodes import assert_episodes_equal

NAV = "binom_rl/2DNavigation-v0"

# A user's pure-Python env, written as a module workers can import ('module:EnvId' id).
# Episode length = task["end"] (terminates), reward r_t = end + a_t, obs = (t, end, noise)
# with noise ~ N(0, 1) drawn at reset from np_random; stepping after the end raises.
USER_MODULE = "binom_rl_test_user_envs"
USER_ENV_SOURCE = textwrap.dedent("""
    import gymnasium as gym
    import numpy as np


    class EarlyStopEnv(gym.Env):
        def __init__(self):
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
            self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
            self.end, self.t, self.noise = 3, 0, 0.0

        def sample_tasks(self, num_tasks):
            return [{"end": int(e)} for e in self.np_random.integers(1, 12, size=num_tasks)]

        def reset_task(self, task):
            if "end" not in task:
                raise ValueError("task needs an 'end' key")
            self.end = task["end"]

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t, self.noise = 0, self.np_random.normal()
            return self._obs(), {}

        def _obs(self):
            return np.array([self.t, self.end, self.noise], dtype=np.float32)

        def step(self, action):
            if self.t >= self.end:
                raise RuntimeError("stepped after termination")
            self.t += 1
            return self._obs(), float(self.end + action[0]), self.t >= self.end, False, {}


    gym.register("EarlyStop-v0", entry_point=EarlyStopEnv, max_episode_steps=10)
""")


@pytest.fixture
def user_env_id(tmp_path, monkeypatch):
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_ENV_SOURCE)
    # workers get the parent's sys.path; once imported, the module stays cached (and its
    # class stays the registered one) for the later tests
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{USER_MODULE}:EarlyStop-v0"


def gaussian_act(obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return 0.08 * torch.randn(*obs.shape[:2], 2, generator=generator, device=obs.device)


def uniform_act_1d(obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(*obs.shape[:2], 1, generator=generator, device=obs.device) * 2 - 1


def test_navigation_shapes_and_rewards_by_hand():
    with MultiTaskSampler(NAV) as sampler:
        assert sampler.horizon == 100
        tasks = sampler.sample_tasks(3, seed=0)
        ep = sampler.sample(tasks, gaussian_act, batch_size=4, seed=1)
    H, T, B = 100, 3, 4
    assert ep.observations.shape == (H, T, B, 2) and ep.observations.dtype == torch.float32
    assert ep.actions.shape == (H, T, B, 2) and ep.actions.dtype == torch.float32
    for x in (ep.rewards, ep.mask):
        assert x.shape == (H, T, B) and x.dtype == torch.float32
    assert ep.returns.shape == (T, B) and ep.lengths.shape == (T, B)
    assert ep.lengths.dtype == torch.int64 and torch.all(ep.lengths == H)
    assert torch.all(ep.mask == 1)

    # s_0 = 0, s_{h+1} = s_h + clip(a_h), r_h = -||s_{h+1} - goal||
    actions = ep.actions.double().numpy()
    positions = np.cumsum(np.clip(actions, -0.1, 0.1), axis=0)
    goals = np.stack([t["goal"] for t in tasks])[None, :, None, :]
    np.testing.assert_allclose(
        ep.rewards.numpy(), -np.linalg.norm(positions - goals, axis=-1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(ep.observations[1:].numpy(), positions[:-1], atol=1e-6)
    assert torch.all(ep.observations[0] == 0)
    torch.testing.assert_close(ep.returns, ep.rewards.sum(0))


def test_rescale_actions_maps_unit_box_onto_env_bounds():
    def half(obs, generator):
        return torch.full((*obs.shape[:2], 2), 0.5)

    with MultiTaskSampler(NAV, max_episode_steps=3, rescale_actions=True) as sampler:
        tasks = sampler.sample_tasks(2, seed=0)
        scaled = sampler.sample(tasks, half, 2, seed=1)
    with MultiTaskSampler(NAV, max_episode_steps=3) as sampler:
        raw = sampler.sample(tasks, half, 2, seed=1)
    # the policy's 0.5 in [-1, 1] is 0.05 in [-0.1, 0.1]; without rescaling it is clipped to 0.1
    torch.testing.assert_close(
        scaled.observations[1:],
        torch.full((2, 2, 2, 2), 0.05) * torch.arange(1, 3).view(2, 1, 1, 1),
    )
    torch.testing.assert_close(raw.observations[1], torch.full((2, 2, 2), 0.1))
    assert torch.all(scaled.actions == 0.5)  # episodes keep the policy's own actions


def test_rescale_actions_needs_finite_bounds_and_ignores_discrete(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))
    with pytest.raises(ValueError, match="finite action bounds"):
        MultiTaskSampler("binom_rl_test_envs:UnboundedActions-v0", rescale_actions=True)
    with MultiTaskSampler("binom_rl/Bandit-v0", rescale_actions=True) as sampler:
        assert sampler.sample_tasks(1, seed=0)


def test_clip_actions_charges_the_control_cost_on_the_applied_action():
    """HalfCheetahDir, r = d v_x - 0.05 |a|^2: MuJoCo clamps ctrl to [-1, 1] either way, so
    a constant 3 moves the cheetah as a constant 1 does; only the cost differs."""

    def constant(value):
        return lambda obs, generator: torch.full((*obs.shape[:2], 6), value)

    env_id = "binom_rl/HalfCheetahDir-v0"

    def rewards(value, clip):
        with MultiTaskSampler(env_id, max_episode_steps=4, clip_actions=clip) as sampler:
            episodes = sampler.sample([{"direction": 1.0}], constant(value), 2, seed=3)
        return episodes

    at_one, over, clipped = rewards(1.0, False), rewards(3.0, False), rewards(3.0, True)
    torch.testing.assert_close(clipped.rewards, at_one.rewards)
    torch.testing.assert_close(over.rewards, at_one.rewards - 0.05 * 6 * (9 - 1))
    assert torch.all(clipped.actions == 3.0)  # episodes keep the policy's own actions
    torch.testing.assert_close(clipped.observations, at_one.observations)


def test_clip_actions_ignores_discrete_and_infinite_bounds(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))
    with MultiTaskSampler("binom_rl_test_envs:UnboundedActions-v0", clip_actions=True) as s:
        assert s._action_bounds is None
    with MultiTaskSampler("binom_rl/Bandit-v0", clip_actions=True) as sampler:
        assert sampler._action_bounds is None


def test_same_seed_same_episodes_and_seeds_matter():
    with MultiTaskSampler(NAV, max_episode_steps=20) as sampler:
        assert sampler.horizon == 20
        tasks = sampler.sample_tasks(2, seed=5)
        again = sampler.sample_tasks(2, seed=5)
        assert all(np.array_equal(a["goal"], b["goal"]) for a, b in zip(tasks, again, strict=True))
        a = sampler.sample(tasks, gaussian_act, 3, seed=10)
        b = sampler.sample(tasks, gaussian_act, 3, seed=10)
        c = sampler.sample(tasks, gaussian_act, 3, seed=11)
    assert_episodes_equal(a, b)
    assert not torch.equal(a.actions, c.actions)
    assert a.to("cpu").observations.device.type == "cpu"
    seeds = episode_seeds(10, 3, 4)
    assert len(set(seeds)) == 12 and episode_seeds(10, 2, 2) == seeds[:2] + seeds[4:6]


@pytest.mark.parametrize(
    "env_id, num_states", [("binom_rl/Bandit-v0", 1), ("binom_rl/TabularMDP-v0", 10)]
)
def test_discrete_shapes(env_id, num_states):
    def act(obs, generator):
        return torch.randint(5, obs.shape[:2], generator=generator)

    with MultiTaskSampler(env_id) as sampler:
        ep = sampler.sample(sampler.sample_tasks(3, seed=0), act, batch_size=2, seed=0)
    assert ep.observations.shape == (10, 3, 2, num_states)
    assert ep.actions.shape == (10, 3, 2) and ep.actions.dtype == torch.int64
    assert ep.rewards.shape == (10, 3, 2) and torch.all(ep.lengths == 10)
    if num_states > 1:  # one-hot states
        assert torch.all(ep.observations.sum(-1) == 1)
    else:  # Bernoulli rewards
        assert set(ep.rewards.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(ep.returns, ep.rewards.sum(0))


def test_early_termination_is_masked(user_env_id):
    with MultiTaskSampler(user_env_id) as sampler:  # a user's env, in-process
        tasks = sampler.sample_tasks(4, seed=2) + [{"end": 10}, {"end": 14}]
        ep = sampler.sample(tasks, uniform_act_1d, batch_size=3, seed=4)
    H = 10
    ends = torch.tensor([t["end"] for t in tasks])
    assert ends.min() < H < ends.max()  # some episodes end early, some run the full horizon
    lengths = torch.clamp(ends, max=H)[:, None].expand(6, 3)
    assert torch.equal(ep.lengths, lengths)
    steps = torch.arange(H)[:, None, None]
    assert torch.equal(ep.mask, (steps < lengths).float())
    after = ep.mask == 0
    assert torch.all(ep.rewards[after] == 0) and torch.all(ep.actions[after] == 0)
    assert torch.all(ep.observations[after] == 0)
    # inside the episode: r_h = end + a_h, obs_h = (h, end, noise)
    expected = (ends[None, :, None] + ep.actions[..., 0]) * ep.mask
    torch.testing.assert_close(ep.rewards, expected)
    torch.testing.assert_close(ep.returns, ep.rewards.sum(0))
    inside = ep.observations[ep.mask == 1]
    assert torch.equal(inside[:, 0], steps.expand(H, 6, 3)[ep.mask == 1].float())
    noise = ep.observations[0, :, :, 2]
    assert len(noise.unique()) == 18  # one reset seed per episode


SUCCESS_ENV = "binom_rl_test_envs:SuccessPointGoal-v0"


@pytest.fixture
def helper_envs_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))


def test_success_is_any_running_step_and_matches_across_workers(helper_envs_on_path):
    with MultiTaskSampler(SUCCESS_ENV) as local:
        tasks = local.sample_tasks(6, seed=0)
        ep = local.sample(tasks, uniform_act_1d, batch_size=4, seed=3)
    with MultiTaskSampler(SUCCESS_ENV, num_workers=2) as sampler:
        assert_episodes_equal(sampler.sample(tasks, uniform_act_1d, batch_size=4, seed=3), ep)
    # by hand: x_h = 0.1 * sum_{i <= h} clip(a_i); success at step h: |x_h - goal| < 0.05,
    # counted only for the steps h < end the episode runs
    x = 0.1 * np.cumsum(np.clip(ep.actions[..., 0].double().numpy(), -1, 1), axis=0)
    goals = np.array([t["goal"] for t in tasks])[None, :, None]
    ends = np.array([t["end"] for t in tasks])[None, :, None]
    running = np.arange(10)[:, None, None] < ends
    expected = ((np.abs(x - goals) < 0.05) & running).any(axis=0)
    assert ep.successes.dtype == torch.bool and ep.successes.shape == (6, 4)
    assert np.array_equal(ep.successes.numpy(), expected)
    assert 0 < expected.sum() < expected.size  # the check sees both outcomes
    # returns-only envs: no success
    with MultiTaskSampler(NAV, max_episode_steps=3) as nav:
        assert nav.sample(nav.sample_tasks(1, seed=0), gaussian_act, 1, seed=0).successes is None


def test_test_split_uses_sample_test_tasks_where_the_env_has_it(helper_envs_on_path):
    with MultiTaskSampler(SUCCESS_ENV) as sampler:
        train = sampler.sample_tasks(20, seed=0)
        test = sampler.sample_tasks(20, seed=0, split="test")
        assert all(t["goal"] < 0 for t in train) and all(t["goal"] > 0 for t in test)
        assert test == sampler.sample_tasks(20, seed=0, split="test")
        with pytest.raises(ValueError, match="split"):
            sampler.sample_tasks(2, seed=0, split="validation")
    with MultiTaskSampler(NAV) as nav:  # no held-out split: the same distribution
        a, b = nav.sample_tasks(3, seed=4), nav.sample_tasks(3, seed=4, split="test")
        assert all(np.array_equal(x["goal"], y["goal"]) for x, y in zip(a, b, strict=True))


def test_callable_entry_point_env_in_process(user_env_id):
    module = pytest.importorskip(USER_MODULE)
    gym.register("binom_rl_test/Callable-v0", entry_point=module.EarlyStopEnv, max_episode_steps=5)
    try:
        with MultiTaskSampler("binom_rl_test/Callable-v0") as sampler:
            ep = sampler.sample([{"end": 2}, {"end": 7}], uniform_act_1d, 2, seed=0)
        assert ep.lengths.tolist() == [[2, 2], [5, 5]]
    finally:
        del gym.registry["binom_rl_test/Callable-v0"]


def test_validation_errors():
    with pytest.raises(ValueError, match="binom_rl/2DNavigation-v0"):
        MultiTaskSampler("binom_rl/NoSuchEnv-v0")
    with pytest.raises(ValueError, match="sample_tasks"):
        MultiTaskSampler("CartPole-v1")
    with pytest.raises(ValueError, match="num_workers"):
        MultiTaskSampler(NAV, num_workers=0)
    sampler = MultiTaskSampler(NAV, max_episode_steps=3)
    tasks = sampler.sample_tasks(2, seed=0)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(tasks, lambda obs, g: torch.zeros(2, 2), 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(tasks, gaussian_act, 0, seed=0)
    with pytest.raises(RuntimeError, match="goal"):  # in-process env errors are RuntimeErrors too
        sampler.sample([{"goal": np.zeros(3)}], gaussian_act, 2, seed=0)
    sampler.sample(tasks, gaussian_act, 2, seed=0)  # still usable after an env error
    sampler.close()
    sampler.close()
    with pytest.raises(RuntimeError, match="closed"):
        sampler.sample(tasks, gaussian_act, 2, seed=0)


def test_workers_match_in_process_and_worker_error_raises():
    with MultiTaskSampler(NAV, max_episode_steps=30) as local:
        tasks = local.sample_tasks(3, seed=0)
        expected = local.sample(tasks, gaussian_act, batch_size=3, seed=9)
    with MultiTaskSampler(NAV, num_workers=2, max_episode_steps=30) as sampler:
        assert_episodes_equal(sampler.sample(tasks, gaussian_act, batch_size=3, seed=9), expected)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="(?s)worker 1 raised.*ValueError.*goal"):
            sampler.sample(tasks[:1] + [{"goal": np.zeros(3)}], gaussian_act, 2, seed=0)
        assert time.monotonic() - start < 10


def test_user_env_in_workers_and_killed_worker_raises(user_env_id):
    with MultiTaskSampler(user_env_id) as local:
        tasks = local.sample_tasks(4, seed=3)
        expected = local.sample(tasks, uniform_act_1d, batch_size=3, seed=1)
    with MultiTaskSampler(user_env_id, num_workers=2) as sampler:
        assert_episodes_equal(sampler.sample(tasks, uniform_act_1d, batch_size=3, seed=1), expected)
        victim = sampler._workers[1].process

        def killing_act(obs, generator):
            os.kill(victim.pid, signal.SIGKILL)
            return uniform_act_1d(obs, generator)

        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"worker 1 died \(exit code -9\): SIGKILL$"):
            sampler.sample(tasks, killing_act, batch_size=3, seed=1)
        assert time.monotonic() - start < 10
        assert not victim.is_alive()


def test_ray_backend_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as without the extra
    monkeypatch.delitem(sys.modules, "binom_rl.ray_sampler", raising=False)
    monkeypatch.delattr(binom_rl, "ray_sampler", raising=False)  # imported by an earlier test
    with pytest.raises(ValueError, match=r'pip install -e "\.\[ray\]"'):
        MultiTaskSampler(NAV, backend="ray")
    with pytest.raises(ValueError, match="backend must be one of local, ray"):
        MultiTaskSampler(NAV, backend="spark")
    with pytest.raises(ValueError, match="ray_address 'auto' is set but the backend is 'local'"):
        MultiTaskSampler(NAV, ray_address="auto")


def test_process_workers_running_the_policy_match_in_process(user_env_id, monkeypatch):
    """act_in_workers with worker processes: the same episodes as in-process (a task's
    episodes split between the two workers), for an act_fn the workers can unpickle; one
    they cannot (from a module that exists only in this process) is a worker error, not a
    dead worker."""
    parent_only = types.ModuleType("binom_rl_parent_only_module")
    exec("import torch\ndef act(obs, generator):\n    return torch.zeros(*obs.shape[:2], 1)\n",
         parent_only.__dict__)  # fmt: skip
    monkeypatch.setitem(sys.modules, parent_only.__name__, parent_only)
    with MultiTaskSampler(user_env_id) as local:
        tasks = local.sample_tasks(3, seed=3)
        policy = make_policy(local.observation_space, local.action_space, (8,), "tanh")
        phi = {k: v + torch.randn(3, *v.shape) for k, v in policy.init_params(0).items()}
        act = functools.partial(batched_sample, policy, phi)
        expected = local.sample(tasks, act, batch_size=3, seed=1)
    with MultiTaskSampler(user_env_id, num_workers=2, act_in_workers=True) as sampler:
        assert sampler.act_in_workers and sampler.act_device == torch.device("cpu")
        assert_episodes_equal(sampler.sample(tasks, act, batch_size=3, seed=1), expected)
        with pytest.raises(RuntimeError, match="(?s)worker [01] raised.*ModuleNotFoundError"):
            sampler.sample(tasks, parent_only.act, batch_size=3, seed=1)
    with MultiTaskSampler(user_env_id, act_in_workers=True) as in_process:
        assert not in_process.act_in_workers  # one in-process worker is always stepped


def test_unguarded_script_with_workers_names_the_main_guard(tmp_path):
    # workers start by importing the main module; a script that opens a multi-worker
    # sampler at its top level starts workers from inside that import, and they die
    body = textwrap.dedent(f"""
        sampler = MultiTaskSampler({NAV!r}, num_workers=2, max_episode_steps=5)
        tasks = sampler.sample_tasks(2, seed=0)
        sampler.sample(tasks, lambda obs, gen: torch.zeros(*obs.shape[:-1], 2), 1, seed=0)
        print("sampled")
    """)
    head = "import torch\nfrom binom_rl.sampler import MultiTaskSampler\n"
    guarded = head + 'if __name__ == "__main__":\n' + textwrap.indent(body, "    ")

    def run(name: str, text: str) -> subprocess.CompletedProcess:
        (tmp_path / name).write_text(text)
        return subprocess.run(
            [sys.executable, name], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    done = run("unguarded.py", head + body)
    assert done.returncode != 0 and "sampled" not in done.stdout
    assert "died (exit code 1)" in done.stderr, done.stderr[-2000:]
    assert 'if __name__ == "__main__":` guard' in done.stderr
    done = run("guarded.py", guarded)
    assert done.returncode == 0 and "sampled" in done.stdout, done.stderr[-2000:]
