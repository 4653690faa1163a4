"""Sampler throughput: MultiTaskSampler vs one env x cores, the physics limit and gymnasium
vector envs.

    python scripts/benchmark_sampler.py            # 40 tasks x 20 episodes x 200 steps
    python scripts/benchmark_sampler.py --quick    # small sizes, a few seconds
    python scripts/benchmark_sampler.py --env-id binom_rl/MetaWorldML1-v0 \
        --env-kwargs "{env_name: push-v3}" --num-tasks 10 --batch-size 10 \
        --output docs/benchmark_sampler_metaworld.md      # Meta-World (the extra)
    python scripts/benchmark_sampler.py --ray      # also the Ray backend (the ray extra)

Prints one line per measurement, writes a markdown table to --output, and ends with
``sampler: N env-steps/s = Q x (one env x C cores), [R x physics limit,] S x best gymnasium
vector env``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

# The benchmark harness is the checkout's top-level package benchmarks/, not installed with
# binom-rl (the library is binom_rl/ alone). Appended after site-packages, so that an
# installed binom_rl stays the one imported; an editable install maps to this checkout.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.sampler_bench import (  # noqa: E402
    available_cores,
    run_benchmark,
    summary_line,
    write_markdown,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="binom_rl/HalfCheetahVel-v0")
    parser.add_argument("--env-kwargs", default="{}", help="YAML mapping, e.g. {env_name: push-v3}")
    parser.add_argument("--num-tasks", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=20, help="episodes per task")
    parser.add_argument("--horizon", type=int, default=200, help="steps per episode")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=available_cores(),
        help="sampler worker processes (num_workers=1, in-process, is measured as well)",
    )
    parser.add_argument("--vec-envs", type=int, default=20, help="envs per gymnasium vector env")
    parser.add_argument("--vec-steps", type=int, default=200, help="steps of the vector envs")
    parser.add_argument("--physics-seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument(
        "--ray", action="store_true", help="also local vs Ray backends, and a slow pure-Python env"
    )
    parser.add_argument("--output", default="docs/benchmark_sampler.md")
    args = parser.parse_args()
    if args.quick:
        args.num_tasks, args.batch_size, args.horizon = 4, 5, 50
        args.vec_envs, args.vec_steps, args.physics_seconds = 4, 50, 0.3
    for name in ("num_tasks", "batch_size", "horizon", "num_workers", "vec_envs", "vec_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        env_kwargs = yaml.safe_load(args.env_kwargs)
    except yaml.YAMLError:
        env_kwargs = None
    if not isinstance(env_kwargs, dict):
        parser.error(f"--env-kwargs must be a YAML mapping, got {args.env_kwargs!r}")

    result = run_benchmark(
        env_id=args.env_id,
        num_tasks=args.num_tasks,
        batch_size=args.batch_size,
        horizon=args.horizon,
        num_workers=args.num_workers,
        vec_envs=args.vec_envs,
        vec_steps=args.vec_steps,
        physics_seconds=args.physics_seconds,
        env_kwargs=env_kwargs,
    )
    for row in result["rows"]:
        print(f"{row.name}: {row.rate:,.0f} env-steps/s ({row.note})")
    write_markdown(result, args.output)
    if args.ray:
        from benchmarks import ray_sampler_bench as ray_bench

        slow = ray_bench.Workload(ray_bench.SLOW_ENV_ID, 2, 2, 20) if args.quick else None
        ray_result = ray_bench.run_ray_benchmark(
            args.env_id,
            args.num_tasks,
            args.batch_size,
            args.horizon,
            args.num_workers,
            slow,
            repeats=3 if args.quick else 2,
        )
        for _, (_, rows) in ray_result["workloads"].items():
            for row in rows:
                print(f"{row.name}: {row.rate:,.0f} env-steps/s ({row.note})")
        ray_bench.append_markdown(ray_result, args.output)
        print("\n".join(ray_bench.summary_lines(ray_result)))
    print(f"wrote {args.output}")
    print(summary_line(result))


if __name__ == "__main__":
    main()
