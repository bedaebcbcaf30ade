"""The records a job keeps beside its parts (job, shard stats, failure, manifest, index): one base, one way to read and write each."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from loupe.schemas.errors import DamagedOutput, one_line

FORMAT_VERSION = 1
INDEX_FORMAT = 1


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
    # A catalog that grows (`loupe run --incremental`): generation 1 is the first plan; each
    # later one appends {"generation", "first_shard", "shards", "objects", "new", "removed",
    # "changed", "unchanged", "plan", "removed_file", "listing_sha256", "created_at"}.
    # `shards` and `objects` above count every generation.
    generations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def generation(self) -> int:
        return 1 + len(self.generations)


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
    # The shortest side images were decoded at (JPEG DCT scaling); None: in full. A query image
    # decoded the same way embeds to the same vector as its catalog row.
    decode_side: int | None = None
    rows_known_content: int = 0  # rows whose PDQ hash matched the job's --match-list
    oom_splits: int = 0  # batches split in two after running out of GPU memory
    batch_size: int = 0  # the replica's batch size when the shard ended (smaller after out-of-memory)


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
    index: dict[str, Any] = field(default_factory=dict)  # kind -> {"path", "sha256", "vectors", "record", "ids"}, added by `loupe index`
    decode_side: int | None = None  # as in ShardStats: how query images must be decoded to match the catalog
    generation: int = 1  # the JobRecord generation these parts complete
    # Per generation that found source objects gone: {"generation", "path", "objects", "sha256"};
    # their rows stay in the parts, readers (search, serve) hide them.
    removed: list[dict[str, Any]] = field(default_factory=list)
    removed_objects: int = 0


@dataclass
class IndexRecord(Record):
    """OUTPUT/index/{kind}/build-NNNNN.index.json: how the index was built, what it holds, and its checksums."""

    kind: str
    factory: str
    params: dict[str, int]  # search parameters chosen by tune_search, applied on load
    vectors: int
    dim: int
    recall_at_10: float  # measured against exact search on held-out data vectors
    target_recall: float
    build_seconds: float
    index_sha256: str = ""
    index_bytes: int = 0
    ids_sha256: str = ""
    column: str = ""
    model: str | None = None  # the embedding model that made the vectors
    metric: str = "inner_product"
    tuning_queries: int = 0
    train_vectors: int = 0
    memory_budget: int = 0
    seed: int = 0
    # Every part whose vectors are in the index, in id order: {"path", "sha256", "rows", "vectors"}.
    parts: list[dict[str, Any]] = field(default_factory=list)
    # Vectors when recall was last measured: incremental adds keep the tuned parameters.
    tuned_vectors: int = 0
    estimated_bytes: int = 0  # the index in memory, as the chooser sized it for the budget
    budget_note: str = ""  # why the index leaves over a fifth of the budget unused, if it does
    target_note: str = ""  # one line when recall@10 falls short of the target, naming the budget that would do
    budget_for_target: int = 0  # the smallest budget the chooser expects to reach the target; 0 if reached
    faiss_version: str = ""
    created_at: str = ""
    format: int = INDEX_FORMAT
