"""Training with the Ray sampler on a user's ``module:EnvId-v0`` env: the run equals the
local sampler's run; a killed actor stops it with one error, the checkpoint stays intact
and resuming lands exactly where the uninterrupted run does; Ctrl-C ends the run, its
actors and the Ray instance it started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from binom_rl import ray_sampler  # noqa: E402  (needs ray)
from binom_rl.agents.maml_trpo import MetaLearner  # noqa: E402
from binom_rl.agents.training import CHECKPOINT_FILE, read_scalars, train  # noqa: E402
from binom_rl.checkpoint import load_checkpoint  # noqa: E402
from binom_rl.config import Config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "helpers"
TINY = {
    "env-name": "binom_rl_test_envs:Countdown-v0",  # episodes of 1..10 steps
    "hidden-sizes": [8],
    "meta-batch-size": 3,
    "fast-batch-size": 4,
    "num-batches": 3,
    "cg-iters": 3,
    "seed": 7,
}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray_sampler.reuse_actors = True  # an actor takes seconds to start on a busy machine
    yield
    ray_sampler.reuse_actors = False
    ray_sampler.release_idle_actors()
    ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread_and_helpers(monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**overrides) -> Config:
    return Config.from_dict({**TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}})


def _learning_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every logged scalar but the timings and memory, which differ run to run."""
    return {t: v for t, v in read_scalars(folder).items() if not t.startswith(("time/", "memory/"))}


def test_ray_run_equals_local_and_resumes_after_a_killed_actor(tmp_path, monkeypatch):
    local = tmp_path / "local"
    train(_cfg(), local, progress=False)

    killed: list[int] = []
    original = MetaLearner.meta_iteration

    def meta_iteration(self, params, iteration, diagnose=False):
        if iteration == 2 and not killed:  # actor 1 dies before iteration 2 samples
            killed.append(self.sampler._workers[1].pid)
            os.kill(killed[0], signal.SIGKILL)
        return original(self, params, iteration, diagnose)

    monkeypatch.setattr(MetaLearner, "meta_iteration", meta_iteration)
    remote, cfg = tmp_path / "ray", _cfg(sampler="ray", num_workers=2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker 1 \\(a Ray actor\\) died.*--resume continues"):
        train(cfg, remote, progress=False)
    assert killed and time.monotonic() - start < 120
    state = load_checkpoint(remote / CHECKPOINT_FILE)
    assert state["iteration"] == 2  # iterations 0 and 1, intact

    train(cfg, remote, resume=True, progress=False)
    expected, state = (
        load_checkpoint(local / CHECKPOINT_FILE),
        load_checkpoint(remote / CHECKPOINT_FILE),
    )
    assert state["iteration"] == 3 and state["config"]["sampler"] == "ray"
    for k, v in expected["params"].items():
        torch.testing.assert_close(state["params"][k], v, rtol=0, atol=0)
    scalars = _learning_scalars(remote)
    assert scalars == _learning_scalars(local) and len(scalars["returns/step_1"]) == 3

    # the sampler is a resumable key: the local run goes on on Ray
    train(_cfg(sampler="ray", num_workers=2, num_batches=4), local, resume=True, progress=False)
    assert load_checkpoint(local / CHECKPOINT_FILE)["iteration"] == 4


def _ray_processes(temp_dir: str) -> list[str]:
    """Command lines of the running processes that belong to the Ray instance whose
    session lives under ``temp_dir``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if temp_dir in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_run_its_actors_and_its_ray(tmp_path, how):
    """scripts/train.py --sampler ray starts its own Ray; Ctrl-C (SIGINT to its process
    group, as a terminal sends it) or SIGTERM to the driver alone (``kill PID``) while it
    trains ends all of it and keeps the checkpoint."""
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths
    folder = tmp_path / "run"
    path = os.pathsep.join(filter(None, [str(HELPERS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    argv = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--sampler",
        "ray",
        "--num-workers",
        "2",
        "--output-folder",
        str(folder),
        "--no-progress",
        "--torch-threads",
        "1",
        *[f"--{k}={v}" for k, v in TINY.items()],
        "--num-batches=1000",
        "--hidden-sizes=[8]",
    ]
    # SIGINT's default disposition in the child, as a terminal's process has it: a suite
    # started in the background (nohup ... &) inherits SIGINT ignored, and there the run
    # did not stop on this test's Ctrl-C within 60 s.
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (folder / CHECKPOINT_FILE).exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        assert _ray_processes(temp_dir), "the run's Ray instance is not running"
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        stopped = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and stopped < 30, (proc.returncode, stopped, err[-2000:])
    if how == "sigterm":
        assert proc.returncode == 143 and "error: terminated (SIGTERM)" in err, err[-2000:]
    deadline = time.monotonic() + 10
    while _ray_processes(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ray_processes(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert load_checkpoint(folder / CHECKPOINT_FILE)["iteration"] >= 1
