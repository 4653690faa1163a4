"""Every YAML in configs/ is a valid Config for a registered binom_rl task distribution."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest

from binom_rl.config import Config, load_yaml
from binom_rl.envs import registered_ids

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
METAWORLD = {i for i in registered_ids() if "MetaWorld" in i}
MUJOCO = {i for i in registered_ids() if "Navigation" not in i and "Bandit" not in i}
MUJOCO -= {"binom_rl/TabularMDP-v0"} | METAWORLD
# The Meta-World authors' MAML-TRPO settings (garage's maml_trpo_metaworld_* examples)
METAWORLD_SETTINGS = {
    "max-episode-steps": 500,
    "fast-lr": 0.1,
    "num-steps": 1,
    "num-batches": 300,
    "max-kl": 0.01,
    "cg-iters": 10,
    "cg-damping": 1e-5,
    "ls-max-steps": 15,
    "ls-backtrack-ratio": 0.8,
    "fvp-subsample": 1,
    "gamma": 0.99,
    "gae-lambda": 1.0,
    "hidden-sizes": [100, 100],
    "nonlinearity": "tanh",
    "init-std": 1.0,
}


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
    # The MAML-RL settings the MuJoCo configs share: the MAML paper's (Finn et al. 2017)
    # fast-lr, episodes per step and meta-batch, pytorch-maml-rl's TRPO constants, and this
    # library's default estimator; the paper's (100, 100) ReLU policy for HalfCheetahDir and
    # the Ant tasks, (64, 64) tanh for the others (HalfCheetahVel keeps the setting of its
    # shipped policy, docs/results/locomotion.md).
    if cfg.env_name in MUJOCO:
        paper_task = "HalfCheetahDir" in cfg.env_name or "Ant" in cfg.env_name
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
            "hidden-sizes": [100, 100] if paper_task else [64, 64],
            "nonlinearity": "relu" if paper_task else "tanh",
            "estimator": "binom",
            "order": 1,
        }
        assert {k: cfg.to_dict()[k] for k in expected} == expected
    if cfg.env_name in METAWORLD:
        assert {k: cfg.to_dict()[k] for k in METAWORLD_SETTINGS} == METAWORLD_SETTINGS
        batch = (cfg.meta_batch_size, cfg.fast_batch_size)
        assert batch == ((45, 45) if "ML45" in cfg.env_name else (20, 10))


def test_one_config_per_registered_env():
    """One MAML-RL config per registered env (ML1: one per task class, by env-kwargs
    env_name); ProMP variants beside some of them."""
    mamlrl = [p for p in CONFIGS if not p.stem.endswith("-promp")]
    envs = [(load_yaml(p)["env-name"], str(load_yaml(p).get("env-kwargs"))) for p in mamlrl]
    promp = {p.stem.removesuffix("-promp") for p in CONFIGS if p.stem.endswith("-promp")}
    assert promp <= {p.stem for p in CONFIGS}, "a ProMP config without its MAML-RL config"
    assert sorted(envs) == sorted(set(envs)), "two configs for one env"
    assert {env for env, _ in envs} == set(registered_ids())
    ml1 = [kwargs for env, kwargs in envs if env == "binom_rl/MetaWorldML1-v0"]
    assert sorted(ml1) == ["{'env_name': 'push-v3'}", "{'env_name': 'reach-v3'}"]
