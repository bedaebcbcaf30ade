"""The records a job keeps beside its parts (job, shard stats, failure, manifest): one base, one way to read and write each."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from loupe.schemas.errors import DamagedOutput, one_line

FORMAT_VERSION = 1


class ShardState(str, Enum):
    """Where a shard stands; a stats record means done, a failure record means failed."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


def add_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Sum per-key counts (error codes, flagged categories) over shards."""
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))


class Record:
    """JSON round-trip for the record dataclasses; keys a newer loupe added are ignored, missing ones refused."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "") -> Any:
        """The record in `data`; DamagedOutput naming `source` if it is not one."""
        try:
            raw = json.loads(data)
            names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
            return cls(**{k: v for k, v in raw.items() if k in names})
        except (ValueError, TypeError, AttributeError) as exc:
            what = source or f"a {cls.__name__}"
            raise DamagedOutput(f"{what} is not a valid {cls.__name__} record: {one_line(exc)}") from None


@dataclass
class JobRecord(Record):
    """OUTPUT/_job.json: the plan frozen when the job first starts."""

    settings: dict[str, Any]  # JobConfig.plan_settings()
    listing_sha256: str  # over "uri\tsize\n" of every planned object, in order
    objects: int
    shards: int
    created_at: str
    loupe_format: int = FORMAT_VERSION


@dataclass
class ShardStats(Record):
    """OUTPUT/_stats/shard-NNNNN.json: written after the shard's part; its presence means done."""

    shard_id: int
    part: str
    part_sha256: str
    part_bytes: int
    rows: int
    rows_ok: int
    rows_error: int
    error_codes: dict[str, int]
    seconds: float
    started_at: float
    finished_at: float
    node_id: str = ""
    attempt: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    rows_flagged: int = 0
    flagged: dict[str, int] = field(default_factory=dict)  # rows at or over each category's threshold


@dataclass
class ShardFailure(Record):
    """OUTPUT/_failed/shard-NNNNN.json: the shard raised on every attempt; why, in one line."""

    shard_id: int
    attempts: int
    error: str
    failed_at: float


@dataclass
class Manifest(Record):
    """OUTPUT/_manifest.json, written last: readers trust the parts it lists and nothing else."""

    complete: bool
    shards_total: int
    rows_ok: int
    rows_error: int
    parts: list[dict[str, Any]]  # {"path", "shard_id", "rows", "sha256", "bytes"}
    failed_shards: list[int]
    listing_sha256: str
    written_at: str
    loupe_format: int = FORMAT_VERSION
    index: dict[str, Any] = field(default_factory=dict)  # kind -> {"path", "sha256", "vectors"}, added by `loupe index`
