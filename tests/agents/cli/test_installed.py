"""The commands from a non-editable install, away from any checkout: ``binom-rl-compare``
trains and evaluates its runs through the installed package."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "binom_rl", "envs", "agents")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """``pip install --target`` of a copy of the sources (the checkout gets no build files);
    returns the environment that runs the installed commands (dependencies: this one's)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    target = tmp / "site"
    # this environment's setuptools where it has one (no download); else pip's isolated build
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation,
         "--no-compile", "--target", str(target), str(src)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    env["PATH"] = os.pathsep.join([str(target / "bin"), env.get("PATH", "")])
    return env


@pytest.mark.slow
def test_compare_runs_from_a_non_editable_install(installed, tmp_path, tiny_flags):
    where = subprocess.run(
        [sys.executable, "-c", "import binom_rl.agents.cli.compare as m; print(m.__file__)"],
        env=installed, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(installed["PYTHONPATH"]), where  # the install, not the checkout
    compare = shutil.which("binom-rl-compare", path=installed["PATH"])
    assert compare is not None and compare.startswith(installed["PYTHONPATH"])
    argv = [
        compare, "--estimators", "fomaml", "--seeds", "0", "--output-folder", "cmp",
        *tiny_flags(num_batches=1, num_steps=1), "--eval-num-steps", "1",
        "--eval-meta-batch-size", "2", "--eval-num-batches", "1", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(
        argv, env=installed, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "cmp" / "summary.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["method"] == "fomaml" and row["seeds"] == "1"
    float(row["return_step_0"]), float(row["return_step_1"])  # evaluated
    log = (tmp_path / "cmp" / "fomaml_seed0" / "train.log").read_text()
    assert "-m binom_rl.agents.cli.train" in log and "-m binom_rl.agents.cli.evaluate" in log
