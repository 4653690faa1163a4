"""MLP policies in functional style.

The ``nn.Module`` is only the container that defines the parameter names and
shapes; every public method is a pure function of a parameter dict, so it works
under ``torch.func`` (grad, jvp, vmap over a leading task dim of the params).
Parameter names: ``log_std`` (Gaussian policy only), then ``layers.{i}.weight``,
``layers.{i}.bias``; dict order is ``named_parameters()`` order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import gymnasium as gym
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "GaussianMLPPolicy",
    "CategoricalMLPPolicy",
    "make_policy",
    "batched_sample",
]

#: The ``nonlinearity`` names (the config's NONLINEARITIES): the function the policies apply,
#: and the nn.Module of the same function (what SB3's MLPs are built from).
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], type[nn.Module]]] = {
    "tanh": (torch.tanh, nn.Tanh),
    "relu": (torch.relu, nn.ReLU),
}


class _MLPPolicyBase(nn.Module):
    """Shared MLP body: obs_dim -> hidden_sizes -> out_dim.

    ``init_output_scale`` multiplies the output layer's initial weights: 1.0 is plain
    Xavier (MAML-RL); a small value starts the policy with outputs near zero for every
    observation (the Gaussian's means, the categorical's logits), as CleanRL's PPO does with
    0.01 (the Ant configs, docs/results/locomotion.md).
    """

    def __init__(
        self,
        obs_dim: int,
        out_dim: int,
        hidden_sizes: Sequence[int],
        nonlinearity: str,
        init_output_scale: float = 1.0,
    ):
        super().__init__()
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(
                f"nonlinearity must be one of {sorted(ACTIVATIONS)}, got {nonlinearity!r}"
            )
        if not init_output_scale > 0:
            raise ValueError(f"init_output_scale must be > 0, got {init_output_scale}")
        self.init_output_scale = float(init_output_scale)
        self.obs_dim = int(obs_dim)
        self.out_dim = int(out_dim)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.nonlinearity = nonlinearity
        sizes = (self.obs_dim, *self.hidden_sizes, self.out_dim)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self._act = ACTIVATIONS[nonlinearity][0]

    def _init_layers(self, generator: torch.Generator | None) -> dict[str, Tensor]:
        # Xavier-uniform weights, zero biases (MAML-RL convention), the output layer's
        # weights times init_output_scale; drawn from a private generator so
        # init_params(seed) is reproducible and leaves the global RNG alone.
        params: dict[str, Tensor] = {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            fan_out, fan_in = layer.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            if i == last:
                bound *= self.init_output_scale
            w = torch.rand(fan_out, fan_in, generator=generator, dtype=layer.weight.dtype)
            params[f"layers.{i}.weight"] = (2.0 * w - 1.0) * bound
            params[f"layers.{i}.bias"] = torch.zeros(fan_out, dtype=layer.bias.dtype)
        return params

    def params(self) -> dict[str, Tensor]:
        """The module's current parameters as a detached dict (clone)."""
        return {k: v.detach().clone() for k, v in self.named_parameters()}

    def _mlp(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        """Hand-written forward over the dict (vmap-friendly, no module state).

        Parameters with a leading task dim T (weights [T, out, in]) take obs [T, ..., in]
        and run one batched matmul per layer, without vmap: the sampler calls it that way
        once per env step (where vmap's own per-call cost is a large part of such a small
        forward), and the meta-learner's task-batched losses for every gradient and HVP.
        """
        h = obs
        n = len(self.layers)
        for i in range(n):
            weight, bias = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            if weight.dim() == 3:
                flat = h.reshape(h.shape[0], -1, h.shape[-1])
                out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
                h = out.reshape(*h.shape[:-1], out.shape[-1])
            else:
                h = F.linear(h, weight, bias)
            if i < n - 1:
                h = self._act(h)
        return h


class GaussianMLPPolicy(_MLPPolicyBase):
    """pi(a|s) = N(mu_theta(s), diag(sigma^2)), state-independent log sigma."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int] = (64, 64),
        nonlinearity: str = "tanh",
        init_std: float = 1.0,
        min_log_std: float | None = None,
        init_output_scale: float = 1.0,
    ):
        super().__init__(obs_dim, act_dim, hidden_sizes, nonlinearity, init_output_scale)
        self.act_dim = int(act_dim)
        self.init_std = float(init_std)
        self.min_log_std = min_log_std
        self.log_std = nn.Parameter(torch.full((self.act_dim,), math.log(self.init_std)))
        with torch.no_grad():
            for k, v in self.init_params(None).items():
                self.get_parameter(k).copy_(v)

    def init_params(self, seed: int | None = None) -> dict[str, Tensor]:
        """Fresh detached parameters (reproducible for a given seed)."""
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        params = self._init_layers(gen)
        params["log_std"] = torch.full((self.act_dim,), math.log(self.init_std))
        # Same order as named_parameters(), so flat vectors match the module's.
        return {k: params[k] for k, _ in self.named_parameters()}

    def mean_and_std(self, params: dict[str, Tensor], obs: Tensor) -> tuple[Tensor, Tensor]:
        """mu [..., act_dim] and sigma [act_dim] (clamped at exp(min_log_std) if set)."""
        mean, log_std = self.dist_params(params, obs)
        return mean, log_std.exp()

    def forward(self, params: dict[str, Tensor], obs: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean_and_std(params, obs)

    def log_prob(self, params: dict[str, Tensor], obs: Tensor, actions: Tensor) -> Tensor:
        """log pi(a|s); see :meth:`log_prob_dist`."""
        return self.log_prob_dist(self.dist_params(params, obs), actions)

    @staticmethod
    def log_prob_dist(dist: tuple[Tensor, Tensor], actions: Tensor) -> Tensor:
        """From (mu, log sigma):
        sum_i [-(a_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i - log(2 pi)/2]."""
        mean, log_std = dist
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, params: dict[str, Tensor], obs: Tensor, generator: torch.Generator) -> Tensor:
        """mu + sigma * eps, eps ~ N(0, I) from ``generator`` (not for use under vmap)."""
        mean, std = self.mean_and_std(params, obs)
        return self._noise(mean, std, generator)

    @staticmethod
    def _noise(mean: Tensor, std: Tensor, generator: torch.Generator) -> Tensor:
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + std * eps

    def mode(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        """The mean action."""
        return self.mean_and_std(params, obs)[0]

    def dist_params(self, params: dict[str, Tensor], obs: Tensor) -> tuple[Tensor, Tensor]:
        """Distribution parameters (mu [..., act_dim], log sigma [act_dim]) of pi(.|obs),
        log sigma clamped at ``min_log_std`` if set.

        Task-batched params (leading task dim T, obs [T, ..., obs_dim]): log sigma comes as
        [T, 1, ..., 1, act_dim], broadcastable against mu [T, ..., act_dim], so that
        log_prob_dist and kl_dist work on the whole batch unchanged.
        """
        log_std = params["log_std"]
        if self.min_log_std is not None:
            log_std = torch.clamp(log_std, min=self.min_log_std)
        mean = self._mlp(params, obs)
        if log_std.dim() == 2:
            num_tasks, act_dim = log_std.shape
            log_std = log_std.reshape(num_tasks, *(1,) * (mean.dim() - 2), act_dim)
        return mean, log_std

    @staticmethod
    def kl_dist(old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> Tensor:
        """KL between Gaussians given (mu, log sigma), per sample:
        sum_i log(s_n/s_o) + (s_o^2 + (mu_o - mu_n)^2) / (2 s_n^2) - 1/2."""
        (mu_o, log_s_o), (mu_n, log_s_n) = old, new
        var_n = torch.exp(2.0 * log_s_n)
        terms = (
            (log_s_n - log_s_o)
            + (torch.exp(2.0 * log_s_o) + (mu_o - mu_n) ** 2) / (2.0 * var_n)
            - 0.5
        )
        return terms.sum(-1)

    def kl(
        self, params_old: dict[str, Tensor], params_new: dict[str, Tensor], obs: Tensor
    ) -> Tensor:
        """KL(pi_old || pi_new) per sample (see :meth:`kl_dist`)."""
        return self.kl_dist(self.dist_params(params_old, obs), self.dist_params(params_new, obs))

    def entropy(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        """sum_i (1/2 + log(2 pi)/2 + log sigma_i), broadcast to obs leading dims."""
        mean, std = self.mean_and_std(params, obs)
        per_dim = 0.5 + 0.5 * math.log(2 * math.pi) + std.log()
        return (per_dim + torch.zeros_like(mean)).sum(-1)


class CategoricalMLPPolicy(_MLPPolicyBase):
    """pi(a|s) = softmax(logits_theta(s))_a; actions are int64 of shape obs.shape[:-1]."""

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden_sizes: Sequence[int] = (64, 64),
        nonlinearity: str = "tanh",
        init_output_scale: float = 1.0,
    ):
        super().__init__(obs_dim, num_actions, hidden_sizes, nonlinearity, init_output_scale)
        self.num_actions = int(num_actions)
        with torch.no_grad():
            for k, v in self.init_params(None).items():
                self.get_parameter(k).copy_(v)

    def init_params(self, seed: int | None = None) -> dict[str, Tensor]:
        """Fresh detached parameters (reproducible for a given seed)."""
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        return self._init_layers(gen)

    def logits(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        """Unnormalised log-probabilities [..., num_actions]."""
        return self._mlp(params, obs)

    def forward(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        return self.logits(params, obs)

    def _log_probs(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        return torch.log_softmax(self.logits(params, obs), dim=-1)

    def log_prob(self, params: dict[str, Tensor], obs: Tensor, actions: Tensor) -> Tensor:
        """log pi(a|s); see :meth:`log_prob_dist`."""
        return self.log_prob_dist(self.logits(params, obs), actions)

    @staticmethod
    def log_prob_dist(logits: Tensor, actions: Tensor) -> Tensor:
        """From the logits: log softmax(logits)_a."""
        logp = torch.log_softmax(logits, dim=-1)
        return torch.gather(logp, -1, actions.long().unsqueeze(-1)).squeeze(-1)

    def sample(self, params: dict[str, Tensor], obs: Tensor, generator: torch.Generator) -> Tensor:
        """a ~ Categorical(softmax(logits)) via torch.multinomial (not for use under vmap)."""
        return self._draw(self.logits(params, obs), generator)

    @staticmethod
    def _draw(logits: Tensor, generator: torch.Generator) -> Tensor:
        # multinomial takes at most 2-D input: flatten the leading dims.
        probs = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1])
        idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return idx.reshape(logits.shape[:-1])

    def mode(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        """argmax_a logits."""
        return self.logits(params, obs).argmax(-1)

    def dist_params(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        """Distribution parameters of pi(.|obs): the logits."""
        return self.logits(params, obs)

    @staticmethod
    def kl_dist(old: Tensor, new: Tensor) -> Tensor:
        """KL between categoricals given logits: sum_a p_old(a) (log p_old(a) - log p_new(a))."""
        lo, ln = torch.log_softmax(old, dim=-1), torch.log_softmax(new, dim=-1)
        return (lo.exp() * (lo - ln)).sum(-1)

    def kl(
        self, params_old: dict[str, Tensor], params_new: dict[str, Tensor], obs: Tensor
    ) -> Tensor:
        """KL(pi_old || pi_new) per sample (see :meth:`kl_dist`)."""
        return self.kl_dist(self.logits(params_old, obs), self.logits(params_new, obs))

    def entropy(self, params: dict[str, Tensor], obs: Tensor) -> Tensor:
        """-sum_a p(a) log p(a)."""
        logp = self._log_probs(params, obs)
        return -(logp.exp() * logp).sum(-1)


Policy = GaussianMLPPolicy | CategoricalMLPPolicy


def make_policy(
    observation_space: gym.Space,
    action_space: gym.Space,
    hidden_sizes: Sequence[int],
    nonlinearity: str,
    init_std: float = 1.0,
    init_output_scale: float = 1.0,
) -> Policy:
    """Gaussian policy for Box actions, categorical for Discrete; observations must be a Box.

    ``init_std``: the Gaussian's initial sigma; ``init_output_scale``: see _MLPPolicyBase.
    """
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"observation space must be a Box, got {observation_space}")
    obs_dim = int(math.prod(observation_space.shape))
    if isinstance(action_space, gym.spaces.Box):
        act_dim = int(math.prod(action_space.shape))
        return GaussianMLPPolicy(
            obs_dim,
            act_dim,
            hidden_sizes,
            nonlinearity,
            init_std,
            init_output_scale=init_output_scale,
        )
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalMLPPolicy(
            obs_dim, int(action_space.n), hidden_sizes, nonlinearity, init_output_scale
        )
    raise ValueError(f"unsupported action space {action_space}: need Box or Discrete")


def batched_sample(
    policy: Policy,
    stacked_params: dict[str, Tensor],
    obs: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Actions [T, B, ...] for obs [T, B, obs_dim] with per-task params (leading dim T).

    One task-batched forward (see ``_mlp``), then one random draw for the whole batch,
    so the generator is used exactly once.
    """
    if isinstance(policy, GaussianMLPPolicy):
        mean, std = policy.mean_and_std(stacked_params, obs)  # task-batched _mlp, no vmap
        return policy._noise(mean, std, generator)
    return policy._draw(policy.logits(stacked_params, obs), generator)
