"""agents/curvature.py: re-centred advantages against a per-task loop, and the table's
rows against the learner's own diagnostic on the same adaptation."""

import pytest
import torch

from binom_rl.agents.curvature import centred_advantages, curvature_table
from binom_rl.agents.maml_trpo import MetaLearner, derive_seed
from binom_rl.config import Config
from binom_rl.sampler import MultiTaskSampler

NAV = "binom_rl/2DNavigation-v0"


def test_centred_advantages_against_loop():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(3, 5, 4, generator=g)  # [T, H, B]
    mask = (torch.rand(3, 5, 4, generator=g) > 0.3).float()
    data = {"advantages": adv * mask, "mask": mask, "obs": torch.zeros(3, 5, 4, 2)}
    got = centred_advantages(data)
    assert got["obs"] is data["obs"]
    for t in range(3):
        valid = mask[t] > 0
        want = torch.where(valid, adv[t] - adv[t][valid].mean(), torch.zeros(()))
        torch.testing.assert_close(got["advantages"][t], want)


def _config(**overrides) -> Config:
    raw = {"env-name": NAV, "max-episode-steps": 10, "hidden-sizes": [8], "meta-batch-size": 3,
           "fast-batch-size": 10, "num-steps": 2, "fvp-subsample": 5, "seed": 0}  # fmt: skip
    raw.update(overrides)
    return Config.from_dict(raw)


def test_curvature_table_rows():
    cfg = _config()
    with MultiTaskSampler.from_config(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        params = learner.init_params(0)
        tasks = sampler.sample_tasks(3, seed=7)
        adaptation = learner.adapt(params, tasks, cfg.num_steps, seed=derive_seed(7, 1))
        diagnostic = learner.alpha_hessian_norms("", adaptation.path, adaptation.inner_data)
    rows = curvature_table(cfg, params, seed=7)
    names = [r.data for r in rows]
    assert names == [
        "all inner data (the meta-gradient's)",
        "all inner data (the meta-gradient's), advantages re-centred",
        "1 in 5 whole episodes",
        "1 in 5 whole episodes, advantages re-centred",
        "1 in 5 time steps",
        "1 in 5 time steps, advantages re-centred",
    ]
    by = {r.data: r for r in rows}
    full = by["all inner data (the meta-gradient's)"]
    # Same tasks, episodes and power iteration as the training diagnostic.
    assert full.alpha_hessian_norm_median == pytest.approx(diagnostic["alpha_hessian_norm_median"])
    assert full.alpha_hessian_norm_max == pytest.approx(diagnostic["alpha_hessian_norm_max"])
    # Advantages are normalised per task over all its steps: mean 0, so re-centring is a no-op.
    assert full.advantage_mean_over_rms < 1e-5
    centred_full = by["all inner data (the meta-gradient's), advantages re-centred"]
    assert centred_full.alpha_hessian_norm_max == pytest.approx(full.alpha_hessian_norm_max)
    for r in rows:
        assert 0 < r.alpha_hessian_norm_median <= r.alpha_hessian_norm_max
        if r.data.endswith("re-centred"):
            assert r.advantage_mean_over_rms < 1e-5
    assert by["1 in 5 whole episodes"].advantage_mean_over_rms > 1e-3  # a real subsample
