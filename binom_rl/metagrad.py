"""Meta-gradient estimators over parameter dicts: exact MAML, FOMAML, TruncMAML, BinomMAML.

K inner gradient steps on fixed data (step k uses ``inner_data[k]``)::

    phi_0 = theta,   phi_{k+1} = phi_k - alpha * grad L_k(phi_k)

have the Jacobian ``J = d phi_K / d theta = (I - a H_{K-1}) ... (I - a H_0)`` with
``H_k = hess L_k(phi_k)`` (symmetric), so

    J^T v = (I - a H_0)(I - a H_1) ... (I - a H_{K-1}) v     (meta_vjp)
    J   v = (I - a H_{K-1}) ... (I - a H_1)(I - a H_0) v     (meta_jvp)

Estimators of these products (``method``):

- ``"maml"``:   the exact product, one Hessian-vector product (HVP) per step, sequentially.
- ``"fomaml"``: J = I.
- ``"trunc"``:  only the factors of the last ``order`` steps (truncated backprop).
- ``"binom"``:  the product expanded, keeping every term with at most ``order`` Hessians::

      J^T v ~= sum_{l=0..L} (-a)^l sum_{k_1 < ... < k_l} H_{k_1} ... H_{k_l} v

  computed as a cascade of L levels; with w^(0) = v and suffix sums
  S^(l-1)_{k+1} = sum_{j>k} w^(l-1)_j (S^(0) = v)::

      level l:  w^(l)_k = H_k S^(l-1)_{k+1}        (only k <= K - l are non-zero)
      result:   v + sum_l (-a)^l sum_k w^(l)_k

  Every HVP of one level is independent of the others, so a level is one batched call over
  all (task, step) pairs (vmap, or a TaskBatchedLoss on T x K pairs): the depth is L, not
  K. Only vectors survive between levels, so memory does not grow with K beyond the K
  stored parameter vectors and the data.
  ``meta_jvp`` runs the same cascade over the steps in reverse order (prefix sums).

Every function has a task-batched twin (``batched_*``): parameters shared, data and paths
with a leading task dimension T, computed with vmap; equal to a Python loop over tasks.
A loss may instead be written over the task dimension itself (:class:`TaskBatchedLoss`):
per-task gradients are then the gradient of the summed losses, with no vmap at all.
HVPs are forward-over-reverse (``jvp(grad(f))``), falling back to reverse-over-reverse
where forward-mode AD lacks an op; each product builds its graphs and frees them.

Many products on the same path (a trust-region step's conjugate-gradient solve makes 20+)
go through :func:`prepare_meta_products`: validated once, and with ``cache=True`` each
Hessian's graph is built on first use and kept, so later products only pay the second
backward pass (reverse-over-reverse: the pullback of grad L_k at phi_k is H_k, symmetric).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map

Params = dict[str, Tensor]
LossFn = Callable[[Params, Any], Tensor]

METHODS = ("maml", "fomaml", "trunc", "binom")


class TaskBatchedLoss:
    """A loss written over a leading task dimension: ``fn(params, data) -> losses [T]`` for
    params and data with a leading dim T (any T; the binomial cascade passes T x K).

    Task t's parameters enter only loss t, so d/d phi_t sum_s L_s(phi_s) = grad L_t(phi_t):
    every per-task gradient (and, from its graph, every per-task HVP) comes from one
    gradient of the sum, with no vmap. On CPU this is faster than vmap(grad(per-task
    loss)), whose batching rules give the second backward pass slower layouts
    (docs/benchmarks.md has the profile).

    Calling the object evaluates one task (params and data without the task dim), so it is
    also a per-task :data:`LossFn` wherever one is expected (vmap included).
    """

    def __init__(self, fn: Callable[[Params, Any], Tensor]):
        self.fn = fn

    def __call__(self, params: Params, data: Any) -> Tensor:
        return self.fn(_unsqueeze(params), _unsqueeze(data)).squeeze(0)


def task_gradients(loss: LossFn, params: Params, data: Any) -> Params:
    """grad L(params[t], data[t]) for every t along the leading dim: one gradient of the
    summed losses for a :class:`TaskBatchedLoss`, vmap(grad(loss)) for a per-task loss."""
    if isinstance(loss, TaskBatchedLoss):
        return grad(lambda p: loss.fn(p, data).sum())(params)
    return vmap(grad(loss))(params, data)


HVP_MODES = ("auto", "fwdrev", "revrev")


# --------------------------------------------------------------------------- helpers


def _stack(trees: Sequence[Any], dim: int) -> Any:
    """Stack a list of identically shaped pytrees along a new dimension ``dim``."""
    try:
        return tree_map(lambda *xs: torch.stack(xs, dim=dim), trees[0], *trees[1:])
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"every inner step's data must have the same structure and shapes: {err}"
        ) from err


def _index(tree: Any, idx: Any) -> Any:
    return tree_map(lambda x: x[idx], tree)


def _flatten2(tree: Any) -> Any:
    """[T, n, ...] -> [T * n, ...] for every leaf (one batch of (task, step) pairs)."""
    return tree_map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), tree)


def _unflatten2(tree: Any, t: int) -> Any:
    return tree_map(lambda x: x.reshape(t, x.shape[0] // t, *x.shape[1:]), tree)


def _axpy(a: float, x: Params, y: Params) -> Params:
    """y + a * x, key by key."""
    return {k: y[k] + a * x[k] for k in y}


def _sum_dim(tree: Params, dim: int) -> Params:
    return {k: v.sum(dim) for k, v in tree.items()}


# --------------------------------------------------------------------------- chunk size

#: Fraction of the device's memory that :func:`default_chunk_size` lets one vmap chunk use.
DEFAULT_MEMORY_FRACTION = 0.25


def mlp_hvp_bytes(
    samples: int, layer_widths: Sequence[int], dtype: torch.dtype = torch.float32
) -> int:
    """Rough memory of one forward-over-reverse HVP of a loss over ``samples`` inputs of an
    MLP whose layers have ``layer_widths`` units (input, hidden..., output).

    Per sample and unit, an HVP keeps about 8 tensors alive: pre-activation and activation,
    their forward-mode tangents, and the backward pass' gradient with its tangent (plus
    the activation's derivative); the factor 12 leaves room for temporaries.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(12 * samples * sum(layer_widths) * itemsize)


