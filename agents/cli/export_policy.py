"""Copy a trained run's policy alone into a folder of its own: ``binom-rl-export --run runs/x
--output-folder docs/results/runs/x`` (also ``python scripts/export_policy.py ...``).

Writes ``config.yaml`` and a ``policy.pt`` with the parameters, iteration and config only
(no RNG state, metrics or TensorBoard events): what ``binom-rl-evaluate --run`` needs.
``--overwrite`` replaces an earlier export there (e.g. a longer run re-shipped); a folder
holding a training run is refused either way.
"""

from __future__ import annotations

import argparse
import sys

from binom_rl.agents.cli.common import add_common_flags, run_command
from binom_rl.agents.training import export_policy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run folder (config.yaml, policy.pt)")
    parser.add_argument("--output-folder", required=True, help="new folder for the policy")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --output-folder (never a training run)",
    )
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        print(f"wrote {export_policy(args.run, args.output_folder, args.overwrite)}")
        return 0

    return run_command(work, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
