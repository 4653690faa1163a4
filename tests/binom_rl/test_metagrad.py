"""Meta-gradient estimators against independent computations.

- quadratic inner losses (constant, non-commuting Hessians): closed-form products and a
  brute-force enumeration of the binomial expansion's index subsets;
- a tanh MLP: plain autograd through the unrolled inner loop (create_graph=True).
"""

from itertools import combinations

import pytest
import torch
from torch import nn

from binom_rl.metagrad import (
    TaskBatchedLoss,
    adapt,
    batched_adapt,
    batched_hvp,
    batched_inner_step_with_hessian,
    batched_meta_gradient,
    batched_meta_jvp,
    batched_meta_vjp,
    hessian_norms,
    is_exact,
    lacks_forward_ad,
    meta_gradient,
    meta_jvp,
    meta_vjp,
    prepare_meta_products,
    task_gradients,
)

ALPHA = 0.1
SHAPES = {"w": (2, 3), "b": (3,)}  # several tensors, 9 numbers in all
DIM = 9


def _flat(p):
    return torch.cat([p["w"].reshape(-1), p["b"].reshape(-1)])


def _unflat(x):
    return {"w": x[:6].reshape(2, 3), "b": x[6:]}


def quad_loss(params, data):
    """0.5 x^T A x + c^T x with x the flattened params: Hessian A, whatever the point."""
    x = _flat(params)
    return 0.5 * x @ data["A"] @ x + data["c"] @ x


def _random_quadratic(k_steps, dtype, gen):
    data = []
    for _ in range(k_steps):
        m = torch.randn(DIM, DIM, generator=gen, dtype=dtype)
        data.append({"A": (m + m.T) / 2, "c": torch.randn(DIM, generator=gen, dtype=dtype)})
    return data


