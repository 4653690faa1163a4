"""The Ray sampler benchmark at tiny sizes: every backend returns the same episodes (the
benchmark checks it), the rows, ratios and report come out, and Ray is shut down after."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from benchmarks import ray_sampler_bench as bench  # noqa: E402


def test_tiny_run_measures_every_backend_and_writes_the_section(tmp_path):
    slow = bench.Workload(bench.SLOW_ENV_ID, 2, 3, 5, {"step_ms": 0.2})
    result = bench.run_ray_benchmark(
        "binom_rl/HalfCheetahVel-v0",
        2,
        2,
        5,
        num_workers=2,
        slow=slow,
        repeats=1,
        actor_counts=(1, 2),
    )
    assert not ray.is_initialized()
    assert set(result["workloads"]) == {"binom_rl/HalfCheetahVel-v0", bench.SLOW_ENV_ID}
    for workload, rows in result["workloads"].values():
        assert len(rows) == len(bench.BACKENDS)
        steps = workload.num_tasks * workload.batch_size * workload.horizon
        assert all(row.env_steps == steps and row.rate > 0 for row in rows)
        assert set(bench.overhead_ratios(rows)) == {"vs_best_local", "vs_local_default"}
    assert 0 < result["round_trips"]["empty_call_s"] and 0 < result["policy_forward_s"]
    assert set(result["round_trips"]["empty_call_s_by_actors"]) == {1, 2}
    report = tmp_path / "report.md"
    report.write_text("# Sampler benchmark\n")
    bench.append_markdown(result, report)
    text = report.read_text()
    assert text.startswith("# Sampler benchmark\n\n## Ray backend")
    assert "### binom_rl_bench/SlowPoint-v0, 2 tasks x 3 episodes x 5 steps" in text
    assert text.count("| ray, actors running the policy (default) (2 workers) |") == 2


def test_slow_env_follows_its_dynamics():
    env = bench.SlowPointEnv(step_ms=0.0)
    env.reset(seed=0)
    env.reset_task({"goal": 0.5})
    obs, _ = env.reset(seed=1)
    obs2, reward, terminated, _, _ = env.step([2.0])  # clipped to 1: x moves by 0.1
    assert obs2[0] == pytest.approx(obs[0] + 0.1) and obs2[1] == 0.5
    assert reward == pytest.approx(-abs(obs2[0] - 0.5)) and not terminated
