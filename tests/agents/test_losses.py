"""Policy losses against independent computations.

Inner losses: on a tabular MDP small enough to enumerate every trajectory (3 states, 2
actions, horizon 3, so that pairs of time steps give ProMP's cross terms), the exact
expected return J(theta), its gradient and Hessian (autograd through the enumeration) and
the split of the Hessian into H1, H2 and the cross terms; then each inner loss's gradient
and Hessian, (a) in exact expectation (every trajectory weighted by its probability) and
(b) averaged over episodes drawn by the sampler, within 5 standard errors of the mean.
PPO's clipped surrogate against a hand computation; DiCE's weights telescope.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.func import hessian, jacrev, vmap

from binom_rl.agents.losses import PolicyLosses, dice_weights
from binom_rl.agents.policies import CategoricalMLPPolicy, GaussianMLPPolicy
from binom_rl.rl import discounted_returns, flatten_params, unflatten_params
from binom_rl.sampler import MultiTaskSampler

S, A, H = 3, 2, 3
MDP = "binom_rl/TabularMDP-v0"


@pytest.fixture(scope="module")
def problem():
    """A fixed task, a (4,)-tanh categorical policy with non-uniform action probabilities,
    and its float64 parameters."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    task = {
        "transitions": rng.dirichlet(np.ones(S), size=(S, A)),
        "rewards": rng.normal(1.0, 1.0, size=(S, A)),
    }
    policy = CategoricalMLPPolicy(S, A, hidden_sizes=(4,), nonlinearity="tanh")
    params = {k: 1.5 * v.double() for k, v in policy.init_params(seed=3).items()}
    params["layers.1.bias"] = torch.tensor([0.4, -0.3], dtype=torch.float64)
    return task, policy, params


def _trajectories(task):
    """Every trajectory (s_0 = 0, a_0, s_1, ..., a_{H-1}): states and actions [N, H], the log
    transition probability of each [N], rewards [N, H]."""
    P = torch.as_tensor(task["transitions"])
    R = torch.as_tensor(task["rewards"])
    states, actions, log_trans = [], [], []
    for choice in itertools.product(range(A), range(S), repeat=H - 1):
        for last in range(A):
            s, acts, sts, lp = 0, [], [], 0.0
            pairs = [*zip(choice[::2], choice[1::2], strict=True), (last, None)]
            for a, s_next in pairs:
                sts.append(s)
                acts.append(a)
                if s_next is not None:
                    lp += math.log(P[s, a, s_next])
                    s = s_next
            states.append(sts)
            actions.append(acts)
            log_trans.append(lp)
    states, actions = torch.tensor(states), torch.tensor(actions)
    return states, actions, torch.tensor(log_trans, dtype=torch.float64), R[states, actions]


def _log_pi(policy, params, states, actions):
    """log pi(a_t | s_t) [..., H] for one-hot observations of ``states``."""
    obs = torch.eye(S, dtype=torch.float64)[states]
    return policy.log_prob(params, obs, actions)


def _discount(gamma):
    return gamma ** torch.arange(H, dtype=torch.float64)


