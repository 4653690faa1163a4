"""TRPO outer step (MAML-TRPO, ``outer: trpo``), one meta-update from stored episodes.

On the outer surrogate L_out(theta) = -mean_t E[ pi_{phi_K(theta)} / pi_old * A ]:

1. gradient g = mean_t J_t^T grad L_out(phi_K^t) (the estimator's meta-gradient);
2. Fisher-vector products of the trust region's KL, ``trust-region``:
   ``post`` (MAML-TRPO): F v = mean_t J_t^T F_{phi_K^t} J_t v, F_phi the Hessian of
   KL(pi_old || pi_phi) at phi = phi_K (exact there since grad KL = 0);
   ``pre``: the KL of the policies that sampled the inner batches, phi_0 .. phi_{K-1}, on
   their own batches (ProMP's penalty placed as a constraint): F v = mean_{k,t} F_{phi_k^t} v,
   with d phi_k / d theta taken as I (exact for the pre-update policy phi_0 = theta, first
   order in fast-lr for the steps after it), so no J product enters the Fisher;
3. step direction s = CG(F + cg-damping I, g), full step -sqrt(2 max_kl / s^T F s) s;
4. backtracking line search that re-adapts on the stored episodes and accepts only
   improvement with the trust region's KL <= max-kl.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp
from torch.utils._pytree import tree_map

from binom_rl.agents.estimator import Estimator, compare_to_exact
from binom_rl.agents.inner_loop import AdaptationResult, InnerLoop, check_finite
from binom_rl.agents.losses import PolicyLosses
from binom_rl.agents.phases import PhaseTimer
from binom_rl.agents.policies import Policy
from binom_rl.config import Config
from binom_rl.metagrad import Params, TaskBatchedLoss, task_gradients
from binom_rl.rl import (
    CGResult,
    cg_solve,
    flatten_params,
    line_search,
    masked_mean_per_task,
    unflatten_params,
)


def fvp_subsample(data: Any, n: int, by: str) -> Any:
    """Every n-th episode (``by="episodes"``) or time step (``"steps"``) of task-major
    [T, H, B, ...] data: what ``fvp-subsample`` / ``fvp-subsample-by`` give the Fisher."""
    return _every_nth(data, n, 1 if by == "steps" else 2)


def _every_nth(data: Any, n: int, dim: int) -> Any:
    """Keep indices 0, n, 2n, ... along ``dim`` of task-major [T, H, B, ...] tensors: dim 1
    is time steps, dim 2 episodes. Tensors of fewer dims, or of size 1 there (a Gaussian's
    log sigma [T, 1, 1, act]), stay as they are.

    The kept entries are copied into contiguous tensors once, so that the ~20 products
    of a conjugate-gradient solve do not work on strided views.
    """
    if n == 1:
        return data

    def keep(v: Tensor) -> Tensor:
        if v.dim() < 3 or v.shape[dim] == 1:
            return v
        return v[(slice(None),) * dim + (slice(None, None, n),)].contiguous()

    return tree_map(keep, data)


class TRPOStep:
    """One trust-region meta-update per iteration; no state carried between iterations."""

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
        # Written over a leading task dim and wrapped as TaskBatchedLoss: per-task gradients
        # and HVPs are then gradients of the summed losses, without vmap.
        self.outer_loss = TaskBatchedLoss(self._outer_losses)
        self.kl_loss = TaskBatchedLoss(self._kl_losses)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: TRPO keeps no state between iterations (checkpoints without an
        ``outer`` entry are TRPO's)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"outer trpo keeps no state, got a checkpoint with {sorted(state)}")

    # ------------------------------------------------------------------ losses (pure)

    def _outer_losses(self, params: Params, data: dict[str, Any]) -> Tensor:
        """TRPO surrogate per task: -mean of pi(a|s) / pi_old(a|s) * A over valid steps."""
        return self.losses.surrogate(self.policy.dist_params(params, data["obs"]), data)

    def _kl_losses(self, params: Params, data: dict[str, Any]) -> Tensor:
        """Mean KL(pi_old || pi_params) over valid steps, per task."""
        return self.losses.kl(self.policy.dist_params(params, data["obs"]), data)

    def surrogate_and_kl(self, params: Params, data: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Outer losses and KLs per task ([T] each) from one forward pass (the line
        search's check); params and data with a leading task dim."""
        dist = self.policy.dist_params(params, data["obs"])
        return self.losses.surrogate(dist, data), self.losses.kl(dist, data)

    def outer_batch_and_gradient(
        self, episodes: Any, phi_old: Params
    ) -> tuple[dict[str, Any], Params]:
        """The outer batch and grad L_out(phi_old) per task from one forward pass (where the
        ratio is 1): :meth:`InnerLoop.outer_batch_and_gradient` of the surrogate."""
        return self.inner.outer_batch_and_gradient(episodes, phi_old, self.losses.surrogate)

    # ------------------------------------------------------------------ Fisher products

    def fisher_operator(self, params: Params, data: dict[str, Any]) -> Callable[[Params], Params]:
        """u -> F_t u_t for every task t (leading task dim): F_t the Hessian of kl_loss at
        params = phi_old, i.e. the policy's Fisher information there (the KL's gradient
        vanishes at phi_old, so the Hessian is J_d^T (d^2 KL/dd^2) J_d, d the distribution
        parameters, positive semi-definite).

        The graph of grad KL is built once and its pullback reused by every call (a CG
        solve makes cg-iters): reverse-over-reverse, the pullback of a gradient being H^T u = H u.
        """
        _, pullback = vjp(lambda p: task_gradients(self.kl_loss, p, data), params)
        return lambda u: pullback(u)[0]

    def fvp_operator(
        self, path: list[Params], inner_data: list, outer_data: dict, method: str | None = None
    ) -> Callable[[Params], Params]:
        """v -> the trust region's Fisher times v (without damping), for many v: the graphs
        this needs are built on the first product and reused. ``post``: mean_t
        J_t^T F_{phi_K^t} J_t v, J products with ``method``, by default ``fvp-estimator`` /
        ``fvp-order`` (which default to the meta-gradient's); ``pre``: mean_{k,t}
        F_{phi_k^t} v on the inner batches."""
        if self.cfg.trust_region == "pre":
            return self._pre_update_fvp(path, inner_data)
        with self.phases("fisher-vector products"):
            fvp_method, order = self.cfg.fvp_method()
            products = self.estimator.products(path, inner_data, method or fvp_method, order)
            fisher = self.fisher_operator(path[-1], outer_data)

        def fvp(v: Params) -> Params:
            with self.phases("fisher-vector products"):
                jtfjv = products.vjp(fisher(products.jvp(v)))
                return {k: x.mean(0) for k, x in jtfjv.items()}

        return fvp

    def _pre_update_fvp(self, path: list[Params], inner_data: list) -> Callable[[Params], Params]:
        with self.phases("fisher-vector products"):
            pairs = zip(path[:-1], inner_data, strict=True)
            fishers = [self.fisher_operator(phi, d) for phi, d in pairs]
            num_tasks = next(iter(path[0].values())).shape[0]

        def fvp(v: Params) -> Params:
            with self.phases("fisher-vector products"):
                per_task = {k: x.unsqueeze(0).expand(num_tasks, *x.shape) for k, x in v.items()}
                total = None
                for fisher in fishers:
                    fv = fisher(per_task)
                    total = fv if total is None else {k: total[k] + fv[k] for k in fv}
                return {k: x.mean(0) / len(fishers) for k, x in total.items()}

        return fvp

    def _fvp_data(self, inner_data: list, outer_data: dict) -> tuple[list, dict]:
        """The data the Fisher-vector products use: every ``fvp-subsample``-th episode of
        each task (``fvp-subsample-by: episodes``, the default) or every n-th time step of
        every episode (``steps``, OpenAI baselines' TRPO practice).

        The J products inside the Fisher come from the inner loss' Hessians on this data.
        The steps of one episode are strongly correlated, so n times fewer whole episodes
        give a much noisier Hessian than every n-th step of all of them. That noise N in J
        inflates the exact Fisher, E[(J + N)^T F (J + N)] = J^T F J + E[N^T F N]: it penalises
        directions in which the adapted policy depends on which episodes were drawn, and
        exact MAML-TRPO learned better with it than with the accurate Fisher of ``steps``
        or of no subsample (HalfCheetahVel, and 2D navigation at K = 3; README). A truncated
        binomial expansion of a noisy J fails, though (BinomMAML L = 1 at K = 3: ~100%
        error along the CG step with episodes, within 0.26 with steps), so BinomMAML at
        K >= 2 wants ``fvp-estimator: maml`` or ``steps``.
        """
        n, by = self.cfg.fvp_subsample, self.cfg.fvp_subsample_by
        return [fvp_subsample(d, n, by) for d in inner_data], fvp_subsample(outer_data, n, by)

    def _step_direction(
        self, path: list[Params], inner_data: list, outer_data: dict, g: Params,
        damping: float | None = None,
    ) -> CGResult:  # fmt: skip
        """CG solve of (F + d I) s = g, d = ``damping`` or cg-damping. The graphs its
        products cache die when this returns, before the line search builds its own."""
        fvp_op = self.fvp_operator(path, inner_data, outer_data)
        d = self.cfg.cg_damping if damping is None else damping

        def fvp(v_flat: Tensor) -> Tensor:
            fv = fvp_op(unflatten_params(v_flat, g))
            return flatten_params(fv) + d * v_flat

        return cg_solve(fvp, flatten_params(g), self.cfg.cg_iters)

    # ------------------------------------------------------------------ the step

    def _surrogate_and_kl(
        self, params: Params, inner_data: Sequence[dict], outer_data: dict
    ) -> tuple[Tensor, Tensor]:
        """Mean outer loss and trust-region KL after re-adapting ``params`` on the stored
        inner episodes."""
        path, _ = self.inner.readapt(params, inner_data)
        with self.phases("line search"):
            loss, kl = self.surrogate_and_kl(path[-1], outer_data)
            if self.cfg.trust_region == "pre":
                pairs = zip(path[:-1], inner_data, strict=True)
                kls = [self._kl_losses(phi, d).mean() for phi, d in pairs]
                return loss.mean(), torch.stack(kls).mean()
            return loss.mean(), kl.mean()

    def step(
        self, params: Params, adaptation: AdaptationResult, diagnose: bool = False
    ) -> tuple[Params, dict[str, float]]:
        """One trust-region meta-update of ``params`` from stored episodes."""
        cfg = self.cfg
        path, inner_data = adaptation.path, adaptation.inner_data
        phi_k = path[-1]
        valid, outer_grads = self.outer_batch_and_gradient(adaptation.episodes[-1], phi_k)

        # At phi_K itself the ratio is exactly 1 (old_log_prob is this very log-prob), so
        # the surrogate is -mean(A): no forward pass needed.
        loss_before = -masked_mean_per_task(valid["advantages"], valid["mask"]).mean()
        check_finite("outer surrogate loss", loss_before)
        step_grads = [None] * cfg.num_steps + [outer_grads]
        g = self.estimator.meta_gradient(path, inner_data, step_grads, adaptation.hessians)
        adaptation.hessians = None  # free the inner steps' graphs before CG builds its own
        check_finite("meta-gradient", g)
        g_flat = flatten_params(g)

        # Fisher-vector products may use a subsample (cfg.fvp_subsample, as OpenAI
        # baselines' TRPO does): the Fisher only shapes the step direction, while the
        # gradient and the line search's KL check always use everything.
        fvp_inner, fvp_valid = self._fvp_data(inner_data, valid)

        # s^T F s from the products CG already made (F s = sum_i alpha_i F p_i): the same
        # quantity as one more explicit product, up to rounding, at no extra cost.
        step_dir, f_step = self._step_direction(path, fvp_inner, fvp_valid, g)
        shs = 0.5 * torch.dot(step_dir, f_step)
        check_finite("conjugate-gradient step direction", step_dir, shs)
        full_step = -step_dir * torch.sqrt(cfg.max_kl / shs.clamp(min=1e-12))

        last: dict[float, tuple[float, float]] = {}

        def evaluate(fraction: float) -> tuple[float, float]:
            candidate = unflatten_params(flatten_params(params) + fraction * full_step, params)
            loss, kl = self._surrogate_and_kl(candidate, inner_data, valid)
            last[fraction] = (float(loss_before - loss), float(kl))
            return last[fraction]

        fraction, tries = line_search(
            evaluate,
            max_steps=cfg.ls_max_steps,
            backtrack_ratio=cfg.ls_backtrack_ratio,
            max_kl=cfg.max_kl,
        )
        new_params = unflatten_params(flatten_params(params) + fraction * full_step, params)
        check_finite("updated meta-parameters", new_params)
        improvement, kl = last.get(fraction, (0.0, 0.0))
        metrics = {
            "metagrad/norm": float(g_flat.norm()),
            "train/kl": kl,
            "train/surrogate_improvement": improvement,
            "train/ls_fraction": fraction,
            "train/ls_tries": float(tries),
        }
        if diagnose:
            metrics.update(self.estimator.diagnose(path, inner_data, step_grads, g_flat))
            if cfg.trust_region == "post":  # pre's Fisher has no J products to compare
                metrics.update(self.diagnose_fvp(path, fvp_inner, fvp_valid, step_dir, f_step))
        return new_params, metrics

    def diagnose_fvp(
        self, path: list[Params], inner_data: list, outer_data: dict, step_dir: Tensor,
        f_step: Tensor,
    ) -> dict[str, float]:  # fmt: skip
        """Cosine and relative error of the Fisher-vector product the CG solve worked with,
        (F + damping) s from its own products, to the exact (J^T F J + damping) s, along the
        step direction s: the curvature the trust region saw where it stepped; and
        a ||H_k|| on the Fisher's data (its J products come from those Hessians)."""
        fvp = self.fvp_operator(path, inner_data, outer_data, method="maml")
        theta_like = {k: v[0] for k, v in path[0].items()}  # path has a leading task dim
        exact = flatten_params(fvp(unflatten_params(step_dir, theta_like)))
        exact = exact + self.cfg.cg_damping * step_dir
        metrics = compare_to_exact("metagrad/fvp_", f_step, exact)
        metrics.update(self.estimator.alpha_hessian_norms("metagrad/fvp_", path, inner_data))
        return metrics
