"""The MuJoCo task families, one test each (``mujoco_task_env`` fixture)."""

from __future__ import annotations

import pytest

from binom_rl.envs.mujoco_tasks import (
    AntDirEnv,
    AntGoalEnv,
    AntVelEnv,
    HalfCheetahDirEnv,
    HalfCheetahVelEnv,
)
from binom_rl.envs.rand_params import HopperRandParamsEnv, Walker2dRandParamsEnv

MUJOCO_TASK_ENVS = [
    HalfCheetahVelEnv,
    HalfCheetahDirEnv,
    AntVelEnv,
    AntDirEnv,
    AntGoalEnv,
    HopperRandParamsEnv,
    Walker2dRandParamsEnv,
]


@pytest.fixture(params=MUJOCO_TASK_ENVS, ids=[cls.__name__ for cls in MUJOCO_TASK_ENVS])
def mujoco_task_env(request) -> type:
    """Each MuJoCo task env class in turn."""
    return request.param
