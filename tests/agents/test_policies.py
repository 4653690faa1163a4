"""Policies against torch.distributions, under vmap, and sampling reproducibility."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, Normal

from binom_rl.agents.policies import (
    ACTIVATIONS,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    batched_sample,
    make_policy,
)
from binom_rl.config import NONLINEARITIES

OBS_DIM, ACT_DIM, N_ACT = 3, 2, 4


def _perturbed(params, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in params.items()}


def _stack(dicts):
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


@pytest.fixture
def gauss():
    return GaussianMLPPolicy(OBS_DIM, ACT_DIM, (8, 8), "tanh", init_std=0.7)


@pytest.fixture
def cat():
    return CategoricalMLPPolicy(OBS_DIM, N_ACT, (8,), "relu")


def test_param_names_and_init(gauss, cat):
    p = gauss.init_params(seed=3)
    assert list(p) == [n for n, _ in gauss.named_parameters()]
    assert all(not v.requires_grad for v in p.values())
    assert torch.allclose(p["log_std"].exp(), torch.full((ACT_DIM,), 0.7))
    q = gauss.init_params(seed=3)
    assert all(torch.equal(p[k], q[k]) for k in p)
    r = gauss.init_params(seed=4)
    assert not torch.equal(p["layers.0.weight"], r["layers.0.weight"])
    assert list(cat.init_params(0)) == [n for n, _ in cat.named_parameters()]
    with pytest.raises(ValueError):
        GaussianMLPPolicy(2, 2, (4,), "sigmoid")


def test_gaussian_against_torch_distributions(gauss):
    p_old = _perturbed(gauss.init_params(0), 1)
    p_new = _perturbed(p_old, 2, scale=0.1)
    obs = torch.randn(5, 6, OBS_DIM)
    act = torch.randn(5, 6, ACT_DIM)
    mean_o, std_o = gauss.mean_and_std(p_old, obs)
    mean_n, std_n = gauss.mean_and_std(p_new, obs)
    d_old = Independent(Normal(mean_o, std_o.expand_as(mean_o)), 1)
    d_new = Independent(Normal(mean_n, std_n.expand_as(mean_n)), 1)
    assert gauss.log_prob(p_old, obs, act).shape == (5, 6)
    assert torch.allclose(gauss.log_prob(p_old, obs, act), d_old.log_prob(act), atol=1e-5)
    kl = gauss.kl(p_old, p_new, obs)
    assert kl.shape == (5, 6)
    assert torch.allclose(kl, torch.distributions.kl_divergence(d_old, d_new), atol=1e-5)
    assert torch.allclose(gauss.kl(p_old, p_old, obs), torch.zeros(5, 6), atol=1e-6)
    assert torch.allclose(gauss.entropy(p_old, obs), d_old.entropy(), atol=1e-5)
    assert torch.equal(gauss.mode(p_old, obs), mean_o)


def test_gaussian_min_log_std():
    pol = GaussianMLPPolicy(OBS_DIM, ACT_DIM, (4,), "tanh", init_std=1.0, min_log_std=-1.0)
    p = pol.init_params(0)
    p["log_std"] = torch.tensor([-5.0, 0.5])
    _, std = pol.mean_and_std(p, torch.zeros(OBS_DIM))
    assert torch.allclose(std, torch.tensor([np.exp(-1.0), np.exp(0.5)], dtype=torch.float32))


def test_categorical_against_torch_distributions(cat):
    p_old = _perturbed(cat.init_params(0), 1, scale=0.5)
    p_new = _perturbed(p_old, 2, scale=0.2)
    obs = torch.randn(5, 6, OBS_DIM)
    act = torch.randint(0, N_ACT, (5, 6))
    d_old = Categorical(logits=cat.logits(p_old, obs))
    d_new = Categorical(logits=cat.logits(p_new, obs))
    assert torch.allclose(cat.log_prob(p_old, obs, act), d_old.log_prob(act), atol=1e-6)
    kl = cat.kl(p_old, p_new, obs)
    assert kl.shape == (5, 6)
    assert torch.allclose(kl, torch.distributions.kl_divergence(d_old, d_new), atol=1e-6)
    assert torch.allclose(cat.entropy(p_old, obs), d_old.entropy(), atol=1e-6)
    assert torch.equal(cat.mode(p_old, obs), d_old.probs.argmax(-1))


@pytest.mark.parametrize("which", ["gauss", "cat"])
def test_vmap_over_tasks_equals_loop(which, gauss, cat):
    pol = gauss if which == "gauss" else cat
    n_tasks, b = 3, 5
    per_task = [_perturbed(pol.init_params(0), s) for s in range(n_tasks)]
    new = [_perturbed(p, 10 + i, scale=0.1) for i, p in enumerate(per_task)]
    stacked, stacked_new = _stack(per_task), _stack(new)
    obs = torch.randn(n_tasks, b, OBS_DIM)
    if which == "gauss":
        act = torch.randn(n_tasks, b, ACT_DIM)
    else:
        act = torch.randint(0, N_ACT, (n_tasks, b))
    vm = torch.func.vmap
    lp = vm(pol.log_prob)(stacked, obs, act)
    kl = vm(pol.kl)(stacked, stacked_new, obs)
    ent = vm(pol.entropy)(stacked, obs)
    for t in range(n_tasks):
        assert torch.allclose(lp[t], pol.log_prob(per_task[t], obs[t], act[t]), atol=1e-6)
        assert torch.allclose(kl[t], pol.kl(per_task[t], new[t], obs[t]), atol=1e-6)
        assert torch.allclose(ent[t], pol.entropy(per_task[t], obs[t]), atol=1e-6)


@pytest.mark.parametrize("which", ["gauss", "cat"])
def test_task_batched_forward_equals_per_task(which, gauss, cat):
    """Params with a leading task dim run one batched matmul per layer (the sampler's path);
    it must equal the per-task forward, for obs with several batch dims."""
    pol = gauss if which == "gauss" else cat
    per_task = [_perturbed(pol.init_params(0), s) for s in range(3)]
    obs = torch.randn(3, 4, 5, OBS_DIM)
    new = [_perturbed(p, 10 + i, scale=0.1) for i, p in enumerate(per_task)]
    if which == "gauss":
        act = torch.randn(3, 4, 5, ACT_DIM)
    else:
        act = torch.randint(0, N_ACT, (3, 4, 5))
    batched = pol.dist_params(_stack(per_task), obs)
    batched_new = pol.dist_params(_stack(new), obs)
    log_prob = pol.log_prob_dist(batched, act)
    kl = pol.kl_dist(batched, batched_new)
    for t in range(3):
        ref = pol.dist_params(per_task[t], obs[t])
        if which == "gauss":
            # log sigma comes broadcastable against mu: [T, 1, 1, act_dim].
            assert batched[1].shape == (3, 1, 1, ACT_DIM)
            torch.testing.assert_close(batched[0][t], ref[0])
            torch.testing.assert_close(batched[1][t].reshape(ACT_DIM), ref[1])
        else:
            torch.testing.assert_close(batched[t], ref)
        torch.testing.assert_close(log_prob[t], pol.log_prob(per_task[t], obs[t], act[t]))
        torch.testing.assert_close(kl[t], pol.kl(per_task[t], new[t], obs[t]))


def test_grad_and_hvp_through_log_prob(gauss):
    # The meta-learner differentiates twice (forward-over-reverse) through log_prob.
    p = gauss.init_params(0)
    obs, act = torch.randn(7, OBS_DIM), torch.randn(7, ACT_DIM)

    def loss(params):
        return -gauss.log_prob(params, obs, act).mean()

    g = torch.func.grad(loss)(p)
    v = {k: torch.randn_like(x) for k, x in p.items()}
    _, hv = torch.func.jvp(torch.func.grad(loss), (p,), (v,))
    assert set(g) == set(p) and all(torch.isfinite(x).all() for x in hv.values())


@pytest.mark.parametrize("which", ["gauss", "cat"])
def test_sample_reproducible(which, gauss, cat):
    pol = gauss if which == "gauss" else cat
    p = pol.init_params(0)
    obs = torch.randn(10, OBS_DIM)
    a1 = pol.sample(p, obs, torch.Generator().manual_seed(5))
    a2 = pol.sample(p, obs, torch.Generator().manual_seed(5))
    a3 = pol.sample(p, obs, torch.Generator().manual_seed(6))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    if which == "cat":
        assert a1.dtype == torch.int64 and a1.shape == (10,)
    else:
        assert a1.shape == (10, ACT_DIM)


def test_gaussian_sample_moments(gauss):
    p = _perturbed(gauss.init_params(0), 1)
    obs = torch.randn(1, OBS_DIM).expand(40000, OBS_DIM)
    a = gauss.sample(p, obs, torch.Generator().manual_seed(0))
    mean, std = gauss.mean_and_std(p, obs[:1])
    assert torch.allclose(a.mean(0), mean[0], atol=0.02)
    assert torch.allclose(a.std(0), std, rtol=0.02)


def test_categorical_sample_frequencies(cat):
    p = _perturbed(cat.init_params(0), 1, scale=0.5)
    obs = torch.randn(1, OBS_DIM).expand(40000, OBS_DIM)
    a = cat.sample(p, obs, torch.Generator().manual_seed(0))
    freq = torch.bincount(a, minlength=N_ACT).float() / a.numel()
    probs = torch.softmax(cat.logits(p, obs[:1]), -1)[0]
    assert torch.allclose(freq, probs, atol=0.01)


@pytest.mark.parametrize("which", ["gauss", "cat"])
def test_batched_sample(which, gauss, cat):
    pol = gauss if which == "gauss" else cat
    n_tasks, b = 3, 20000
    per_task = [_perturbed(pol.init_params(0), s, scale=0.5) for s in range(n_tasks)]
    obs = torch.randn(n_tasks, 1, OBS_DIM).expand(n_tasks, b, OBS_DIM)
    a = batched_sample(pol, _stack(per_task), obs, torch.Generator().manual_seed(1))
    a2 = batched_sample(pol, _stack(per_task), obs, torch.Generator().manual_seed(1))
    assert torch.equal(a, a2)
    for t in range(n_tasks):
        if which == "gauss":
            assert a.shape == (n_tasks, b, ACT_DIM)
            mean, std = pol.mean_and_std(per_task[t], obs[t, :1])
            assert torch.allclose(a[t].mean(0), mean[0], atol=0.03)
            assert torch.allclose(a[t].std(0), std, rtol=0.03)
        else:
            assert a.shape == (n_tasks, b) and a.dtype == torch.int64
            freq = torch.bincount(a[t], minlength=N_ACT).float() / b
            probs = torch.softmax(pol.logits(per_task[t], obs[t, :1]), -1)[0]
            assert torch.allclose(freq, probs, atol=0.015)


@pytest.mark.parametrize("which", ["gauss", "cat"])
def test_init_output_scale_scales_only_the_output_layer(which):
    # Same seed, scale 1 and 0.01: the hidden layers are drawn identically, the output
    # weights are the Xavier draw times the scale, so every output is 0.01 times as large.
    make = {
        "gauss": lambda s: GaussianMLPPolicy(OBS_DIM, ACT_DIM, (8, 8), "tanh", 0.7,
                                             init_output_scale=s),
        "cat": lambda s: CategoricalMLPPolicy(OBS_DIM, N_ACT, (8, 8), "tanh", s),
    }[which]  # fmt: skip
    full, small = make(1.0).init_params(seed=5), make(0.01).init_params(seed=5)
    assert list(full) == list(small)
    for k in full:
        expected = full[k] * 0.01 if k == "layers.2.weight" else full[k]
        assert torch.allclose(small[k], expected, rtol=1e-6, atol=0), k
    # Xavier-uniform bound sqrt(6 / (fan_in + fan_out)) on the output layer, times the scale
    out = full["layers.2.weight"]
    bound = (6.0 / sum(out.shape)) ** 0.5
    assert out.abs().max() <= bound and out.abs().max() > 0.5 * bound
    obs = torch.randn(50, OBS_DIM)
    pol_full, pol_small = make(1.0), make(0.01)
    out_full = pol_full.dist_params(full, obs)
    out_small = pol_small.dist_params(small, obs)
    if which == "gauss":
        out_full, out_small = out_full[0], out_small[0]
    assert torch.allclose(out_small, 0.01 * out_full, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="init_output_scale must be > 0"):
        make(0.0)


def test_make_policy():
    obs_space = gym.spaces.Box(-1, 1, (OBS_DIM,))
    pol = make_policy(obs_space, gym.spaces.Box(-1, 1, (ACT_DIM,)), (16,), "relu", init_std=0.5)
    assert isinstance(pol, GaussianMLPPolicy) and pol.act_dim == ACT_DIM
    assert pol.init_std == 0.5 and pol.nonlinearity == "relu" and pol.init_output_scale == 1.0
    pol = make_policy(obs_space, gym.spaces.Discrete(N_ACT), (16,), "tanh", 1.0, 0.1)
    assert isinstance(pol, CategoricalMLPPolicy) and pol.num_actions == N_ACT
    assert pol.init_output_scale == 0.1
    with pytest.raises(ValueError):
        make_policy(obs_space, gym.spaces.MultiBinary(3), (16,), "tanh")


@pytest.mark.parametrize("which", ["gauss", "cat"])
def test_fisher_vector_product_under_vmap(which, gauss, cat):
    # TRPO needs F v = d/de grad_new KL(pi_old || pi_new) per task, batched over tasks.
    pol = gauss if which == "gauss" else cat
    n_tasks = 2
    per_task = [_perturbed(pol.init_params(0), s) for s in range(n_tasks)]
    stacked = _stack(per_task)
    obs = torch.randn(n_tasks, 6, OBS_DIM)
    v = {k: torch.randn_like(x) for k, x in stacked.items()}

    def fvp(params, o, vec):
        def mean_kl(new):
            return pol.kl(params, new, o).mean()

        return torch.func.jvp(torch.func.grad(mean_kl), (params,), (vec,))[1]

    out = torch.func.vmap(fvp)(stacked, obs, v)
    for t in range(n_tasks):
        p_t = per_task[t]
        flat = torch.cat([x.reshape(-1) for x in p_t.values()])

        def kl_flat(f, p_t=p_t, t=t):
            new, i = {}, 0
            for k, x in p_t.items():
                new[k] = f[i : i + x.numel()].reshape(x.shape)
                i += x.numel()
            return pol.kl(p_t, new, obs[t]).mean()

        hess = torch.autograd.functional.hessian(kl_flat, flat)
        v_t = torch.cat([v[k][t].reshape(-1) for k in p_t])
        got = torch.cat([out[k][t].reshape(-1) for k in p_t])
        assert torch.allclose(got, hess @ v_t, atol=1e-5)


def test_activations_cover_the_config_names_and_agree_with_their_modules():
    assert set(ACTIVATIONS) == set(NONLINEARITIES)
    x = torch.linspace(-3, 3, 13)
    for name, (fn, module) in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), module()(x), rtol=0, atol=0, msg=name)
    assert torch.equal(ACTIVATIONS["relu"][0](x), x.clamp(min=0))
    sinh, cosh = (x.exp() - (-x).exp()) / 2, (x.exp() + (-x).exp()) / 2
    torch.testing.assert_close(ACTIVATIONS["tanh"][0](x), sinh / cosh)
