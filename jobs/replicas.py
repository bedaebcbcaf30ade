"""The Ray side of a job: connecting to Ray, sizing replicas on the cluster, and the actor shells around the pipeline."""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from loupe.jobs.scheduler import SHARDS_PER_REPLICA, Probe, ShardError
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError, one_line
from loupe.schemas.plan import Shard
from loupe.schemas.records import ShardStats
from loupe.workers.models.stages import Moderating

# Ray restarts a replica whose process died this many times before giving up on it.
REPLICA_MAX_RESTARTS = 3
# Loading a model may download it first; a replica not up after this long will not come up
# (typically: more replicas than the cluster has GPUs for, left pending by Ray).
REPLICA_START_TIMEOUT_S = 3600.0

# `ray` is imported where it is used, never here: importing it writes to os.environ.


def connect_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    own_cluster: bool = False,
) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a local cluster; True when this call started Ray.

    own_cluster=True starts a fresh local cluster of num_cpus CPUs and num_gpus GPUs even where
    another local one runs. Nothing happens when this process is already connected. A cluster
    that cannot be reached or started is one UserError line.
    """
    import ray

    if ray.is_initialized():
        return False
    settings: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    # address=None joins RAY_ADDRESS if set, else starts a local cluster.
    settings["address"] = "local" if own_cluster else address
    if num_cpus is not None:
        settings["num_cpus"] = num_cpus
    if num_gpus is not None:
        settings["num_gpus"] = num_gpus
    try:
        ray.init(**settings)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = "the local machine" if own_cluster else address or os.environ.get("RAY_ADDRESS") or "the local machine"
        raise UserError(f"could not reach a Ray cluster at {where}: {one_line(exc)}") from None
    return True


@dataclass(frozen=True)
class ReplicaResources:
    """How many replicas a job starts on the connected cluster, on what device, and the Ray options of each."""

    count: int
    device: str  # "cpu" or "cuda"
    threads: int | None  # torch threads of a CPU replica; None on a GPU
    options: dict[str, Any]  # Ray actor options of a model replica
    judge_options: dict[str, Any]  # of a separate moderation replica (--moderation-model)


def replica_resources(config: JobConfig) -> ReplicaResources:
    """One replica per GPU share, or config.replicas on CPUs splitting the cluster's CPUs between them."""
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
        judge_gpus = config.moderation_gpus or config.gpus_per_replica
        per_pair = config.gpus_per_replica + (judge_gpus if separate_judge else 0)
        return ReplicaResources(
            count=config.replicas or max(1, math.floor(gpus / per_pair)),
            device="cuda",
            threads=None,
            options={"num_gpus": config.gpus_per_replica, "num_cpus": 1, **common},
            judge_options={"num_gpus": judge_gpus, "num_cpus": 1, **common},
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


# -- the actor shells ------------------------------------------------------------------------


def _setup(threads: int | None) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)


class RemoteModerator(Moderating):
    """Hands a batch's decoded images to a separate moderation replica (no torch in this process)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def prepare(self, images: list) -> list:
        return images

    def score(self, images: list) -> list[dict[str, float]]:
        import ray

        return ray.get(self.actor.score.remote(images))


class Replica:
    """A thin Ray actor shell around the plain-Python ShardProcessor."""

    def __init__(self, config: JobConfig, device: str, threads: int | None, judge: Any = None) -> None:
        import ray

        from loupe.workers.pipeline import ShardProcessor

        _setup(threads)
        self.node_id = ray.get_runtime_context().get_node_id()
        moderator = RemoteModerator(judge) if judge is not None else None
        self.processor = ShardProcessor(config, device=device, moderator=moderator)

    def ready(self) -> str:
        return self.node_id

    def process(self, shard: Shard, attempt: int) -> ShardStats:
        return self.processor.process(shard, attempt=attempt, node_id=self.node_id)


class ModerationReplica:
    """A thin Ray actor shell around a Moderator loaded from --moderation-model."""

    def __init__(self, config: JobConfig, device: str, threads: int | None) -> None:
        from loupe.workers.models.moderator import Moderator
        from loupe.workers.torch_thread import on_torch_thread

        _setup(threads)
        # Both of its concurrent calls run the model on one thread (see torch_thread).
        self.moderator = on_torch_thread(Moderator, config.judge, config.taxonomy, device=device)

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def score(self, images: list) -> list[dict[str, float]]:
        from loupe.workers.torch_thread import on_torch_thread

        return on_torch_thread(self.moderator, images)


# -- the replicas the scheduler drives -------------------------------------------------------


class RayReplicas:
    """Replica actors on the cluster (and their moderation replicas), as the scheduler's Replicas."""

    def __init__(self, config: JobConfig, resources: ReplicaResources) -> None:
        import ray

        self.judges: list[Any] = []
        if config.moderates and config.moderation_model is not None:
            judge = ray.remote(ModerationReplica).options(**resources.judge_options)
            self.judges = [judge.remote(config, resources.device, resources.threads) for _ in range(resources.count)]
        replica = ray.remote(Replica).options(**resources.options)
        self.actors = [
            replica.remote(config, resources.device, resources.threads, self.judges[i] if self.judges else None)
            for i in range(resources.count)
        ]
        try:
            ray.get([a.ready.remote() for a in [*self.actors, *self.judges]], timeout=REPLICA_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RuntimeError(
                f"the model replicas did not all start within {REPLICA_START_TIMEOUT_S / 60:.0f} minutes "
                f"(does the cluster have room for {resources.count} of them?)"
            ) from None
        except ray.exceptions.RayError as exc:
            self.shutdown()
            raise RuntimeError(f"a model replica failed to start: {_cause(exc)}") from None

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, replica: int, shard: Shard, attempt: int) -> Hashable:
        return self.actors[replica].process.remote(shard, attempt)

    def probe(self, replica: int) -> Hashable:
        return self.actors[replica].ready.remote()

    def wait(self, handles: list[Hashable], timeout: float) -> Hashable | None:
        import ray

        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        return ready[0] if ready else None

    def shard_result(self, handle: Hashable) -> ShardStats:
        import ray

        try:
            return ray.get(handle)
        except ray.exceptions.RayError as exc:
            raise ShardError(_cause(exc), replica_died=isinstance(exc, ray.exceptions.RayActorError)) from None

    def probe_result(self, handle: Hashable) -> Probe:
        import ray

        try:
            ray.get(handle)
        except ray.exceptions.ActorUnavailableError:
            return Probe.RESTARTING
        except ray.exceptions.RayError:
            return Probe.GONE  # Ray gave up restarting it
        return Probe.UP

    def shutdown(self) -> None:
        import ray

        for actor in [*self.actors, *self.judges]:
            ray.kill(actor)


@contextmanager
def start_replicas(config: JobConfig) -> Iterator[RayReplicas]:
    """The job's replicas, started on the connected cluster and killed when the block ends."""
    replicas = RayReplicas(config, replica_resources(config))
    try:
        yield replicas
    finally:
        replicas.shutdown()


def _cause(exc: BaseException) -> str:
    """The root cause of a Ray error in one line, without Ray's wrapped traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return one_line(cause)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:300] if lines else type(exc).__name__
