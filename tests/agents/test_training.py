"""agents.training.train at tiny sizes: exact resume, files written, NaN handling."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from binom_rl.agents import maml_trpo, training
from binom_rl.agents.losses import PolicyLosses
from binom_rl.agents.maml_trpo import MetaLearner, NonFiniteError, derive_seed
from binom_rl.agents.training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOCK_FILE,
    RunComplete,
    open_sampler,
    run_lock,
    train,
)
from binom_rl.checkpoint import load_checkpoint
from binom_rl.config import Config, ConfigError, load_yaml
from tests.helpers.files import listing


@pytest.fixture(scope="session")
def _cfg(tiny_config):
    """``_cfg(**overrides)``: the tiny run, 4 iterations, seed 7."""

    def make(**overrides) -> Config:
        return Config.from_dict(tiny_config(**{"num_batches": 4, "seed": 7, **overrides}))

    return make


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / CHECKPOINT_FILE)["params"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, _cfg):
    """An uninterrupted 4-iteration run (shared by the resume tests)."""
    folder = tmp_path_factory.mktemp("straight")
    metrics = train(_cfg(), folder, progress=False)
    return folder, metrics


def test_resume_equals_uninterrupted(straight_run, tmp_path, _cfg):
    straight, _ = straight_run
    train(_cfg(), tmp_path, progress=False, stop_after=2)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["iteration"] == 2
    train(_cfg(), tmp_path, resume=True, progress=False)
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert state["iteration"] == 4
    expected = _params(straight)
    for k, v in expected.items():
        torch.testing.assert_close(state["params"][k], v, rtol=0, atol=0)


def test_resume_with_more_batches_continues(straight_run, tmp_path, _cfg):
    """A finished 2-iteration run resumed with num-batches 4 runs iterations 2 and 3 and
    lands exactly where the straight 4-iteration run does."""
    straight, _ = straight_run
    train(_cfg(num_batches=2), tmp_path, progress=False)
    metrics = train(_cfg(num_batches=4), tmp_path, resume=True, progress=False)
    assert metrics, "the resumed run did not run any iteration"
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert state["iteration"] == 4
    assert load_yaml(tmp_path / CONFIG_FILE)["num-batches"] == 4
    for k, v in _params(straight).items():
        torch.testing.assert_close(state["params"][k], v, rtol=0, atol=0)


def test_resume_refuses_a_changed_hyperparameter(straight_run, _cfg):
    straight, _ = straight_run
    before = listing(straight)
    with pytest.raises(ConfigError, match="fast-lr"):
        train(_cfg(fast_lr=0.2), straight, resume=True, progress=False)
    assert listing(straight) == before


def test_resume_of_a_finished_run_raises_run_complete_and_writes_nothing(straight_run, _cfg):
    straight, _ = straight_run
    before = listing(straight)
    for total in (4, 3):  # at and past num-batches
        with pytest.raises(RunComplete, match=f"run already at iteration 4 of {total}"):
            train(_cfg(num_batches=total), straight, resume=True, progress=False)
    assert listing(straight) == before


def test_a_folder_held_by_another_run_is_refused_and_left_as_it_is(straight_run, _cfg):
    """While a run holds the folder (here this process, through a second open of the lock
    file: flock locks belong to the open file, not the process), --resume and --overwrite
    are refused naming its pid, and nothing in the folder changes."""
    straight, _ = straight_run
    before = listing(straight)
    with run_lock(straight):
        assert (straight / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        held = listing(straight)
        message = rf"in use by another training process \(pid {os.getpid()}\)"
        for kwargs in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(ConfigError, match=message):
                train(_cfg(num_batches=5), straight, progress=False, **kwargs)
        assert listing(straight) == held
    assert listing(straight) == before  # the lock file goes with the lock


def test_a_killed_holder_leaves_no_lock(tmp_path, _cfg):
    """A process SIGKILLed while it holds the folder leaves its lock file but no lock: the
    next run trains there (the stale file does not count as a previous run) and removes it."""
    folder = tmp_path / "run"
    holder = (
        "import os, signal, sys; from binom_rl.agents.training import run_lock; "
        "held = run_lock(sys.argv[1]); held.__enter__(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", holder, str(folder)], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in folder.iterdir()] == [LOCK_FILE]
    train(_cfg(num_batches=1), folder, progress=False)
    assert load_checkpoint(folder / CHECKPOINT_FILE)["iteration"] == 1
    assert not (folder / LOCK_FILE).exists()


def test_a_lock_won_on_a_removed_lock_file_is_taken_again(tmp_path, monkeypatch):
    """The holder ends between our open and our flock (it removes its file, then unlocks):
    the flock we then win is on a file no longer in the folder, so the lock is taken again
    on a new file, and the file in the folder is the one held."""
    real_flock, held = fcntl.flock, []

    def flock(fd, operation):
        if not held:
            (tmp_path / LOCK_FILE).unlink()
        held.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(training.fcntl, "flock", flock)
    with run_lock(tmp_path):
        assert len(held) == 2
        assert os.fstat(held[1]).st_ino == (tmp_path / LOCK_FILE).stat().st_ino
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_bad_input_removes_the_folders_it_created(tmp_path, _cfg):
    """A run refused inside the lock (an unknown env id, found by the sampler) leaves no
    folder of those it made for the run, and the folder that was there as it was."""
    with pytest.raises(ConfigError, match="binom_rl/Nope-v0"):
        train(_cfg(env_name="binom_rl/Nope-v0"), tmp_path / "a" / "b" / "run", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_run_folder_contents(straight_run, _cfg):
    folder, metrics = straight_run
    assert (folder / CONFIG_FILE).is_file()
    assert Config.from_dict(load_yaml(folder / CONFIG_FILE)) == _cfg()
    state = load_checkpoint(folder / CHECKPOINT_FILE)
    assert state["iteration"] == 4
    assert set(state["params"]) == set(MetaLearner(_cfg(), _FakeSampler()).init_params(0))
    assert list(folder.glob("events.out.tfevents.*"))
    assert metrics["returns/step_1"] == state["metrics"]["returns/step_1"]


class _FakeSampler:
    """Just the spaces a MetaLearner needs to build its policy."""

    def __init__(self):
        import gymnasium as gym

        import binom_rl.envs  # noqa: F401  (registers the ids)

        env = gym.make("binom_rl/2DNavigation-v0")
        self.observation_space, self.action_space = env.observation_space, env.action_space
        env.close()


def test_nan_stops_with_last_good_checkpoint(tmp_path, monkeypatch, _cfg):
    """NaN in the outer loss on the 2nd iteration: NonFiniteError naming where it
    surfaces first (the meta-gradient, i.e. the outer loss' gradient), and
    policy.pt keeps the params of the 1st (last good) iteration."""
    current = {"iteration": -1}
    returned: list[dict] = []
    orig_iteration, orig_surrogate = MetaLearner.meta_iteration, PolicyLosses.surrogate

    def meta_iteration(self, params, iteration, diagnose=False):
        current["iteration"] = iteration
        new_params, metrics = orig_iteration(self, params, iteration, diagnose)
        returned.append({k: v.detach().clone() for k, v in new_params.items()})
        return new_params, metrics

    def surrogate(self, dist, data):
        loss = orig_surrogate(self, dist, data)
        return loss * float("nan") if current["iteration"] == 1 else loss

    monkeypatch.setattr(MetaLearner, "meta_iteration", meta_iteration)
    monkeypatch.setattr(PolicyLosses, "surrogate", surrogate)
    with pytest.raises(NonFiniteError, match="meta-gradient"):
        train(_cfg(), tmp_path, progress=False)
    assert len(returned) == 1
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert state["iteration"] == 1
    for k, v in returned[0].items():
        torch.testing.assert_close(state["params"][k], v, rtol=0, atol=0)
    assert all(torch.isfinite(v).all() for v in state["params"].values())
    # loadable into a policy: one forward pass on an observation
    learner = MetaLearner(_cfg(), _FakeSampler())
    learner.policy.log_prob(state["params"], torch.zeros(1, 2), torch.zeros(1, 2))


def test_check_finite_names_the_place():
    with pytest.raises(NonFiniteError, match="meta-gradient"):
        maml_trpo._check_finite("meta-gradient", {"w": torch.tensor([1.0, float("inf")])})


def test_training_passes_rescale_and_clip_actions_to_the_sampler(tmp_path, monkeypatch, _cfg):
    seen = []
    original = maml_trpo.MetaLearner.__init__

    def spy(self, cfg, sampler, policy=None):
        seen.append((sampler._action_scale, sampler._action_bounds))
        original(self, cfg, sampler, policy)

    monkeypatch.setattr(maml_trpo.MetaLearner, "__init__", spy)
    train(_cfg(num_batches=1), tmp_path / "on", progress=False)
    train(
        _cfg(num_batches=1, rescale_actions=False, clip_actions=False),
        tmp_path / "off",
        progress=False,
    )
    (scale, offset), (low, high) = seen[0]  # 2D navigation: [-1, 1] -> [-0.1, 0.1]
    torch.testing.assert_close(torch.as_tensor(scale), torch.full((2,), 0.1))
    torch.testing.assert_close(torch.as_tensor(offset), torch.zeros(2))
    torch.testing.assert_close(torch.as_tensor(high), torch.full((2,), 0.1))
    torch.testing.assert_close(torch.as_tensor(low), torch.full((2,), -0.1))
    assert seen[1] == (None, None)
    saved = load_yaml(tmp_path / "on" / CONFIG_FILE)
    assert saved["rescale-actions"] is True and saved["clip-actions"] is True


def test_runs_saved_before_newer_keys_load_with_their_old_behaviour(straight_run, tmp_path):
    from binom_rl.agents.evaluation import load_run

    folder, _ = straight_run

    def saved_run(name: str, raw: dict) -> Path:
        """A run folder with ``raw`` as its config and the straight run's checkpoint."""
        run = tmp_path / name
        run.mkdir()
        (run / CONFIG_FILE).write_text(yaml.safe_dump(raw))
        (run / CHECKPOINT_FILE).write_bytes((folder / CHECKPOINT_FILE).read_bytes())
        return run

    raw = load_yaml(folder / CONFIG_FILE)
    assert raw.pop("rescale-actions") is True
    raw.pop("fvp-subsample-by")
    assert raw.pop("clip-actions") is True
    cfg, _ = load_run(saved_run("old-run", raw))
    # what that run did, not today's defaults
    assert cfg.rescale_actions is False and cfg.fvp_subsample_by == "episodes"
    assert cfg.clip_actions is False
    assert load_run(folder)[0].rescale_actions is True
    assert Config.from_dict(raw).rescale_actions is True
    # a saved value always wins over the legacy default
    steps = saved_run("steps-run", {**raw, "fvp-subsample-by": "steps"})
    assert load_run(steps)[0].fvp_subsample_by == "steps"


def _write_scalars(folder, scalars: dict[str, list[float]]) -> None:
    """TensorBoard events holding ``tag: [value at iteration 0, 1, ...]``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(folder)) as writer:
        for tag, values in scalars.items():
            for i, value in enumerate(values):
                writer.add_scalar(tag, value, i)


def test_env_steps_sampled_counts_the_logged_episode_lengths(tmp_path, tiny_config):
    """meta-batch 3 x fast-batch 4 episodes per step, K = 1: iteration i samples
    12 x (length_step_0[i] + length_step_1[i]) env steps, summed by hand here."""
    from binom_rl.agents.training import _env_steps_sampled, read_scalars
    from binom_rl.config import Config, save_config

    save_config(Config.from_dict(tiny_config()), tmp_path / "config.yaml")
    _write_scalars(tmp_path, {
        "returns/step_0": [0.0, 0.0, 0.0], "returns/step_1": [0.0, 0.0, 0.0],
        "episodes/length_step_0": [10.0, 7.5, 4.0], "episodes/length_step_1": [9.0, 6.0, 2.25],
    })  # fmt: skip
    got = _env_steps_sampled(tmp_path, read_scalars(tmp_path))
    assert got.exact
    assert got.iterations.tolist() == [0, 1, 2, 3]
    assert got.steps.tolist() == [0.0, 12 * 19.0, 12 * 19.0 + 12 * 13.5, 12 * (19 + 13.5 + 6.25)]


def test_env_steps_sampled_without_lengths_is_the_full_horizon_bound(tmp_path, tiny_config):
    """A run that logged no episode lengths (or not at every iteration): meta-batch 3 x
    fast-batch 4 x (K + 1 = 2) x horizon 10 per iteration, marked inexact; none without a
    horizon, a config or any iteration."""
    from binom_rl.agents.training import _env_steps_sampled, read_scalars
    from binom_rl.config import Config, save_config

    save_config(Config.from_dict(tiny_config()), tmp_path / "config.yaml")
    _write_scalars(tmp_path, {
        "returns/step_0": [0.0, 0.0],
        "episodes/length_step_0": [10.0], "episodes/length_step_1": [9.0],
    })  # fmt: skip
    scalars = read_scalars(tmp_path)
    got = _env_steps_sampled(tmp_path, scalars)
    assert not got.exact
    assert got.steps.tolist() == [0.0, 240.0, 480.0]
    save_config(Config.from_dict(tiny_config(max_episode_steps=None)), tmp_path / "config.yaml")
    assert _env_steps_sampled(tmp_path, scalars) is None
    assert _env_steps_sampled(tmp_path, {}) is None
    assert _env_steps_sampled(tmp_path / "missing", scalars) is None


def test_interpolate_continues_the_end_segments():
    """Inside: np.interp; outside: the first and last segments' lines, so the env-steps
    axis stays invertible over a plot's margins."""
    from binom_rl.agents.training import _interpolate

    xp, fp = np.array([0.0, 1.0, 3.0]), np.array([0.0, 2.0, 3.0])
    got = _interpolate(np.array([-1.0, 0.5, 2.0, 5.0]), xp, fp)
    assert got.tolist() == [-2.0, 1.0, 2.5, 4.0]
    assert _interpolate(got, fp, xp).tolist() == [-1.0, 0.5, 2.0, 5.0]


def test_plot_training_curves_writes_a_png(tmp_path, tiny_config):
    from binom_rl.agents.training import plot_training_curves
    from binom_rl.config import Config, save_config

    save_config(Config.from_dict(tiny_config()), tmp_path / "config.yaml")
    _write_scalars(tmp_path, {
        "returns/step_0": [-3.0, -2.0], "returns/step_1": [-2.0, -1.0],
        "episodes/length_step_0": [10.0, 8.0], "episodes/length_step_1": [9.0, 7.0],
    })  # fmt: skip
    out = plot_training_curves(tmp_path, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_init_policy_starts_from_the_named_policy(straight_run, tmp_path, _cfg):
    """init-policy: the first iteration samples with the named run's parameters (its
    pre-update return equals that of MetaLearner.adapt with them on the iteration's tasks
    and seeds), not with a fresh initialisation; a run folder and its policy.pt give the
    same run."""
    straight, _ = straight_run
    cfg = _cfg(num_batches=1, init_policy=str(straight))
    metrics = train(cfg, tmp_path / "from-folder", progress=False)
    with open_sampler(cfg) as sampler:
        learner = MetaLearner(cfg, sampler)
        tasks = sampler.sample_tasks(cfg.meta_batch_size, seed=derive_seed(cfg.seed, 0, 0))
        adaptation = learner.adapt(
            _params(straight), tasks, cfg.num_steps, seed=derive_seed(cfg.seed, 0, 1)
        )
    assert metrics["returns/step_0"] == float(adaptation.episodes[0].returns.mean())
    fresh = train(_cfg(num_batches=1), tmp_path / "fresh", progress=False)
    assert fresh["returns/step_0"] != metrics["returns/step_0"]
    from_file = _cfg(num_batches=1, init_policy=str(straight / CHECKPOINT_FILE))
    train(from_file, tmp_path / "from-file", progress=False)
    for k, v in _params(tmp_path / "from-folder").items():
        torch.testing.assert_close(_params(tmp_path / "from-file")[k], v, rtol=0, atol=0)
    assert load_yaml(tmp_path / "from-folder" / CONFIG_FILE)["init-policy"] == str(straight)


def test_init_policy_refuses_a_missing_foreign_or_mismatched_policy(straight_run, tmp_path, _cfg):
    """Each case is a ConfigError naming the problem, raised before the run folder exists."""
    straight, _ = straight_run
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    cases = [
        (_cfg(init_policy=str(tmp_path / "nowhere")), "neither a policy.pt nor a run folder"),
        (_cfg(init_policy=str(junk)), "not a checkpoint"),
        (_cfg(init_policy=str(straight), hidden_sizes=[16]), "parameter shapes .* differ"),
        (_cfg(init_policy=str(straight), nonlinearity="relu"), "nonlinearity 'tanh'"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=f"init-policy .*{message}"):
            train(cfg, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
