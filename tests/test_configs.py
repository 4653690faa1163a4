"""Every YAML in configs/ is a valid Config for a registered binom_rl task distribution."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest

from binom_rl.config import Config, load_yaml
from binom_rl.envs import registered_ids

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MUJOCO = {i for i in registered_ids() if "Navigation" not in i and "Bandit" not in i}
MUJOCO -= {"binom_rl/TabularMDP-v0"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_for_a_registered_env(path):
    raw = load_yaml(path)
    cfg = Config.from_dict(raw)
    assert cfg.env_name in registered_ids()
    horizon = gym.spec(cfg.env_name).max_episode_steps
    assert cfg.max_episode_steps in (None, horizon)
    # The MAML-RL settings the MuJoCo configs share: the MAML paper's (Finn et al. 2017)
    # fast-lr, episodes per step and meta-batch, pytorch-maml-rl's TRPO constants and (64, 64)
    # tanh policy, and this library's default estimator.
    if cfg.env_name in MUJOCO:
        expected = {
            "fast-lr": 0.1,
            "fast-batch-size": 20,
            "num-steps": 1,
            "meta-batch-size": 40,
            "num-batches": 500,
            "max-kl": 0.01,
            "cg-iters": 10,
            "cg-damping": 1e-5,
            "ls-max-steps": 15,
            "ls-backtrack-ratio": 0.8,
            "gamma": 0.99,
            "gae-lambda": 1.0,
            "hidden-sizes": [64, 64],
            "nonlinearity": "tanh",
            "estimator": "binom",
            "order": 1,
        }
        assert {k: cfg.to_dict()[k] for k in expected} == expected


def test_one_config_per_registered_env():
    envs = [load_yaml(p)["env-name"] for p in CONFIGS]
    assert sorted(envs) == sorted(set(envs)), "two configs for one env"
    assert set(envs) == set(registered_ids())
