"""Where a job stands, read from its OUTPUT alone (so it works while the job runs, or after)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loupe.jobs.output import read_failures, read_job, read_stats
from loupe.schemas.records import add_counts
from loupe.workers.storage import open_storage


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
    job = read_job(storage, output)
    stats = read_stats(storage, output)
    done = {s.shard_id for s in stats}
    failures = [f for f in read_failures(storage, output) if f.shard_id not in done]
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

