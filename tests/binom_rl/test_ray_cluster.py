"""The Ray backend on a two-node cluster on this machine (two raylets on localhost, Ray's
own ray.cluster_utils.Cluster): the sampler joins it by host:port, one actor per node
gives the local episodes, and a node that goes away is one error within seconds."""

from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from binom_rl import ray_sampler  # noqa: E402  (needs ray)
from binom_rl.agents.policies import batched_sample, make_policy  # noqa: E402
from binom_rl.sampler import MultiTaskSampler  # noqa: E402
from tests.helpers.episodes import assert_episodes_equal  # noqa: E402

NAV = "binom_rl/2DNavigation-v0"


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each: two actors must sit on different nodes."""
    cluster = cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster, second
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_give_the_local_episodes_and_a_lost_node_is_one_error(cluster):
    cluster, second = cluster
    with MultiTaskSampler(NAV, max_episode_steps=20) as local:
        tasks = local.sample_tasks(3, seed=0)
        policy = make_policy(local.observation_space, local.action_space, (8,), "tanh")
        phi = {k: v + torch.randn(3, *v.shape) for k, v in policy.init_params(0).items()}
        act = lambda obs, generator: batched_sample(policy, phi, obs, generator)  # noqa: E731
        expected = local.sample(tasks, act, 3, seed=1)

    sampler = MultiTaskSampler(
        NAV, max_episode_steps=20, backend="ray", num_workers=2, ray_address=cluster.address
    )
    try:
        assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 2
        episodes = sampler.sample(tasks, act, 3, seed=1)
        assert_episodes_equal(episodes, expected)

        cluster.remove_node(second)  # the node of one of the two actors goes away
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="\\(a Ray actor\\) died"):
            sampler.sample(tasks, act, 3, seed=1)
        elapsed = time.monotonic() - start
        print(f"lost node reported {elapsed:.2f} s after it was removed")
        assert elapsed < 60
    finally:
        sampler.close()
    assert not ray.is_initialized()  # the sampler made the connection, and closed it
    assert ray_sampler._state == {"users": 0, "owned": False}