def device_memory_bytes(device: str | torch.device) -> int:
    """Total memory of ``device``: the GPU's on CUDA, physical RAM otherwise (8 GiB where the
    OS does not say)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_chunk_size(
    num_hvps: int,
    bytes_per_hvp: int,
    device: str | torch.device = "cpu",
    *,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    memory_bytes: int | None = None,
) -> int | None:
    """The vmap ``chunk_size`` for a batch of ``num_hvps`` HVPs of ``bytes_per_hvp`` each.

    None (all at once, fastest) when the whole batch fits in ``memory_fraction`` of the
    device's memory (``memory_bytes``, default :func:`device_memory_bytes`); otherwise the
    largest chunk that fits, at least 1. The same chunk size serves every product of a
    meta-step: a batch smaller than the chunk runs in one piece.
    """
    if num_hvps < 1 or bytes_per_hvp < 1:
        raise ValueError("num_hvps and bytes_per_hvp must be >= 1")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    total = device_memory_bytes(device) if memory_bytes is None else memory_bytes
    budget = memory_fraction * total
    if num_hvps * bytes_per_hvp <= budget:
        return None
    return max(1, int(budget // bytes_per_hvp))


# --------------------------------------------------------------------------- validation


def effective_order(method: str, order: int | None, num_steps: int) -> int:
    """The number of Hessian factors ``method`` keeps of the K = ``num_steps`` in J:
    K for ``maml``, 0 for ``fomaml``, ``order`` for ``trunc`` and ``binom``. The estimator
    is exact where this is K. ValueError for an unknown method or an order outside 0..K."""
    if method not in METHODS:
        raise ValueError(f"unknown meta-gradient method {method!r}; expected one of {METHODS}")
    if num_steps < 1:
        raise ValueError("inner_data is empty: at least one inner step is needed")
    if method == "maml":
        return num_steps
    if method == "fomaml":
        return 0
    if order is None:
        raise ValueError(f"method {method!r} needs an order (number of Hessian factors kept)")
    if isinstance(order, bool) or not isinstance(order, int):
        raise ValueError(f"order must be an int, got {order!r}")
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    if order > num_steps:
        raise ValueError(
            f"order {order} > {num_steps} inner steps: {method} keeps at most one Hessian "
            f"factor per inner step, and order {num_steps} is already exact MAML"
        )
    return order


def is_exact(method: str, order: int | None, num_steps: int) -> bool:
    """Whether ``method`` with ``order`` computes the exact J products over ``num_steps``
    inner steps: its :func:`effective_order` is K (maml, and trunc / binom keeping every
    factor; at K = 1 every estimator but fomaml). ValueError as effective_order's."""
    return effective_order(method, order, num_steps) == num_steps


def _check_like(v: Mapping[str, Tensor], like: Mapping[str, Tensor], name: str) -> None:
    if set(v) != set(like):
        missing, extra = sorted(set(like) - set(v)), sorted(set(v) - set(like))
        raise ValueError(
            f"{name} keys differ from the parameters: missing {missing}, extra {extra}"
        )
    for k in like:
        if v[k].shape != like[k].shape:
            raise ValueError(
                f"{name}[{k!r}] has shape {tuple(v[k].shape)}, expected {tuple(like[k].shape)}"
            )


