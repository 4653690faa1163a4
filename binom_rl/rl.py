"""Reinforcement-learning math shared by every meta-learner.

Data layout: time-major tensors ``[H, *batch]`` with a float ``mask`` of the same
leading shape (1 inside the episode, 0 after it ended). Everything here is a pure
tensor function, safe under ``torch.func`` transforms unless stated otherwise
(``line_search`` is host-side control flow by nature; ``mean_and_stderr`` summarises
numpy results).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "masked_mean_per_task",
    "discounted_returns",
    "gae",
    "normalize_advantages",
    "flatten_params",
    "unflatten_params",
    "CGResult",
    "cg_solve",
    "line_search",
    "mean_and_stderr",
]


def _expand_mask(mask: Tensor, x: Tensor) -> Tensor:
    """Broadcast ``mask`` [H, *batch] against ``x`` [H, *batch, *trailing]."""
    return mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))


def masked_mean_per_task(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x[t] * m[t]) / max(sum(m[t]), 1) for each t along the leading (task) dim: [T].

    The mask is broadcast over the trailing dims of x, and those dims are averaged too.
    """
    m = _expand_mask(mask, x).to(x.dtype)
    denom = torch.broadcast_to(m, x.shape).flatten(1).sum(1).clamp(min=1.0)
    return (x * m).flatten(1).sum(1) / denom


def _shift_next(x: Tensor) -> Tensor:
    """x_{t+1} along dim 0, with 0 past the horizon."""
    return torch.cat([x[1:], torch.zeros_like(x[:1])], dim=0)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = m_t (r_t + gamma G_{t+1}), G_H = 0.  Shape [H, *batch]."""
    m = mask.to(rewards.dtype)
    # Reverse loop: H <= 1000, each step is one fused elementwise op; a closed
    # form via gamma^(s-t) matrices would be O(H^2) memory and lose precision.
    out = []
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = (rewards[t] + gamma * running) * m[t]
        out.append(running)
    return torch.stack(out[::-1], dim=0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalized advantage estimation.

    delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t
    A_t     = m_t (delta_t + gamma lam m_{t+1} A_{t+1}),   V_H = A_H = 0
    (value past the horizon is 0: the MAML-RL convention).
    """
    m = mask.to(rewards.dtype)
    m_next = _shift_next(m)
    v_next = _shift_next(values)
    deltas = rewards + gamma * v_next * m_next - values
    out = []
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = (deltas[t] + gamma * lam * m_next[t] * running) * m[t]
        out.append(running)
    return torch.stack(out[::-1], dim=0)


def normalize_advantages(
    adv: Tensor, mask: Tensor, dims: tuple[int, ...] | None = None, eps: float = 1e-8
) -> Tensor:
    """(A - mean) / (std + eps) over valid entries, masked entries set to 0.

    ``dims``: dims to reduce over (None = all), e.g. ``(0, 2)`` on [H, T, B] for
    per-task statistics. std is the population (biased) masked std.
    """
    m = mask.to(adv.dtype)
    if dims is None:
        dims = tuple(range(adv.dim()))
    count = m.sum(dim=dims, keepdim=True).clamp(min=1.0)
    mean = (adv * m).sum(dim=dims, keepdim=True) / count
    var = (((adv - mean) * m) ** 2).sum(dim=dims, keepdim=True) / count
    return (adv - mean) / (var.sqrt() + eps) * m


def flatten_params(d: dict[str, Tensor]) -> Tensor:
    """Concatenate the dict's tensors (dict order) into one flat vector."""
    return torch.cat([v.reshape(-1) for v in d.values()])


def unflatten_params(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``flatten_params``: split ``vec`` into tensors shaped like ``like``."""
    out: dict[str, Tensor] = {}
    offset = 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = vec[offset : offset + n].reshape(ref.shape)
        offset += n
    return out


class CGResult(NamedTuple):
    """A conjugate-gradient solution ``x`` and ``ax`` = A x, accumulated from the products
    CG already made (A x = sum_i alpha_i A p_i), so no extra product is needed for it."""

    x: Tensor
    ax: Tensor


def cg_solve(
    mvp: Callable[[Tensor], Tensor], b: Tensor, iters: int, residual_tol: float = 1e-10
) -> CGResult:
    """Solve A x = b for SPD A given x -> A x, with exactly ``iters`` CG iterations.

    alpha = r.r / p.Ap;  x += alpha p;  Ax += alpha Ap;  r -= alpha Ap;
    beta = r'.r' / r.r;  p = r' + beta p.
    No host synchronisation: once r.r <= residual_tol the step sizes are masked to
    0 with torch.where, so later iterations are no-ops instead of a Python ``break``.
    TRPO needs s^T A s for its step size: ``ax`` gives it without an (iters + 1)-th product.
    """
    x = torch.zeros_like(b)
    ax = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = torch.dot(r, r)
    tiny = torch.finfo(b.dtype).tiny
    for _ in range(iters):
        active = rdotr > residual_tol
        z = mvp(p)
        pz = torch.dot(p, z)
        # Guard 0/0 once converged (p = 0) or on a non-positive curvature direction.
        ok = active & (pz > 0)
        alpha = torch.where(ok, rdotr / torch.where(ok, pz, torch.ones_like(pz)), 0.0)
        x = x + alpha * p
        ax = ax + alpha * z
        r = r - alpha * z
        new_rdotr = torch.dot(r, r)
        beta = torch.where(ok, new_rdotr / rdotr.clamp(min=tiny), 0.0)
        p = torch.where(ok, r + beta * p, p)
        rdotr = torch.where(ok, new_rdotr, rdotr)
    return CGResult(x, ax)


def line_search(
    evaluate: Callable[[float], tuple[float, float]],
    *,
    max_steps: int,
    backtrack_ratio: float,
    max_kl: float,
) -> tuple[float, int]:
    """Backtracking line search over fractions 1, r, r^2, ... of a proposed step.

    ``evaluate(fraction) -> (improvement, kl)`` with improvement = old_loss - new_loss.
    Returns (first fraction with finite improvement > 0 and kl <= max_kl, tries),
    or (0.0, max_steps) when none is accepted. Host-side loop: one sync per try.
    """
    fraction = 1.0
    for i in range(max_steps):
        improvement, kl = evaluate(fraction)
        improvement, kl = float(improvement), float(kl)
        if math.isfinite(improvement) and math.isfinite(kl) and improvement > 0.0 and kl <= max_kl:
            return fraction, i + 1
        fraction *= backtrack_ratio
    return 0.0, max_steps


def mean_and_stderr(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean along ``axis``: std(ddof=1) / sqrt(n), 0 for n = 1."""
    n = x.shape[axis]
    std = x.std(axis=axis, ddof=1) if n > 1 else np.zeros_like(x.mean(axis=axis))
    return x.mean(axis=axis), std / math.sqrt(n)
