"""Runs a job: preflight, freeze or resume the plan, hand the shards to the scheduler, write the manifest."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from loupe.jobs.output import (
    done_shards,
    find_job,
    find_manifest,
    read_record,
    sweep_leftovers,
    write_manifest,
    write_record,
)
from loupe.jobs.incremental import Growth, grow, index_is_current, index_note, index_record, read_all_plans, removed_entries
from loupe.jobs.replicas import OUTPUT_UNWRITABLE, connect_ray, start_replicas
from loupe.jobs.sizing import size_replicas
from loupe.jobs.lease import Lease
from loupe.jobs.preflight import (
    check_models,
    clear_output,
    existing_job,
    plan_job,
    preflight,
    vet_plan,
    with_match_list,
)
from loupe.jobs.scheduler import Scheduler
from loupe.schemas.config import JobConfig
from loupe.schemas.codes import TRANSIENT_CODES
from loupe.schemas.errors import UserError
from loupe.schemas.layout import (
    JOB_FILE,
    PLAN_FILE,
    failed_path,
    stats_path,
)
from loupe.schemas.plan import Shard
from loupe.schemas.records import JobRecord, Manifest, ShardFailure, ShardStats, add_counts
from loupe.workers.storage import Storage, join_uri, open_storage


class JobObserver(Protocol):
    """What the runner reports while it works; the CLI draws a progress bar from it."""

    def started(self, shards_total: int, shards_done: int, replicas: int) -> None: ...
    def shard_queued(self, shard: Shard) -> None: ...  # handed to the scheduler
    def images_done(self, shard_id: int, images: int) -> None: ...  # a replica finished batches
    def shard_done(self, stats: ShardStats) -> None: ...
    def shard_failed(self, failure: ShardFailure) -> None: ...


# How often the driver asks the replicas how many images they finished (for the progress bar).
PROGRESS_POLL_S = 0.5


class _Quiet:
    def started(self, shards_total: int, shards_done: int, replicas: int) -> None:
        pass

    def shard_queued(self, shard: Shard) -> None:
        pass

    def images_done(self, shard_id: int, images: int) -> None:
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
    rows_known_content: int = 0  # rows matching the --match-list, over the whole job
    indexes: dict[str, Any] = field(default_factory=dict)  # kind -> IndexRecord built at the end
    shard_timeout: str = ""  # the shard timeout in force at the end, and where it came from
    hung_replicas: int = 0  # replicas killed for giving no result within the shard timeout
    rows_retried: int = 0  # --retry-errors: rows with a transient code processed again
    uploads_aborted: int = 0  # unfinished multipart uploads an earlier run left under OUTPUT
    notes: list[str] = field(default_factory=list)  # one line each: resumed, what INPUT gained, how indexes grew
    growth: Growth | None = None  # a rerun on an existing job: what the listing showed (new, removed, ...)
    manifest: Manifest | None = None

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
    preflight(config)
    config = with_match_list(config)
    source = open_storage(config.input, config.endpoint_url)
    sink = open_storage(config.output, config.endpoint_url)
    if config.overwrite or find_job(sink, config.output) is None:
        # A new job: a wrong model is refused before the lease (its first write) touches OUTPUT.
        # A rerun of an existing one checks later, only when there is work to do.
        check_models(config)
    # One driver per OUTPUT, from before its first write to after its last.
    with Lease.acquire(sink, config.output) as lease:
        return _run_leased(config, observer, started, source, sink, lease)


def _run_leased(
    config: JobConfig, observer: JobObserver, started: float, source: Storage, sink: Storage, lease: Lease
) -> JobResult:
    """The job, once this run holds OUTPUT's lease."""
    # Parts an earlier (killed) run was uploading in pieces: never visible, but kept (and billed) until aborted.
    aborted = sink.abort_uploads(config.output)
    job = existing_job(config, sink)
    growth: Growth | None = None
    created = job is None
    resources = None
    if job is None:
        with tempfile.TemporaryDirectory(prefix="loupe-plan-") as tmp:
            plan_file = Path(tmp) / PLAN_FILE
            job = plan_job(config, source, plan_file)
            connect_ray(config.ray_address)
            resources = size_replicas(config)  # before OUTPUT is written: a wrong size leaves none
            if config.overwrite:
                clear_output(config.output, sink)
            # Plan first, job record second: a job record always has its plan beside it.
            sink.write_bytes(join_uri(config.output, PLAN_FILE), plan_file.read_bytes())
            if not sink.create_exclusive(join_uri(config.output, JOB_FILE), job.to_json()):
                raise UserError(f"another run created the job in {config.output} meanwhile; rerun to resume it")

    sweep_leftovers(sink, config.output)
    done = done_shards(sink, config.output)
    redo = transient_rows(sink, config.output, done) if config.retry_errors else {}
    done -= redo.keys()
    if not created:
        # An existing job: resume it without listing, or (complete) list INPUT and say what changed.
        growth = grow(config, source, sink, job, done, lambda plan: vet_plan(config, source, plan))
        job = growth.job
    todo = _queued((shard for shard in read_all_plans(sink, config.output, job) if shard.shard_id not in done), observer)
    outcomes = _Outcomes(sink, config.output, observer, lease)
    scheduler = None
    if len(done) < job.shards:
        if growth is not None:
            if not growth.listed:
                check_models(config)
            connect_ray(config.ray_address)
        resources = resources or size_replicas(config)
        with start_replicas(config, redo, resources) as replicas:
            observer.started(job.shards, len(done), len(replicas))
            scheduler = Scheduler(replicas, config.max_shard_retries, shard_timeout_s=config.shard_timeout_s)
            with _polling_progress(replicas, observer):
                scheduler.run(todo, outcomes.done, outcomes.failed)
    else:
        observer.started(job.shards, len(done), 0)
    lease.check()
    result = _finish(config, sink, job, done, outcomes.stats, outcomes.failures, time.time() - started)
    result.uploads_aborted, result.rows_retried = aborted, sum(len(ids) for ids in redo.values())
    if resources is not None and resources.sizing:
        result.notes.append(f"replicas: {resources.sizing}")
    if scheduler is not None:
        result.shard_timeout, result.hung_replicas = scheduler.describe_timeout(), scheduler.hung
    if growth is not None:
        result.growth = growth
        result.notes += growth.notes
        if config.incremental and growth.diff is not None:
            result.notes.append(f"catalog: {growth.diff.words()}; {result.images_this_run} images processed")
    if config.embeds and config.build_index and result.complete:
        from loupe.jobs.indexing import build_output_index

        for kind in index_kinds(config):
            before = index_record(sink, config.output, kind)
            if before is not None and index_is_current(kind, before, result.manifest):
                result.indexes[kind] = before  # nothing new to index: no write
                continue
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
            if before is not None:
                result.notes.append(index_note(kind, before, result.indexes[kind]))
        result.seconds = time.time() - started
    return result


