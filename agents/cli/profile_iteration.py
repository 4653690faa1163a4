"""Split a meta-iteration's wall time into phases: ``binom-rl-profile --config
configs/2d-navigation.yaml [--iterations 12] [any config flag]`` (also ``python
scripts/profile_iteration.py ...``).

Runs a fresh meta-training for --iterations iterations (nothing is written) and prints
the median seconds of sampling, advantages, meta-gradient, Fisher-vector products, line
search and the rest (the first --skip iterations left out).
"""

from __future__ import annotations

import argparse
import sys

import torch

from binom_rl.agents.cli.common import add_common_flags, run_command, set_torch_threads
from binom_rl.agents.profiling import format_profile, profile_iterations
from binom_rl.config import Config, ConfigError, add_config_flags, load_yaml, overrides_from_args
from binom_rl.runtime import reuse_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (MAML-RL key names)")
    parser.add_argument("--iterations", type=int, default=12, help="meta-iterations to run")
    parser.add_argument("--skip", type=int, default=2, help="warm-up iterations left out")
    add_common_flags(parser, torch_threads=True)
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        raw = load_yaml(args.config) if args.config else {}
        raw.update(overrides_from_args(args))
        cfg = Config.from_dict(raw)
        if args.skip < 0 or args.iterations <= args.skip:
            raise ConfigError(
                f"--iterations ({args.iterations}) must exceed skip ({args.skip}) >= 0"
            )
        set_torch_threads(args.torch_threads)
        reuse_freed_memory()
        medians = profile_iterations(cfg, args.iterations, args.skip)
        print(
            f"{cfg.env_name}, estimator {cfg.estimator} (order {cfg.order}), "
            f"K = {cfg.num_steps}, {torch.get_num_threads()} torch threads, median of "
            f"iterations {args.skip}..{args.iterations - 1}:\n"
        )
        print(format_profile(medians))
        return 0

    return run_command(work, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
