"""ProMP's outer step (outer: ppo) at tiny sizes: its meta-gradient against autograd
through the unrolled inner loop, Adam's first step by hand, the adaptive KL penalty,
resume with Adam's state, and every inner loss x outer loop x estimator training."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._pytree import tree_map

from binom_rl.agents.maml_trpo import MetaLearner, derive_seed
from binom_rl.agents.promp import PPOStep, adapt_kl_penalty
from binom_rl.agents.training import CHECKPOINT_FILE, train
from binom_rl.checkpoint import load_checkpoint, save_checkpoint
from binom_rl.config import Config, ConfigError
from binom_rl.rl import flatten_params
from binom_rl.sampler import MultiTaskSampler
from tests.helpers.files import listing

NAV = "binom_rl/2DNavigation-v0"
TINY = {
    "env-name": NAV,
    "max-episode-steps": 10,
    "hidden-sizes": [8],
    "meta-batch-size": 3,
    "fast-batch-size": 4,
    "num-batches": 3,
    "cg-iters": 3,
    "outer": "ppo",
    "seed": 3,
}


@pytest.fixture(scope="module")
def sampler():
    with MultiTaskSampler(NAV, max_episode_steps=10) as s:
        yield s


def _learner(sampler, **overrides) -> MetaLearner:
    return MetaLearner(Config.from_dict({**TINY, **overrides}), sampler)


def _adapted(learner: MetaLearner, seed: int = 0):
    params = learner.init_params(learner.cfg.seed)
    tasks = learner.sampler.sample_tasks(learner.cfg.meta_batch_size, seed=derive_seed(seed, 0))
    adaptation = learner.adapt(params, tasks, learner.cfg.num_steps, seed=derive_seed(seed, 1))
    valid = learner.outer_batch(adaptation.episodes[-1], adaptation.path[-1])
    return params, adaptation, valid


def _task(data, t):
    return tree_map(lambda x: x[t], data)


def _unrolled_objective(learner: MetaLearner, theta, inner_data, valid):
    """ProMP's J(theta) by plain autograd through the inner steps (create_graph), each step
    with fast-lr: mean over tasks of the clipped surrogate at phi_K plus
    mean_k kl-penalty_k x KL at phi_k on D_k."""
    cfg, outer = learner.cfg, learner.outer
    num_tasks = cfg.meta_batch_size
    total = 0.0
    for t in range(num_tasks):
        phi = dict(theta)
        for k, data in enumerate(inner_data):
            d = _task(data, t)
            kl = outer.losses.kl(learner.policy.dist_params(phi, d["obs"]), tree_map(
                lambda x: x.unsqueeze(0), d))[0]  # fmt: skip
            total = total + outer.kl_penalty[k] / cfg.num_steps * kl / num_tasks
            loss = learner.inner_loss(phi, d)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {n: v - cfg.fast_lr * g for (n, v), g in zip(phi.items(), grads, strict=True)}
        v = tree_map(lambda x, t=t: x[t].unsqueeze(0), valid)
        one = {n: x.unsqueeze(0) for n, x in phi.items()}
        dist = learner.policy.dist_params(one, v["obs"])
        total = total + outer.losses.clipped_surrogate(dist, v, cfg.clip_eps)[0] / num_tasks
    return total


@pytest.mark.parametrize("inner_loss", ["vpg", "lvc", "dice"])
@pytest.mark.parametrize("estimator,order", [("maml", None), ("binom", 2)])
def test_meta_gradient_equals_unrolled_autograd_away_from_theta_old(
    sampler, inner_loss, estimator, order
):
    """At theta != theta_old (where the KL penalties at phi_0 and phi_1 have gradients and
    the ratios move off 1), grad J from the step's per-point gradients and the exact
    estimator's path_vjp equals autograd through the unrolled inner loop, K = 2."""
    overrides = {"num-steps": 2, "inner-loss": inner_loss, "estimator": estimator,
                 "kl-penalty": 0.5} | ({"order": order} if order else {})  # fmt: skip
    learner = _learner(sampler, **overrides)
    params, adaptation, valid = _adapted(learner, seed=1)
    g = torch.Generator().manual_seed(0)
    theta = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    path, _ = learner.inner.readapt(theta, adaptation.inner_data)
    step_grads, objective = learner.outer.objective_gradients(
        path, adaptation.inner_data, valid, at_old=False
    )
    got = learner.estimator.meta_gradient(path, adaptation.inner_data, step_grads)

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    want_objective = _unrolled_objective(learner, leaves, adaptation.inner_data, valid)
    want = torch.autograd.grad(want_objective, list(leaves.values()))
    assert objective == pytest.approx(float(want_objective.detach()), rel=1e-4, abs=1e-7)
    assert any(sg is not None for sg in step_grads[:-1])  # the KL terms are in
    for k, w in zip(leaves, want, strict=True):
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-6)


