"""Benchmark of the TRPO meta-step alone, on synthetic stored episodes (no environment).

HalfCheetah-sized by default: observations 17, actions 6, a (64, 64) tanh Gaussian policy,
40 tasks x 20 episodes x 200 steps per inner step. The data follow the training loop's
path: for k = 0..K-1 random observations, actions drawn from pi_{phi_k}, random rewards
through :meth:`MetaLearner._batch` (linear baseline, GAE, per-task normalised advantages,
full masks), then the inner step to phi_{k+1}; validation episodes come from pi_{phi_K}.
Nothing here depends on gymnasium or MuJoCo, so it runs on a bare GPU machine.

Measured, for each K and estimator (BinomMAML L = 1, 2, 3; TruncMAML L = min(2, K); exact
MAML batched; the vanilla reference):

(a) one meta-gradient (``MetaLearner.meta_gradient``);
(b) one full TRPO meta-step (``MetaLearner.trpo_step``: gradient, 10 CG iterations of
    meta-Fisher-vector products, backtracking line search that re-adapts).

The reference (:class:`VanillaMetaTRPO`) is written independently with ``torch.autograd``
the way MAML-RL code bases do it: a Python loop over tasks, backprop through the unrolled
inner loop (``create_graph=True``), Fisher-vector products by double backward of the KL
through the unrolled graph, its own CG and line search. :func:`correctness_check`
compares its meta-gradient (and TRPO step) with the engine's exact MAML on the same data.

Wall time is a median after a warm-up (CUDA events on the GPU); peak memory is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call (CUDA
only: on CPU memory is not measured, see ``benchmark_metagrad`` for fresh-process RSS).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import environment_line, markdown_table, timed_cuda_call
from binom_rl.agents.maml_trpo import AdaptationResult, MetaLearner
from binom_rl.agents.policies import GaussianMLPPolicy
from binom_rl.config import Config
from binom_rl.metagrad import Params, batched_inner_step, default_chunk_size, mlp_hvp_bytes
from binom_rl.rl import flatten_params
from binom_rl.sampler import Episodes

# --------------------------------------------------------------------------- options


@dataclass
class MetastepOptions:
    """Sizes and what to run; ``scripts/benchmark_metastep.py`` fills it from flags."""

    obs_dim: int = 17
    act_dim: int = 6
    hidden: tuple[int, ...] = (64, 64)
    tasks: int = 40
    episodes: int = 20
    horizon: int = 200
    ks: tuple[int, ...] = (1, 3, 5, 10)
    orders: tuple[int, ...] = (1, 2, 3)
    chunk_sizes: tuple[int | None, ...] = (None, 400, 200, 100, 50, 20, 10)
    chunk_k: int = 10
    fast_lr: float = 0.1
    cg_iters: int = 10
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    seed: int = 0
    time_budget_s: float = 300.0
    trpo: bool = True
    reference: bool = True
    output: str = "docs/benchmark_metastep.md"
    quick: bool = False


def quick_options(**overrides: Any) -> MetastepOptions:
    """Tiny sizes for CPU smoke runs and tests (seconds)."""
    base = MetastepOptions(
        tasks=4,
        episodes=2,
        horizon=20,
        hidden=(16, 16),
        ks=(1, 3),
        orders=(1, 2),
        chunk_sizes=(None, 4, 2),
        chunk_k=3,
        repeats=1,
        quick=True,
        time_budget_s=120.0,
    )
    return replace(base, **overrides)


# --------------------------------------------------------------------------- synthetic data


@dataclass
class Problem:
    """A meta-learner, its parameters, and stored K inner batches plus validation episodes."""

    learner: MetaLearner
    params: Params
    adaptation: AdaptationResult
    valid: dict[str, Any]  # outer data as trpo_step builds it (old_log_prob, old_dist)


def make_config(opts: MetastepOptions, num_steps: int, **overrides: Any) -> Config:
    """The MAML-TRPO settings of the paper (max-kl 0.01, damping 1e-5, 15 tries x 0.8)."""
    raw: dict[str, Any] = dict(
        fast_lr=opts.fast_lr,
        fast_batch_size=opts.episodes,
        num_steps=num_steps,
        meta_batch_size=opts.tasks,
        max_kl=0.01,
        cg_iters=opts.cg_iters,
        cg_damping=1e-5,
        ls_max_steps=15,
        ls_backtrack_ratio=0.8,
        hidden_sizes=list(opts.hidden),
        estimator="maml",
        order=num_steps,
        device=opts.device,
        seed=opts.seed,
    )
    raw.update(overrides)
    return Config(**raw)


def _synthetic_episodes(
    policy: GaussianMLPPolicy, phi: Params, opts: MetastepOptions, gen: torch.Generator
) -> Episodes:
    """T x B episodes of H steps: N(0, 1) observations, actions ~ pi_phi, N(0, 1) rewards
    with a per-task offset, full masks. Time-major, on ``opts.device``."""
    dev = opts.device
    h, t, b = opts.horizon, opts.tasks, opts.episodes
    obs = torch.randn(h, t, b, opts.obs_dim, generator=gen, device=dev)
    with torch.no_grad():
        mean, std = torch.func.vmap(policy.mean_and_std, in_dims=(0, 1), out_dims=(1, 0))(phi, obs)
        noise = torch.randn(mean.shape, generator=gen, device=dev)
        actions = mean + std[None, :, None, :] * noise
    offset = torch.randn(1, t, 1, generator=gen, device=dev)
    rewards = torch.randn(h, t, b, generator=gen, device=dev) + offset
    mask = torch.ones(h, t, b, device=dev)
    return Episodes(
        observations=obs,
        actions=actions,
        rewards=rewards,
        mask=mask,
        returns=rewards.sum(0),
        lengths=torch.full((t, b), h, dtype=torch.int64, device=dev),
    )


def make_problem(opts: MetastepOptions, num_steps: int, **cfg_overrides: Any) -> Problem:
    """Synthetic stored episodes for K = ``num_steps`` inner steps, deterministic in the seed."""
    cfg = make_config(opts, num_steps, **cfg_overrides)
    policy = GaussianMLPPolicy(opts.obs_dim, opts.act_dim, opts.hidden, "tanh")
    learner = MetaLearner(cfg, sampler=None, policy=policy)  # type: ignore[arg-type]
    params = learner.init_params(opts.seed)
    gen = torch.Generator(device=opts.device).manual_seed(opts.seed + 1000 * num_steps)
    phi = {k: v.unsqueeze(0).expand(opts.tasks, *v.shape) for k, v in params.items()}
    path, inner_data, episodes = [phi], [], []
    for k in range(num_steps + 1):
        episodes.append(_synthetic_episodes(policy, phi, opts, gen))
        if k == num_steps:
            break
        data = learner._batch(episodes[-1])
        inner_data.append(data)
        phi = batched_inner_step(learner.inner_loss, phi, data, step_size=cfg.fast_lr)
        path.append(phi)
    adaptation = AdaptationResult(episodes, inner_data, path)
    valid = learner.outer_batch(episodes[-1], path[-1])
    return Problem(learner, params, adaptation, valid)


def with_estimator(problem: Problem, method: str, order: int | None, chunk: Any) -> MetaLearner:
    """A learner on the same policy and config, with another estimator / chunk size."""
    cfg = replace(
        problem.learner.cfg,
        estimator=method,
        order=order if order is not None else problem.learner.cfg.num_steps,
        chunk_size=chunk,
    )
    return MetaLearner(cfg, sampler=None, policy=problem.learner.policy)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reference


class VanillaMetaTRPO:
    """MAML-TRPO as MAML-RL code bases write it, with plain ``torch.autograd``.

    Tasks in a Python loop; each task's K inner steps are differentiated through
    (``create_graph=True``); the Fisher-vector product is the double backward of the
    task-mean KL(pi_old || pi_{phi_K(theta)}) through the unrolled graph; CG with a Python
    early stop; backtracking line search. Parameters and data are the engine's (same
    names and layout), but no engine code is used.
    """

    def __init__(self, problem: Problem):
        cfg = problem.learner.cfg
        self.cfg = cfg
        self.num_layers = len(cfg.hidden_sizes) + 1
        self.inner = problem.adaptation.inner_data
        self.valid = problem.valid
        self.num_tasks = problem.valid["obs"].shape[0]

    # ---- the policy, written out
    def _gaussian(self, p: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
        h = obs
        for i in range(self.num_layers):
            h = F.linear(h, p[f"layers.{i}.weight"], p[f"layers.{i}.bias"])
            if i < self.num_layers - 1:
                h = torch.tanh(h)
        return h, p["log_std"]

    def _log_prob(self, p: Params, obs: Tensor, act: Tensor) -> Tensor:
        mu, log_std = self._gaussian(p, obs)
        var = torch.exp(2 * log_std)
        return (-((act - mu) ** 2) / (2 * var) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    @staticmethod
    def _mean(x: Tensor, mask: Tensor) -> Tensor:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    def _adapt(self, theta: Params, t: int, create_graph: bool) -> Params:
        phi = theta
        for data in self.inner:
            loss = -self._mean(
                self._log_prob(phi, data["obs"][t], data["actions"][t]) * data["advantages"][t],
                data["mask"][t],
            )
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)
            phi = {
                k: w - self.cfg.fast_lr * g for (k, w), g in zip(phi.items(), grads, strict=True)
            }
        return phi

    def _outer_and_kl(self, phi: Params, t: int) -> tuple[Tensor, Tensor]:
        v = self.valid
        logp = self._log_prob(phi, v["obs"][t], v["actions"][t])
        loss = -self._mean(
            torch.exp(logp - v["old_log_prob"][t]) * v["advantages"][t], v["mask"][t]
        )
        mu_o, ls_o = (x[t] for x in v["old_dist"])
        mu_n, ls_n = self._gaussian(phi, v["obs"][t])
        kl = (
            ls_n
            - ls_o
            + (torch.exp(2 * ls_o) + (mu_o - mu_n) ** 2) / (2 * torch.exp(2 * ls_n))
            - 0.5
        )
        return loss, self._mean(kl.sum(-1), v["mask"][t])

    def _leaves(self, params: Params) -> Params:
        return {k: x.detach().clone().requires_grad_(True) for k, x in params.items()}

    # ---- meta-gradient
    def meta_gradient(self, params: Params) -> Params:
        theta = self._leaves(params)
        losses = [
            self._outer_and_kl(self._adapt(theta, t, True), t)[0] for t in range(self.num_tasks)
        ]
        grads = torch.autograd.grad(torch.stack(losses).mean(), list(theta.values()))
        return dict(zip(theta, grads, strict=True))

    # ---- TRPO step
    def _losses(self, params: Params) -> tuple[float, float]:
        loss = kl = 0.0
        theta = self._leaves(params)
        for t in range(self.num_tasks):
            phi = {k: x.detach() for k, x in self._adapt(theta, t, False).items()}
            with torch.no_grad():
                lo, kl_t = self._outer_and_kl(phi, t)
            loss, kl = loss + lo.item(), kl + kl_t.item()
        return loss / self.num_tasks, kl / self.num_tasks

    def _conjugate_gradient(self, fvp: Callable[[Tensor], Tensor], b: Tensor) -> Tensor:
        x, r, p = torch.zeros_like(b), b.clone(), b.clone()
        rr = torch.dot(r, r)
        for _ in range(self.cfg.cg_iters):
            z = fvp(p)
            alpha = rr / torch.dot(p, z)
            x, r = x + alpha * p, r - alpha * z
            rr_new = torch.dot(r, r)
            p = r + (rr_new / rr) * p
            rr = rr_new
            if rr.item() < 1e-10:
                break
        return x

    def _full_step(self, params: Params) -> Tensor:
        """-sqrt(2 max_kl / s^T F s) s with s = CG(F, g); the graphs die on return."""
        cfg = self.cfg
        theta = self._leaves(params)
        leaves = list(theta.values())
        outer, kls = [], []
        for t in range(self.num_tasks):
            lo, kl = self._outer_and_kl(self._adapt(theta, t, True), t)
            outer.append(lo)
            kls.append(kl)
        loss, kl = torch.stack(outer).mean(), torch.stack(kls).mean()
        grads = torch.autograd.grad(loss, leaves, retain_graph=True)
        g = torch.cat([x.reshape(-1) for x in grads])
        grad_kl = torch.autograd.grad(kl, leaves, create_graph=True)
        flat_grad_kl = torch.cat([x.reshape(-1) for x in grad_kl])

        def fvp(v: Tensor) -> Tensor:
            hv = torch.autograd.grad(torch.dot(flat_grad_kl, v), leaves, retain_graph=True)
            return torch.cat([x.reshape(-1) for x in hv]) + cfg.cg_damping * v

        step = self._conjugate_gradient(fvp, g)
        shs = 0.5 * torch.dot(step, fvp(step))
        return (-step * torch.sqrt(cfg.max_kl / shs)).detach()

    def trpo_step(self, params: Params) -> tuple[Params, int]:
        """New parameters and the number of line-search tries."""
        cfg = self.cfg
        full = self._full_step(params)
        flat = torch.cat([x.detach().reshape(-1) for x in params.values()])
        loss_before = self._losses(params)[0]
        fraction = 1.0
        for tries in range(1, cfg.ls_max_steps + 1):
            candidate = _unflatten(flat + fraction * full, params)
            new_loss, new_kl = self._losses(candidate)
            if loss_before - new_loss > 0 and new_kl <= cfg.max_kl:
                return candidate, tries
            fraction *= cfg.ls_backtrack_ratio
        return dict(params), cfg.ls_max_steps


def _unflatten(vec: Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, x in like.items():
        out[k] = vec[i : i + x.numel()].reshape(x.shape)
        i += x.numel()
    return out


# --------------------------------------------------------------------------- measurement


@dataclass
class Timing:
    """One measured configuration: median seconds and peak memory growth (MiB, CUDA)."""

    what: str  # "metagrad", "trpo" or "chunk"
    method: str  # binom / trunc / maml / reference
    num_steps: int
    order: int | None = None
    chunk_size: Any = None
    time_s: float = float("nan")
    times_s: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    ls_tries: float = float("nan")
    error: str | None = None

    def label(self) -> str:
        names = {
            "binom": "BinomMAML",
            "trunc": "TruncMAML",
            "maml": "exact (batched)",
            "reference": "vanilla reference",
        }
        name = names.get(self.method, self.method)
        return f"{name} L={self.order}" if self.method in ("binom", "trunc") else name


#: A warm-up call slower than this many seconds is timed once, not ``repeats`` times.
SLOW_CALL_S = 5.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_call(
    call: Callable[[], Any], device: str, repeats: int, warmup: int
) -> tuple[list[float], float, Any]:
    """Seconds of each of ``repeats`` calls after ``warmup`` calls (one call if a warm-up
    call took over ``SLOW_CALL_S``), the median peak memory growth in MiB (CUDA; NaN on
    CPU) and the last result."""
    cuda = device.startswith("cuda")
    result = None
    t0 = time.perf_counter()
    for _ in range(warmup):
        result = call()
    _sync(device)
    if warmup and (time.perf_counter() - t0) / warmup > SLOW_CALL_S:
        repeats = 1  # a slow call's median of several is not worth the time budget
    times, peaks = [], []
    for _ in range(repeats):
        result = None
        gc.collect()
        if cuda:
            elapsed, growth, result = timed_cuda_call(call, device)
            times.append(elapsed)
            peaks.append(growth)
        else:
            t0 = time.perf_counter()
            result = call()
            times.append(time.perf_counter() - t0)
    return times, statistics.median(peaks) if peaks else float("nan"), result


def measure(
    problem: Problem, what: str, method: str, order: int | None, chunk: Any, opts: MetastepOptions
) -> Timing:
    """Time (a) one meta-gradient or (b) one TRPO step of ``method`` on ``problem``."""
    k = problem.learner.cfg.num_steps
    out = Timing(what, method, k, order, chunk)
    adaptation, valid, params = problem.adaptation, problem.valid, problem.params
    tries: list[int] = []
    if method == "reference":
        ref = VanillaMetaTRPO(problem)
        if what == "trpo":

            def call() -> Any:
                new, n = ref.trpo_step(params)
                tries.append(n)
                return new
        else:

            def call() -> Any:
                return ref.meta_gradient(params)
    else:
        learner = with_estimator(problem, method, order, chunk)
        if what == "trpo":

            def call() -> Any:
                new, metrics = learner.trpo_step(params, adaptation)
                tries.append(int(metrics["train/ls_tries"]))
                return new
        else:

            def call() -> Any:
                return learner.meta_gradient(adaptation.path, adaptation.inner_data, valid)

    try:
        out.times_s, out.peak_mb, _ = time_call(call, opts.device, opts.repeats, opts.warmup)
        out.time_s = statistics.median(out.times_s)
        out.ls_tries = statistics.median(tries) if tries else float("nan")
    except torch.cuda.OutOfMemoryError as err:
        out.error = f"CUDA out of memory: {str(err).splitlines()[0][:80]}"
    finally:
        gc.collect()
        if opts.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def correctness_check(problem: Problem) -> dict[str, float]:
    """Relative difference of the reference's meta-gradient (and TRPO step) to the engine's
    exact MAML on identical data and parameters."""
    exact = flatten_params(
        with_estimator(problem, "maml", None, None).meta_gradient(
            problem.adaptation.path, problem.adaptation.inner_data, problem.valid
        )
    )
    ref = flatten_params(VanillaMetaTRPO(problem).meta_gradient(problem.params))
    fomaml = flatten_params(
        with_estimator(problem, "fomaml", None, None).meta_gradient(
            problem.adaptation.path, problem.adaptation.inner_data, problem.valid
        )
    )
    theta = flatten_params(problem.params)
    new_ref, _ = VanillaMetaTRPO(problem).trpo_step(problem.params)
    new_ours, _ = with_estimator(problem, "maml", None, None).trpo_step(
        problem.params, problem.adaptation
    )
    d_ref, d_ours = flatten_params(new_ref) - theta, flatten_params(new_ours) - theta
    return {
        "metagrad_rel_diff": float((ref - exact).norm() / exact.norm()),
        "fomaml_rel_diff": float((fomaml - exact).norm() / exact.norm()),
        "trpo_step_rel_diff": float((d_ref - d_ours).norm() / d_ours.norm().clamp(min=1e-30)),
        "trpo_step_norm": float(d_ours.norm()),
    }


# --------------------------------------------------------------------------- driver


def estimators(num_steps: int, orders: Sequence[int]) -> list[tuple[str, int | None]]:
    """(method, order) pairs measured at K: binom L <= K, trunc min(2, K), exact, reference."""
    pairs: list[tuple[str, int | None]] = [("binom", o) for o in orders if o <= num_steps]
    pairs += [("trunc", min(2, num_steps)), ("maml", None), ("reference", None)]
    return pairs


def run_benchmark(opts: MetastepOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Correctness check, meta-gradient table, TRPO-step table, chunk-size table; returns the
    results and writes the markdown report to ``opts.output``."""
    if opts.device == "cpu":
        torch.set_num_threads(1)
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "options": asdict(opts),
        "metagrad": [],
        "trpo": [],
        "chunks": [],
        "skipped": [],
    }
    log(environment_line(opts.device))
    log(
        f"sizes: {opts.tasks} tasks x {opts.episodes} episodes x {opts.horizon} steps, obs "
        f"{opts.obs_dim}, act {opts.act_dim}, hidden {opts.hidden}"
    )

    def over_budget() -> bool:
        return time.perf_counter() - t_start > opts.time_budget_s

    def run(problem: Problem, what: str, method: str, order: int | None, chunk: Any = None) -> None:
        k = problem.learner.cfg.num_steps
        key = "chunks" if what == "chunk" else what
        if over_budget():
            res["skipped"].append(f"{what} {method} L={order} K={k} chunk={chunk}")
            return
        if method == "reference" and not opts.reference:
            return
        m = measure(problem, "metagrad" if what == "chunk" else what, method, order, chunk, opts)
        m.what = what
        res[key].append(m)
        log(
            f"  {what:<8} K={k:<3} {m.label():<22} chunk={chunk!s:<5} "
            + (
                f"FAILED {m.error}"
                if m.error
                else f"{m.time_s * 1e3:10.1f} ms  {m.peak_mb:9.1f} MiB"
                + (f"  ls tries {m.ls_tries:.0f}" if what == "trpo" else "")
            )
        )

    k_check = min(opts.ks, key=lambda k: abs(k - 3))
    problem = make_problem(opts, k_check)
    if opts.reference:
        res["check"] = correctness_check(problem)
        res["check"]["K"] = k_check
        log(f"correctness (K={k_check}): {res['check']}")
    del problem

    problems: dict[int, Problem] = {}
    for k in opts.ks:
        problems[k] = make_problem(opts, k)
        log(f"meta-gradient, K={k}")
        for method, order in estimators(k, opts.orders):
            run(problems[k], "metagrad", method, order)
        if opts.device.startswith("cuda"):
            del problems[k]  # one K's data on the device at a time
            torch.cuda.empty_cache()

    def problem_for(k: int) -> Problem:
        return problems[k] if k in problems else make_problem(opts, k)

    if opts.chunk_k in opts.ks or opts.chunk_sizes:
        k = opts.chunk_k
        log(f"chunk_size, BinomMAML L=2, K={k}")
        problem = problem_for(k)
        for chunk in opts.chunk_sizes:
            run(problem, "chunk", "binom", min(2, k), chunk)
        per_hvp = mlp_hvp_bytes(
            opts.episodes * opts.horizon, [opts.obs_dim, *opts.hidden, opts.act_dim]
        )
        res["auto_chunk"] = default_chunk_size(opts.tasks * k, per_hvp, opts.device)
        res["hvp_estimate_mb"] = per_hvp / 2**20
        del problem

    if opts.trpo:
        k_mid = 5 if 5 in opts.ks else opts.ks[len(opts.ks) // 2]
        order = [k_mid] + [k for k in opts.ks if k != k_mid]
        for k in order:
            log(f"TRPO meta-step, K={k}")
            problem = problem_for(k)
            pairs = [("binom", min(2, k)), ("reference", None), ("maml", None)]
            pairs += [p for p in estimators(k, opts.orders) if p not in pairs]
            for method, o in pairs:
                run(problem, "trpo", method, o)
            del problem
    res["elapsed_s"] = time.perf_counter() - t_start
    res["summary"] = summarize(res, opts)
    for line in res["summary"]["lines"]:
        log(line)
    text = report_markdown(res, opts)
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    res["markdown"] = text
    return res


# --------------------------------------------------------------------------- report


def _find(
    rows: Sequence[Timing], method: str, k: int, order: int | None = None, chunk: Any = "any"
) -> Timing | None:
    for r in rows:
        if r.method == method and r.num_steps == k and r.error is None:
            if (order is None or r.order == order) and (chunk == "any" or r.chunk_size == chunk):
                return r
    return None


def _ratio(a: Timing | None, b: Timing | None) -> float:
    if a is None or b is None:
        return float("nan")
    return a.time_s / b.time_s


def summarize(res: dict[str, Any], opts: MetastepOptions) -> dict[str, Any]:
    """The headline ratios (BinomMAML L = 2 against the reference and exact MAML, its growth
    in K, the TRPO step), as numbers and as printable lines."""
    mg, lines = res["metagrad"], []
    s: dict[str, Any] = {"per_k": {}, "lines": lines}
    for k in opts.ks:
        b2 = _find(mg, "binom", k, min(2, k))
        s["per_k"][k] = {
            "binom2_over_reference": _ratio(b2, _find(mg, "reference", k)),
            "binom2_over_exact": _ratio(b2, _find(mg, "maml", k)),
        }
        lines.append(
            f"RATIO meta-gradient K={k}: BinomMAML L={min(2, k)} / reference "
            f"{s['per_k'][k]['binom2_over_reference']:.3f}, / exact "
            f"{s['per_k'][k]['binom2_over_exact']:.3f}"
        )
    k_lo, k_hi = min(opts.ks), max(opts.ks)
    s["binom2_growth"] = _ratio(
        _find(mg, "binom", k_hi, min(2, k_hi)), _find(mg, "binom", k_lo, min(2, k_lo))
    )
    lines.append(
        f"GROWTH BinomMAML L=2 meta-gradient time K={k_lo} -> K={k_hi}: {s['binom2_growth']:.2f}x"
    )
    k_mid = 5 if 5 in opts.ks else opts.ks[len(opts.ks) // 2]
    s["trpo_k"] = k_mid
    s["trpo_binom2_over_reference"] = _ratio(
        _find(res["trpo"], "binom", k_mid, min(2, k_mid)), _find(res["trpo"], "reference", k_mid)
    )
    lines.append(
        f"RATIO TRPO meta-step K={k_mid}: BinomMAML L={min(2, k_mid)} / reference "
        f"{s['trpo_binom2_over_reference']:.3f}"
    )
    chunks = [c for c in res["chunks"] if c.error is None]
    unbounded = next((c for c in chunks if c.chunk_size is None), None)
    s["chunk_ok"] = []
    if unbounded is not None and opts.device.startswith("cuda"):
        for c in chunks:
            if c.peak_mb < 2048 and c.time_s <= 1.3 * unbounded.time_s:
                s["chunk_ok"].append(c.chunk_size)
        lines.append(
            f"CHUNK sizes with < 2 GB at <= 1.3x unbounded time: {s['chunk_ok'] or 'none'}"
        )
    return s


def _fmt_ms(t: Timing | None) -> str:
    if t is None:
        return "—"
    return f"FAILED ({t.error})" if t.error else f"{t.time_s * 1e3:.1f}"


def _fmt_mb(t: Timing | None) -> str:
    if t is None or t.error or math.isnan(t.peak_mb):
        return "—"
    return f"{t.peak_mb:.0f}"


def _table(rows: Sequence[Timing], with_tries: bool = False) -> str:
    headers = ["K", "estimator", "time (ms)", "peak memory (MiB)"]
    if with_tries:
        headers.append("line-search tries")
    body = []
    for r in rows:
        line = [r.num_steps, r.label(), _fmt_ms(r), _fmt_mb(r)]
        if with_tries:
            line.append("—" if math.isnan(r.ls_tries) else f"{r.ls_tries:.0f}")
        body.append(line)
    return markdown_table(headers, body)


def report_markdown(res: dict[str, Any], opts: MetastepOptions) -> str:
    """The report: setup, correctness check, the three tables, the ratios."""
    s = res["summary"]
    cuda = opts.device.startswith("cuda")
    mem = (
        "torch.cuda.max_memory_allocated during the call minus memory allocated before it"
        if cuda
        else "not measured on CPU (see benchmark_metagrad.md for fresh-process RSS)"
    )
    lines = [
        "# TRPO meta-step benchmark (synthetic HalfCheetah-sized episodes)",
        "",
        f"{environment_line(opts.device)}; {res['elapsed_s']:.0f} s"
        + (" (quick sizes)" if opts.quick else "")
        + ".",
        "",
        f"Policy: obs {opts.obs_dim} -> {opts.hidden} tanh -> act {opts.act_dim} Gaussian; "
        f"{opts.tasks} tasks x {opts.episodes} episodes x {opts.horizon} steps per inner step "
        "and for validation. Data: N(0, 1) observations, actions drawn from pi_{phi_k}, random "
        "rewards through the training loop's baseline + GAE + per-task normalisation, full "
        f"masks. fast-lr {opts.fast_lr}, float32, median of {opts.repeats} call(s) after "
        f"{opts.warmup} warm-up. Memory: {mem}.",
        "",
        "Estimators: BinomMAML L (cascade of HVP levels, each one call over all (task, step) "
        "pairs; L = K is exact and runs the sequential product), TruncMAML L = min(2, K), "
        "exact = the engine's batched exact MAML (K sequential HVPs, each over all tasks; the "
        "learner's losses are task-batched, so unchunked HVPs need no vmap), vanilla "
        "reference = backprop through the unrolled "
        "inner loop per task in a Python loop (create_graph=True), Fisher-vector products by "
        "double backward through the unrolled graph, as MAML-RL code bases do it.",
        "",
    ]
    if "check" in res:
        c = res["check"]
        lines += [
            f"## Correctness check (K = {c['K']})",
            "",
            f"- reference meta-gradient vs engine exact MAML: relative difference "
            f"**{c['metagrad_rel_diff']:.2e}** (FOMAML differs by {c['fomaml_rel_diff']:.2e}, "
            "so second-order terms are present)",
            f"- reference TRPO step vs engine TRPO step (exact MAML): relative difference "
            f"{c['trpo_step_rel_diff']:.2e} (step norm {c['trpo_step_norm']:.3g})",
            "",
        ]
    lines += ["## (a) One meta-gradient", "", _table(res["metagrad"]), ""]
    if res["trpo"]:
        lines += [
            f"## (b) One full TRPO meta-step ({opts.cg_iters} CG iterations, line search)",
            "",
            "The engine's step includes its own baseline fit of the validation episodes; the "
            "reference is given those advantages.",
            "",
            _table(res["trpo"], with_tries=True),
            "",
        ]
    if res["chunks"]:
        unbounded = _find(res["chunks"], "binom", opts.chunk_k, chunk=None)
        body = []
        for c in res["chunks"]:
            ok = c.chunk_size in s.get("chunk_ok", [])
            rel = _ratio(c, unbounded)
            body.append(
                [
                    str(c.chunk_size),
                    _fmt_ms(c),
                    _fmt_mb(c),
                    "—" if math.isnan(rel) else f"{rel:.2f}",
                    "yes" if ok else "",
                ]
            )
        lines += [
            f"## chunk_size: BinomMAML L = 2, K = {opts.chunk_k}, {opts.tasks} tasks "
            "(one meta-gradient)",
            "",
            f"Level 1 runs {opts.tasks * opts.chunk_k} HVPs, level 2 "
            f"{opts.tasks * (opts.chunk_k - 1)}. Marked: peak < 2 GB at <= 1.3x the unbounded "
            f"time. `chunk-size auto` picks {res.get('auto_chunk')!s} here (estimate "
            f"{res.get('hvp_estimate_mb', float('nan')):.1f} MiB per HVP, budget 1/4 of "
            "device memory).",
            "",
            markdown_table(
                [
                    "chunk_size",
                    "time (ms)",
                    "peak memory (MiB)",
                    "time / unbounded",
                    "< 2 GB, <= 1.3x",
                ],
                body,
            ),
            "",
        ]
    lines += ["## Ratios", ""] + [f"- {x}" for x in s["lines"]] + [""]
    if res["skipped"]:
        lines += [
            f"Skipped (time budget {opts.time_budget_s:.0f} s): " + "; ".join(res["skipped"]),
            "",
        ]
    return "\n".join(lines)
