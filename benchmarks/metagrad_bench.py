"""Meta-gradient benchmark on sinusoid regression: estimation error, wall time, peak memory.

The test bed is the paper's: tasks y = A sin(x - p) with A ~ U[0.1, 5], p ~ U[0, pi],
x ~ U[-5, 5]; a ReLU MLP 1-40-40-1; MSE loss; K inner gradient steps of size alpha, each
on its own few-shot batch of the task (so every step has its own Hessian), and an outer
loss on a further batch.

Pieces (used by ``scripts/benchmark_metagrad.py`` and the tests):

- :func:`sample_sinusoid_problem`, :func:`mlp_forward`, :func:`mse_loss`: the test bed.
- :func:`vanilla_meta_gradient`: the reference most MAML-RL code bases use, backprop through
  the unrolled inner loop (``create_graph=True``) in a Python loop over tasks, with plain
  ``torch.autograd`` on the parameter dict; every task's graph stays alive until the one
  backward pass of the mean outer loss.
- :func:`error_table`: relative L2 error and cosine of FOMAML / TruncMAML / BinomMAML against
  the exact meta-gradient.
- :func:`measure` / :func:`run_isolated`: wall time and peak memory of one meta-gradient.
  On CPU every configuration runs in a fresh worker process (``--worker``) with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set; after a
  warm-up call the heap is trimmed (``malloc_trim``), the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs``) and the reported figure is the peak RSS during the measured
  call minus the RSS just before it.
  On CUDA the figure is ``max_memory_allocated`` minus ``memory_allocated`` before the call.
- :func:`write_markdown`, :func:`plot_errors`, :func:`plot_cost`: the report.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import environment_line, markdown_table, timed_cuda_call
from binom_rl.metagrad import batched_meta_gradient
from binom_rl.runtime import malloc_trim, peak_memory_mb, return_freed_memory

Params = dict[str, Tensor]
Batch = dict[str, Tensor]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)
DEFAULT_STEP_SIZE = 0.002
DEFAULT_SHOTS = 10
DEFAULT_HIDDEN = (40, 40)
METHOD_LABELS = {
    "fomaml": "FOMAML",
    "trunc": "TruncMAML",
    "binom": "BinomMAML",
    "maml": "exact (engine)",
    "vanilla": "vanilla unrolled",
}


# --------------------------------------------------------------------------- test bed


def init_mlp_params(
    hidden: Sequence[int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Params:
    """Parameters of a 1-h_1-...-h_n-1 MLP, ``w{i}``: [out, in], ``b{i}``: [out].

    Initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)) from a private generator.
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, *hidden, 1]
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(fan_out, fan_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        params[f"w{i}"] = w.to(device=device, dtype=dtype)
        params[f"b{i}"] = b.to(device=device, dtype=dtype)
    return params


def mlp_forward(params: Params, x: Tensor) -> Tensor:
    """ReLU MLP on inputs ``x`` of shape [n, 1] (parameters from :func:`init_mlp_params`)."""
    num_layers = len(params) // 2
    h = x
    for i in range(num_layers):
        h = h @ params[f"w{i}"].T + params[f"b{i}"]
        if i < num_layers - 1:
            h = torch.relu(h)
    return h


def mse_loss(params: Params, data: Batch) -> Tensor:
    """Mean squared error of :func:`mlp_forward` on ``data = {"x": [n, 1], "y": [n, 1]}``."""
    return ((mlp_forward(params, data["x"]) - data["y"]) ** 2).mean()


@dataclass
class SinusoidProblem:
    """A meta-batch of sinusoid tasks with K inner batches and one outer batch per task.

    ``inner_data[k]`` and ``outer_data`` are dicts of [T, n, 1] tensors (leading task dim).
    """

    params: Params
    inner_data: list[Batch]
    outer_data: Batch
    amplitude: Tensor
    phase: Tensor
    step_size: float

    @property
    def num_tasks(self) -> int:
        return int(self.amplitude.shape[0])

    @property
    def num_steps(self) -> int:
        return len(self.inner_data)


def sample_sinusoid_problem(
    num_tasks: int,
    num_steps: int,
    *,
    shots: int = DEFAULT_SHOTS,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    step_size: float = DEFAULT_STEP_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SinusoidProblem:
    """``num_tasks`` sinusoid tasks; each of the K inner steps and the outer step draws its
    own ``shots``-sample batch of the task. Deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed + 1)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    amplitude = uniform(*AMPLITUDE_RANGE, num_tasks)
    phase = uniform(*PHASE_RANGE, num_tasks)

    def batch() -> Batch:
        x = uniform(*INPUT_RANGE, num_tasks, shots, 1)
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        return {"x": x.to(device=device, dtype=dtype), "y": y.to(device=device, dtype=dtype)}

    inner = [batch() for _ in range(num_steps)]
    outer = batch()
    params = init_mlp_params(hidden, seed=seed, dtype=dtype, device=device)
    return SinusoidProblem(params, inner, outer, amplitude, phase, step_size)


# --------------------------------------------------------------------------- references


def vanilla_meta_gradient(
    loss: Callable[[Params, Batch], Tensor],
    params: Params,
    inner_data: Sequence[Batch],
    outer_data: Batch,
    *,
    step_size: float,
) -> Params:
    """Meta-gradient of the task-mean outer loss by backprop through the unrolled inner loop.

    What MAML-RL code bases do: a Python loop over tasks, K steps each with
    ``torch.autograd.grad(..., create_graph=True)``, the outer losses averaged and one
    backward pass at the end, so all T x K second-order graphs are alive at once.
    Data as in :func:`batched_meta_gradient` (leading task dim); ``loss`` is per task.
    """
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    names = list(theta)
    num_tasks = next(iter(outer_data.values())).shape[0]
    outer_losses = []
    for t in range(num_tasks):
        phi = theta
        for data in inner_data:
            task_data = {k: v[t] for k, v in data.items()}
            grads = torch.autograd.grad(
                loss(phi, task_data), [phi[k] for k in names], create_graph=True
            )
            phi = {k: phi[k] - step_size * g for k, g in zip(names, grads, strict=True)}
        outer_losses.append(loss(phi, {k: v[t] for k, v in outer_data.items()}))
    meta_loss = torch.stack(outer_losses).mean()
    grads = torch.autograd.grad(meta_loss, [theta[k] for k in names])
    return dict(zip(names, grads, strict=True))


def _flat(tree: Params, lead: int = 0) -> Tensor:
    """Concatenate the leaves, keeping ``lead`` leading dims: [*lead_dims, numel]."""
    return torch.cat([v.reshape(*v.shape[:lead], -1) for v in tree.values()], dim=-1)


# --------------------------------------------------------------------------- Table 1


def error_table(
    ks: Sequence[int] = (5, 10),
    orders: Sequence[int] = (1, 2, 3, 4),
    *,
    num_tasks: int = 50,
    shots: int = DEFAULT_SHOTS,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    step_size: float = DEFAULT_STEP_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Per-task relative L2 error and cosine against exact MAML, averaged over tasks.

    Rows: ``{"K", "method", "L", "rel_err", "rel_err_median", "cosine"}`` for FOMAML (L = 0)
    and TruncMAML / BinomMAML at every L in ``orders`` with L <= K.
    """
    rows: list[dict[str, Any]] = []
    for k_steps in ks:
        prob = sample_sinusoid_problem(
            num_tasks,
            k_steps,
            shots=shots,
            hidden=hidden,
            step_size=step_size,
            seed=seed + 1000 * k_steps,
            dtype=dtype,
            device=device,
        )

        def per_task(method: str, order: int | None, prob: SinusoidProblem = prob) -> Tensor:
            out = batched_meta_gradient(
                mse_loss,
                mse_loss,
                prob.params,
                prob.inner_data,
                prob.outer_data,
                step_size=prob.step_size,
                method=method,
                order=order,
                reduction="none",
            )
            return _flat(out, lead=1)

        exact = per_task("maml", None)
        exact_norm = exact.norm(dim=1)
        configs: list[tuple[str, int]] = [("fomaml", 0)]
        for order in orders:
            if order <= k_steps:
                configs += [("trunc", order), ("binom", order)]
        for method, order in configs:
            est = per_task(method, order if method != "fomaml" else None)
            rel = (est - exact).norm(dim=1) / exact_norm
            cos = (est * exact).sum(1) / (est.norm(dim=1) * exact_norm)
            rows.append(
                {
                    "K": k_steps,
                    "method": method,
                    "L": order,
                    "rel_err": rel.mean().item(),
                    "rel_err_median": rel.median().item(),
                    "cosine": cos.mean().item(),
                }
            )
    return rows


def lookup_error(rows: Sequence[dict[str, Any]], k_steps: int, method: str, order: int) -> float:
    """The mean relative error of ``method`` at (K, L) in :func:`error_table` rows."""
    for row in rows:
        if row["K"] == k_steps and row["method"] == method and row["L"] == order:
            return float(row["rel_err"])
    raise KeyError(f"no row for K={k_steps}, {method}, L={order}")


def inner_loss_curve(
    k_steps: int,
    *,
    num_tasks: int = 50,
    shots: int = DEFAULT_SHOTS,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    step_size: float = DEFAULT_STEP_SIZE,
    seed: int = 0,
) -> list[float]:
    """Task-mean outer-batch loss after 0..K inner steps (checks the inner loop is stable)."""
    from binom_rl.metagrad import batched_adapt

    prob = sample_sinusoid_problem(
        num_tasks,
        k_steps,
        shots=shots,
        hidden=hidden,
        step_size=step_size,
        seed=seed,
        dtype=torch.float64,
    )
    path = batched_adapt(mse_loss, prob.params, prob.inner_data, step_size=step_size)
    losses = torch.func.vmap(mse_loss)
    return [losses(phi, prob.outer_data).mean().item() for phi in path]


# --------------------------------------------------------------------------- measurement


@dataclass
class MeasureConfig:
    """One timed meta-gradient: a method on a freshly sampled sinusoid meta-batch.

    ``method``: "binom", "trunc", "maml" (engine, exact), "fomaml" or "vanilla" (reference).
    ``order`` is clipped to K (order >= K is exact for binom and trunc).
    """

    method: str
    num_steps: int
    order: int | None = 2
    chunk_size: int | None = None
    num_tasks: int = 25
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    shots: int = DEFAULT_SHOTS
    step_size: float = DEFAULT_STEP_SIZE
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 5
    warmup: int = 1
    threads: int | None = 1
    seed: int = 0

    def effective_order(self) -> int | None:
        if self.method in ("binom", "trunc"):
            return min(self.order if self.order is not None else 1, self.num_steps)
        return None


@dataclass
class Measurement:
    """Result of :func:`measure`: median seconds and memory growth in MiB over ``repeats``."""

    config: MeasureConfig
    time_s: float = float("nan")
    times_s: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    peaks_mb: list[float] = field(default_factory=list)
    baseline_mb: float = float("nan")
    peak_reset: bool = True
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Measurement:
        cfg = dict(obj["config"])
        cfg["hidden"] = tuple(cfg["hidden"])
        return cls(**{**obj, "config": MeasureConfig(**cfg)})


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if unable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    kb = _proc_status_kb("VmRSS")
    if kb is None:  # not Linux: fall back on the peak, the best the process can tell
        return _maxrss_mb()
    return kb / 1024


def _maxrss_mb() -> float:
    kb = _proc_status_kb("VmHWM")  # the peak since _reset_peak_rss (ru_maxrss is not reset)
    return kb / 1024 if kb is not None else peak_memory_mb("cpu")


def make_call(cfg: MeasureConfig) -> Callable[[], Params]:
    """The zero-argument meta-gradient call that :func:`measure` times (data built here)."""
    prob = sample_sinusoid_problem(
        cfg.num_tasks,
        cfg.num_steps,
        shots=cfg.shots,
        hidden=cfg.hidden,
        step_size=cfg.step_size,
        seed=cfg.seed,
        dtype=getattr(torch, cfg.dtype),
        device=cfg.device,
    )
    if cfg.method == "vanilla":
        return lambda: vanilla_meta_gradient(
            mse_loss, prob.params, prob.inner_data, prob.outer_data, step_size=prob.step_size
        )
    return lambda: batched_meta_gradient(
        mse_loss,
        mse_loss,
        prob.params,
        prob.inner_data,
        prob.outer_data,
        step_size=prob.step_size,
        method=cfg.method,
        order=cfg.effective_order(),
        chunk_size=cfg.chunk_size,
    )


def measure(cfg: MeasureConfig) -> Measurement:
    """Median wall time and peak memory growth of one meta-gradient, in this process.

    ``warmup`` untimed calls first (lazy initialisation, allocator pools), then ``repeats``
    calls; before each, the peak mark is reset and the current memory read, and the figure
    is peak during the call minus memory before it.
    """
    if cfg.threads is not None and cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    call = make_call(cfg)
    cuda = cfg.device.startswith("cuda")
    for _ in range(cfg.warmup):
        call()
    if cuda:
        torch.cuda.synchronize(cfg.device)
    out = Measurement(cfg)
    for _ in range(cfg.repeats):
        gc.collect()
        if cuda:
            out.baseline_mb = torch.cuda.memory_allocated(cfg.device) / 2**20
            elapsed, growth, result = timed_cuda_call(call, cfg.device)
        else:
            malloc_trim()
            out.peak_reset = _reset_peak_rss() and out.peak_reset
            out.baseline_mb = _rss_mb()
            t0 = time.perf_counter()
            result = call()
            elapsed = time.perf_counter() - t0
            growth = _maxrss_mb() - out.baseline_mb
        del result
        out.times_s.append(elapsed)
        out.peaks_mb.append(growth)
    out.time_s = statistics.median(out.times_s)
    out.peak_mb = statistics.median(out.peaks_mb)
    return out


#: The script whose ``--worker JSON`` flag runs :func:`worker_main` in a fresh interpreter.
WORKER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_metagrad.py"


def default_worker_cmd() -> list[str]:
    """Command that runs :func:`worker_main` in a fresh interpreter (the benchmark script)."""
    return [sys.executable, str(WORKER_SCRIPT)]


def run_isolated(
    cfg: MeasureConfig,
    worker_cmd: Sequence[str] | None = None,
    timeout_s: float = 600,
    *,
    isolate: bool = True,
) -> Measurement:
    """:func:`measure` in a fresh process on CPU (``worker_cmd --worker JSON``), so that the
    peak RSS belongs to this configuration alone; in this process on CUDA, whose allocator
    statistics can be reset, or when ``isolate`` is False (quicker, memory less certain).
    Failures (out of memory, crash, timeout) come back in ``error``.
    """
    if not isolate and not cfg.device.startswith("cuda"):
        return_freed_memory()
        try:
            return measure(cfg)
        finally:
            gc.collect()
    if cfg.device.startswith("cuda"):
        try:
            return measure(cfg)
        except torch.cuda.OutOfMemoryError as err:
            return Measurement(cfg, error=f"CUDA out of memory: {str(err).splitlines()[0]}")
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    cmd = [*(worker_cmd or default_worker_cmd()), "--worker", json.dumps(asdict(cfg))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if cfg.threads is not None:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Measurement(cfg, error=f"timed out after {timeout_s:.0f} s")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return Measurement(cfg, error=f"worker exit {proc.returncode}: {tail[0]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return Measurement.from_json(json.loads(lines[-1]))


def worker_main(config_json: str) -> None:
    """Entry of a worker process: measure one configuration, print it as one JSON line."""
    cfg_dict = json.loads(config_json)
    cfg_dict["hidden"] = tuple(cfg_dict["hidden"])
    result = measure(MeasureConfig(**cfg_dict))
    print(json.dumps(result.to_json()), flush=True)


# --------------------------------------------------------------------------- Tables 2-4


def cost_table(
    ks: Sequence[int],
    base: MeasureConfig,
    *,
    methods: Sequence[str | tuple[str, int | None]] = ("binom", "trunc", "maml", "vanilla"),
    worker_cmd: Sequence[str] | None = None,
    isolate: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[Measurement]:
    """Time and memory of each method at each K (Table 2; Table 3 with a single task).

    ``methods`` entries are a method name or (method, chunk_size).
    """
    results = []
    for k_steps in ks:
        for entry in methods:
            method, chunk = (entry, base.chunk_size) if isinstance(entry, str) else entry
            cfg = replace(base, method=method, num_steps=k_steps, chunk_size=chunk)
            res = run_isolated(cfg, worker_cmd, isolate=isolate)
            results.append(res)
            if log:
                log("  " + describe(res))
    return results


def chunk_table(
    chunk_sizes: Sequence[int | None],
    base: MeasureConfig,
    *,
    worker_cmd: Sequence[str] | None = None,
    isolate: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[Measurement]:
    """Time and memory of ``base`` (binom) against vmap ``chunk_size``."""
    results = []
    for chunk in chunk_sizes:
        res = run_isolated(replace(base, chunk_size=chunk), worker_cmd, isolate=isolate)
        results.append(res)
        if log:
            log("  " + describe(res))
    return results


def describe(res: Measurement) -> str:
    """One line per measurement for progress logs."""
    c = res.config
    head = f"{label(c):<28} K={c.num_steps:<3} T={c.num_tasks:<3} chunk={c.chunk_size}: "
    if res.error:
        return head + f"FAILED ({res.error})"
    return head + f"{res.time_s * 1000:9.1f} ms  {res.peak_mb:9.1f} MiB"


def label(cfg: MeasureConfig) -> str:
    """Method name with its effective order, e.g. 'BinomMAML L=2'."""
    name = METHOD_LABELS.get(cfg.method, cfg.method)
    order = cfg.effective_order()
    return f"{name} L={order}" if order is not None else name


def find(
    results: Sequence[Measurement], method: str, k_steps: int, chunk_size: Any = "any"
) -> Measurement:
    """The measurement of ``method`` at K (and ``chunk_size`` if given)."""
    for res in results:
        c = res.config
        if c.method == method and c.num_steps == k_steps:
            if chunk_size == "any" or c.chunk_size == chunk_size:
                return res
    raise KeyError(f"no measurement for {method} at K={k_steps}, chunk_size={chunk_size}")


def flatness_ratio(
    binom: tuple[Measurement, Measurement], vanilla: tuple[Measurement, Measurement]
) -> float:
    """(binom peak at K_hi - at K_lo) / (vanilla peak at K_hi - at K_lo)."""
    return (binom[1].peak_mb - binom[0].peak_mb) / (vanilla[1].peak_mb - vanilla[0].peak_mb)


# --------------------------------------------------------------------------- report


def error_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Table 1 as markdown: one row per (K, L), error and cosine of each estimator."""
    ks = sorted({r["K"] for r in rows})
    out_rows = []
    for k_steps in ks:
        fo = next(r for r in rows if r["K"] == k_steps and r["method"] == "fomaml")
        out_rows.append([k_steps, 0, f"{fo['rel_err']:.3e} ({fo['cosine']:.4f})", "", ""])
        orders = sorted({r["L"] for r in rows if r["K"] == k_steps and r["method"] == "binom"})
        for order in orders:
            tr = next(
                r for r in rows if r["K"] == k_steps and r["method"] == "trunc" and r["L"] == order
            )
            bi = next(
                r for r in rows if r["K"] == k_steps and r["method"] == "binom" and r["L"] == order
            )
            ratio = tr["rel_err"] / max(bi["rel_err"], 1e-300)
            out_rows.append(
                [
                    k_steps,
                    order,
                    "",
                    f"{tr['rel_err']:.3e} ({tr['cosine']:.4f})",
                    f"{bi['rel_err']:.3e} ({bi['cosine']:.6f})",
                    f"{ratio:.3g}",
                ]
            )
    out_rows = [r + [""] * (6 - len(r)) for r in out_rows]
    return markdown_table(
        [
            "K",
            "L",
            "FOMAML err (cos)",
            "TruncMAML err (cos)",
            "BinomMAML err (cos)",
            "trunc / binom",
        ],
        out_rows,
    )


def cost_markdown(results: Sequence[Measurement], *, by: str = "K") -> str:
    """Tables 2-4 as markdown: one row per measurement."""
    rows = []
    for res in results:
        c = res.config
        if res.error:
            time_s, mem = "failed", res.error
        else:
            time_s = f"{res.time_s * 1000:.1f}"
            mem = f"{res.peak_mb:.1f}"
        rows.append([c.num_steps, label(c), c.num_tasks, str(c.chunk_size), time_s, mem])
    headers = ["K", "method", "tasks", "chunk_size", "time (ms, median)", "peak memory (MiB)"]
    if by == "chunk":
        rows = [[r[3], *r[:3], *r[4:]] for r in rows]
        headers = [headers[3], *headers[:3], *headers[4:]]
    return markdown_table(headers, rows)


def plot_errors(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Relative error vs L (log scale) for TruncMAML and BinomMAML at every K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k_steps in sorted({r["K"] for r in rows}):
        fo = next(r for r in rows if r["K"] == k_steps and r["method"] == "fomaml")
        for method, style in (("trunc", "s--"), ("binom", "o-")):
            pts = sorted(
                (r["L"], r["rel_err"]) for r in rows if r["K"] == k_steps and r["method"] == method
            )
            xs = [0] + [p[0] for p in pts]
            ys = [fo["rel_err"]] + [max(p[1], 1e-17) for p in pts]
            ax.plot(xs, ys, style, label=f"{METHOD_LABELS[method]}, K={k_steps}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("order L (Hessian factors kept; L = 0 is FOMAML)")
    ax.set_ylabel("relative error ||g - g_exact|| / ||g_exact||")
    ax.set_title("Meta-gradient estimation error, sinusoid regression")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(results: Sequence[Measurement], path: str | Path, title: str) -> None:
    """Wall time and peak memory against K, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    series = list(dict.fromkeys((r.config.method, r.config.chunk_size) for r in results))
    several_chunks = {m for m, _ in series if sum(1 for m2, _ in series if m2 == m) > 1}
    for method, chunk in series:
        ok = [
            r
            for r in results
            if r.config.method == method and r.config.chunk_size == chunk and not r.error
        ]
        if not ok:
            continue
        name = METHOD_LABELS.get(method, method)
        if ok[0].config.effective_order() is not None:
            name += f" (L={ok[0].config.order})"
        if method in several_chunks:
            name += f", chunk_size={chunk}"
        ks = [r.config.num_steps for r in ok]
        ax_t.plot(ks, [r.time_s * 1000 for r in ok], "o-", label=name)
        ax_m.plot(ks, [r.peak_mb for r in ok], "o-", label=name)
    ax_t.set_ylabel("time per meta-gradient (ms)")
    ax_m.set_ylabel("peak memory growth (MiB)")
    for ax in (ax_t, ax_m):
        ax.set_xlabel("inner steps K")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hessian_top_eigenvalue(
    *,
    num_tasks: int = 25,
    shots: int = DEFAULT_SHOTS,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    iters: int = 50,
    seed: int = 0,
) -> Tensor:
    """Largest-magnitude eigenvalue of the first inner loss's Hessian at theta, per task
    (power iteration on HVPs); alpha * this is the size of one Hessian factor's correction."""
    prob = sample_sinusoid_problem(
        num_tasks, 1, shots=shots, hidden=hidden, seed=seed, dtype=torch.float64
    )

    def hvp(data: Batch, v: Params) -> Params:
        return torch.func.jvp(lambda p: torch.func.grad(mse_loss)(p, data), (prob.params,), (v,))[1]

    gen = torch.Generator().manual_seed(seed)
    v = {
        k: torch.randn(num_tasks, *x.shape, generator=gen, dtype=torch.float64)
        for k, x in prob.params.items()
    }
    lam = torch.zeros(num_tasks, dtype=torch.float64)
    for _ in range(iters):
        norm = _flat(v, lead=1).norm(dim=1)
        v = {k: x / norm.view(-1, *[1] * (x.dim() - 1)) for k, x in v.items()}
        hv = torch.func.vmap(hvp)(prob.inner_data[0], v)
        lam = (_flat(hv, lead=1) * _flat(v, lead=1)).sum(1)
        v = hv
    return lam


def alpha_sensitivity(
    step_sizes: Sequence[float],
    *,
    num_steps: int = 10,
    order: int = 4,
    num_tasks: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Error of FOMAML / TruncMAML / BinomMAML at (K, L) for several step sizes alpha."""
    rows = []
    for alpha in step_sizes:
        table = error_table(
            (num_steps,), (order,), num_tasks=num_tasks, step_size=alpha, seed=seed, device=device
        )
        losses = inner_loss_curve(num_steps, num_tasks=num_tasks, step_size=alpha, seed=seed)
        rows.append(
            {
                "alpha": alpha,
                "fomaml": lookup_error(table, num_steps, "fomaml", 0),
                "trunc": lookup_error(table, num_steps, "trunc", order),
                "binom": lookup_error(table, num_steps, "binom", order),
                "loss_0": losses[0],
                "loss_K": losses[-1],
            }
        )
    return rows


# --------------------------------------------------------------------------- driver


@dataclass
class BenchmarkOptions:
    """Everything :func:`run_benchmark` needs; ``scripts/benchmark_metagrad.py`` fills it.

    Table 1 (errors) always uses the paper's test bed (1-40-40-1, 10 shots, float64);
    ``hidden`` / ``samples_per_task`` / ``num_tasks`` / ``ks`` size Tables 2 and 4;
    ``flat_*`` size Table 3.
    """

    tables: tuple[str, ...] = ("errors", "cost", "flatness")
    step_size: float = DEFAULT_STEP_SIZE
    error_ks: tuple[int, ...] = (5, 10)
    error_orders: tuple[int, ...] = (1, 2, 3, 4)
    error_tasks: int = 50
    sensitivity_step_sizes: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02)
    ks: tuple[int, ...] = (1, 2, 5, 10, 20)
    num_tasks: int = 25
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    samples_per_task: int = DEFAULT_SHOTS
    order: int = 2
    repeats: int = 5
    flat_ks: tuple[int, int] = (2, 20)
    flat_hidden: tuple[int, ...] = (128, 128)
    flat_samples: int = 4000
    flat_repeats: int = 3
    chunk_sizes: tuple[int | None, ...] = (None, 1, 2, 4, 8, 16)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = 1
    isolate: bool = True
    seed: int = 0
    output_dir: str = "docs"
    name: str = "benchmark_metagrad"
    quick: bool = False


def quick_options(**overrides: Any) -> BenchmarkOptions:
    """Small sizes that finish in about a minute on 2 CPU cores (in-process measurement)."""
    base = BenchmarkOptions(
        error_tasks=10,
        sensitivity_step_sizes=(0.002, 0.01),
        ks=(1, 5),
        repeats=2,
        flat_hidden=(64, 64),
        flat_samples=2000,
        flat_ks=(2, 8),
        flat_repeats=1,
        isolate=False,
        quick=True,
    )
    return replace(base, **overrides)


def run_benchmark(
    opts: BenchmarkOptions,
    *,
    worker_cmd: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the selected tables, print their key figures, write markdown, PNGs and JSON.

    Returns ``{"errors", "sensitivity", "cost", "flatness", "chunks", "summary", "files"}``.
    """
    out_dir = Path(opts.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"options": asdict(opts), "summary": {}, "files": []}
    summary = res["summary"]
    t_start = time.perf_counter()
    log(f"{environment_line(opts.device)}; alpha = {opts.step_size}")

    if "errors" in opts.tables:
        log("Table 1: estimation error vs exact MAML (float64, per-task mean)")
        rows = error_table(
            opts.error_ks,
            opts.error_orders,
            num_tasks=opts.error_tasks,
            step_size=opts.step_size,
            seed=opts.seed,
            device=opts.device,
        )
        res["errors"] = rows
        for r in rows:
            log(
                f"  K={r['K']:<3} {METHOD_LABELS[r['method']]:<10} L={r['L']}  "
                f"rel err {r['rel_err']:.3e}  cosine {r['cosine']:.6f}"
            )
        k_hi, l_hi = max(opts.error_ks), min(max(opts.error_orders), max(opts.error_ks))
        ratio = lookup_error(rows, k_hi, "trunc", l_hi) / lookup_error(rows, k_hi, "binom", l_hi)
        summary["error_ratio"] = {"K": k_hi, "L": l_hi, "trunc_over_binom": ratio}
        log(f"ERROR RATIO trunc/binom at L={l_hi}, K={k_hi}: {ratio:.4g} (target >= 100)")
        if opts.sensitivity_step_sizes:
            log(f"  step-size sensitivity at K={k_hi}, L={l_hi}")
            sens = alpha_sensitivity(
                opts.sensitivity_step_sizes,
                num_steps=k_hi,
                order=l_hi,
                num_tasks=opts.error_tasks,
                seed=opts.seed,
                device=opts.device,
            )
            res["sensitivity"] = sens
            for r in sens:
                log(
                    f"  alpha={r['alpha']:<6} fomaml {r['fomaml']:.2e} trunc {r['trunc']:.2e} "
                    f"binom {r['binom']:.2e}  loss {r['loss_0']:.3f} -> {r['loss_K']:.3f}"
                )
            lam = hessian_top_eigenvalue(num_tasks=opts.error_tasks, seed=opts.seed)
            summary["hessian_top_eig"] = {
                "mean_abs": lam.abs().mean().item(),
                "max_abs": lam.abs().max().item(),
            }
        plot_path = out_dir / f"{opts.name}_errors.png"
        plot_errors(rows, plot_path)
        res["files"].append(str(plot_path))

    base = MeasureConfig(
        method="binom",
        num_steps=1,
        order=opts.order,
        num_tasks=opts.num_tasks,
        hidden=tuple(opts.hidden),
        shots=opts.samples_per_task,
        step_size=opts.step_size,
        device=opts.device,
        dtype=opts.dtype,
        repeats=opts.repeats,
        threads=opts.threads,
        seed=opts.seed,
    )
    if "cost" in opts.tables:
        log(f"Table 2: one meta-gradient, {opts.num_tasks} tasks, vs K")
        cost = cost_table(opts.ks, base, worker_cmd=worker_cmd, isolate=opts.isolate, log=log)
        res["cost"] = cost
        plot_path = out_dir / f"{opts.name}_cost.png"
        plot_cost(cost, plot_path, f"Meta-gradient of {opts.num_tasks} tasks ({opts.device})")
        res["files"].append(str(plot_path))

    if "flatness" in opts.tables:
        log(
            f"Table 3: memory flatness, 1 task, MLP 1-{'-'.join(map(str, opts.flat_hidden))}-1, "
            f"{opts.flat_samples} samples per step"
        )
        flat_base = replace(
            base,
            num_tasks=1,
            hidden=tuple(opts.flat_hidden),
            shots=opts.flat_samples,
            repeats=opts.flat_repeats,
        )
        flat = cost_table(
            opts.flat_ks,
            flat_base,
            methods=(("binom", 1), ("binom", None), ("vanilla", None)),
            worker_cmd=worker_cmd,
            isolate=opts.isolate,
            log=log,
        )
        res["flatness"] = flat
        lo, hi = opts.flat_ks
        try:
            ratio = flatness_ratio(
                (find(flat, "binom", lo, 1), find(flat, "binom", hi, 1)),
                (find(flat, "vanilla", lo), find(flat, "vanilla", hi)),
            )
            batched = find(flat, "binom", hi, None).peak_mb / find(flat, "binom", hi, 1).peak_mb
        except (KeyError, ZeroDivisionError):
            ratio, batched = float("nan"), float("nan")
        summary["memory_growth_ratio"] = {"K_lo": lo, "K_hi": hi, "binom_over_vanilla": ratio}
        summary["batched_over_chunk1"] = batched
        log(
            f"MEMORY GROWTH RATIO binom(chunk_size=1)/vanilla from K={lo} to K={hi}: "
            f"{ratio:.3f} (target <= 0.25)"
        )
        log(f"  binom chunk_size=None uses {batched:.2f}x the memory of chunk_size=1 at K={hi}")
        plot_path = out_dir / f"{opts.name}_flatness.png"
        plot_cost(flat, plot_path, "Single task, large batch: memory flatness in K")
        res["files"].append(str(plot_path))

    if "chunks" in opts.tables:
        log(f"Table 4: BinomMAML L={opts.order} vs chunk_size, {opts.num_tasks} tasks")
        chunks = []
        for k_steps in opts.ks:
            chunks += chunk_table(
                opts.chunk_sizes,
                replace(base, num_steps=k_steps),
                worker_cmd=worker_cmd,
                isolate=opts.isolate,
                log=log,
            )
        res["chunks"] = chunks

    summary["wall_s"] = time.perf_counter() - t_start
    md_path = out_dir / f"{opts.name}.md"
    md_path.write_text(report_markdown(res, opts))
    json_path = out_dir / f"{opts.name}.json"
    json_path.write_text(json.dumps(_jsonable(res), indent=1))
    res["files"] += [str(md_path), str(json_path)]
    log(f"wrote {', '.join(res['files'])} in {summary['wall_s']:.0f} s")
    return res


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Measurement):
        return obj.to_json()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def report_markdown(res: dict[str, Any], opts: BenchmarkOptions) -> str:
    """The markdown report of :func:`run_benchmark` results."""
    s = res["summary"]
    memory_how = (
        "CUDA `max_memory_allocated` minus `memory_allocated` just before the call"
        if opts.device.startswith("cuda")
        else (
            "peak RSS during the call minus RSS just before it, each configuration in a fresh "
            "process with `MALLOC_MMAP_THRESHOLD_=65536`; after a warm-up call the heap is "
            "trimmed (`malloc_trim`) and the peak mark reset (`/proc/self/clear_refs`)"
            if opts.isolate
            else "in-process (quick mode): peak RSS during the call minus RSS before it, "
            "mmap threshold 64 KiB via mallopt, heap trimmed and peak mark reset before each call"
        )
    )
    lines = [
        "# Meta-gradient benchmark: sinusoid regression",
        "",
        "Generated by `scripts/benchmark_metagrad.py`"
        + (" --quick" if opts.quick else "")
        + f"; {environment_line(opts.device)}"
        + (f", {opts.threads} torch thread(s) per measurement" if opts.threads else "")
        + f"; whole run {s.get('wall_s', 0):.0f} s.",
        "",
        "Test bed (the BinomMAML paper's): y = A sin(x - p), A ~ U[0.1, 5], p ~ U[0, pi], "
        "x ~ U[-5, 5]; ReLU MLP; MSE; K inner steps of size "
        f"alpha = {opts.step_size}, each on its own batch of the task, outer loss on another "
        "batch; parameters at their initialisation (no meta-training).",
        "",
    ]
    if "errors" in res:
        ratio = s["error_ratio"]
        lines += [
            "## Table 1: estimation error against exact MAML",
            "",
            f"1-40-40-1 MLP, 10 shots per step, float64, {opts.error_tasks} tasks; per task "
            "relative error ||g - g_exact|| / ||g_exact|| (cosine in brackets), averaged over "
            "tasks. L = 0 is FOMAML; L = K would be exact.",
            "",
            error_markdown(res["errors"]),
            "",
            f"**TruncMAML / BinomMAML error at L = {ratio['L']}, K = {ratio['K']}: "
            f"{ratio['trunc_over_binom']:.3g}x** (target >= 100x; the paper reports about "
            "1000x).",
            "",
            f"![error vs L]({opts.name}_errors.png)",
            "",
        ]
        if res.get("sensitivity"):
            eig = s.get("hessian_top_eig", {})
            lines += [
                f"### Step-size sensitivity (K = {ratio['K']}, L = {ratio['L']})",
                "",
                "The binomial series converges fast when alpha * ||H_k|| is small; the "
                "largest Hessian eigenvalue of the 10-shot inner loss at the initialisation "
                f"is {eig.get('mean_abs', float('nan')):.1f} on average over tasks (max "
                f"{eig.get('max_abs', float('nan')):.1f}). Outer-batch loss before and after "
                "the K steps shows the inner loop is stable.",
                "",
                markdown_table(
                    ["alpha", "FOMAML", "TruncMAML", "BinomMAML", "trunc / binom", "loss 0 -> K"],
                    [
                        [
                            r["alpha"],
                            f"{r['fomaml']:.2e}",
                            f"{r['trunc']:.2e}",
                            f"{r['binom']:.2e}",
                            f"{r['trunc'] / r['binom']:.3g}",
                            f"{r['loss_0']:.3f} -> {r['loss_K']:.3f}",
                        ]
                        for r in res["sensitivity"]
                    ],
                ),
                "",
            ]
    if "cost" in res:
        lines += [
            f"## Table 2: time and peak memory of one meta-gradient ({opts.num_tasks} tasks)",
            "",
            f"MLP 1-{'-'.join(map(str, opts.hidden))}-1, {opts.samples_per_task} samples per "
            f"step, {opts.dtype}, median of {opts.repeats} calls after a warm-up. Exact = "
            "`batched_meta_gradient(method='maml')` (K sequential vmapped HVPs); vanilla = "
            "backprop through the unrolled loop with create_graph=True, Python loop over "
            "tasks. Orders are min(L, K) (L >= K is exact). Memory: " + memory_how + ".",
            "",
            cost_markdown(res["cost"]),
            "",
            f"![time and memory vs K]({opts.name}_cost.png)",
            "",
        ]
    if "flatness" in res:
        g = s["memory_growth_ratio"]
        lines += [
            "## Table 3: memory flatness in K (one task, large batch)",
            "",
            f"MLP 1-{'-'.join(map(str, opts.flat_hidden))}-1, {opts.flat_samples} samples per "
            f"step, {opts.dtype}, median of {opts.flat_repeats} call(s). BinomMAML L = "
            f"{opts.order} with chunk_size = 1 (one HVP graph alive at a time) and None (one "
            "vmap over all steps of a level).",
            "",
            cost_markdown(res["flatness"]),
            "",
            f"**Memory growth from K = {g['K_lo']} to K = {g['K_hi']}, BinomMAML (chunk_size=1)"
            f" / vanilla: {g['binom_over_vanilla']:.3f}** (target <= 0.25). BinomMAML with "
            f"chunk_size=None needs {s['batched_over_chunk1']:.2f}x the memory of "
            f"chunk_size=1 at K = {g['K_hi']} (all HVP graphs of a level alive at once).",
            "",
            f"![memory flatness]({opts.name}_flatness.png)",
            "",
        ]
    lines += [
        "## Notes on reading the numbers",
        "",
        "- Work per task: exact MAML (engine) K sequential HVPs; TruncMAML L; BinomMAML "
        "sum_{l=1..L} (K - l + 1) HVPs in L vmap calls (2K - 1 for L = 2); vanilla K "
        "create_graph steps and one double-backward pass. BinomMAML buys accuracy (Table 1), "
        "not fewer FLOPs than exact: its speed comes from batching all (task, step) pairs of a "
        "level into one vmap call, while vanilla loops over tasks in Python.",
        "- `chunk_size` bounds the (task, step) HVPs in flight: chunk_size = 1 keeps one HVP "
        "graph alive (memory flat in K, time serial), None runs a whole level at once (fast, "
        "memory ~ T K graphs). Between levels only vectors survive, but the engine keeps "
        "several T x K x |theta| buffers (path, suffix sums, vmap outputs), which is the floor "
        "of its memory.",
        "- CPU timings come from a machine shared with other jobs: expect noise of tens of "
        "percent; compare within a table.",
        "",
    ]
    if "chunks" in res:
        lines += [
            f"## Table 4: BinomMAML L = {opts.order} against chunk_size ({opts.num_tasks} tasks)",
            "",
            f"MLP 1-{'-'.join(map(str, opts.hidden))}-1, {opts.samples_per_task} samples per "
            f"step, {opts.dtype}. Memory: " + memory_how + ".",
            "",
            cost_markdown(res["chunks"], by="chunk"),
            "",
        ]
    return "\n".join(lines)
