"""fast-lr x ||H_k|| of a trained run's inner steps on each data set the meta-step may use:
``binom-rl-inspect-curvature --run runs/x [--meta-batch-size N] [--seed S]`` (also
``python scripts/inspect_curvature.py ...``).

Samples a meta-batch of tasks, takes the run's K inner steps from its checkpoint and prints,
for all inner data, 1 in n whole episodes and 1 in n time steps (n = fvp-subsample), each as
is and with re-centred advantages: the advantages' mean relative to their RMS and
fast-lr x the spectral norm of the inner-loss Hessians (median and max over steps and
tasks). Truncated expansions (BinomMAML, TruncMAML) can be accurate only well below 1.
"""

from __future__ import annotations

import argparse
import sys

from binom_rl.agents.cli.common import add_common_flags, run_command
from binom_rl.agents.curvature import curvature_table, format_curvature_table
from binom_rl.agents.evaluation import load_run
from binom_rl.config import ConfigError
from binom_rl.runtime import reuse_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run folder (config.yaml, policy.pt)")
    parser.add_argument(
        "--meta-batch-size", type=int, default=None, help="tasks (default: the run's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the tasks and episodes")
    parser.add_argument("--iters", type=int, default=20, help="power iterations per Hessian")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        if args.meta_batch_size is not None and args.meta_batch_size < 1:
            raise ConfigError(f"--meta-batch-size must be >= 1, got {args.meta_batch_size}")
        if args.iters < 1:
            raise ConfigError(f"--iters must be >= 1, got {args.iters}")
        cfg, params = load_run(args.run, args.device)
        reuse_freed_memory()
        rows = curvature_table(
            cfg, params, meta_batch_size=args.meta_batch_size, seed=args.seed, iters=args.iters
        )
        print(
            f"{cfg.env_name}, K = {cfg.num_steps}, fast-lr {cfg.fast_lr}, "
            f"{args.meta_batch_size or cfg.meta_batch_size} tasks x {cfg.fast_batch_size} "
            "episodes per inner step (median and max over steps and tasks):\n"
        )
        print(format_curvature_table(rows))
        return 0

    return run_command(work, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
