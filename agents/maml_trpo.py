"""Meta-learner: policy-gradient inner loop, trust-region (TRPO) outer step, any estimator.

One meta-iteration, top to bottom (:meth:`MetaLearner.meta_iteration`):

1. sample ``meta-batch-size`` tasks;
2. for k = 0..K-1: sample ``fast-batch-size`` episodes per task with phi_k, fit the
   baseline, take the inner step phi_{k+1} = phi_k - a grad L_in(phi_k) (all tasks batched);
3. sample validation episodes with phi_K;
4. TRPO on the outer surrogate L_out(theta) = -mean_t E[ pi_{phi_K(theta)} / pi_old * A ]:
   gradient g = mean_t J_t^T grad L_out(phi_K^t)  (meta_vjp with the chosen estimator),
   Fisher-vector product F v = mean_t J_t^T F_{phi_K^t} J_t v + damping v
   (F_phi = Hessian of KL(pi_old || pi_phi) at phi = phi_K: exact there since grad KL = 0),
   step direction s = CG(F, g), full step -sqrt(2 max_kl / s^T F s) s, backtracking
   line search that re-adapts on the stored episodes and accepts only improvement with
   KL <= max-kl.

The estimator (maml, fomaml, trunc L, binom L) only changes how J products are computed;
everything else, MAML-TRPO included, is the same code path.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, vjp
from torch.utils._pytree import tree_map

from binom_rl.agents.baselines import LinearFeatureBaseline, compute_advantages
from binom_rl.agents.policies import Policy, batched_sample, make_policy
from binom_rl.config import Config
from binom_rl.metagrad import (
    HessianProduct,
    MetaProducts,
    Params,
    TaskBatchedLoss,
    batched_adapt,
    batched_inner_step,
    batched_inner_step_with_hessian,
    default_chunk_size,
    hessian_norms,
    mlp_hvp_bytes,
    prepare_meta_products,
    task_gradients,
)
from binom_rl.rl import (
    CGResult,
    cg_solve,
    flatten_params,
    line_search,
    masked_mean_per_task,
    unflatten_params,
)
from binom_rl.runtime import peak_memory_mb
from binom_rl.sampler import Episodes, MultiTaskSampler


class NonFiniteError(RuntimeError):
    """A NaN or inf appeared; the message names where."""


def derive_seed(*keys: int) -> int:
    """A 31-bit seed that depends only on ``keys`` (run seed, iteration, purpose, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)


def _check_finite(where: str, *tensors: Tensor | dict) -> None:
    for t in tensors:
        values = t.values() if isinstance(t, dict) else [t]
        for x in values:
            if not torch.isfinite(x).all():
                raise NonFiniteError(f"non-finite values (NaN/inf) in {where}")


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


def _task_major(x: Tensor) -> Tensor:
    """[H, T, B, ...] -> [T, H, B, ...]: vmap maps over the leading task dim."""
    return x.movedim(1, 0)


@dataclass
class AdaptationResult:
    """What K inner steps on a batch of tasks produced."""

    episodes: list[Episodes]  # K + 1 batches: sampled with phi_0 .. phi_K
    inner_data: list[dict[str, Tensor]]  # K batches, task-major, for the inner loss
    path: list[Params]  # phi_0 .. phi_K, leading task dim
    # H_k products kept from the inner steps' own graphs (adapt(keep_hessians=True)),
    # for the meta-gradient; None when not kept or already used.
    hessians: list[HessianProduct] | None = None


