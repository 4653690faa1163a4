"""The CUDA path: meta-gradients, CG and one MAML-TRPO meta-iteration on the GPU against CPU.

Every CUDA test is skipped where torch.cuda is unavailable. The comparison helpers take
the device as an argument, and their CPU-against-CPU runs (at the bottom, tiny) keep the
harness itself tested on machines without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from binom_rl.agents.maml_trpo import AdaptationResult, MetaLearner
from binom_rl.config import Config
from binom_rl.metagrad import batched_adapt, batched_meta_gradient, batched_meta_jvp
from binom_rl.rl import cg_solve
from binom_rl.sampler import Episodes, MultiTaskSampler

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NAV = "binom_rl/2DNavigation-v0"


# --------------------------------------------------------------------------- helpers


def _mlp_problem(num_tasks: int, num_steps: int, device: str, dtype=torch.float64, seed=0):
    """A tanh MLP regression meta-batch (params, inner data [T, n, ...], outer data)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    params = {
        "w0": randn(8, 3) * 0.5,
        "b0": randn(8) * 0.1,
        "w1": randn(2, 8) * 0.5,
        "b1": randn(2),
    }
    inner = [{"x": randn(num_tasks, 16, 3), "y": randn(num_tasks, 16, 2)} for _ in range(num_steps)]
    outer = {"x": randn(num_tasks, 16, 3), "y": randn(num_tasks, 16, 2)}
    return params, inner, outer


def _mlp_loss(params, data):
    h = torch.tanh(data["x"] @ params["w0"].T + params["b0"])
    return ((h @ params["w1"].T + params["b1"] - data["y"]) ** 2).mean()


def _meta_gradients(device: str, method: str, order: int | None, num_steps: int = 3):
    params, inner, outer = _mlp_problem(4, num_steps, device)
    kwargs = dict(step_size=0.3, method=method, order=order)
    grad = batched_meta_gradient(_mlp_loss, _mlp_loss, params, inner, outer, **kwargs)
    path = batched_adapt(_mlp_loss, params, inner, step_size=0.3)
    jvp = batched_meta_jvp(_mlp_loss, path, inner, params, **kwargs)
    return {k: v.cpu() for k, v in grad.items()}, {k: v.cpu() for k, v in jvp.items()}


