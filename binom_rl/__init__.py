"""binom-rl: gradient-based meta-RL with binomial meta-gradient estimators."""