class MetaLearner:
    """MAML-TRPO with a pluggable meta-gradient estimator (``cfg.estimator``, ``cfg.order``).

    ``inner_loss``, ``outer_loss`` and ``kl_loss`` are :class:`TaskBatchedLoss` objects:
    ``learner.inner_loss(params, data)`` is one task's loss, ``learner.inner_loss.fn`` the
    losses of a task-batched ``params`` and ``data``.
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
        )
        self.baseline = LinearFeatureBaseline()
        self.inner_loss = TaskBatchedLoss(self._inner_losses)
        self.outer_loss = TaskBatchedLoss(self._outer_losses)
        self.kl_loss = TaskBatchedLoss(self._kl_losses)

    # ------------------------------------------------------------------ losses (pure)
    # Written over a leading task dim (params [T, ...], data [T, ...] -> losses [T]) and
    # wrapped as TaskBatchedLoss: per-task gradients and HVPs are then gradients of the
    # summed losses, without vmap (faster on CPU); called with one task's params and data
    # (no task dim), each is the plain per-task loss.

    def _inner_losses(self, params: Params, data: dict[str, Tensor]) -> Tensor:
        """Policy-gradient surrogate per task: -mean over valid steps of log pi(a|s) A."""
        log_prob = self.policy.log_prob(params, data["obs"], data["actions"])
        return -masked_mean_per_task(log_prob * data["advantages"], data["mask"])

    def _outer_losses(self, params: Params, data: dict[str, Any]) -> Tensor:
        """TRPO surrogate per task: -mean of pi(a|s) / pi_old(a|s) * A over valid steps."""
        return self._surrogate(self.policy.dist_params(params, data["obs"]), data)

    def _kl_losses(self, params: Params, data: dict[str, Any]) -> Tensor:
        """Mean KL(pi_old || pi_params) over valid steps, per task."""
        return self._kl(self.policy.dist_params(params, data["obs"]), data)

    def surrogate_and_kl(self, params: Params, data: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Outer losses and KLs per task ([T] each) from one forward pass (the line
        search's check); params and data with a leading task dim."""
        dist = self.policy.dist_params(params, data["obs"])
        return self._surrogate(dist, data), self._kl(dist, data)

    def _surrogate(self, dist: Any, data: dict[str, Any]) -> Tensor:
        ratio = torch.exp(self.policy.log_prob_dist(dist, data["actions"]) - data["old_log_prob"])
        return -masked_mean_per_task(ratio * data["advantages"], data["mask"])

    def _kl(self, dist: Any, data: dict[str, Any]) -> Tensor:
        return masked_mean_per_task(self.policy.kl_dist(data["old_dist"], dist), data["mask"])

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

    # ------------------------------------------------------------------ sampling

    def init_params(self, seed: int) -> Params:
        params = self.policy.init_params(seed)
        return {k: v.to(self.device) for k, v in params.items()}

    def _sample(self, tasks: Sequence[dict], phi: Params, seed: int) -> Episodes:
        # a partial, not a closure over self: samplers whose workers run the policy pickle
        # it, and it should carry the policy and phi only
        phi = {k: v.to(self.sampler.act_device) for k, v in phi.items()}
        act = functools.partial(batched_sample, self.policy, phi)
        episodes = self.sampler.sample(tasks, act, self.cfg.fast_batch_size, seed=seed)
        return episodes.to(self.device)

    def _batch(self, episodes: Episodes) -> dict[str, Tensor]:
        """Task-major tensors for the losses, with baseline-fitted GAE advantages."""
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

    def outer_batch(self, episodes: Episodes, phi_old: Params) -> dict[str, Any]:
        """The outer step's data: :meth:`_batch` of the validation episodes plus pi_old =
        pi_{phi_K}, as the log-probabilities of the taken actions (for the ratio) and the
        distribution parameters (for the KL), each computed once."""
        valid: dict[str, Any] = self._batch(episodes)
        with torch.no_grad():
            old_dist = self.policy.dist_params(phi_old, valid["obs"])
        return self._with_old_policy(valid, old_dist)

    def outer_batch_and_gradient(
        self, episodes: Episodes, phi_old: Params
    ) -> tuple[dict[str, Any], Params]:
        """:meth:`outer_batch` and grad L_out(phi_old) for every task, from one forward pass
        over the validation data: the pullback of pi_old's distribution parameters applied to
        dL_out/d(dist) (where the ratio is 1). Saves the forward pass a separate gradient
        of the outer loss would repeat."""
        valid: dict[str, Any] = self._batch(episodes)
        old_dist, pullback = vjp(lambda p: self.policy.dist_params(p, valid["obs"]), phi_old)
        valid = self._with_old_policy(valid, old_dist)
        d_dist = grad(lambda d: self._surrogate(d, valid).sum())(old_dist)
        return valid, pullback(d_dist)[0]

    def _with_old_policy(self, valid: dict[str, Any], old_dist: Any) -> dict[str, Any]:
        with torch.no_grad():
            valid["old_log_prob"] = self.policy.log_prob_dist(old_dist, valid["actions"])
        valid["old_dist"] = old_dist
        _check_finite("log-probabilities of the validation episodes", valid["old_log_prob"])
        return valid

    def adapt(
        self,
        params: Params,
        tasks: Sequence[dict],
        num_steps: int,
        seed: int,
        keep_hessians: bool = False,
    ) -> AdaptationResult:
        """Sample and take ``num_steps`` inner steps per task; sample again after each.

        ``keep_hessians``: also keep each step's graph as its Hessian product, so that the
        meta-gradient does not rebuild it (the graphs live until the result drops them).
        """
        num_tasks = len(tasks)
        phi = {k: v.unsqueeze(0).expand(num_tasks, *v.shape) for k, v in params.items()}
        path, inner_data, episodes, hessians = [phi], [], [], []
        for k in range(num_steps + 1):
            episodes.append(self._sample(tasks, phi, derive_seed(seed, k)))
            if k == num_steps:
                break
            data = self._batch(episodes[-1])
            inner_data.append(data)
            if keep_hessians:
                phi, hvp = batched_inner_step_with_hessian(
                    self.inner_loss, phi, data, step_size=self.cfg.fast_lr
                )
                hessians.append(hvp)
            else:
                phi = batched_inner_step(self.inner_loss, phi, data, step_size=self.cfg.fast_lr)
            _check_finite(f"inner step {k + 1} parameters", phi)
            path.append(phi)
        return AdaptationResult(episodes, inner_data, path, hessians if keep_hessians else None)

    def keeps_hessians(self) -> bool:
        """Whether meta-iterations keep the inner steps' graphs for the meta-gradient, which
        saves rebuilding the inner gradients' graphs (a forward and a backward pass over the
        full inner data). Only when products are cached (chunk-size null, hvp-mode auto), and
        for the exact product (maml, or trunc / binom with order = num-steps; at K = 1 every
        estimator but fomaml), or for binom with order < num-steps on CPU.

        The kept products are applied one step at a time, so a binomial level loses its
        batching over steps. On a GPU that batching is the point of the cascade; on CPU it
        buys nothing (the cores are busy either way) while rebuilding costs the passes above
        and holds a whole level's forward-over-reverse graphs at once."""
        cfg = self.cfg
        exact = cfg.estimator == "maml" or (
            cfg.estimator in ("trunc", "binom") and cfg.order >= cfg.num_steps
        )
        cascade_on_cpu = cfg.estimator == "binom" and self.device.type == "cpu"
        return (exact or cascade_on_cpu) and self._reuses_graphs(cfg.chunk_size)

    def _reuses_graphs(self, chunk_size: int | str | None) -> bool:
        """Products may keep their Hessians' graphs: no chunking asked, hvp-mode auto."""
        return chunk_size is None and self.cfg.hvp_mode == "auto"

    # ------------------------------------------------------------------ meta-gradient

    def chunk_size(self, inner_data: Sequence[dict[str, Tensor]]) -> int | None:
        """The vmap chunk size: ``cfg.chunk_size``, or for ``"auto"`` the one
        :func:`~binom_rl.metagrad.default_chunk_size` picks for T x K HVPs of this data."""
        if self.cfg.chunk_size != "auto":
            return self.cfg.chunk_size
        obs = inner_data[0]["obs"]  # [T, H, B, obs_dim]
        num_tasks, samples = obs.shape[0], math.prod(obs.shape[1:-1])
        widths = [obs.shape[-1], *self.policy.hidden_sizes, self.policy.out_dim]
        return default_chunk_size(
            num_tasks * len(inner_data),
            mlp_hvp_bytes(samples, widths, obs.dtype),
            obs.device,
        )

    def meta_products(
        self, path: list[Params], inner_data: list, method: str | None = None,
        order: int | None = None, hessians: list[HessianProduct] | None = None,
        many: bool = True,
    ) -> MetaProducts:  # fmt: skip
        """J_t^T and J_t products with the configured (or given) estimator.

        For ``many`` products (the ~20 of a CG solve), with ``chunk-size`` resolving to None
        and ``hvp-mode: auto`` (the defaults), each Hessian's graph is built once and reused
        (reverse-over-reverse); otherwise every product builds and frees its own, chunked,
        graphs (forward-over-reverse for auto). ``hessians``: products kept from the inner
        steps (:meth:`adapt`), used instead of new graphs.
        """
        chunk_size = self.chunk_size(inner_data)
        return prepare_meta_products(
            self.inner_loss,
            path,
            inner_data,
            step_size=self.cfg.fast_lr,
            method=method or self.cfg.estimator,
            order=self.cfg.order if order is None else order,
            chunk_size=chunk_size,
            hvp_mode=self.cfg.hvp_mode,
            cache=many and self._reuses_graphs(chunk_size),
            hessians=hessians,
        )

    def meta_gradient(
        self,
        path: list[Params],
        inner_data: list,
        outer_data: dict,
        method: str | None = None,
        hessians: list[HessianProduct] | None = None,
        outer_grads: Params | None = None,
    ) -> Params:
        """mean_t J_t^T grad L_out(phi_K^t) with the configured (or given) estimator
        (``hessians``: the inner steps' kept Hessian products, see :meth:`adapt`;
        ``outer_grads``: grad L_out(phi_K^t) if already computed, see
        :meth:`outer_batch_and_gradient`)."""
        g_phi = outer_grads
        if g_phi is None:
            g_phi = task_gradients(self.outer_loss, path[-1], outer_data)
        order = self.cfg.num_steps if method == "maml" else None
        products = self.meta_products(path, inner_data, method, order, hessians, many=False)
        per_task = products.vjp(g_phi)
        return {k: v.mean(0) for k, v in per_task.items()}

    def fvp_operator(
        self, path: list[Params], inner_data: list, outer_data: dict, method: str | None = None
    ) -> Callable[[Params], Params]:
        """v -> mean_t J_t^T F_{phi_K^t} J_t v (without damping), for many v: the graphs
        this needs are built on the first product and reused (see :meth:`meta_products`).
        J products with ``method``, by default ``fvp-estimator`` / ``fvp-order`` (which
        default to the meta-gradient's)."""
        fvp_method, order = self.cfg.fvp_method()
        products = self.meta_products(path, inner_data, method or fvp_method, order)
        fisher = self.fisher_operator(path[-1], outer_data)

        def fvp(v: Params) -> Params:
            jtfjv = products.vjp(fisher(products.jvp(v)))
            return {k: x.mean(0) for k, x in jtfjv.items()}

        return fvp

    def _surrogate_and_kl(
        self, params: Params, inner_data: list, outer_data: dict
    ) -> tuple[Tensor, Tensor]:
        """Mean outer loss and KL after re-adapting ``params`` on the stored inner episodes."""
        path = batched_adapt(self.inner_loss, params, inner_data, step_size=self.cfg.fast_lr)
        loss, kl = self.surrogate_and_kl(path[-1], outer_data)
        return loss.mean(), kl.mean()

    def _step_direction(
        self, path: list[Params], inner_data: list, outer_data: dict, g: Params
    ) -> CGResult:
        """CG solve of (F + cg-damping I) s = g. The graphs its products cache die when this
        returns, before the line search builds its own."""
        fvp_op = self.fvp_operator(path, inner_data, outer_data)

        def fvp(v_flat: Tensor) -> Tensor:
            fv = fvp_op(unflatten_params(v_flat, g))
            return flatten_params(fv) + self.cfg.cg_damping * v_flat

        return cg_solve(fvp, flatten_params(g), self.cfg.cg_iters)

    def trpo_step(
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
        _check_finite("outer surrogate loss", loss_before)
        g = self.meta_gradient(
            path, inner_data, valid, hessians=adaptation.hessians, outer_grads=outer_grads
        )
        adaptation.hessians = None  # free the inner steps' graphs before CG builds its own
        _check_finite("meta-gradient", g)
        g_flat = flatten_params(g)

        # Fisher-vector products may use a subsample (cfg.fvp_subsample, as OpenAI
        # baselines' TRPO does): the Fisher only shapes the step direction, while the
        # gradient and the line search's KL check always use everything.
        fvp_inner, fvp_valid = self._fvp_data(inner_data, valid)

        # s^T F s from the products CG already made (F s = sum_i alpha_i F p_i): the same
        # quantity as one more explicit product, up to rounding, at no extra cost.
        step_dir, f_step = self._step_direction(path, fvp_inner, fvp_valid, g)
        shs = 0.5 * torch.dot(step_dir, f_step)
        _check_finite("conjugate-gradient step direction", step_dir, shs)
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
        _check_finite("updated meta-parameters", new_params)
        improvement, kl = last.get(fraction, (0.0, 0.0))
        metrics = {
            "metagrad/norm": float(g_flat.norm()),
            "train/kl": kl,
            "train/surrogate_improvement": improvement,
            "train/ls_fraction": fraction,
            "train/ls_tries": float(tries),
        }
        if diagnose:
            metrics.update(self.diagnose(path, inner_data, valid, g_flat))
            metrics.update(self.diagnose_fvp(path, fvp_inner, fvp_valid, step_dir, f_step))
        return new_params, metrics

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

    def diagnose(
        self, path: list[Params], inner_data: list, outer_data: dict, g_flat: Tensor
    ) -> dict[str, float]:
        """Cosine and relative error of the estimator's meta-gradient to the exact one, and
        a ||H_k|| on the inner data (see :meth:`alpha_hessian_norms`)."""
        exact = flatten_params(self.meta_gradient(path, inner_data, outer_data, method="maml"))
        metrics = _compare_to_exact("metagrad/", g_flat, exact)
        metrics.update(self.alpha_hessian_norms("metagrad/", path, inner_data))
        return metrics

    def alpha_hessian_norms(
        self, prefix: str, path: list[Params], inner_data: list
    ) -> dict[str, float]:
        """``{prefix}alpha_hessian_norm_median`` / ``_max`` over steps and tasks of
        fast-lr * ||H_k^t||_2, the inner-loss Hessians' spectral norms (power iteration,
        :func:`~binom_rl.metagrad.hessian_norms`). A truncated expansion's dropped terms
        scale like its powers: well below 1 BinomMAML's products can be accurate, near or
        above 1 they cannot. A generator of its own leaves the run's RNG streams alone."""
        generator = torch.Generator().manual_seed(0)
        norms = self.cfg.fast_lr * hessian_norms(
            self.inner_loss, path, inner_data, generator=generator
        )
        return {
            f"{prefix}alpha_hessian_norm_median": float(norms.median()),
            f"{prefix}alpha_hessian_norm_max": float(norms.max()),
        }

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
        metrics = _compare_to_exact("metagrad/fvp_", f_step, exact)
        metrics.update(self.alpha_hessian_norms("metagrad/fvp_", path, inner_data))
        return metrics

    # ------------------------------------------------------------------ one iteration

    def meta_iteration(
        self, params: Params, iteration: int, diagnose: bool = False
    ) -> tuple[Params, dict[str, float]]:
        """Sample tasks, adapt, and take one TRPO meta-step. Returns new params and metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        tasks = self.sampler.sample_tasks(
            cfg.meta_batch_size, seed=derive_seed(cfg.seed, iteration, 0)
        )
        adaptation = self.adapt(
            params,
            tasks,
            cfg.num_steps,
            seed=derive_seed(cfg.seed, iteration, 1),
            keep_hessians=self.keeps_hessians(),
        )
        _sync(self.device)
        t1 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        new_params, metrics = self.trpo_step(params, adaptation, diagnose=diagnose)
        _sync(self.device)
        t2 = time.perf_counter()
        for k, eps in enumerate(adaptation.episodes):
            metrics[f"returns/step_{k}"] = float(eps.returns.mean())
            if eps.successes is not None:  # fraction of the episodes that succeeded
                metrics[f"success/step_{k}"] = float(eps.successes.float().mean())
        metrics["time/sampling_s"] = t1 - t0
        metrics["time/meta_step_s"] = t2 - t1
        metrics["memory/peak_mb"] = peak_memory_mb(self.device)
        return new_params, metrics


def _compare_to_exact(prefix: str, approx: Tensor, exact: Tensor) -> dict[str, float]:
    """``{prefix}cosine_to_exact`` and ``{prefix}rel_error_to_exact`` of two flat vectors:
    <a, e> / (|a| |e|) and |a - e| / |e|."""
    cos = torch.dot(approx, exact) / (approx.norm() * exact.norm()).clamp(min=1e-30)
    rel = (approx - exact).norm() / exact.norm().clamp(min=1e-30)
    return {f"{prefix}cosine_to_exact": float(cos), f"{prefix}rel_error_to_exact": float(rel)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