def test_binom_path_vjp_differs_from_exact_below_full_order(sampler):
    """binom L = 1 at K = 2 is an approximation of the same gradient: close, not equal."""
    learner = _learner(sampler, **{"num-steps": 2, "estimator": "binom", "order": 1,
                                   "kl-penalty": 0.5})  # fmt: skip
    params, adaptation, valid = _adapted(learner, seed=1)
    theta = {k: v + 0.05 for k, v in params.items()}
    path, _ = learner.inner.readapt(theta, adaptation.inner_data)
    step_grads, _ = learner.outer.objective_gradients(path, adaptation.inner_data, valid, False)
    approx = flatten_params(learner.estimator.meta_gradient(path, adaptation.inner_data,
                                                            step_grads))  # fmt: skip
    exact = flatten_params(
        learner.estimator.meta_gradient(path, adaptation.inner_data, step_grads, method="maml")
    )
    cos = float(approx @ exact / (approx.norm() * exact.norm()))
    assert 0.99 < cos < 1.0 - 1e-9


def test_first_adam_step_moves_every_weight_by_outer_lr_against_the_gradient(sampler):
    """Adam's first step from fresh moments is -lr g / (|g| + eps) per entry (bias
    corrections cancel): every parameter with a non-negligible gradient moves by outer-lr,
    against the meta-gradient's sign. So the step uses outer-lr (not fast-lr) and descends."""
    learner = _learner(sampler, **{"ppo-steps": 1, "outer-lr": 1e-3})
    params, adaptation, valid = _adapted(learner, seed=2)
    step_grads, _ = learner.outer.objective_gradients(
        adaptation.path, adaptation.inner_data, valid, at_old=True
    )
    g = flatten_params(
        learner.estimator.meta_gradient(adaptation.path, adaptation.inner_data, step_grads)
    )
    new_params, metrics = learner.outer.step(params, adaptation)
    delta = flatten_params(new_params) - flatten_params(params)
    big = g.abs() > 1e-5
    assert big.sum() > 0.5 * g.numel()
    torch.testing.assert_close(delta[big], -1e-3 * torch.sign(g[big]), rtol=1e-3, atol=0)
    assert metrics["metagrad/norm"] == pytest.approx(float(g.norm()), rel=1e-6)


def test_ppo_step_improves_the_clipped_surrogate_and_reports_its_kls(sampler):
    """Five Adam steps: the clipped surrogate at the re-adapted phi_K improves, and the
    reported KLs are those of the new parameters, recomputed here."""
    learner = _learner(sampler, **{"num-steps": 2, "inner-loss": "lvc", "outer-lr": 3e-3})
    params, adaptation, valid = _adapted(learner, seed=3)
    inner_data = adaptation.inner_data
    new_params, metrics = learner.outer.step(params, adaptation)
    assert metrics["train/surrogate_improvement"] > 0
    path, _ = learner.inner.readapt(new_params, inner_data)
    losses, policy = learner.outer.losses, learner.policy
    dist = policy.dist_params(path[-1], valid["obs"])
    assert metrics["train/kl"] == pytest.approx(float(losses.kl(dist, valid).mean()), rel=1e-5)
    before = float(losses.clipped_surrogate(policy.dist_params(adaptation.path[-1], valid["obs"]),
                                            valid, 0.3).mean())  # fmt: skip
    after = float(losses.clipped_surrogate(dist, valid, 0.3).mean())
    assert metrics["train/surrogate_improvement"] == pytest.approx(before - after, rel=1e-5)
    for k in range(2):
        d = inner_data[k]
        kl = float(losses.kl(policy.dist_params(path[k], d["obs"]), d).mean())
        assert metrics[f"train/inner_kl_step_{k}"] == pytest.approx(kl, rel=1e-5)
        assert metrics[f"train/kl_penalty_step_{k}"] == 5e-4  # fixed: no kl-target


