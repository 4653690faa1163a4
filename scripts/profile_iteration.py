"""Split a meta-iteration's wall time into phases: ``python scripts/profile_iteration.py
--config configs/2d-navigation.yaml [--iterations 12] [any config flag]``.

Runs a fresh meta-training for --iterations iterations (nothing is written) and prints
the median seconds of sampling, advantages, meta-gradient, Fisher-vector products, line
search and the rest (the first --skip iterations left out).
"""

from __future__ import annotations

import argparse
import sys

import torch

from binom_rl.agents.profiling import format_profile, profile_iterations
from binom_rl.config import Config, ConfigError, add_config_flags, load_yaml, overrides_from_args
from binom_rl.runtime import reuse_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (MAML-RL key names)")
    parser.add_argument("--iterations", type=int, default=12, help="meta-iterations to run")
    parser.add_argument("--skip", type=int, default=2, help="warm-up iterations left out")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    try:
        raw = load_yaml(args.config) if args.config else {}
        raw.update(overrides_from_args(args))
        cfg = Config.from_dict(raw)
        if args.torch_threads is not None:
            if args.torch_threads < 1:
                raise ConfigError(f"--torch-threads must be >= 1, got {args.torch_threads}")
            torch.set_num_threads(args.torch_threads)
        reuse_freed_memory()
        medians = profile_iterations(cfg, args.iterations, args.skip)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{cfg.env_name}, estimator {cfg.estimator} (order {cfg.order}), K = {cfg.num_steps}, "
        f"{torch.get_num_threads()} torch threads, median of iterations "
        f"{args.skip}..{args.iterations - 1}:\n"
    )
    print(format_profile(medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())
