"""Runs a job: preflight, freeze or resume the plan, hand the shards to the scheduler, write the manifest."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from loupe.jobs.output import (
    done_shards,
    find_job,
    list_folder,
    read_record,
    sweep_leftovers,
    write_manifest,
    write_record,
)
from loupe.jobs.planner import PlanSummary, plan_shards, read_plan, write_plan
from loupe.jobs.replicas import connect_ray, start_replicas
from loupe.jobs.scheduler import Scheduler
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError
from loupe.schemas.layout import FAILED_DIR, JOB_FILE, MANIFEST_FILE, PARTS_DIR, PLAN_FILE, STATS_DIR, failed_path, stats_path
from loupe.schemas.plan import Shard, ShardKind
from loupe.schemas.records import JobRecord, Manifest, ShardFailure, ShardStats, add_counts
from loupe.workers.models.loading import check_embedding_models, check_model
from loupe.workers.storage import MissingLocation, Storage, join_uri, open_storage


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
        check_embedding_models(config.image_embedding_model, config.text_embedding_model)
    job = _existing_job(config, sink)
    with tempfile.TemporaryDirectory(prefix="loupe-plan-") as tmp:
        plan_file = Path(tmp) / PLAN_FILE
        if job is None:
            job = _plan(config, source, plan_file)
        connect_ray(config.ray_address)
        if plan_file.exists():
            if config.overwrite:
                _clear_output(config.output, sink)
            # Plan first, job record second: a job record always has its plan beside it.
            sink.write_bytes(join_uri(config.output, PLAN_FILE), plan_file.read_bytes())
            write_record(sink, config.output, JOB_FILE, job)

    sweep_leftovers(sink, config.output)
    done = done_shards(sink, config.output)
    todo = (shard for shard in _read_plan(sink, config.output) if shard.shard_id not in done)
    outcomes = _Outcomes(sink, config.output, observer)
    if len(done) < job.shards:
        with start_replicas(config) as replicas:
            observer.started(job.shards, len(done), len(replicas))
            Scheduler(replicas, config.max_shard_retries).run(todo, outcomes.done, outcomes.failed)
    else:
        observer.started(job.shards, len(done), 0)
    result = _finish(config, sink, job, done, outcomes.stats, outcomes.failures, time.time() - started)
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
    job = find_job(sink, config.output)
    if job is None:
        return None
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
        for obj in list_folder(sink, output, folder):
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


# -- this run's shards ----------------------------------------------------------------------


@dataclass
class _Outcomes:
    """The shards this run finished or gave up on, recorded in OUTPUT and reported as they come."""

    sink: Storage
    output: str
    observer: JobObserver
    stats: list[ShardStats] = field(default_factory=list)
    failures: list[ShardFailure] = field(default_factory=list)

    def done(self, stats: ShardStats) -> None:
        self.sink.delete(join_uri(self.output, failed_path(stats.shard_id)))  # an earlier run's failure
        self.stats.append(stats)
        self.observer.shard_done(stats)

    def failed(self, shard: Shard, attempts: int, cause: str) -> None:
        failure = ShardFailure(shard.shard_id, attempts, cause, time.time())
        write_record(self.sink, self.output, failed_path(shard.shard_id), failure)
        self.failures.append(failure)
        self.observer.shard_failed(failure)


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
        stats[shard_id] = read_record(sink, join_uri(config.output, stats_path(shard_id)), ShardStats)
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
        # Every shard decodes alike (the side follows from the frozen models): any one says it.
        decode_side=next((s.decode_side for s in ordered), None),
    )
    write_manifest(sink, config.output, manifest)
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