def _cg_solution(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    a = (m @ m.T + 30 * torch.eye(30, dtype=torch.float64)).to(device)
    b = torch.randn(30, generator=gen, dtype=torch.float64).to(device)
    x = cg_solve(lambda v: a @ v, b, iters=40, residual_tol=1e-28).x
    return x.cpu(), torch.linalg.solve(a.cpu(), b.cpu())


def _tiny_config(device: str, **overrides) -> Config:
    raw = dict(
        env_name=NAV,
        max_episode_steps=10,
        meta_batch_size=3,
        fast_batch_size=4,
        num_steps=2,
        estimator="binom",
        order=1,
        hidden_sizes=[8, 8],
        device=device,
        seed=1,
    )
    raw.update(overrides)
    return Config(**raw)


def _to(x: torch.Tensor | None, device: str) -> torch.Tensor | None:
    """On ``device``, floating tensors in float64: the TRPO step solves an ill-conditioned
    system by CG, where float32 rounding differences between devices grow to percents.
    None (Episodes.successes of envs without success) stays None."""
    if x is None:
        return None
    return x.to(device, torch.float64) if x.is_floating_point() else x.to(device)


def _episodes_to(episodes: Episodes, device: str) -> Episodes:
    return Episodes(**{f.name: _to(getattr(episodes, f.name), device) for f in fields(episodes)})


def _adaptation_to(adaptation: AdaptationResult, device: str) -> AdaptationResult:
    return AdaptationResult(
        episodes=[_episodes_to(e, device) for e in adaptation.episodes],
        inner_data=[{k: _to(v, device) for k, v in d.items()} for d in adaptation.inner_data],
        path=[{k: _to(v, device) for k, v in p.items()} for p in adaptation.path],
    )


def _trpo_step_on(device: str, estimator: str = "binom", order: int = 1):
    """Adapt on CPU (the sampler's random actions depend on the generator's device), then
    take the same TRPO step from the same stored episodes on CPU and on ``device``."""
    results = {}
    with MultiTaskSampler(NAV, max_episode_steps=10) as sampler:
        cfg = _tiny_config("cpu", estimator=estimator, order=order)
        learner = MetaLearner(cfg, sampler)
        params = learner.init_params(cfg.seed)
        tasks = sampler.sample_tasks(cfg.meta_batch_size, seed=2)
        adaptation = learner.adapt(params, tasks, cfg.num_steps, seed=3)
        for key, where in (("cpu", "cpu"), ("device", device)):
            cfg_d = _tiny_config(where, estimator=estimator, order=order)
            learner_d = MetaLearner(cfg_d, sampler, policy=learner.policy)
            new, metrics = learner_d.trpo_step(
                {k: _to(v, where) for k, v in params.items()}, _adaptation_to(adaptation, where)
            )
            results[key] = ({k: v.cpu() for k, v in new.items()}, metrics)
    return {k: v.double() for k, v in params.items()}, results["cpu"], results["device"]


def _assert_steps_close(params, cpu, dev):
    (new_cpu, m_cpu), (new_dev, m_dev) = cpu, dev
    assert m_cpu["train/ls_tries"] == m_dev["train/ls_tries"]
    step_cpu = torch.cat([(new_cpu[k] - params[k].cpu()).reshape(-1) for k in params])
    step_dev = torch.cat([(new_dev[k] - params[k].cpu()).reshape(-1) for k in params])
    assert step_cpu.norm() > 0  # the step was accepted: the comparison is not vacuous
    rel = (step_dev - step_cpu).norm() / step_cpu.norm()
    # CG stops once r.r <= 1e-10 (binom_rl.rl.cg_solve): on a tiny problem the two
    # devices may stop an iteration apart, which moves the step by ~1e-5 relative (seen on an
    # H200 in float64: 8e-6 and 1.4e-5; float32 gave 4e-2, hence float64 here).
    assert rel < 1e-4, rel
    assert math.isclose(m_cpu["metagrad/norm"], m_dev["metagrad/norm"], rel_tol=1e-3)
    assert math.isclose(m_cpu["train/kl"], m_dev["train/kl"], rel_tol=2e-2, abs_tol=1e-6)


# --------------------------------------------------------------------------- CUDA tests


@cuda
@pytest.mark.parametrize(("method", "order"), [("maml", None), ("binom", 1), ("binom", 2)])
def test_metagrad_cuda_equals_cpu_float64(method, order):
    grad_cpu, jvp_cpu = _meta_gradients("cpu", method, order)
    grad_gpu, jvp_gpu = _meta_gradients("cuda", method, order)
    for k in grad_cpu:
        torch.testing.assert_close(grad_gpu[k], grad_cpu[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(jvp_gpu[k], jvp_cpu[k], rtol=1e-9, atol=1e-12)


@cuda
def test_metagrad_cuda_trunc_and_reverse_steps():
    # trunc keeps a suffix of the steps; meta_jvp walks them in reverse (slice + flip)
    grad_cpu, jvp_cpu = _meta_gradients("cpu", "trunc", 2, num_steps=4)
    grad_gpu, jvp_gpu = _meta_gradients("cuda", "trunc", 2, num_steps=4)
    for k in grad_cpu:
        torch.testing.assert_close(grad_gpu[k], grad_cpu[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(jvp_gpu[k], jvp_cpu[k], rtol=1e-9, atol=1e-12)


@cuda
def test_conjugate_gradient_cuda():
    x, expected = _cg_solution("cuda")
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-10)


@cuda
@pytest.mark.parametrize(("estimator", "order"), [("binom", 1), ("maml", 2)])
def test_trpo_step_cuda_matches_cpu(estimator, order):
    _assert_steps_close(*_trpo_step_on("cuda", estimator, order))


@cuda
def test_meta_iteration_cuda_runs():
    cfg = _tiny_config("cuda", chunk_size="auto", diagnose_every=1)
    with MultiTaskSampler(NAV, max_episode_steps=10, device="cuda") as sampler:
        learner = MetaLearner(cfg, sampler)
        params = learner.init_params(cfg.seed)
        assert all(v.is_cuda for v in params.values())
        new, metrics = learner.meta_iteration(params, 0, diagnose=True)
    assert all(v.is_cuda and torch.isfinite(v).all() for v in new.values())
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["memory/peak_mb"] > 0
    assert metrics["metagrad/cosine_to_exact"] > 0.9
    assert metrics["train/kl"] <= cfg.max_kl


@cuda
def test_sampler_on_cuda_returns_cuda_episodes():
    with MultiTaskSampler(NAV, max_episode_steps=5, device="cuda") as sampler:
        tasks = sampler.sample_tasks(2, seed=0)

        def act(obs, generator):
            assert obs.is_cuda and generator.device.type == "cuda"
            return torch.randn(obs.shape, generator=generator, device=obs.device)

        ep = sampler.sample(tasks, act, batch_size=3, seed=1)
    assert all(getattr(ep, f.name).is_cuda for f in fields(ep))


# --------------------------------------------------------------------------- harness on CPU


def test_harness_cpu_against_cpu():
    grad_a, jvp_a = _meta_gradients("cpu", "binom", 2)
    grad_b, jvp_b = _meta_gradients("cpu", "maml", None)
    assert grad_a.keys() == grad_b.keys() and jvp_a.keys() == jvp_b.keys()
    x, expected = _cg_solution("cpu")
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-10)
    _assert_steps_close(*_trpo_step_on("cpu"))
