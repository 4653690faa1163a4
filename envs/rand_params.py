"""Dynamics task distributions: Hopper / Walker2d with randomised physical parameters.

A task rescales the model's parameters by log-uniform factors (the "rand_param_envs"
convention of the MAML-RL / ProMP benchmarks), independently per entry:

    body_mass     = body_mass_0     * 1.5 ** U(-3, 3)     (per body)
    body_inertia  = body_inertia_0  * 1.5 ** U(-3, 3)     (per body and axis)
    dof_damping   = dof_damping_0   * 1.3 ** U(-3, 3)     (per degree of freedom)
    geom_friction = geom_friction_0 * 1.5 ** U(-3, 3)     (per geom and coefficient)

A task dict holds the absolute values ``{"body_mass": [nbody], "body_inertia":
[nbody, 3], "dof_damping": [nv], "geom_friction": [ngeom, 3]}``; the default task is
the unscaled model. Reward, observation and termination are those of the base v5 env
(Hopper-v5 / Walker2d-v5), episodes are 200 steps (the registered ids add the
TimeLimit). Derived constants (``mj_setConst``) are not recomputed, as in the
original benchmarks; the batched path uses the same parameters, so both agree.
"""

from __future__ import annotations

import copy
from typing import Any

import mujoco
import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

from binom_rl.envs.mujoco_tasks import MetaTaskMixin

__all__ = ["HopperRandParamsEnv", "RandParamsMixin", "Walker2dRandParamsEnv"]

#: Base of the log-uniform scale factor of each randomised model field.
RAND_PARAM_BASES: dict[str, float] = {
    "body_mass": 1.5,
    "body_inertia": 1.5,
    "dof_damping": 1.3,
    "geom_friction": 1.5,
}
#: Exponents are drawn from U(-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT).
LOG_SCALE_LIMIT = 3.0