def _check_hvp_mode(hvp_mode: str) -> None:
    if hvp_mode not in HVP_MODES:
        raise ValueError(f"unknown hvp_mode {hvp_mode!r}; expected one of {HVP_MODES}")


# --------------------------------------------------------------------------- HVPs


def _hvp_fwdrev(loss: LossFn, params: Params, data: Any, vec: Params) -> Params:
    return jvp(lambda p: grad(loss)(p, data), (params,), (vec,))[1]


def _hvp_revrev(loss: LossFn, params: Params, data: Any, vec: Params) -> Params:
    _, pullback = vjp(lambda p: grad(loss)(p, data), params)
    return pullback(vec)[0]  # H is symmetric, so H^T v = H v


def batched_hvp(
    loss: LossFn,
    params: Params,
    data: Any,
    vecs: Params,
    chunk_size: int | None = None,
    hvp_mode: str = "auto",
) -> Params:
    """H(params[i], data[i]) vecs[i] for every i along the leading dim, as one vmap call
    (a :class:`TaskBatchedLoss` without chunking: the HVP of the summed losses, whose
    Hessian is block-diagonal over tasks, with no vmap)."""
    if isinstance(loss, TaskBatchedLoss) and chunk_size is None:

        def grads(p: Params) -> Params:
            return task_gradients(loss, p, data)

        def fwdrev() -> Params:
            return jvp(grads, (params,), (vecs,))[1]

        def revrev() -> Params:
            return vjp(grads, params)[1](vecs)[0]  # H is symmetric: H^T v = H v

    else:

        def fwdrev() -> Params:
            fn = vmap(lambda p, d, v: _hvp_fwdrev(loss, p, d, v), chunk_size=chunk_size)
            return fn(params, data, vecs)

        def revrev() -> Params:
            fn = vmap(lambda p, d, v: _hvp_revrev(loss, p, d, v), chunk_size=chunk_size)
            return fn(params, data, vecs)

    if hvp_mode == "revrev":
        return revrev()
    if hvp_mode == "fwdrev":
        return fwdrev()
    try:
        return fwdrev()
    except (NotImplementedError, RuntimeError) as err:
        if not lacks_forward_ad(err):
            raise  # out of memory, a shape bug, ...: not for reverse-over-reverse to hide
        warnings.warn(
            f"forward-over-reverse HVP failed ({err}); using reverse-over-reverse",
            RuntimeWarning,
            stacklevel=3,
        )
    return revrev()


# What torch says when an op, or a custom autograd.Function without a jvp, has no
# forward-mode formula (NotImplementedError; RuntimeError in older torch versions).
_NO_FORWARD_AD = ("Trying to use forward AD with", "to use it with forward mode AD")


def lacks_forward_ad(err: BaseException) -> bool:
    """Whether ``err`` says forward-mode AD has no formula for an op of the loss: the one
    failure of a forward-over-reverse HVP that reverse-over-reverse can avoid."""
    return isinstance(err, (NotImplementedError, RuntimeError)) and any(
        text in str(err) for text in _NO_FORWARD_AD
    )


# --------------------------------------------------------------------------- inner loop


def batched_inner_step(
    inner_loss: LossFn, params: Params, data: Any, *, step_size: float
) -> Params:
    """phi' = phi - a grad L(phi, data), for a leading task dimension on params and data."""
    return _descend(params, task_gradients(inner_loss, params, data), step_size)


def _descend(params: Params, grads: Params, step_size: float) -> Params:
    """phi - a g, detached: the path stores values; products rebuild graphs as needed."""
    return {k: (params[k] - step_size * grads[k]).detach() for k in params}


HessianProduct = Callable[[Params], Params]


def hessian_product(loss: LossFn, params: Params, data: Any) -> tuple[Params, HessianProduct]:
    """grad L(params[t], data[t]) for every task t, and vecs -> H vecs from the same graph.

    Reverse-over-reverse: the pullback of the gradient is H^T = H (symmetric). The graph
    stays alive as long as the returned function does, and every call only runs the
    second backward pass.
    """
    grads, pullback = vjp(lambda p: task_gradients(loss, p, data), params)
    return grads, lambda vecs: pullback(vecs)[0]


def batched_inner_step_with_hessian(
    inner_loss: LossFn, params: Params, data: Any, *, step_size: float
) -> tuple[Params, HessianProduct]:
    """:func:`batched_inner_step` that also returns H = hess L(params) as a product built
    on the step's own graph (see :func:`hessian_product`), for a later meta-gradient."""
    grads, hvp = hessian_product(inner_loss, params, data)
    return _descend(params, grads, step_size), hvp


