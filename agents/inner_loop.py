"""What every outer loop shares: sampling the K + 1 batches, batching them for the losses,
and the K inner steps phi_{k+1} = phi_k - fast-lr * grad L_in(phi_k) (all tasks batched).

:meth:`InnerLoop.adapt` samples D_k with phi_k and steps on it, K times, then samples the
validation batch D_K with phi_K; :meth:`InnerLoop.readapt` repeats the K steps from another
theta on the stored batches (TRPO's line search, every PPO step). The batches are dicts of
task-major tensors (keys in ``agents/losses.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, vjp

from binom_rl.agents.baselines import LinearFeatureBaseline, compute_advantages
from binom_rl.agents.losses import PolicyLosses, dice_weights
from binom_rl.agents.phases import PhaseTimer
from binom_rl.agents.policies import Policy, batched_sample
from binom_rl.config import Config
from binom_rl.metagrad import (
    HessianProduct,
    Params,
    TaskBatchedLoss,
    batched_adapt,
    batched_inner_step,
    batched_inner_step_with_hessian,
)
from binom_rl.sampler import Episodes, MultiTaskSampler


class NonFiniteError(RuntimeError):
    """A NaN or inf appeared; the message names where."""


def derive_seed(*keys: int) -> int:
    """A 31-bit seed that depends only on ``keys`` (run seed, iteration, purpose, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)


def check_finite(where: str, *tensors: Tensor | dict) -> None:
    """NonFiniteError naming ``where`` if any tensor (or dict of tensors) has a NaN or inf."""
    for t in tensors:
        values = t.values() if isinstance(t, dict) else [t]
        for x in values:
            if not torch.isfinite(x).all():
                raise NonFiniteError(f"non-finite values (NaN/inf) in {where}")


def _task_major(x: Tensor) -> Tensor:
    """[H, T, B, ...] -> [T, H, B, ...]: the losses map over the leading task dim."""
    return x.movedim(1, 0)


@dataclass
class AdaptationResult:
    """What K inner steps on a batch of tasks produced."""

    episodes: list[Episodes]  # K + 1 batches: sampled with phi_0 .. phi_K
    inner_data: list[dict[str, Any]]  # K batches, task-major, for the inner loss
    path: list[Params]  # phi_0 .. phi_K, leading task dim
    # H_k products kept from the inner steps' own graphs (adapt(keep_hessians=True)),
    # for the meta-gradient; None when not kept or already used.
    hessians: list[HessianProduct] | None = None


