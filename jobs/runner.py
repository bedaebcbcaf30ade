"""Runs a job on Ray: freeze or resume the plan, start replicas, feed them shards, write the manifest."""

from __future__ import annotations

import math
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from loupe.jobs.planner import PlanSummary, plan_shards, read_plan, write_plan
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError, one_line
from loupe.schemas.layout import FAILED_DIR, JOB_FILE, MANIFEST_FILE, PARTS_DIR, PLAN_FILE, STATS_DIR, failed_path, shard_id_from_path, stats_path
from loupe.schemas.records import JobRecord, Manifest, ShardFailure, ShardStats, add_counts
from loupe.schemas.plan import Shard, ShardKind
from loupe.workers.models.captioner import check_model
from loupe.workers.storage import MissingLocation, Storage, join_uri, open_storage

# Shards queued on each replica: one running, one whose images are fetched and decoded
# meanwhile (a replica runs two shards at once and serializes only the model).
SHARDS_PER_REPLICA = 2
REPLICA_MAX_RESTARTS = 3
PROBE_INTERVAL_S = 0.5


class JobObserver(Protocol):
    """What the runner reports while it works; the CLI draws a progress bar from it."""

    def started(self, shards_total: int, shards_done: int, replicas: int) -> None: ...
    def shard_done(self, stats: ShardStats) -> None: ...
    def shard_failed(self, failure: ShardFailure) -> None: ...


class _Quiet:
    def started(self, shards_total: int, shards_done: int, replicas: int) -> None:
        pass

    def shard_done(self, stats: ShardStats) -> None:
        pass

    def shard_failed(self, failure: ShardFailure) -> None:
        pass


