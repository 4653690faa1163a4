"""How much of MAML-TRPO's meta-gradient is sampling noise at a run's policy
(docs/results/locomotion.md, "Why HalfCheetahDir declined"):
``python docs/results/locomotion_gradient_noise.py [--init] [--pairs P] [--cg-damping D,...]
RUN [RUN ...]``.

For each policy, P pairs of independent meta-batches, each sampled as one training
iteration samples it (the run's meta-batch-size tasks x fast-batch-size episodes, K inner
steps); for each batch the meta-gradient g and TRPO's step direction (F + d I)^-1 g (the CG
solve the outer step makes, d the run's cg-damping or each of ``--cg-damping``). Prints
the mean over pairs of the cosine between the two batches.
With g = s + n (signal s, independent noise n per batch), E[g1 . g2] = |s|^2 and
E|g|^2 = |s|^2 + E|n|^2, so the cosine estimates the share of |g|^2 that is signal: near
1 the batch's direction is the expected one, near 0 it is mostly the batch's noise, and a
TRPO step of fixed KL (max-kl) moves the policy in a nearly random direction. Every policy
sees the same tasks and episode seeds. ``--init``: also the run config's initial policy.
"""

import argparse

import numpy as np
import torch

from binom_rl.agents.evaluation import load_run
from binom_rl.agents.maml_trpo import MetaLearner, derive_seed
from binom_rl.agents.training import open_sampler
from binom_rl.rl import flatten_params

SEED = 424242  # tasks and episodes, the same for every policy


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+")
parser.add_argument("--init", action="store_true", help="also the initial policy of the first run")
parser.add_argument("--pairs", type=int, default=2)
parser.add_argument("--cg-damping", default=None, help="comma-separated (default: the run's)")
args = parser.parse_args()
dampings = None if args.cg_damping is None else [float(d) for d in args.cg_damping.split(",")]

policies = [(run, *load_run(run)) for run in args.runs]
if args.init:
    policies.insert(0, (f"{args.runs[0]} (initial policy)", policies[0][1], None))

print(
    "| policy | iteration | pairs | cos(g1, g2) | cg-damping d "
    "| cos((F + dI)^-1 g1, (F + dI)^-1 g2) | mean |g| | return before / after the inner steps |"
)
print("|---|---|---|---|---|---|---|---|")
for name, cfg, params in policies:
    ds = dampings or [cfg.cg_damping]
    with open_sampler(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        trpo = learner.outer
        iteration = 0
        if params is None:
            params = learner.init_params(cfg.seed)
        else:
            iteration = torch.load(f"{name}/policy.pt", weights_only=False).get("iteration")
        grads, dirs, before, after = [], [], [], []
        for batch in range(2 * args.pairs):
            tasks = sampler.sample_tasks(cfg.meta_batch_size, seed=derive_seed(SEED, batch, 0))
            adaptation = learner.adapt(
                params, tasks, cfg.num_steps, seed=derive_seed(SEED, batch, 1),
                keep_hessians=learner.keeps_hessians(),
            )  # fmt: skip
            valid, outer_grads = trpo.outer_batch_and_gradient(
                adaptation.episodes[-1], adaptation.path[-1]
            )
            g = learner.estimator.meta_gradient(
                adaptation.path, adaptation.inner_data,
                [None] * cfg.num_steps + [outer_grads], adaptation.hessians,
            )  # fmt: skip
            adaptation.hessians = None
            fvp_inner, fvp_valid = trpo._fvp_data(adaptation.inner_data, valid)
            grads.append(flatten_params(g))
            dirs.append([
                trpo._step_direction(adaptation.path, fvp_inner, fvp_valid, g, d).x for d in ds
            ])  # fmt: skip
            before.append(float(adaptation.episodes[0].returns.mean()))
            after.append(float(adaptation.episodes[-1].returns.mean()))
    pairs = range(0, 2 * args.pairs, 2)
    cos_g = np.mean([cosine(grads[i], grads[i + 1]) for i in pairs])
    norm = np.mean([float(g.norm()) for g in grads])
    for j, d in enumerate(ds):
        cos_d = np.mean([cosine(dirs[i][j], dirs[i + 1][j]) for i in pairs])
        print(
            f"| {name} | {iteration} | {args.pairs} | {cos_g:.3f} | {d:g} | {cos_d:.3f} "
            f"| {norm:.3f} | {np.mean(before):.1f} / {np.mean(after):.1f} |",
            flush=True,
        )
