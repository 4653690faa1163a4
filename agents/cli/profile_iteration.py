"""Split a meta-iteration's wall time into phases: ``binom-rl-profile --config
configs/2d-navigation.yaml [--config configs/2d-navigation-promp.yaml]
[--estimators maml,binom:2] [--iterations 12] [--skip 2] [any config flag]`` (also
``python scripts/profile_iteration.py ...``).

Runs a fresh meta-training per --config (and per estimator of --estimators, if given) for
--iterations iterations (nothing is written), their iterations interleaved, and prints
the median seconds of each phase (sampling, advantages, inner steps, outer objective,
meta-gradient, Fisher-vector products, line search, Adam updates, other) for each, the
first --skip iterations left out. Config flags apply to every run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from binom_rl.agents.cli.common import add_common_flags, run_command, set_torch_threads
from binom_rl.agents.compare import parse_estimators
from binom_rl.agents.profiling import format_profile, profile_iterations
from binom_rl.config import Config, ConfigError, add_config_flags, load_yaml, overrides_from_args
from binom_rl.runtime import reuse_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", action="append", default=None,
        help="YAML config (MAML-RL key names); repeat to profile several side by side",
    )  # fmt: skip
    parser.add_argument(
        "--estimators", default=None,
        help="profile each config with each of these estimators, e.g. maml,binom:2",
    )  # fmt: skip
    parser.add_argument("--iterations", type=int, default=12, help="meta-iterations to run")
    parser.add_argument("--skip", type=int, default=2, help="warm-up iterations left out")
    add_common_flags(parser, torch_threads=True)
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        cfgs, names = [], []
        for path in args.config or [None]:
            raw = load_yaml(path) if path else {}
            raw.update(overrides_from_args(args))
            name = Path(path).stem if path else "defaults"
            if args.estimators is None:
                cfgs.append(Config.from_dict(raw))
                names.append(name)
                continue
            num_steps = Config.from_dict({**raw, "estimator": "fomaml"}).num_steps
            for spec in parse_estimators(args.estimators, num_steps):
                cfgs.append(Config.from_dict({**raw, **spec.config_keys(num_steps)}))
                names.append(f"{name} {spec.label}")
        if args.skip < 0 or args.iterations <= args.skip:
            raise ConfigError(
                f"--iterations ({args.iterations}) must exceed skip ({args.skip}) >= 0"
            )
        set_torch_threads(args.torch_threads)
        reuse_freed_memory()
        medians = profile_iterations(cfgs, args.iterations, args.skip)
        for name, cfg in zip(names, cfgs, strict=True):
            print(
                f"{name}: {cfg.env_name}, outer {cfg.outer}, inner loss {cfg.inner_loss}, "
                f"estimator {cfg.estimator} (order {cfg.order}), K = {cfg.num_steps}"
            )
        print(
            f"{torch.get_num_threads()} torch threads, median of iterations "
            f"{args.skip}..{args.iterations - 1}:\n"
        )
        print(format_profile(medians, names))
        return 0

    return run_command(work, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
