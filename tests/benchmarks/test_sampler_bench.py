"""The sampler benchmark at tiny sizes: rows, ratios and the summary line, with and without
a MuJoCo physics limit (2D navigation has none; Meta-World is stepped in Python)."""

from __future__ import annotations

import math

import pytest

from benchmarks.sampler_bench import run_benchmark, summary_line, write_markdown

TINY = dict(num_tasks=2, batch_size=2, horizon=10, num_workers=2, vec_envs=2, vec_steps=10,
            physics_seconds=0.05)  # fmt: skip


def _check(result: dict, tmp_path) -> str:
    names = [row.name for row in result["rows"]]
    assert names[:3] == ["MultiTaskSampler (num_workers=2)", "MultiTaskSampler (num_workers=1)",
                         "one env x cores"]  # fmt: skip
    assert result["sampler"].rate == max(r.rate for r in result["rows"][:2])
    assert result["ratio_single_env"] == pytest.approx(
        result["sampler"].rate / result["single_env"].rate
    )
    assert result["single_env"].env_steps > 0 and result["sampler"].env_steps == 2 * 2 * 10
    write_markdown(result, tmp_path / "report.md")
    line = summary_line(result)
    assert line in (tmp_path / "report.md").read_text()
    return line


def test_navigation_has_no_physics_limit(tmp_path):
    result = run_benchmark("binom_rl/2DNavigation-v0", **TINY)
    assert result["physics"] is None and math.isnan(result["ratio_physics"])
    line = _check(result, tmp_path)
    assert f"x (one env x {result['cores']} cores)" in line
    assert "physics" not in line


def test_metaworld_push(tmp_path):
    pytest.importorskip("metaworld")
    result = run_benchmark("binom_rl/MetaWorldML1-v0", env_kwargs={"env_name": "push-v3"},
                           **TINY)  # fmt: skip
    assert result["physics"] is None  # stepped in Python: one env is the reference
    _check(result, tmp_path)
    assert "push-v3" in (tmp_path / "report.md").read_text()