@pytest.fixture(scope="module")
def exact(problem):
    """J, grad J, hess J of the return discounted from t = 0, and H1, H2, cross terms, for
    gamma in (1, 0.8), by enumeration."""
    task, policy, params = problem
    states, actions, log_trans, rewards = _trajectories(task)
    flat = flatten_params(params)
    out = {}
    for gamma in (1.0, 0.8):
        disc_rewards = rewards * _discount(gamma)  # gamma^t r_t

        def expected_return(x, disc_rewards=disc_rewards):
            log_p = _log_pi(policy, unflatten_params(x, params), states, actions).sum(-1)
            return (torch.exp(log_p + log_trans) * disc_rewards.sum(-1)).sum()

        prob = torch.exp(_log_pi(policy, params, states, actions).sum(-1) + log_trans)
        assert float(prob.sum()) == pytest.approx(1.0, abs=1e-12)
        to_go = disc_rewards.flip(-1).cumsum(-1).flip(-1)  # G_t = sum_{t' >= t} gamma^t' r_t'

        def log_pi_flat(x, s, a):  # one trajectory's log pi(a_t | s_t), [H]
            return _log_pi(policy, unflatten_params(x, params), s, a)

        per_trajectory = (None, 0, 0)
        scores = vmap(jacrev(log_pi_flat), in_dims=per_trajectory)(flat, states, actions)
        curv = vmap(hessian(log_pi_flat), in_dims=per_trajectory)(flat, states, actions)
        h1 = torch.einsum("n,nt,nti,ntj->ij", prob, to_go, scores, scores)
        h2 = torch.einsum("n,nt,ntij->ij", prob, to_go, curv)
        # cross terms: pairs a != b of steps <= t, weighted by gamma^t r_t
        cum = scores.cumsum(1)
        pairs = torch.einsum("nti,ntj->ntij", cum, cum) - torch.einsum(
            "nti,ntj->ntij", scores, scores
        ).cumsum(1)
        cross = torch.einsum("n,nt,ntij->ij", prob, disc_rewards, pairs)
        out[gamma] = {
            "J": float(expected_return(flat)),
            "grad": torch.func.grad(expected_return)(flat),
            "hess": hessian(expected_return)(flat),
            "H1": h1,
            "H2": h2,
            "cross": cross,
            "prob": prob,
        }
    return states, actions, rewards, out


def _data(policy, params, states, actions, rewards, gamma, baseline, inner_loss):
    """Task-major inner data, one episode per 'task' [N, H, 1, ...]: advantages
    A_t = G_t - b(s_t, t) (G_t the return from t), the sampling policy's log-probs (the
    current one's: the expectations are taken at the sampling policy)."""
    n = states.shape[0]
    mask = torch.ones(H, n, dtype=torch.float64)
    to_go = discounted_returns(rewards.T, mask, gamma)  # time-major [H, N]
    advantages = to_go - baseline[states.T, torch.arange(H).unsqueeze(1)]
    obs = torch.nn.functional.one_hot(states, S).double()
    data = {
        "obs": obs.unsqueeze(2),
        "actions": actions.unsqueeze(2),
        "advantages": advantages.T.unsqueeze(2),
        "mask": mask.T.unsqueeze(2),
    }
    with torch.no_grad():
        data["old_log_prob"] = policy.log_prob(params, data["obs"], data["actions"])
    if inner_loss == "dice":
        data["dice_weights"] = dice_weights(advantages, mask, gamma).T.unsqueeze(2)
    return data


def _per_episode(policy, params, data, inner_loss):
    """-H x each episode's loss, its gradient and Hessian in the flat parameters: the loss is
    a mean over the episode's H steps, the return a sum."""
    loss_fn = getattr(PolicyLosses(policy), inner_loss)

    def one(x, d):
        one_task = {k: v.unsqueeze(0) for k, v in d.items()}
        return -H * loss_fn(unflatten_params(x, params), one_task)[0]

    flat = flatten_params(params)
    grads = vmap(torch.func.grad(one), in_dims=(None, 0))(flat, data)
    hessians = vmap(hessian(one), in_dims=(None, 0))(flat, data)
    return grads, hessians


NO_BASELINE = torch.zeros(S, H, dtype=torch.float64)
# a state- and time-dependent baseline (arbitrary values): unbiased for every loss's
# gradient, for lvc's and dice's Hessians too, not for vpg's
STATE_BASELINE = torch.tensor([[0.7, -0.4, 1.1], [-0.9, 0.5, 0.2], [1.4, 0.3, -0.6]],
                              dtype=torch.float64)  # fmt: skip

