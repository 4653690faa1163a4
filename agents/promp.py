"""ProMP's outer step (Rothfuss et al. 2019; ``outer: ppo``): several Adam steps per
iteration on a clipped objective with a KL penalty at the inner steps' sampling policies.

With theta_old the parameters that sampled the iteration's episodes, phi_k(theta) the
re-adapted path on the stored inner batches D_0 .. D_{K-1} (no re-sampling) and D_K the
validation batch sampled with phi_K(theta_old):

    J(theta) = mean_t [ -mean_{D_K} min(r A, clip(r, 1 - eps, 1 + eps) A) ]
               + mean_k eta_k mean_t mean_{D_k} KL(pi_{phi_k(theta_old)} || pi_{phi_k(theta)})
    r = pi_{phi_K(theta)}(a|s) / pi_{phi_K(theta_old)}(a|s)

(``clip-eps``; eta_k = ``kl-penalty``, one per inner step, k = 0 the pre-update policy).
One iteration takes ``ppo-steps`` Adam steps of ``outer-lr`` on J; each re-adapts phi_k(theta)
with the inner step size fast-lr and takes grad J = mean_t sum_k J_k^T grad_{phi_k} J_t with
the configured estimator, J_k = d phi_k / d theta (one path_vjp: the KL terms' products cost
nothing beyond the meta-gradient's own). No J product enters a trust region here, so the
estimator's are the whole second-order cost of the step. With ``kl-target`` set, each
eta_k is halved when the step's KL after the iteration is below kl-target / 1.5 and
doubled above 1.5 x kl-target (ProMP's adaptive penalty). Adam's moments and the eta_k are
the state a checkpoint keeps (:meth:`PPOStep.state_dict`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value

from binom_rl.agents.estimator import Estimator
from binom_rl.agents.inner_loop import AdaptationResult, InnerLoop, check_finite
from binom_rl.agents.losses import PolicyLosses
from binom_rl.agents.phases import PhaseTimer
from binom_rl.agents.policies import Policy
from binom_rl.config import Config
from binom_rl.metagrad import Params
from binom_rl.rl import flatten_params, masked_mean_per_task


def adapt_kl_penalty(penalty: float, kl: float, target: float) -> float:
    """ProMP's rule for one eta: halve below target / 1.5, double above 1.5 x target."""
    if kl < target / 1.5:
        return penalty / 2.0
    if kl > target * 1.5:
        return penalty * 2.0
    return penalty


