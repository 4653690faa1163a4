"""SB3 baselines: policy conversion (same action distribution as SB3), task wrappers, oracle."""

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from binom_rl.agents.evaluation import evaluate_params
from binom_rl.agents.policies import GaussianMLPPolicy
from binom_rl.agents.sb3_baselines import (
    evaluate_oracle,
    load_ppo,
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
    return PPO(
        "MlpPolicy",
        env,
        n_steps=64,
        batch_size=64,
        policy_kwargs=sb3_policy_kwargs(cfg),
        seed=0,
        device="cpu",
    )


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
        sb3_to_params(
            model,
            policy_for(Config.from_dict({**NAV, "hidden-sizes": [8], "nonlinearity": "relu"})),
        )


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


def test_train_ppo_logs_to_tensorboard_and_calls_the_callback(tmp_path):
    from stable_baselines3.common.callbacks import BaseCallback

    class Count(BaseCallback):
        steps = 0

        def _on_step(self) -> bool:
            Count.steps += 1
            return True

    cfg = Config.from_dict({**NAV, "hidden-sizes": [8]})
    train_ppo(cfg, 128, seed=0, tensorboard_log=tmp_path, callback=Count())
    assert Count.steps == 128  # one call per env step (a single env)
    assert list(tmp_path.glob("PPO_1/events.out.tfevents.*"))


def test_evaluate_oracle_on_batch_sees_each_batchs_tasks_and_episodes():
    cfg = Config.from_dict({**NAV, "hidden-sizes": [8]})
    model = _ppo(cfg, append_task=True)
    seen = []
    returns = evaluate_oracle(
        cfg, model, meta_batch_size=3, num_batches=2, seed=7,
        on_batch=lambda tasks, episodes: seen.append((tasks, episodes)),
    )  # fmt: skip
    assert [len(tasks) for tasks, _ in seen] == [3, 3]
    # the episodes handed over are the ones the returns are the means of, obs without features
    means = np.concatenate([e.returns.mean(dim=1).numpy() for _, e in seen])
    np.testing.assert_allclose(returns[:, 0], means)
    obs_dim = make_baseline_env(cfg).observation_space.shape[0]
    assert all(e.observations.shape[-1] == obs_dim for _, e in seen)


def test_normalized_oracle_is_the_plain_oracle_with_the_statistics_folded_in(tmp_path):
    """VecNormalize's transform (x - mean) / sqrt(var + eps), unclipped, is affine: folded
    into the first layer (W / scale, b - W mean / scale) of the same model without
    normalisation, it must give evaluate_oracle the same returns, task for task."""
    cfg = Config.from_dict({**NAV, "hidden-sizes": [8]})
    model = train_ppo(cfg, 256, seed=0, append_task=True, normalize=True,
                      save_path=tmp_path / "ppo.zip")  # fmt: skip
    normalizer = model.get_vec_normalize_env()
    assert normalizer is not None and (tmp_path / "ppo.vecnormalize.pkl").is_file()
    assert np.abs(normalizer.obs_rms.mean).max() > 1e-3  # the statistics moved: not vacuous
    normalizer.clip_obs = 1e9  # the fold is exact only where nothing is clipped
    normalized = evaluate_oracle(cfg, model, meta_batch_size=3, num_batches=2, seed=5)

    plain = _ppo(cfg, append_task=True)
    plain.policy.load_state_dict(model.policy.state_dict())
    first = plain.policy.mlp_extractor.policy_net[0]
    mean = torch.as_tensor(normalizer.obs_rms.mean, dtype=torch.float64)
    scale = torch.sqrt(torch.as_tensor(normalizer.obs_rms.var) + normalizer.epsilon)
    with torch.no_grad():
        weight = first.weight.double() / scale
        first.bias.copy_(first.bias.double() - weight @ mean)
        first.weight.copy_(weight)
    folded = evaluate_oracle(cfg, plain, meta_batch_size=3, num_batches=2, seed=5)
    np.testing.assert_allclose(normalized, folded, rtol=1e-4, atol=1e-4)
    unfolded = evaluate_oracle(cfg, _ppo(cfg, append_task=True), meta_batch_size=3,
                               num_batches=2, seed=5)  # fmt: skip
    assert np.abs(unfolded - normalized).max() > 1e-3  # another policy differs


def test_load_ppo_restores_the_normalisation(tmp_path):
    cfg = Config.from_dict({**NAV, "hidden-sizes": [8]})
    model = train_ppo(cfg, 128, seed=0, append_task=True, normalize=True,
                      save_path=tmp_path / "ppo.zip")  # fmt: skip
    loaded = load_ppo(cfg, tmp_path / "ppo.zip", append_task=True)
    np.testing.assert_array_equal(
        loaded.get_vec_normalize_env().obs_rms.mean, model.get_vec_normalize_env().obs_rms.mean
    )
    runs = [
        evaluate_oracle(cfg, m, meta_batch_size=2, num_batches=1, seed=3) for m in (model, loaded)
    ]
    np.testing.assert_array_equal(*runs)
    (tmp_path / "ppo.vecnormalize.pkl").unlink()  # without the statistics: the raw inputs
    bare = load_ppo(cfg, tmp_path / "ppo.zip", append_task=True)
    assert bare.get_vec_normalize_env() is None
    assert np.abs(evaluate_oracle(cfg, bare, meta_batch_size=2, num_batches=1, seed=3)
                  - runs[0]).max() > 1e-3  # fmt: skip


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