# (inner loss, gamma, baseline, which exact Hessian its expectation equals)
EXPECTED = [
    ("vpg", 1.0, NO_BASELINE, "H2"),
    ("lvc", 1.0, NO_BASELINE, "H1+H2"),
    ("lvc", 1.0, STATE_BASELINE, "H1+H2"),
    ("dice", 1.0, NO_BASELINE, "hess"),
    ("dice", 1.0, STATE_BASELINE, "hess"),
    ("dice", 0.8, STATE_BASELINE, "hess"),
]


def _target(terms, which):
    return terms["H1"] + terms["H2"] if which == "H1+H2" else terms[which]


def test_enumeration_hessian_splits_into_h1_h2_and_nonzero_cross_terms(exact):
    *_, out = exact
    for terms in out.values():
        torch.testing.assert_close(
            terms["H1"] + terms["H2"] + terms["cross"], terms["hess"], rtol=1e-10, atol=1e-12
        )
        # horizon 3: the cross terms matter (a one-step bandit has none)
        assert terms["cross"].norm() > 0.1 * terms["hess"].norm()
        assert terms["H1"].norm() > 0.1 * terms["hess"].norm()


@pytest.mark.parametrize("inner_loss,gamma,baseline,which", EXPECTED)
def test_inner_loss_exact_expectations(problem, exact, inner_loss, gamma, baseline, which):
    """Weighted by each trajectory's probability: every loss's gradient is grad J, and its
    Hessian is H2 (vpg), H1 + H2 (lvc), the whole Hessian (dice, with a state baseline and
    discounting too)."""
    _, policy, params = problem
    states, actions, rewards, out = exact
    terms = out[gamma]
    data = _data(policy, params, states, actions, rewards, gamma, baseline, inner_loss)
    grads, hessians = _per_episode(policy, params, data, inner_loss)
    prob = terms["prob"]
    torch.testing.assert_close(
        torch.einsum("n,np->p", prob, grads), terms["grad"], rtol=1e-9, atol=1e-11
    )
    torch.testing.assert_close(
        torch.einsum("n,nij->ij", prob, hessians), _target(terms, which), rtol=1e-9, atol=1e-11
    )


def test_vpg_hessian_with_a_state_baseline_is_biased(problem, exact):
    """Why vpg's H2 holds only without a baseline: E[hess log pi * b(s)] =
    -E[grad log pi grad log pi^T b(s)] != 0. Its gradient stays exact."""
    _, policy, params = problem
    states, actions, rewards, out = exact
    terms = out[1.0]
    data = _data(policy, params, states, actions, rewards, 1.0, STATE_BASELINE, "vpg")
    grads, hessians = _per_episode(policy, params, data, "vpg")
    prob = terms["prob"]
    torch.testing.assert_close(torch.einsum("n,np->p", prob, grads), terms["grad"])
    bias = torch.einsum("n,nij->ij", prob, hessians) - terms["H2"]
    assert bias.norm() > 0.05 * terms["H2"].norm()


@pytest.fixture(scope="module")
def sampled(problem):
    """6000 episodes of the task drawn by the MultiTaskSampler with the policy at the
    problem's parameters: states, actions, rewards [N, H]."""
    task, policy, params = problem
    return _sampled_episodes(task, policy, params, 6000, seed=11)


def _sampled_episodes(task, policy, params, num_episodes, seed):
    sampler = MultiTaskSampler(
        MDP, env_kwargs={"num_states": S, "num_actions": A}, max_episode_steps=H
    )
    phi = {k: v.float().unsqueeze(0) for k, v in params.items()}
    try:

        def act(obs, generator):
            return policy.sample(phi, obs, generator)

        episodes = sampler.sample([task], act, num_episodes, seed=seed)
    finally:
        sampler.close()
    states = episodes.observations[:, 0].argmax(-1).T  # one-hot -> index, [N, H]
    return states, episodes.actions[:, 0].T, episodes.rewards[:, 0].T.double()


