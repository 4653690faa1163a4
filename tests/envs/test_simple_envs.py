"""2D navigation, bandit and tabular MDP: task protocol, env checkers, batch fast paths."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import binom_rl.envs
from binom_rl.envs.batch import GymBatchEnv, make_batch_env

SIMPLE_IDS = ["binom_rl/2DNavigation-v0", "binom_rl/Bandit-v0", "binom_rl/TabularMDP-v0"]


def test_all_ids_registered_with_horizons():
    expected = {
        "binom_rl/2DNavigation-v0": 100,
        "binom_rl/HalfCheetahVel-v0": 200,
        "binom_rl/HalfCheetahDir-v0": 200,
        "binom_rl/AntVel-v0": 200,
        "binom_rl/AntDir-v0": 200,
        "binom_rl/AntGoal-v0": 200,
        "binom_rl/HopperRandParams-v0": 200,
        "binom_rl/Walker2dRandParams-v0": 200,
        "binom_rl/Bandit-v0": 10,
        "binom_rl/TabularMDP-v0": 10,
        "binom_rl/MetaWorldML1-v0": 500,
        "binom_rl/MetaWorldML10-v0": 500,
        "binom_rl/MetaWorldML45-v0": 500,
    }
    assert binom_rl.envs.registered_ids() == sorted(expected)
    for env_id, horizon in expected.items():
        assert gym.spec(env_id).max_episode_steps == horizon
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # re-registering would warn
        binom_rl.envs._register_all()


@pytest.mark.filterwarnings("ignore:.*infinity:UserWarning")  # nav's unbounded plane, by spec
@pytest.mark.parametrize("env_id", SIMPLE_IDS)
def test_env_checkers(env_id):
    env = gym.make(env_id).unwrapped
    check_env(env, skip_render_check=True)
    with warnings.catch_warnings():
        # SB3 advises a [-1, 1] action box; 2D navigation keeps the MAML-RL [-0.1, 0.1] box
        warnings.simplefilter("ignore", UserWarning)
        sb3_check_env(env)
    env.reset_task(env.sample_tasks(1)[0])
    check_env(env, skip_render_check=True)


@pytest.mark.parametrize("env_id", SIMPLE_IDS)
def test_sample_tasks_reproducible_and_validated(env_id):
    env = gym.make(env_id)
    env.reset(seed=7)
    a = env.unwrapped.sample_tasks(3)
    env.reset(seed=7)
    b = env.unwrapped.sample_tasks(3)
    c = env.unwrapped.sample_tasks(3)
    for ta, tb in zip(a, b, strict=True):
        assert ta.keys() == tb.keys()
        assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    key = next(iter(a[0]))
    assert not np.array_equal(b[0][key], c[0][key])
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_tasks"):
            env.unwrapped.sample_tasks(bad)
    with pytest.raises(ValueError, match=key):
        env.unwrapped.reset_task({})


def test_malformed_tasks_name_the_problem():
    nav = gym.make("binom_rl/2DNavigation-v0").unwrapped
    with pytest.raises(ValueError, match="goal"):
        nav.reset_task({"goal": np.zeros(3)})
    bandit = gym.make("binom_rl/Bandit-v0").unwrapped
    with pytest.raises(ValueError, match="probs"):
        bandit.reset_task({"probs": np.full(5, 1.5)})
    mdp = gym.make("binom_rl/TabularMDP-v0").unwrapped
    task = mdp.sample_tasks(1)[0]
    with pytest.raises(ValueError, match="rewards"):
        mdp.reset_task({"transitions": task["transitions"]})
    with pytest.raises(ValueError, match="transitions"):
        mdp.reset_task({"transitions": task["transitions"] * 2, "rewards": task["rewards"]})


def test_navigation_dynamics_and_reward_by_hand():
    env = gym.make("binom_rl/2DNavigation-v0")
    env.unwrapped.reset_task({"goal": np.array([0.3, -0.2])})
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and np.array_equal(obs, [0.0, 0.0])
    obs, reward, terminated, truncated, _ = env.step(np.array([0.5, -0.05], dtype=np.float32))
    assert np.allclose(obs, [0.1, -0.05])  # first coordinate clipped to 0.1
    assert reward == pytest.approx(-np.hypot(0.1 - 0.3, -0.05 + 0.2))
    assert not terminated and not truncated
    for _ in range(99):
        *_, terminated, truncated, _ = env.step(np.zeros(2, dtype=np.float32))
    assert truncated and not terminated  # horizon 100 via TimeLimit


@pytest.mark.parametrize("env_id", SIMPLE_IDS)
def test_rewards_differ_across_tasks(env_id):
    env = gym.make(env_id)
    env.reset(seed=1)
    tasks = env.unwrapped.sample_tasks(2)
    action = env.action_space.sample() if env_id.endswith("Navigation-v0") else 0
    means = []
    for task in tasks:
        env.unwrapped.reset_task(task)
        total = 0.0
        for i in range(200):  # average the bandit's Bernoulli rewards; first step only
            env.reset(seed=i)
            total += env.step(action)[1]
        means.append(total / 200)
    assert abs(means[0] - means[1]) > 1e-3


@pytest.mark.parametrize("env_id", SIMPLE_IDS)
def test_fast_batch_path_matches_gym_envs(env_id):
    env = gym.make(env_id)
    env.reset(seed=3)
    tasks = env.unwrapped.sample_tasks(5)
    fast, slow = make_batch_env(env_id, tasks), GymBatchEnv(env_id, tasks)
    assert not isinstance(fast, GymBatchEnv)  # these envs bring their own batch env
    seeds = [11, 12, 13, 14, 15]
    obs_fast, obs_slow = fast.reset(seeds), slow.reset(seeds)
    assert obs_fast.dtype == np.float32 and obs_fast.shape == (5, *env.observation_space.shape)
    np.testing.assert_array_equal(obs_fast, obs_slow)
    env.action_space.seed(0)
    for _ in range(12):
        actions = np.stack([env.action_space.sample() for _ in range(5)])
        if env_id.endswith("Navigation-v0"):
            actions = actions * 1.5  # some actions outside the box exercise the clipping
        out_fast, out_slow = fast.step(actions), slow.step(actions)
        for a, b in zip(out_fast, out_slow, strict=True):
            np.testing.assert_array_equal(a, b)


def test_batch_env_reset_matches_single_env_after_reset_task():
    env = gym.make("binom_rl/TabularMDP-v0")
    env.reset(seed=0)
    tasks = env.unwrapped.sample_tasks(2)
    batch = make_batch_env("binom_rl/TabularMDP-v0", tasks)
    batch.reset([5, 6])
    rewards = batch.step(np.array([2, 3]))[1]
    for i, (task, seed, action) in enumerate(zip(tasks, [5, 6], [2, 3], strict=True)):
        env.unwrapped.reset_task(task)
        obs, _ = env.reset(seed=seed)
        assert obs[0] == 1.0 and obs.sum() == 1.0  # start state 0
        assert env.step(action)[1] == rewards[i] == task["rewards"][0, action]
