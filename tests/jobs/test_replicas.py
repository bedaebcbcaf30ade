"""Replica sizing on a cluster's resources, and joining Ray once."""

import pytest

from loupe.jobs.replicas import connect_ray
from loupe.jobs.scheduler import SHARDS_PER_REPLICA
from loupe.jobs.sizing import replica_resources
from loupe.schemas.config import JobConfig


def _config(**kw):
    return JobConfig(input="in", output="out", model="m", tasks="caption,moderate", **kw)


@pytest.fixture
def cluster(monkeypatch):
    """A cluster of the given nodes' resources, as Ray would report it (no Ray started)."""
    import ray

    def shape(*nodes, dead=()):
        alive = [{"Alive": True, "Resources": n} for n in nodes] + [{"Alive": False, "Resources": n} for n in dead]
        total = {}
        for node in nodes:
            for key, value in node.items():
                total[key] = total.get(key, 0.0) + value
        monkeypatch.setattr(ray, "nodes", lambda: alive)
        monkeypatch.setattr(ray, "cluster_resources", lambda: total)

    return shape


@pytest.mark.parametrize(
    ("settings", "count", "cpus", "threads"),
    [
        ({}, 1, 8.0, 8),  # one replica gets a whole node
        ({"replicas": 2}, 2, 6.0, 6),  # 12 CPUs over two, but a replica must fit on one node
        ({"replicas": 5}, 5, 2.4, 2),  # fractions of a CPU asked of Ray; whole torch threads
        ({"replicas": 2, "moderation_model": "judge"}, 2, 3.0, 3),  # four actors share the CPUs
    ],
)
def test_cpu_replicas_share_the_cluster(cluster, settings, count, cpus, threads):
    cluster({"CPU": 8.0}, {"CPU": 4.0}, dead=[{"CPU": 64.0}])
    sized = replica_resources(_config(**settings))
    assert (sized.count, sized.device, sized.threads) == (count, "cpu", threads)
    assert sized.options["num_cpus"] == sized.judge_options["num_cpus"] == cpus
    assert "num_gpus" not in sized.options
    assert sized.options["max_concurrency"] == SHARDS_PER_REPLICA and sized.options["max_task_retries"] == 0


@pytest.mark.parametrize(
    ("settings", "count", "gpus", "judge_gpus", "threads"),
    [
        ({}, 4, 1.0, 1.0, 4),  # a node's 16 CPUs split by GPU share: 4 beside each GPU
        ({"gpus_per_replica": 0.5}, 8, 0.5, 0.5, 2),
        ({"replicas": 2}, 2, 1.0, 1.0, 4),
        ({"moderation_model": "judge", "moderation_gpus": 0.5}, 2, 1.0, 0.5, 3),  # 4 GPUs / 1.5 per pair
    ],
)
def test_gpu_replicas_one_per_share(cluster, settings, count, gpus, judge_gpus, threads):
    cluster({"CPU": 16.0, "GPU": 4.0})
    sized = replica_resources(_config(**settings))
    assert (sized.count, sized.device, sized.threads) == (count, "cuda", threads)
    assert (sized.options["num_gpus"], sized.judge_options["num_gpus"]) == (gpus, judge_gpus)
    # GPU replicas get CPUs beside them (image preprocessing), as many as their torch threads,
    # and never more than the node holds.
    assert sized.options["num_cpus"] == threads
    actors = count * (2 if "moderation_model" in settings else 1)
    assert actors * max(sized.options["num_cpus"], sized.judge_options["num_cpus"]) <= 16


def test_connected_process_is_left_as_it_is(ray_cluster):
    assert connect_ray() is False
    # The session's two nodes of two CPUs: one replica gets a node's two.
    sized = replica_resources(_config())
    assert (sized.count, sized.threads, sized.options["num_cpus"]) == (1, 2, 2.0)
