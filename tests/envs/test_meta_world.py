"""Meta-World task distributions: splits, class balance, the batch env against Meta-World's
own envs, success with its scripted policies, horizons past 500, workers, the missing extra."""

from __future__ import annotations

import pickle
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

import binom_rl.envs  # noqa: F401  (registers the ids)
from binom_rl.envs import meta_world
from binom_rl.sampler import MultiTaskSampler

ML1 = "binom_rl/MetaWorldML1-v0"


def test_missing_extra_is_one_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "metaworld", None)  # import metaworld -> ImportError
    with pytest.raises(ValueError, match=r"pip install -e '\.\[metaworld\]'"):
        gym.make(ML1)
    with pytest.raises(ValueError, match="metaworld extra"):
        MultiTaskSampler("binom_rl/MetaWorldML10-v0")


@pytest.fixture(scope="module")
def mw():
    """The metaworld module; every test that takes it skips without the extra."""
    return pytest.importorskip("metaworld")


def _fresh_sawyer(task: dict):
    """Meta-World's own env for ``task``, built directly (no pool, no wrapper)."""
    import metaworld

    env = metaworld.env_dict.ALL_V3_ENVIRONMENTS[task["env_name"]]()
    env.set_task(task["task"])
    return env


def _goal(task: dict) -> bytes:
    return pickle.loads(task["task"].data)["rand_vec"].tobytes()


@pytest.fixture(scope="module")
def reach(mw):
    env = gym.make(ML1, env_name="reach-v3").unwrapped
    yield env
    env.close()


def test_ml1_splits_are_the_benchmarks_train_and_test_goals(reach):
    bench = meta_world.load_benchmark("ML1", "reach-v3", 0)
    reach.reset(seed=3)
    train = reach.sample_tasks(50)
    reach.reset(seed=3)
    assert [t["index"] for t in reach.sample_tasks(50)] == [t["index"] for t in train]
    test = reach.sample_test_tasks(60)
    # 50 goals without replacement, then repeats only once the class has run out
    assert sorted(t["index"] for t in train) == list(range(50))
    assert len({t["index"] for t in test}) == 50
    assert all(t["task"] is bench.train_tasks[t["index"]] for t in train)
    assert all(t["task"] is bench.test_tasks[t["index"]] for t in test)
    assert {t["split"] for t in train} == {"train"} and {t["split"] for t in test} == {"test"}
    # held-out goals: no test goal is a training goal
    assert not {_goal(t) for t in train} & {_goal(t) for t in test}