def _random_params(gen, dtype, lead=()):
    return {k: torch.randn(*lead, *s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}


def _brute_force(hessians, v, order, transpose):
    """sum over index subsets k_1 < ... < k_l (l <= order) of (-a)^l H_k1 ... H_kl v."""
    total = v.clone()
    K = len(hessians)
    for level in range(1, order + 1):
        for subset in combinations(range(K), level):
            # J^T: leftmost factor has the smallest index; J: leftmost has the largest.
            factors = subset if transpose else subset[::-1]
            term = v.clone()
            for k in reversed(factors):
                term = hessians[k] @ term
            total = total + (-ALPHA) ** level * term
    return total


def _product(hessians, v, steps, transpose):
    """(I - a H_{s_0}) ... (I - a H_{s_n}) v for J^T (steps ascending), reversed for J."""
    eye = torch.eye(DIM, dtype=v.dtype)
    mat = eye.clone()
    for k in steps:
        factor = eye - ALPHA * hessians[k]
        mat = mat @ factor if transpose else factor @ mat
    return mat @ v


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("K", [1, 3, 4])
def test_quadratic_closed_form(K, transpose):
    gen = torch.Generator().manual_seed(K)
    dtype = torch.float64
    data = _random_quadratic(K, dtype, gen)
    hessians = [d["A"] for d in data]
    # Non-commuting factors, so the order of the product matters.
    assert not torch.allclose(hessians[0] @ hessians[-1], hessians[-1] @ hessians[0]) or K == 1
    params = _random_params(gen, dtype)
    v = _random_params(gen, dtype)
    path = adapt(quad_loss, params, data, step_size=ALPHA)
    fn = meta_vjp if transpose else meta_jvp
    kw = dict(step_size=ALPHA)

    def run(method, order=None, **extra):
        return _flat(fn(quad_loss, path, data, v, method=method, order=order, **kw, **extra))

    vf = _flat(v)
    torch.testing.assert_close(run("fomaml"), vf)
    torch.testing.assert_close(run("maml"), _product(hessians, vf, range(K), transpose))
    for L in range(0, K + 1):
        torch.testing.assert_close(run("binom", L), _brute_force(hessians, vf, L, transpose))
        torch.testing.assert_close(run("binom", L, chunk_size=1), run("binom", L))
        last = range(K - L, K)
        torch.testing.assert_close(run("trunc", L), _product(hessians, vf, last, transpose))
    torch.testing.assert_close(run("binom", K), run("maml"))


@pytest.mark.parametrize("K", [1, 3, 4])
def test_cached_products_match_brute_force_on_every_reuse(K):
    """prepare_meta_products(cache=True) keeps each Hessian's graph: every later product
    (a CG solve makes 20+) must still be the exact expansion, in both directions."""
    gen = torch.Generator().manual_seed(10 + K)
    dtype = torch.float64
    T = 2
    tasks = [_random_quadratic(K, dtype, gen) for _ in range(T)]
    hessians = [[d["A"] for d in task] for task in tasks]
    inner = [{key: torch.stack([tasks[t][k][key] for t in range(T)]) for key in ("A", "c")}
             for k in range(K)]  # fmt: skip
    params = _random_params(gen, dtype)
    path = batched_adapt(quad_loss, params, inner, step_size=ALPHA)
    cases = [("maml", None, range(K)), ("fomaml", None, None)]
    cases += [("trunc", L, range(K - L, K)) for L in range(K + 1)]
    cases += [("binom", L, None) for L in range(K + 1)]
    for method, order, exact_steps in cases:
        products = prepare_meta_products(
            quad_loss, path, inner, step_size=ALPHA, method=method, order=order, cache=True
        )
        for _ in range(3):  # the same cached graphs, new vectors each time
            v = _random_params(gen, dtype, lead=(T,))
            for transpose, fn in ((True, products.vjp), (False, products.jvp)):
                got = fn(v)
                for t in range(T):
                    vf = _flat({k: x[t] for k, x in v.items()})
                    if method == "binom":
                        want = _brute_force(hessians[t], vf, order, transpose)
                    elif method == "fomaml":
                        want = vf
                    else:
                        want = _product(hessians[t], vf, exact_steps, transpose)
                    torch.testing.assert_close(_flat({k: x[t] for k, x in got.items()}), want)


@pytest.mark.parametrize("method,order", [("maml", None), ("trunc", 2), ("binom", 1), ("binom", 2)])
def test_cached_products_equal_recomputed_on_mlp(method, order):
    K, T = 3, 2
    params, loss, _, _ = _mlp_problem(K, torch.float64, seed=0)
    inner = _mlp_task_data(K, T, seed=20)
    path = batched_adapt(loss, params, inner, step_size=0.05)
    kw = dict(step_size=0.05, method=method, order=order)
    cached = prepare_meta_products(loss, path, inner, cache=True, **kw)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        shared = {k: torch.randn(x.shape, generator=gen, dtype=x.dtype) for k, x in params.items()}
        per_task = {k: torch.randn((T, *x.shape), generator=gen, dtype=x.dtype)
                    for k, x in params.items()}  # fmt: skip
        torch.testing.assert_close(
            _cat(cached.jvp(shared)), _cat(batched_meta_jvp(loss, path, inner, shared, **kw))
        )
        torch.testing.assert_close(
            _cat(cached.vjp(per_task)), _cat(batched_meta_vjp(loss, path, inner, per_task, **kw))
        )


@pytest.mark.parametrize("method,order", [("maml", None), ("trunc", 2), ("binom", 1), ("binom", 2)])
def test_products_from_kept_inner_step_hessians(method, order):
    """H_k products kept from the inner steps' own graphs give the same J^T v and J v as
    graphs built afresh, for the sequential products and the binomial cascade alike."""
    K, T = 3, 2
    params, loss, _, _ = _mlp_problem(K, torch.float64, seed=1)
    inner = _mlp_task_data(K, T, seed=30)
    phi = {k: v.unsqueeze(0).expand(T, *v.shape) for k, v in params.items()}
    path, kept = [phi], []
    for data in inner:
        phi, hvp = batched_inner_step_with_hessian(loss, phi, data, step_size=0.05)
        path.append(phi)
        kept.append(hvp)
    for a, b in zip(path, batched_adapt(loss, params, inner, step_size=0.05), strict=True):
        torch.testing.assert_close(_cat(a), _cat(b))
    kw = dict(step_size=0.05, method=method, order=order)
    with_kept = prepare_meta_products(loss, path, inner, hessians=kept, **kw)
    gen = torch.Generator().manual_seed(4)
    v = {k: torch.randn((T, *x.shape), generator=gen, dtype=x.dtype) for k, x in params.items()}
    torch.testing.assert_close(
        _cat(with_kept.vjp(v)), _cat(batched_meta_vjp(loss, path, inner, v, **kw))
    )
    torch.testing.assert_close(
        _cat(with_kept.jvp(v)), _cat(batched_meta_jvp(loss, path, inner, v, **kw))
    )
    with pytest.raises(ValueError, match="hessians"):
        prepare_meta_products(loss, path, inner, hessians=kept[:2], **kw)


def test_cache_refuses_chunking_and_fwdrev():
    data, params, path = _small()
    kw = dict(step_size=ALPHA, method="binom", order=1, cache=True)
    batched = ([_unsqueeze_tree(p) for p in path], [_unsqueeze_tree(d) for d in data])
    with pytest.raises(ValueError, match="chunk"):
        prepare_meta_products(quad_loss, *batched, chunk_size=2, **kw)
    with pytest.raises(ValueError, match="fwdrev"):
        prepare_meta_products(quad_loss, *batched, hvp_mode="fwdrev", **kw)


def _unsqueeze_tree(d):
    return {k: x.unsqueeze(0) for k, x in d.items()}


def test_binom_revrev_fallback_matches_fwdrev():
    gen = torch.Generator().manual_seed(0)
    data = _random_quadratic(4, torch.float64, gen)
    params, v = _random_params(gen, torch.float64), _random_params(gen, torch.float64)
    path = adapt(quad_loss, params, data, step_size=ALPHA)
    a = meta_vjp(quad_loss, path, data, v, step_size=ALPHA, method="binom", order=2)
    b = meta_vjp(
        quad_loss, path, data, v, step_size=ALPHA, method="binom", order=2, hvp_mode="revrev"
    )
    torch.testing.assert_close(_flat(a), _flat(b))


class _SinWithoutJvp(torch.autograd.Function):
    """sin(x) with a backward but no jvp: forward-mode AD has no formula for it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * x.cos()


def _sin_loss(p, data):
    return (_SinWithoutJvp.apply(p["w"]) * data["c"]).sum()


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("task_batched", [False, True])
def test_hvp_falls_back_where_forward_ad_has_no_formula(chunk_size, task_batched):
    """hvp_mode auto: an op without a forward-mode formula makes the HVP reverse-over-reverse,
    with a warning; the result is the Hessian of sum_i c_i sin(w_i): diag(-c sin w)."""
    gen = torch.Generator().manual_seed(0)
    w, c, v = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    loss = TaskBatchedLoss(lambda p, d: (_SinWithoutJvp.apply(p["w"]) * d["c"]).sum(-1))
    with pytest.warns(RuntimeWarning, match="using reverse-over-reverse"):
        out = batched_hvp(loss if task_batched else _sin_loss, {"w": w}, {"c": c}, {"w": v},
                          chunk_size=chunk_size)  # fmt: skip
    torch.testing.assert_close(out["w"], -torch.sin(w) * c * v)
    with pytest.raises(NotImplementedError, match="forward mode AD"):
        batched_hvp(_sin_loss, {"w": w}, {"c": c}, {"w": v}, hvp_mode="fwdrev")


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        NotImplementedError("some other missing kernel"),
    ],
    ids=["shape", "out-of-memory", "other"],
)
def test_hvp_failures_other_than_forward_ad_propagate(error, recwarn):
    """Only a missing forward-mode formula falls back: shape bugs, out-of-memory and the
    rest reach the caller, and reverse-over-reverse is not tried."""
    calls = []

    def failing_loss(p, data):
        calls.append(1)
        raise error

    w = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(type(error), match=str(error).split(" ")[0]):
        batched_hvp(failing_loss, {"w": w}, {"c": w}, {"w": w})
    assert len(calls) == 1  # forward-over-reverse only: no second attempt
    assert not [x for x in recwarn if "reverse-over-reverse" in str(x.message)]
    assert lacks_forward_ad(error) is False
    assert lacks_forward_ad(NotImplementedError(
        "Trying to use forward AD with _cdist_forward that does not support it because it "
        "has not been implemented yet."))  # fmt: skip


def test_adapt_path_is_gradient_descent():
    gen = torch.Generator().manual_seed(1)
    data = _random_quadratic(3, torch.float64, gen)
    params = _random_params(gen, torch.float64)
    path = adapt(quad_loss, params, data, step_size=ALPHA)
    assert len(path) == 4
    x = _flat(params)
    for k, d in enumerate(data):
        x = x - ALPHA * (d["A"] @ x + d["c"])
        torch.testing.assert_close(_flat(path[k + 1]), x)
    assert all(not t.requires_grad for p in path for t in p.values())


# --------------------------------------------------------------------------- tanh MLP


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.net(x))


def _mlp_problem(K, dtype, seed=0, n=10):
    torch.manual_seed(seed)
    module = _MLP().to(dtype)
    params = {name: p.detach().clone() for name, p in module.named_parameters()}

    def loss(p, data):
        return ((torch.func.functional_call(module, p, (data["x"],)) - data["y"]) ** 2).mean()

    def make(amp, phase):
        x = torch.rand(n, 1, dtype=dtype) * 10 - 5
        return {"x": x, "y": amp * torch.sin(x + phase)}

    inner = [make(2.0, 0.5) for _ in range(K)]
    outer = make(2.0, 0.5)
    return params, loss, inner, outer


def _mlp_task_data(K, T, seed):
    """Inner data of T sine tasks (seeds seed, seed + 1, ...) stacked along a task dim."""
    tasks = [_mlp_problem(K, torch.float64, seed=seed + t)[2] for t in range(T)]
    return [{key: torch.stack([tasks[t][k][key] for t in range(T)]) for key in ("x", "y")}
            for k in range(K)]  # fmt: skip


def _unrolled_meta_gradient(loss, params, inner, outer, step_size):
    """Plain autograd through the unrolled loop: what MAML codebases do."""
    theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    phi = theta
    for data in inner:
        grads = torch.autograd.grad(loss(phi, data), list(phi.values()), create_graph=True)
        phi = {k: p - step_size * g for (k, p), g in zip(phi.items(), grads, strict=True)}
    out = torch.autograd.grad(loss(phi, outer), list(theta.values()))
    return dict(zip(theta.keys(), out, strict=True))


def _cat(d):
    return torch.cat([x.reshape(-1) for x in d.values()])


@pytest.mark.parametrize("K", [2, 4])
def test_mlp_exact_matches_unrolled_autograd(K):
    params, loss, inner, outer = _mlp_problem(K, torch.float64)
    ref = _cat(_unrolled_meta_gradient(loss, params, inner, outer, 0.05))
    for method, order in [("maml", None), ("binom", K), ("trunc", K)]:
        got = _cat(
            meta_gradient(
                loss, loss, params, inner, outer, step_size=0.05, method=method, order=order
            )
        )
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_mlp_binom_error_non_increasing_in_order():
    K = 5
    params, loss, inner, outer = _mlp_problem(K, torch.float64, seed=3)
    ref = _cat(_unrolled_meta_gradient(loss, params, inner, outer, 0.05))
    errors = []
    for L in range(0, K + 1):
        got = _cat(
            meta_gradient(loss, loss, params, inner, outer, step_size=0.05, method="binom", order=L)
        )
        errors.append(((got - ref).norm() / ref.norm()).item())
    assert errors[-1] < 1e-10
    for a, b in zip(errors, errors[1:], strict=False):
        assert b <= a * (1 + 1e-9), errors
    assert errors[0] > errors[2] > errors[4] > 0  # the expansion strictly improves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "method,order", [("maml", None), ("fomaml", None), ("trunc", 2), ("binom", 1), ("binom", 2)]
)
def test_adjoint_identity(method, order, dtype):
    """<u, J v> = <J^T u, v> for every estimator (J^T and J are estimated consistently)."""
    K = 3
    params, loss, inner, _ = _mlp_problem(K, dtype, seed=5)
    path = adapt(loss, params, inner, step_size=0.05)
    gen = torch.Generator().manual_seed(2)
    u = {k: torch.randn(x.shape, generator=gen, dtype=dtype) for k, x in params.items()}
    v = {k: torch.randn(x.shape, generator=gen, dtype=dtype) for k, x in params.items()}
    kw = dict(step_size=0.05, method=method, order=order)
    jv = meta_jvp(loss, path, inner, v, **kw)
    jtu = meta_vjp(loss, path, inner, u, **kw)
    lhs, rhs = _cat(u) @ _cat(jv), _cat(jtu) @ _cat(v)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert abs(lhs - rhs) <= tol * (abs(lhs) + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,order", [("maml", None), ("trunc", 1), ("binom", 2)])
def test_batched_equals_loop_over_tasks(method, order, dtype):
    K, T = 3, 4
    problems = [_mlp_problem(K, dtype, seed=0) for _ in range(1)]
    params, loss, _, _ = problems[0]
    tasks = [_mlp_problem(K, dtype, seed=10 + t)[2:] for t in range(T)]
    inner = [
        {key: torch.stack([tasks[t][0][k][key] for t in range(T)]) for key in ("x", "y")}
        for k in range(K)
    ]
    outer = {key: torch.stack([tasks[t][1][key] for t in range(T)]) for key in ("x", "y")}
    kw = dict(step_size=0.05, method=method, order=order)
    per_task = batched_meta_gradient(loss, loss, params, inner, outer, reduction="none", **kw)
    mean = batched_meta_gradient(loss, loss, params, inner, outer, **kw)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    loop = []
    for t in range(T):
        g = meta_gradient(loss, loss, params, tasks[t][0], tasks[t][1], **kw)
        torch.testing.assert_close(_cat({k: x[t] for k, x in per_task.items()}), _cat(g), **tol)
        loop.append(_cat(g))
    torch.testing.assert_close(_cat(mean), torch.stack(loop).mean(0), **tol)

    # jvp with a shared vector and vjp with per-task vectors, batched vs loop.
    path = batched_adapt(loss, params, inner, step_size=0.05)
    v = {k: torch.ones_like(x) for k, x in params.items()}
    jv = batched_meta_jvp(loss, path, inner, v, **kw)
    vt = {k: x.unsqueeze(0).expand(T, *x.shape) for k, x in v.items()}
    jtv = batched_meta_vjp(loss, path, inner, vt, **kw)
    for t in range(T):
        path_t = adapt(loss, params, tasks[t][0], step_size=0.05)
        ref_jv = meta_jvp(loss, path_t, tasks[t][0], v, **kw)
        ref_jtv = meta_vjp(loss, path_t, tasks[t][0], v, **kw)
        torch.testing.assert_close(_cat({k: x[t] for k, x in jv.items()}), _cat(ref_jv), **tol)
        torch.testing.assert_close(_cat({k: x[t] for k, x in jtv.items()}), _cat(ref_jtv), **tol)


# --------------------------------------------------------------------------- bad input


def _small():
    gen = torch.Generator().manual_seed(0)
    data = _random_quadratic(3, torch.float64, gen)
    params = _random_params(gen, torch.float64)
    return data, params, adapt(quad_loss, params, data, step_size=ALPHA)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="sgd"), "unknown meta-gradient method"),
        (dict(method="binom", order=None), "needs an order"),
        (dict(method="trunc", order=-1), "order must be >= 0"),
        (dict(method="binom", order=4), "already exact MAML"),
        (dict(method="binom", order=1.5), "order must be an int"),
        (dict(method="binom", order=1, chunk_size=0), "chunk_size"),
        (dict(method="binom", order=1, hvp_mode="fast"), "hvp_mode"),
    ],
)
def test_bad_method_and_order(kwargs, match):
    data, params, path = _small()
    with pytest.raises(ValueError, match=match):
        meta_vjp(quad_loss, path, data, params, step_size=ALPHA, **kwargs)


def test_bad_vector_and_data():
    data, params, path = _small()
    with pytest.raises(ValueError, match="missing"):
        meta_vjp(quad_loss, path, data, {"w": params["w"]}, step_size=ALPHA, method="maml")
    with pytest.raises(ValueError, match="shape"):
        bad = {"w": params["w"], "b": torch.zeros(4, dtype=torch.float64)}
        meta_jvp(quad_loss, path, data, bad, step_size=ALPHA, method="maml")
    with pytest.raises(ValueError, match="empty"):
        meta_vjp(quad_loss, path[:1], [], params, step_size=ALPHA, method="maml")
    with pytest.raises(ValueError, match="empty"):
        adapt(quad_loss, params, [], step_size=ALPHA)
    with pytest.raises(ValueError, match="K \\+ 1"):
        meta_vjp(quad_loss, path[:2], data, params, step_size=ALPHA, method="maml")
    with pytest.raises(ValueError, match="already exact"):
        meta_gradient(quad_loss, quad_loss, params, data, data[0], step_size=ALPHA, order=5)


# --------------------------------------------------------------------------- task-batched losses


def _task_batched_mlp_losses(p, data):
    """The _MLP squared error written over a leading task dim (one bmm per layer, no vmap):
    params [T, ...], data [T, n, 1] -> losses [T]."""
    h = data["x"]
    for name in ("net.0", "net.2"):
        h = torch.tanh(torch.baddbmm(p[f"{name}.bias"].unsqueeze(1), h,
                                     p[f"{name}.weight"].transpose(1, 2)))  # fmt: skip
    out = torch.baddbmm(p["head.bias"].unsqueeze(1), h, p["head.weight"].transpose(1, 2))
    return ((out - data["y"]) ** 2).mean(dim=(1, 2))


@pytest.mark.parametrize("hvp_mode,chunk_size", [("auto", None), ("revrev", None), ("fwdrev", 1)])
def test_task_batched_loss_equals_vmapped_per_task_loss(hvp_mode, chunk_size):
    """A TaskBatchedLoss (gradients of the summed losses, no vmap) gives the per-task
    loss' gradients, HVPs and meta-products (vmap path), and its per-task call is the loss."""
    K, T = 3, 3
    params, loss, _, outer = _mlp_problem(K, torch.float64, seed=2)
    inner = _mlp_task_data(K, T, seed=40)
    batched_loss = TaskBatchedLoss(_task_batched_mlp_losses)
    torch.testing.assert_close(
        batched_loss(params, _index_task(inner[0], 1)), loss(params, _index_task(inner[0], 1))
    )
    path = batched_adapt(loss, params, inner, step_size=0.05)
    for a, b in zip(path, batched_adapt(batched_loss, params, inner, step_size=0.05), strict=True):
        torch.testing.assert_close(_cat(a), _cat(b))
    torch.testing.assert_close(
        _cat(task_gradients(batched_loss, path[1], inner[1])),
        _cat(task_gradients(loss, path[1], inner[1])),
    )
    gen = torch.Generator().manual_seed(5)
    v = {k: torch.randn((T, *x.shape), generator=gen, dtype=x.dtype) for k, x in params.items()}
    torch.testing.assert_close(
        _cat(batched_hvp(batched_loss, path[1], inner[1], v, chunk_size, hvp_mode)),
        _cat(batched_hvp(loss, path[1], inner[1], v)),
    )
    for method, order in [("maml", None), ("binom", 1), ("binom", 2)]:
        kw = dict(step_size=0.05, method=method, order=order)
        ref = prepare_meta_products(loss, path, inner, **kw)
        cache = chunk_size is None and hvp_mode == "auto"
        got = prepare_meta_products(
            batched_loss, path, inner, chunk_size=chunk_size, hvp_mode=hvp_mode, cache=cache, **kw
        )
        torch.testing.assert_close(_cat(got.vjp(v)), _cat(ref.vjp(v)))
        torch.testing.assert_close(_cat(got.jvp(v)), _cat(ref.jvp(v)))
    # The meta-gradient against plain autograd through each task's unrolled loop.
    outer_b = {key: torch.stack([outer[key]] * T) for key in ("x", "y")}
    got = batched_meta_gradient(batched_loss, batched_loss, params, inner, outer_b,
                                step_size=0.05, method="maml", reduction="none")  # fmt: skip
    for t in range(T):
        want = _unrolled_meta_gradient(
            loss, params, [_index_task(d, t) for d in inner], outer, 0.05
        )
        torch.testing.assert_close(_cat({k: x[t] for k, x in got.items()}), _cat(want))


def _index_task(d, t):
    return {k: x[t] for k, x in d.items()}


# --------------------------------------------------------------------------- hessian_norms


def _quadratic_with_spectrum(eigenvalues, gen):
    """A symmetric matrix Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_hessian_norms_on_quadratics_with_known_spectra():
    """The largest |eigenvalue|, negative ones included, for every step and task."""
    gen = torch.Generator().manual_seed(3)
    K, T = 2, 3
    tops = [[4.0, -6.0, 2.5], [-3.0, 1.5, 9.0]]  # [K][T]: the eigenvalue of largest modulus
    A = [[_quadratic_with_spectrum([tops[k][t], 1.0, -1.0, 0.5] + [0.1] * 5, gen)
          for t in range(T)] for k in range(K)]  # fmt: skip
    inner = [{"A": torch.stack(A[k]), "c": torch.randn(T, DIM, generator=gen, dtype=torch.float64)}
             for k in range(K)]  # fmt: skip
    path = batched_adapt(quad_loss, _random_params(gen, torch.float64), inner, step_size=ALPHA)
    got = hessian_norms(quad_loss, path, inner, iters=200, generator=gen)
    assert got.shape == (K, T)
    want = torch.tensor([[max(abs(e) for e in torch.linalg.eigvalsh(A[k][t]).tolist())
                          for t in range(T)] for k in range(K)], dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(want, torch.tensor(tops, dtype=torch.float64).abs())
    torch.testing.assert_close(got, want)


def test_hessian_norms_on_mlp_against_explicit_hessian():
    """Against eigvalsh of the full Hessian (torch.func.hessian of the flattened
    parameters), per task: a lower bound always, and close after enough iterations."""
    K, T = 2, 2
    params, loss, _, _ = _mlp_problem(K, torch.float64, seed=0)
    inner = _mlp_task_data(K, T, seed=30)
    path = batched_adapt(loss, params, inner, step_size=0.05)
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def flat_loss(x, data):
        chunks = torch.split(x, sizes)
        return loss({n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}, data)

    want = torch.empty(K, T, dtype=torch.float64)
    for k in range(K):
        for t in range(T):
            x = torch.cat([path[k][n][t].reshape(-1) for n in names])
            h = torch.func.hessian(flat_loss)(x, _index_task(inner[k], t))
            want[k, t] = torch.linalg.eigvalsh(h).abs().max()
    gen = torch.Generator().manual_seed(0)
    few = hessian_norms(loss, path, inner, iters=3, generator=gen)
    assert (few <= want * (1 + 1e-10)).all()  # ||H v|| of a unit v never exceeds ||H||
    many = hessian_norms(loss, path, inner, iters=500, generator=gen)
    torch.testing.assert_close(many, want, rtol=1e-6, atol=0)


def test_hessian_norms_zero_hessian_and_bad_input():
    gen = torch.Generator().manual_seed(1)

    def linear_loss(p, data):
        return data["c"] @ _flat(p)

    inner = [{"c": torch.randn(2, DIM, generator=gen, dtype=torch.float64)}]
    path = batched_adapt(linear_loss, _random_params(gen, torch.float64), inner, step_size=ALPHA)
    got = hessian_norms(linear_loss, path, inner, iters=5, generator=gen)
    assert torch.equal(got, torch.zeros(1, 2, dtype=torch.float64))  # not NaN
    with pytest.raises(ValueError, match="iters must be >= 1"):
        hessian_norms(linear_loss, path, inner, iters=0)
    with pytest.raises(ValueError, match="need phi_0..phi_K"):
        hessian_norms(linear_loss, path[:1], inner)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("K", [1, 3, 4])
def test_path_vjp_matches_per_step_brute_force(K, cache):
    """path_vjp([v_0 .. v_K]) = sum_k J_k^T v_k, J_k = d phi_k / d theta, on non-commuting
    quadratics: exact (maml, binom L = K) = explicit matrices; binom L = the subsets of the
    steps before k with at most L Hessians, for each v_k; trunc L = the factors of the last
    L steps that come before k; fomaml = sum_k v_k. Some entries None (no term)."""
    gen = torch.Generator().manual_seed(10 + K)
    dtype = torch.float64
    data = _random_quadratic(K, dtype, gen)
    hessians = [d["A"] for d in data]
    params = _random_params(gen, dtype)
    vs = [_random_params(gen, dtype) for _ in range(K + 1)]
    if K > 1:
        vs[1] = None
    path = adapt(quad_loss, params, data, step_size=ALPHA)
    batched_path = [{k: x.unsqueeze(0) for k, x in p.items()} for p in path]
    batched_data = [{k: x.unsqueeze(0) for k, x in d.items()} for d in data]
    batched_vs = [None if v is None else {k: x.unsqueeze(0) for k, x in v.items()} for v in vs]

    def run(method, order=None):
        products = prepare_meta_products(
            quad_loss, batched_path, batched_data, step_size=ALPHA, method=method, order=order,
            cache=cache,
        )  # fmt: skip
        return _flat({k: x[0] for k, x in products.path_vjp(batched_vs).items()})

    given = [(k, _flat(v)) for k, v in enumerate(vs) if v is not None]
    torch.testing.assert_close(run("fomaml"), sum(v for _, v in given))
    exact = sum(_product(hessians, v, range(k), transpose=True) for k, v in given)
    torch.testing.assert_close(run("maml"), exact)
    for L in range(0, K + 1):
        binom = sum(_brute_force(hessians[:k], v, min(L, k), transpose=True) for k, v in given)
        torch.testing.assert_close(run("binom", L), binom)
        window = range(K - L, K)
        trunc = sum(_product(hessians, v, [i for i in window if i < k], True) for k, v in given)
        torch.testing.assert_close(run("trunc", L), trunc)


def test_path_vjp_of_the_last_vector_alone_is_vjp():
    gen = torch.Generator().manual_seed(5)
    data = _random_quadratic(3, torch.float64, gen)
    path = adapt(quad_loss, _random_params(gen, torch.float64), data, step_size=ALPHA)
    batched_path = [{k: x.unsqueeze(0) for k, x in p.items()} for p in path]
    batched_data = [{k: x.unsqueeze(0) for k, x in d.items()} for d in data]
    v = {k: x.unsqueeze(0) for k, x in _random_params(gen, torch.float64).items()}
    for method, order in (("maml", None), ("binom", 1), ("trunc", 2)):
        products = prepare_meta_products(
            quad_loss, batched_path, batched_data, step_size=ALPHA, method=method, order=order
        )
        got, want = products.path_vjp([None, None, None, v]), products.vjp(v)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    with pytest.raises(ValueError, match="K \\+ 1 = 4 vectors"):
        products.path_vjp([v])


@pytest.mark.parametrize(
    "method,order,steps,exact",
    [("maml", None, 3, True), ("fomaml", 0, 1, False), ("binom", 1, 1, True),
     ("binom", 1, 2, False), ("binom", 2, 2, True), ("trunc", 1, 3, False),
     ("trunc", 3, 3, True)],
)  # fmt: skip
def test_is_exact(method, order, steps, exact):
    assert is_exact(method, order, steps) is exact
