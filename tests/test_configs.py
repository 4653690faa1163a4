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


# ProMP's settings (jonasrothfuss/ProMP, experiments/all_envs_eval/ppo_run_all.py) in the
# *-promp.yaml variants of the MAML-RL configs: config -> (horizon, expected keys).
PROMP_LOCOMOTION = {"fast-lr": 0.1, "ppo-steps": 5, "kl-penalty": 5e-4, "kl-target": None}
PROMP = {
    "2d-navigation-promp": (None, {**PROMP_LOCOMOTION, "meta-batch-size": 20}),
    "half-cheetah-dir-promp": (100, {**PROMP_LOCOMOTION, "meta-batch-size": 40}),
    "hopper-rand-params-promp": (
        200, {"fast-lr": 0.05, "ppo-steps": 3, "kl-penalty": 1e-3, "kl-target": 0.01,
              "meta-batch-size": 40},
    ),
}  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_for_a_registered_env(path):
    raw = load_yaml(path)
    cfg = Config.from_dict(raw)
    assert cfg.env_name in registered_ids()
    horizon = gym.spec(cfg.env_name).max_episode_steps
    if path.stem.endswith("-promp"):
        promp_horizon, expected = PROMP[path.stem]
        assert cfg.max_episode_steps == promp_horizon
        common = {"outer": "ppo", "inner-loss": "lvc", "outer-lr": 1e-3, "clip-eps": 0.3,
                  "fast-batch-size": 20, "num-steps": 1, "gamma": 0.99, "gae-lambda": 1.0,
                  "hidden-sizes": [64, 64], "nonlinearity": "tanh"}  # fmt: skip
        expected = {**common, **expected}
        assert {k: cfg.to_dict()[k] for k in expected} == expected
        return
    assert cfg.max_episode_steps in (None, horizon)
    if cfg.env_name in MUJOCO:  # the MAML-RL settings (DESIGN.md)
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
    """One MAML-RL config per registered env; ProMP variants beside some of them."""
    envs = [load_yaml(p)["env-name"] for p in CONFIGS if not p.stem.endswith("-promp")]
    promp = {p.stem.removesuffix("-promp") for p in CONFIGS if p.stem.endswith("-promp")}
    assert promp <= {p.stem for p in CONFIGS}, "a ProMP config without its MAML-RL config"
    assert sorted(envs) == sorted(set(envs)), "two configs for one env"
    assert set(envs) == set(registered_ids())
