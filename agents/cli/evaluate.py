"""Meta-test a trained run: ``binom-rl-evaluate --run runs/x [--num-steps 3]
[--meta-batch-size 40] [--num-batches 10]`` (also ``python scripts/evaluate.py ...``).

Prints the return after 0..n inner steps (mean and standard error over test tasks; the
success rate too for envs that report success, e.g. Meta-World; the mean episode length
where episodes end before the horizon, e.g. an Ant that falls) and writes results.npz
(per task, also the episode lengths) and results.csv into the run folder (or
--output-folder). Test tasks come from the env's held-out test split where it has one
(Meta-World), else from its task distribution.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from binom_rl.agents.cli.common import add_common_flags, run_command
from binom_rl.agents.evaluation import (
    STEP_SIZE_DECAY,
    evaluate_adaptation,
    format_table,
    load_run,
    write_results,
)
from binom_rl.config import ConfigError
from binom_rl.runtime import reuse_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run folder (config.yaml, policy.pt)")
    parser.add_argument("--num-steps", type=int, default=3, help="inner steps at test time")
    parser.add_argument("--meta-batch-size", type=int, default=40, help="test tasks per batch")
    parser.add_argument("--num-batches", type=int, default=10, help="batches of test tasks")
    parser.add_argument(
        "--seed", type=int, default=None, help="test seed (default: run seed + offset)"
    )
    parser.add_argument(
        "--step-size-decay", type=float, default=STEP_SIZE_DECAY,
        help="each test step beyond the num-steps the run was trained with takes this times "
        "the previous step's size (1: every step fast-lr)",
    )  # fmt: skip
    parser.add_argument(
        "--fast-lr", type=float, default=None,
        help="size of the test steps the run was trained with (default: the run's fast-lr); "
        "--step-size-decay scales the later ones from it",
    )  # fmt: skip
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument(
        "--output-folder", default=None, help="where results go, made if missing (default: --run)"
    )
    parser.add_argument("--no-progress", action="store_true")
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = args.output_folder or args.run

    def work() -> int:
        cfg, params = load_run(args.run, args.device)
        if args.fast_lr is not None:
            cfg = dataclasses.replace(cfg, fast_lr=args.fast_lr)
            cfg.validate()
        folder = Path(output)
        if folder.exists() and not folder.is_dir():  # checked before the work, not after it
            raise ConfigError(f"--output-folder {output} exists and is not a directory")
        # made before the work, so that a folder that cannot be made fails in seconds
        folder.mkdir(parents=True, exist_ok=True)
        reuse_freed_memory()
        result = evaluate_adaptation(
            cfg,
            params,
            num_steps=args.num_steps,
            meta_batch_size=args.meta_batch_size,
            num_batches=args.num_batches,
            seed=args.seed,
            progress=not args.no_progress,
            step_size_decay=args.step_size_decay,
        )
        summary = write_results(
            output, result.returns, result.success, result.step_sizes, result.lengths
        )
        num_tasks = result.returns.shape[0]
        print(format_table(summary, num_tasks, result.step_sizes, cfg.max_episode_steps))
        return 0

    return run_command(work, verbose=args.verbose, log_folder=output)


if __name__ == "__main__":
    sys.exit(main())