@pytest.mark.parametrize(
    "kl,expected", [(0.001, 0.5), (0.0066, 0.5), (0.0067, 1.0), (0.015, 1.0), (0.0151, 2.0)]
)
def test_adaptive_kl_penalty_rule(kl, expected):
    """Target 0.01: halve below 0.01 / 1.5 = 0.00667, double above 0.015, else keep."""
    assert adapt_kl_penalty(1.0, kl, 0.01) == expected


def test_kl_target_adapts_each_steps_penalty_after_the_iteration(sampler):
    """A tiny target: every step's KL is above 1.5 x target, so every eta doubles (and the
    metrics report the eta the iteration used)."""
    learner = _learner(sampler, **{"num-steps": 2, "kl-penalty": 1e-3, "kl-target": 1e-9})
    params, adaptation, _ = _adapted(learner, seed=4)
    _, metrics = learner.outer.step(params, adaptation)
    assert [metrics[f"train/kl_penalty_step_{k}"] for k in range(2)] == [1e-3, 1e-3]
    assert all(metrics[f"train/inner_kl_step_{k}"] > 1.5e-9 for k in range(2))
    assert learner.outer.kl_penalty == [2e-3, 2e-3]
    state = learner.outer.state_dict()
    assert state["kl_penalty"] == [2e-3, 2e-3] and state["adam"]["state"]


def test_resume_with_adam_state_equals_uninterrupted(tmp_path):
    """3 iterations straight, or 2 then --resume for 1: the same parameters bit for bit (Adam's
    moments and step count come back from the checkpoint), also with an adaptive penalty."""
    cfg = Config.from_dict({**TINY, "num-steps": 2, "kl-target": 1e-4, "kl-penalty": 1e-3})
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "split", progress=False, stop_after=2)
    partial = load_checkpoint(tmp_path / "split" / CHECKPOINT_FILE)
    assert partial["iteration"] == 2 and partial["outer"]["adam"]["state"]
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT_FILE)
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT_FILE)
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=0, atol=0)
    assert b["outer"]["kl_penalty"] == a["outer"]["kl_penalty"]
    moments_a, moments_b = a["outer"]["adam"]["state"], b["outer"]["adam"]["state"]
    for i in moments_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(moments_b[i][name], moments_a[i][name], rtol=0, atol=0)


def test_resume_refuses_a_ppo_checkpoint_without_outer_state(tmp_path):
    """A checkpoint with no outer state is TRPO's: resuming it as outer ppo is refused
    before anything is written."""
    cfg = Config.from_dict(TINY)
    train(cfg, tmp_path, progress=False, stop_after=1)
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    del state["outer"]
    save_checkpoint(state, tmp_path / CHECKPOINT_FILE)
    before = listing(tmp_path)
    with pytest.raises(ConfigError, match="no outer-step state for outer ppo"):
        train(cfg, tmp_path, resume=True, progress=False)
    assert listing(tmp_path) == before


