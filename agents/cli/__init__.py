"""The command-line programs, installed as console scripts (setup.cfg) and wrapped by
``scripts/*.py``: ``binom-rl-train``, ``binom-rl-evaluate``, ``binom-rl-compare``,
``binom-rl-plot``, ``binom-rl-inspect-curvature``, ``binom-rl-profile``; each module also
runs as ``python -m binom_rl.agents.cli.<name>``.
"""
