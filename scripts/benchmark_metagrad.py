"""Benchmark the meta-gradient estimators on sinusoid regression.

Tables: estimation error vs exact MAML (FOMAML / TruncMAML / BinomMAML), time and peak
memory of one meta-gradient vs K (BinomMAML, TruncMAML, exact, vanilla unrolled backprop),
memory flatness in K, and optionally time / memory vs vmap chunk_size. Writes
``<output-dir>/benchmark_metagrad.md`` with PNGs and a JSON of the raw numbers.

    python scripts/benchmark_metagrad.py                 # full run, docs/ (a few minutes)
    python scripts/benchmark_metagrad.py --quick --output-dir /tmp/bench
    python scripts/benchmark_metagrad.py --device cuda --tables chunks \\
        --chunk-sizes none 1 2 4 8 16 --num-tasks 40 --ks 10 --samples-per-task 800 \\
        --hidden 100 100

The harness is ``benchmarks.metagrad_bench``; ``--worker`` (internal) runs one
measurement in a fresh process.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# The benchmark harness is the checkout's top-level package benchmarks/, not installed with
# binom-rl (the library is binom_rl/ alone). Appended after site-packages, so that an
# installed binom_rl stays the one imported; an editable install maps to this checkout.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.common import given_flags, parse_chunk_size  # noqa: E402
from benchmarks.metagrad_bench import (  # noqa: E402
    DEFAULT_STEP_SIZE,
    BenchmarkOptions,
    quick_options,
    run_benchmark,
    worker_main,
)

TABLES = ("errors", "cost", "flatness", "chunks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute on 2 cores")
    p.add_argument(
        "--tables",
        nargs="+",
        choices=TABLES,
        help="tables to run (default: errors cost flatness, plus chunks if --chunk-sizes)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--step-size", type=float, default=DEFAULT_STEP_SIZE, help="inner alpha")
    p.add_argument("--ks", type=int, nargs="+", help="inner steps K for Tables 2 and 4")
    p.add_argument("--num-tasks", type=int, help="meta-batch size for Tables 2 and 4")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes for Tables 2 and 4")
    p.add_argument("--samples-per-task", type=int, help="samples per step, Tables 2 and 4")
    p.add_argument("--order", type=int, help="L of BinomMAML / TruncMAML in Tables 2-4")
    p.add_argument("--repeats", type=int, help="timed calls per configuration (median)")
    p.add_argument("--error-tasks", type=int, help="tasks averaged in Table 1")
    p.add_argument("--flat-hidden", type=int, nargs="+", help="hidden sizes for Table 3")
    p.add_argument("--flat-samples", type=int, help="samples per step for Table 3")
    p.add_argument("--flat-ks", type=int, nargs=2, help="the two K of Table 3")
    p.add_argument(
        "--chunk-sizes",
        type=parse_chunk_size,
        nargs="+",
        help="chunk sizes for Table 4 ('none' = all)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU measurement")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of one fresh process per configuration (CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="docs")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> BenchmarkOptions:
    tables = args.tables
    if tables is None:
        tables = ["errors", "cost", "flatness"] + (["chunks"] if args.chunk_sizes else [])
    overrides = {
        "tables": tuple(tables),
        "device": args.device,
        "dtype": args.dtype,
        "step_size": args.step_size,
        "threads": args.threads,
        "seed": args.seed,
        "output_dir": args.output_dir,
    }
    optional = {
        "ks": args.ks,
        "num_tasks": args.num_tasks,
        "hidden": args.hidden,
        "samples_per_task": args.samples_per_task,
        "order": args.order,
        "repeats": args.repeats,
        "error_tasks": args.error_tasks,
        "flat_hidden": args.flat_hidden,
        "flat_samples": args.flat_samples,
        "flat_ks": args.flat_ks,
        "chunk_sizes": args.chunk_sizes,
    }
    overrides.update(given_flags(optional))
    if args.in_process:
        overrides["isolate"] = False
    if args.quick:
        return quick_options(**overrides)
    return dataclasses.replace(BenchmarkOptions(), **overrides)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return
    run_benchmark(options_from_args(args), worker_cmd=[sys.executable, __file__])


if __name__ == "__main__":
    main()
