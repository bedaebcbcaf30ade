"""The Ray side of a job: connecting to Ray and the actor shells around the pipeline (sizing them is jobs.sizing)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from loupe.jobs.scheduler import Probe, ShardError
from loupe.jobs.sizing import ReplicaResources, replica_resources
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError, one_line
from loupe.schemas.plan import Shard
from loupe.schemas.records import ShardStats
from loupe.workers.faults import ENV as FAULTS_ENV
from loupe.workers.models.devices import device_lost  # no torch at import
from loupe.workers.models.stages import Moderating
from loupe.workers.storage import PART_SIZE_ENV

# Loading a model may download it first; a replica not up after this long will not come up
# (typically: more replicas than the cluster has GPUs for, left pending by Ray).
REPLICA_START_TIMEOUT_S = 3600.0
# Settings the replicas read from their environment: a fault plan (tests, chaos runs) and S3's part size.
FORWARDED_SETTINGS = (FAULTS_ENV, PART_SIZE_ENV)
# OSErrors writing OUTPUT that every shard would meet alike: the job stops at the first.
OUTPUT_UNWRITABLE = {errno.ENOSPC: "OUTPUT is full", errno.EDQUOT: "OUTPUT's quota is used up", errno.EROFS: "OUTPUT is read-only"}

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
    # Ray warns on every start that it enabled token authentication (the secure default it
    # chose itself): noise on every `loupe run`, so that one logger is hushed for the call.
    banner = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = banner.level
    banner.setLevel(logging.ERROR)
    try:
        ray.init(**settings)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = "the local machine" if own_cluster else address or os.environ.get("RAY_ADDRESS") or "the local machine"
        raise UserError(f"could not reach a Ray cluster at {where}: {one_line(exc)}") from None
    finally:
        banner.setLevel(level)
    return True


@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 2) -> Iterator[Any]:
    """A Ray cluster of `nodes` nodes on this machine, joined by this process and shut down after
    (tests and the chaos benchmark: several nodes, one of which can be removed)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# -- the actor shells ------------------------------------------------------------------------


def _setup(threads: int | None, memory_fraction: float | None = None) -> list[int] | None:
    """Torch threads and GPU memory cap of this actor; the GPUs Ray gave it, as torch indexes them (None on a CPU)."""
    import ray
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so torch numbers exactly those from 0.
    gpus = list(range(len(ray.get_gpu_ids()))) or None
    if memory_fraction is not None and gpus and torch.cuda.is_available():
        # Two replicas sharing a GPU: each allocator keeps its peak, so each is capped at its share.
        for gpu in gpus:
            torch.cuda.set_per_process_memory_fraction(memory_fraction, gpu)
    return gpus


class RemoteModerator(Moderating):
    """Hands a batch's decoded images to a separate moderation replica (no torch in this process).

    The images are sent when the batch is prepared and the scores collected after its caption,
    so the judge's GPU works while this replica's generates.
    """

    def __init__(self, actor: Any, decode_side: int | None = None) -> None:
        self.actor = actor
        # The judge's: images are decoded no smaller than its processor needs (None: in full).
        self.decode_side = decode_side

    def prepare(self, images: list) -> Any:
        return self.actor.score.remote(images)

    def score(self, pending: Any) -> list[dict[str, float]]:
        import ray

        # Bounded by the scheduler's shard timeout: a judge that never answers holds this shard
        # past it, and the scheduler kills this replica (and with it this wait).
        return ray.get(pending)


class Replica:
    """A thin Ray actor shell around the plain-Python ShardProcessor.

    A torch.AcceleratorError (illegal address, device-side assert, hardware fault) leaves the CUDA
    context unusable: the process exits, Ray restarts it, and the shard is retried elsewhere.
    """

    def __init__(
        self,
        config: JobConfig,
        device: str,
        threads: int | None,
        judge: Any = None,
        memory_fraction: float | None = None,
        stages: Any = None,
    ) -> None:
        import ray
        from loupe.workers.pipeline import ShardProcessor

        gpus = _setup(threads, memory_fraction)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        moderator = None
        if judge is not None:
            moderator = RemoteModerator(judge, ray.get(judge.decode_side.remote(), timeout=REPLICA_START_TIMEOUT_S))
        # `stages` (tests) stands for ShardProcessor where loading a model would need CUDA.
        self.processor = (stages or ShardProcessor)(config, device=device, gpus=gpus, moderator=moderator)

    def ready(self) -> str:
        return self.node_id

    def placement(self) -> dict[str, Any]:
        """Where this replica runs: node, process and the GPU ids Ray gave it."""
        return {"node_id": self.node_id, "pid": os.getpid(), "gpu_ids": self.gpu_ids}

    def process(
        self, shard: Shard, attempt: int, redo: frozenset[str] | None = None, counter: Any = None
    ) -> ShardStats:
        # Fire and forget: the model never waits on the driver's progress bar.
        progress = (lambda n: counter.add.remote(shard.shard_id, n)) if counter is not None else None
        try:
            return self.processor.process(shard, attempt=attempt, node_id=self.node_id, redo=redo, progress=progress)
        except Exception as exc:
            if device_lost(exc):
                _exit_for_restart(exc)
            raise


