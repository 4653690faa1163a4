"""Plot a training run's returns/step_k curves: ``python scripts/plot_run.py --run runs/x
[--output runs/x/training_curves.png]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from binom_rl.agents.training import plot_training_curves
from binom_rl.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="training run folder")
    parser.add_argument(
        "--output", default=None, help="PNG path (default: <run>/training_curves.png)"
    )
    args = parser.parse_args(argv)
    try:
        out = plot_training_curves(args.run, args.output or Path(args.run) / "training_curves.png")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
