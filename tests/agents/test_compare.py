"""The comparison harness at tiny size: outputs and rows, reuse of finished runs, resume
planning, up-front validation (exit 2, nothing written)."""

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from binom_rl.agents.compare import (
    CompareOptions,
    EstimatorSpec,
    parse_baselines,
    parse_estimators,
    parse_seeds,
    plan_comparison,
)
from binom_rl.config import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare.py"
_spec = importlib.util.spec_from_file_location("compare_script", SCRIPT)
compare_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_script)

EVAL = ["--eval-num-steps", "2", "--eval-meta-batch-size", "3", "--eval-num-batches", "1",
        "--baseline-timesteps", "200", "--no-progress"]  # fmt: skip
RUN = ["--estimators", "fomaml,binom:1", "--seeds", "0", "--baselines", "random,pretrained",
       "--jobs", "2"]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_argv(tiny_flags):
    """The tiny run's config flags (K = 1, 2 iterations) and tiny evaluation sizes."""
    return [*tiny_flags(num_steps=1), *EVAL]


@pytest.fixture(scope="session")
def _options(tiny_config):
    """``_options(folder, **overrides)``: the comparison of ``comparison`` as CompareOptions."""

    def make(folder: Path, **overrides) -> CompareOptions:
        return CompareOptions(None, tiny_config(**overrides), "fomaml,binom:1", "0", folder,
                              baselines="random,pretrained", eval_num_steps=2,
                              eval_meta_batch_size=3, eval_num_batches=1,
                              baseline_timesteps=200, progress=False)  # fmt: skip

    return make


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tiny_argv):
    folder = tmp_path_factory.mktemp("cmp")
    rc = compare_script.main([*RUN, *tiny_argv, "--output-folder", str(folder)])
    assert rc == 0
    return folder


