"""Meta-train a policy (``python scripts/train.py --help``).

The same command as the installed ``binom-rl-train``; its code is binom_rl.agents.cli.train.
"""

import sys

from binom_rl.agents.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