@dataclass
class JobResult:
    """The outcome of one `loupe run`: what this run did and where the whole job stands."""

    output: str
    shards_total: int
    shards_done: int
    shards_skipped: int  # already done by an earlier run
    rows_ok: int
    rows_error: int
    seconds: float
    images_this_run: int
    failures: list[ShardFailure] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    rows_flagged: int = 0
    flagged: dict[str, int] = field(default_factory=dict)  # per category, over the whole job
    indexes: dict[str, Any] = field(default_factory=dict)  # kind -> IndexRecord built at the end

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    @property
    def images_per_second(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0


def run_job(config: JobConfig, observer: JobObserver | None = None) -> JobResult:
    """Run (or resume) a job to the end; a user mistake raises UserError before OUTPUT is touched."""
    observer = observer or _Quiet()
    started = time.time()
    _preflight(config)
    source = open_storage(config.input, config.endpoint_url)
    sink = open_storage(config.output, config.endpoint_url)
    models = {config.model} if config.captions else set()
    if config.moderates:
        models.add(config.judge)
    for model in sorted(models):
        check_model(model)
    if config.embeds:
        from loupe.workers.models.embedder import check_embedding_models

        check_embedding_models(config.image_embedding_model, config.text_embedding_model)
    job = _existing_job(config, sink)
    with tempfile.TemporaryDirectory(prefix="loupe-plan-") as tmp:
        plan_file = Path(tmp) / PLAN_FILE
        if job is None:
            job = _plan(config, source, plan_file)
        _connect_ray(config)
        if plan_file.exists():
            if config.overwrite:
                _clear_output(config.output, sink)
            # Plan first, job record second: a job record always has its plan beside it.
            sink.write_bytes(join_uri(config.output, PLAN_FILE), plan_file.read_bytes())
            sink.write_bytes(join_uri(config.output, JOB_FILE), job.to_json())

    _sweep_leftovers(sink, config.output)
    done = {shard_id_from_path(obj.uri) for obj in _list(sink, join_uri(config.output, STATS_DIR))} - {None}
    todo = (shard for shard in _read_plan(sink, config.output) if shard.shard_id not in done)
    new_stats: list[ShardStats] = []
    failures: list[ShardFailure] = []
    if len(done) < job.shards:
        pool = _ReplicaPool(config)
        observer.started(job.shards, len(done), len(pool.actors))
        try:
            pool.run(todo, sink, new_stats, failures, observer)
        finally:
            pool.shutdown()
    else:
        observer.started(job.shards, len(done), 0)
    result = _finish(config, sink, job, done, new_stats, failures, time.time() - started)
    if config.embeds and config.build_index and result.complete:
        from loupe.jobs.indexing import build_output_index

        for kind in index_kinds(config):
            # Incremental: a resumed or extended job adds its new parts' vectors to the
            # trained index when it still suits the data size.
            result.indexes[kind] = build_output_index(
                config.output,
                kind=kind,
                memory_budget=config.index_memory_budget,
                target_recall=config.index_target_recall,
                endpoint_url=config.endpoint_url,
                incremental=True,
            )
        result.seconds = time.time() - started
    return result


def index_kinds(config: JobConfig) -> list[str]:
    """Image vectors always; caption vectors when there is text to embed."""
    return ["image", "caption"] if config.captions or config.text_column else ["image"]


# -- plan ------------------------------------------------------------------------------------


def _preflight(config: JobConfig) -> None:
    """Fail in seconds on a wrong endpoint, bucket, credentials or input path.

    The job's own storage retries patiently (throttling mid-listing is no reason to give up);
    a user's typo should not wait through those retries.
    """
    quick = open_storage(config.input, config.endpoint_url, max_attempts=2)
    next(iter(quick.list(config.input)), None)
    quick = open_storage(config.output, config.endpoint_url, max_attempts=2)
    try:
        next(iter(quick.list(config.output)), None)
    except MissingLocation:
        pass  # a new OUTPUT: nothing there yet is what we expect


def _existing_job(config: JobConfig, sink: Storage) -> JobRecord | None:
    """The frozen job at OUTPUT if it is this one; refuse another unless asked to overwrite."""
    job_uri = join_uri(config.output, JOB_FILE)
    if not sink.exists(job_uri):
        return None
    job = JobRecord.from_json(sink.read_bytes(job_uri))
    if config.overwrite:
        return None  # cleared once the new plan is known to be good
    wanted = config.plan_settings()
    for name, value in wanted.items():
        if job.settings.get(name) != value:
            raise UserError(
                f"{config.output} already holds a different job ({name} was {job.settings.get(name)!r}, "
                f"now {value!r}); pass --overwrite to replace it or choose another OUTPUT"
            )
    return job


def _clear_output(output: str, sink: Storage) -> None:
    # Job record and manifest first, so nothing half-deleted is ever trusted as a job.
    for name in (MANIFEST_FILE, JOB_FILE):
        sink.delete(join_uri(output, name))
    for folder in (STATS_DIR, FAILED_DIR, PARTS_DIR):
        for obj in _list(sink, join_uri(output, folder)):
            sink.delete(obj.uri)
    sink.delete(join_uri(output, PLAN_FILE))


def _plan(config: JobConfig, source: Storage, plan_file: Path) -> JobRecord:
    summary = PlanSummary()
    write_plan(plan_shards(source.list(config.input), config.shard_size, summary), str(plan_file))
    if summary.objects == 0:
        ignored = f" ({summary.ignored} other files ignored)" if summary.ignored else ""
        raise UserError(f"no images, .tar or .parquet files found in {config.input}{ignored}")
    _check_parquet_column(config, source, plan_file)
    return JobRecord(
        settings=config.plan_settings(),
        listing_sha256=summary.listing_sha256,
        objects=summary.objects,
        shards=summary.shards,
        created_at=_now(),
    )


def _check_parquet_column(config: JobConfig, source: Storage, plan_file: Path) -> None:
    """Refuse a wrong --image-column up front instead of failing every shard on the cluster."""
    first = next((s for s in read_plan(str(plan_file)) if s.kind is ShardKind.PARQUET), None)
    if first is None:
        return
    with source.open_seekable(first.uris[0]) as handle:
        names = pq.ParquetFile(handle).schema_arrow.names
    if config.image_column not in names:
        raise UserError(
            f"image column '{config.image_column}' not in {first.uris[0]} "
            f"(columns: {', '.join(names)}); choose one with --image-column"
        )


def _read_plan(sink: Storage, output: str) -> Iterator[Shard]:
    with sink.open_seekable(join_uri(output, PLAN_FILE)) as handle:
        yield from read_plan(handle)


def _sweep_leftovers(sink: Storage, output: str) -> None:
    """Delete the temp files of local writes that a killed run left half-done (".name.<hex>.tmp").

    They were never renamed into place, so nothing trusts them; S3 has no such files (a PUT or
    a multipart upload is invisible until complete).
    """
    for folder in (PARTS_DIR, STATS_DIR, FAILED_DIR):
        for obj in _list(sink, join_uri(output, folder)):
            name = obj.uri.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith(".tmp"):
                sink.delete(obj.uri)


def _list(storage: Storage, prefix: str) -> list:
    """Objects under an OUTPUT sub-folder; a folder not created yet holds nothing."""
    try:
        return list(storage.list(prefix))
    except MissingLocation:
        return []


# -- Ray -------------------------------------------------------------------------------------


def _connect_ray(config: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        # address=None joins RAY_ADDRESS if set, else starts a local cluster.
        ray.init(
            address=config.ray_address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = config.ray_address or "the local machine"
        raise UserError(f"could not reach a Ray cluster at {where}: {one_line(exc)}") from None


def _replica_classes():
    import ray

    def _setup(threads: int | None) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)

    class RemoteModerator:
        """Hands a batch's decoded images to a separate moderation replica."""

        def __init__(self, actor: Any) -> None:
            self.actor = actor

        def prepare(self, images: list) -> list:
            return images

        def score(self, images: list) -> list[dict[str, float]]:
            return ray.get(self.actor.score.remote(images))

    @ray.remote
    class Replica:
        """A thin Ray shell around the plain-Python ShardProcessor."""

        def __init__(self, config: JobConfig, device: str, threads: int | None, judge: Any = None) -> None:
            from loupe.workers.pipeline import ShardProcessor

            _setup(threads)
            self.node_id = ray.get_runtime_context().get_node_id()
            moderator = RemoteModerator(judge) if judge is not None else None
            self.processor = ShardProcessor(config, device=device, moderator=moderator)

        def ready(self) -> str:
            return self.node_id

        def process(self, shard: Shard, attempt: int) -> ShardStats:
            return self.processor.process(shard, attempt=attempt, node_id=self.node_id)

    @ray.remote
    class ModerationReplica:
        """A thin Ray shell around a Moderator loaded from --moderation-model."""

        def __init__(self, config: JobConfig, device: str, threads: int | None) -> None:
            from loupe.workers.models.moderator import Moderator
            from loupe.workers.torch_thread import on_torch_thread

            _setup(threads)
            # Both of its concurrent calls run the model on one thread (see torch_thread).
            self.moderator = on_torch_thread(Moderator, config.judge, config.taxonomy, device=device)

        def ready(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def score(self, images: list) -> list[dict[str, float]]:
            from loupe.workers.torch_thread import on_torch_thread

            return on_torch_thread(self.moderator, images)

    return Replica, ModerationReplica


class _ReplicaPool:
    """Replica actors and the queue of shards they work through."""

    def __init__(self, config: JobConfig) -> None:
        import ray

        self.config = config
        separate_judge = config.moderates and config.moderation_model is not None
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0.0)
        if gpus > 0:
            per_pair = config.gpus_per_replica + ((config.moderation_gpus or config.gpus_per_replica) if separate_judge else 0)
            count = config.replicas or max(1, math.floor(gpus / per_pair))
            options: dict[str, Any] = {"num_gpus": config.gpus_per_replica, "num_cpus": 1}
            judge_options: dict[str, Any] = {"num_gpus": config.moderation_gpus or config.gpus_per_replica, "num_cpus": 1}
            device, threads = "cuda", None
        else:
            count = config.replicas or 1
            actors = count * (2 if separate_judge else 1)
            # A replica must fit on one node, and N replicas on the cluster, or Ray would
            # leave some pending forever; fractions are fine (torch threads are set below).
            node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
            cpus = round(min(node_cpus, resources.get("CPU", 1.0) / actors), 2)
            options = judge_options = {"num_cpus": cpus}
            device, threads = "cpu", max(1, math.floor(cpus))
        common = {"max_restarts": REPLICA_MAX_RESTARTS, "max_task_retries": 0, "scheduling_strategy": "SPREAD"}
        replica_class, judge_class = _replica_classes()
        self.judges = []
        if separate_judge:
            judge = judge_class.options(**judge_options, **common, max_concurrency=SHARDS_PER_REPLICA)
            self.judges = [judge.remote(config, device, threads) for _ in range(count)]
        # max_task_retries=0: shards are retried here, on another replica where possible.
        replica = replica_class.options(**options, **common, max_concurrency=SHARDS_PER_REPLICA)
        self.actors = [
            replica.remote(config, device, threads, self.judges[i] if self.judges else None) for i in range(count)
        ]
        try:
            ray.get([actor.ready.remote() for actor in [*self.actors, *self.judges]])
        except ray.exceptions.RayError as exc:
            self.shutdown()
            raise RuntimeError(f"a model replica failed to start: {_cause(exc)}") from None

    def run(
        self,
        todo: Iterator[Shard],
        sink: Storage,
        new_stats: list[ShardStats],
        failures: list[ShardFailure],
        observer: JobObserver,
    ) -> None:
        """Keep every healthy replica SHARDS_PER_REPLICA shards deep until the plan is done.

        A shard that raises is retried on another replica, up to max_shard_retries, then
        recorded as failed. A replica whose process died is restarted by Ray; it gets no
        work until a probe call comes back, and is dropped if Ray gives up on it.
        """
        import ray

        retries: deque[tuple[Shard, int, int]] = deque()  # (shard, attempt, replica it failed on)
        load = [0] * len(self.actors)
        healthy = set(range(len(self.actors)))
        probes: dict[Any, int] = {}  # a `ready` call to a replica that died, by replica
        later: list[tuple[float, int]] = []  # probes to send again once a restart had time
        in_flight: dict[Any, tuple[Shard, int, int]] = {}
        exhausted = False

        def next_for(index: int) -> tuple[Shard, int] | None:
            nonlocal exhausted
            for position, (shard, attempt, failed_on) in enumerate(retries):
                if failed_on != index or len(healthy) == 1:
                    del retries[position]
                    return shard, attempt
            shard = None if exhausted else next(todo, None)
            exhausted = shard is None
            return (shard, 1) if shard is not None else None

        while True:
            for index in sorted(healthy, key=lambda i: load[i]):
                while load[index] < SHARDS_PER_REPLICA and (work := next_for(index)) is not None:
                    ref = self.actors[index].process.remote(*work)
                    in_flight[ref] = (*work, index)
                    load[index] += 1
            now = time.monotonic()
            for due, index in [p for p in later if p[0] <= now]:
                later.remove((due, index))
                probes[self.actors[index].ready.remote()] = index
            if not in_flight and not probes and not later:
                if not retries and exhausted:
                    return
                if not healthy:
                    raise RuntimeError("every model replica died; rerun the same command to resume")
                continue
            ready, _ = ray.wait([*in_flight, *probes], num_returns=1, timeout=PROBE_INTERVAL_S if later else None)
            if not ready:
                continue
            ref = ready[0]
            if ref in probes:
                index = probes.pop(ref)
                try:
                    ray.get(ref)
                    healthy.add(index)
                except ray.exceptions.ActorUnavailableError:
                    later.append((time.monotonic() + PROBE_INTERVAL_S, index))  # still restarting
                except ray.exceptions.RayError:
                    pass  # Ray gave up restarting it: it stays out of the pool
                continue
            shard, attempt, index = in_flight.pop(ref)
            load[index] -= 1
            try:
                stats = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if isinstance(exc, ray.exceptions.RayActorError) and index in healthy:
                    healthy.discard(index)
                    probes[self.actors[index].ready.remote()] = index
                if attempt <= self.config.max_shard_retries:
                    retries.append((shard, attempt + 1, index))
                else:
                    failure = ShardFailure(shard.shard_id, attempt, _cause(exc), time.time())
                    sink.write_bytes(join_uri(self.config.output, failed_path(shard.shard_id)), failure.to_json())
                    failures.append(failure)
                    observer.shard_failed(failure)
                continue
            sink.delete(join_uri(self.config.output, failed_path(shard.shard_id)))
            new_stats.append(stats)
            observer.shard_done(stats)

    def shutdown(self) -> None:
        import ray

        for actor in [*self.actors, *self.judges]:
            ray.kill(actor)


# -- manifest --------------------------------------------------------------------------------


def _finish(
    config: JobConfig,
    sink: Storage,
    job: JobRecord,
    done_before: set[int],
    new_stats: list[ShardStats],
    failures: list[ShardFailure],
    seconds: float,
) -> JobResult:
    """Gather every done shard's stats and write the manifest, last."""
    stats = {s.shard_id: s for s in new_stats}
    for shard_id in sorted(done_before - stats.keys()):
        stats[shard_id] = ShardStats.from_json(sink.read_bytes(join_uri(config.output, stats_path(shard_id))))
    ordered = [stats[i] for i in sorted(stats)]
    failed = sorted({f.shard_id for f in failures} - stats.keys())
    manifest = Manifest(
        complete=len(ordered) == job.shards,
        shards_total=job.shards,
        rows_ok=sum(s.rows_ok for s in ordered),
        rows_error=sum(s.rows_error for s in ordered),
        parts=[
            {"path": s.part, "shard_id": s.shard_id, "rows": s.rows, "sha256": s.part_sha256, "bytes": s.part_bytes}
            for s in ordered
        ],
        failed_shards=failed,
        listing_sha256=job.listing_sha256,
        written_at=_now(),
    )
    sink.write_bytes(join_uri(config.output, MANIFEST_FILE), manifest.to_json())
    return JobResult(
        output=config.output,
        shards_total=job.shards,
        shards_done=len(ordered),
        shards_skipped=len(done_before),
        rows_ok=manifest.rows_ok,
        rows_error=manifest.rows_error,
        seconds=seconds,
        images_this_run=sum(s.rows for s in new_stats),
        failures=[f for f in failures if f.shard_id in failed],
        error_codes=add_counts(s.error_codes for s in ordered),
        nodes=sorted({s.node_id for s in new_stats if s.node_id}),
        rows_flagged=sum(s.rows_flagged for s in ordered),
        flagged=add_counts(s.flagged for s in ordered),
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")




def _cause(exc: BaseException) -> str:
    """The root cause of a Ray error in one line, without Ray's wrapped traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return one_line(cause)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:300] if lines else type(exc).__name__
