"""Linear feature baseline against numpy least squares; advantage pipeline."""

import numpy as np
import pytest
import torch

from binom_rl.agents.baselines import LinearFeatureBaseline, compute_advantages, ridge_solve
from binom_rl.rl import discounted_returns, gae, normalize_advantages


def _np_features(obs):
    """Independent numpy construction of [obs, obs^2, t, t^2, t^3, 1] for obs [H, d]."""
    h = obs.shape[0]
    o = np.clip(obs, -10, 10)
    t = (np.arange(h) / 100.0)[:, None]
    return np.concatenate([o, o**2, t, t**2, t**3, np.ones((h, 1))], axis=1)


def _np_ridge(x, y, reg):
    """Ridge as an augmented least-squares problem: [X; sqrt(reg) I] w = [y; 0]."""
    f = x.shape[1]
    xa = np.vstack([x, np.sqrt(reg) * np.eye(f)])
    ya = np.concatenate([y, np.zeros(f)])
    return np.linalg.lstsq(xa, ya, rcond=None)[0]


def _random_batch(h=30, t=3, b=4, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = 3.0 * torch.randn(h, t, b, d, generator=g, dtype=torch.float64)
    returns = torch.randn(h, t, b, generator=g, dtype=torch.float64) + obs[..., 0]
    lengths = torch.randint(5, h + 1, (t, b), generator=g)
    mask = (torch.arange(h)[:, None, None] < lengths[None]).double()
    return obs, returns, mask


def test_features_shape_and_values():
    obs = torch.tensor([[[1.0, -20.0]], [[2.0, 3.0]]])  # [H=2, B=1, d=2]
    phi = LinearFeatureBaseline.features(obs)
    assert phi.shape == (2, 1, 8)
    expected = torch.tensor([[1.0, -10, 1, 100, 0, 0, 0, 1], [2, 3, 4, 9, 0.01, 1e-4, 1e-6, 1]])
    assert torch.allclose(phi[:, 0], expected)
    assert LinearFeatureBaseline(obs_dim=2).num_features == 8


def test_fit_matches_numpy_ridge_pooled():
    obs, returns, mask = _random_batch(t=1, b=1)
    obs, returns, mask = obs[:, 0], returns[:, 0], mask[:, 0]  # [H, 1, d]
    base = LinearFeatureBaseline()
    w = base.fit(obs, returns, mask)
    valid = mask[:, 0].numpy() > 0
    ref = _np_ridge(_np_features(obs[:, 0].numpy())[valid], returns[:, 0].numpy()[valid], 1e-5)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-6, atol=1e-8)
    v = base.predict(w, obs)
    assert v.shape == (obs.shape[0], 1)
    np.testing.assert_allclose(v[:, 0].numpy(), _np_features(obs[:, 0].numpy()) @ ref, atol=1e-6)


def test_fit_batched_equals_per_task_loop():
    obs, returns, mask = _random_batch()
    base = LinearFeatureBaseline()
    w = base.fit(obs, returns, mask, task_dim=1)
    assert w.shape == (3, 2 * 2 + 4)
    for k in range(3):
        w_k = base.fit(obs[:, k], returns[:, k], mask[:, k])
        torch.testing.assert_close(w[k], w_k)
        # also against numpy, pooling the valid steps of the task's episodes
        x = np.concatenate([_np_features(obs[:, k, j].numpy()) for j in range(4)])
        y = returns[:, k].T.reshape(-1).numpy()
        valid = mask[:, k].T.reshape(-1).numpy() > 0
        np.testing.assert_allclose(w[k].numpy(), _np_ridge(x[valid], y[valid], 1e-5), atol=1e-6)
    v = base.predict(w, obs, task_dim=1)
    assert v.shape == (30, 3, 4)
    for k in range(3):
        torch.testing.assert_close(v[:, k], base.predict(w[k], obs[:, k]))
    # task dim in another position gives the same result
    w2 = base.fit(obs.transpose(1, 2), returns.transpose(1, 2), mask.transpose(1, 2), task_dim=2)
    torch.testing.assert_close(w2, w)
    v2 = base.predict(w2, obs.transpose(1, 2), task_dim=2)
    torch.testing.assert_close(v2, v.transpose(1, 2))
    with pytest.raises(ValueError):
        base.fit(obs, returns, mask, task_dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_fits_are_finite(dtype):
    h, t, b, d = 50, 2, 3, 2
    base = LinearFeatureBaseline()
    returns = torch.randn(h, t, b, dtype=dtype)
    mask = torch.ones(h, t, b, dtype=dtype)
    for obs in (torch.ones(h, t, b, d, dtype=dtype), torch.zeros(h, t, b, d, dtype=dtype)):
        w = base.fit(obs, returns, mask, task_dim=1)
        assert torch.isfinite(w).all()
    # nothing valid at all: X^T X = 0, the ridge term alone -> w = 0
    w = base.fit(torch.randn(h, t, b, d, dtype=dtype), returns, torch.zeros_like(mask), task_dim=1)
    assert torch.equal(w, torch.zeros_like(w))
    # NaN observations after the episode ends do not leak into the fit
    obs = torch.randn(h, t, b, d, dtype=dtype)
    mask[40:] = 0
    obs[40:] = float("nan")
    w = base.fit(obs, returns, mask, task_dim=1)
    assert torch.isfinite(w).all()
    w_ref = base.fit(obs[:40], returns[:40], mask[:40], task_dim=1)
    torch.testing.assert_close(w, w_ref)


def test_ridge_solve_increases_regularisation():
    # X^T X = diag(0, 1), X^T y = (1e300, 1): reg 1e-10 and 1e-9 overflow to inf,
    # reg 1e-8 is the first finite solution.
    xtx = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    xty = torch.tensor([1e300, 1.0], dtype=torch.float64)
    w = ridge_solve(xtx, xty, reg_coeff=1e-10, max_tries=5)
    assert torch.allclose(w, torch.tensor([1e300 / 1e-8, 1.0 / (1.0 + 1e-8)], dtype=torch.float64))
    # no try succeeds (reg 0 stays 0, singular system): zeros, not NaN
    w = ridge_solve(torch.zeros(3, 2, 2), torch.ones(3, 2), reg_coeff=0.0, max_tries=3)
    assert torch.equal(w, torch.zeros(3, 2))


def test_compute_advantages_matches_manual_pipeline():
    obs, _, mask = _random_batch(seed=3)
    rewards = torch.randn(
        mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    rewards = rewards * mask
    base = LinearFeatureBaseline()
    adv = compute_advantages(base, obs, rewards, mask, gamma=0.99, gae_lambda=0.95)
    assert adv.shape == mask.shape
    assert torch.all(adv[mask == 0] == 0)
    for k in range(3):
        ret = discounted_returns(rewards[:, k], mask[:, k], 0.99)
        w = base.fit(obs[:, k], ret, mask[:, k])
        values = base.predict(w, obs[:, k]) * mask[:, k]
        a = gae(rewards[:, k], values, mask[:, k], 0.99, 0.95)
        torch.testing.assert_close(adv[:, k], normalize_advantages(a, mask[:, k]))
        # per-task normalisation: zero mean, unit std over the task's valid steps
        valid = adv[:, k][mask[:, k] > 0]
        assert abs(valid.mean().item()) < 1e-8
        assert abs(valid.std(unbiased=False).item() - 1.0) < 1e-6
    raw = compute_advantages(base, obs, rewards, mask, 0.99, 0.95, normalize=False)
    assert not torch.allclose(raw, adv)
