"""Run configuration: MAML-RL key names in YAML and on the command line, validated up front.

YAML files and flags use the MAML-RL spelling (``fast-lr``, ``meta-batch-size``, ...);
Python code uses the same names with underscores. Every key is a flag of
``binom-rl-train`` (``--fast-lr 0.05``), and the flags override the YAML file.

Keys by part of the algorithm:

- task distribution and inner loop: ``env-name``, ``env-kwargs``, ``max-episode-steps``,
  ``fast-lr``, ``fast-batch-size``, ``num-steps``, ``inner-loss`` (vpg | lvc | dice),
  ``gamma``, ``gae-lambda``;
- outer loop, every algorithm: ``outer`` (trpo | ppo), ``meta-batch-size``, ``num-batches``;
- ``outer: trpo`` (MAML-TRPO): ``trust-region`` (post | pre), ``max-kl``, ``cg-iters``,
  ``cg-damping``, ``ls-max-steps``, ``ls-backtrack-ratio``, ``fvp-subsample``,
  ``fvp-subsample-by``, ``fvp-estimator``, ``fvp-order``;
- ``outer: ppo`` (ProMP): ``ppo-steps``, ``outer-lr``, ``clip-eps``, ``kl-penalty`` (eta),
  ``kl-target`` (null: eta fixed);
- meta-gradient estimator and engine: ``estimator``, ``order``, ``chunk-size``,
  ``hvp-mode``, ``diagnose-every``;
- policy and run: ``hidden-sizes``, ``nonlinearity``, ``init-std``, ``init-output-scale``,
  ``rescale-actions``, ``clip-actions``, ``seed``, ``device``, ``num-workers``.

The keys of the outer algorithm a run does not use are validated and otherwise ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from binom_rl.checkpoint import atomic_write
from binom_rl.metagrad import HVP_MODES, METHODS, effective_order


class ConfigError(ValueError):
    """A configuration problem, reported as one line before any work is done."""


FVP_SUBSAMPLE_BY = ("steps", "episodes")
NONLINEARITIES = ("tanh", "relu")  # the MLP policies' hidden-layer activations
SAMPLERS = ("local", "ray")
INNER_LOSSES = ("vpg", "lvc", "dice")
OUTER_STEPS = ("trpo", "ppo")
TRUST_REGIONS = ("post", "pre")

# Keys added after runs were first saved, with the behaviour those runs had (whatever the
# default is today).
SAVED_RUN_DEFAULTS: dict[str, Any] = {
    "rescale-actions": False,
    "clip-actions": False,
    "fvp-subsample-by": "episodes",
    "inner-loss": "vpg",
    "outer": "trpo",
    "trust-region": "post",
}


@dataclass
class Config:
    """Hyper-parameters of one meta-training run (defaults: the MAML-RL paper's)."""

    env_name: str = "binom_rl/2DNavigation-v0"
    env_kwargs: dict = field(default_factory=dict)
    max_episode_steps: int | None = None  # None: the env's registered horizon
    # inner loop
    fast_lr: float = 0.1
    fast_batch_size: int = 20
    num_steps: int = 1
    # vpg: -mean(log pi A) (MAML-RL); lvc: -mean(pi / pi_old A) (ProMP); dice: DiCE's
    # magic box (agents/losses.py)
    inner_loss: str = "vpg"
    # outer loop: trpo (MAML-TRPO) or ppo (ProMP)
    outer: str = "trpo"
    meta_batch_size: int = 40
    num_batches: int = 500
    # outer: trpo. trust-region post: KL of the post-update policy phi_K (MAML-TRPO); pre:
    # KL of the inner steps' sampling policies phi_0 .. phi_{K-1} (agents/trpo.py)
    trust_region: str = "post"
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_max_steps: int = 15
    ls_backtrack_ratio: float = 0.8
    # Fisher-vector products on every n-th episode of each task (fvp-subsample-by:
    # episodes) or on every n-th time step of every episode (steps). See
    # MetaLearner._fvp_data for which suits which estimator.
    fvp_subsample: int = 1
    fvp_subsample_by: str = "episodes"
    # outer: ppo (ProMP). ppo-steps Adam steps of outer-lr per iteration on the clip-eps
    # clipped surrogate plus kl-penalty (eta) x the KL at each inner step's sampling policy;
    # kl-target null: eta fixed, else halved / doubled per step around it (agents/promp.py).
    # Defaults: ProMP's locomotion settings.
    ppo_steps: int = 5
    outer_lr: float = 1e-3
    clip_eps: float = 0.3
    kl_penalty: float = 5e-4
    kl_target: float | None = None
    # returns and advantages
    gamma: float = 0.99
    gae_lambda: float = 1.0
    # policy
    hidden_sizes: list = field(default_factory=lambda: [64, 64])
    nonlinearity: str = "tanh"
    init_std: float = 1.0
    # Multiplies the output layer's initial (Xavier) weights; small: initial means near 0.
    init_output_scale: float = 1.0
    # The policy acts in [-1, 1] per dimension and the sampler maps that affinely onto the
    # env's Box bounds, as rllab's normalize() did for every task in the MAML paper.
    # Identity for bounds [-1, 1] (all MuJoCo tasks here); 2D navigation's are +-0.1.
    rescale_actions: bool = True
    # The env gets the actions clipped to its Box bounds (after rescaling), as normalize()
    # clipped them; the control costs of the MuJoCo tasks are then paid on the action the
    # physics applies, not on a Gaussian sample beyond the bounds (docs/results/locomotion.md).
    clip_actions: bool = True
    # meta-gradient estimator
    estimator: str = "binom"
    order: int = 1
    # The J products inside the Fisher-vector products (the ~20 of a CG solve) may use
    # another estimator than the meta-gradient; null: the same estimator and order.
    fvp_estimator: str | None = None
    fvp_order: int | None = None
    chunk_size: int | str | None = None  # None: all at once; "auto": default_chunk_size
    # Hessian-vector products. auto: with chunk-size null (or auto fitting everything at
    # once), each Hessian's graph is built once per CG solve and reused by all its products
    # (reverse-over-reverse); single products and chunked ones are forward-over-reverse,
    # built and freed each time (revrev fallback). fwdrev / revrev: always that way.
    hvp_mode: str = "auto"
    diagnose_every: int = 0
    # run
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 1
    # where the sampler's num-workers workers run (docs/distributed.md): local, processes
    # on this machine; ray, Ray actors on this machine or a cluster. ray-address: null is
    # RAY_ADDRESS if set, else local (a new Ray instance here); auto or host:port joins a
    # running cluster.
    sampler: str = "local"
    ray_address: str | None = None
    # A run folder or policy.pt whose parameters the run starts from instead of a fresh
    # initialisation (e.g. to continue a trained policy with other settings); its policy
    # must have this config's shapes and nonlinearity. null: initialise from seed.
    init_policy: str | None = None

    @classmethod
    def keys(cls) -> list[str]:
        """Valid keys, MAML-RL spelling."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build and validate; unknown keys and wrong types raise ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw)}")
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name not in hints:
                raise ConfigError(
                    f"unknown config key {key!r}; valid keys: {', '.join(cls.keys())}"
                )
            values[name] = _coerce(key, value, hints[name])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_saved(cls, raw: dict[str, Any]) -> Config:
        """A run folder's saved config. Keys added after the run was written get the value
        that reproduces what the run did (e.g. no action rescaling), not today's default."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw)}")
        return cls.from_dict({**SAVED_RUN_DEFAULTS, **raw})

    def validate(self) -> None:
        """Value checks (types are checked in from_dict)."""
        for name in ("fast_lr", "max_kl", "init_std", "init_output_scale", "outer_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_key(name)} must be > 0, got {getattr(self, name)}")
        for name in (
            "fast_batch_size",
            "num_steps",
            "meta_batch_size",
            "num_batches",
            "cg_iters",
            "ls_max_steps",
            "fvp_subsample",
            "num_workers",
            "ppo_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)} must be >= 1, got {getattr(self, name)}")
        if self.cg_damping < 0:
            raise ConfigError(f"cg-damping must be >= 0, got {self.cg_damping}")
        if not 0 < self.ls_backtrack_ratio < 1:
            raise ConfigError(
                f"ls-backtrack-ratio must be in (0, 1), got {self.ls_backtrack_ratio}"
            )
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{_key(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.fvp_subsample_by not in FVP_SUBSAMPLE_BY:
            raise ConfigError(
                f"fvp-subsample-by must be one of {', '.join(FVP_SUBSAMPLE_BY)}, "
                f"got {self.fvp_subsample_by!r}"
            )
        for key, value, choices in (
            ("inner-loss", self.inner_loss, INNER_LOSSES),
            ("outer", self.outer, OUTER_STEPS),
            ("trust-region", self.trust_region, TRUST_REGIONS),
        ):
            if value not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip-eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_penalty < 0:
            raise ConfigError(f"kl-penalty must be >= 0, got {self.kl_penalty}")
        if self.kl_target is not None:
            if not self.kl_target > 0:
                raise ConfigError(f"kl-target must be > 0 or null, got {self.kl_target}")
            if self.kl_penalty == 0:
                raise ConfigError("kl-target adapts kl-penalty by halving and doubling: "
                                  "it needs kl-penalty > 0")  # fmt: skip
        if (
            self.inner_loss == "dice"
            and self.outer == "trpo"
            and self.fvp_subsample > 1
            and self.fvp_subsample_by == "steps"
        ):
            raise ConfigError(
                "inner-loss dice sums log-probabilities along whole episodes, which "
                "fvp-subsample-by steps would cut: use fvp-subsample-by episodes"
            )
        if self.estimator not in METHODS:
            raise ConfigError(
                f"estimator must be one of {', '.join(METHODS)}, got {self.estimator!r}"
            )
        self._check_order("estimator", self.estimator, "order", self.order)
        if self.fvp_estimator is not None or self.fvp_order is not None:
            if self.fvp_estimator is not None and self.fvp_estimator not in METHODS:
                raise ConfigError(
                    f"fvp-estimator must be one of {', '.join(METHODS)} or null, "
                    f"got {self.fvp_estimator!r}"
                )
            method, order = self.fvp_method()
            self._check_order("fvp-estimator", method, "fvp-order", order)
        if isinstance(self.chunk_size, str):
            if self.chunk_size != "auto":
                raise ConfigError(
                    f"chunk-size must be an int >= 1, null or 'auto', got {self.chunk_size!r}"
                )
        elif self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk-size must be >= 1, null or 'auto', got {self.chunk_size}")
        if self.hvp_mode not in HVP_MODES:
            raise ConfigError(
                f"hvp-mode must be one of {', '.join(HVP_MODES)}, got {self.hvp_mode!r}"
            )
        if self.diagnose_every < 0:
            raise ConfigError(f"diagnose-every must be >= 0, got {self.diagnose_every}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ConfigError(f"max-episode-steps must be >= 1, got {self.max_episode_steps}")
        if not self.hidden_sizes or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden_sizes
        ):
            raise ConfigError(
                f"hidden-sizes must be a list of positive ints, got {self.hidden_sizes}"
            )
        if self.nonlinearity not in NONLINEARITIES:
            raise ConfigError(
                f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, "
                f"got {self.nonlinearity!r}"
            )
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        self._check_sampler()

    def _check_sampler(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.ray_address is not None:
            if self.sampler != "ray":
                raise ConfigError(
                    f"ray-address {self.ray_address!r} needs sampler: ray (sampler is "
                    f"{self.sampler!r}; --ray-address null unsets it)"
                )
            if not self.ray_address.strip():
                raise ConfigError(
                    "ray-address must be 'auto', 'host:port', 'local' or null, got ''"
                )

    def _check_order(self, what: str, method: str, order_key: str, order: int) -> None:
        try:
            effective_order(method, order, self.num_steps)
        except ValueError as err:
            raise ConfigError(
                f"{order_key} for {what} {method} (num-steps {self.num_steps}): {err}"
            ) from err

    def diff(self, saved: Config, ignore: Sequence[str] = ()) -> list[str]:
        """``"key (saved x, given y)"`` for every key whose value in ``saved`` (a run's saved
        config) differs from this one's, MAML-RL spelling; keys in ``ignore`` are left out."""
        skip = {_key(k) for k in ignore}
        return [
            f"{_key(f.name)} (saved {getattr(saved, f.name)!r}, given {getattr(self, f.name)!r})"
            for f in dataclasses.fields(self)
            if _key(f.name) not in skip and getattr(saved, f.name) != getattr(self, f.name)
        ]

    def fvp_method(self) -> tuple[str, int]:
        """(estimator, order) of the J products inside Fisher-vector products."""
        method = self.fvp_estimator if self.fvp_estimator is not None else self.estimator
        return method, self.fvp_order if self.fvp_order is not None else self.order

    def advice(self) -> list[str]:
        """Settings that are valid but measured to train badly, one line each (binom-rl-train
        prints them as notes; nothing is changed)."""
        notes = []
        method, order = self.fvp_method()
        if (
            self.outer == "trpo"
            and self.trust_region == "post"  # the only Fisher with J products
            and method == "binom"
            and order < self.num_steps
            and self.fvp_subsample > 1
            and self.fvp_subsample_by == "episodes"
        ):
            notes.append(
                f"BinomMAML's own Fisher products (order {order} < num-steps "
                f"{self.num_steps}) expand J from the inner-loss Hessians of 1 in "
                f"{self.fvp_subsample} whole episodes, whose fast-lr x norm grows past 1 as "
                "the policy sharpens (binom-rl-inspect-curvature), out of the expansion's "
                "reach; on 2D navigation at K = 3 this trained clearly worse than exact MAML. "
                "Consider --fvp-estimator maml or --fvp-subsample-by steps "
                "(docs/notes/fisher_data.md)"
            )
        return notes


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a YAML/flag value against the field's type; ints are accepted for floats."""
    args = typing.get_args(hint)
    optional = type(None) in args
    expected = next(a for a in args if a is not type(None)) if args else hint
    base = expected.__name__
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be null")
    others = [a for a in args if a not in (type(None), expected)]
    if any(isinstance(value, a) and not isinstance(value, bool) for a in others):
        return value  # e.g. chunk-size: int | str | None accepts "auto"
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and isinstance(value, tuple):
        value = list(value)
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{key} must be of type {base}, got {value!r} ({type(value).__name__})")
    return value


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a plain dict (ConfigError if unreadable)."""
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())  # PyYAML's message spans lines: keep one
        raise ConfigError(f"config {path} is not valid YAML: {detail}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return raw


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--key`` flag per config key; values are YAML-parsed (``--hidden-sizes [100,100]``).

    Flags left out are absent from the namespace (SUPPRESS), so only the flags given on
    the command line override the file, and ``--chunk-size null`` can reset a value.
    """
    group = parser.add_argument_group("config overrides (MAML-RL key names)")
    for key in Config.keys():
        group.add_argument(
            f"--{key}",
            dest=f"cfg_{key}",
            type=_yaml_value,
            default=argparse.SUPPRESS,
            metavar=key.upper().replace("-", "_"),
        )


def _yaml_value(text: str) -> Any:
    return yaml.safe_load(text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys given as flags, MAML-RL spelling."""
    return {
        key: getattr(args, f"cfg_{key}") for key in Config.keys() if hasattr(args, f"cfg_{key}")
    }


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