def index_kinds(config: JobConfig) -> list[str]:
    """Image vectors always; caption vectors when there is text to embed."""
    return ["image", "caption"] if config.captions or config.text_column else ["image"]


# -- plan ------------------------------------------------------------------------------------


def transient_rows(sink: Storage, output: str, done: set[int]) -> dict[int, frozenset[str]]:
    """Per done shard with rows whose error code is transient (TRANSIENT_CODES), those rows' image ids."""
    transient = {code.value for code in TRANSIENT_CODES}
    redo = {}
    for shard_id in sorted(done):
        stats = read_record(sink, join_uri(output, stats_path(shard_id)), ShardStats)
        if not transient & stats.error_codes.keys():
            continue
        with sink.open_seekable(join_uri(output, stats.part)) as handle:
            rows = pq.read_table(handle, columns=["image_id", "error_code"]).to_pylist()
        redo[shard_id] = frozenset(row["image_id"] for row in rows if row["error_code"] in transient)
    return redo


# -- this run's shards ----------------------------------------------------------------------


def _queued(shards: Iterable[Shard], observer: JobObserver) -> Iterator[Shard]:
    for shard in shards:
        observer.shard_queued(shard)
        yield shard


@contextmanager
def _polling_progress(replicas: Any, observer: JobObserver) -> Iterator[None]:
    """Hand the replicas' per-batch image counts to the observer from a driver thread while the block runs."""
    stop = threading.Event()

    def poll() -> None:
        while True:
            last = stop.wait(PROGRESS_POLL_S)
            for shard_id, images in replicas.take_progress(timeout=4 * PROGRESS_POLL_S).items():
                observer.images_done(shard_id, images)
            if last:
                return

    thread = threading.Thread(target=poll, name="loupe-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=8 * PROGRESS_POLL_S)  # one take() at most is in flight


@dataclass
class _Outcomes:
    """The shards this run finished or gave up on, recorded in OUTPUT and reported as they come."""

    sink: Storage
    output: str
    observer: JobObserver
    lease: Lease
    stats: list[ShardStats] = field(default_factory=list)
    failures: list[ShardFailure] = field(default_factory=list)

    def done(self, stats: ShardStats) -> None:
        self.lease.check()
        self.sink.delete(join_uri(self.output, failed_path(stats.shard_id)))  # an earlier run's failure
        self.stats.append(stats)
        self.observer.shard_done(stats)

    def failed(self, shard: Shard, attempts: int, cause: str) -> None:
        self.lease.check()
        failure = ShardFailure(shard.shard_id, attempts, cause, time.time())
        try:
            write_record(self.sink, self.output, failed_path(shard.shard_id), failure)
        except OSError as exc:
            if exc.errno not in OUTPUT_UNWRITABLE:
                raise
            # OUTPUT full or read-only, which is why the shard failed: still reported, and the job stops.
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
    current = find_manifest(sink, config.output)
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
        generation=job.generation,
        removed=removed_entries(job),
        removed_objects=sum(g["removed"] for g in job.generations),
        # The built indexes stay valid for the parts they list until they are extended.
        index=dict(current.index) if current is not None else {},
    )
    if _changed(current, manifest):
        # One write: a reader sees the previous generation's catalog or this one, never a mix.
        write_manifest(sink, config.output, manifest)
    else:
        manifest = current  # a rerun with nothing to do writes nothing
    return JobResult(
        manifest=manifest,
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
        rows_known_content=sum(s.rows_known_content for s in ordered),
    )


def _changed(current: Manifest | None, manifest: Manifest) -> bool:
    if current is None:
        return True
    keys = ("complete", "shards_total", "parts", "failed_shards", "generation", "removed")
    return any(getattr(current, key) != getattr(manifest, key) for key in keys)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
