"""Meta-train a policy: ``python scripts/train.py --config configs/2d-navigation.yaml
--output-folder runs/2d-navigation [--seed S] [--device cpu|cuda] [--num-workers N] [--resume]``.

Every config key is also a flag (``--fast-lr 0.05 --num-steps 3 --estimator maml``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from binom_rl.agents.maml_trpo import NonFiniteError
from binom_rl.agents.training import resume_config, train
from binom_rl.config import Config, ConfigError, add_config_flags, load_yaml, overrides_from_args
from binom_rl.runtime import reuse_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (MAML-RL key names)")
    parser.add_argument("--output-folder", required=True, help="where the run is written")
    parser.add_argument("--resume", action="store_true", help="continue the run in the folder")
    parser.add_argument("--overwrite", action="store_true", help="start over in a non-empty folder")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own choice)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    try:
        overrides = overrides_from_args(args)
        if args.resume:
            cfg = resume_config(args.output_folder, overrides)
        else:
            raw = load_yaml(args.config) if args.config else {}
            raw.update(overrides)
            cfg = Config.from_dict(raw)
        if args.torch_threads is not None:
            if args.torch_threads < 1:
                raise ConfigError(f"--torch-threads must be >= 1, got {args.torch_threads}")
            torch.set_num_threads(args.torch_threads)
        for note in cfg.advice():
            print(f"note: {note}", file=sys.stderr)
        reuse_freed_memory()
        metrics = train(
            cfg,
            args.output_folder,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}; the last good checkpoint is kept", file=sys.stderr)
        return 1
    k = cfg.num_steps
    print(
        f"done: returns/step_0 {metrics.get('returns/step_0', float('nan')):.2f}, "
        f"returns/step_{k} {metrics.get(f'returns/step_{k}', float('nan')):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
