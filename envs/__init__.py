"""Meta-RL task distributions, registered as gymnasium ids in the ``binom_rl/`` namespace."""
