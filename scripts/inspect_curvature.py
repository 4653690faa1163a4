"""fast-lr x ||H_k|| of a trained run's inner steps (``python scripts/inspect_curvature.py
--help``).

The same command as the installed ``binom-rl-inspect-curvature``; its code is
binom_rl.agents.cli.inspect_curvature.
"""

import sys

from binom_rl.agents.cli.inspect_curvature import main

if __name__ == "__main__":
    sys.exit(main())