def hessian_norms(
    inner_loss: LossFn,
    path: Sequence[Params],
    inner_data: Sequence[Any],
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Spectral norms ||H_k^t||_2 = max |eigenvalue| of the inner-loss Hessians along a
    task-batched path (phi_0..phi_K, leading task dim T): a [K, T] tensor.

    Power iteration, v <- H v / ||H v|| from a random start, ``iters`` times on each
    Hessian's graph (built once, as in :func:`hessian_product`); the estimate ||H v|| of a
    unit v is a lower bound that converges to the norm at the rate |lambda_2 / lambda_1|;
    the default 20 iterations reach it to a few percent when the top eigenvalue stands out,
    which is when the figure matters.
    Why it matters: the terms of the binomial expansion with l Hessians scale like
    (a ||H||)^l, so with a = step size the product a ||H_k|| tells whether a truncated
    expansion (BinomMAML, and TruncMAML's dropped factors) can be accurate (well below 1) or
    not (near or above 1).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if len(path) != len(inner_data) + 1:
        raise ValueError(
            f"path has {len(path)} points for {len(inner_data)} steps: need phi_0..phi_K"
        )
    norms = []
    for phi, data in zip(path[:-1], inner_data, strict=True):
        _, hvp = hessian_product(inner_loss, phi, data)
        v = {
            k: torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            for k, x in phi.items()
        }
        tiny = torch.finfo(tree_leaves_first(v).dtype).tiny  # a zero Hessian gives norm 0
        for _ in range(iters):
            norm = _task_norms(v).clamp_min(tiny)
            v = hvp({k: x / norm.view(-1, *[1] * (x.dim() - 1)) for k, x in v.items()})
        norms.append(_task_norms(v))
    return torch.stack(norms).detach()


def _task_norms(tree: Params) -> Tensor:
    """Euclidean norm of each task's slice (leading dim) over all tensors of a dict."""
    squares = sum(x.reshape(x.shape[0], -1).square().sum(1) for x in tree.values())
    return torch.sqrt(squares)


def batched_adapt(
    inner_loss: LossFn,
    params: Params,
    inner_data: Sequence[Any],
    *,
    step_size: float,
    num_tasks: int | None = None,
) -> list[Params]:
    """Task-batched :func:`adapt`: shared ``params``, ``inner_data[k]`` with a leading task dim.

    Returns the path phi_0..phi_K, each with a leading task dimension T.
    """
    if len(inner_data) == 0:
        raise ValueError("inner_data is empty: at least one inner step is needed")
    if num_tasks is None:
        num_tasks = tree_leaves_first(inner_data[0]).shape[0]
    phi = {k: v.detach().unsqueeze(0).expand(num_tasks, *v.shape) for k, v in params.items()}
    path = [phi]
    for data in inner_data:
        phi = batched_inner_step(inner_loss, phi, data, step_size=step_size)
        path.append(phi)
    return path


def adapt(
    inner_loss: LossFn, params: Params, inner_data: Sequence[Any], *, step_size: float
) -> list[Params]:
    """The path [phi_0 = params, ..., phi_K] of K = len(inner_data) gradient steps (no graph)."""
    batched = batched_adapt(
        inner_loss, params, [_unsqueeze(d) for d in inner_data], step_size=step_size, num_tasks=1
    )
    return [_squeeze(p) for p in batched]


def tree_leaves_first(tree: Any) -> Tensor:
    """The first tensor of a pytree (to read the task dimension from)."""
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError("data has no tensors")
    return leaves[0]


def _unsqueeze(tree: Any) -> Any:
    return tree_map(lambda x: x.unsqueeze(0), tree)


def _squeeze(tree: Any) -> Any:
    return tree_map(lambda x: x.squeeze(0), tree)


# --------------------------------------------------------------------------- products


def _step_order(method: str, order: int, num_steps: int, transpose: bool) -> list[int]:
    """Steps whose factors enter, in 'leftmost-first' order of the product applied to v.

    J^T v = (I-aH_0)...(I-aH_{K-1}) v: leftmost is step 0. J v: leftmost is step K-1.
    Trunc keeps the last ``order`` steps of the inner loop in both directions.
    """
    steps = list(range(num_steps))
    if method == "trunc":
        steps = steps[num_steps - order :]
    return steps if transpose else steps[::-1]


class _PathHessians:
    """Products with H_k = hess L_k(phi_k) for the steps k of one stored path (task-batched).

    ``cache=False``: every call builds and frees its own graphs (:func:`batched_hvp` with
    ``hvp_mode`` and ``chunk_size``), so memory stays at one chunk's graph.
    ``cache=True``: the graph of grad L_k at phi_k is built on first use and kept, and every
    later product only runs the second backward pass (reverse-over-reverse: the pullback of
    grad L is H^T v = H v, H being symmetric). A conjugate-gradient solve applies the same
    Hessians 20+ times; rebuilding the forward and first backward pass for each product
    would be most of its cost (docs/benchmarks.md has the profile).
    ``given``: the K products already built (kept from the inner steps), used as they are.
    """

    def __init__(
        self,
        loss: LossFn,
        path_stack: Params,
        data_stack: Any,
        chunk_size: int | None,
        hvp_mode: str,
        cache: bool,
        given: Sequence[HessianProduct] | None = None,
    ):
        self.loss, self.path, self.data = loss, path_stack, data_stack
        self.chunk_size, self.hvp_mode, self.cache = chunk_size, hvp_mode, cache
        self.num_tasks, self.num_steps = tree_leaves_first(path_stack).shape[:2]
        # Cached products by key: a step k, or "all" for every (task, step) pair at once.
        self._products: dict[Any, HessianProduct] = dict(enumerate(given or ()))
        self._given = given is not None

    def _cached(self, key: Any, params: Params, data: Any) -> HessianProduct:
        if key not in self._products:
            self._products[key] = hessian_product(self.loss, params, data)[1]
        return self._products[key]

    def step(self, k: int, vecs: Params) -> Params:
        """H_k vecs[t] for every task t (vecs: [T, ...])."""
        params = _index(self.path, (slice(None), k))
        data = _index(self.data, (slice(None), k))
        if self.cache or self._given:
            return self._cached(k, params, data)(vecs)
        return batched_hvp(self.loss, params, data, vecs, self.chunk_size, self.hvp_mode)

    def steps(self, steps: Sequence[int], vecs: Params) -> Params:
        """H_{steps[i]} vecs[t, i] for every task t and position i (vecs: [T, m, ...])."""
        if self._given:
            # Products kept from the inner steps: one call per step.
            out = [self.step(k, _index(vecs, (slice(None), i))) for i, k in enumerate(steps)]
            return _stack(out, dim=1)
        if self.cache:
            # One graph over every (task, step) pair serves all levels and both directions:
            # each vector goes to its step's slot, zeros elsewhere.
            hvp = self._cached("all", _flatten2(self.path), _flatten2(self.data))
            full = _place_steps(vecs, steps, self.num_steps)
            out = _unflatten2(hvp(_flatten2(full)), self.num_tasks)
            return _select_steps(out, steps)
        hv = batched_hvp(
            self.loss,
            _flatten2(_select_steps(self.path, steps)),
            _flatten2(_select_steps(self.data, steps)),
            _flatten2(vecs),
            self.chunk_size,
            self.hvp_mode,
        )
        return _unflatten2(hv, self.num_tasks)


def _sequential_product(
    hessians: _PathHessians, v: Params, steps: list[int], step_size: float
) -> Params:
    """Exact (I - a H_{s_0}) ... (I - a H_{s_n}) v, applying the rightmost factor first."""
    u = v
    for k in reversed(steps):
        u = _axpy(-step_size, hessians.step(k, u), u)
    return u


def _sum_vectors(vectors: Sequence[Params]) -> Params:
    total = dict(vectors[0])
    for v in vectors[1:]:
        total = {k: total[k] + v[k] for k in total}
    return total


def _horner_path_vjp(
    hessians: _PathHessians, vs: Sequence[Params | None], kept: set[int], step_size: float
) -> Params:
    """sum_k J_k^T vs[k] with the factors of the steps in ``kept`` (all: exact; trunc: its
    last steps): u = vs[K]; for k = K - 1 .. 0, u <- (I - a H_k) u if k is kept, then
    u <- u + vs[k]."""
    u = vs[-1]
    for k in range(len(vs) - 2, -1, -1):
        if u is not None and k in kept:
            u = _axpy(-step_size, hessians.step(k, u), u)
        if vs[k] is not None:
            u = dict(vs[k]) if u is None else {name: u[name] + vs[k][name] for name in u}
    return u  # type: ignore[return-value]


def _binomial_path_vjp(
    hessians: _PathHessians, vs: Sequence[Params | None], order: int, step_size: float
) -> Params:
    """Every term of sum_k J_k^T vs[k] with at most ``order`` Hessians, as one cascade: a term
    H_{i_1} ... H_{i_l} vs[k] needs i_1 < ... < i_l < k, so level 1 applies H_i to the sum of
    the vectors entering after step i, R_{i+1} = sum_{k > i} vs[k], and the zeroth-order
    term is R_0 = sum_k vs[k]."""
    like = next(v for v in vs if v is not None)
    stacked = _stack([v if v is not None else {k: torch.zeros_like(x) for k, x in like.items()}
                      for v in vs], dim=1)  # [T, K + 1, ...]  # fmt: skip
    suffix = {k: x.flip(1).cumsum(1).flip(1) for k, x in stacked.items()}  # R_0 .. R_K
    total = {k: x[:, 0] for k, x in suffix.items()}
    suffix_sums = {k: x[:, 1:] for k, x in suffix.items()}  # R_{i+1} for i = 0 .. K - 1
    steps = list(range(len(vs) - 1))
    return _binomial_product(hessians, total, steps, order, step_size, suffix_sums)


def _select_steps(tree: Any, steps: Sequence[int]) -> Any:
    """``tree[:, steps]`` for every leaf, without a host-to-device copy of an index tensor.

    ``steps`` from :func:`_step_order` is a run of consecutive steps, ascending or
    descending, so a slice (and a flip) selects it on any device without a host sync; other
    lists fall back to an index tensor created on the data's device.
    """
    lo, hi = min(steps), max(steps)
    if list(steps) == list(range(lo, hi + 1)):
        return _index(tree, (slice(None), slice(lo, hi + 1)))
    if list(steps) == list(range(hi, lo - 1, -1)):
        return tree_map(lambda x: x[:, lo : hi + 1].flip(1), tree)

    def pick(x: Tensor) -> Tensor:
        return x[:, torch.tensor(list(steps), device=x.device)]

    return tree_map(pick, tree)


def _place_steps(tree: Any, steps: Sequence[int], num_steps: int) -> Any:
    """The inverse of :func:`_select_steps` on [T, m, ...] leaves: [T, K, ...] leaves holding
    position i at step ``steps[i]`` and zeros at the other steps (a consecutive run)."""
    lo, hi = min(steps), max(steps)
    descending = len(steps) > 1 and steps[0] > steps[-1]
    if list(steps) != (list(range(hi, lo - 1, -1)) if descending else list(range(lo, hi + 1))):
        raise ValueError(f"steps must be a consecutive run, got {list(steps)}")

    def place(x: Tensor) -> Tensor:
        x = x.flip(1) if descending else x
        if x.shape[1] == num_steps:
            return x
        before = x.new_zeros(x.shape[0], lo, *x.shape[2:])
        after = x.new_zeros(x.shape[0], num_steps - 1 - hi, *x.shape[2:])
        return torch.cat([before, x, after], dim=1)

    return tree_map(place, tree)


def _binomial_product(
    hessians: _PathHessians,
    v: Params,
    steps: list[int],
    order: int,
    step_size: float,
    suffix_sums: Params | None = None,
) -> Params:
    """Truncated binomial expansion of (I - a H_{s_0}) ... (I - a H_{s_n}) v, as L levels.

    Level l computes w^(l)_i = H_{s_i} S_{i+1} for i = 0..n-l at once, where S_{i+1} is the
    sum of the previous level's w over positions > i (S = v at level 1).

    ``suffix_sums`` [T, n, ...]: level 1's S_{i+1} given per position instead of v everywhere
    (:func:`_path_vjp`: vectors entering at several steps); ``v`` is then the zeroth-order term.
    """
    n = len(steps)
    result = v
    w: Params | None = None
    coeff = 1.0
    for level in range(1, order + 1):
        m = n - level + 1  # positions 0..n-level carry a non-zero term
        if w is None and suffix_sums is not None:
            vecs = {k: x[:, :m] for k, x in suffix_sums.items()}
        elif w is None:
            vecs = {k: x.unsqueeze(1).expand(x.shape[0], m, *x.shape[1:]) for k, x in v.items()}
        else:
            # suffix sums over positions > i: reverse cumulative sum, shifted by one.
            vecs = {k: x.flip(1).cumsum(1).flip(1)[:, 1 : m + 1] for k, x in w.items()}
        w = hessians.steps(steps[:m], vecs)
        coeff *= -step_size
        result = _axpy(coeff, _sum_dim(w, 1), result)
    return result


class MetaProducts(NamedTuple):
    """J^T v and J v for one stored path, with the estimator fixed: see
    :func:`prepare_meta_products`. Both take and return per-task dicts ([T, ...]); ``jvp``
    also accepts one shared vector (no task dim).

    ``path_vjp([v_0, ..., v_K])`` = sum_k J_k^T v_k with J_k = d phi_k / d theta (J_0 = I,
    J_K = J; None entries are zero): the meta-gradient of an objective with terms at every
    point of the path (ProMP's KL penalties at the inner steps' policies), at the cost of one
    ``vjp``: the exact product by Horner's rule, u <- (I - a H_k) u + v_k from k = K - 1 down;
    the binomial cascade with v_k entering level 1's suffix sums, so that each v_k only meets
    the Hessians of the steps before k; trunc keeps the factors of its last ``order`` steps.
    """

    vjp: Callable[[Params], Params]
    jvp: Callable[[Params], Params]
    path_vjp: Callable[[Sequence[Params | None]], Params]


def prepare_meta_products(
    inner_loss: LossFn,
    path: Sequence[Params],
    inner_data: Sequence[Any],
    *,
    step_size: float,
    method: str,
    order: int | None = None,
    chunk_size: int | None = None,
    hvp_mode: str = "auto",
    cache: bool = False,
    hessians: Sequence[HessianProduct] | None = None,
) -> MetaProducts:
    """Task-batched J_t^T v and J_t v products for many vectors on the same path and data.

    Validates everything once. With ``cache=True`` each Hessian's graph is built on first
    use and reused by every later product (reverse-over-reverse; see ``_PathHessians``):
    the fast choice for the 20+ products of a conjugate-gradient solve, at the memory cost
    of keeping those graphs alive as long as the returned functions are. ``cache=False``
    builds and frees the graphs in every product (``hvp_mode``, ``chunk_size``).
    ``hessians``: the K products H_k already built on ``path[k]`` and ``inner_data[k]``
    (:func:`batched_inner_step_with_hessian` keeps them from the inner loop), used instead
    of building graphs; one call per step, so a binomial level loses its batching over steps.
    """
    num_steps = len(inner_data)
    order = effective_order(method, order, num_steps)
    _check_hvp_mode(hvp_mode)
    if len(path) != num_steps + 1:
        raise ValueError(
            f"path has {len(path)} parameter dicts, expected K + 1 = {num_steps + 1} "
            "(phi_0 .. phi_K from adapt)"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if cache and (chunk_size is not None or hvp_mode == "fwdrev"):
        raise ValueError(
            "cache=True keeps each Hessian's reverse-over-reverse graph for reuse; it cannot "
            f"also bound memory by chunks (chunk_size={chunk_size}) or use hvp_mode='fwdrev'"
        )
    if hessians is not None and len(hessians) != num_steps:
        raise ValueError(f"hessians has {len(hessians)} products, expected K = {num_steps}")
    num_tasks = next(iter(path[0].values())).shape[0]
    identity = method == "fomaml" or order == 0
    if not identity:
        # Stack phi_0..phi_{K-1} and the data along a step dim: [T, K, ...]. Only the
        # parameter vectors and the data are stored, plus the cached graphs if asked for.
        hessians = _PathHessians(
            inner_loss,
            _stack(list(path[:num_steps]), dim=1),
            _stack(list(inner_data), dim=1),
            chunk_size,
            hvp_mode,
            cache,
            hessians,
        )

    # binom with order >= K keeps every term: the exact product, no cascade needed.
    sequential = method == "trunc" or is_exact(method, order, num_steps)

    def product(v: Params, transpose: bool) -> Params:
        if identity:
            return dict(v)
        steps = _step_order(method, order, num_steps, transpose)
        if sequential:
            return _sequential_product(hessians, v, steps, step_size)
        return _binomial_product(hessians, v, steps, order, step_size)

    def path_vjp_fn(vs: Sequence[Params | None]) -> Params:
        if len(vs) != num_steps + 1:
            raise ValueError(f"path_vjp needs K + 1 = {num_steps + 1} vectors, got {len(vs)}")
        given = [(k, v) for k, v in enumerate(vs) if v is not None]
        if not given:
            raise ValueError("path_vjp needs at least one vector")
        for k, v in given:
            _check_like(v, path[0], f"vs[{k}]")
        if identity:
            return _sum_vectors([v for _, v in given])
        steps = _step_order(method, order, num_steps, transpose=True)
        if sequential:
            return _horner_path_vjp(hessians, vs, set(steps), step_size)
        return _binomial_path_vjp(hessians, vs, order, step_size)

    def vjp_fn(v: Params) -> Params:
        _check_like(v, path[0], "v")
        return product(v, transpose=True)

    def jvp_fn(v: Params) -> Params:
        if all(k in path[0] and v[k].shape == path[0][k].shape[1:] for k in v):
            v = {k: x.unsqueeze(0).expand(num_tasks, *x.shape) for k, x in v.items()}
        _check_like(v, path[0], "v")
        return product(v, transpose=False)

    return MetaProducts(vjp_fn, jvp_fn, path_vjp_fn)


def batched_meta_vjp(
    inner_loss: LossFn,
    path: Sequence[Params],
    inner_data: Sequence[Any],
    v: Params,
    *,
    step_size: float,
    method: str,
    order: int | None = None,
    chunk_size: int | None = None,
    hvp_mode: str = "auto",
) -> Params:
    """Task-batched J_t^T v_t for every task t (leading task dim on path, data and v)."""
    return prepare_meta_products(
        inner_loss, path, inner_data, step_size=step_size, method=method, order=order,
        chunk_size=chunk_size, hvp_mode=hvp_mode,
    ).vjp(v)  # fmt: skip


def batched_meta_jvp(
    inner_loss: LossFn,
    path: Sequence[Params],
    inner_data: Sequence[Any],
    v: Params,
    *,
    step_size: float,
    method: str,
    order: int | None = None,
    chunk_size: int | None = None,
    hvp_mode: str = "auto",
) -> Params:
    """Task-batched J_t v_t. ``v`` may also be one shared vector (no task dim)."""
    return prepare_meta_products(
        inner_loss, path, inner_data, step_size=step_size, method=method, order=order,
        chunk_size=chunk_size, hvp_mode=hvp_mode,
    ).jvp(v)  # fmt: skip


def _one_task(
    batched: Callable[..., Params],
    inner_loss: LossFn,
    path: Sequence[Params],
    inner_data: Sequence[Any],
    v: Params,
    **kwargs: Any,
) -> Params:
    """Run a batched product on a single task (a task dimension of size 1)."""
    _check_like(v, path[0], "v")
    out = batched(
        inner_loss,
        [_unsqueeze(p) for p in path],
        [_unsqueeze(d) for d in inner_data],
        _unsqueeze(v),
        **kwargs,
    )
    return _squeeze(out)


def meta_vjp(
    inner_loss: LossFn,
    path: Sequence[Params],
    inner_data: Sequence[Any],
    v: Params,
    *,
    step_size: float,
    method: str,
    order: int | None = None,
    chunk_size: int | None = None,
    hvp_mode: str = "auto",
) -> Params:
    """J^T v with J = d phi_K / d theta, estimated by ``method`` (see module docstring)."""
    return _one_task(
        batched_meta_vjp, inner_loss, path, inner_data, v, step_size=step_size,
        method=method, order=order, chunk_size=chunk_size, hvp_mode=hvp_mode,
    )  # fmt: skip


def meta_jvp(
    inner_loss: LossFn,
    path: Sequence[Params],
    inner_data: Sequence[Any],
    v: Params,
    *,
    step_size: float,
    method: str,
    order: int | None = None,
    chunk_size: int | None = None,
    hvp_mode: str = "auto",
) -> Params:
    """J v (forward product), estimated by ``method``; needed by trust-region outer steps."""
    return _one_task(
        batched_meta_jvp, inner_loss, path, inner_data, v, step_size=step_size,
        method=method, order=order, chunk_size=chunk_size, hvp_mode=hvp_mode,
    )  # fmt: skip


def batched_meta_gradient(
    inner_loss: LossFn,
    outer_loss: LossFn,
    params: Params,
    inner_data: Sequence[Any],
    outer_data: Any,
    *,
    step_size: float,
    method: str = "binom",
    order: int | None = 1,
    chunk_size: int | None = None,
    hvp_mode: str = "auto",
    reduction: str = "mean",
) -> Params:
    """Meta-gradient of the mean (``reduction``) over tasks of L_out(phi_K^t, outer_data^t).

    ``reduction="none"`` returns the per-task gradients J_t^T grad L_out(phi_K^t) with a
    leading task dimension.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")
    effective_order(method, order, len(inner_data))
    num_tasks = tree_leaves_first(outer_data).shape[0]
    path = batched_adapt(inner_loss, params, inner_data, step_size=step_size, num_tasks=num_tasks)
    g = task_gradients(outer_loss, path[-1], outer_data)
    per_task = batched_meta_vjp(
        inner_loss,
        path,
        inner_data,
        g,
        step_size=step_size,
        method=method,
        order=order,
        chunk_size=chunk_size,
        hvp_mode=hvp_mode,
    )
    if reduction == "none":
        return per_task
    total = _sum_dim(per_task, 0)
    return total if reduction == "sum" else {k: x / num_tasks for k, x in total.items()}


def meta_gradient(
    inner_loss: LossFn,
    outer_loss: LossFn,
    params: Params,
    inner_data: Sequence[Any],
    outer_data: Any,
    *,
    step_size: float,
    method: str = "binom",
    order: int | None = 1,
    chunk_size: int | None = None,
    hvp_mode: str = "auto",
) -> Params:
    """J^T grad L_out(phi_K): the meta-gradient of one task, estimated by ``method``."""
    out = batched_meta_gradient(
        inner_loss,
        outer_loss,
        params,
        [_unsqueeze(d) for d in inner_data],
        _unsqueeze(outer_data),
        step_size=step_size,
        method=method,
        order=order,
        chunk_size=chunk_size,
        hvp_mode=hvp_mode,
        reduction="sum",
    )
    return out