class ProgressCounter:
    """Images the replicas finished per shard since the driver last asked (a tiny Ray actor)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, shard_id: int, images: int) -> None:
        self.counts[shard_id] = self.counts.get(shard_id, 0) + images

    def take(self) -> dict[int, int]:
        counts, self.counts = self.counts, {}
        return counts


class ModerationReplica:
    """A thin Ray actor shell around a Moderator loaded from --moderation-model."""

    def __init__(self, config: JobConfig, device: str, threads: int | None, memory_fraction: float | None = None) -> None:
        from loupe.workers.models.moderator import Moderator
        from loupe.workers.torch_thread import on_torch_thread

        gpus = _setup(threads, memory_fraction)
        # Both of its concurrent calls run the model on one thread (see torch_thread).
        self.moderator = on_torch_thread(
            Moderator, config.judge, config.taxonomy, device=device, gpus=gpus, quantize=config.quantize
        )

    def decode_side(self) -> int | None:
        return self.moderator.decode_side

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def score(self, images: list) -> list[dict[str, float]]:
        from loupe.workers.torch_thread import on_torch_thread

        try:
            return on_torch_thread(self.moderator, images)
        except Exception as exc:
            if device_lost(exc):
                _exit_for_restart(exc)
            raise


# -- the replicas the scheduler drives -------------------------------------------------------


class RayReplicas:
    """Replica actors on the cluster (and their moderation replicas), as the scheduler's Replicas."""

    def __init__(
        self,
        config: JobConfig,
        resources: ReplicaResources,
        redo: dict[int, frozenset[str]] | None = None,
        stages: Any = None,
    ) -> None:
        """`stages` (tests): a picklable stand-in for ShardProcessor, built in each replica's process."""
        import ray

        self.redo = redo or {}  # shard id -> the image ids `--retry-errors` processes again
        self.judges: list[Any] = []
        self.actors: list[Any] = []
        # No CPU reserved: it only adds numbers, and must never keep a replica from starting.
        self.counter = ray.remote(ProgressCounter).options(num_cpus=0).remote()
        forwarded = {name: os.environ[name] for name in FORWARDED_SETTINGS if os.environ.get(name)}
        if forwarded:
            # Set where `loupe run` runs, they reach the replicas however the cluster was started.
            env = {"env_vars": forwarded}
            resources = replace(
                resources, options={**resources.options, "runtime_env": env}, judge_options={**resources.judge_options, "runtime_env": env}
            )
        if config.moderates and config.moderation_model is not None:
            judge = ray.remote(ModerationReplica).options(**resources.judge_options)
            self.judges = [
                judge.remote(config, resources.device, resources.threads, resources.judge_memory_fraction)
                for _ in range(resources.count)
            ]
        replica = ray.remote(Replica).options(**resources.options)
        self.actors = [
            replica.remote(
                config,
                resources.device,
                resources.threads,
                self.judges[i] if self.judges else None,
                resources.memory_fraction,
                stages,
            )
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
        return self.actors[replica].process.remote(shard, attempt, self.redo.get(shard.shard_id), self.counter)

    def take_progress(self, timeout: float) -> dict[int, int]:
        """Images done per shard since the last call; {} if the counter does not answer within `timeout` s."""
        import ray

        try:
            return ray.get(self.counter.take.remote(), timeout=timeout)
        except ray.exceptions.RayError:
            return {}

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
            unwritable = _unwritable(exc)
            if unwritable:
                raise ShardError(unwritable, fatal=True) from None
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

    def kill(self, replica: int) -> None:
        import ray

        ray.kill(self.actors[replica], no_restart=False)

    def shutdown(self) -> None:
        import ray

        for actor in [*self.actors, *self.judges, self.counter]:
            ray.kill(actor)


@contextmanager
def start_replicas(
    config: JobConfig, redo: dict[int, frozenset[str]] | None = None, resources: ReplicaResources | None = None
) -> Iterator[RayReplicas]:
    """The job's replicas (sized by `resources`, default replica_resources), started on the connected cluster and killed when the block ends."""
    replicas = RayReplicas(config, resources or replica_resources(config), redo)
    try:
        yield replicas
    finally:
        replicas.shutdown()


def _unwritable(exc: BaseException) -> str | None:
    """The one-line cause when a shard failed because OUTPUT is full or read-only, else None."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, OSError) and cause.errno in OUTPUT_UNWRITABLE:
        return f"{OUTPUT_UNWRITABLE[cause.errno]}: {one_line(cause)}"
    return None


def _exit_for_restart(exc: BaseException) -> None:
    """End this actor's process so Ray starts a fresh one: its CUDA context cannot be used again."""
    import sys

    print(f"loupe: the GPU context is lost, restarting the replica: {one_line(exc)}", file=sys.stderr, flush=True)
    os._exit(1)


def _cause(exc: BaseException) -> str:
    """The root cause of a Ray error in one line, without Ray's wrapped traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return one_line(cause)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:300] if lines else type(exc).__name__
