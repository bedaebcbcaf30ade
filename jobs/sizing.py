"""How many replicas a job starts on the connected cluster, on what device, and the Ray resources of each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loupe.jobs.gpus import GpuPlan
from loupe.jobs.scheduler import SHARDS_PER_REPLICA
from loupe.schemas.config import JobConfig

# Ray restarts a replica whose process died this many times before giving up on it.
REPLICA_MAX_RESTARTS = 3

# `ray` is imported where it is used, never here: importing it writes to os.environ.


@dataclass(frozen=True)
class ReplicaResources:
    """How many replicas a job starts on the connected cluster, on what device, and the Ray options of each."""

    count: int
    device: str  # "cpu" or "cuda"
    threads: int | None  # torch threads of a CPU replica; None on a GPU
    options: dict[str, Any]  # Ray actor options of a model replica
    judge_options: dict[str, Any]  # of a separate moderation replica (--moderation-model)
    # A replica's share of its GPU when below one: the cap its allocator keeps under (see jobs.replicas).
    memory_fraction: float | None = None
    judge_memory_fraction: float | None = None
    sizing: str = ""  # what was chosen and why, in words


def replica_resources(config: JobConfig, plan: GpuPlan | None = None) -> ReplicaResources:
    """One replica per GPU share, or config.replicas on CPUs splitting the cluster's CPUs between them.

    `plan` is the GPUs per replica jobs.gpus worked out and checked; without it, the flag's
    (or one GPU).
    """
    import ray

    separate_judge = config.moderates and config.moderation_model is not None
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    # max_task_retries=0: shards are retried by the scheduler, on another replica where possible.
    common = {
        "max_restarts": REPLICA_MAX_RESTARTS,
        "max_task_retries": 0,
        "scheduling_strategy": "SPREAD",
        "max_concurrency": SHARDS_PER_REPLICA,
    }
    if gpus > 0:
        share = plan.gpus if plan is not None else config.gpus_per_replica or 1.0
        judge_gpus = config.moderation_gpus or share
        per_pair = share + (judge_gpus if separate_judge else 0)
        # Several CPUs beside each GPU replica (Ray sets OMP_NUM_THREADS to an actor's CPUs, and the
        # image processors run torch operators): by default the node's CPUs split by its GPU shares.
        node = max((n["Resources"] for n in ray.nodes() if n["Alive"]), key=lambda r: r.get("GPU", 0.0))
        pair_cpus = max(1, math.floor(node.get("CPU", 1.0) * min(1.0, per_pair / node["GPU"])))
        cpus = config.cpus_per_replica or max(1, pair_cpus - (pair_cpus // 2 if separate_judge else 0))
        judge_cpus = config.cpus_per_replica or max(1, pair_cpus // 2)
        return ReplicaResources(
            count=config.replicas or max(1, math.floor(gpus / per_pair)),
            device="cuda",
            threads=cpus,
            options={"num_gpus": share, "num_cpus": cpus, **common},
            judge_options={"num_gpus": judge_gpus, "num_cpus": judge_cpus, **common},
            memory_fraction=share if share < 1 else None,
            judge_memory_fraction=judge_gpus if judge_gpus < 1 else None,
            sizing=plan.reason if plan is not None else f"{share:g} GPU(s) per replica",
        )
    count = config.replicas or 1
    actors = count * (2 if separate_judge else 1)
    # A replica must fit on one node, and N replicas on the cluster, or Ray would leave some
    # pending forever; fractions are fine (torch threads are whole).
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    cpus = round(min(node_cpus, resources.get("CPU", 1.0) / actors), 2)
    return ReplicaResources(
        count=count,
        device="cpu",
        threads=max(1, math.floor(cpus)),
        options={"num_cpus": cpus, **common},
        judge_options={"num_cpus": cpus, **common},
    )


def size_replicas(config: JobConfig) -> ReplicaResources:
    """The job's replicas on the connected cluster, every size checked before anything is started or waits.

    A GPU count Ray would reject or no node has, a model that fits no node, or --quantize where
    it cannot run is one UserError line.
    """
    import ray
    from loupe.jobs.gpus import read_checkpoint, size_replica_gpus
    from loupe.workers.models.devices import check_quantize

    plan = size_replica_gpus(config, ray.nodes(), read_checkpoint)
    check_quantize(config.quantize, gpu=plan is not None)
    return replica_resources(config, plan)
