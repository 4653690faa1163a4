"""Mean per-task length |phi_{k+1} - phi_k| of each test step of a trained run, with every
step at fast-lr and with the steps halving (docs/results/2dnav_k1.md, "More test steps than
training steps"): ``python docs/results/2dnav_k1_step_lengths.py RUN``. The tasks and
episode seeds are evaluate.py's first three batches of 40."""

import sys

import numpy as np
import torch

from binom_rl.agents.evaluation import TEST_SEED_OFFSET, adaptation_step_sizes, load_run
from binom_rl.agents.maml_trpo import MetaLearner, derive_seed
from binom_rl.agents.training import open_sampler

cfg, params = load_run(sys.argv[1])
seed = cfg.seed + TEST_SEED_OFFSET
for decay in (1.0, 0.5):
    sizes = adaptation_step_sizes(cfg, 3, decay)
    lengths = []
    with open_sampler(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        for batch in range(3):  # 120 test tasks, evaluate.py's first three batches
            tasks = sampler.sample_tasks(40, seed=derive_seed(seed, batch, 0), split="test")
            path = learner.adapt(
                params, tasks, 3, seed=derive_seed(seed, batch, 1), step_sizes=sizes
            ).path
            steps = zip(path[:-1], path[1:], strict=True)
            lengths.append(
                [
                    float(torch.cat([(b[n] - a[n]).flatten(1) for n in a], 1).norm(dim=1).mean())
                    for a, b in steps
                ]
            )
    print(f"step sizes {sizes}: mean |phi_k+1 - phi_k|", np.round(np.mean(lengths, 0), 3))
