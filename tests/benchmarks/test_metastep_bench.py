"""The TRPO meta-step benchmark at tiny sizes: the independent reference equals the
engine's exact MAML on identical data, and the report has every section."""

import importlib.util
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.metastep_bench import (
    MetastepOptions,
    correctness_check,
    make_problem,
    quick_options,
    run_benchmark,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_metastep.py"


def test_reference_matches_engine_exact_maml():
    opts = quick_options(tasks=2, episodes=2, horizon=6, hidden=(8,))
    check = correctness_check(make_problem(opts, 2))
    assert check["metagrad_rel_diff"] < 1e-4
    assert check["fomaml_rel_diff"] > 100 * check["metagrad_rel_diff"]  # not vacuous
    assert check["trpo_step_rel_diff"] < 1e-3 and check["trpo_step_norm"] > 0


def test_run_benchmark_tiny_writes_report(tmp_path):
    out = tmp_path / "metastep.md"
    opts = quick_options(
        tasks=2,
        episodes=1,
        horizon=5,
        hidden=(8,),
        ks=(1, 2),
        chunk_k=2,
        chunk_sizes=(None, 2),
        warmup=0,
        cg_iters=2,
        output=str(out),
    )
    res = run_benchmark(opts, log=lambda _: None)
    text = out.read_text()
    for heading in (
        "Correctness check",
        "(a) One meta-gradient",
        "(b) One full TRPO",
        "chunk_size",
        "RATIO TRPO meta-step",
        "GROWTH",
    ):
        assert heading in text
    assert all(m.error is None and m.time_s > 0 for m in res["metagrad"] + res["trpo"])
    # K=1: binom 1, trunc 1, exact, reference; K=2: binom 1, 2, trunc 2, exact, reference
    assert len(res["metagrad"]) == 9 and len(res["chunks"]) == 2


def _load_script():
    spec = importlib.util.spec_from_file_location("_benchmark_metastep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_flags_set_their_options():
    script = _load_script()
    argv = ["--tasks", "3", "--episodes", "2", "--horizon", "7", "--hidden", "5", "6",
            "--ks", "1", "2", "--orders", "1", "--chunk-sizes", "none", "4", "--chunk-k", "2",
            "--repeats", "2", "--time-budget", "9.5", "--no-trpo", "--seed", "3",
            "--output", "x.md"]  # fmt: skip
    want = dict(tasks=3, episodes=2, horizon=7, hidden=(5, 6), ks=(1, 2), orders=(1,),
                chunk_sizes=(None, 4), chunk_k=2, repeats=2, time_budget_s=9.5, trpo=False,
                reference=True, seed=3, output="x.md", device="cpu")  # fmt: skip
    full = script.options_from_args(script.parse_args(argv))
    assert full == replace(MetastepOptions(), **want)
    quick = script.options_from_args(script.parse_args([*argv, "--quick", "--no-reference"]))
    assert quick == quick_options(**{**want, "reference": False})


def test_script_writes_and_prints_the_report(tmp_path):
    out = tmp_path / "metastep.md"
    argv = ["--quick", "--tasks", "2", "--episodes", "1", "--horizon", "5", "--hidden", "8",
            "--ks", "1", "--orders", "1", "--chunk-sizes", "none", "--chunk-k", "1",
            "--no-trpo", "--output", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, check=True,
        timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    report = out.read_text()
    assert proc.stdout.endswith(report + "\n")  # the log lines, then the report itself
    assert "2 tasks x 1 episodes x 5 steps per inner step" in report
    assert "## (a) One meta-gradient" in report and "(b) One full TRPO" not in report
