"""Plot training curves from TensorBoard events (also ``python scripts/plot_run.py ...``).

One run, every returns/step_k curve: ``binom-rl-plot --run runs/x
[--output runs/x/training_curves.png]``. Several runs, one scalar each: ``binom-rl-plot
--run runs/a runs/b [--tag returns/step_1] [--smooth 10] [--labels a,b] [--offsets 0,235]
--output curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from binom_rl.agents.cli.common import add_common_flags, run_command
from binom_rl.agents.training import plot_runs, plot_training_curves
from binom_rl.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, nargs="+", help="training run folder(s)")
    parser.add_argument(
        "--output", default=None,
        help="PNG path (default for one run: <run>/training_curves.png; needed for several)",
    )  # fmt: skip
    parser.add_argument(
        "--tag", default=None,
        help="scalar to overlay across runs (default with several runs: returns/step_1)",
    )  # fmt: skip
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window")
    parser.add_argument("--labels", default=None, help="comma-separated curve labels")
    parser.add_argument(
        "--offsets", default=None,
        help="comma-separated iterations to shift each run's curve by (e.g. 0,235 for a run "
        "continued with --init-policy from the first run's iteration 235)",
    )  # fmt: skip
    add_common_flags(parser)
    return parser


def _parse_offsets(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--offsets: comma-separated integers expected, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        labels = args.labels.split(",") if args.labels else None
        offsets = _parse_offsets(args.offsets) if args.offsets else None
        single = args.tag is None and args.smooth == 1 and labels is None and offsets is None
        if len(args.run) == 1 and single:
            output = args.output or Path(args.run[0]) / "training_curves.png"
            out = plot_training_curves(args.run[0], output)
        else:
            if args.output is None:
                raise ConfigError(
                    "--output is needed with several runs, --tag, --smooth, --labels or --offsets"
                )
            tag = args.tag or "returns/step_1"
            out = plot_runs(
                args.run, args.output, tag=tag, smooth=args.smooth, labels=labels,
                offsets=offsets,
            )  # fmt: skip
        print(f"wrote {out}")
        return 0

    return run_command(work, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
