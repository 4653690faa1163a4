"""MuJoCo locomotion task distributions of the MAML-RL benchmarks (gymnasium v5 models).

Every env follows the MAML-RL task protocol:

- ``env.unwrapped.sample_tasks(num_tasks) -> list[dict]`` draws tasks from the env's
  own ``np_random`` (so ``reset(seed=...)`` makes the draw reproducible);
- ``env.unwrapped.reset_task(task)`` switches the env to a task (ValueError naming the
  missing / out-of-range key for a malformed dict);
- ``env.unwrapped.make_batch_env(tasks)`` returns the fast batched simulator of
  ``envs/mujoco_batch.py`` with one env per task.

A default task is set at construction (or pass ``task=...``), so the envs also work
un-tasked. Episodes are 200 steps (the registered ids add the TimeLimit).

Rewards (``a`` the action, ``v_x = (x_after - x_before) / dt`` the forward velocity of
the root over one env step, ``dt = frame_skip * timestep``):

========================  ==============================================================
HalfCheetahVel            ``-|v_x - v_goal| - 0.05 |a|^2``,  ``v_goal ~ U[0, 2]``
HalfCheetahDir            ``d * v_x - 0.05 |a|^2``,  ``d ~ U{-1, +1}``
AntVel                    ``-|v_x - v_goal| + 1 - 0.005 |a|^2 + 0.05 * healthy``,
                          ``v_goal ~ U[0, 3]``
AntDir                    ``d * v_x - 0.005 |a|^2 + 0.05 * healthy``,  ``d ~ U{-1, +1}``
AntGoal                   ``-||xy - g||_1 + 4 - 0.005 |a|^2 + 0.05 * healthy``,
                          ``g ~ U[-3, 3]^2``
========================  ==============================================================

The Ant formulas follow the MAML-RL / ProMP practice (forward or goal term, control
cost 0.5 * 1e-2 |a|^2, survive reward 0.05, the +1 and +4 offsets), with two choices:

1. **Contact forces are off by default** (``include_cfrc_ext_in_observation = False``,
   ``contact_cost_weight = 0``): the Ant observation is ``[qpos[2:], qvel]`` (27 numbers).
   Either keyword turns them on as Ant-v5 defines them: 78 more numbers, ``cfrc_ext`` of
   every body but the world clipped to [-1, 1], and a cost of ``contact_cost_weight`` x the
   sum of squares (Ant-v5 and the MAML paper's rllab Ant: 5e-4). They are evaluated after
   each step at the new state (``mujoco_batch.contact_forces``, on both paths). The MAML
   paper's rllab Ant (MuJoCo 1.31, which computed ``cfrc_ext`` in every step) had them, and
   its observation held the torso's x, y as well (``exclude_current_positions_from_observation
   = False`` adds them here), the torso's rotation matrix and the centre of mass; envs on
   mujoco-py with MuJoCo >= 2.0 (ProMP, pytorch-maml-rl) read the forces as zeros.
2. ``v_x`` and ``xy`` come from the torso's free-joint ``qpos`` after the step (the
   true displacement over ``dt``), not from ``xpos`` of the torso, which MuJoCo
   computes before the last substep's integration.
3. **The model is gymnasium's.** The paper's rllab Ant model has softer contacts
   (``solimp`` 0.8, 0.8, 0.01 on every geom) and starts standing (torso at z = 0.55 on
   bent legs, the xml's ``init_qpos`` numeric, which gymnasium ignores); the keywords
   ``contact_solimp`` and ``initial_pose = "standing"`` select them (off by default).

Termination is Ant-v5's: ``healthy = all(isfinite(qpos, qvel)) and 0.2 <= z <= 1.0``,
``terminated = not healthy``; the survive reward is paid only while healthy.

The control period is gymnasium v5's unless ``frame_skip`` is passed (a constructor
keyword, ``env-kwargs`` in a config): ``dt = 0.01 s x 5 = 0.05 s`` for both robots. The
MAML paper's rllab models hold an action for one physics step: 0.01 s (HalfCheetah) and
0.02 s (Ant, RK4 at timestep 0.02), so a 200-step episode spans 2 s and 4 s of motion
where v5's spans 10 s. ``configs/ant-*.yaml`` set ``frame_skip: 2`` (0.02 s at v5's
0.01 s timestep): at 0.05 s, zero-mean actions at the configs' init std of 1.0 throw the
ant above ``z = 1`` within about 55 steps, so episodes end long before the horizon
(docs/results/locomotion.md). The HalfCheetah configs keep 0.05 s.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import mujoco
import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from binom_rl.envs.mujoco_batch import RolloutBatchMixin, contact_forces

__all__ = [
    "AntDirEnv",
    "AntGoalEnv",
    "AntVelEnv",
    "HalfCheetahDirEnv",
    "HalfCheetahVelEnv",
    "MetaTaskMixin",
]


class MetaTaskMixin(RolloutBatchMixin):
    """The MAML-RL task protocol on top of the batch hooks of :class:`RolloutBatchMixin`.

    Subclasses implement ``_sample_tasks(num_tasks)``, ``_validate_task(task)`` and
    ``_stack_tasks(tasks)``, and may override ``_apply_task(task)`` (default: nothing,
    the reward reads ``self._task_arrays``).
    """

    np_random: np.random.Generator
    _task: dict[str, Any]
    _task_arrays: dict[str, np.ndarray]

    def sample_tasks(self, num_tasks: int) -> list[dict[str, Any]]:
        """``num_tasks`` task dicts drawn i.i.d. from the task distribution (self.np_random)."""
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral):
            raise ValueError(f"num_tasks must be an integer, got {num_tasks!r}")
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {num_tasks}")
        return self._sample_tasks(int(num_tasks))

    def reset_task(self, task: dict[str, Any]) -> None:
        """Switch to ``task`` (takes effect immediately, including mid-episode)."""
        self._task = self._validate_task(task)
        self._task_arrays = self._stack_tasks([self._task])
        self._apply_task(self._task)

    @property
    def task(self) -> dict[str, Any]:
        """The current task dict (a validated copy)."""
        return dict(self._task)

    def _apply_task(self, task: dict[str, Any]) -> None:
        """Change the simulation for ``task``; reward-only tasks need nothing."""

    def _sample_tasks(self, num_tasks: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _validate_task(self, task: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _stack_tasks(self, tasks: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- task dicts


def _check_keys(task: Any, required: tuple[str, ...]) -> None:
    """ValueError unless ``task`` is a dict with exactly the ``required`` keys."""
    if not isinstance(task, dict):
        raise ValueError(f"task must be a dict with keys {required}, got {type(task).__name__}")
    for key in required:
        if key not in task:
            raise ValueError(f"task is missing key {key!r} (expected keys {required})")
    extra = sorted(set(task) - set(required))
    if extra:
        raise ValueError(f"task has unexpected key(s) {extra} (expected keys {required})")


def _finite_float(task: dict, key: str) -> float:
    value = task[key]
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray)):
        raise ValueError(f"task[{key!r}] must be a real number, got {value!r}")
    value = np.asarray(value, dtype=np.float64)
    if value.shape not in ((), (1,)) or not np.isfinite(value).all():
        raise ValueError(f"task[{key!r}] must be a finite scalar, got {task[key]!r}")
    return float(value.reshape(()))


class _VelocityTask:
    """Task ``{"velocity": v_goal}``, ``v_goal ~ U[VELOCITY_RANGE]``."""

    VELOCITY_RANGE: tuple[float, float] = (0.0, 2.0)
    DEFAULT_TASK: dict[str, Any] = {"velocity": 1.0}
    np_random: np.random.Generator

    def _sample_tasks(self, num_tasks: int) -> list[dict[str, Any]]:
        low, high = self.VELOCITY_RANGE
        velocities = self.np_random.uniform(low, high, size=num_tasks)
        return [{"velocity": float(v)} for v in velocities]

    def _validate_task(self, task: dict[str, Any]) -> dict[str, Any]:
        _check_keys(task, ("velocity",))
        return {"velocity": _finite_float(task, "velocity")}

    def _stack_tasks(self, tasks: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {"velocity": np.array([t["velocity"] for t in tasks], dtype=np.float64)}


class _DirectionTask:
    """Task ``{"direction": d}``, ``d`` = +1 (forward) or -1 (backward) with probability 1/2."""

    DEFAULT_TASK: dict[str, Any] = {"direction": 1.0}
    np_random: np.random.Generator

    def _sample_tasks(self, num_tasks: int) -> list[dict[str, Any]]:
        directions = 2 * self.np_random.integers(0, 2, size=num_tasks) - 1
        return [{"direction": float(d)} for d in directions]

    def _validate_task(self, task: dict[str, Any]) -> dict[str, Any]:
        _check_keys(task, ("direction",))
        direction = _finite_float(task, "direction")
        if direction not in (-1.0, 1.0):
            raise ValueError(f"task['direction'] must be -1 or +1, got {task['direction']!r}")
        return {"direction": direction}

    def _stack_tasks(self, tasks: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {"direction": np.array([t["direction"] for t in tasks], dtype=np.float64)}


class _GoalTask:
    """Task ``{"goal": g}``, ``g ~ U[-GOAL_RANGE, GOAL_RANGE]^2`` (x, y position)."""

    GOAL_RANGE: float = 3.0
    DEFAULT_TASK: dict[str, Any] = {"goal": np.zeros(2)}
    np_random: np.random.Generator

    def _sample_tasks(self, num_tasks: int) -> list[dict[str, Any]]:
        goals = self.np_random.uniform(-self.GOAL_RANGE, self.GOAL_RANGE, size=(num_tasks, 2))
        return [{"goal": g} for g in goals]

    def _validate_task(self, task: dict[str, Any]) -> dict[str, Any]:
        _check_keys(task, ("goal",))
        try:
            goal = np.array(task["goal"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"task['goal'] must be an (x, y) pair, got {task['goal']!r}") from err
        if goal.shape != (2,) or not np.isfinite(goal).all():
            raise ValueError(f"task['goal'] must be a finite (x, y) pair, got {task['goal']!r}")
        return {"goal": goal}

    def _stack_tasks(self, tasks: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {"goal": np.stack([t["goal"] for t in tasks]).astype(np.float64)}


# ------------------------------------------------------------------------ reward-task envs


class _RewardTaskEnv(MetaTaskMixin):
    """Shared ``step`` of envs whose tasks change only the reward.

    The gymnasium step evaluates the same vectorised formulas as the batch path with
    N = 1, so both paths cannot drift apart.
    """

    data: Any
    dt: float
    render_mode: str | None
    _exclude_current_positions_from_observation: bool

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64)
        qpos_before = self.data.qpos.copy()
        self.do_simulation(action, self.frame_skip)  # type: ignore[attr-defined]
        contact = self._contact_kwargs()
        observation = self._batch_observation(
            self.data.qpos[None], self.data.qvel[None], **contact
        )[0]
        reward, terminated, info = self._batch_reward(
            qpos_before[None],
            self.data.qpos[None],
            self.data.qvel[None],
            action[None],
            self._task_arrays,
            **contact,
        )
        info = {key: float(value[0]) for key, value in info.items()}
        if self.render_mode == "human":
            self.render()  # type: ignore[attr-defined]
        return observation, float(reward[0]), bool(terminated[0]), False, info

    def _get_obs(self) -> np.ndarray:
        qpos, qvel = self.data.qpos[None], self.data.qvel[None]
        return self._batch_observation(qpos, qvel, **self._contact_kwargs())[0]

    def _contact_kwargs(self) -> dict[str, np.ndarray]:
        """``{"cfrc_ext": [1, nbody, 6]}`` at the current state and control for envs that
        read contact forces (the batched path's :func:`contact_forces`), else nothing."""
        if not self._uses_contact_forces:
            return {}
        if getattr(self, "_contact_data", None) is None:
            self._contact_data = mujoco.MjData(self.model)  # type: ignore[attr-defined]
        data = self.data
        return {
            "cfrc_ext": contact_forces(
                [self.model], self._contact_data, data.qpos[None], data.qvel[None], data.ctrl[None]
            )
        }

    def _batch_observation(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """``[qpos[skip:], qvel]`` where ``skip`` drops the root's planar position."""
        skip = self._skipped_qpos if self._exclude_current_positions_from_observation else 0
        return np.concatenate([qpos[:, skip:], qvel], axis=1)

    _skipped_qpos = 1

    def _batch_reward(
        self,
        qpos_before: np.ndarray,
        qpos_after: np.ndarray,
        qvel_after: np.ndarray,
        action: np.ndarray,
        task: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError


def compile_model(xml_path: str) -> mujoco.MjModel:
    """Compile an MJCF file as ``MjModel.from_xml_path`` does, applying ``settotalmass`` after.

    MuJoCo 4 deprecates the compiler attribute ``settotalmass`` (gymnasium's
    ``half_cheetah.xml`` sets it to 14): every compile prints a warning and appends it to
    ``MUJOCO_LOG.TXT`` in the working directory, once per env. Here the file is compiled
    without it and the masses and inertias are scaled after with ``mj_setTotalmass``, as
    the warning advises. ``mj_setConst`` redoes the constants that depend on the masses;
    ``stat.meaninertia`` (trace of the mass matrix at ``qpos0`` over ``nv``) and
    ``stat.meanmass`` (mean body mass, world excluded), which the compiler alone computes,
    are redone by hand. The result equals the attribute's compile (tested field by field).
    """
    spec = mujoco.MjSpec.from_file(xml_path)
    total_mass = spec.compiler.settotalmass
    if total_mass <= 0:
        return spec.compile()
    spec.compiler.settotalmass = -1
    model = spec.compile()
    mujoco.mj_setTotalmass(model, total_mass)
    data = mujoco.MjData(model)
    mujoco.mj_setConst(model, data)
    mujoco.mj_forward(model, data)
    # The diagonal of M column by column: mj_mulM's signature is the same in MuJoCo 3 and 4.
    column, trace = np.zeros(model.nv), 0.0
    for i, unit in enumerate(np.eye(model.nv)):
        mujoco.mj_mulM(model, data, column, unit)
        trace += column[i]
    model.stat.meaninertia = trace / model.nv
    model.stat.meanmass = model.body_mass[1:].mean()
    return model


class _HalfCheetahTaskEnv(_RewardTaskEnv, HalfCheetahEnv):
    """HalfCheetah-v5 with a task reward; ``ctrl_cost_weight`` defaults to 0.05."""

    def __init__(self, task: dict[str, Any] | None = None, **kwargs: Any):
        kwargs.setdefault("ctrl_cost_weight", 0.05)
        HalfCheetahEnv.__init__(self, **kwargs)
        # Record our own constructor args (the base class recorded its own).
        utils.EzPickle.__init__(self, task, **kwargs)
        self.reset_task(self.DEFAULT_TASK if task is None else task)  # type: ignore[attr-defined]

    def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        # As gymnasium's MujocoEnv, with the model from compile_model (no deprecation warning).
        model = compile_model(self.fullpath)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    def _batch_reward(self, qpos_before, qpos_after, qvel_after, action, task):
        x_velocity = (qpos_after[:, 0] - qpos_before[:, 0]) / self.dt
        ctrl_cost = self._ctrl_cost_weight * np.sum(np.square(action), axis=1)
        forward = self._task_reward(x_velocity, task)
        info = {"x_velocity": x_velocity, "reward_forward": forward, "reward_ctrl": -ctrl_cost}
        return forward - ctrl_cost, np.zeros(len(x_velocity), dtype=bool), info


class HalfCheetahVelEnv(_VelocityTask, _HalfCheetahTaskEnv):
    """HalfCheetah running at a goal velocity: ``r = -|v_x - v_goal| - 0.05 |a|^2``.

    Tasks ``{"velocity": v_goal}``, ``v_goal ~ U[0, 2]``; default task v_goal = 1.
    """

    def _task_reward(self, x_velocity: np.ndarray, task: dict[str, np.ndarray]) -> np.ndarray:
        return -np.abs(x_velocity - task["velocity"])


class HalfCheetahDirEnv(_DirectionTask, _HalfCheetahTaskEnv):
    """HalfCheetah running forward or backward: ``r = d * v_x - 0.05 |a|^2``.

    Tasks ``{"direction": d}``, ``d`` in {-1, +1}; default task d = +1.
    """

    def _task_reward(self, x_velocity: np.ndarray, task: dict[str, np.ndarray]) -> np.ndarray:
        return task["direction"] * x_velocity


def _checked_solimp(values: Sequence[float]) -> np.ndarray:
    """MuJoCo's solimp, (d0, d_width, width[, midpoint, power]), checked for its ranges."""
    solimp = np.asarray(values, dtype=np.float64)
    if solimp.shape not in ((3,), (5,)):
        raise ValueError(f"contact_solimp must have 3 or 5 numbers, got {list(values)}")
    if not (0 < solimp[0] < 1 and 0 < solimp[1] < 1 and solimp[2] > 0):
        raise ValueError(
            f"contact_solimp needs 0 < d0, d_width < 1 and width > 0, got {list(values)}"
        )
    return solimp


class _AntTaskEnv(_RewardTaskEnv, AntEnv):
    """Ant-v5 with a task reward (see the module docstring for the formula).

    Defaults: ``ctrl_cost_weight = 0.005``, ``healthy_reward = 0.05``, and, unlike Ant-v5,
    ``include_cfrc_ext_in_observation = False`` and ``contact_cost_weight = 0``; either
    turns the contact forces on (:func:`~binom_rl.envs.mujoco_batch.contact_forces`, on
    both the gymnasium and the batched path).

    Two keywords bring the model closer to the MAML paper's rllab Ant (its
    ``vendor/mujoco_models/ant.xml``), both off by default:

    - ``contact_solimp``: the contacts' ``solimp`` for every geom, 3 or 5 numbers
      (rllab's Ant: ``[0.8, 0.8, 0.01]``, softer than MuJoCo's default 0.9, 0.95, 0.001);
    - ``initial_pose = "standing"``: episodes start from the model's ``init_qpos`` numeric
      (torso at z = 0.55 on legs bent at the ankles, which rllab reads and gymnasium
      ignores) instead of qpos0 (z = 0.75, every hinge at 0); Ant-v5's reset noise is
      added to either.
    """

    _skipped_qpos = 2  # x, y of the torso
    TASK_OFFSET = 0.0
    INITIAL_POSES = ("qpos0", "standing")

    def __init__(
        self,
        task: dict[str, Any] | None = None,
        *,
        contact_solimp: Sequence[float] | None = None,
        initial_pose: str = "qpos0",
        **kwargs: Any,
    ):
        ezpickle_kwargs = dict(kwargs, contact_solimp=contact_solimp, initial_pose=initial_pose)
        solimp = None if contact_solimp is None else _checked_solimp(contact_solimp)
        if initial_pose not in self.INITIAL_POSES:
            raise ValueError(
                f"initial_pose must be one of {self.INITIAL_POSES}, got {initial_pose!r}"
            )
        kwargs.setdefault("include_cfrc_ext_in_observation", False)
        kwargs.setdefault("contact_cost_weight", 0.0)
        kwargs.setdefault("ctrl_cost_weight", 0.005)
        kwargs.setdefault("healthy_reward", 0.05)
        if kwargs["contact_cost_weight"] < 0:
            weight = kwargs["contact_cost_weight"]
            raise ValueError(f"contact_cost_weight must be >= 0, got {weight}")
        self._uses_contact_forces = bool(
            kwargs["include_cfrc_ext_in_observation"] or kwargs["contact_cost_weight"]
        )
        AntEnv.__init__(self, **kwargs)
        if solimp is not None:
            # every geom's own solimp: a contact mixes its two geoms' values, so the floor too
            self.model.geom_solimp[:, : len(solimp)] = solimp
        if initial_pose == "standing":
            # reset_model starts from init_qpos; the batched path replays that reset
            self.init_qpos = self.model.numeric("init_qpos").data.copy()
        utils.EzPickle.__init__(self, task, **ezpickle_kwargs)
        self.reset_task(self.DEFAULT_TASK if task is None else task)  # type: ignore[attr-defined]

    def _clipped_contact_forces(self, cfrc_ext: np.ndarray) -> np.ndarray:
        """Ant-v5's contact forces: cfrc_ext clipped to ``contact_force_range``."""
        return np.clip(cfrc_ext, *self._contact_force_range)

    def _batch_observation(self, qpos, qvel, cfrc_ext=None):
        """``[qpos[2:], qvel]``, then the clipped contact forces of every body but the world
        (Ant-v5's ``cfrc_ext[1:]``) where ``include_cfrc_ext_in_observation``."""
        observation = super()._batch_observation(qpos, qvel)
        if not self._include_cfrc_ext_in_observation:
            return observation
        forces = self._clipped_contact_forces(cfrc_ext[:, 1:]).reshape(len(qpos), -1)
        return np.concatenate([observation, forces], axis=1)

    def _batch_healthy(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """Ant-v5: all of qpos, qvel finite and torso height z in the closed healthy range."""
        min_z, max_z = self._healthy_z_range
        finite = np.isfinite(qpos).all(axis=1) & np.isfinite(qvel).all(axis=1)
        return finite & (min_z <= qpos[:, 2]) & (qpos[:, 2] <= max_z)

    def _batch_reward(self, qpos_before, qpos_after, qvel_after, action, task, cfrc_ext=None):
        healthy = self._batch_healthy(qpos_after, qvel_after)
        task_reward, info = self._task_reward(qpos_before, qpos_after, task)
        ctrl_cost = self._ctrl_cost_weight * np.sum(np.square(action), axis=1)
        survive = self._healthy_reward * healthy
        reward = task_reward + self.TASK_OFFSET - ctrl_cost + survive
        info.update(reward_ctrl=-ctrl_cost, reward_survive=survive)
        if self._contact_cost_weight:  # Ant-v5: over every body's clipped cfrc_ext
            contact_cost = self._contact_cost_weight * np.sum(
                np.square(self._clipped_contact_forces(cfrc_ext)), axis=(1, 2)
            )
            reward = reward - contact_cost
            info.update(reward_contact=-contact_cost)
        terminated = ~healthy & bool(self._terminate_when_unhealthy)
        return reward, terminated, info


class AntVelEnv(_VelocityTask, _AntTaskEnv):
    """Ant running at a goal velocity along x.

    ``r = -|v_x - v_goal| + 1 - 0.005 |a|^2 + 0.05 * healthy``; tasks
    ``{"velocity": v_goal}``, ``v_goal ~ U[0, 3]``; default task v_goal = 1.5.
    """

    VELOCITY_RANGE = (0.0, 3.0)
    DEFAULT_TASK = {"velocity": 1.5}
    TASK_OFFSET = 1.0

    def _task_reward(self, qpos_before, qpos_after, task):
        x_velocity = (qpos_after[:, 0] - qpos_before[:, 0]) / self.dt
        forward = -np.abs(x_velocity - task["velocity"])
        return forward, {"x_velocity": x_velocity, "reward_forward": forward}


class AntDirEnv(_DirectionTask, _AntTaskEnv):
    """Ant running forward or backward along x.

    ``r = d * v_x - 0.005 |a|^2 + 0.05 * healthy``; tasks ``{"direction": d}``,
    ``d`` in {-1, +1}; default task d = +1.
    """

    def _task_reward(self, qpos_before, qpos_after, task):
        x_velocity = (qpos_after[:, 0] - qpos_before[:, 0]) / self.dt
        forward = task["direction"] * x_velocity
        return forward, {"x_velocity": x_velocity, "reward_forward": forward}


class AntGoalEnv(_GoalTask, _AntTaskEnv):
    """Ant walking to a goal position in the plane.

    ``r = -||xy - g||_1 + 4 - 0.005 |a|^2 + 0.05 * healthy`` with ``xy`` the torso
    position after the step; tasks ``{"goal": g}``, ``g ~ U[-3, 3]^2``; default g = 0.
    """

    TASK_OFFSET = 4.0

    def _task_reward(self, qpos_before, qpos_after, task):
        distance = np.sum(np.abs(qpos_after[:, :2] - task["goal"]), axis=1)
        return -distance, {"goal_distance": distance, "reward_goal": -distance}
