"""scripts/train.py and scripts/evaluate.py at tiny sizes: files and TensorBoard tags,
bad inputs (exit 2, one error line, nothing written), failures during a run (exit 1, one
error line, the traceback in error.log or with --verbose), user envs via
``module:EnvId-v0``."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import binom_rl
from binom_rl.checkpoint import load_checkpoint
from tests.helpers.files import listing

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "helpers"  # binom_rl_test_envs: PointGoal-v0, NoTasks-v0
QUIET = ["--torch-threads", "1", "--no-progress"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_cli = _load_script("train")
evaluate_cli = _load_script("evaluate")


@pytest.fixture(scope="session")
def tiny_argv(tiny_flags):
    """The tiny run's flags (2 iterations), one torch thread, no progress bar."""
    return [*tiny_flags(), *QUIET]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_argv):
    """A 2-iteration, 2-inner-step run through the CLI with the exact-gradient diagnostic."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    argv = [*tiny_argv, "--num-steps", "2", "--order", "1", "--diagnose-every", "1"]
    assert train_cli.main([*argv, "--output-folder", str(folder)]) == 0
    return folder


def test_run_folder_and_tensorboard_tags(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (finished_run / "config.yaml").is_file()
    state = load_checkpoint(finished_run / "policy.pt")
    assert state["iteration"] == 2
    assert state["config"]["num-steps"] == 2
    acc = EventAccumulator(str(finished_run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "returns/step_0",
        "returns/step_1",
        "returns/step_2",
        "episodes/length_step_0",
        "episodes/length_step_2",
        "metagrad/norm",
        "metagrad/cosine_to_exact",
        "train/kl",
        "train/surrogate_improvement",
        "time/sampling_s",
        "time/meta_step_s",
        "memory/peak_mb",
    }
    assert expected <= tags, expected - tags
    for tag in expected:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1]
        assert all(np.isfinite(e.value) for e in events)
    assert [e.value for e in acc.Scalars("episodes/length_step_1")] == [10.0, 10.0]  # horizon
    # BinomMAML L = 1 at K = 2 is an approximation: cosine below 1, and the two logged
    # figures of one pair of vectors a, e agree: |a - e| / |e| >= sin(angle(a, e)).
    for cos, rel in zip(acc.Scalars("metagrad/cosine_to_exact"),
                        acc.Scalars("metagrad/rel_error_to_exact"), strict=True):  # fmt: skip
        assert cos.value < 1 - 1e-9 and rel.value > 1e-6
        assert rel.value >= math.sqrt(max(0.0, 1 - cos.value**2)) - 1e-6


def test_diagnostic_of_an_exact_estimator_is_exact(tmp_path, tiny_argv):
    """binom with order = num-steps keeps every term: its meta-gradient is the exact one."""
    from binom_rl.agents.training import read_scalars

    folder = tmp_path / "run"
    argv = [*tiny_argv, "--num-batches", "1", "--num-steps", "2", "--order", "2"]
    assert train_cli.main([*argv, "--diagnose-every", "1", "--output-folder", str(folder)]) == 0
    scalars = read_scalars(folder)
    assert scalars["metagrad/cosine_to_exact"][0] == pytest.approx(1.0, abs=1e-6)
    assert scalars["metagrad/rel_error_to_exact"][0] < 1e-4


def test_evaluate_writes_results(finished_run, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    argv = ["--run", str(finished_run), "--num-steps", "2", "--meta-batch-size", "3"]
    argv += ["--num-batches", "1", "--no-progress", "--output-folder", str(out)]
    assert evaluate_cli.main(argv) == 0
    printed = capsys.readouterr().out
    # 2D navigation never terminates: every episode runs the horizon, no length column
    assert "| steps | mean return | std. error |\n" in printed
    for k in range(3):
        assert f"\n| {k} | " in printed
    with np.load(out / "results.npz") as results:
        assert results["returns"].shape == (3, 3)  # tasks x (num_steps + 1)
        assert results["mean"].shape == (3,)
        assert np.isfinite(results["returns"]).all()
        np.testing.assert_array_equal(results["lengths"], np.full((3, 3), 10.0))
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"step", "mean_return", "stderr"}


def test_evaluate_output_folder_made_or_refused(finished_run, tmp_path, capsys):
    """A missing --output-folder (parents included) is made and gets the results; a path
    that is a file is one error line, exit 2, before any work, and the file is untouched."""
    argv = ["--run", str(finished_run), "--num-steps", "1", "--meta-batch-size", "2"]
    argv += ["--num-batches", "1", "--no-progress", "--output-folder"]
    out = tmp_path / "new" / "eval"
    assert evaluate_cli.main([*argv, str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.npz"]
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    assert evaluate_cli.main([*argv, str(blocker)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output-folder {blocker} exists and is not a directory"]
    assert blocker.read_text() == "kept"


def test_evaluate_step_size_decay(finished_run, tmp_path, capsys):
    """Steps beyond the run's K = 2 shrink by --step-size-decay (recorded and printed); a
    decay outside (0, 1] is one error line, exit 2, nothing written."""
    out = tmp_path / "eval"
    out.mkdir()
    argv = ["--run", str(finished_run), "--num-steps", "3", "--meta-batch-size", "2"]
    argv += ["--num-batches", "1", "--no-progress", "--output-folder", str(out)]
    assert evaluate_cli.main([*argv, "--step-size-decay", "0.25"]) == 0
    assert "(step sizes 0.1, 0.1, 0.025)" in capsys.readouterr().out
    with np.load(out / "results.npz") as results:
        np.testing.assert_allclose(results["step_sizes"], [0.1, 0.1, 0.025])
    for path in out.iterdir():
        path.unlink()
    assert evaluate_cli.main([*argv, "--step-size-decay", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: step-size-decay must be in (0, 1], got 0.0"]
    assert list(out.iterdir()) == []


def test_evaluate_fast_lr(finished_run, tmp_path, capsys):
    """--fast-lr sets the size of the run's K = 2 test steps (later ones decay from it) and
    changes nothing before the first step; a size <= 0 is one error line, nothing written."""
    returns = {}
    for lr in (None, "0.1", "0.04"):
        out = tmp_path / f"eval-{lr}"
        out.mkdir()
        argv = ["--run", str(finished_run), "--num-steps", "3", "--meta-batch-size", "2"]
        argv += ["--num-batches", "1", "--no-progress", "--output-folder", str(out)]
        assert evaluate_cli.main(argv + ([] if lr is None else ["--fast-lr", lr])) == 0
        with np.load(out / "results.npz") as results:
            returns[lr] = results["returns"]
            sizes = results["step_sizes"]
    np.testing.assert_allclose(sizes, [0.04, 0.04, 0.02])
    assert "(step sizes 0.04, 0.04, 0.02)" in capsys.readouterr().out
    np.testing.assert_array_equal(returns[None], returns["0.1"])  # 0.1 is the run's fast-lr
    np.testing.assert_array_equal(returns[None][:, 0], returns["0.04"][:, 0])
    assert not np.array_equal(returns[None][:, 1:], returns["0.04"][:, 1:])
    out = tmp_path / "eval-bad"
    out.mkdir()
    argv = ["--run", str(finished_run), "--fast-lr", "0", "--no-progress", "--output-folder"]
    assert evaluate_cli.main([*argv, str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: fast-lr must be > 0, got 0.0"]
    assert list(out.iterdir()) == []


def test_export_policy_re_evaluates_to_the_run(finished_run, tmp_path, capsys):
    """The exported folder holds the policy alone and evaluates exactly as the run does;
    exporting onto it again is refused (exit 2) and leaves it as it was."""
    export_cli = _load_script("export_policy")
    dest = tmp_path / "shipped"
    assert export_cli.main(["--run", str(finished_run), "--output-folder", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["config.yaml", "policy.pt"]
    state = load_checkpoint(dest / "policy.pt")
    assert set(state) == {"params", "iteration", "config"} and state["iteration"] == 2
    results = []
    for run in (finished_run, dest):
        out = tmp_path / f"eval-{run.name}"
        out.mkdir()
        argv = ["--run", str(run), "--num-steps", "1", "--meta-batch-size", "2"]
        assert evaluate_cli.main([*argv, "--num-batches", "1", "--no-progress",
                                  "--output-folder", str(out)]) == 0  # fmt: skip
        with np.load(out / "results.npz") as r:
            results.append(r["returns"])
    np.testing.assert_array_equal(*results)
    before = (dest / "policy.pt").read_bytes()
    capsys.readouterr()
    assert export_cli.main(["--run", str(finished_run), "--output-folder", str(dest)]) == 2
    assert "already holds a policy.pt or config.yaml (--overwrite" in capsys.readouterr().err
    assert (dest / "policy.pt").read_bytes() == before


def test_export_policy_overwrite_replaces_an_export_only(finished_run, tmp_path, capsys):
    """--overwrite replaces an earlier export (and drops its stale evaluation results); a
    training run's folder, the run itself, or an unreadable policy.pt is refused (exit 2)
    and left byte for byte as it was."""
    import shutil

    export_cli = _load_script("export_policy")
    dest = tmp_path / "shipped"
    assert export_cli.main(["--run", str(finished_run), "--output-folder", str(dest)]) == 0
    (dest / "results.csv").write_text("old policy's table")
    (dest / "results.npz").write_bytes(b"old")
    (dest / "README.md").write_text("kept")
    longer = tmp_path / "longer-run"  # the same run later on: other parameters, iteration 5
    longer.mkdir()
    shutil.copy(finished_run / "config.yaml", longer / "config.yaml")
    state = load_checkpoint(finished_run / "policy.pt")
    state["params"] = {k: v + 1.0 for k, v in state["params"].items()}
    state["iteration"] = 5
    torch.save(state, longer / "policy.pt")

    assert export_cli.main(["--run", str(longer), "--output-folder", str(dest), "--overwrite"]) == 0
    shipped = load_checkpoint(dest / "policy.pt")
    assert set(shipped) == {"params", "iteration", "config"} and shipped["iteration"] == 5
    for name, value in state["params"].items():
        torch.testing.assert_close(shipped["params"][name], value, rtol=0, atol=0)
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "config.yaml", "policy.pt"]

    bad = tmp_path / "unreadable"
    bad.mkdir()
    (bad / "policy.pt").write_bytes(b"not a checkpoint")
    refused = {
        finished_run: "is the run itself",  # the run's checkpoint (RNG, optimiser) must stay
        longer: "is a training checkpoint",
        bad: "is not a readable policy",
    }
    twin = tmp_path / "twin"  # another training run, recognised by its events
    shutil.copytree(finished_run, twin)
    refused[twin] = "holds TensorBoard events"
    for folder, reason in refused.items():
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        capsys.readouterr()
        argv = ["--run", str(finished_run), "--output-folder", str(folder), "--overwrite"]
        assert export_cli.main(argv) == 2
        assert reason in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_inspect_curvature_prints_table_and_refuses_bad_input(finished_run, tmp_path, capsys):
    cli = _load_script("inspect_curvature")
    assert cli.main(["--run", str(finished_run), "--meta-batch-size", "2", "--iters", "5"]) == 0
    printed = capsys.readouterr().out
    assert "| data | abs(mean A) / rms A |" in printed
    assert "| 1 in 5 whole episodes, advantages re-centred |" in printed
    assert cli.main(["--run", str(tmp_path)]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert cli.main(["--run", str(finished_run), "--iters", "0"]) == 2
    assert "--iters must be >= 1" in capsys.readouterr().err


def test_plot_run_writes_png_and_refuses_non_run(finished_run, tmp_path, capsys):
    plot_cli = _load_script("plot_run")
    out = tmp_path / "curves.png"
    assert plot_cli.main(["--run", str(finished_run), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_cli.main(["--run", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_run_overlays_several_runs(finished_run, tmp_path, capsys):
    plot_cli = _load_script("plot_run")
    out = tmp_path / "overlay.png"
    argv = ["--run", str(finished_run), str(finished_run), "--tag", "returns/step_0"]
    assert plot_cli.main([*argv, "--smooth", "2", "--labels", "a,b", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = [
        ([*argv, "--output", str(tmp_path / "x.png"), "--smooth", "0"], "smooth must be >= 1"),
        ([*argv, "--output", str(tmp_path / "x.png"), "--labels", "a"], "1 labels for 2 runs"),
        (argv, "--output is needed"),
        (
            ["--run", str(finished_run), "--tag", "no/such", "--output", str(tmp_path / "x.png")],
            "no 'no/such' scalar",
        ),
    ]
    for args, message in bad:
        assert plot_cli.main(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_run_offsets_shift_each_curve(finished_run, tmp_path, capsys, monkeypatch):
    import binom_rl.agents.training as training

    drawn = []
    real_save = training._save_line_plot

    def spy(curves, output, ylabel, **kwargs):
        drawn.append(curves)
        return real_save(curves, output, ylabel, **kwargs)

    monkeypatch.setattr(training, "_save_line_plot", spy)
    plot_cli = _load_script("plot_run")
    out = tmp_path / "shifted.png"
    argv = ["--run", str(finished_run), str(finished_run), "--tag", "returns/step_0"]
    assert plot_cli.main([*argv, "--offsets", "0,7", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (steps_a, values_a, _), (steps_b, values_b, _) = drawn[0]
    scalars = training.read_scalars(finished_run)["returns/step_0"]
    assert steps_a == sorted(scalars) and steps_b == [s + 7 for s in sorted(scalars)]
    assert values_a == values_b == [scalars[s] for s in sorted(scalars)]
    bad = [
        (["--offsets", "0"], "1 offsets for 2 runs"),
        (["--offsets", "0,-3"], "offsets must be >= 0"),
        (["--offsets", "0,x"], "comma-separated integers"),
    ]
    for extra, message in bad:
        assert plot_cli.main([*argv, *extra, "--output", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_moving_average_against_a_direct_mean():
    from binom_rl.agents.training import _moving_average

    values = [3.0, -1.0, 4.0, 1.0, -5.0, 9.0]
    got = _moving_average(values, 3)
    windows = [values[max(0, i - 2) : i + 1] for i in range(len(values))]
    want = [sum(w) / len(w) for w in windows]
    assert got == pytest.approx(want)
    assert _moving_average(values, 1) == values


BINOM_K2 = ["--estimator", "binom", "--order", "1", "--num-steps", "2"]


@pytest.mark.parametrize(
    "flags,noted",
    [
        (BINOM_K2, True),
        ([*BINOM_K2, "--fvp-estimator", "maml"], False),
        ([*BINOM_K2, "--fvp-subsample-by", "steps"], False),
        ([*BINOM_K2, "--fvp-subsample", "1"], False),  # argparse: the last value wins
        (["--estimator", "binom", "--order", "1", "--num-steps", "1"], False),  # exact at K = 1
        (["--num-steps", "2", "--fvp-estimator", "binom", "--fvp-order", "1"], True),
        ([*BINOM_K2, "--outer", "ppo"], False),  # no Fisher
        ([*BINOM_K2, "--trust-region", "pre"], False),  # a Fisher without J products
    ],
)
def test_train_notes_binom_fisher_on_noisy_episodes(tmp_path, capsys, flags, noted, tiny_argv):
    """A valid but measured-to-be-poor setting trains, with a one-line note on stderr."""
    argv = [*tiny_argv, "--num-batches", "1", "--fvp-subsample", "2", *flags]
    assert train_cli.main([*argv, "--output-folder", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert ("note: BinomMAML's own Fisher products" in err) is noted


def test_non_empty_folder_refused(tmp_path, capsys, tiny_argv):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert train_cli.main([*tiny_argv, "--output-folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--resume" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_the_previous_run_only(tmp_path, tiny_argv):
    """--overwrite starts over: the old run's TensorBoard events, checkpoint and evaluation
    results are gone (one run's curves, not two mixed), other files stay."""
    folder = tmp_path / "run"
    assert train_cli.main([*tiny_argv, "--output-folder", str(folder)]) == 0
    assert evaluate_cli.main(["--run", str(folder), "--meta-batch-size", "2", "--num-batches", "1",
                              "--no-progress"]) == 0  # fmt: skip
    (folder / "notes.txt").write_text("keep me")
    old_events = sorted(folder.glob("events.out.tfevents.*"))
    assert len(old_events) == 1 and (folder / "results.csv").is_file()
    argv = [*tiny_argv, "--num-batches", "1", "--output-folder", str(folder), "--overwrite"]
    assert train_cli.main(argv) == 0
    events = sorted(folder.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events != old_events
    assert not (folder / "results.csv").exists() and not (folder / "results.npz").exists()
    assert (folder / "notes.txt").read_text() == "keep me"
    assert load_checkpoint(folder / "policy.pt")["iteration"] == 1


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


BAD_FLAGS = {
    "wrong type": (["--fast-lr", "abc"], "fast-lr must be of type float"),
    "wrong type int": (["--meta-batch-size", "2.5"], "meta-batch-size must be of type int"),
    "non-bool flag": (["--rescale-actions", "1"], "rescale-actions must be true or false"),
    "zero learning rate": (["--fast-lr", "0"], "fast-lr must be > 0"),
    "negative learning rate": (["--fast-lr", "-0.1"], "fast-lr must be > 0"),
    "zero fast batch": (["--fast-batch-size", "0"], "fast-batch-size must be >= 1"),
    "negative meta batch": (["--meta-batch-size", "-3"], "meta-batch-size must be >= 1"),
    "zero max-kl": (["--max-kl", "0"], "max-kl must be > 0"),
    "zero init output scale": (["--init-output-scale", "0"], "init-output-scale must be > 0"),
    "trunc order > steps": (
        ["--estimator", "trunc", "--order", "2", "--num-steps", "1"],
        "order for estimator trunc (num-steps 1): order 2 > 1 inner steps",
    ),
    "binom order > steps": (
        ["--estimator", "binom", "--order", "3", "--num-steps", "2"],
        "order for estimator binom (num-steps 2): order 3 > 2 inner steps",
    ),
    "negative order": (["--estimator", "binom", "--order", "-1"], "order must be >= 0"),
    "unknown estimator": (["--estimator", "sgd"], "estimator must be one of"),
    "unknown fvp estimator": (["--fvp-estimator", "sgd"], "fvp-estimator must be one of"),
    "fvp order > steps": (
        ["--fvp-estimator", "binom", "--fvp-order", "2", "--num-steps", "1"],
        "fvp-order for fvp-estimator binom (num-steps 1): order 2 > 1 inner steps",
    ),
    "unknown hvp mode": (["--hvp-mode", "fast"], "hvp-mode must be one of"),
    "unknown nonlinearity": (["--nonlinearity", "elu"], "nonlinearity must be one of tanh, relu"),
    "zero fvp subsample": (["--fvp-subsample", "0"], "fvp-subsample must be >= 1"),
    "unknown fvp subsample unit": (
        ["--fvp-subsample-by", "samples"],
        "fvp-subsample-by must be one of steps, episodes",
    ),
    "unknown env id": (["--env-name", "binom_rl/Nope-v0"], "binom_rl/HalfCheetahVel-v0"),
    "env without task protocol": (
        ["--env-name", "binom_rl_test_envs:NoTasks-v0"],
        "missing sample_tasks, reset_task",
    ),
    "resume without checkpoint": (["--resume"], "no policy.pt"),
    "unknown sampler": (["--sampler", "spark"], "sampler must be one of local, ray"),
    "ray address without the ray sampler": (
        ["--ray-address", "auto"],
        "ray-address 'auto' needs sampler: ray",
    ),
    "unknown inner loss": (["--inner-loss", "ppg"], "inner-loss must be one of vpg, lvc, dice"),
    "unknown outer": (["--outer", "sgd"], "outer must be one of trpo, ppo"),
    "unknown trust region": (["--trust-region", "mid"], "trust-region must be one of post, pre"),
    "zero clip-eps": (["--outer", "ppo", "--clip-eps", "0"], "clip-eps must be in (0, 1)"),
    "negative outer-lr": (["--outer", "ppo", "--outer-lr", "-0.001"], "outer-lr must be > 0"),
    "zero ppo-steps": (["--outer", "ppo", "--ppo-steps", "0"], "ppo-steps must be >= 1"),
    "negative kl-penalty": (["--kl-penalty", "-0.001"], "kl-penalty must be >= 0"),
    "zero kl-target": (["--kl-target", "0"], "kl-target must be > 0 or null"),
    "kl-target without penalty": (
        ["--kl-target", "0.01", "--kl-penalty", "0"],
        "it needs kl-penalty > 0",
    ),
    "dice on cut episodes": (
        ["--inner-loss", "dice", "--fvp-subsample", "2", "--fvp-subsample-by", "steps"],
        "use fvp-subsample-by episodes",
    ),
}


@pytest.mark.parametrize("flags,message", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_input_exit_2_one_line_nothing_written(
    tmp_path, capsys, monkeypatch, flags, message, tiny_argv
):
    monkeypatch.syspath_prepend(str(HELPERS))
    folder = tmp_path / "run"
    assert train_cli.main([*tiny_argv, *flags, "--output-folder", str(folder)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith("error:") and message in err[0], err[0]
    assert not folder.exists()


def _assert_one_error_line(capsys, message: str, folder: Path) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error:") and message in err[0], err[0]
    assert not folder.exists()


def test_ray_sampler_without_ray_names_the_extra(tmp_path, capsys, monkeypatch, tiny_argv):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    monkeypatch.delitem(sys.modules, "binom_rl.ray_sampler", raising=False)
    monkeypatch.delattr(binom_rl, "ray_sampler", raising=False)  # imported by an earlier test
    folder = tmp_path / "run"
    assert train_cli.main([*tiny_argv, "--sampler", "ray", "--output-folder", str(folder)]) == 2
    _assert_one_error_line(capsys, 'pip install -e ".[ray]"', folder)


def test_unreachable_ray_address_is_one_error_line(tmp_path, capsys, tiny_argv):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()  # a connected process would keep its own cluster
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "run"
    argv = [*tiny_argv, "--sampler", "ray", "--ray-address", f"127.0.0.1:{port}"]
    assert train_cli.main([*argv, "--output-folder", str(folder)]) == 2
    _assert_one_error_line(capsys, f"cannot reach the Ray cluster at 127.0.0.1:{port}", folder)
    assert not ray.is_initialized()


def test_unknown_key_in_yaml_lists_valid_keys(tmp_path, capsys, tiny_argv):
    config = _yaml(tmp_path, "env-name: binom_rl/2DNavigation-v0\nfast-lrr: 0.1\n")
    folder = tmp_path / "run"
    assert train_cli.main([*tiny_argv, "--config", config, "--output-folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "unknown config key 'fast-lrr'" in err[0]
    assert "fast-lr, fast-batch-size" in err[0] and "meta-batch-size" in err[0]
    assert not folder.exists()


@pytest.mark.parametrize(
    "text,message",
    [
        ("fast-lr: [0.1]\n", "fast-lr must be of type float"),
        ("hidden-sizes: [8, 0]\n", "hidden-sizes must be a list of positive ints"),
        ("- just\n- a list\n", "must be a mapping"),
        ("fast-lr: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml(tmp_path, capsys, text, message):
    config = _yaml(tmp_path, text)
    folder = tmp_path / "run"
    assert train_cli.main(["--config", config, "--output-folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not folder.exists()


def test_unknown_flag_exits_2(tmp_path, capsys, tiny_argv):
    folder = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train_cli.main([*tiny_argv, "--fast-lrr", "0.1", "--output-folder", str(folder)])
    assert exc.value.code == 2
    assert "--fast-lrr" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not folder.exists()


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HELPERS), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_user_env_module_id_trains_and_bad_one_is_refused(tmp_path, tiny_argv):
    """A fresh process: a user's env given as `module:EnvId-v0` trains 2 iterations;
    one without the task protocol gets exit 2 and exactly one stderr line."""
    good = tmp_path / "good"
    proc = _run_cli(
        [*tiny_argv, "--env-name", "binom_rl_test_envs:PointGoal-v0", "--output-folder", str(good)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("done:")
    state = load_checkpoint(good / "policy.pt")
    assert state["iteration"] == 2
    assert state["config"]["env-name"] == "binom_rl_test_envs:PointGoal-v0"

    bad = tmp_path / "bad"
    proc = _run_cli(
        [*tiny_argv, "--env-name", "binom_rl_test_envs:NoTasks-v0", "--output-folder", str(bad)],
        tmp_path,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("error:") and "sample_tasks" in err[0]
    assert not bad.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys, tiny_argv):
    folder = tmp_path / "run"
    assert train_cli.main([*tiny_argv, "--device", "cuda", "--output-folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda" in err[0]
    assert not folder.exists()


def test_resume_flags(tmp_path, capsys, tiny_argv):
    """--resume --num-batches N continues a finished run (what compare.py does); changing
    a hyper-parameter on --resume is refused without touching the folder."""
    folder = tmp_path / "run"
    base = [*tiny_argv, "--output-folder", str(folder)]
    assert train_cli.main([*base, "--num-batches", "1"]) == 0
    assert load_checkpoint(folder / "policy.pt")["iteration"] == 1
    capsys.readouterr()

    before = listing(folder)
    resume = ["--output-folder", str(folder), "--resume", "--no-progress", "--torch-threads", "1"]
    assert train_cli.main([*resume, "--fast-lr", "0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fast-lr (saved 0.1, given 0.2)" in err[0], err
    assert listing(folder) == before

    assert train_cli.main([*resume, "--num-batches", "2"]) == 0
    assert load_checkpoint(folder / "policy.pt")["iteration"] == 2


def test_profile_iteration_cli(capsys, tiny_argv):
    script = _load_script("profile_iteration")
    tiny = [a for a in tiny_argv if a not in ("--no-progress",)]
    assert script.main([*tiny, "--iterations", "2", "--skip", "1"]) == 0
    out = capsys.readouterr().out
    assert "| meta-gradient |" in out and "| total |" in out
    assert script.main([*tiny, "--iterations", "1", "--skip", "1"]) == 2
    assert "must exceed skip" in capsys.readouterr().err


def test_resume_of_a_finished_run_has_nothing_to_do(finished_run, capsys):
    """--resume at or past --num-batches: one line saying so, exit 0, nothing written."""
    before = listing(finished_run)
    resume = ["--output-folder", str(finished_run), "--resume", *QUIET]
    for total in (2, 1):
        capsys.readouterr()
        assert train_cli.main([*resume, "--num-batches", str(total)]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert out == [f"run already at iteration 2 of {total}: nothing to do"]
    assert listing(finished_run) == before


@pytest.fixture
def fails_at_iteration_1(monkeypatch):
    """Meta-iteration 1 raises a bug-like error (after iteration 0's checkpoint)."""
    from binom_rl.agents import training

    original = training.MetaLearner.meta_iteration

    def meta_iteration(self, params, iteration, **kwargs):
        if iteration == 1:
            raise ValueError("boom at iteration 1")
        return original(self, params, iteration, **kwargs)

    monkeypatch.setattr(training.MetaLearner, "meta_iteration", meta_iteration)


def test_failure_during_a_run_exit_1_one_line_traceback_in_error_log(
    tmp_path, capsys, tiny_argv, fails_at_iteration_1
):
    folder = tmp_path / "run"
    assert train_cli.main([*tiny_argv, "--output-folder", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ValueError: boom at iteration 1; ")
    assert "policy.pt keeps the last good iteration: --resume continues" in err[0]
    assert err[0].endswith(f"(traceback in {folder / 'error.log'})")
    log = (folder / "error.log").read_text()
    assert log.startswith("Traceback (most recent call last):") and "boom at iteration 1" in log
    assert load_checkpoint(folder / "policy.pt")["iteration"] == 1


def test_failure_traceback_with_verbose(tmp_path, capsys, tiny_argv, fails_at_iteration_1):
    folder = tmp_path / "run"
    argv = [*tiny_argv, "--output-folder", str(folder), "--verbose"]
    assert train_cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-2] == "ValueError: boom at iteration 1"
    assert err[-1].startswith("error: ValueError: boom at iteration 1")


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc/*/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _start_long_run(folder: Path, tiny_argv: list[str]) -> tuple[subprocess.Popen, list[int]]:
    """scripts/train.py of 500 tiny iterations on two sampler workers, in a subprocess, once
    its first checkpoint is written: the process and its workers' pids."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [*tiny_argv, "--num-batches", "500", "--num-workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *argv, "--output-folder", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (folder / "policy.pt").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.2)
        # train -> forkserver -> the two workers
        workers = [w for child in _children(proc.pid) for w in _children(child)]
        assert len(workers) == 2, workers
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, workers


def _stderr_after(proc: subprocess.Popen, stop: Callable[[], None]) -> str:
    """``stop()`` the run, then its stderr once it has exited (killed after 120 s)."""
    try:
        stop()
        return proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _resume_one_more(folder: Path) -> None:
    """--resume continues the stopped run by one iteration from its checkpoint."""
    done = load_checkpoint(folder / "policy.pt")["iteration"]
    assert done >= 1
    resume = ["--output-folder", str(folder), "--resume", *QUIET, "--num-batches", str(done + 1)]
    assert train_cli.main(resume) == 0
    assert load_checkpoint(folder / "policy.pt")["iteration"] == done + 1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_killed_sampler_worker_ends_run_with_one_line_and_resume_continues(tmp_path, tiny_argv):
    """SIGKILL one of two sampler workers mid-run: exit 1, one stderr line naming the dead
    worker, the checkpoint intact; --resume then continues the run."""
    folder = tmp_path / "run"
    proc, workers = _start_long_run(folder, tiny_argv)
    stderr = _stderr_after(proc, lambda: os.kill(workers[0], signal.SIGKILL))
    assert proc.returncode == 1, stderr
    err = stderr.strip().splitlines()
    assert len(err) == 1, stderr
    assert re.match(r"error: sampler worker [01] died \(exit code -9\): SIGKILL; ", err[0]), err[0]
    assert "--resume continues" in err[0] and "error.log" in err[0]
    _resume_one_more(folder)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_run_cleanly_and_resume_continues(tmp_path, tiny_argv):
    """SIGTERM to the run (a cluster scheduler's stop, ``kill PID``): exit 143 with one
    stderr line, no sampler worker left running, no error.log, the checkpoint intact;
    --resume then continues the run."""
    folder = tmp_path / "run"
    proc, workers = _start_long_run(folder, tiny_argv)
    stderr = _stderr_after(proc, lambda: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 143, stderr
    err = stderr.strip().splitlines()
    assert err == [
        f"error: terminated (SIGTERM); {folder / 'policy.pt'} keeps the last good iteration: "
        "--resume continues"
    ], stderr
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers):  # closed, not orphaned
        assert time.monotonic() < deadline, "sampler workers still running 10 s after exit"
        time.sleep(0.1)
    assert not (folder / "error.log").exists()
    _resume_one_more(folder)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_second_process_on_a_running_folder_is_refused(tmp_path, capsys, tiny_argv):
    """train --resume or --overwrite on the folder of a run still going: exit 2 with one line
    naming the running process, its files untouched and the run going on; once it has
    stopped, its lock is gone and --resume continues it."""
    folder = tmp_path / "run"
    proc, _ = _start_long_run(folder, tiny_argv)
    try:
        for flag in ("--resume", "--overwrite"):
            events = sorted(folder.glob("events.out.tfevents.*"))
            argv = [*tiny_argv, *QUIET, "--num-batches", "500", flag] if flag == "--overwrite" \
                else ["--resume", *QUIET]  # fmt: skip
            assert train_cli.main([*argv, "--output-folder", str(folder)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [
                f"error: {folder} is in use by another training process (pid {proc.pid}): wait "
                "for it to end, or stop it (SIGTERM keeps its last checkpoint) and train again"
            ], err
            assert sorted(folder.glob("events.out.tfevents.*")) == events
            assert (folder / "policy.pt").is_file() and proc.poll() is None
        done = load_checkpoint(folder / "policy.pt")["iteration"]
        deadline = time.monotonic() + 60
        while load_checkpoint(folder / "policy.pt")["iteration"] == done:  # still training
            assert time.monotonic() < deadline and proc.poll() is None, "the run stopped"
            time.sleep(0.2)
    finally:
        stderr = _stderr_after(proc, lambda: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 143, stderr
    assert not (folder / ".train.lock").exists()
    _resume_one_more(folder)


def test_success_tags_and_evaluate_success_column_on_the_test_split(
    tmp_path, capsys, monkeypatch, tiny_argv
):
    monkeypatch.syspath_prepend(str(HELPERS))
    import binom_rl_test_envs as helper_envs

    folder = tmp_path / "run"
    # the tiny run's sizes (its horizon 10 is the env's own) on an env that reports success
    argv = [*tiny_argv, "--env-name", "binom_rl_test_envs:SuccessPointGoal-v0"]
    assert train_cli.main([*argv, "--output-folder", str(folder)]) == 0
    from binom_rl.agents.training import read_scalars

    scalars = read_scalars(folder)
    for k in (0, 1):  # fraction of the 3 x 4 episodes: a multiple of 1/12 in [0, 1]
        values = np.array(list(scalars[f"success/step_{k}"].values()))
        assert len(values) == 2 and np.allclose(values * 12, np.round(values * 12))
        assert ((0 <= values) & (values <= 1)).all()

    drawn = []
    original = helper_envs.SuccessPointGoalEnv.sample_test_tasks

    def spy(self, num_tasks):
        tasks = original(self, num_tasks)
        drawn.extend(tasks)
        return tasks

    monkeypatch.setattr(helper_envs.SuccessPointGoalEnv, "sample_test_tasks", spy)
    capsys.readouterr()
    argv = ["--run", str(folder), "--num-steps", "1", "--meta-batch-size", "5"]
    assert evaluate_cli.main([*argv, "--num-batches", "2", "--no-progress"]) == 0
    assert len(drawn) == 10 and all(t["goal"] > 0 for t in drawn)  # the held-out split
    printed = capsys.readouterr().out
    assert "| steps | mean return | std. error | success rate | std. error |" in printed
    with np.load(folder / "results.npz") as results:
        success = results["success"]
        assert success.shape == (10, 2) and np.allclose(success * 4, np.round(success * 4))
        np.testing.assert_allclose(results["success_mean"], success.mean(0))
    with open(folder / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"step", "mean_return", "stderr", "success_rate", "success_stderr"}
    assert [float(r["success_rate"]) for r in rows] == pytest.approx(success.mean(0), abs=1e-4)


def test_metaworld_without_the_extra_exit_2_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "metaworld", None)  # as if not installed
    folder = tmp_path / "run"
    config = str(ROOT / "configs" / "metaworld-ml1-reach.yaml")
    assert train_cli.main(["--config", config, "--output-folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "[metaworld]" in err[0], err
    assert not folder.exists()


def test_profile_iteration_cli_several_configs_and_estimators(tmp_path, capsys, tiny_argv):
    """Two configs x two estimators: four columns, and the ratio row."""
    script = _load_script("profile_iteration")
    tiny = [a for a in tiny_argv if a not in ("--no-progress",)]
    ppo = _yaml(tmp_path, "outer: ppo\nppo-steps: 2\n")
    trpo = tmp_path / "b.yaml"
    trpo.write_text("outer: trpo\n")
    argv = [*tiny, "--config", ppo, "--config", str(trpo)]
    assert script.main([*argv, "--estimators", "maml,fomaml", "--iterations", "2",
                        "--skip", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| phase |"))
    assert header.count(" share |") == 4 and "config maml s" in header and "b fomaml s" in header
    assert "| Adam updates |" in out and "| line search |" in out
    assert out.rstrip().splitlines()[-1].startswith("| total / first | 1.00 |")
    assert script.main([*argv, "--estimators", "binom:3", "--num-steps", "1"]) == 2
    assert "order 3 > 1 inner steps" in capsys.readouterr().err