def test_classes_are_balanced_and_goals_drawn_without_replacement(mw, monkeypatch):
    # a stand-in benchmark of 3 classes x 4 goals: the drawing logic without building one
    names = ["reach-v3", "push-v3", "pick-place-v3"]
    tasks = [mw.Task(env_name=n, data=bytes([i, g])) for i, n in enumerate(names)
             for g in range(4)]  # fmt: skip
    fake = SimpleNamespace(train_tasks=tasks, test_tasks=tasks[:4])
    monkeypatch.setattr(meta_world, "load_benchmark", lambda *args: fake)
    env = gym.make("binom_rl/MetaWorldML10-v0").unwrapped
    try:
        env.np_random = np.random.default_rng(0)  # a reset would set_task the stand-in's bytes
        for n in (1, 2, 3, 6, 7, 12):  # fewer tasks than classes too
            drawn = env.sample_tasks(n)
            counts = [sum(t["env_name"] == name for t in drawn) for name in names]
            assert sorted(counts, reverse=True) == [n // 3 + (i < n % 3) for i in range(3)]
            for name in names:  # at most 4 of a class here: all distinct goals
                indices = [t["index"] for t in drawn if t["env_name"] == name]
                assert len(set(indices)) == len(indices)
                assert all(tasks[i].env_name == name for i in indices)
        assert {t["env_name"] for t in env.sample_test_tasks(5)} == {"reach-v3"}
    finally:
        env.close()


def test_bad_tasks_and_names(mw):
    with pytest.raises(ValueError, match="valid names: .*reach-v3"):
        gym.make(ML1, env_name="reach-v9")
    env = gym.make(ML1).unwrapped
    try:
        with pytest.raises(ValueError, match="keys env_name, split, index, task"):
            env.reset_task({"goal": 1.0})
        with pytest.raises(ValueError, match="Task for 'push-v3'"):
            env.reset_task({"env_name": "push-v3", "split": "train", "index": 0, "task": None})
    finally:
        env.close()


def test_batch_env_matches_metaworld_envs_and_pooled_envs_do_not_leak_state(reach):
    push = gym.make(ML1, env_name="push-v3").unwrapped
    try:
        push.reset(seed=1)
        first, second = push.sample_tasks(3), push.sample_tasks(3)
    finally:
        push.close()
    rng = np.random.default_rng(0)
    for tasks in (first, second):  # the second batch reuses the first one's pooled envs
        batch = meta_world.MetaWorldBatchEnv(tasks)
        fresh = [_fresh_sawyer(t) for t in tasks]
        try:
            obs = batch.reset(seeds=[0, 1, 2])
            expected = np.stack([env.reset()[0] for env in fresh])
            np.testing.assert_array_equal(obs, expected.astype(np.float32))
            for _ in range(25):
                actions = rng.uniform(-1, 1, size=(3, 4)).astype(np.float32)
                obs, reward, terminated, success = batch.step(actions)
                steps = [
                    env.step(a.astype(np.float64)) for env, a in zip(fresh, actions, strict=True)
                ]
                np.testing.assert_array_equal(
                    obs, np.stack([s[0] for s in steps]).astype(np.float32)
                )
                np.testing.assert_array_equal(reward, [s[1] for s in steps])
                np.testing.assert_array_equal(success, [bool(s[4]["success"]) for s in steps])
                assert not terminated.any()
        finally:
            batch.close()
            for env in fresh:
                env.close()


def _target(task: dict) -> np.ndarray:
    env = _fresh_sawyer(task)
    env.reset()
    target = np.array(env._target_pos)
    env.close()
    return target


def _scripted_action(policy, obs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Meta-World's scripted policy, shown the goal that ML observations hide (zeros)."""
    obs = obs.astype(np.float32).astype(np.float64)
    obs[-3:] = target
    return policy.get_action(obs).astype(np.float32)


def _scripted_act(policy_cls, targets: list[np.ndarray]):
    """act_fn of a scripted (deterministic) policy, one goal per task."""
    policy = policy_cls()

    def act(obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        actions = [[_scripted_action(policy, o.numpy(), targets[t]) for o in row]
                   for t, row in enumerate(obs)]  # fmt: skip
        return torch.as_tensor(np.array(actions))

    return act


def _direct_success(task: dict, policy_cls, horizon: int) -> bool:
    """Any-step success of the scripted policy on Meta-World's own env, with the sampler's
    float32 observations and actions."""
    env, policy, target = _fresh_sawyer(task), policy_cls(), _target(task)
    obs, _ = env.reset()
    succeeded = False
    for _ in range(horizon):
        action = _scripted_action(policy, obs, target)
        obs, _, _, _, info = env.step(action.astype(np.float64))
        succeeded |= bool(info["success"])
    env.close()
    return succeeded


def test_sampler_success_matches_metaworld_with_a_scripted_policy_and_workers(mw):
    from metaworld.policies import SawyerReachV3Policy

    horizon = 40
    with MultiTaskSampler(ML1, max_episode_steps=horizon) as local:
        tasks = local.sample_tasks(4, seed=0)
        targets = [_target(t) for t in tasks]
        scripted = local.sample(tasks, _scripted_act(SawyerReachV3Policy, targets), 1, seed=0)
        random = local.sample(tasks, lambda o, g: torch.zeros(*o.shape[:2], 4), 2, seed=0)
    expected = [_direct_success(t, SawyerReachV3Policy, horizon) for t in tasks]
    assert scripted.successes[:, 0].tolist() == expected
    assert any(expected)  # the check sees a success
    assert not random.successes.any()  # standing still reaches no goal
    # workers build their envs from the picklable tasks: the same episodes
    act = _scripted_act(SawyerReachV3Policy, targets)
    with MultiTaskSampler(ML1, num_workers=2, max_episode_steps=horizon) as sampler:
        again = sampler.sample(tasks, act, 1, seed=0)
    torch.testing.assert_close(again.observations, scripted.observations, rtol=0, atol=0)
    assert torch.equal(again.successes, scripted.successes)


def test_horizon_past_metaworlds_500_steps(reach):
    with MultiTaskSampler(ML1, max_episode_steps=503) as sampler:
        assert sampler.horizon == 503
        ep = sampler.sample(
            sampler.sample_tasks(1, seed=0), lambda o, g: torch.zeros(*o.shape[:2], 4), 1, seed=0
        )
    assert ep.lengths.tolist() == [[503]]
    assert gym.spec(ML1).max_episode_steps == 500


def test_env_checkers(reach):
    from gymnasium.utils.env_checker import check_env

    with pytest.warns(UserWarning, match="maximum and minimum values are equal"):
        check_env(reach, skip_render_check=True)  # the hidden goal's 3 zeros, by design


def test_ml10_test_split_is_the_held_out_classes(mw):
    env = gym.make("binom_rl/MetaWorldML10-v0").unwrapped
    try:
        env.reset(seed=0)
        train, test = env.sample_tasks(10), env.sample_test_tasks(5)
        train_names = set(mw.env_dict.ML10_V3["train"])
        test_names = set(mw.env_dict.ML10_V3["test"])
        assert {t["env_name"] for t in train} == train_names  # one task per class
        assert {t["env_name"] for t in test} == test_names
        batch = meta_world.MetaWorldBatchEnv(test)  # held-out classes step in the same env
        try:
            obs = batch.reset(seeds=range(5))
            obs, reward, _, success = batch.step(np.zeros((5, 4), dtype=np.float32))
            assert obs.shape == (5, 39) and np.isfinite(reward).all() and success.dtype == bool
        finally:
            batch.close()
    finally:
        env.close()
