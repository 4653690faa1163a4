"""Compare meta-gradient estimators and baselines: ``binom-rl-compare --config
configs/2d-navigation.yaml --estimators maml,fomaml,trunc:2,binom:1,binom:2 --seeds 0,1,2
--output-folder runs/cmp [--baselines pretrained,oracle,random] [--jobs N]
[--eval-num-steps 3 --eval-meta-batch-size 40 --eval-num-batches 2]
[--baseline-timesteps T] [config overrides, e.g. --num-batches 50 --num-steps 3]``
(also ``python scripts/compare.py ...``).

Trains each estimator x seed with ``binom-rl-train`` (separate processes, finished runs
are reused, partial ones resumed), evaluates them with ``binom-rl-evaluate``'s protocol,
runs the baselines, and writes summary.md, summary.csv, learning_curves.png and
adaptation.png.
"""

from __future__ import annotations

import argparse
import sys

from binom_rl.agents.cli.common import add_common_flags, run_command
from binom_rl.agents.compare import CompareOptions, run_comparison
from binom_rl.agents.evaluation import STEP_SIZE_DECAY
from binom_rl.config import add_config_flags, overrides_from_args
from binom_rl.runtime import reuse_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", help="YAML config (MAML-RL key names)")
    parser.add_argument("--estimators", required=True, help="e.g. maml,fomaml,trunc:2,binom:1")
    parser.add_argument("--seeds", default="0", help="comma-separated ints (default 0)")
    parser.add_argument("--output-folder", required=True, help="comparison folder")
    parser.add_argument("--baselines", default="", help="any of pretrained,oracle,random")
    parser.add_argument("--jobs", type=int, default=1, help="training processes at once")
    parser.add_argument("--eval-num-steps", type=int, default=3, help="inner steps at test time")
    parser.add_argument("--eval-meta-batch-size", type=int, default=40, help="test tasks/batch")
    parser.add_argument("--eval-num-batches", type=int, default=2, help="batches of test tasks")
    parser.add_argument(
        "--eval-step-size-decay", type=float, default=STEP_SIZE_DECAY,
        help="test steps beyond num-steps: this times the previous step's size",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-timesteps",
        type=int,
        default=None,
        help="PPO env steps per baseline run (default: one estimator run's budget, at most 1M)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_common_flags(parser)
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = CompareOptions(
        config=args.config,
        overrides=overrides_from_args(args),
        estimators=args.estimators,
        seeds=args.seeds,
        output_folder=args.output_folder,
        baselines=args.baselines,
        jobs=args.jobs,
        eval_num_steps=args.eval_num_steps,
        eval_meta_batch_size=args.eval_meta_batch_size,
        eval_num_batches=args.eval_num_batches,
        eval_step_size_decay=args.eval_step_size_decay,
        baseline_timesteps=args.baseline_timesteps,
        progress=not args.no_progress,
    )

    def work() -> int:
        reuse_freed_memory()  # the baselines train in this process; the runs in their own
        plan, _, failures = run_comparison(options)
        print((plan.folder / "summary.md").read_text())
        for failure in failures:
            print(f"failed: {failure}", file=sys.stderr)
        return 1 if failures else 0

    return run_command(work, verbose=args.verbose, log_folder=args.output_folder)


if __name__ == "__main__":
    sys.exit(main())
