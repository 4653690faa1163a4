"""Fast batched simulation of MuJoCo task distributions with ``mujoco.rollout``.

A gymnasium MuJoCo env steps one simulation at a time from Python. Meta-RL samples
many tasks at once (meta-batch x fast-batch episodes, hundreds of envs), so the
sampler instead advances all N simulations with a single call into MuJoCo's C++
thread pool per env step:

    state_i  <-  frame_skip substeps of mj_step from state_i with ctrl = action_i

where ``state`` is the mjSTATE_FULLPHYSICS vector ``[time, qpos, qvel, act, ...]``.
Observations, rewards and terminations are then computed for all N envs at once in
numpy from ``(qpos_before, qpos_after, qvel_after, action)``: there is no per-env
Python loop in :meth:`MujocoRolloutBatchEnv.step`.

The per-task maths lives on the gymnasium env classes (``envs/mujoco_tasks.py``,
``envs/rand_params.py``) through the hooks of :class:`RolloutBatchMixin`, so a
single vectorised formula serves both paths where the task env owns the reward.

Exactness: one rollout call per env step matches continuous ``mj_step`` to about
1e-11 (the solver warm start is not part of the rollout state, which changes the
result only at solver tolerance). Initial states are produced by a private
reference env (``reset_task(tasks[i])`` then ``reset(seed=seeds[i])``), so they are
bit-identical to the gymnasium env's for the same task and seed.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

import mujoco
import numpy as np
from mujoco import rollout as mj_rollout

_FULLPHYSICS = mujoco.mjtState.mjSTATE_FULLPHYSICS
_CTRL_SPEC = mujoco.mjtState.mjSTATE_CTRL.value


def contact_forces(
    models: Sequence[mujoco.MjModel],
    data: mujoco.MjData,
    qpos: np.ndarray,
    qvel: np.ndarray,
    ctrl: np.ndarray,
) -> np.ndarray:
    """[N, nbody, 6] external contact wrenches ``cfrc_ext`` at N states (rows of qpos, qvel,
    ctrl; ``models[i]`` simulates row i).

    ``mj_step`` leaves ``cfrc_ext`` at zero (MuJoCo >= 2.0 runs ``mj_rnePostConstraint``
    only for force sensors; the MuJoCo 1.x of rllab and mujoco-py 1.5 ran it every step), and
    ``mujoco.rollout`` returns states, not mjData fields. So both the gymnasium step and the
    batched path evaluate the forces the same way after a step: ``mj_forward`` at the state
    with the step's control held, then ``mj_rnePostConstraint``, on ``data`` (a scratch
    MjData, never the simulating one) whose solver warm start is zeroed first, so that the
    result is a function of (state, control) alone. MuJoCo has no batched call for this, hence
    the loop; it costs about one physics substep per env and step.
    """
    out = np.empty((len(qpos), models[0].nbody, 6))
    for i, model in enumerate(models):
        data.qpos[:], data.qvel[:], data.ctrl[:] = qpos[i], qvel[i], ctrl[i]
        data.qacc_warmstart[:] = 0.0
        mujoco.mj_forward(model, data)
        mujoco.mj_rnePostConstraint(model, data)
        out[i] = data.cfrc_ext
    return out


def default_num_threads() -> int:
    """Default size of the rollout thread pool.

    ``BINOM_RL_ROLLOUT_THREADS`` if set; else 1 inside a multiprocessing child (a
    sampler worker process: the parallelism already comes from the processes, and a
    pool per process would oversubscribe the cores); else the number of cores this
    process may run on.
    """
    override = os.environ.get("BINOM_RL_ROLLOUT_THREADS")
    if override is not None:
        try:
            return max(int(override), 0)
        except ValueError as err:
            raise ValueError(
                f"BINOM_RL_ROLLOUT_THREADS must be an integer, got {override!r}"
            ) from err
    if multiprocessing.parent_process() is not None:
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        return os.cpu_count() or 1


class RolloutBatchMixin:
    """Adds ``make_batch_env(tasks)`` to a gymnasium ``MujocoEnv`` subclass.

    The subclass provides four vectorised hooks (arrays have a leading batch axis N):

    - ``_validate_task(task) -> dict``: checked, normalised copy of a task dict
      (ValueError naming the missing / out-of-range key).
    - ``_stack_tasks(tasks) -> dict[str, np.ndarray]``: the task parameters the
      reward needs, stacked along axis 0.
    - ``_batch_observation(qpos [N, nq], qvel [N, nv]) -> [N, obs_dim]``.
    - ``_batch_reward(qpos_before, qpos_after, qvel_after, action, task_arrays)
      -> (reward [N], terminated [N] bool, info dict of [N] arrays)``.

    and may override ``_batch_models(tasks)`` when tasks change the dynamics (the
    default shares one private copy of the model between all N envs). An env whose
    observation or reward reads contact forces sets ``_uses_contact_forces``; both hooks
    then also receive ``cfrc_ext=`` [N, nbody, 6] from :func:`contact_forces`.

    The subclass must be constructible again from its ``EzPickle`` arguments: the
    batch env builds a private reference env from them to produce initial states.
    """

    # Set by MujocoEnv; declared here for type checkers.
    model: mujoco.MjModel
    frame_skip: int
    _uses_contact_forces: bool = False

    def make_batch_env(
        self, tasks: list[dict], nthread: int | None = None
    ) -> MujocoRolloutBatchEnv:
        """A :class:`MujocoRolloutBatchEnv` with env ``i`` solving ``tasks[i]``.

        ``nthread`` is the size of MuJoCo's rollout thread pool (default: the number
        of cores available to this process; 0 runs on the calling thread).
        """
        return MujocoRolloutBatchEnv(self, tasks, nthread=nthread)

    def _make_reference_env(self) -> Any:
        """A fresh, private instance of this env class with the same constructor args."""
        args = getattr(self, "_ezpickle_args", ())
        kwargs = dict(getattr(self, "_ezpickle_kwargs", {}))
        kwargs.pop("render_mode", None)  # the reference env never renders
        return type(self)(*args, **kwargs)

    def _batch_models(self, tasks: list[dict]) -> list[mujoco.MjModel]:
        """One MjModel per env. Default: tasks change only the reward, share one copy."""
        shared = copy.deepcopy(self.model)
        return [shared] * len(tasks)


class MujocoRolloutBatchEnv:
    """N MuJoCo simulations (one task each) stepped together with ``mujoco.rollout``.

    Implements the ``BatchEnv`` protocol of ``binom_rl.envs.batch``:

    - ``reset(seeds) -> obs [N, obs_dim] float32``: env ``i`` starts exactly where the
      gymnasium env starts after ``reset_task(tasks[i])`` and ``reset(seed=seeds[i])``.
    - ``step(actions [N, act_dim]) -> (obs [N, obs_dim] float32, reward [N] float64,
      terminated [N] bool)``, equal to the gymnasium env's ``step`` to float tolerance.

    Envs are not auto-reset: after an episode ends the caller masks that env (or
    calls ``reset``) - stepping it further is allowed and harmless.
    """

    def __init__(self, env: RolloutBatchMixin, tasks: list[dict], nthread: int | None = None):
        if not isinstance(tasks, (list, tuple)) or len(tasks) == 0:
            raise ValueError("tasks must be a non-empty list of task dicts")
        if nthread is None:
            nthread = default_num_threads()
        if nthread < 0:
            raise ValueError(f"nthread must be >= 0, got {nthread}")
        # A pool of one thread only adds hand-over latency: run on the calling thread.
        nthread = 0 if nthread == 1 else int(nthread)

        self._ref = env._make_reference_env()
        self.tasks = [self._ref._validate_task(task) for task in tasks]
        self.num_envs = len(self.tasks)
        self._task_arrays = self._ref._stack_tasks(self.tasks)
        self._models = self._ref._batch_models(self.tasks)

        model = self._models[0]
        self.frame_skip = int(self._ref.frame_skip)
        self.nq, self.nv, self.nu = model.nq, model.nv, model.nu
        self.observation_dim = int(self._ref.observation_space.shape[0])
        self.action_dim = self.nu
        nstate = mujoco.mj_stateSize(model, _FULLPHYSICS)
        # Layout of mjSTATE_FULLPHYSICS: [time, qpos (nq), qvel (nv), act, ...].
        self._qpos = slice(1, 1 + self.nq)
        self._qvel = slice(1 + self.nq, 1 + self.nq + self.nv)

        # Preallocated, C-contiguous float64 buffers so that rollout can skip checks.
        n, fs = self.num_envs, self.frame_skip
        self._state = np.zeros((n, nstate))
        self._out = np.empty((n, fs, nstate))
        self._control = np.empty((n, fs, self.nu))
        self._sensordata = np.empty((n, fs, model.nsensordata))
        self._nthread = nthread
        self._datas = [mujoco.MjData(model) for _ in range(max(nthread, 1))]
        # a scratch MjData for contact_forces: the rollout's own keep their warm starts
        self._contact_data = mujoco.MjData(model) if self._ref._uses_contact_forces else None
        self._rollout: mj_rollout.Rollout | None = mj_rollout.Rollout(nthread=nthread)
        self._is_reset = False

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Reset every env; ``seeds[i]`` seeds env ``i`` as ``gym_env.reset(seed=...)``."""
        seeds = list(seeds)
        if len(seeds) != self.num_envs:
            raise ValueError(f"seeds has length {len(seeds)}, expected num_envs={self.num_envs}")
        ref = self._ref
        # Once per episode, so a per-env loop is fine here: replaying the reference
        # env's own reset makes the initial states exact for any reset_model.
        for i, (task, seed) in enumerate(zip(self.tasks, seeds, strict=True)):
            ref.reset_task(task)
            ref.reset(seed=int(seed))
            mujoco.mj_getState(ref.model, ref.data, self._state[i], _FULLPHYSICS)
        self._is_reset = True
        qpos, qvel = self._state[:, self._qpos], self._state[:, self._qvel]
        # a reset leaves ctrl at zero (mj_resetData), as in the gymnasium env
        contact = self._contact_kwargs(qpos, qvel, np.zeros((self.num_envs, self.nu)))
        return ref._batch_observation(qpos, qvel, **contact).astype(np.float32)

    def _contact_kwargs(self, qpos, qvel, ctrl) -> dict[str, np.ndarray]:
        """``{"cfrc_ext": ...}`` for envs that read contact forces, else nothing."""
        if self._contact_data is None:
            return {}
        return {"cfrc_ext": contact_forces(self._models, self._contact_data, qpos, qvel, ctrl)}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance all envs by one env step (``frame_skip`` physics substeps)."""
        if self._rollout is None:
            raise RuntimeError("step() on a closed batch env")
        if not self._is_reset:
            raise RuntimeError("call reset(seeds) before step()")
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (self.num_envs, self.nu):
            raise ValueError(
                f"actions has shape {actions.shape}, expected ({self.num_envs}, {self.nu})"
            )
        # The gym env holds ctrl = action for all frame_skip substeps.
        self._control[:] = actions[:, None, :]
        qpos_before = self._state[:, self._qpos].copy()
        self._rollout.rollout(
            self._models,
            self._datas,
            self._state,
            self._control,
            control_spec=_CTRL_SPEC,
            skip_checks=True,
            nstep=self.frame_skip,
            state=self._out,
            sensordata=self._sensordata,
        )
        self._state[:] = self._out[:, -1]
        qpos, qvel = self._state[:, self._qpos], self._state[:, self._qvel]
        contact = self._contact_kwargs(qpos, qvel, actions)
        obs = self._ref._batch_observation(qpos, qvel, **contact).astype(np.float32)
        reward, terminated, _ = self._ref._batch_reward(
            qpos_before, qpos, qvel, actions, self._task_arrays, **contact
        )
        return obs, np.asarray(reward, dtype=np.float64), np.asarray(terminated, dtype=bool)

    def close(self) -> None:
        """Stop the rollout thread pool and the reference env."""
        if self._rollout is not None:
            self._rollout.close()
            self._rollout = None
            self._ref.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, nothing to do
            pass
