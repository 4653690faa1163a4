"""Task protocol, env checkers and task-dependent rewards of the MuJoCo task envs."""

from __future__ import annotations

import warnings

import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.wrappers import TimeLimit
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from binom_rl.envs.mujoco_batch import contact_forces
from binom_rl.envs.mujoco_tasks import (
    AntDirEnv,
    AntGoalEnv,
    AntVelEnv,
    HalfCheetahDirEnv,
    HalfCheetahVelEnv,
    compile_model,
)
from binom_rl.envs.rand_params import HopperRandParamsEnv, Walker2dRandParamsEnv


def _same_task(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_checkers_pass(mujoco_task_env):
    cls = mujoco_task_env
    env = cls()
    env.reset_task(env.sample_tasks(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gymnasium warns about float64 obs spaces etc.
        gym_check_env(TimeLimit(env, max_episode_steps=200), skip_render_check=True)
        sb3_check_env(TimeLimit(cls(), max_episode_steps=200), warn=False)


def test_sample_tasks_reproducible_and_valid(mujoco_task_env):
    cls = mujoco_task_env
    env = cls()
    env.reset(seed=123)
    first = env.sample_tasks(20)
    env.reset(seed=123)
    again = env.sample_tasks(20)
    assert len(first) == 20
    assert all(_same_task(a, b) for a, b in zip(first, again, strict=True))
    assert not all(_same_task(first[0], task) for task in first[1:])
    for task in first:
        env.reset_task(task)
        assert _same_task(env.task, task)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_tasks"):
            env.sample_tasks(bad)


def test_task_distributions():
    env = HalfCheetahVelEnv()
    env.reset(seed=0)
    velocities = np.array([t["velocity"] for t in env.sample_tasks(500)])
    assert velocities.min() >= 0.0 and velocities.max() <= 2.0 and velocities.std() > 0.4
    env = AntVelEnv()
    env.reset(seed=0)
    velocities = np.array([t["velocity"] for t in env.sample_tasks(500)])
    assert velocities.min() >= 0.0 and velocities.max() <= 3.0 and velocities.max() > 2.0
    for cls in (HalfCheetahDirEnv, AntDirEnv):
        env = cls()
        env.reset(seed=0)
        directions = {t["direction"] for t in env.sample_tasks(100)}
        assert directions == {-1.0, 1.0}
    env = AntGoalEnv()
    env.reset(seed=0)
    goals = np.stack([t["goal"] for t in env.sample_tasks(500)])
    assert goals.shape == (500, 2) and np.abs(goals).max() <= 3.0 and np.abs(goals).max() > 2.5


def test_rand_params_scales():
    env = HopperRandParamsEnv()
    env.reset(seed=0)
    init = {k: np.array(v) for k, v in env.task.items()}
    bases = {"body_mass": 1.5, "body_inertia": 1.5, "dof_damping": 1.3, "geom_friction": 1.5}
    for task in env.sample_tasks(20):
        for name, base in bases.items():
            nonzero = init[name] > 0
            ratio = task[name][nonzero] / init[name][nonzero]
            assert np.all(ratio >= base**-3 - 1e-12) and np.all(ratio <= base**3 + 1e-12)
            assert np.all(task[name][~nonzero] == 0)
    task = env.sample_tasks(1)[0]
    env.reset_task(task)
    np.testing.assert_array_equal(env.model.body_mass, task["body_mass"])
    np.testing.assert_array_equal(env.model.geom_friction, task["geom_friction"])


@pytest.mark.parametrize(
    ("cls", "task", "match"),
    [
        (HalfCheetahVelEnv, {}, "velocity"),
        (HalfCheetahVelEnv, {"velocity": float("nan")}, "velocity"),
        (HalfCheetahVelEnv, {"velocity": "fast"}, "velocity"),
        (HalfCheetahVelEnv, {"direction": 1.0}, "velocity"),
        (HalfCheetahDirEnv, {"direction": 0.5}, "direction"),
        (AntDirEnv, {"direction": 2}, "direction"),
        (AntVelEnv, {"velocity": 1.0, "goal": [0, 0]}, "goal"),
        (AntGoalEnv, {"goal": [1.0]}, "goal"),
        (AntGoalEnv, {"goal": [1.0, np.inf]}, "goal"),
        (HopperRandParamsEnv, {"body_mass": np.ones(5)}, "body_mass"),
        (Walker2dRandParamsEnv, None, "dict"),
    ],
)
def test_malformed_task_raises(cls, task, match):
    env = cls()
    with pytest.raises(ValueError, match=match):
        env.reset_task(task)


def test_rand_params_missing_and_negative_keys():
    env = Walker2dRandParamsEnv()
    task = env.task
    del task["dof_damping"]
    with pytest.raises(ValueError, match="dof_damping"):
        env.reset_task(task)
    task = env.task
    task["geom_friction"] = -task["geom_friction"]
    with pytest.raises(ValueError, match="geom_friction"):
        env.reset_task(task)


def test_ant_contact_forces_off_by_default_and_bad_weight():
    assert AntGoalEnv().observation_space.shape == (27,)
    assert AntDirEnv(include_cfrc_ext_in_observation=True).observation_space.shape == (105,)
    with pytest.raises(ValueError, match="contact_cost_weight"):
        AntVelEnv(contact_cost_weight=-1.0)


def test_ant_rllab_contacts_and_standing_pose():
    """rllab's Ant (its vendor ant.xml): solimp (0.8, 0.8, 0.01) on every geom, MuJoCo's
    defaults kept for the rest, and episodes from the model's init_qpos numeric; bad values
    are one ValueError naming the keyword."""
    default = AntVelEnv()
    assert default.model.ngeom == 14  # the floor, the torso, 3 per leg
    np.testing.assert_allclose(default.model.geom_solimp, [[0.9, 0.95, 0.001, 0.5, 2.0]] * 14)
    env = AntVelEnv(contact_solimp=[0.8, 0.8, 0.01], initial_pose="standing", reset_noise_scale=0)
    np.testing.assert_allclose(env.model.geom_solimp, [[0.8, 0.8, 0.01, 0.5, 2.0]] * 14)
    env.reset(seed=0)
    standing = [0, 0, 0.55, 1, 0, 0, 0, 0, 1, 0, -1, 0, -1, 0, 1]  # the xml's init_qpos
    np.testing.assert_array_equal(env.data.qpos, standing)
    default.reset(seed=0)
    assert abs(default.data.qpos[2] - 0.75) <= 0.1  # qpos0 plus Ant-v5's U(-0.1, 0.1)
    # the standing ant stays up on its own: zero actions for 2 s keep it healthy, near 0.55
    env = AntVelEnv(contact_solimp=[0.8, 0.8, 0.01], initial_pose="standing", frame_skip=2)
    env.reset(seed=0)
    for _ in range(100):
        _, _, terminated, _, _ = env.step(np.zeros(8))
        assert not terminated
    assert 0.4 < env.data.qpos[2] < 0.7
    for kwargs, match in [
        ({"contact_solimp": [0.8, 0.8]}, "contact_solimp must have 3 or 5"),
        ({"contact_solimp": [1.2, 0.8, 0.01]}, "contact_solimp needs"),
        ({"contact_solimp": [0.8, 0.8, 0.0]}, "contact_solimp needs"),
        ({"initial_pose": "crouch"}, "initial_pose must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            AntDirEnv(**kwargs)


def _ant_at_rest(**kwargs) -> AntDirEnv:
    """An AntDir env after 5 s of zero actions: the ant sits still on the floor."""
    env = AntDirEnv(**kwargs)
    env.reset(seed=0)
    for _ in range(100):
        env.step(np.zeros(8))
    assert np.abs(env.data.qvel).max() < 0.01
    return env


def test_ant_contact_forces_balance_gravity_at_rest():
    """An independent check of ``contact_forces``: on a resting ant the floor's contact
    wrenches carry its weight, with no net horizontal force and no net torque about its
    centre of mass (cfrc_ext is [torque, force] about the subtree COM of the torso)."""
    env = _ant_at_rest()
    model, data = env.model, env.data
    forces = contact_forces(
        [model], mujoco.MjData(model), data.qpos[None], data.qvel[None], data.ctrl[None]
    )[0]
    weight = model.body_mass.sum() * -model.opt.gravity[2]
    assert forces[:, 5].sum() == pytest.approx(weight, rel=1e-6)
    np.testing.assert_allclose(forces[:, 3:5].sum(0), 0.0, atol=1e-3 * weight)
    np.testing.assert_allclose(forces[:, :3].sum(0), 0.0, atol=1e-3 * weight)
    assert np.count_nonzero(np.abs(forces).sum(1)) >= 2  # the feet that touch the floor


def test_contact_forces_are_a_function_of_state_and_control():
    """The scratch MjData's history (its solver warm start) does not change the result."""
    env = _ant_at_rest()
    model, data = env.model, env.data
    state = (data.qpos[None].copy(), data.qvel[None].copy(), np.full((1, 8), 0.4))
    scratch = mujoco.MjData(model)
    first = contact_forces([model], scratch, *state)
    other = (state[0] + 0.05, state[1] + 1.0, -state[2])
    contact_forces([model], scratch, *other)  # leaves another warm start behind
    np.testing.assert_array_equal(contact_forces([model], scratch, *state), first)
    reversed_control = contact_forces([model], scratch, state[0], state[1], -state[2])
    assert not np.array_equal(first, reversed_control)


def test_ant_contact_observation_and_cost():
    """Ant-v5's layout and cost: obs = [qpos[2:], qvel, clip(cfrc_ext[1:], -1, 1)], reward
    minus weight x sum(clip(cfrc_ext)^2), the forces at the state after the step."""
    env = _ant_at_rest(include_cfrc_ext_in_observation=True, contact_cost_weight=5e-4)
    action = np.full(8, 0.2)
    obs, reward, _, _, info = env.step(action)
    data = env.data
    forces = contact_forces(
        [env.model], mujoco.MjData(env.model), data.qpos[None], data.qvel[None], action[None]
    )[0]
    clipped = np.clip(forces, -1.0, 1.0)
    np.testing.assert_allclose(obs[:27], np.concatenate([data.qpos[2:], data.qvel]))
    np.testing.assert_allclose(obs[27:], clipped[1:].ravel())
    assert np.abs(obs[27:]).max() > 0.5  # the feet on the floor
    assert info["reward_contact"] == pytest.approx(-5e-4 * np.sum(clipped**2))
    expected = info["x_velocity"] - 0.005 * np.sum(action**2) + 0.05 - 5e-4 * np.sum(clipped**2)
    assert reward == pytest.approx(expected)


def _reward_after(env, task, seed: int, action: np.ndarray) -> tuple[float, dict]:
    env.reset_task(task)
    env.reset(seed=seed)
    _, reward, _, _, info = env.step(action)
    return reward, info


@pytest.mark.parametrize(
    ("cls", "tasks"),
    [
        (HalfCheetahVelEnv, [{"velocity": 0.0}, {"velocity": 2.0}]),
        (HalfCheetahDirEnv, [{"direction": 1.0}, {"direction": -1.0}]),
        (AntVelEnv, [{"velocity": 0.0}, {"velocity": 3.0}]),
        (AntDirEnv, [{"direction": 1.0}, {"direction": -1.0}]),
        (AntGoalEnv, [{"goal": [3.0, 3.0]}, {"goal": [-3.0, 0.0]}]),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_reward_depends_on_task(cls, tasks):
    """Same seed (so same state) and same action, different task -> different reward."""
    env = cls()
    action = np.full(env.action_space.shape, 0.3)
    rewards = [_reward_after(env, task, seed=7, action=action)[0] for task in tasks]
    assert abs(rewards[0] - rewards[1]) > 1e-3


def test_reward_formulas():
    """The documented formulas, recomputed from the step's info."""
    action = np.full(6, 0.5)
    env = HalfCheetahVelEnv()
    reward, info = _reward_after(env, {"velocity": 1.5}, seed=3, action=action)
    expected = -abs(info["x_velocity"] - 1.5) - 0.05 * np.sum(action**2)
    assert reward == pytest.approx(expected)
    env = HalfCheetahDirEnv()
    reward, info = _reward_after(env, {"direction": -1.0}, seed=3, action=action)
    assert reward == pytest.approx(-info["x_velocity"] - 0.05 * np.sum(action**2))

    action = np.full(8, 0.5)
    env = AntVelEnv()
    reward, info = _reward_after(env, {"velocity": 2.0}, seed=3, action=action)
    expected = -abs(info["x_velocity"] - 2.0) + 1.0 - 0.005 * np.sum(action**2) + 0.05
    assert reward == pytest.approx(expected)
    env = AntGoalEnv()
    reward, _ = _reward_after(env, {"goal": [1.0, -2.0]}, seed=3, action=action)
    distance = np.abs(env.data.qpos[:2] - [1.0, -2.0]).sum()
    assert reward == pytest.approx(-distance + 4.0 - 0.005 * np.sum(action**2) + 0.05)


@pytest.mark.parametrize("frame_skip", [5, 2])
def test_ant_velocity_is_displacement_over_frame_skip_times_timestep(frame_skip):
    """``v_x`` is the torso's x displacement over ``frame_skip * timestep`` (0.05 s for
    Ant-v5, 0.02 s for the Ant configs' ``frame_skip: 2``), measured from qpos here."""
    env = AntDirEnv(frame_skip=frame_skip)
    env.reset_task({"direction": -1.0})
    env.reset(seed=3)
    x_before = float(env.data.qpos[0])
    action = np.full(8, 0.5)
    _, reward, _, _, info = env.step(action)
    velocity = (float(env.data.qpos[0]) - x_before) / (frame_skip * env.model.opt.timestep)
    assert info["x_velocity"] == pytest.approx(velocity)
    assert reward == pytest.approx(-velocity - 0.005 * np.sum(action**2) + 0.05)


def test_rand_params_change_dynamics():
    """Different parameters, same seed and actions -> different trajectories."""
    env = HopperRandParamsEnv()
    env.reset(seed=0)
    light, heavy = env.task, env.task
    light["body_mass"] = light["body_mass"] * 0.5
    heavy["body_mass"] = heavy["body_mass"] * 2.0
    finals = []
    for task in (light, heavy):
        env.reset_task(task)
        env.reset(seed=1)
        for _ in range(10):
            obs, *_ = env.step(np.full(3, 0.5))
        finals.append(obs)
    assert np.abs(finals[0] - finals[1]).max() > 1e-2


def test_ant_terminates_when_unhealthy():
    env = AntDirEnv()
    env.reset(seed=0)
    qpos, qvel = env.data.qpos.copy(), env.data.qvel.copy()
    qpos[2] = 1.5  # torso above the healthy range (falls only ~1 cm in one step)
    env.set_state(qpos, qvel)
    _, reward, terminated, _, info = env.step(np.zeros(8))
    assert terminated and info["reward_survive"] == 0.0


def _compile_and_warnings(compile_fn):
    seen: list[str] = []
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(seen.append)
    try:
        return compile_fn(), seen
    finally:
        mujoco.set_mju_user_warning(previous)


def test_half_cheetah_model_equals_settotalmass_compile_without_warning():
    # The independent path: MuJoCo's own compile of gymnasium's XML, attribute and all.
    xml_path = HalfCheetahVelEnv().fullpath
    stock, _ = _compile_and_warnings(lambda: mujoco.MjModel.from_xml_path(xml_path))
    ours, seen = _compile_and_warnings(lambda: compile_model(xml_path))
    assert seen == []
    assert stock.body_mass.sum() == pytest.approx(14.0)
    compared = 0
    for name in dir(stock):
        value = getattr(stock, name)
        if not name.startswith("_") and isinstance(value, np.ndarray):
            np.testing.assert_allclose(
                getattr(ours, name), value, rtol=1e-12, atol=1e-12, err_msg=name
            )
            compared += 1
    assert compared > 100
    for name in ("meaninertia", "meanmass", "meansize", "extent"):
        assert getattr(ours.stat, name) == pytest.approx(getattr(stock.stat, name), rel=1e-12), name
    # The env uses it: same masses and, under the same controls, the same trajectory.
    env, seen = _compile_and_warnings(HalfCheetahDirEnv)
    assert seen == []
    np.testing.assert_allclose(env.model.body_mass, stock.body_mass, rtol=1e-12)
    data_stock, data_env = mujoco.MjData(stock), mujoco.MjData(env.model)
    controls = np.random.default_rng(0).uniform(-1, 1, (300, stock.nu))
    for u in controls:
        data_stock.ctrl[:], data_env.ctrl[:] = u, u
        mujoco.mj_step(stock, data_stock)
        mujoco.mj_step(env.model, data_env)
    np.testing.assert_allclose(data_env.qpos, data_stock.qpos, rtol=1e-10, atol=1e-10)
