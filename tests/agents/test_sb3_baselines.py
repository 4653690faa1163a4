"""SB3 baselines: policy conversion (same action distribution as SB3), task wrappers, oracle."""

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from binom_rl.agents.evaluation import evaluate_params
from binom_rl.agents.policies import GaussianMLPPolicy
from binom_rl.agents.sb3_baselines import (
    evaluate_oracle,
    make_baseline_env,
    policy_for,
    sb3_policy_kwargs,
    sb3_to_params,
    task_features,
    train_ppo,
)
from binom_rl.config import Config

NAV = {"env-name": "binom_rl/2DNavigation-v0", "max-episode-steps": 10, "fast-batch-size": 4}


def action_distribution(policy, params, obs):
    """(mean, std) of a Gaussian policy or (logits,) of a categorical one."""
    if isinstance(policy, GaussianMLPPolicy):
        mean, std = policy.mean_and_std(params, obs)
        return mean, std.expand_as(mean)
    return (policy.logits(params, obs),)


def _ppo(cfg: Config, append_task: bool = False) -> PPO:
    env = make_baseline_env(cfg, append_task=append_task)
    return PPO("MlpPolicy", env, n_steps=64, batch_size=64, policy_kwargs=sb3_policy_kwargs(cfg),
               seed=0, device="cpu")


@pytest.mark.parametrize("hidden,nonlinearity", [([8], "tanh"), ([8, 6], "relu")])
def test_gaussian_conversion_matches_sb3_distribution(hidden, nonlinearity):
    cfg = Config.from_dict({**NAV, "hidden-sizes": hidden, "nonlinearity": nonlinearity})
    model = _ppo(cfg)
    with torch.no_grad():  # a non-trivial log std and biases, so every mapping matters
        model.policy.log_std.copy_(torch.tensor([-0.3, 0.4]))
        for p in model.policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    policy = policy_for(cfg)
    params = sb3_to_params(model, policy)
    assert list(params) == [k for k, _ in policy.named_parameters()]
    obs = torch.randn(7, 2)
    dist = model.policy.get_distribution(obs).distribution
    mean, std = action_distribution(policy, params, obs)
    torch.testing.assert_close(mean, dist.mean.detach())
    torch.testing.assert_close(std, dist.stddev.detach())


def test_categorical_conversion_matches_sb3_logits():
    cfg = Config.from_dict({"env-name": "binom_rl/TabularMDP-v0", "hidden-sizes": [8]})
    model = _ppo(cfg)
    policy = policy_for(cfg)
    params = sb3_to_params(model, policy)
    obs = torch.rand(5, policy.obs_dim)
    dist = model.policy.get_distribution(obs).distribution
    (logits,) = action_distribution(policy, params, obs)
    torch.testing.assert_close(torch.log_softmax(logits, -1), dist.logits.detach())


def test_conversion_rejects_other_architecture():
    model = _ppo(Config.from_dict({**NAV, "hidden-sizes": [8]}))
    with pytest.raises(ValueError, match="linear layers"):
        sb3_to_params(model, policy_for(Config.from_dict({**NAV, "hidden-sizes": [8, 8]})))
    with pytest.raises(ValueError, match="activations"):
        sb3_to_params(model, policy_for(Config.from_dict(
            {**NAV, "hidden-sizes": [8], "nonlinearity": "relu"})))


def test_wrapper_samples_tasks_and_oracle_sees_them():
    cfg = Config.from_dict(NAV)
    env = make_baseline_env(cfg, append_task=True)
    assert env.observation_space.shape == (4,)
    obs, _ = env.reset(seed=3)
    goals = [env.task["goal"].copy()]
    np.testing.assert_allclose(obs[2:], goals[0], rtol=1e-6)
    for _ in range(3):
        obs, *_ = env.step(env.action_space.sample())
        np.testing.assert_allclose(obs[2:], goals[-1], rtol=1e-6)
        obs, _ = env.reset()
        goals.append(env.task["goal"].copy())
        np.testing.assert_allclose(obs[2:], goals[-1], rtol=1e-6)
    assert len({tuple(g) for g in goals}) == 4  # a new task at every reset
    env.reset(seed=3)
    np.testing.assert_array_equal(env.task["goal"], goals[0])  # seeded: reproducible
    assert task_features({"velocity": 1.5}).tolist() == [1.5]
    with pytest.raises(ValueError, match="not numeric"):
        task_features({"name": "a"})


def test_train_ppo_and_evaluate_oracle_shapes(tmp_path):
    cfg = Config.from_dict({**NAV, "hidden-sizes": [8]})
    model = train_ppo(cfg, 100, seed=0, append_task=True, save_path=tmp_path / "ppo.zip")
    assert (tmp_path / "ppo.zip").is_file()
    returns = evaluate_oracle(cfg, model, meta_batch_size=3, num_batches=2, seed=7)
    assert returns.shape == (6, 1) and np.isfinite(returns).all()
    again = evaluate_oracle(cfg, model, meta_batch_size=3, num_batches=2, seed=7)
    np.testing.assert_array_equal(returns, again)


def test_oracle_sees_the_test_tasks_and_episodes_of_evaluate_params():
    """An oracle whose actor ignores the task features acts as the plain policy of its other
    weights; then evaluate_oracle's returns must be evaluate_params' 0-step returns of that
    policy, task for task: the same test tasks, episodes per task, seeds and action noise."""
    cfg = Config.from_dict({**NAV, "hidden-sizes": [8]})
    model = _ppo(cfg, append_task=True)
    first = model.policy.mlp_extractor.policy_net[0]
    with torch.no_grad():  # a non-trivial policy that reads the observation only
        for p in model.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
        first.weight[:, 2:] = 0.0  # NAV: obs 2, goal features 2
    oracle = evaluate_oracle(cfg, model, meta_batch_size=3, num_batches=2, seed=11)
    params = sb3_to_params(model, policy_for(cfg, extra_obs=2))
    params["layers.0.weight"] = params["layers.0.weight"][:, :2].clone()
    plain = evaluate_params(cfg, params, num_steps=1, meta_batch_size=3, num_batches=2,
                            seed=11, progress=False)  # fmt: skip
    assert oracle.shape == (6, 1) and len(set(oracle[:, 0].round(4))) == 6  # 6 distinct tasks
    np.testing.assert_allclose(oracle[:, 0], plain[:, 0], rtol=1e-5, atol=1e-5)
    other = evaluate_params(cfg, params, num_steps=1, meta_batch_size=3, num_batches=2,
                            seed=12, progress=False)  # fmt: skip
    assert np.abs(other[:, 0] - oracle[:, 0]).max() > 1e-3  # another seed differs: not vacuous


@pytest.mark.parametrize("rescale, bound, moved", [(True, 1.0, 0.05), (False, 0.1, 0.1)])
def test_baseline_env_rescales_actions_like_the_sampler(rescale, bound, moved):
    env = make_baseline_env(Config.from_dict({**NAV, "rescale-actions": rescale}))
    np.testing.assert_array_equal(env.action_space.low, np.float32([-bound, -bound]))
    np.testing.assert_array_equal(env.action_space.high, np.float32([bound, bound]))
    env.reset(seed=0)
    obs, *_ = env.step(np.full(2, 0.5, dtype=np.float32))
    # PPO's 0.5 is the env's 0.05 when rescaled (as our sampler does), clipped to 0.1 if not
    np.testing.assert_allclose(obs, [moved, moved], rtol=1e-6)
