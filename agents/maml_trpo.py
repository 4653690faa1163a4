"""Meta-learner: the inner loop shared by every outer step, and the configured outer step.

One meta-iteration, top to bottom (:meth:`MetaLearner.meta_iteration`):

1. sample ``meta-batch-size`` tasks;
2. for k = 0..K-1: sample ``fast-batch-size`` episodes per task with phi_k, fit the
   baseline, take the inner step phi_{k+1} = phi_k - a grad L_in(phi_k) with the inner loss
   (``inner-loss``: vpg, lvc or dice; all tasks batched)  -- ``agents/inner_loop.py``;
3. sample validation episodes with phi_K;
4. the outer step (``outer``) on the stored episodes: ``trpo`` (MAML-TRPO,
   ``agents/trpo.py``) or ``ppo`` (ProMP, ``agents/promp.py``), each taking its
   meta-gradients from the configured estimator (``agents/estimator.py``).

The estimator (maml, fomaml, trunc L, binom L) only changes how J products are computed;
everything else, MAML-TRPO included, is the same code path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from binom_rl.agents.estimator import Estimator
from binom_rl.agents.estimator import compare_to_exact as _compare_to_exact  # noqa: F401
from binom_rl.agents.inner_loop import (  # noqa: F401  (re-exported: the learner's public names)
    AdaptationResult,
    InnerLoop,
    NonFiniteError,
    derive_seed,
)
from binom_rl.agents.inner_loop import check_finite as _check_finite  # noqa: F401
from binom_rl.agents.losses import PolicyLosses
from binom_rl.agents.phases import PhaseTimer
from binom_rl.agents.phases import sync as _sync
from binom_rl.agents.policies import Policy, make_policy
from binom_rl.agents.promp import PPOStep
from binom_rl.agents.trpo import TRPOStep, fvp_subsample  # noqa: F401
from binom_rl.config import Config
from binom_rl.metagrad import HessianProduct, Params, TaskBatchedLoss, task_gradients
from binom_rl.runtime import peak_memory_mb
from binom_rl.sampler import Episodes, MultiTaskSampler

OUTER_STEPS = {"trpo": TRPOStep, "ppo": PPOStep}


class MetaLearner:
    """Meta-RL with a pluggable inner loss (``cfg.inner_loss``), outer step (``cfg.outer``)
    and meta-gradient estimator (``cfg.estimator``, ``cfg.order``).

    Parts: ``inner`` (:class:`~binom_rl.agents.inner_loop.InnerLoop`: sampling, batching,
    inner steps), ``estimator`` (:class:`~binom_rl.agents.estimator.Estimator`: J products),
    ``outer`` (:class:`~binom_rl.agents.trpo.TRPOStep` or
    :class:`~binom_rl.agents.promp.PPOStep`: ``step(params, adaptation)``, ``state_dict()``),
    ``phases`` (:class:`~binom_rl.agents.phases.PhaseTimer`, what the profiler turns on).
    ``inner_loss`` is a :class:`TaskBatchedLoss`: ``learner.inner_loss(params, data)`` is one
    task's loss, ``learner.inner_loss.fn`` the losses of a task-batched ``params`` and ``data``.
    """

    def __init__(self, cfg: Config, sampler: MultiTaskSampler, policy: Policy | None = None):
        self.cfg = cfg
        self.sampler = sampler
        self.device = torch.device(cfg.device)
        self.policy = policy or make_policy(
            sampler.observation_space,
            sampler.action_space,
            cfg.hidden_sizes,
            cfg.nonlinearity,
            cfg.init_std,
            cfg.init_output_scale,
        )
        self.phases = PhaseTimer(self.device)
        self.losses = PolicyLosses(self.policy)
        self.inner = InnerLoop(cfg, sampler, self.policy, self.losses, self.phases, self.device)
        self.estimator = Estimator(cfg, self.inner.loss, self.policy, self.device, self.phases)
        self.outer: TRPOStep | PPOStep = OUTER_STEPS[cfg.outer](
            cfg, self.policy, self.losses, self.inner, self.estimator, self.phases
        )

    def init_params(self, seed: int) -> Params:
        params = self.policy.init_params(seed)
        return {k: v.to(self.device) for k, v in params.items()}

    # ------------------------------------------------------------------ the parts' entry points
    # (one line each: the scripts, benchmarks and tests call the learner)

    @property
    def inner_loss(self) -> TaskBatchedLoss:
        return self.inner.loss

    def adapt(
        self, params: Params, tasks: Sequence[dict], num_steps: int, seed: int,
        keep_hessians: bool = False, step_sizes: Sequence[float] | None = None,
    ) -> AdaptationResult:  # fmt: skip
        """:meth:`InnerLoop.adapt <binom_rl.agents.inner_loop.InnerLoop.adapt>`."""
        return self.inner.adapt(params, tasks, num_steps, seed, keep_hessians, step_sizes)

    def _batch(self, episodes: Episodes) -> dict[str, Tensor]:
        return self.inner.batch(episodes)

    def outer_batch(self, episodes: Episodes, phi_old: Params) -> dict[str, Any]:
        return self.inner.outer_batch(episodes, phi_old)

    def keeps_hessians(self) -> bool:
        return self.estimator.keeps_hessians()

    def alpha_hessian_norms(
        self, prefix: str, path: list[Params], inner_data: list
    ) -> dict[str, float]:
        return self.estimator.alpha_hessian_norms(prefix, path, inner_data)

    def meta_gradient(
        self,
        path: list[Params],
        inner_data: list,
        outer_data: dict,
        method: str | None = None,
        hessians: list[HessianProduct] | None = None,
    ) -> Params:
        """mean_t J_t^T grad L_out(phi_K^t), L_out TRPO's surrogate on ``outer_data``."""
        trpo = self.outer if isinstance(self.outer, TRPOStep) else self._trpo()
        g_phi = task_gradients(trpo.outer_loss, path[-1], outer_data)
        step_grads = [None] * (len(path) - 1) + [g_phi]
        return self.estimator.meta_gradient(path, inner_data, step_grads, hessians, method)

    def trpo_step(
        self, params: Params, adaptation: AdaptationResult, diagnose: bool = False
    ) -> tuple[Params, dict[str, float]]:
        """One TRPO meta-update (``outer: trpo``'s step) from stored episodes."""
        trpo = self.outer if isinstance(self.outer, TRPOStep) else self._trpo()
        return trpo.step(params, adaptation, diagnose)

    def _trpo(self) -> TRPOStep:
        return TRPOStep(self.cfg, self.policy, self.losses, self.inner, self.estimator, self.phases)

    # ------------------------------------------------------------------ one iteration

    def meta_iteration(
        self, params: Params, iteration: int, diagnose: bool = False
    ) -> tuple[Params, dict[str, float]]:
        """Sample tasks, adapt, and take one outer step. Returns new params and metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        tasks = self.sampler.sample_tasks(
            cfg.meta_batch_size, seed=derive_seed(cfg.seed, iteration, 0)
        )
        adaptation = self.inner.adapt(
            params,
            tasks,
            cfg.num_steps,
            seed=derive_seed(cfg.seed, iteration, 1),
            keep_hessians=self.estimator.keeps_hessians(),
        )
        _sync(self.device)
        t1 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        new_params, metrics = self.outer.step(params, adaptation, diagnose=diagnose)
        _sync(self.device)
        t2 = time.perf_counter()
        for k, eps in enumerate(adaptation.episodes):
            metrics[f"returns/step_{k}"] = float(eps.returns.mean())
            # mean episode length: below the horizon where episodes end early (an Ant that falls)
            metrics[f"episodes/length_step_{k}"] = float(eps.lengths.double().mean())
            if eps.successes is not None:  # fraction of the episodes that succeeded
                metrics[f"success/step_{k}"] = float(eps.successes.float().mean())
        metrics["time/sampling_s"] = t1 - t0
        metrics["time/meta_step_s"] = t2 - t1
        metrics["memory/peak_mb"] = peak_memory_mb(self.device)
        return new_params, metrics