def test_tiny_comparison_writes_summary_with_rows(comparison):
    for name in ("summary.md", "summary.csv", "learning_curves.png", "adaptation.png"):
        assert (comparison / name).stat().st_size > 0, name
    with open(comparison / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["fomaml", "binom:1", "random", "pretrained"]
    by = {r["method"]: r for r in rows}
    for r in rows:
        for k in range(3):
            float(r[f"return_step_{k}"])  # evaluated at 0..2 adaptation steps
    assert int(by["fomaml"]["env_steps"]) == 2 * 3 * 4 * 2 * 10
    assert int(by["pretrained"]["env_steps"]) == 200 and int(by["random"]["env_steps"]) == 0
    for method in ("fomaml", "binom:1"):
        for col in ("final_return", "sampling_s", "meta_step_s", "peak_mb"):
            assert float(by[method][col]) == float(by[method][col]), (method, col)  # not nan
        assert by[method]["cosine_to_exact"] == ""  # not diagnosed
    assert by["random"]["final_return"] == ""
    md = (comparison / "summary.md").read_text()
    assert md.count("\n| ") == 4 and "| binom:1 | 1 | 480 |" in md
    log = (comparison / "binom1_seed0" / "train.log").read_text()
    assert "-m binom_rl.agents.cli.train" in log and "-m binom_rl.agents.cli.evaluate" in log
    assert "--torch-threads 1" in log and "--no-progress" in log


def test_rerun_reuses_finished_runs(comparison, capsys, tiny_argv):
    files = sorted(comparison.glob("*_seed0/*"))
    before = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    rc = compare_script.main([*RUN, *tiny_argv, "--output-folder", str(comparison)])
    assert rc == 0
    out = capsys.readouterr().out
    for run in ("fomaml_seed0", "binom1_seed0", "random_seed0", "pretrained_seed0"):
        assert f"reuse {comparison / run} (finished and evaluated)" in out
    assert {f: f.stat().st_mtime_ns for f in files} == before  # nothing retrained or rewritten


def test_plan_resumes_partial_runs_and_restarts_crashed_ones(comparison, tmp_path, _options):
    plan = plan_comparison(_options(comparison, **{"num-batches": 3}))
    actions = {r.folder.name: r.action for r in plan.runs}
    assert actions == {"fomaml_seed0": "resume", "binom1_seed0": "resume",
                       "random_seed0": "skip", "pretrained_seed0": "skip"}  # fmt: skip
    crashed = tmp_path / "fomaml_seed0"
    crashed.mkdir()
    (crashed / "train.log").write_text("killed\n")
    actions = {r.folder.name: r.action for r in plan_comparison(_options(tmp_path)).runs}
    assert actions["fomaml_seed0"] == "overwrite" and actions["binom1_seed0"] == "train"
    with pytest.raises(ConfigError, match=r"settings \(fast-lr \(saved 0.1, given 0.2\)\)"):
        plan_comparison(_options(comparison, **{"fast-lr": 0.2}))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--estimators", "maml,foo"], "unknown estimator"),
        (["--estimators", "binom:2"], "binom:2 (num-steps 1): order 2 > 1 inner steps"),
        (["--estimators", "trunc:-1"], "order must be >= 0"),
        (["--estimators", "binom:x"], "order of 'binom:x' is not an int"),
        (["--estimators", "trunc"], "needs an order"),
        (["--estimators", "maml", "--seeds", "0,x"], "not an int"),
        (["--estimators", "maml", "--baselines", "expert"], "unknown baseline"),
        (["--estimators", "maml", "--seed", "3"], "--estimators / --seeds"),
        (["--estimators", "maml", "--jobs", "0"], "--jobs"),
    ],
)
def test_invalid_arguments_exit_2_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "cmp"
    rc = compare_script.main([*argv, "--output-folder", str(out), "--num-steps", "1"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_parsers():
    assert parse_estimators("maml, fomaml,trunc:2,binom:0", 3) == [
        EstimatorSpec("maml"), EstimatorSpec("fomaml"), EstimatorSpec("trunc", 2),
        EstimatorSpec("binom", 0)]  # fmt: skip
    spec = EstimatorSpec("binom", 2)
    assert spec.key == "binom2" and spec.label == "binom:2"
    assert parse_seeds("2,0") == [2, 0]
    assert parse_baselines("") == [] and parse_baselines("oracle,random") == ["oracle", "random"]
    with pytest.raises(ConfigError):
        parse_seeds("1,1")


def test_success_rates_in_summary_and_plots_for_envs_that_report_success(
    tmp_path, monkeypatch, tiny_argv
):
    helpers = str(Path(__file__).resolve().parents[1] / "helpers")
    monkeypatch.syspath_prepend(helpers)  # this process plans; train.py / evaluate.py
    monkeypatch.setenv("PYTHONPATH", helpers)  # run in subprocesses
    tiny = [*tiny_argv, "--env-name", "binom_rl_test_envs:SuccessPointGoal-v0"]  # last wins
    rc = compare_script.main(["--estimators", "fomaml", "--baselines", "random", *tiny,
                              "--output-folder", str(tmp_path)])  # fmt: skip
    assert rc == 0
    for name in ("success_curves.png", "success_adaptation.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
    with open(tmp_path / "summary.csv") as fh:
        by = {r["method"]: r for r in csv.DictReader(fh)}
    for method in ("fomaml", "random"):
        with np.load(tmp_path / f"{method}_seed0" / "results.npz") as results:
            expected = results["success_mean"]  # one seed: the row is that seed's rates
        got = [float(by[method][f"success_step_{k}"]) for k in range(3)]
        assert got == pytest.approx(expected, abs=1e-4)
    assert 0 <= float(by["fomaml"]["final_success"]) <= 1 and by["random"]["final_success"] == ""
    md = (tmp_path / "summary.md").read_text()
    assert "| method | 0 steps | 1 step | 2 steps | final train success (step 1) |" in md


def test_no_success_columns_for_returns_only_envs(comparison):
    with open(comparison / "summary.csv") as fh:
        assert not any("success" in name for name in next(csv.reader(fh)))
    assert not (comparison / "success_curves.png").exists()
    assert "Success rate" not in (comparison / "summary.md").read_text()
