"""Shared test set-up."""

from __future__ import annotations

import sys
from pathlib import Path

# The benchmark harness (benchmarks/) is a top-level package of the checkout, not installed:
# appended after site-packages, so that an installed binom_rl stays the one imported.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
