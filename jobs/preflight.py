"""Before a job starts or resumes: the input, OUTPUT, the models and the plan checked, so a mistake is one line and writes nothing."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from loupe.jobs.output import find_job, list_folder
from loupe.jobs.planner import PlanSummary, plan_objects, read_plan, write_plan
from loupe.schemas.config import JobConfig, normalize_location
from loupe.schemas.errors import UserError
from loupe.schemas.layout import (
    DUPLICATES_FILE,
    FAILED_DIR,
    INDEX_DIR,
    JOB_FILE,
    MANIFEST_FILE,
    MATCHES_FILE,
    PARTS_DIR,
    PLAN_FILE,
    PROPAGATED_FILE,
    STATS_DIR,
    generation_plan_path,
    removed_path,
)
from loupe.schemas.plan import ShardKind
from loupe.schemas.records import JobRecord
from loupe.workers.storage import MissingLocation, Storage, join_uri, open_storage


def preflight(config: JobConfig) -> None:
    """Fail in seconds on a wrong endpoint, bucket, credentials or input path.

    The job's own storage retries patiently (throttling mid-listing is no reason to give up);
    a user's typo should not wait through those retries.
    """
    quick = open_storage(config.input, config.endpoint_url, max_attempts=2)
    next(iter(quick.list(config.input)), None)
    if "://" not in config.output and Path(config.output).exists() and not Path(config.output).is_dir():
        raise UserError(f"OUTPUT {config.output} is a file; give a folder (new or a loupe job's) or s3://bucket/prefix/")
    quick = open_storage(config.output, config.endpoint_url, max_attempts=2)
    try:
        next(iter(quick.list(config.output)), None)
    except MissingLocation:
        pass  # a new OUTPUT: nothing there yet is what we expect


def with_match_list(config: JobConfig) -> JobConfig:
    """The config with its --match-list's sha256, the list read and checked here (a malformed line is
    one UserError naming it) before anything starts; the replicas read it again and compare."""
    if config.match_list is None:
        return config
    from loupe.workers.hashing import read_hash_list
    from loupe.workers.index.library import faiss  # noqa: F401  (matching needs FAISS: one line without it)

    known = read_hash_list(config.match_list, config.endpoint_url)
    return config.model_copy(update={"match_list_sha256": known.sha256})


def existing_job(config: JobConfig, sink: Storage) -> JobRecord | None:
    """The frozen job at OUTPUT if it is this one; refuse another unless asked to overwrite."""
    job = find_job(sink, config.output)
    if job is None:
        return None
    if config.overwrite:
        return None  # cleared once the new plan is known to be good
    wanted = config.plan_settings()
    for name, value in wanted.items():
        was = job.settings.get(name)
        if name == "input" and was is not None and normalize_location(was) == normalize_location(value):
            continue  # the same place, written another way (a relative path from an older loupe)
        if was != value:
            raise UserError(
                f"{config.output} already holds a different job ({name} was {job.settings.get(name)!r}, "
                f"now {value!r}); pass --overwrite to replace it or choose another OUTPUT"
            )
    return job


# Files of an old job beyond its parts and records: later generations' plans and removals,
# `loupe match` and `loupe dedup` results; their folders are cleared whole.
_DERIVED_FILES = (MATCHES_FILE, DUPLICATES_FILE, PROPAGATED_FILE, generation_plan_path(2), removed_path(2))


def clear_output(output: str, sink: Storage) -> None:
    # Job record and manifest first, so nothing half-deleted is ever trusted as a job.
    for name in (MANIFEST_FILE, JOB_FILE):
        sink.delete(join_uri(output, name))
    # Indexes and `loupe match`/`dedup` results too: nothing of the old job may answer for the new one.
    for folder in (STATS_DIR, FAILED_DIR, PARTS_DIR, INDEX_DIR, *{path.split("/")[0] for path in _DERIVED_FILES}):
        for obj in list_folder(sink, output, folder):
            sink.delete(obj.uri)
    sink.delete(join_uri(output, PLAN_FILE))


def plan_job(config: JobConfig, source: Storage, plan_file: Path) -> JobRecord:
    summary = PlanSummary()
    write_plan(plan_objects(source.list(config.input), config.shard_size, summary), str(plan_file))
    if summary.objects == 0:
        ignored = f" ({summary.ignored} other files ignored)" if summary.ignored else ""
        raise UserError(f"no images, .tar or .parquet files found in {config.input}{ignored}")
    check_parquet_column(config, source, plan_file)
    return JobRecord(
        settings=config.plan_settings(),
        listing_sha256=summary.listing_sha256,
        objects=summary.objects,
        shards=summary.shards,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def check_parquet_column(config: JobConfig, source: Storage, plan_file: Path) -> None:
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


def check_models(config: JobConfig) -> None:
    """Each model's config and processor (no weights), before any work is planned or started."""
    # Imported here: it loads torch (2 s), which a rerun with nothing to do never needs.
    from loupe.workers.models.loading import check_model, clip_config, text_encoder_config

    # Each model error names the flag that sets the model and how to do without it.
    checks = []
    if config.captions:
        checks.append((check_model, (config.model,), "set it with --model, or leave caption out of --tasks"))
    if config.moderates and (config.moderation_model or not config.captions):
        checks.append((check_model, (config.judge,), "set the judge with --moderation-model (default: --model), or leave moderate out of --tasks"))
    if config.embeds:
        checks.append((clip_config, (config.image_embedding_model,), "set it with --image-embedding-model, or leave embed out of --tasks"))
        if config.captions or config.text_column:
            checks.append((text_encoder_config, (config.text_embedding_model,), "set it with --text-embedding-model, or leave embed out of --tasks"))
    for check, args, how in checks:
        try:
            check(*args)
        except UserError as exc:
            raise UserError(f"{exc}; {how}") from None


def vet_plan(config: JobConfig, source: Storage, plan_file: Path) -> None:
    """A new generation's plan, checked as a new job's is before anything is written."""
    check_models(config)
    check_parquet_column(config, source, plan_file)
