"""The TRPO meta-step benchmark at tiny sizes: the independent reference equals the
engine's exact MAML on identical data, and the report has every section."""

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.metastep_bench import (
    correctness_check,
    make_problem,
    quick_options,
    run_benchmark,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_metastep.py"


def test_reference_matches_engine_exact_maml():
    torch.set_num_threads(1)
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


def test_script_help():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True
    )
    assert "--time-budget" in out.stdout and "--quick" in out.stdout