class InnerLoop:
    """Sampling, batching and the inner steps with the configured inner loss.

    ``inner_old_policy``: whether the inner batches carry their sampling policy's
    ``old_log_prob`` / ``old_dist`` (lvc's ratio; ProMP's KL penalty and TRPO's pre-update
    trust region need the distribution); inner-loss dice adds ``dice_weights``.
    """

    def __init__(
        self,
        cfg: Config,
        sampler: MultiTaskSampler,
        policy: Policy,
        losses: PolicyLosses,
        phases: PhaseTimer,
        device: torch.device,
    ):
        self.cfg = cfg
        self.sampler = sampler
        self.policy = policy
        self.phases = phases
        self.device = device
        self.baseline = LinearFeatureBaseline()
        self.loss = TaskBatchedLoss(losses.inner(cfg.inner_loss))
        self.inner_old_policy = (
            cfg.inner_loss == "lvc" or cfg.outer == "ppo" or cfg.trust_region == "pre"
        )

    # ------------------------------------------------------------------ sampling

    def sample(self, tasks: Sequence[dict], phi: Params, seed: int) -> Episodes:
        """``fast-batch-size`` episodes per task with the task-batched policy ``phi``."""

        # a partial, not a closure over self: samplers whose workers run the policy pickle
        # it, and it should carry the policy and phi only
        phi = {k: v.to(self.sampler.act_device) for k, v in phi.items()}
        act = functools.partial(batched_sample, self.policy, phi)
        with self.phases("sampling"):
            episodes = self.sampler.sample(tasks, act, self.cfg.fast_batch_size, seed=seed)
            return episodes.to(self.device)

    def batch(self, episodes: Episodes) -> dict[str, Any]:
        """Task-major tensors for the losses, with baseline-fitted GAE advantages."""
        with self.phases("advantages"):
            advantages = compute_advantages(
                self.baseline,
                episodes.observations,
                episodes.rewards,
                episodes.mask,
                self.cfg.gamma,
                self.cfg.gae_lambda,
                normalize=True,
                task_dim=1,
            )
            return {
                "obs": _task_major(episodes.observations),
                "actions": _task_major(episodes.actions),
                "advantages": _task_major(advantages),
                "mask": _task_major(episodes.mask),
            }

    def inner_batch(self, episodes: Episodes, phi: Params) -> dict[str, Any]:
        """:meth:`batch` of episodes sampled with ``phi``, plus what the inner loss and the
        outer step need of them (see the class docstring)."""
        data = self.batch(episodes)
        with self.phases("advantages"):
            if self.cfg.inner_loss == "dice":
                time_major = data["advantages"].movedim(0, 1)
                weights = dice_weights(time_major, episodes.mask, self.cfg.gamma)
                data["dice_weights"] = _task_major(weights)
            if self.inner_old_policy:
                with torch.no_grad():
                    dist = self.policy.dist_params(phi, data["obs"])
                data = with_old_policy(self.policy, data, dist, "the inner episodes")
        return data

    def outer_batch(self, episodes: Episodes, phi_old: Params) -> dict[str, Any]:
        """The outer step's data: :meth:`batch` of the validation episodes plus pi_old =
        pi_{phi_K}, as the log-probabilities of the taken actions (for the ratio) and the
        distribution parameters (for the KL), each computed once."""
        valid = self.batch(episodes)
        with torch.no_grad():
            old_dist = self.policy.dist_params(phi_old, valid["obs"])
        return with_old_policy(self.policy, valid, old_dist, "the validation episodes")

    def outer_batch_and_gradient(
        self, episodes: Episodes, phi_old: Params, loss: Callable[[Any, dict], Tensor]
    ) -> tuple[dict[str, Any], Params]:
        """:meth:`outer_batch` and grad ``loss`` at phi_old for every task from one forward
        pass over the validation data: the pullback of pi_old's distribution parameters
        applied to d loss / d(dist). ``loss(dist, data)`` gives the per-task outer losses from
        the distribution parameters. Saves the forward pass a separate gradient would repeat."""
        valid = self.batch(episodes)
        with self.phases("outer objective"):
            old_dist, pullback = vjp(lambda p: self.policy.dist_params(p, valid["obs"]), phi_old)
            valid = with_old_policy(self.policy, valid, old_dist, "the validation episodes")
            d_dist = grad(lambda d: loss(d, valid).sum())(old_dist)
            return valid, pullback(d_dist)[0]

    # ------------------------------------------------------------------ inner steps

    def adapt(
        self,
        params: Params,
        tasks: Sequence[dict],
        num_steps: int,
        seed: int,
        keep_hessians: bool = False,
        step_sizes: Sequence[float] | None = None,
    ) -> AdaptationResult:
        """Sample and take ``num_steps`` inner steps per task; sample again after each.

        ``keep_hessians``: also keep each step's graph as its Hessian product, so that the
        meta-gradient does not rebuild it (the graphs live until the result drops them).
        ``step_sizes``: step k's size (one per step); None: fast-lr for every step, as in
        training.
        """
        if step_sizes is not None and len(step_sizes) != num_steps:
            raise ValueError(f"{len(step_sizes)} step sizes for {num_steps} inner steps")
        num_tasks = len(tasks)
        phi = {k: v.unsqueeze(0).expand(num_tasks, *v.shape) for k, v in params.items()}
        path, inner_data, episodes, hessians = [phi], [], [], []
        for k in range(num_steps + 1):
            episodes.append(self.sample(tasks, phi, derive_seed(seed, k)))
            if k == num_steps:
                break
            data = self.inner_batch(episodes[-1], phi)
            inner_data.append(data)
            step_size = step_sizes[k] if step_sizes is not None else None
            phi, hvp = self.step(phi, data, keep_hessians, step_size)
            if hvp is not None:
                hessians.append(hvp)
            check_finite(f"inner step {k + 1} parameters", phi)
            path.append(phi)
        return AdaptationResult(episodes, inner_data, path, hessians if keep_hessians else None)

    def step(
        self,
        phi: Params,
        data: dict[str, Any],
        keep_hessian: bool = False,
        step_size: float | None = None,
    ) -> tuple[Params, HessianProduct | None]:
        """phi - a * grad L_in(phi) per task (a: ``step_size``, default fast-lr), and
        H = hess L_in(phi) from the step's own graph if ``keep_hessian``."""
        a = self.cfg.fast_lr if step_size is None else step_size
        with self.phases("inner steps"):
            if keep_hessian:
                return batched_inner_step_with_hessian(self.loss, phi, data, step_size=a)
            return batched_inner_step(self.loss, phi, data, step_size=a), None

    def readapt(
        self, params: Params, inner_data: Sequence[dict[str, Any]], keep_hessians: bool = False
    ) -> tuple[list[Params], list[HessianProduct] | None]:
        """The path phi_0 .. phi_K of ``params`` on the stored inner batches (no sampling),
        and the steps' Hessian products if ``keep_hessians``."""
        if not keep_hessians:
            with self.phases("inner steps"):
                path = batched_adapt(self.loss, params, inner_data, step_size=self.cfg.fast_lr)
            return path, None
        num_tasks = next(iter(inner_data[0].values())).shape[0]
        phi = {k: v.unsqueeze(0).expand(num_tasks, *v.shape) for k, v in params.items()}
        path, hessians = [phi], []
        for data in inner_data:
            phi, hvp = self.step(phi, data, keep_hessian=True)
            path.append(phi)
            hessians.append(hvp)
        return path, hessians


def with_old_policy(
    policy: Policy, data: dict[str, Any], old_dist: Any, episodes: str
) -> dict[str, Any]:
    """``data`` with ``old_dist`` (the sampling policy's distribution parameters) and the
    log-probabilities of the taken actions under it, ``old_log_prob``; NonFiniteError
    naming ``episodes`` if those are not finite."""
    with torch.no_grad():
        data["old_log_prob"] = policy.log_prob_dist(old_dist, data["actions"])
    data["old_dist"] = old_dist
    check_finite(f"log-probabilities of {episodes}", data["old_log_prob"])
    return data
