"""Split a meta-iteration's wall time into phases (``python scripts/profile_iteration.py --help``).

The same command as the installed ``binom-rl-profile``; its code is
binom_rl.agents.cli.profile_iteration.
"""

import sys

from binom_rl.agents.cli.profile_iteration import main

if __name__ == "__main__":
    sys.exit(main())
