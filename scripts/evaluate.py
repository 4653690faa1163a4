"""Meta-test a trained run (``python scripts/evaluate.py --help``).

The same command as the installed ``binom-rl-evaluate``; its code is binom_rl.agents.cli.evaluate.
"""

import sys

from binom_rl.agents.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
