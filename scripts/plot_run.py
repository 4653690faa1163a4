"""Plot training curves from TensorBoard events (``python scripts/plot_run.py --help``).

The same command as the installed ``binom-rl-plot``; its code is binom_rl.agents.cli.plot_run.
"""

import sys

from binom_rl.agents.cli.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
