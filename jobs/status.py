"""Where a job stands, read from its OUTPUT alone (so it works while the job runs, or after)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from loupe.schemas.errors import UserError
from loupe.schemas.layout import FAILED_DIR, JOB_FILE, STATS_DIR, shard_id_from_path
from loupe.schemas.records import JobRecord, ShardFailure, ShardStats, add_counts
from loupe.workers.storage import MissingLocation, Storage, join_uri, open_storage


@dataclass
class JobStatus:
    """Shards done and failed, rows by status, throughput, and whether the job is complete."""

    output: str
    shards_total: int
    shards_done: int
    rows_ok: int
    rows_error: int
    images_per_second: float
    failed_shards: list[dict[str, Any]] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)
    model: str = ""
    rows_flagged: int = 0
    flagged: dict[str, int] = field(default_factory=dict)  # rows at or over each category's threshold

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"complete": self.complete}


def job_status(output: str, endpoint_url: str | None = None) -> JobStatus:
    """Read the job record, the stats records and the failure records under OUTPUT."""
    storage = open_storage(output, endpoint_url)
    job_uri = join_uri(output, JOB_FILE)
    if not storage.exists(job_uri):
        raise UserError(f"no loupe job at {output} (no {JOB_FILE})")
    job = JobRecord.from_json(storage.read_bytes(job_uri))
    stats = [ShardStats.from_json(raw) for raw in _read_all(storage, join_uri(output, STATS_DIR))]
    done = {s.shard_id for s in stats}
    failures = [
        f for f in map(ShardFailure.from_json, _read_all(storage, join_uri(output, FAILED_DIR)))
        if f.shard_id not in done
    ]
    span = (max(s.finished_at for s in stats) - min(s.started_at for s in stats)) if stats else 0.0
    rows = sum(s.rows for s in stats)
    return JobStatus(
        output=output,
        shards_total=job.shards,
        shards_done=len(done),
        rows_ok=sum(s.rows_ok for s in stats),
        rows_error=sum(s.rows_error for s in stats),
        images_per_second=round(rows / span, 3) if span > 0 else 0.0,
        failed_shards=[{"shard_id": f.shard_id, "attempts": f.attempts, "error": f.error} for f in failures],
        error_codes=add_counts(s.error_codes for s in stats),
        model=str(job.settings.get("model", "")),
        rows_flagged=sum(s.rows_flagged for s in stats),
        flagged=add_counts(s.flagged for s in stats),
    )


def _read_all(storage: Storage, prefix: str) -> list[bytes]:
    """Every record in an OUTPUT sub-folder, fetched concurrently (one small GET each)."""
    try:
        records = {shard_id_from_path(o.uri): o.uri for o in storage.list(prefix)}
        uris = [records[i] for i in sorted(records.keys() - {None})]
    except MissingLocation:
        return []  # the folder does not exist yet
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(storage.read_bytes, uris))
