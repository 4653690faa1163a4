"""Compare meta-gradient estimators and baselines (``python scripts/compare.py --help``).

The same command as the installed ``binom-rl-compare``; its code is binom_rl.agents.cli.compare.
"""

import sys

from binom_rl.agents.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
