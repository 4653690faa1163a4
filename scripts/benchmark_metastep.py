"""Benchmark the TRPO meta-step alone on synthetic HalfCheetah-sized stored episodes.

Times one meta-gradient and one full TRPO meta-step (10 CG iterations, line search) for
BinomMAML L = 1, 2, 3, TruncMAML, exact MAML (batched) and a vanilla unrolled per-task
reference, at K = 1, 3, 5, 10, plus a chunk_size table; no environment needed.

    python scripts/benchmark_metastep.py --device cuda            # full size, GPU
    python scripts/benchmark_metastep.py --quick --output /tmp/metastep.md

The harness is ``benchmarks.metastep_bench``.
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
from benchmarks.metastep_bench import MetastepOptions, quick_options, run_benchmark  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--tasks", type=int, help="tasks per meta-batch (default 40)")
    p.add_argument("--episodes", type=int, help="episodes per task and step (default 20)")
    p.add_argument("--horizon", type=int, help="steps per episode (default 200)")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (default 64 64)")
    p.add_argument("--ks", type=int, nargs="+", help="inner steps K (default 1 3 5 10)")
    p.add_argument("--orders", type=int, nargs="+", help="BinomMAML L (default 1 2 3)")
    p.add_argument(
        "--chunk-sizes", type=parse_chunk_size, nargs="+", help="chunk_size table ('none')"
    )
    p.add_argument("--chunk-k", type=int, help="K of the chunk_size table (default 10)")
    p.add_argument("--repeats", type=int, help="timed calls per configuration (median)")
    p.add_argument("--time-budget", type=float, help="seconds; later measurements are skipped")
    p.add_argument("--no-trpo", action="store_true", help="skip the TRPO-step table")
    p.add_argument("--no-reference", action="store_true", help="skip the vanilla reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="docs/benchmark_metastep.md", help="markdown report")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> MetastepOptions:
    overrides: dict = {"device": args.device, "seed": args.seed, "output": args.output}
    optional = {
        "tasks": args.tasks,
        "episodes": args.episodes,
        "horizon": args.horizon,
        "hidden": args.hidden,
        "ks": args.ks,
        "orders": args.orders,
        "chunk_sizes": args.chunk_sizes,
        "chunk_k": args.chunk_k,
        "repeats": args.repeats,
        "time_budget_s": args.time_budget,
    }
    overrides.update(given_flags(optional))
    if args.no_trpo:
        overrides["trpo"] = False
    if args.no_reference:
        overrides["reference"] = False
    if args.quick:
        return quick_options(**overrides)
    return dataclasses.replace(MetastepOptions(), **overrides)


def main(argv: list[str] | None = None) -> None:
    res = run_benchmark(options_from_args(parse_args(argv)))
    print(res["markdown"])


if __name__ == "__main__":
    main()