@pytest.mark.parametrize("inner_loss,gamma,baseline,which", EXPECTED)
def test_inner_loss_sampled_averages_within_standard_errors(
    problem, exact, sampled, inner_loss, gamma, baseline, which
):
    """The same expectations from 6000 episodes the sampler draws: each entry of the mean
    gradient and Hessian within 5 standard errors of the exact value; and the test can
    fail: the mean Hessian is more than 5 standard errors away from the other losses'
    targets somewhere."""
    _, policy, params = problem
    _, _, _, out = exact
    terms = out[gamma]
    states, actions, rewards = sampled
    data = _data(policy, params, states, actions, rewards, gamma, baseline, inner_loss)
    grads, hessians = _per_episode(policy, params, data, inner_loss)

    def z_scores(samples, target):
        mean = samples.mean(0)
        stderr = samples.std(0) / math.sqrt(samples.shape[0])
        return (mean - target).abs() / (stderr + 1e-12)

    assert z_scores(grads, terms["grad"]).max() < 5
    assert z_scores(hessians, _target(terms, which)).max() < 5
    for other in {"H2", "H1+H2", "hess"} - {which}:
        assert z_scores(hessians, _target(terms, other)).max() > 5, other


def test_dice_weights_telescope_to_discounted_advantages():
    """sum_{t' >= t} w_t' = gamma^t A_t on valid steps, 0 after an episode ends."""
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 2, 3, dtype=torch.float64)
    mask[4:, 1, 0] = 0  # an episode that ends after 4 steps
    adv = adv * mask
    gamma = 0.9
    w = dice_weights(adv, mask, gamma)
    suffix = w.flip(0).cumsum(0).flip(0)
    discount = (gamma ** torch.arange(6, dtype=torch.float64)).reshape(6, 1, 1)
    torch.testing.assert_close(suffix, discount * adv * mask)
    assert (w[4:, 1, 0] == 0).all()


def test_ppo_clipped_surrogate_against_hand_computation():
    """Ratios 0.5, 1, 1.5 against A = +1 and -1 with clip 0.2: min(r A, clip(r) A) is
    0.5, 1, 1.2 for A = 1 (the clip caps the gain) and -0.8, -1, -1.5 for A = -1 (it caps
    the ratio's benefit, never the loss), so the loss is -(0.5 + 1 + 1.2 - 0.8 - 1 - 1.5) / 6.
    Its derivative in each log-probability is -r A / 6 where the unclipped term is the min
    (at r = 1 both are, and the clamp passes the gradient) and 0 where the clipped one is."""
    policy = GaussianMLPPolicy(1, 1, hidden_sizes=(2,))
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    # N(mu, 1) at action 1: log pi = -(1 - mu)^2 / 2 - log(2 pi) / 2, d log pi / d mu = 1 at 0
    new_log_prob = torch.full((6,), -0.5 - 0.5 * math.log(2 * math.pi), dtype=torch.float64)
    data = {
        "actions": torch.ones(1, 6, 1, 1, dtype=torch.float64),
        "advantages": adv.reshape(1, 6, 1),
        "mask": torch.ones(1, 6, 1, dtype=torch.float64),
        "old_log_prob": (new_log_prob - torch.log(ratio)).reshape(1, 6, 1),
    }
    log_std = torch.zeros(1, 1, 1, 1, dtype=torch.float64)

    def loss(mean):
        return PolicyLosses(policy).clipped_surrogate((mean, log_std), data, 0.2)[0]

    mean = torch.zeros(1, 6, 1, 1, dtype=torch.float64)
    assert float(loss(mean)) == pytest.approx(-(0.5 + 1 + 1.2 - 0.8 - 1 - 1.5) / 6, abs=1e-12)
    got = torch.func.grad(loss)(mean).reshape(6)
    want = torch.tensor([-0.5, -1.0, 0.0, 0.0, 1.0, 1.5], dtype=torch.float64) / 6
    torch.testing.assert_close(got, want)
