"""Non-meta baselines with stable-baselines3 PPO, evaluated with our own test protocol.

* ``pretrained``: PPO trained on the whole task distribution
  (:class:`TaskDistributionWrapper` draws a new task at every reset), converted to our
  policy's parameter dict with :func:`sb3_to_params`, then adapted on each test task with
  the same inner policy-gradient steps as a meta-learned policy
  (:func:`binom_rl.agents.evaluation.evaluate_params`).
* ``oracle``: PPO trained with the task's numeric values appended to the observation
  (``append_task=True``); evaluated with 0 adaptation steps by :func:`evaluate_oracle`,
  which samples the same test tasks, the same number of episodes per task and the same
  episode seeds as ``evaluate_params`` through the same :class:`MultiTaskSampler`, with the
  converted oracle policy acting on ``[obs, task features]``.
* ``random``: a randomly initialised policy of ours (``policy.init_params(seed)``),
  adapted like the meta-learned one (no PPO).

SB3's actor for ``PPO("MlpPolicy", policy_kwargs=sb3_policy_kwargs(cfg))`` is exactly our
MLP: ``mlp_extractor.policy_net`` (Linear, activation)*, then ``action_net`` (Linear), and
a state-independent ``log_std`` for Box actions (logits for Discrete). Differences from the
meta-learned policies, stated in the comparison table: PPO clips Box actions to the action
space when it steps its env during training, while our sampler hands the unclipped Gaussian
sample to the env (the envs clip internally where their physics needs it), and PPO uses its
own hyper-parameters (SB3 defaults, ``gamma`` from the config).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.wrappers import RescaleAction
from torch import Tensor, nn

from binom_rl.agents.maml_trpo import derive_seed
from binom_rl.agents.policies import (
    ACTIVATIONS,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    Policy,
    make_policy,
)
from binom_rl.config import Config, ConfigError
from binom_rl.envs.batch import check_task_protocol
from binom_rl.sampler import Episodes, MultiTaskSampler

__all__ = [
    "BASELINES",
    "TaskDistributionWrapper",
    "task_features",
    "make_baseline_env",
    "sb3_policy_kwargs",
    "train_ppo",
    "sb3_to_params",
    "policy_for",
    "evaluate_oracle",
    "save_ppo",
    "load_ppo",
]

BASELINES = ("pretrained", "oracle", "random")


def task_features(task: dict[str, Any]) -> np.ndarray:
    """The task dict's numeric values, flattened in sorted key order (float32).

    ``{"goal": [0.1, -0.2]}`` -> ``[0.1, -0.2]``; ``{"velocity": 1.3}`` -> ``[1.3]``.
    Non-numeric values raise ValueError (an oracle needs numbers to read).
    """
    parts = []
    for key in sorted(task):
        value = np.asarray(task[key])
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise ValueError(f"task value {key!r} is not numeric ({task[key]!r}): no oracle input")
        parts.append(value.astype(np.float32).ravel())
    if not parts:
        raise ValueError("task dict is empty: no oracle features")
    return np.concatenate(parts)


class TaskDistributionWrapper(gym.Wrapper):
    """Draws a new task from the env's distribution at every reset.

    Each reset calls ``env.unwrapped.reset_task(env.unwrapped.sample_tasks(1)[0])``.

    With ``append_task=True`` the task features (:func:`task_features`) are appended to
    every observation (the oracle's input).
    """

    def __init__(self, env: gym.Env, append_task: bool = False):
        super().__init__(env)
        check_task_protocol(env)
        base = env.unwrapped
        self.append_task = append_task
        self.task: dict[str, Any] = base.sample_tasks(1)[0]
        base.reset_task(self.task)
        if append_task:
            obs_space = env.observation_space
            if not (isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 1):
                raise ValueError(f"oracle needs a 1-D Box observation space, got {obs_space}")
            n = task_features(self.task).size
            self.observation_space = spaces.Box(
                low=np.concatenate([obs_space.low, np.full(n, -np.inf, np.float32)]),
                high=np.concatenate([obs_space.high, np.full(n, np.inf, np.float32)]),
                dtype=np.float32,
            )

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        if not self.append_task:
            return obs
        feats = task_features(self.task)
        return np.concatenate([np.asarray(obs, np.float32), feats]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:  # seeds np_random, which sample_tasks draws from
            self.env.reset(seed=seed)
        base = self.env.unwrapped
        self.task = base.sample_tasks(1)[0]
        base.reset_task(self.task)
        obs, info = self.env.reset(options=options)
        return self._obs(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._obs(obs), reward, terminated, truncated, info


def make_baseline_env(cfg: Config, append_task: bool = False) -> TaskDistributionWrapper:
    """The config's env (with its horizon) drawing a new task at every reset."""
    kwargs: dict[str, Any] = dict(cfg.env_kwargs)
    if cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    env = gym.make(cfg.env_name, **kwargs)
    if cfg.rescale_actions and isinstance(env.action_space, spaces.Box):
        # PPO then acts in [-1, 1] like our policies (the sampler's rescale_actions)
        ones = np.ones(env.action_space.shape, dtype=env.action_space.dtype)
        env = RescaleAction(env, -ones, ones)
    return TaskDistributionWrapper(env, append_task=append_task)


def sb3_policy_kwargs(cfg: Config) -> dict[str, Any]:
    """PPO policy_kwargs whose actor is our MLP policy's architecture (log std init 0)."""
    hidden = list(cfg.hidden_sizes)
    return dict(
        net_arch=dict(pi=hidden, vf=hidden),
        activation_fn=ACTIVATIONS[cfg.nonlinearity][1],
        log_std_init=math.log(cfg.init_std),
    )


def train_ppo(
    cfg: Config,
    total_timesteps: int,
    *,
    seed: int,
    append_task: bool = False,
    save_path: str | os.PathLike | None = None,
    tensorboard_log: str | os.PathLike | None = None,
    callback: Any = None,
    normalize: bool = False,
) -> Any:
    """SB3 PPO (defaults, ``gamma`` from cfg, CPU) on the task distribution; returns the model.

    ``n_steps`` is ``min(2048, total_timesteps)`` rounded down to a multiple of the
    mini-batch size 64 (tiny budgets: one mini-batch of all steps), so that they still update.
    The caller sets torch's thread count (``torch.set_num_threads``). With
    ``tensorboard_log`` SB3 writes its training curve there (``rollout/ep_rew_mean``, the
    mean return of the last 100 episodes, against env steps); ``callback`` goes to SB3's
    ``learn`` (e.g. a progress bar). With ``normalize`` PPO learns on SB3's
    ``VecNormalize`` (running mean and variance of the observations, returns scaled by
    their running std), as SB3's zoo trains MuJoCo; :func:`save_ppo` and :func:`load_ppo`
    keep the statistics beside the model and :func:`evaluate_oracle` applies them, while
    :func:`sb3_to_params` alone gives the weights of a policy that reads normalised inputs.
    """
    from stable_baselines3 import PPO  # deferred: SB3 import is slow and optional for training

    if total_timesteps < 1:
        raise ConfigError(f"baseline timesteps must be >= 1, got {total_timesteps}")
    env: Any = make_baseline_env(cfg, append_task=append_task)
    if normalize:
        from stable_baselines3.common.monitor import Monitor
        from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

        # Monitor inside, so that the logged episode returns are the env's own
        env = VecNormalize(DummyVecEnv([lambda: Monitor(env)]), gamma=cfg.gamma)
    if total_timesteps >= 64:
        n_steps, batch_size = min(2048, total_timesteps // 64 * 64), 64
    else:
        n_steps = batch_size = max(2, int(total_timesteps))
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=n_steps,
        batch_size=batch_size,
        gamma=cfg.gamma,
        policy_kwargs=sb3_policy_kwargs(cfg),
        seed=seed,
        device="cpu",
        verbose=0,
        tensorboard_log=None if tensorboard_log is None else str(tensorboard_log),
    )
    model.learn(total_timesteps=int(total_timesteps), callback=callback)
    if save_path is not None:
        save_ppo(model, save_path)
    env.close()
    return model


def _normalizer_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.vecnormalize.pkl")


def save_ppo(model: Any, path: str | os.PathLike) -> None:
    """``model.save(path)``, and its VecNormalize statistics beside it
    (``<stem>.vecnormalize.pkl``) where it was trained with ``normalize``."""
    model.save(str(path))
    normalizer = model.get_vec_normalize_env()
    if normalizer is not None:
        normalizer.save(str(_normalizer_path(path)))


def load_ppo(cfg: Config, path: str | os.PathLike, append_task: bool = False) -> Any:
    """A PPO model saved by :func:`save_ppo`, with its VecNormalize statistics if saved."""
    from stable_baselines3 import PPO

    stats = _normalizer_path(path)
    if not stats.is_file():
        return PPO.load(str(path), device="cpu")
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    venv = DummyVecEnv([lambda: make_baseline_env(cfg, append_task=append_task)])
    normalizer = VecNormalize.load(str(stats), venv)
    normalizer.training = False  # loaded for evaluation: the statistics stay as saved
    return PPO.load(str(path), env=normalizer, device="cpu")


def _obs_normalizer(model: Any) -> Callable[[Tensor], Tensor]:
    """The model's VecNormalize observation transform on tensors (identity without one):
    ``clip((x - mean) / sqrt(var + eps), -clip_obs, clip_obs)``, as SB3 computes it."""
    normalizer = model.get_vec_normalize_env() if hasattr(model, "get_vec_normalize_env") else None
    if normalizer is None or not normalizer.norm_obs:
        return lambda x: x
    mean = torch.as_tensor(normalizer.obs_rms.mean, dtype=torch.float64)
    scale = torch.sqrt(
        torch.as_tensor(normalizer.obs_rms.var, dtype=torch.float64) + normalizer.epsilon
    )
    bound = float(normalizer.clip_obs)

    def transform(x: Tensor) -> Tensor:
        return ((x.double() - mean) / scale).clamp(-bound, bound).to(x.dtype)

    return transform


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def sb3_to_params(model: Any, policy: Policy) -> dict[str, Tensor]:
    """Map an SB3 PPO actor onto ``policy``'s parameter names (detached CPU clones).

    ``mlp_extractor.policy_net``'s linear layers -> ``layers.0 .. layers.{n-1}``,
    ``action_net`` -> ``layers.{n}``, ``log_std`` -> ``log_std`` (Gaussian policies).
    Raises ValueError when the architectures differ (sizes, activation, distribution).
    """
    sb3 = model.policy if hasattr(model, "policy") else model
    hidden = _linears(sb3.mlp_extractor.policy_net)
    layers = [*hidden, sb3.action_net]
    acts = [
        m
        for m in sb3.mlp_extractor.policy_net.modules()
        if not isinstance(m, nn.Linear) and not isinstance(m, nn.Sequential)
    ]
    expected = ACTIVATIONS[policy.nonlinearity][1]
    if any(not isinstance(a, expected) for a in acts):
        raise ValueError(f"SB3 actor activations {acts} do not match {policy.nonlinearity}")
    if len(layers) != len(policy.layers):
        raise ValueError(
            f"SB3 actor has {len(layers)} linear layers, the policy {len(policy.layers)}"
        )
    params: dict[str, Tensor] = {}
    for i, (src, dst) in enumerate(zip(layers, policy.layers, strict=True)):
        if src.weight.shape != dst.weight.shape:
            raise ValueError(
                f"layer {i}: SB3 weight {tuple(src.weight.shape)} vs policy "
                f"{tuple(dst.weight.shape)}"
            )
        params[f"layers.{i}.weight"] = src.weight.detach().cpu().clone()
        params[f"layers.{i}.bias"] = src.bias.detach().cpu().clone()
    if isinstance(policy, GaussianMLPPolicy):
        log_std = getattr(sb3, "log_std", None)
        if log_std is None or log_std.shape != (policy.act_dim,):
            raise ValueError("SB3 policy has no state-independent log_std of the action size")
        params["log_std"] = log_std.detach().cpu().clone()
    elif not isinstance(policy, CategoricalMLPPolicy):
        raise ValueError(f"unsupported policy type {type(policy).__name__}")
    return {k: params[k] for k, _ in policy.named_parameters()}


def policy_for(cfg: Config, extra_obs: int = 0) -> Policy:
    """Our policy for the config's env, with ``extra_obs`` more inputs (oracle features)."""
    env = gym.make(cfg.env_name, **cfg.env_kwargs)
    try:
        obs_space = env.observation_space
        if extra_obs:
            obs_space = spaces.Box(-np.inf, np.inf, (obs_space.shape[0] + extra_obs,), np.float32)
        return make_policy(
            obs_space,
            env.action_space,
            cfg.hidden_sizes,
            cfg.nonlinearity,
            cfg.init_std,
            cfg.init_output_scale,
        )
    finally:
        env.close()


def evaluate_oracle(
    cfg: Config,
    model: Any,
    *,
    meta_batch_size: int,
    num_batches: int,
    seed: int,
    on_batch: Callable[[list[dict[str, Any]], Episodes], None] | None = None,
) -> np.ndarray:
    """Mean return per test task of the oracle PPO policy, 0 adaptation steps: [tasks, 1].

    The same test tasks, ``fast-batch-size`` episodes per task and episode seeds as
    :func:`~binom_rl.agents.evaluation.evaluate_params` with the same ``seed`` (its step-0
    sample), stochastic actions drawn from the converted policy on ``[obs, task features]``.
    ``on_batch(tasks, episodes)``, where given, sees each batch's test tasks and episodes
    (the observations without the task features). A model trained with ``normalize``
    sees its inputs through its VecNormalize statistics, as in training.
    """
    with MultiTaskSampler.from_config(cfg, device="cpu") as sampler:
        probe = sampler.sample_tasks(1, seed=0)[0]
        policy = policy_for(cfg, extra_obs=task_features(probe).size)
        params = sb3_to_params(model, policy)
        normalize = _obs_normalizer(model)
        rows = []
        for batch in range(num_batches):
            tasks = sampler.sample_tasks(
                meta_batch_size, seed=derive_seed(seed, batch, 0), split="test"
            )
            feats = torch.as_tensor(np.stack([task_features(t) for t in tasks]))

            def act(obs: Tensor, generator: torch.Generator, feats: Tensor = feats) -> Tensor:
                f = feats.unsqueeze(1).expand(obs.shape[0], obs.shape[1], feats.shape[-1])
                inputs = normalize(torch.cat([obs, f.to(obs.dtype)], dim=-1))
                return policy.sample(params, inputs, generator)

            # evaluate_params' step-0 episodes use derive_seed(derive_seed(seed, batch, 1), 0)
            episodes = sampler.sample(
                tasks, act, cfg.fast_batch_size, seed=derive_seed(derive_seed(seed, batch, 1), 0)
            )
            if on_batch is not None:
                on_batch(tasks, episodes)
            rows.append(episodes.returns.mean(dim=1).cpu().numpy()[:, None])
    return np.concatenate(rows, axis=0)


def random_params(cfg: Config, seed: int) -> dict[str, Tensor]:
    """A randomly initialised policy of ours (``policy.init_params(seed)``)."""
    return policy_for(cfg).init_params(seed)


def save_params(params: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Parameters of a baseline policy (plain torch.save; the folder is the baseline's own)."""
    torch.save({k: v.detach().cpu() for k, v in params.items()}, Path(path))
