"""Policy losses over a leading task dimension: the inner losses (vpg, lvc, dice), TRPO's
surrogate, PPO's clipped surrogate and the KL to the sampling policy.

Every loss takes params and data with a leading task dim T and returns T losses (the
meta-learner wraps them as :class:`~binom_rl.metagrad.TaskBatchedLoss`). Data are task-major
dicts ``[T, H, B, ...]`` with the keys

    obs, actions, advantages, mask        every batch (advantages: baseline-fitted GAE,
                                          normalised per task)
    old_log_prob, old_dist                log pi(a|s) and the distribution parameters of the
                                          policy that sampled the batch (the outer batch,
                                          and the inner ones where lvc, ProMP's KL penalty
                                          or TRPO's pre-update trust region need them)
    dice_weights                          the inner batches of inner-loss dice

The RL objective's Hessian splits into ProMP's (Rothfuss et al. 2019, eqs. 6-10) terms,
with l_t = log pi(a_t|s_t), G_t the return from t:

    H1 = E[sum_t grad l_t grad l_t^T G_t]   (the sampling distribution's own curvature)
    H2 = E[sum_t hess l_t G_t]              (the surrogate's)
    H12 + H12^T                             (pairs of different time steps)

Autodiff of each inner loss at the sampling policy estimates:

    vpg   -mean(l_t A_t)                                 gradient exact, Hessian H2
    lvc   -mean(pi / pi_old * A_t)                       gradient exact, Hessian H1 + H2
    dice  -mean(box(tau_t) w_t),  box(x) = exp(x - stopgrad(x)),  tau_t = sum_{t'<=t} l_t'
                                                         gradient and Hessian exact

(exact in expectation: tests/agents/test_losses.py checks them against an enumeration of
every trajectory). See :func:`dice_weights` for w_t and why its baseline keeps every
derivative unbiased.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from binom_rl.agents.policies import Policy
from binom_rl.metagrad import Params
from binom_rl.rl import masked_mean_per_task

Data = dict[str, Any]


def dice_weights(advantages: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """DiCE's per-step weights w_t = gamma^t A_t - gamma^(t+1) A_(t+1) (time-major [H, ...]).

    Their sums from t on telescope to gamma^t A_t, so the first derivative of
    sum_t box(tau_t) w_t is sum_t grad l_t gamma^t A_t: the policy gradient of the return
    discounted from t = 0. With A_t = G_t - V(s_t) (GAE with lambda 1), w_t = gamma^t (r_t +
    gamma V(s_(t+1)) - V(s_t)): the reward gamma^t r_t minus a baseline, and the baseline's
    terms regroup into box(tau_(t-1)) (1 - box(l_t)) gamma^t V(s_t), whose derivatives of every
    order vanish in expectation (the score identities of pi(.|s_t)): Mao et al.'s (2019)
    baseline for DiCE. A state baseline put directly under the cumulative box,
    box(tau_t) (gamma^t r_t - b(s_t)), would bias even the gradient: b(s_t) depends on the
    actions before t, whose scores box(tau_t) carries.
    """
    steps = torch.arange(advantages.shape[0], dtype=advantages.dtype, device=advantages.device)
    discount = (gamma**steps).reshape(-1, *[1] * (advantages.dim() - 1))
    discounted = discount * advantages * mask
    following = torch.cat([discounted[1:], torch.zeros_like(discounted[:1])])
    return (discounted - following) * mask


class PolicyLosses:
    """The losses of one policy; ``inner(name)`` picks an inner loss by its config name."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def inner(self, name: str):
        """The task-batched inner loss ``vpg``, ``lvc`` or ``dice``."""
        losses = {"vpg": self.vpg, "lvc": self.lvc, "dice": self.dice}
        if name not in losses:
            raise ValueError(f"unknown inner loss {name!r}; expected one of {sorted(losses)}")
        return losses[name]

    # ------------------------------------------------------------------ inner losses

    def vpg(self, params: Params, data: Data) -> Tensor:
        """-mean over valid steps of log pi(a|s) A, per task (MAML-RL's inner loss)."""
        log_prob = self.policy.log_prob(params, data["obs"], data["actions"])
        return -masked_mean_per_task(log_prob * data["advantages"], data["mask"])

    def lvc(self, params: Params, data: Data) -> Tensor:
        """-mean of pi(a|s) / pi_old(a|s) * A (ProMP's low-variance curvature loss, eq. 9):
        the ratio against the policy that sampled the batch, so the same gradient as vpg
        there, and re-adapting another theta (PPO steps, a line search) importance-weights
        the stored episodes."""
        log_prob = self.policy.log_prob(params, data["obs"], data["actions"])
        ratio = torch.exp(log_prob - data["old_log_prob"])
        return -masked_mean_per_task(ratio * data["advantages"], data["mask"])

    def dice(self, params: Params, data: Data) -> Tensor:
        """-mean of box(tau_t) w_t (Foerster et al. 2018), tau_t the cumulative log-probability
        of episode steps 0..t, w_t from :func:`dice_weights`."""
        log_prob = self.policy.log_prob(params, data["obs"], data["actions"]) * data["mask"]
        tau = log_prob.cumsum(dim=1)  # [T, H, B]: time is dim 1
        magic_box = torch.exp(tau - tau.detach())
        return -masked_mean_per_task(magic_box * data["dice_weights"], data["mask"])

    # ------------------------------------------------------------------ outer losses
    # Functions of the new policy's distribution parameters, so that one forward pass
    # serves a surrogate and its KL (a line-search try).

    def surrogate(self, dist: Any, data: Data) -> Tensor:
        """TRPO's surrogate per task: -mean of pi(a|s) / pi_old(a|s) * A over valid steps."""
        ratio = torch.exp(self.policy.log_prob_dist(dist, data["actions"]) - data["old_log_prob"])
        return -masked_mean_per_task(ratio * data["advantages"], data["mask"])

    def clipped_surrogate(self, dist: Any, data: Data, clip_eps: float) -> Tensor:
        """PPO's clipped surrogate per task: -mean of min(r A, clip(r, 1 - eps, 1 + eps) A),
        r = pi(a|s) / pi_old(a|s)."""
        ratio = torch.exp(self.policy.log_prob_dist(dist, data["actions"]) - data["old_log_prob"])
        advantages = data["advantages"]
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
        return -masked_mean_per_task(torch.minimum(ratio * advantages, clipped), data["mask"])

    def kl(self, dist: Any, data: Data) -> Tensor:
        """Mean KL(pi_old || pi) over valid steps, per task."""
        return masked_mean_per_task(self.policy.kl_dist(data["old_dist"], dist), data["mask"])
