"""Meta-RL task distributions, registered as gymnasium ids in the ``binom_rl/`` namespace.

Every env implements the MAML-RL task protocol on ``env.unwrapped``:
``sample_tasks(num_tasks) -> list[dict]`` (drawn from the env's own ``np_random``,
so ``reset(seed=...)`` makes it reproducible) and ``reset_task(task)``.
"""

from __future__ import annotations

import gymnasium as gym

# id -> (lazy string entry point, horizon). String entry points keep `import binom_rl.envs`
# cheap and let modules (MuJoCo families) arrive independently of this table.
_ENVS: dict[str, tuple[str, int]] = {
    "binom_rl/2DNavigation-v0": ("binom_rl.envs.navigation:Navigation2DEnv", 100),
    "binom_rl/HalfCheetahVel-v0": ("binom_rl.envs.mujoco_tasks:HalfCheetahVelEnv", 200),
    "binom_rl/HalfCheetahDir-v0": ("binom_rl.envs.mujoco_tasks:HalfCheetahDirEnv", 200),
    "binom_rl/AntVel-v0": ("binom_rl.envs.mujoco_tasks:AntVelEnv", 200),
    "binom_rl/AntDir-v0": ("binom_rl.envs.mujoco_tasks:AntDirEnv", 200),
    "binom_rl/AntGoal-v0": ("binom_rl.envs.mujoco_tasks:AntGoalEnv", 200),
    "binom_rl/HopperRandParams-v0": ("binom_rl.envs.rand_params:HopperRandParamsEnv", 200),
    "binom_rl/Walker2dRandParams-v0": ("binom_rl.envs.rand_params:Walker2dRandParamsEnv", 200),
    "binom_rl/Bandit-v0": ("binom_rl.envs.discrete:BanditEnv", 10),
    "binom_rl/TabularMDP-v0": ("binom_rl.envs.discrete:TabularMDPEnv", 10),
    # Meta-World (the metaworld extra; imported only when made): max_path_length 500
    "binom_rl/MetaWorldML1-v0": ("binom_rl.envs.meta_world:MetaWorldML1Env", 500),
    "binom_rl/MetaWorldML10-v0": ("binom_rl.envs.meta_world:MetaWorldML10Env", 500),
    "binom_rl/MetaWorldML45-v0": ("binom_rl.envs.meta_world:MetaWorldML45Env", 500),
}


def _register_all() -> None:
    for env_id, (entry_point, horizon) in _ENVS.items():
        # re-import (importlib.reload, spawned workers) must not warn about overriding ids
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=entry_point, max_episode_steps=horizon)


def registered_ids() -> list[str]:
    """The gymnasium ids this package registers (the ``binom_rl/`` namespace)."""
    return sorted(_ENVS)


_register_all()