def test_state_dict_round_trip_and_bad_state(sampler):
    learner = _learner(sampler)
    fresh = PPOStep(learner.cfg, learner.policy, learner.losses, learner.inner,
                    learner.estimator, learner.phases)  # fmt: skip
    assert fresh.state_dict() == {"adam": None, "kl_penalty": [5e-4]}
    with pytest.raises(ValueError, match="not an outer ppo state"):
        fresh.load_state_dict({})
    with pytest.raises(ValueError, match="1 KL penalties for num-steps 2"):
        _learner(sampler, **{"num-steps": 2}).outer.load_state_dict(fresh.state_dict())


OUTERS = {"trpo-post": {"outer": "trpo"}, "trpo-pre": {"outer": "trpo", "trust-region": "pre"},
          "ppo": {"outer": "ppo"}}  # fmt: skip
ESTIMATORS = {"maml": {"estimator": "maml"}, "fomaml": {"estimator": "fomaml"},
              "trunc1": {"estimator": "trunc", "order": 1},
              "binom1": {"estimator": "binom", "order": 1},
              "binom2": {"estimator": "binom", "order": 2}}  # fmt: skip


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("outer", OUTERS)
@pytest.mark.parametrize("inner_loss", ["vpg", "lvc", "dice"])
def test_every_inner_loss_outer_loop_and_estimator_trains(sampler, inner_loss, outer, estimator):
    """One meta-iteration at K = 2 of each combination, with the diagnostics: finite
    metrics, parameters changed, the estimator's meta-gradient against the exact one (1 for
    the exact estimators)."""
    overrides = {"num-steps": 2, "inner-loss": inner_loss, "fvp-subsample": 2,
                 **OUTERS[outer], **ESTIMATORS[estimator]}  # fmt: skip
    learner = _learner(sampler, **overrides)
    params = learner.init_params(0)
    new_params, metrics = learner.meta_iteration(params, iteration=0, diagnose=True)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert (flatten_params(new_params) != flatten_params(params)).any()
    cos = metrics["metagrad/cosine_to_exact"]
    if estimator in ("maml", "binom2"):
        assert cos == pytest.approx(1.0, abs=1e-5)
    else:
        assert 0.5 < cos < 1.0


def test_unrolled_reference_uses_fast_lr(sampler):
    """The re-adapted path equals phi_{k+1} = phi_k - fast-lr grad L_k by hand (the step size
    learn2learn's ProMP example mixes up with the outer learning rate)."""
    learner = _learner(sampler, **{"num-steps": 2, "fast-lr": 0.3, "outer-lr": 1e-3})
    params, adaptation, _ = _adapted(learner, seed=5)
    path, _ = learner.inner.readapt(params, adaptation.inner_data)
    for t in range(learner.cfg.meta_batch_size):
        phi = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        for k, data in enumerate(adaptation.inner_data):
            loss = learner.inner_loss(phi, _task(data, t))
            grads = torch.autograd.grad(loss, list(phi.values()))
            phi = {n: (v - 0.3 * g).detach().requires_grad_(True)
                   for (n, v), g in zip(phi.items(), grads, strict=True)}  # fmt: skip
            for n in phi:
                torch.testing.assert_close(path[k + 1][n][t], phi[n].detach())


@pytest.mark.parametrize("inner_loss", ["vpg", "lvc"])
def test_first_adam_step_follows_the_trpo_meta_gradient(sampler, inner_loss):
    """At theta_old the clipped surrogate's ratio is 1 and the KL terms vanish, so ProMP's
    first meta-gradient is MAML-TRPO's on the same episodes: the two outer loops differ in
    how they step, not in where they start."""
    learner = _learner(sampler, **{"num-steps": 2, "inner-loss": inner_loss})
    _, adaptation, valid = _adapted(learner, seed=6)
    trpo = _learner(sampler, **{"num-steps": 2, "inner-loss": inner_loss, "outer": "trpo"})
    want = trpo.meta_gradient(adaptation.path, adaptation.inner_data, valid)
    step_grads, _ = learner.outer.objective_gradients(
        adaptation.path, adaptation.inner_data, valid, at_old=True
    )
    got = learner.estimator.meta_gradient(adaptation.path, adaptation.inner_data, step_grads)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
