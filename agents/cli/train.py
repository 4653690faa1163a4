"""Meta-train a policy: ``binom-rl-train --config configs/2d-navigation.yaml --output-folder
runs/2d-navigation [--seed S] [--device cpu|cuda] [--num-workers N] [--resume | --overwrite]``
(also ``python scripts/train.py ...``).

Every config key is also a flag (``--fast-lr 0.05 --num-steps 3 --estimator maml``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from binom_rl.agents.cli.common import add_common_flags, run_command, set_torch_threads
from binom_rl.agents.training import CHECKPOINT_FILE, RunComplete, resume_config, train
from binom_rl.config import Config, add_config_flags, load_yaml, overrides_from_args
from binom_rl.runtime import reuse_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (MAML-RL key names)")
    parser.add_argument("--output-folder", required=True, help="where the run is written")
    parser.add_argument("--resume", action="store_true", help="continue the run in the folder")
    parser.add_argument("--overwrite", action="store_true", help="start over in a non-empty folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_common_flags(parser, torch_threads=True)
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.output_folder)

    def work() -> int:
        overrides = overrides_from_args(args)
        if args.resume:
            cfg = resume_config(folder, overrides)
        else:
            raw = load_yaml(args.config) if args.config else {}
            raw.update(overrides)
            cfg = Config.from_dict(raw)
        set_torch_threads(args.torch_threads)
        for note in cfg.advice():
            print(f"note: {note}", file=sys.stderr)
        reuse_freed_memory()
        try:
            metrics = train(
                cfg, folder, resume=args.resume, overwrite=args.overwrite,
                progress=not args.no_progress,
            )  # fmt: skip
        except RunComplete as done:
            print(done)
            return 0
        k = cfg.num_steps
        print(
            f"done: returns/step_0 {metrics['returns/step_0']:.2f}, "
            f"returns/step_{k} {metrics[f'returns/step_{k}']:.2f}"
        )
        return 0

    def failure_note() -> str:
        if (folder / CHECKPOINT_FILE).is_file():
            return f"; {folder / CHECKPOINT_FILE} keeps the last good iteration: --resume continues"
        return ""

    return run_command(work, verbose=args.verbose, log_folder=folder, failure_note=failure_note)


if __name__ == "__main__":
    sys.exit(main())
