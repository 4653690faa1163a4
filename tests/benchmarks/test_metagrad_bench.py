"""The meta-gradient benchmark at tiny sizes: outputs, error-table sanity, the vanilla
reference against the engine's exact MAML, and the fresh-process worker path."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.metagrad_bench import (
    BenchmarkOptions,
    MeasureConfig,
    Measurement,
    error_table,
    lookup_error,
    mse_loss,
    quick_options,
    run_benchmark,
    sample_sinusoid_problem,
    vanilla_meta_gradient,
)
from binom_rl.metagrad import batched_meta_gradient

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_metagrad.py"


def test_error_table_binom_exact_at_full_order_and_decreasing():
    rows = error_table((3,), (1, 2, 3), num_tasks=4, hidden=(8, 8), step_size=0.01)
    binom = [lookup_error(rows, 3, "binom", order) for order in (1, 2, 3)]
    assert binom[-1] < 1e-10  # L = K keeps every term: exact
    assert lookup_error(rows, 3, "trunc", 3) < 1e-10
    assert binom[0] > binom[1] > binom[2]
    assert lookup_error(rows, 3, "fomaml", 0) > binom[0]
    for row in rows:
        if row["L"] == 3:
            assert row["cosine"] == pytest.approx(1.0, abs=1e-12)


def test_error_table_fomaml_row_against_per_task_autograd():
    """The FOMAML row's figures, recomputed task by task: exact meta-gradient by autograd
    through the unrolled steps (vanilla_meta_gradient on one task), FOMAML's the outer
    gradient at phi_K (J = I), then the mean relative error and mean cosine."""
    k_steps, num_tasks = 3, 4
    (row,) = [r for r in error_table((k_steps,), (1,), num_tasks=num_tasks, hidden=(8, 8),
                                     step_size=0.01) if r["method"] == "fomaml"]  # fmt: skip
    # error_table samples the problem of K steps with seed + 1000 K
    prob = sample_sinusoid_problem(
        num_tasks, k_steps, hidden=(8, 8), step_size=0.01, seed=1000 * k_steps,
        dtype=torch.float64,
    )  # fmt: skip
    rel, cos = [], []
    for t in range(num_tasks):
        inner = [{k: v[t : t + 1] for k, v in d.items()} for d in prob.inner_data]
        outer = {k: v[t : t + 1] for k, v in prob.outer_data.items()}
        exact = vanilla_meta_gradient(mse_loss, prob.params, inner, outer, step_size=0.01)
        phi = prob.params
        for data in inner:
            grads = torch.func.grad(mse_loss)(phi, {k: v[0] for k, v in data.items()})
            phi = {k: phi[k] - 0.01 * grads[k] for k in phi}
        first = torch.func.grad(mse_loss)(phi, {k: v[0] for k, v in outer.items()})
        e = torch.cat([exact[k].reshape(-1) for k in prob.params])
        f = torch.cat([first[k].reshape(-1) for k in prob.params])
        rel.append(float((f - e).norm() / e.norm()))
        cos.append(float(f @ e / (f.norm() * e.norm())))
    assert row["rel_err"] == pytest.approx(sum(rel) / num_tasks, rel=1e-9)
    assert row["cosine"] == pytest.approx(sum(cos) / num_tasks, rel=1e-9)
    assert row["rel_err"] > 1e-3  # FOMAML drops the second-order terms: not vacuous


@pytest.mark.parametrize("num_steps", [1, 3])
def test_vanilla_reference_matches_batched_exact_maml(num_steps):
    prob = sample_sinusoid_problem(
        3, num_steps, shots=5, hidden=(6, 5), step_size=0.05, seed=3, dtype=torch.float64
    )
    ref = vanilla_meta_gradient(
        mse_loss, prob.params, prob.inner_data, prob.outer_data, step_size=prob.step_size
    )
    exact = batched_meta_gradient(
        mse_loss,
        mse_loss,
        prob.params,
        prob.inner_data,
        prob.outer_data,
        step_size=prob.step_size,
        method="maml",
    )
    first_order = batched_meta_gradient(
        mse_loss,
        mse_loss,
        prob.params,
        prob.inner_data,
        prob.outer_data,
        step_size=prob.step_size,
        method="fomaml",
    )
    assert set(ref) == set(exact)
    for k in ref:
        torch.testing.assert_close(ref[k], exact[k], rtol=1e-9, atol=1e-12)
    # the check is not vacuous: second-order terms matter at this step size
    diff = sum((ref[k] - first_order[k]).norm() ** 2 for k in ref) ** 0.5
    assert diff > 1e-4


def test_run_benchmark_tiny_writes_report(tmp_path):
    opts = BenchmarkOptions(
        tables=("errors", "cost", "flatness", "chunks"),
        error_ks=(2, 3),
        error_orders=(1, 2),
        error_tasks=3,
        sensitivity_step_sizes=(0.002,),
        ks=(1, 2),
        num_tasks=2,
        hidden=(8,),
        samples_per_task=4,
        repeats=1,
        flat_ks=(1, 3),
        flat_hidden=(16,),
        flat_samples=64,
        flat_repeats=1,
        chunk_sizes=(None, 1),
        isolate=False,
        output_dir=str(tmp_path),
    )
    res = run_benchmark(opts, log=lambda _: None)
    for name in ("benchmark_metagrad.md", "benchmark_metagrad.json"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("errors", "cost", "flatness"):
        assert (tmp_path / f"benchmark_metagrad_{name}.png").stat().st_size > 1000
    text = (tmp_path / "benchmark_metagrad.md").read_text()
    for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "trunc / binom"):
        assert heading in text
    assert len(res["cost"]) == 2 * 4 and len(res["chunks"]) == 2 * 2
    assert all(m.error is None and m.time_s > 0 for m in res["cost"] + res["chunks"])
    json.loads((tmp_path / "benchmark_metagrad.json").read_text())


def test_script_worker_measures_in_fresh_process():
    cfg = MeasureConfig(method="vanilla", num_steps=2, num_tasks=2, hidden=(8,), repeats=1)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--worker", json.dumps(cfg.__dict__)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    res = Measurement.from_json(json.loads(out.stdout.strip().splitlines()[-1]))
    assert res.error is None and res.time_s > 0 and res.peak_mb >= 0
    assert res.config == replace(cfg)


def test_script_flags_set_their_options():
    spec = importlib.util.spec_from_file_location("_benchmark_metagrad", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--ks", "1", "3", "--num-tasks", "4", "--hidden", "8", "8", "--order", "1",
            "--chunk-sizes", "none", "2", "--flat-ks", "2", "4", "--threads", "2",
            "--output-dir", "out", "--in-process"]  # fmt: skip
    got = script.options_from_args(script.parse_args(argv))
    want = dict(ks=(1, 3), num_tasks=4, hidden=(8, 8), order=1, chunk_sizes=(None, 2),
                flat_ks=(2, 4), threads=2, output_dir="out", isolate=False,
                tables=("errors", "cost", "flatness", "chunks"))  # fmt: skip
    assert got == replace(BenchmarkOptions(), **want)
    quick = script.options_from_args(script.parse_args([*argv, "--quick", "--tables", "cost"]))
    assert quick == quick_options(**{**want, "tables": ("cost",)})