class RandParamsMixin(MetaTaskMixin):
    """Task protocol for randomised model parameters, plus the vectorised v5 reward.

    The subclass (a Hopper-v5 / Walker2d-v5 env) must call ``_init_rand_params(task)``
    at the end of its constructor.
    """

    data: Any
    dt: float
    _init_params: dict[str, np.ndarray]

    def _init_rand_params(self, task: dict[str, Any] | None) -> None:
        # The unscaled parameters: the centre of the distribution and the default task.
        self._init_params = {
            name: np.array(getattr(self.model, name), dtype=np.float64) for name in RAND_PARAM_BASES
        }
        self.reset_task(self._init_params if task is None else task)

    def _sample_tasks(self, num_tasks: int) -> list[dict[str, Any]]:
        tasks = []
        for _ in range(num_tasks):
            task = {}
            for name, base in RAND_PARAM_BASES.items():
                init = self._init_params[name]
                exponent = self.np_random.uniform(-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT, init.shape)
                task[name] = init * np.power(base, exponent)
            tasks.append(task)
        return tasks

    def _validate_task(self, task: dict[str, Any]) -> dict[str, Any]:
        required = tuple(RAND_PARAM_BASES)
        if not isinstance(task, dict):
            raise ValueError(f"task must be a dict with keys {required}, got {type(task).__name__}")
        checked = {}
        for name in required:
            if name not in task:
                raise ValueError(f"task is missing key {name!r} (expected keys {required})")
            expected = self._init_params[name].shape
            try:
                value = np.array(task[name], dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"task[{name!r}] must be a numeric array") from err
            if value.shape != expected:
                raise ValueError(f"task[{name!r}] has shape {value.shape}, expected {expected}")
            if not np.isfinite(value).all() or (value < 0).any():
                raise ValueError(f"task[{name!r}] must be finite and non-negative")
            checked[name] = value
        extra = sorted(set(task) - set(required))
        if extra:
            raise ValueError(f"task has unexpected key(s) {extra} (expected keys {required})")
        return checked

    def _stack_tasks(self, tasks: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {}  # the reward does not depend on the task

    def _apply_task(self, task: dict[str, Any]) -> None:
        _set_params(self.model, task)

    def _batch_models(self, tasks: list[dict[str, Any]]) -> list[mujoco.MjModel]:
        """One private model copy per env, carrying that env's parameters."""
        models = []
        for task in tasks:
            model = copy.deepcopy(self.model)
            _set_params(model, task)
            models.append(model)
        return models

    # Vectorised twins of the base v5 env's _get_obs / step (the gym path runs the
    # base env's own code, so the batch tests check these independently).
    def _batch_observation(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """``[qpos[1:], clip(qvel, -10, 10)]`` (``qpos[0:]`` if positions are included)."""
        skip = 1 if self._exclude_current_positions_from_observation else 0
        return np.concatenate([qpos[:, skip:], np.clip(qvel, -10.0, 10.0)], axis=1)

    def _batch_healthy(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _batch_reward(
        self,
        qpos_before: np.ndarray,
        qpos_after: np.ndarray,
        qvel_after: np.ndarray,
        action: np.ndarray,
        task: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """v5: ``r = w_f v_x + healthy_reward * healthy - w_c |a|^2``, terminated = not healthy."""
        x_velocity = (qpos_after[:, 0] - qpos_before[:, 0]) / self.dt
        forward = self._forward_reward_weight * x_velocity
        healthy = self._batch_healthy(qpos_after, qvel_after)
        survive = self._healthy_reward * healthy
        ctrl_cost = self._ctrl_cost_weight * np.sum(np.square(action), axis=1)
        terminated = ~healthy & bool(self._terminate_when_unhealthy)
        info = {
            "x_velocity": x_velocity,
            "reward_forward": forward,
            "reward_ctrl": -ctrl_cost,
            "reward_survive": survive,
        }
        return forward + survive - ctrl_cost, terminated, info


def _set_params(model: mujoco.MjModel, task: dict[str, np.ndarray]) -> None:
    for name in RAND_PARAM_BASES:
        getattr(model, name)[:] = task[name]


class HopperRandParamsEnv(RandParamsMixin, HopperEnv):
    """Hopper-v5 with randomised body mass / inertia, dof damping and geom friction.

    Healthy (Hopper-v5): every entry of ``[qpos[2:], qvel]`` in (-100, 100), height
    ``qpos[1] > 0.7`` and torso angle ``qpos[2]`` in (-0.2, 0.2) (open intervals).
    """

    def __init__(self, task: dict[str, Any] | None = None, **kwargs: Any):
        HopperEnv.__init__(self, **kwargs)
        utils.EzPickle.__init__(self, task, **kwargs)
        self._init_rand_params(task)

    def _batch_healthy(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        min_state, max_state = self._healthy_state_range
        min_z, max_z = self._healthy_z_range
        min_angle, max_angle = self._healthy_angle_range
        state = np.concatenate([qpos, qvel], axis=1)[:, 2:]
        healthy_state = ((min_state < state) & (state < max_state)).all(axis=1)
        z, angle = qpos[:, 1], qpos[:, 2]
        healthy_z = (min_z < z) & (z < max_z)
        healthy_angle = (min_angle < angle) & (angle < max_angle)
        return healthy_state & healthy_z & healthy_angle


class Walker2dRandParamsEnv(RandParamsMixin, Walker2dEnv):
    """Walker2d-v5 with randomised body mass / inertia, dof damping and geom friction.

    Healthy (Walker2d-v5): height ``qpos[1]`` in (0.8, 2) and torso angle ``qpos[2]``
    in (-1, 1) (open intervals).
    """

    def __init__(self, task: dict[str, Any] | None = None, **kwargs: Any):
        Walker2dEnv.__init__(self, **kwargs)
        utils.EzPickle.__init__(self, task, **kwargs)
        self._init_rand_params(task)

    def _batch_healthy(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        min_z, max_z = self._healthy_z_range
        min_angle, max_angle = self._healthy_angle_range
        z, angle = qpos[:, 1], qpos[:, 2]
        return (min_z < z) & (z < max_z) & (min_angle < angle) & (angle < max_angle)
