"""Meta-test step sizes: the schedule, its effect on the inner steps (against a gradient
step computed by hand from the stored inner data), and that only steps beyond K change.
Episode lengths, in evaluation and in the training metrics, against the tasks' own ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from binom_rl.agents.evaluation import (
    adaptation_step_sizes,
    evaluate_adaptation,
    format_table,
    write_results,
)
from binom_rl.agents.maml_trpo import MetaLearner, derive_seed
from binom_rl.config import Config, ConfigError
from binom_rl.metagrad import task_gradients
from binom_rl.sampler import MultiTaskSampler

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
COUNTDOWN = "binom_rl_test_envs:Countdown-v0"  # a task's episodes end after task["steps"]


@pytest.mark.parametrize(
    "num_train_steps,num_steps,decay,expected",
    [
        (1, 3, 0.5, [0.1, 0.05, 0.025]),
        (1, 1, 0.5, [0.1]),
        (3, 3, 0.5, [0.1, 0.1, 0.1]),
        (2, 4, 0.25, [0.1, 0.1, 0.025, 0.00625]),
        (1, 3, 1.0, [0.1, 0.1, 0.1]),
    ],
)
def test_adaptation_step_sizes(tiny_config, num_train_steps, num_steps, decay, expected):
    cfg = Config.from_dict(tiny_config(num_steps=num_train_steps, fast_lr=0.1))
    assert adaptation_step_sizes(cfg, num_steps, decay) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5, float("nan")])
def test_adaptation_step_sizes_reject_a_bad_decay(tiny_config, decay):
    with pytest.raises(ConfigError, match="step-size-decay must be in \\(0, 1\\]"):
        adaptation_step_sizes(Config.from_dict(tiny_config()), 3, decay)


def test_each_inner_step_takes_its_own_size(tiny_config):
    """phi_{k+1} = phi_k - a_k grad L_in(phi_k), the gradient taken afresh from the stored
    inner batch of step k."""
    cfg = Config.from_dict(tiny_config(seed=2))
    with MultiTaskSampler(cfg.env_name, max_episode_steps=cfg.max_episode_steps) as sampler:
        learner = MetaLearner(cfg, sampler)
        params = learner.init_params(cfg.seed)
        tasks = sampler.sample_tasks(3, seed=5)
        sizes = [0.1, 0.03]
        result = learner.adapt(params, tasks, 2, seed=7, step_sizes=sizes)
        for k, a in enumerate(sizes):
            grads = task_gradients(learner.inner_loss, result.path[k], result.inner_data[k])
            for name, value in result.path[k + 1].items():
                expected = result.path[k][name] - a * grads[name]
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
        with pytest.raises(ValueError, match="1 step sizes for 2 inner steps"):
            learner.adapt(params, tasks, 2, seed=7, step_sizes=[0.1])


def test_the_decay_changes_only_the_steps_beyond_training(tiny_config):
    """K = 1: the same test tasks and episodes give the same returns after 0 and 1 steps
    with any decay; after 2 and 3 steps they differ, and the step sizes are recorded."""
    cfg = Config.from_dict(tiny_config(num_steps=1, fast_lr=0.5))
    with MultiTaskSampler(cfg.env_name, max_episode_steps=cfg.max_episode_steps) as sampler:
        params = MetaLearner(cfg, sampler).init_params(0)
    sizes = dict(num_steps=3, meta_batch_size=3, num_batches=1, seed=11, progress=False)
    halving = evaluate_adaptation(cfg, params, step_size_decay=0.5, **sizes)
    fixed = evaluate_adaptation(cfg, params, step_size_decay=1.0, **sizes)
    assert halving.step_sizes == pytest.approx((0.5, 0.25, 0.125))
    assert fixed.step_sizes == pytest.approx((0.5, 0.5, 0.5))
    np.testing.assert_array_equal(halving.returns[:, :2], fixed.returns[:, :2])
    assert not np.allclose(halving.returns[:, 2:], fixed.returns[:, 2:])


@pytest.fixture
def countdown_config(tiny_config, monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    return Config.from_dict(tiny_config(env_name=COUNTDOWN, seed=3))  # horizon 10


def _expected_lengths(sampler, num_tasks, seed, split, horizon):
    """min(task["steps"], horizon) of each task the seed draws: Countdown's episodes end
    there whatever the actions."""
    tasks = sampler.sample_tasks(num_tasks, seed=seed, split=split)
    return np.array([min(t["steps"], horizon) for t in tasks], dtype=np.float64)


def test_evaluation_reports_each_tasks_episode_length(countdown_config, tmp_path):
    """Evaluation.lengths[i, k]: the mean length of test task i's episodes after k steps,
    the task's own end; written to results.npz and printed as a column while some
    episode ends before the horizon."""
    cfg = countdown_config
    with MultiTaskSampler(cfg.env_name) as sampler:
        params = MetaLearner(cfg, sampler).init_params(0)
        expected = np.concatenate([
            _expected_lengths(sampler, 4, derive_seed(11, b, 0), "test", 10) for b in range(2)
        ])  # fmt: skip
    result = evaluate_adaptation(
        cfg, params, num_steps=2, meta_batch_size=4, num_batches=2, seed=11, progress=False
    )
    assert expected.min() < 10 and expected.max() == 10  # some end early, some do not
    np.testing.assert_array_equal(result.lengths, np.repeat(expected[:, None], 3, axis=1))
    summary = write_results(tmp_path, result.returns, None, result.step_sizes, result.lengths)
    with np.load(tmp_path / "results.npz") as saved:
        np.testing.assert_array_equal(saved["lengths"], result.lengths)
        np.testing.assert_allclose(saved["length_mean"], [expected.mean()] * 3)
    table = format_table(summary, 8, result.step_sizes, horizon=10)
    assert "| mean episode length |" in table
    assert f" {expected.mean():.1f} |\n" in table
    full = [{**row, "mean_length": 10.0} for row in summary]
    assert "length" not in format_table(full, 8, horizon=10)  # every episode ran the horizon


def test_training_logs_the_episode_length_of_each_step(countdown_config):
    """episodes/length_step_k of a meta-iteration: the mean over its tasks of their ends."""
    cfg = countdown_config
    with MultiTaskSampler(cfg.env_name, max_episode_steps=cfg.max_episode_steps) as sampler:
        learner = MetaLearner(cfg, sampler)
        _, metrics = learner.meta_iteration(learner.init_params(cfg.seed), iteration=1)
        expected = _expected_lengths(
            sampler, cfg.meta_batch_size, derive_seed(cfg.seed, 1, 0), "train", 10
        ).mean()
    assert metrics["episodes/length_step_0"] == pytest.approx(expected, rel=1e-12)
    assert metrics["episodes/length_step_1"] == pytest.approx(expected, rel=1e-12)


def test_on_batch_sees_each_batchs_test_tasks_and_episodes(countdown_config):
    """on_batch(tasks, result) is called once per batch, in order, with the test tasks the
    batch's seed draws and the episodes the table's returns and lengths are the means of."""
    cfg = countdown_config
    with MultiTaskSampler(cfg.env_name) as sampler:
        params = MetaLearner(cfg, sampler).init_params(0)
        expected_tasks = [
            sampler.sample_tasks(4, seed=derive_seed(11, b, 0), split="test") for b in range(2)
        ]
    seen = []
    result = evaluate_adaptation(
        cfg, params, num_steps=2, meta_batch_size=4, num_batches=2, seed=11, progress=False,
        on_batch=lambda tasks, adaptation: seen.append((tasks, adaptation)),
    )  # fmt: skip
    assert [tasks for tasks, _ in seen] == expected_tasks
    assert all(len(adaptation.episodes) == 3 for _, adaptation in seen)  # steps 0, 1, 2
    for field, table in (("returns", result.returns), ("lengths", result.lengths)):
        means = np.concatenate([
            np.stack([getattr(e, field).double().mean(dim=1).numpy() for e in a.episodes], 1)
            for _, a in seen
        ])  # fmt: skip
        np.testing.assert_array_equal(means, table)
