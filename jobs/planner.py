"""Shard planning: a pure function from the sorted input listing to shards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from loupe.schemas.plan import IMAGE_EXTENSIONS, Shard, ShardKind


class Listed(Protocol):
    uri: str
    size: int


def etag_of(obj: Listed) -> str:
    """The listed object's ETag where the backend reports one (S3), else "" (local files)."""
    return str(getattr(obj, "etag", "") or "")


def kind_of(uri: str) -> ShardKind | None:
    """How an object is read: a container shard, a loose image, or None (ignored)."""
    name = uri.rsplit("/", 1)[-1]
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if extension == "tar":
        return ShardKind.TAR
    if extension == "parquet":
        return ShardKind.PARQUET
    if extension in IMAGE_EXTENSIONS:
        return ShardKind.FILES
    return None


@dataclass
class PlanSummary:
    """What a planning pass saw: counts and a fingerprint of exactly what was planned."""

    shards: int = 0
    objects: int = 0
    ignored: int = 0
    _digest: hashlib._Hash = field(default_factory=hashlib.sha256, init=False, repr=False)

    def add(self, obj: Listed) -> None:
        """Count a planned object and fold it into the fingerprint."""
        self.objects += 1
        self._digest.update(f"{obj.uri}\t{obj.size}\n".encode())

    @property
    def listing_sha256(self) -> str:
        return self._digest.hexdigest()


def plan_shards(
    listing: Iterable[Listed], shard_size: int, summary: PlanSummary | None = None, first_shard: int = 0
) -> Iterator[Shard]:
    """One shard per .tar or .parquet; loose images grouped shard_size at a time, in order.

    A generator, so a listing of any length is planned in bounded memory. Shard ids follow
    the listing order from `first_shard` (a catalog's next generation numbers its shards after
    the existing ones), so the same listing always gives the same plan. Objects of other
    kinds (sidecars, READMEs) are counted in `summary.ignored`.
    """
    return (shard for shard, _ in plan_objects(listing, shard_size, summary, first_shard))


def plan_objects(
    listing: Iterable[Listed], shard_size: int, summary: PlanSummary | None = None, first_shard: int = 0
) -> Iterator[tuple[Shard, list[Listed]]]:
    """plan_shards, with each shard's listed objects (their sizes and ETags go into the plan file)."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    summary = summary if summary is not None else PlanSummary()
    pending: list[Listed] = []

    def emit(kind: ShardKind, objects: list[Listed]) -> tuple[Shard, list[Listed]]:
        summary.shards += 1
        return Shard(first_shard + summary.shards - 1, kind, tuple(o.uri for o in objects)), objects

    for obj in listing:
        kind = kind_of(obj.uri)
        if kind is None:
            summary.ignored += 1
            continue
        summary.add(obj)
        if kind is ShardKind.FILES:
            pending.append(obj)
            if len(pending) == shard_size:
                yield emit(ShardKind.FILES, pending)
                pending = []
        else:
            yield emit(kind, [obj])
    if pending:
        yield emit(ShardKind.FILES, pending)


# size and etag (added with incremental runs; -1 and "" where unknown) let a later generation
# tell a changed object from an unchanged one. Readers select columns by name, so plans
# written before them still read.
PLAN_SCHEMA = pa.schema(
    [("shard_id", pa.int32()), ("kind", pa.string()), ("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())]
)
PLAN_BATCH_ROWS = 65_536


def write_plan(shards: Iterable[Shard | tuple[Shard, list[Listed]]], sink: str | BinaryIO) -> None:
    """Stream shards (or plan_objects' pairs, to record sizes and ETags) into a Parquet plan
    file: one row per source object, in shard order."""
    rows: dict[str, list] = {"shard_id": [], "kind": [], "uri": [], "size": [], "etag": []}
    with pq.ParquetWriter(sink, PLAN_SCHEMA, compression="zstd") as writer:
        for item in shards:
            shard, objects = item if isinstance(item, tuple) else (item, None)
            for number, uri in enumerate(shard.uris):
                rows["shard_id"].append(shard.shard_id)
                rows["kind"].append(shard.kind.value)
                rows["uri"].append(uri)
                rows["size"].append(objects[number].size if objects else -1)
                rows["etag"].append(etag_of(objects[number]) if objects else "")
            if len(rows["uri"]) >= PLAN_BATCH_ROWS:
                writer.write_table(pa.table(rows, schema=PLAN_SCHEMA))
                rows = {name: [] for name in rows}
        writer.write_table(pa.table(rows, schema=PLAN_SCHEMA))


def read_plan(source: str | BinaryIO) -> Iterator[Shard]:
    """The shards of a plan file, in order, streamed batch by batch."""
    current: tuple[int, str] | None = None
    uris: list[str] = []
    for batch in pq.ParquetFile(source).iter_batches(batch_size=PLAN_BATCH_ROWS, columns=["shard_id", "kind", "uri"]):
        for shard_id, kind, uri in zip(*(batch.column(i).to_pylist() for i in range(3))):
            if current is not None and current[0] != shard_id:
                yield Shard(current[0], ShardKind(current[1]), tuple(uris))
                uris = []
            current = (shard_id, kind)
            uris.append(uri)
    if current is not None:
        yield Shard(current[0], ShardKind(current[1]), tuple(uris))