class PPOStep:
    """ProMP's meta-update: ``ppo-steps`` Adam steps per iteration (see the module)."""

    def __init__(
        self,
        cfg: Config,
        policy: Policy,
        losses: PolicyLosses,
        inner: InnerLoop,
        estimator: Estimator,
        phases: PhaseTimer,
    ):
        self.cfg, self.policy, self.losses = cfg, policy, losses
        self.inner, self.estimator, self.phases = inner, estimator, phases
        self.kl_penalty = [float(cfg.kl_penalty)] * cfg.num_steps  # eta_k, k = 0..K-1
        # Adam over leaf copies of the parameters, made on the first step (its shapes).
        self._names: list[str] = []
        self._leaves: list[Tensor] = []
        self._optimizer: torch.optim.Adam | None = None
        self._saved_adam: dict[str, Any] | None = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Adam's state (None before the first step) and the current eta_k."""
        adam = self._optimizer.state_dict() if self._optimizer is not None else self._saved_adam
        return {"adam": adam, "kl_penalty": list(self.kl_penalty)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Adam's state is applied on the next step)."""
        if set(state) != {"adam", "kl_penalty"}:
            raise ValueError(f"not an outer ppo state: keys {sorted(state)}")
        if len(state["kl_penalty"]) != self.cfg.num_steps:
            raise ValueError(
                f"outer ppo state has {len(state['kl_penalty'])} KL penalties for "
                f"num-steps {self.cfg.num_steps}"
            )
        self.kl_penalty = [float(x) for x in state["kl_penalty"]]
        self._optimizer = None
        self._saved_adam = state["adam"]

    def _adam_on(self, params: Params) -> torch.optim.Adam:
        """The Adam optimiser with its parameters set to ``params``."""
        if self._optimizer is None:
            self._names = list(params)
            self._leaves = [params[k].detach().clone().requires_grad_(True) for k in self._names]
            self._optimizer = torch.optim.Adam(self._leaves, lr=self.cfg.outer_lr)
            if self._saved_adam is not None:
                self._optimizer.load_state_dict(self._saved_adam)
                self._saved_adam = None
        with torch.no_grad():
            for name, leaf in zip(self._names, self._leaves, strict=True):
                leaf.copy_(params[name])
        return self._optimizer

    def _current(self) -> Params:
        return {k: leaf.detach().clone() for k, leaf in zip(self._names, self._leaves, strict=True)}

    # ------------------------------------------------------------------ objective

    def _kl_losses(self, params: Params, data: dict[str, Any]) -> Tensor:
        return self.losses.kl(self.policy.dist_params(params, data["obs"]), data)

    def _clipped(self, params: Params, valid: dict[str, Any]) -> Tensor:
        dist = self.policy.dist_params(params, valid["obs"])
        return self.losses.clipped_surrogate(dist, valid, self.cfg.clip_eps)

    def _clipped_of_dist(self, dist: Any, data: dict[str, Any]) -> Tensor:
        return self.losses.clipped_surrogate(dist, data, self.cfg.clip_eps)

    def objective_gradients(
        self, path: list[Params], inner_data: list, valid: dict[str, Any], at_old: bool,
        outer_grads: Params | None = None,
    ) -> tuple[list[Params | None], float]:  # fmt: skip
        """Per-task gradients of J at each path point phi_0 .. phi_K (None: no term), and J.
        ``at_old``: theta = theta_old, where the ratios are 1 (J's first term is -mean(A))
        and every KL term is at its minimum (gradient and value 0, left out); there
        ``outer_grads`` may give the clipped term's gradients at phi_K, already computed."""
        num_steps, num_tasks = self.cfg.num_steps, next(iter(path[-1].values())).shape[0]
        with self.phases("outer objective"):
            if at_old and outer_grads is not None:
                clipped = -masked_mean_per_task(valid["advantages"], valid["mask"]).sum()
                grads = outer_grads
            else:
                clipped_sum = lambda p: self._clipped(p, valid).sum()  # noqa: E731
                grads, clipped = grad_and_value(clipped_sum)(path[-1])
            step_grads: list[Params | None] = [None] * num_steps + [grads]
            objective = float(clipped) / num_tasks
            if at_old:
                return step_grads, objective
            for k in range(num_steps):
                weight = self.kl_penalty[k] / num_steps
                if weight == 0.0:
                    continue
                kl_sum = lambda p, k=k: self._kl_losses(p, inner_data[k]).sum()  # noqa: E731
                g, kl = grad_and_value(kl_sum)(path[k])
                step_grads[k] = {name: weight * v for name, v in g.items()}
                objective += weight * float(kl) / num_tasks
            return step_grads, objective

    # ------------------------------------------------------------------ the step

    def step(
        self, params: Params, adaptation: AdaptationResult, diagnose: bool = False
    ) -> tuple[Params, dict[str, float]]:
        """``ppo-steps`` Adam steps of ``params`` on the stored episodes; new params and metrics."""
        cfg = self.cfg
        inner_data = adaptation.inner_data
        # the validation batch and the clipped term's gradient at theta_old, where the ratio
        # is 1, from one forward pass
        valid, outer_grads = self.inner.outer_batch_and_gradient(
            adaptation.episodes[-1], adaptation.path[-1], self._clipped_of_dist
        )
        optimizer = self._adam_on(params)
        metrics: dict[str, float] = {}
        objective_before = 0.0
        for i in range(cfg.ppo_steps):
            if i == 0:  # theta_old: the sampled path, and its kept graphs
                path, hessians = adaptation.path, adaptation.hessians
                adaptation.hessians = None
            else:
                keep = self.estimator.keeps_hessians()
                path, hessians = self.inner.readapt(self._current(), inner_data, keep)
            step_grads, objective = self.objective_gradients(
                path, inner_data, valid, at_old=i == 0, outer_grads=outer_grads
            )
            g = self.estimator.meta_gradient(path, inner_data, step_grads, hessians)
            del hessians  # free the inner steps' graphs before the next re-adaptation
            check_finite(f"meta-gradient of Adam step {i + 1}", g)
            if i == 0:
                objective_before = objective
                g_flat = flatten_params(g)
                metrics["metagrad/norm"] = float(g_flat.norm())
                if diagnose:
                    metrics.update(self.estimator.diagnose(path, inner_data, step_grads, g_flat))
            with self.phases("Adam updates"):
                for name, leaf in zip(self._names, self._leaves, strict=True):
                    leaf.grad = g[name].detach().clone()
                optimizer.step()
        new_params = self._current()
        check_finite("updated meta-parameters", new_params)
        metrics.update(self._after(new_params, inner_data, valid, objective_before))
        return new_params, metrics

    def _after(
        self, params: Params, inner_data: list, valid: dict[str, Any], objective_before: float
    ) -> dict[str, float]:
        """KLs and surrogate at the updated parameters, and the eta rule (kl-target)."""
        cfg = self.cfg
        path, _ = self.inner.readapt(params, inner_data)
        with self.phases("outer objective"), torch.no_grad():
            dist = self.policy.dist_params(path[-1], valid["obs"])
            clipped = self.losses.clipped_surrogate(dist, valid, cfg.clip_eps).mean()
            log_prob = self.policy.log_prob_dist(dist, valid["actions"])
            ratio = torch.exp(log_prob - valid["old_log_prob"])
            outside = ((ratio - 1.0).abs() > cfg.clip_eps).to(ratio.dtype)
            metrics = {
                "train/kl": float(self.losses.kl(dist, valid).mean()),
                "train/surrogate_improvement": objective_before - float(clipped),
                "train/clip_fraction": float(masked_mean_per_task(outside, valid["mask"]).mean()),
            }
            inner_kls = [
                float(self._kl_losses(phi, d).mean())
                for phi, d in zip(path[:-1], inner_data, strict=True)
            ]
        for k, kl in enumerate(inner_kls):
            metrics[f"train/inner_kl_step_{k}"] = kl
            metrics[f"train/kl_penalty_step_{k}"] = self.kl_penalty[k]
        if cfg.kl_target is not None:
            with self.phases("Adam updates"):
                self.kl_penalty = [
                    adapt_kl_penalty(eta, kl, cfg.kl_target)
                    for eta, kl in zip(self.kl_penalty, inner_kls, strict=True)
                ]
        return metrics
