"""Tests for binom_rl.rl against hand computations and numpy."""

import math

import numpy as np
import pytest
import torch

from binom_rl.rl import (
    cg_solve,
    discounted_returns,
    flatten_params,
    gae,
    line_search,
    masked_mean_per_task,
    mean_and_stderr,
    normalize_advantages,
    unflatten_params,
)


def _cg_solution(mvp, b, iters):
    return cg_solve(mvp, b, iters).x


def test_masked_mean_per_task_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]], [[9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[[1, 1], [0, 1]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    got = masked_mean_per_task(x, mask)
    # (1 + 2 + 4) / 3, 5 / 1, and an all-masked task: 0 (the count is clamped at 1).
    torch.testing.assert_close(got, torch.tensor([7.0 / 3.0, 5.0, 0.0]))


def test_masked_mean_per_task_averages_trailing_dims():
    """Against a loop over every entry: the mask [T, H, B] covers x [T, H, B, 4]'s last dim."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 2, 2, 4, generator=gen, dtype=torch.float64)
    mask = (torch.rand(3, 2, 2, generator=gen) > 0.4).double()
    mask[2] = 0.0
    want = []
    for t in range(3):
        total = count = 0.0
        for h in range(2):
            for b in range(2):
                for j in range(4):
                    total += float(y[t, h, b, j] * mask[t, h, b])
                    count += float(mask[t, h, b])
        want.append(total / max(count, 1.0))
    torch.testing.assert_close(masked_mean_per_task(y, mask), torch.tensor(want, dtype=y.dtype))


def test_discounted_returns_by_hand():
    # gamma = 0.5; episode 0 lasts 3 steps, episode 1 lasts 2 steps (masked after).
    rewards = torch.tensor([[1.0, 2.0], [2.0, 4.0], [4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    # ep0: G2 = 4, G1 = 2 + 0.5*4 = 4, G0 = 1 + 0.5*4 = 3
    # ep1: G2 = 0 (masked), G1 = 4, G0 = 2 + 0.5*4 = 4
    expected = torch.tensor([[3.0, 4.0], [4.0, 4.0], [4.0, 0.0]])
    assert torch.allclose(discounted_returns(rewards, mask, 0.5), expected)


def test_gae_by_hand():
    # gamma = 0.5, lambda = 0.5, column 0 full 3-step episode, column 1 ends after 2 steps.
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 50.0]])
    values = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    # column 0 (value past horizon = 0):
    #   d2 = 3 + 0 - 4 = -1
    #   d1 = 2 + 0.5*4 - 2 = 2
    #   d0 = 1 + 0.5*2 - 1 = 1
    #   A2 = -1, A1 = 2 + 0.25*(-1) = 1.75, A0 = 1 + 0.25*1.75 = 1.4375
    # column 1 (step 2 masked: V_2 m_2 = 0, A_2 = 0):
    #   d1 = 2 + 0 - 2 = 0, d0 = 1 + 0.5*2 - 1 = 1
    #   A1 = 0, A0 = 1 + 0.25*0 = 1
    expected = torch.tensor([[1.4375, 1.0], [1.75, 0.0], [-1.0, 0.0]])
    assert torch.allclose(gae(rewards, values, mask, 0.5, 0.5), expected)


def test_gae_lambda_one_equals_returns_minus_values():
    torch.manual_seed(0)
    h, b = 7, 4
    rewards = torch.randn(h, b)
    values = torch.randn(h, b)
    lengths = torch.tensor([7, 5, 1, 3])
    mask = (torch.arange(h)[:, None] < lengths[None]).float()
    adv = gae(rewards, values, mask, 0.9, 1.0)
    ret = discounted_returns(rewards, mask, 0.9)
    assert torch.allclose(adv, (ret - values) * mask, atol=1e-5)


def test_gae_under_vmap_over_tasks():
    torch.manual_seed(1)
    h, t, b = 5, 3, 2
    rewards, values = torch.randn(h, t, b), torch.randn(h, t, b)
    mask = torch.ones(h, t, b)
    mask[3:, 1] = 0.0
    ref = gae(rewards, values, mask, 0.99, 0.95)
    out = torch.func.vmap(lambda r, v, m: gae(r, v, m, 0.99, 0.95), in_dims=1, out_dims=1)(
        rewards, values, mask
    )
    assert torch.allclose(ref, out, atol=1e-6)


def test_normalize_advantages_per_task():
    torch.manual_seed(2)
    h, t, b = 6, 3, 4
    adv = torch.randn(h, t, b) * torch.tensor([1.0, 5.0, 0.1])[None, :, None]
    mask = torch.ones(h, t, b)
    mask[4:, 0] = 0.0
    out = normalize_advantages(adv, mask, dims=(0, 2))
    assert torch.all(out[mask == 0] == 0)
    for k in range(t):
        valid = adv[:, k][mask[:, k] > 0].double().numpy()
        ref = (valid - valid.mean()) / (valid.std() + 1e-8)
        got = out[:, k][mask[:, k] > 0].double().numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)
    # global
    out_all = normalize_advantages(adv, mask)
    valid = adv[mask > 0].double().numpy()
    np.testing.assert_allclose(
        out_all[mask > 0].double().numpy(),
        (valid - valid.mean()) / (valid.std() + 1e-8),
        atol=1e-5,
    )


def test_flatten_roundtrip():
    d = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0, 8.0])}
    vec = flatten_params(d)
    assert torch.equal(vec, torch.tensor([0.0, 1, 2, 3, 4, 5, 7, 8]))
    back = unflatten_params(vec, d)
    assert list(back) == ["a", "b"]
    assert all(torch.equal(back[k], d[k]) for k in d)


def test_mean_and_stderr_by_hand():
    # [1, 2, 3, 4]: mean 2.5, sample variance 5/3, standard error sqrt(5/3 / 4)
    mean, se = mean_and_stderr(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5.0 / 12.0))
    mean, se = mean_and_stderr(np.array([[1.0, 3.0], [2.0, 2.0]]), axis=1)
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(se, [1.0, 0.0])  # std(ddof=1) of [1, 3] is sqrt(2), / sqrt(2)
    mean, se = mean_and_stderr(np.array([[5.0, -1.0]]), axis=0)  # one sample: no spread
    np.testing.assert_array_equal(mean, [5.0, -1.0])
    np.testing.assert_array_equal(se, [0.0, 0.0])


@pytest.mark.parametrize("n", [1, 5, 20])
def test_conjugate_gradient_spd(n):
    rng = np.random.default_rng(n)
    m = rng.standard_normal((n, n))
    a = m @ m.T + n * np.eye(n)
    b = rng.standard_normal(n)
    at = torch.tensor(a)
    x = _cg_solution(lambda v: at @ v, torch.tensor(b), iters=n)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(a, b), rtol=1e-5, atol=1e-6)
    # extra iterations after convergence are no-ops (no NaN from 0/0)
    x_more = _cg_solution(lambda v: at @ v, torch.tensor(b), iters=3 * n + 5)
    assert torch.isfinite(x_more).all()
    np.testing.assert_allclose(x_more.numpy(), np.linalg.solve(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("iters", [1, 3, 10, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_solve_accumulated_product_equals_explicit(iters, dtype):
    """cg_solve's ax (sum of alpha_i A p_i) is A x, also before convergence and after it
    (the masked no-op iterations must not change it)."""
    n = 20
    rng = np.random.default_rng(iters)
    m = rng.standard_normal((n, n))
    a = torch.tensor(m @ m.T + 0.1 * np.eye(n), dtype=dtype)
    b = torch.tensor(rng.standard_normal(n), dtype=dtype)
    x, ax = cg_solve(lambda v: a @ v, b, iters=iters)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ax, a @ x, **tol)


def test_conjugate_gradient_zero_rhs_and_float32():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    x = _cg_solution(lambda v: a @ v, torch.zeros(3), iters=5)
    assert torch.equal(x, torch.zeros(3))
    b = torch.tensor([1.0, 1.0, 1.0])
    x = _cg_solution(lambda v: a @ v, b, iters=10)
    assert torch.allclose(x, torch.tensor([1.0, 0.5, 1.0 / 3.0]), atol=1e-6)


def test_line_search_known_function():
    # loss(x) = (x - 1)^2 from x0 = 0 along step 5: new x = 5 f.
    # improvement = 1 - (5f - 1)^2 > 0  <=>  0 < f < 0.4; kl = f^2 <= 0.1 <=> f <= 0.316
    def evaluate(f):
        return 1.0 - (5.0 * f - 1.0) ** 2, f**2

    frac, tries = line_search(evaluate, max_steps=15, backtrack_ratio=0.5, max_kl=0.1)
    # fractions 1, .5, .25: .25 is the first with improvement > 0 and kl <= .1
    assert frac == 0.25 and tries == 3
    # KL constraint binds: with max_kl = 0.01 need f <= 0.1 -> 0.0625 (5th try)
    frac, tries = line_search(evaluate, max_steps=15, backtrack_ratio=0.5, max_kl=0.01)
    assert frac == 0.0625 and tries == 5


def test_line_search_rejects_all_and_nonfinite():
    frac, tries = line_search(lambda f: (-1.0, 0.0), max_steps=4, backtrack_ratio=0.8, max_kl=1.0)
    assert (frac, tries) == (0.0, 4)
    calls = []

    def evaluate(f):
        calls.append(f)
        return (math.nan, 0.0) if f == 1.0 else (1.0, math.inf if len(calls) == 2 else 0.0)

    frac, tries = line_search(evaluate, max_steps=5, backtrack_ratio=0.5, max_kl=1.0)
    assert frac == 0.25 and tries == 3


def test_conjugate_gradient_under_vmap():
    # No data-dependent Python control flow: CG can be vmapped over independent systems.
    rng = np.random.default_rng(7)
    mats, rhs = [], []
    for _ in range(3):
        m = rng.standard_normal((4, 4))
        mats.append(m @ m.T + 4 * np.eye(4))
        rhs.append(rng.standard_normal(4))
    a, b = torch.tensor(np.stack(mats)), torch.tensor(np.stack(rhs))
    x = torch.func.vmap(lambda ai, bi: _cg_solution(lambda v: ai @ v, bi, iters=8))(a, b)
    ref = np.stack([np.linalg.solve(m, r) for m, r in zip(mats, rhs, strict=True)])
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-6, atol=1e-8)
