"""Copy a trained run's policy alone into a new folder (``python scripts/export_policy.py --help``).

The same command as the installed ``binom-rl-export``; its code is
binom_rl.agents.cli.export_policy.
"""

import sys

from binom_rl.agents.cli.export_policy import main

if __name__ == "__main__":
    sys.exit(main())
