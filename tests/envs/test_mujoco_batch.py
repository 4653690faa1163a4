"""The mujoco.rollout fast path against the gymnasium envs it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from binom_rl.envs.mujoco_batch import MujocoRolloutBatchEnv
from binom_rl.envs.mujoco_tasks import (
    AntDirEnv,
    HalfCheetahDirEnv,
    HalfCheetahVelEnv,
)
from binom_rl.envs.rand_params import HopperRandParamsEnv, Walker2dRandParamsEnv

NUM_ENVS, NUM_STEPS = 3, 50


def _assert_batch_matches_gymnasium(cls: type, nthread: int, **env_kwargs) -> int:
    """Step a batch env and one gymnasium env per task with the same tasks, seeds and
    actions for 50 steps; assert the same obs, rewards and terminations; return the
    number of terminations seen."""
    env = cls(**env_kwargs)
    env.reset(seed=11)
    tasks = env.sample_tasks(NUM_ENVS)
    seeds = [3, 40, 500]
    rng = np.random.default_rng(0)
    low, high = env.action_space.low, env.action_space.high
    actions = rng.uniform(low, high, size=(NUM_STEPS, NUM_ENVS, len(low)))

    batch = env.make_batch_env(tasks, nthread=nthread)
    assert isinstance(batch, MujocoRolloutBatchEnv) and batch.num_envs == NUM_ENVS
    obs = batch.reset(seeds)
    assert obs.dtype == np.float32 and obs.shape == (NUM_ENVS, env.observation_space.shape[0])

    references = []
    for task, seed, batch_obs in zip(tasks, seeds, obs, strict=True):
        ref = cls(**env_kwargs)
        ref.reset_task(task)
        ref_obs, _ = ref.reset(seed=seed)
        np.testing.assert_allclose(batch_obs, ref_obs, rtol=1e-6, atol=1e-6)
        references.append(ref)

    terminations = 0
    for t in range(NUM_STEPS):
        obs, reward, terminated = batch.step(actions[t])
        assert obs.dtype == np.float32 and reward.shape == (NUM_ENVS,)
        assert terminated.dtype == bool
        for i, ref in enumerate(references):
            ref_obs, ref_reward, ref_terminated, _, _ = ref.step(actions[t, i])
            np.testing.assert_allclose(obs[i], ref_obs, rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(reward[i], ref_reward, rtol=1e-6, atol=1e-6)
            assert terminated[i] == ref_terminated, (t, i)
            terminations += int(ref_terminated)
    batch.close()
    return terminations


@pytest.mark.parametrize("nthread", [0, 2])
def test_batch_matches_gymnasium(mujoco_task_env, nthread):
    """Same tasks, seeds and actions: same obs, rewards and terminations for 50 steps."""
    terminations = _assert_batch_matches_gymnasium(mujoco_task_env, nthread)
    if mujoco_task_env in (HopperRandParamsEnv, Walker2dRandParamsEnv):
        assert terminations > 0  # random actions make them fall: termination is exercised


@pytest.mark.parametrize("cls", [AntDirEnv, HalfCheetahVelEnv])
def test_batch_matches_gymnasium_at_another_frame_skip(cls):
    """``frame_skip`` passed as an env kwarg (the Ant configs' rllab dt of 0.02 s) reaches
    the batched path: it steps frame_skip substeps and the velocity divides by that dt."""
    env = cls(frame_skip=2)
    assert env.dt == pytest.approx(2 * env.model.opt.timestep)
    assert env.make_batch_env(env.sample_tasks(1)).frame_skip == 2
    _assert_batch_matches_gymnasium(cls, 0, frame_skip=2)


def test_batch_matches_gymnasium_with_contact_forces():
    """Contact forces in the observation and the contact cost (Ant-v5's, off by default in
    our Ant envs): the batched path computes them as the gymnasium step does."""
    _assert_batch_matches_gymnasium(
        AntDirEnv, 2, frame_skip=2, include_cfrc_ext_in_observation=True, contact_cost_weight=5e-4
    )


def test_batch_matches_gymnasium_with_rllab_contacts_and_pose():
    """``contact_solimp`` and ``initial_pose="standing"`` reach the batched path: its models
    carry the solimp and its resets start from the standing pose, as the gymnasium env's."""
    _assert_batch_matches_gymnasium(
        AntDirEnv, 0, frame_skip=2, contact_solimp=[0.8, 0.8, 0.01], initial_pose="standing"
    )


def test_different_tasks_give_different_rewards_in_batch():
    env = HalfCheetahVelEnv()
    tasks = [{"velocity": 0.0}, {"velocity": 1.0}, {"velocity": 2.0}]
    batch = env.make_batch_env(tasks, nthread=0)
    batch.reset([1, 1, 1])  # same seed: same state
    _, reward, _ = batch.step(np.zeros((3, 6)))
    assert len(set(np.round(reward, 6))) == 3


def test_rand_params_batch_uses_per_env_models():
    env = Walker2dRandParamsEnv()
    base = env.task
    heavy = {k: v.copy() for k, v in base.items()}
    heavy["body_mass"] *= 3.0
    batch = env.make_batch_env([base, heavy], nthread=0)
    batch.reset([0, 0])
    for _ in range(10):
        obs, _, _ = batch.step(np.full((2, 6), 0.5))
    assert np.abs(obs[0] - obs[1]).max() > 1e-2
    # The user's env is not modified by building or stepping the batch.
    np.testing.assert_array_equal(env.model.body_mass, base["body_mass"])


def test_batch_env_bad_input():
    env = HalfCheetahDirEnv()
    with pytest.raises(ValueError, match="tasks"):
        env.make_batch_env([])
    with pytest.raises(ValueError, match="direction"):
        env.make_batch_env([{"direction": 1.0}, {"velocity": 1.0}])
    batch = env.make_batch_env([{"direction": 1.0}, {"direction": -1.0}], nthread=0)
    with pytest.raises(RuntimeError, match="reset"):
        batch.step(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="seeds"):
        batch.reset([0])
    batch.reset([0, 1])
    with pytest.raises(ValueError, match="actions"):
        batch.step(np.zeros((2, 5)))
    batch.close()
    with pytest.raises(RuntimeError, match="closed"):
        batch.step(np.zeros((2, 6)))


def test_default_num_threads(monkeypatch):
    from binom_rl.envs.mujoco_batch import default_num_threads

    monkeypatch.delenv("BINOM_RL_ROLLOUT_THREADS", raising=False)
    assert default_num_threads() >= 1  # the main process: one thread per core
    monkeypatch.setenv("BINOM_RL_ROLLOUT_THREADS", "0")
    assert default_num_threads() == 0
    monkeypatch.setenv("BINOM_RL_ROLLOUT_THREADS", "many")
    with pytest.raises(ValueError, match="BINOM_RL_ROLLOUT_THREADS"):
        default_num_threads()
