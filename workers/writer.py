"""Parquet parts and shard records: written whole under deterministic names, never half-visible."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from loupe.schemas.layout import part_path, stats_path
from loupe.schemas.records import ShardStats
from loupe.workers.faults import fault_point
from loupe.workers.storage import Storage, join_uri


@dataclass(frozen=True)
class WrittenPart:
    """Where a part went and what it holds, for the stats record and the manifest."""

    path: str  # relative to OUTPUT
    sha256: str
    bytes: int
    rows: int


def encode_part(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    """Rows (dicts keyed by the schema's field names) as Parquet file bytes."""
    table = pa.Table.from_pylist(rows, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_part(
    storage: Storage, output: str, shard_id: int, rows: list[dict[str, Any]], schema: pa.Schema
) -> WrittenPart:
    """Write a shard's part in one atomic put; a retried shard rewrites the same name."""
    data = encode_part(rows, schema)
    path = part_path(shard_id)
    fault_point("write", [join_uri(output, path)])
    storage.write_bytes(join_uri(output, path), data)
    return WrittenPart(path, hashlib.sha256(data).hexdigest(), len(data), len(rows))


def write_stats(storage: Storage, output: str, stats: ShardStats) -> None:
    """Mark a shard done; called only after its part is in place."""
    storage.write_bytes(join_uri(output, stats_path(stats.shard_id)), stats.to_json())
