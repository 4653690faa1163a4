"""Linear feature baseline (MAML-RL convention) and advantage computation.

Features per step: [clip(obs, -10, 10), clip(obs, -10, 10)^2, t, t^2, t^3, 1] with
t = time index / 100, fitted by ridge regression on the discounted returns.
Batched over tasks: with ``task_dim`` set, one batched linear solve gives one
weight vector per task.
"""

from __future__ import annotations

import torch
from torch import Tensor

from binom_rl.rl import discounted_returns, gae, normalize_advantages

__all__ = ["LinearFeatureBaseline", "ridge_solve", "compute_advantages"]


def ridge_solve(xtx: Tensor, xty: Tensor, reg_coeff: float = 1e-5, max_tries: int = 5) -> Tensor:
    """w = (X^T X + reg I)^{-1} X^T y with reg = reg_coeff * 10^k for the first k that works.

    xtx [..., F, F], xty [..., F] -> w [..., F]. All ``max_tries`` regularisations are
    solved at once (F is tiny) and the first finite solution is picked per batch
    entry with tensor ops, so there is no host sync; if none is finite the weights
    are 0 (the baseline then predicts 0, i.e. plain returns as advantages).
    """
    f = xtx.shape[-1]
    regs = reg_coeff * 10.0 ** torch.arange(max_tries, dtype=xtx.dtype, device=xtx.device)
    eye = torch.eye(f, dtype=xtx.dtype, device=xtx.device)
    a = xtx.unsqueeze(-3) + regs[:, None, None] * eye  # [..., R, F, F]
    b = xty.unsqueeze(-2).unsqueeze(-1).expand(*a.shape[:-1], 1)  # [..., R, F, 1]
    # solve_ex reports singular systems through `info` instead of raising.
    sol, info = torch.linalg.solve_ex(a, b)
    sol = sol.squeeze(-1)  # [..., R, F]
    ok = (info == 0) & torch.isfinite(sol).all(-1)  # [..., R]
    # Index of the first ok try (argmax of a 0/1 tensor returns the first max).
    first = ok.to(torch.int8).argmax(-1, keepdim=True)  # [..., 1]
    w = torch.gather(sol, -2, first.unsqueeze(-1).expand(*first.shape[:-1], 1, f)).squeeze(-2)
    return torch.where(ok.any(-1, keepdim=True), w, torch.zeros_like(w))


class LinearFeatureBaseline:
    """V(s_t) = w^T phi(s_t, t), phi = [obs, obs^2, t, t^2, t^3, 1] (obs clipped to [-10, 10]).

    ``fit``/``predict`` are pure functions of tensors; the object only holds the
    ridge settings. Shapes: obs [H, *batch, d], returns and mask [H, *batch].
    With ``task_dim=k`` (k >= 1, a batch dim) one weight vector per task is fitted:
    weights [T, F]; with ``task_dim=None`` all steps are pooled: weights [F].
    F = 2 d + 4.
    """

    def __init__(self, obs_dim: int | None = None, reg_coeff: float = 1e-5, max_tries: int = 5):
        self.obs_dim = obs_dim
        self.reg_coeff = float(reg_coeff)
        self.max_tries = int(max_tries)
        if self.max_tries < 1:
            raise ValueError("max_tries must be >= 1")

    @property
    def num_features(self) -> int:
        if self.obs_dim is None:
            raise ValueError("num_features needs obs_dim")
        return 2 * self.obs_dim + 4

    @staticmethod
    def features(obs: Tensor) -> Tensor:
        """phi(obs) [H, *batch, 2d + 4], t = arange(H) / 100 along dim 0."""
        o = obs.clamp(-10.0, 10.0)
        t = torch.arange(obs.shape[0], dtype=obs.dtype, device=obs.device) / 100.0
        t = t.reshape((-1,) + (1,) * (obs.dim() - 1)).expand(*obs.shape[:-1], 1)
        return torch.cat([o, o**2, t, t**2, t**3, torch.ones_like(t)], dim=-1)

    def fit(
        self, obs: Tensor, returns: Tensor, mask: Tensor, task_dim: int | None = None
    ) -> Tensor:
        """Ridge regression of returns on phi over valid steps (mask > 0).

        w = (X^T M X + reg I)^{-1} X^T M y, solved in float64 (t^3 features make
        X^T X badly scaled in float32); reg grows 10x on non-finite solutions.
        Returns weights [F] (task_dim None) or [T, F] (task_dim = dim of T).
        """
        obs, returns, mask = obs.detach(), returns.detach(), mask.detach()
        if task_dim is None:
            obs, returns, mask, task_dim, squeeze = (
                obs.unsqueeze(1),
                returns.unsqueeze(1),
                mask.unsqueeze(1),
                1,
                True,
            )
        else:
            squeeze = False
        self._check_task_dim(task_dim, returns)
        x = self.features(obs).double()
        valid = (mask > 0).unsqueeze(-1)
        # where, not multiply: steps after the episode may hold NaN/inf observations.
        x = torch.where(valid, x, 0.0).movedim(task_dim, 0)
        y = torch.where(valid.squeeze(-1), returns.double(), 0.0).movedim(task_dim, 0)
        n_tasks, n_feat = x.shape[0], x.shape[-1]
        x = x.reshape(n_tasks, -1, n_feat)  # [T, N, F]
        y = y.reshape(n_tasks, -1)  # [T, N]
        xtx = x.transpose(-1, -2) @ x
        xty = (x.transpose(-1, -2) @ y.unsqueeze(-1)).squeeze(-1)
        w = ridge_solve(xtx, xty, self.reg_coeff, self.max_tries).to(obs.dtype)
        return w[0] if squeeze else w

    def predict(self, weights: Tensor, obs: Tensor, task_dim: int | None = None) -> Tensor:
        """V = phi(obs) . w: values [H, *batch]; weights [T, F] pair with obs' task_dim."""
        feats = self.features(obs)
        if task_dim is None:
            return feats @ weights
        self._check_task_dim(task_dim, feats[..., 0])
        # Broadcast w [T, F] to [1, .., T, .., 1, F] with T at task_dim.
        shape = [1] * feats.dim()
        shape[task_dim] = weights.shape[0]
        shape[-1] = weights.shape[-1]
        return (feats * weights.reshape(shape)).sum(-1)

    @staticmethod
    def _check_task_dim(task_dim: int, ref: Tensor) -> None:
        if not 1 <= task_dim < ref.dim():
            raise ValueError(f"task_dim must be a batch dim in [1, {ref.dim()}), got {task_dim}")


def compute_advantages(
    baseline: LinearFeatureBaseline,
    obs: Tensor,
    rewards: Tensor,
    mask: Tensor,
    gamma: float,
    gae_lambda: float,
    normalize: bool = True,
    task_dim: int | None = 1,
) -> Tensor:
    """Advantages [H, *batch] (detached): returns G = discounted_returns, per-task
    baseline fit on G, V = predict, A = gae(r, V, m), then (optionally) normalised
    per task over all other dims (globally when task_dim is None).
    """
    obs, rewards, mask = obs.detach(), rewards.detach(), mask.detach()
    returns = discounted_returns(rewards, mask, gamma)
    weights = baseline.fit(obs, returns, mask, task_dim=task_dim)
    values = baseline.predict(weights, obs, task_dim=task_dim)
    values = torch.where(mask > 0, values, 0.0)
    adv = gae(rewards, values, mask, gamma, gae_lambda)
    if normalize:
        dims = None
        if task_dim is not None:
            dims = tuple(d for d in range(rewards.dim()) if d != task_dim)
        adv = normalize_advantages(adv, mask, dims=dims)
    return adv
