"""Sampler throughput: MultiTaskSampler vs the physics limit vs gymnasium vector envs.

    python scripts/benchmark_sampler.py            # 40 tasks x 20 episodes x 200 steps
    python scripts/benchmark_sampler.py --quick    # small sizes, a few seconds
    python scripts/benchmark_sampler.py --ray      # also the Ray backend (the ray extra)

Prints one line per measurement, writes a markdown table to --output, and ends with
``sampler: N env-steps/s = R x physics limit, S x best gymnasium vector env``.
"""

from __future__ import annotations

import argparse

from binom_rl.benchmarks.sampler_bench import (
    available_cores,
    run_benchmark,
    summary_line,
    write_markdown,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="binom_rl/HalfCheetahVel-v0")
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
    parser.add_argument("--ray", action="store_true",
                        help="also local vs Ray backends, and a slow pure-Python env")
    parser.add_argument("--output", default="docs/benchmark_sampler.md")
    args = parser.parse_args()
    if args.quick:
        args.num_tasks, args.batch_size, args.horizon = 4, 5, 50
        args.vec_envs, args.vec_steps, args.physics_seconds = 4, 50, 0.3
    for name in ("num_tasks", "batch_size", "horizon", "num_workers", "vec_envs", "vec_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    result = run_benchmark(
        env_id=args.env_id,
        num_tasks=args.num_tasks,
        batch_size=args.batch_size,
        horizon=args.horizon,
        num_workers=args.num_workers,
        vec_envs=args.vec_envs,
        vec_steps=args.vec_steps,
        physics_seconds=args.physics_seconds,
    )
    for row in result["rows"]:
        print(f"{row.name}: {row.rate:,.0f} env-steps/s ({row.note})")
    write_markdown(result, args.output)
    if args.ray:
        from binom_rl.benchmarks import ray_sampler_bench as ray_bench

        slow = ray_bench.Workload(ray_bench.SLOW_ENV_ID, 2, 2, 20) if args.quick else None
        ray_result = ray_bench.run_ray_benchmark(
            args.env_id, args.num_tasks, args.batch_size, args.horizon, args.num_workers, slow,
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
