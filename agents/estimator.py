"""The J-product policy of a run: which estimator computes the J_t^T and J_t products of the
inner loop (``estimator``, ``order``), with which engine settings (``chunk-size``,
``hvp-mode``), and whether the inner steps' own graphs are kept to serve them.

Both outer steps take their meta-gradients here; TRPO also its Fisher-vector products'
J products (``fvp-estimator`` / ``fvp-order``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from binom_rl.agents.phases import PhaseTimer
from binom_rl.agents.policies import Policy
from binom_rl.config import Config
from binom_rl.metagrad import (
    HessianProduct,
    MetaProducts,
    Params,
    TaskBatchedLoss,
    default_chunk_size,
    hessian_norms,
    is_exact,
    mlp_hvp_bytes,
    prepare_meta_products,
)
from binom_rl.rl import flatten_params


class Estimator:
    """J products along a stored task-batched path with the configured estimator."""

    def __init__(
        self,
        cfg: Config,
        inner_loss: TaskBatchedLoss,
        policy: Policy,
        device: torch.device,
        phases: PhaseTimer,
    ):
        self.cfg = cfg
        self.inner_loss = inner_loss
        self.policy = policy
        self.device = device
        self.phases = phases

    def keeps_hessians(self) -> bool:
        """Whether inner steps keep their graphs for the meta-gradient, which saves rebuilding
        the inner gradients' graphs (a forward and a backward pass over the full inner data).
        Only when products are cached (chunk-size null, hvp-mode auto), and for the exact
        product (:func:`~binom_rl.metagrad.is_exact`: at K = 1 every estimator but fomaml), or
        for binom with order < num-steps on CPU.

        The kept products are applied one step at a time, so a binomial level loses its
        batching over steps. On a GPU that batching is the point of the cascade; on CPU it
        buys nothing (the cores are busy either way) while rebuilding costs the passes above
        and holds a whole level's forward-over-reverse graphs at once."""
        cfg = self.cfg
        exact = is_exact(cfg.estimator, cfg.order, cfg.num_steps)
        cascade_on_cpu = cfg.estimator == "binom" and self.device.type == "cpu"
        return (exact or cascade_on_cpu) and self.reuses_graphs(cfg.chunk_size)

    def reuses_graphs(self, chunk_size: int | str | None) -> bool:
        """Products may keep their Hessians' graphs: no chunking asked, hvp-mode auto."""
        return chunk_size is None and self.cfg.hvp_mode == "auto"

    def chunk_size(self, inner_data: Sequence[dict]) -> int | None:
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

    def products(
        self, path: list[Params], inner_data: Sequence[dict], method: str | None = None,
        order: int | None = None, hessians: list[HessianProduct] | None = None,
        many: bool = True,
    ) -> MetaProducts:  # fmt: skip
        """J_t^T and J_t products with the configured (or given) estimator.

        For ``many`` products (the ~20 of a CG solve), with ``chunk-size`` resolving to None
        and ``hvp-mode: auto`` (the defaults), each Hessian's graph is built once and reused
        (reverse-over-reverse); otherwise every product builds and frees its own, chunked,
        graphs (forward-over-reverse for auto). ``hessians``: products kept from the inner
        steps, used instead of new graphs.
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
            cache=many and self.reuses_graphs(chunk_size),
            hessians=hessians,
        )

    def meta_gradient(
        self,
        path: list[Params],
        inner_data: Sequence[dict],
        step_grads: Sequence[Params | None],
        hessians: list[HessianProduct] | None = None,
        method: str | None = None,
    ) -> Params:
        """mean_t sum_k J_{k,t}^T g_{k,t}: the meta-gradient of an objective whose gradient at
        phi_k^t is ``step_grads[k]`` (k = 0..K, None: no term; the outer loss alone has only
        g_K), with the configured (or given) estimator; ``hessians``: the inner steps' kept
        Hessian products."""
        with self.phases("meta-gradient"):
            order = self.cfg.num_steps if method == "maml" else None
            products = self.products(path, inner_data, method, order, hessians, many=False)
            if all(g is None for g in step_grads[:-1]):
                per_task = products.vjp(step_grads[-1])
            else:
                per_task = products.path_vjp(step_grads)
            return {k: v.mean(0) for k, v in per_task.items()}

    # ------------------------------------------------------------------ diagnostics

    def diagnose(
        self,
        path: list[Params],
        inner_data: Sequence[dict],
        step_grads: Sequence[Params | None],
        g_flat: Tensor,
    ) -> dict[str, float]:
        """Cosine and relative error of the estimator's meta-gradient ``g_flat`` to the exact
        one from the same ``step_grads``, and a ||H_k|| on the inner data
        (:meth:`alpha_hessian_norms`)."""
        exact = self.meta_gradient(path, inner_data, step_grads, method="maml")
        metrics = compare_to_exact("metagrad/", g_flat, flatten_params(exact))
        metrics.update(self.alpha_hessian_norms("metagrad/", path, inner_data))
        return metrics

    def alpha_hessian_norms(
        self, prefix: str, path: list[Params], inner_data: Sequence[dict]
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


def compare_to_exact(prefix: str, approx: Tensor, exact: Tensor) -> dict[str, float]:
    """``{prefix}cosine_to_exact`` and ``{prefix}rel_error_to_exact`` of two flat vectors:
    <a, e> / (|a| |e|) and |a - e| / |e|."""
    cos = torch.dot(approx, exact) / (approx.norm() * exact.norm()).clamp(min=1e-30)
    rel = (approx - exact).norm() / exact.norm().clamp(min=1e-30)
    return {f"{prefix}cosine_to_exact": float(cos), f"{prefix}rel_error_to_exact": float(rel)}
