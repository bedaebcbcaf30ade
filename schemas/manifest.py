"""The files a job keeps beside its parts: the frozen plan, per-shard stats, failures, manifest."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

JOB_FILE = "_job.json"
PLAN_FILE = "_plan.parquet"
MANIFEST_FILE = "_manifest.json"
PARTS_DIR = "parts"
STATS_DIR = "_stats"
FAILED_DIR = "_failed"
FORMAT_VERSION = 1


class ShardState(str, Enum):
    """Where a shard stands; a stats record means done, a failure record means failed."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


def part_path(shard_id: int) -> str:
    return f"{PARTS_DIR}/part-{shard_id:05d}.parquet"


def stats_path(shard_id: int) -> str:
    return f"{STATS_DIR}/shard-{shard_id:05d}.json"


def failed_path(shard_id: int) -> str:
    return f"{FAILED_DIR}/shard-{shard_id:05d}.json"


_RECORD_NAME = re.compile(r"shard-(\d+)\.json")


def shard_id_from_path(path: str) -> int | None:
    """The shard number in a stats or failure record's file name; None for anything else
    (such as the temp file of a write that a killed process left behind)."""
    match = _RECORD_NAME.fullmatch(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def add_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Sum per-key counts (error codes, flagged categories) over shards."""
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))


class _Record:
    """JSON round-trip for the dataclasses below."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> Any:
        return cls(**json.loads(data))


@dataclass
class JobRecord(_Record):
    """OUTPUT/_job.json: the plan frozen when the job first starts."""

    settings: dict[str, Any]  # JobConfig.plan_settings()
    listing_sha256: str  # over "uri\tsize\n" of every planned object, in order
    objects: int
    shards: int
    created_at: str
    loupe_format: int = FORMAT_VERSION


@dataclass
class ShardStats(_Record):
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
class ShardFailure(_Record):
    """OUTPUT/_failed/shard-NNNNN.json: the shard raised on every attempt; why, in one line."""

    shard_id: int
    attempts: int
    error: str
    failed_at: float


@dataclass
class Manifest(_Record):
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
