"""A catalog that grows: INPUT's listing now against every object the job planned, and the next generation's plan."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from loupe.jobs.output import find_manifest, write_record
from loupe.jobs.planner import (
    PLAN_BATCH_ROWS,
    Listed,
    PlanSummary,
    etag_of,
    kind_of,
    plan_objects,
    read_plan,
    write_plan,
)
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import DamagedOutput
from loupe.schemas.layout import (
    JOB_FILE,
    generation_plan_path,
    registered_index_files,
    removed_path,
    shard_id_of_part,
)
from loupe.schemas.plan import Shard
from loupe.schemas.records import IndexRecord, JobRecord, Manifest
from loupe.workers.reader import image_id_for
from loupe.workers.storage import MissingLocation, Storage, join_uri

# The catalog is checked against the listing this many objects at a time (one numpy lookup each).
_CHECK_BATCH = 8192
REMOVED_SCHEMA = pa.schema(
    [("uri", pa.string()), ("object_id", pa.string()), ("shard_id", pa.int32()), ("kind", pa.string()), ("reason", pa.string())]
)
_EXAMPLES = 3


def object_key(uri: str) -> bytes:
    """An object's 16-byte id: its image id (the id of its rows when it is a loose image)."""
    return bytes.fromhex(image_id_for(uri))


def _etag_key(etag: str) -> int:
    # 0 means "no ETag recorded" (local files, plans written before ETags were kept).
    return int.from_bytes(hashlib.sha256(etag.encode()).digest()[:8], "little") | 1 if etag else 0


@dataclass
class Catalog:
    """Every object the job planned and has not since removed: sorted 16-byte ids with their
    shard, size and ETag fingerprint (36 bytes an object; URIs stay in the plan files)."""

    ids: np.ndarray  # dtype S16, sorted
    shards: np.ndarray  # int32
    sizes: np.ndarray  # int64, -1 unknown
    etags: np.ndarray  # uint64, 0 unknown

    def __len__(self) -> int:
        return len(self.ids)


def plan_paths(job: JobRecord) -> list[str]:
    """Every generation's plan file, in shard order."""
    return [generation_plan_path(g) for g in range(1, job.generation + 1)]


def read_all_plans(sink: Storage, output: str, job: JobRecord) -> Iterator[Shard]:
    """The shards of every generation, in shard order, streamed."""
    for path in plan_paths(job):
        with sink.open_seekable(join_uri(output, path)) as handle:
            yield from read_plan(handle)


def _plan_batches(sink: Storage, output: str, job: JobRecord) -> Iterator[pa.RecordBatch]:
    for path in plan_paths(job):
        with sink.open_seekable(join_uri(output, path)) as handle:
            parquet = pq.ParquetFile(handle)
            columns = [c for c in ("shard_id", "kind", "uri", "size", "etag") if c in parquet.schema_arrow.names]
            yield from parquet.iter_batches(batch_size=PLAN_BATCH_ROWS, columns=columns)


def _removed_pairs(sink: Storage, output: str, job: JobRecord) -> set[tuple[int, bytes]]:
    pairs: set[tuple[int, bytes]] = set()
    for entry in job.generations:
        if entry.get("removed_file"):
            with sink.open_seekable(join_uri(output, entry["removed_file"])) as handle:
                table = pq.read_table(handle, columns=["shard_id", "object_id"])
            pairs.update(zip(table.column(0).to_pylist(), (bytes.fromhex(i) for i in table.column(1).to_pylist())))
    return pairs


def load_catalog(sink: Storage, output: str, job: JobRecord) -> Catalog:
    """The catalog from the plan files, streamed: linear in the objects, never a row of a part read."""
    removed = _removed_pairs(sink, output, job)
    ids, shards, sizes, etags = [], [], [], []
    for batch in _plan_batches(sink, output, job):
        names = batch.schema.names
        keys = np.array([object_key(u) for u in batch.column(names.index("uri")).to_pylist()], dtype="S16")
        shard = batch.column(names.index("shard_id")).to_numpy(zero_copy_only=False).astype(np.int32)
        n = len(keys)
        size = batch.column(names.index("size")).to_numpy(zero_copy_only=False) if "size" in names else np.full(n, -1)
        etag = [_etag_key(e or "") for e in batch.column(names.index("etag")).to_pylist()] if "etag" in names else [0] * n
        if removed:
            keep = np.array([(int(s), k) not in removed for s, k in zip(shard, keys.tolist())], dtype=bool)
            keys, shard, size = keys[keep], shard[keep], size[keep]
            etag = [e for e, k in zip(etag, keep) if k]
        ids.append(keys)
        shards.append(shard)
        sizes.append(size.astype(np.int64))
        etags.append(np.array(etag, dtype=np.uint64))
    if not ids:
        empty = np.array([], dtype="S16")
        return Catalog(empty, np.array([], np.int32), np.array([], np.int64), np.array([], np.uint64))
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")
    return Catalog(all_ids[order], np.concatenate(shards)[order], np.concatenate(sizes)[order], np.concatenate(etags)[order])


@dataclass
class Diff:
    """INPUT's listing against the catalog: how many objects are new, gone, changed, unchanged."""

    new: int = 0
    removed: int = 0
    changed: int = 0
    unchanged: int = 0
    changed_examples: list[str] = field(default_factory=list)
    listing_seconds: float = 0.0
    superseded: list[int] = field(default_factory=list)  # catalog positions of re-planned changed objects
    gone: np.ndarray | None = None  # catalog positions no longer listed

    def words(self) -> str:
        text = f"{self.new} new, {self.removed} removed, {self.unchanged} unchanged"
        if self.changed:
            text += f", {self.changed} changed (size or ETag differs: {', '.join(self.changed_examples)}"
            text += ", ...)" if self.changed > len(self.changed_examples) else ")"
        return text


def diff_listing(listing: Iterable[Listed], catalog: Catalog, diff: Diff, replan_changed: bool = False) -> Iterator[Listed]:
    """The objects to plan next, in listing order: new ones, and changed ones when asked.

    Streams the listing against the catalog in batches; counts go into `diff` (removed once
    the listing is exhausted). Memory: the catalog, plus one bit per catalog object.
    """
    seen = np.zeros(len(catalog), dtype=bool)
    batch: list[Listed] = []
    timed = _timed(listing, diff)
    for obj in timed:
        if kind_of(obj.uri) is None:
            continue
        batch.append(obj)
        if len(batch) >= _CHECK_BATCH:
            yield from _check(batch, catalog, seen, diff, replan_changed)
            batch = []
    yield from _check(batch, catalog, seen, diff, replan_changed)
    diff.gone = np.flatnonzero(~seen)
    diff.removed = len(diff.gone)


def _timed(listing: Iterable[Listed], diff: Diff) -> Iterator[Listed]:
    """The listing, with the time spent waiting on it (the store, not loupe) added to diff."""
    iterator = iter(listing)
    while True:
        started = time.perf_counter()
        obj = next(iterator, None)
        diff.listing_seconds += time.perf_counter() - started
        if obj is None:
            return
        yield obj


def _check(batch: list[Listed], catalog: Catalog, seen: np.ndarray, diff: Diff, replan: bool) -> Iterator[Listed]:
    if not batch:
        return
    keys = np.array([object_key(o.uri) for o in batch], dtype="S16")
    where = np.searchsorted(catalog.ids, keys)
    inside = where < len(catalog)
    found = np.zeros(len(batch), dtype=bool)
    found[inside] = catalog.ids[where[inside]] == keys[inside]
    for obj, known, position in zip(batch, found, where):
        if not known:
            diff.new += 1
            yield obj
            continue
        seen[position] = True
        old_size, old_etag = int(catalog.sizes[position]), int(catalog.etags[position])
        etag = _etag_key(etag_of(obj))
        if (old_size >= 0 and old_size != obj.size) or (old_etag and etag and old_etag != etag):
            diff.changed += 1
            if len(diff.changed_examples) < _EXAMPLES:
                diff.changed_examples.append(obj.uri)
            if replan:
                diff.superseded.append(int(position))
                yield obj
        else:
            diff.unchanged += 1


@dataclass
class Growth:
    """What a rerun on an existing job decided: the job record (a new generation or not), the words for the user."""

    job: JobRecord
    notes: list[str] = field(default_factory=list)
    diff: Diff | None = None
    listed: bool = False
    planning_seconds: float = 0.0


def grow(
    config: JobConfig,
    source: Storage,
    sink: Storage,
    job: JobRecord,
    done: set[int],
    check_plan: Callable[[Path], None],
) -> Growth:
    """A rerun on an existing job: resume an incomplete one without listing; on a complete one,
    list INPUT and report what changed, or with `config.incremental` freeze the next generation.

    `check_plan` vets a new generation's plan (models, Parquet columns) before OUTPUT is touched.
    """
    generation = job.generation
    if len(done) < job.shards:
        note = (
            f"resuming generation {generation}'s frozen plan ({len(done)} of {job.shards} shards done); "
            "INPUT is not listed again until it completes"
        )
        return Growth(job, [note + ("; then rerun with --incremental" if config.incremental else "")])
    started = time.perf_counter()
    catalog = load_catalog(sink, config.output, job)
    diff = Diff()
    wanted = diff_listing(source.list(config.input), catalog, diff, config.replan_changed and config.incremental)
    if not config.incremental:
        for _ in wanted:
            pass
        growth = Growth(job, diff=diff, listed=True, planning_seconds=time.perf_counter() - started)
        growth.notes.append(_rerun_note(diff, generation))
        return growth
    with tempfile.TemporaryDirectory(prefix="loupe-generation-") as tmp:
        plan_file, removed_file = Path(tmp) / "plan.parquet", Path(tmp) / "removed.parquet"
        summary = PlanSummary()
        write_plan(plan_objects(wanted, config.shard_size, summary, first_shard=job.shards), str(plan_file))
        growth = Growth(job, diff=diff, listed=True, planning_seconds=time.perf_counter() - started)
        if summary.objects == 0 and diff.removed == 0:
            growth.notes.append(f"nothing new in INPUT since generation {generation} ({diff.unchanged} unchanged"
                                + (f", {diff.changed} changed: --replan-changed processes them again" if diff.changed else "")
                                + "); nothing written")
            return growth
        if summary.objects:
            check_plan(plan_file)
        removed = _write_removed(sink, config.output, job, catalog, diff, removed_file)
        growth.job = _next_generation(config, sink, job, diff, summary, plan_file, removed_file if removed else None)
    growth.planning_seconds = time.perf_counter() - started
    growth.notes.append(
        f"generation {generation + 1}: {summary.shards} new shards after the {job.shards} of the catalog"
        + (f"; {diff.changed} changed objects not processed again (--replan-changed does)" if diff.changed and not config.replan_changed else "")
    )
    return growth


def _rerun_note(diff: Diff, generation: int) -> str:
    if diff.new or diff.removed or diff.changed:
        return (
            f"the job is complete, but INPUT has changed since generation {generation}: {diff.words()}; "
            "rerun with --incremental to catch the catalog up"
        )
    return f"the job is complete and INPUT is unchanged ({diff.unchanged} objects): nothing to do"


def _write_removed(
    sink: Storage, output: str, job: JobRecord, catalog: Catalog, diff: Diff, local: Path
) -> int:
    """The gone (and superseded) objects, with their URIs found by one more pass over the plans."""
    if diff.gone is None or not (len(diff.gone) or diff.superseded):
        return 0
    reasons = {(int(catalog.shards[p]), bytes(catalog.ids[p])): "removed" for p in diff.gone}
    reasons.update({(int(catalog.shards[p]), bytes(catalog.ids[p])): "changed" for p in diff.superseded})
    rows: dict[str, list] = {name: [] for name in REMOVED_SCHEMA.names}
    for batch in _plan_batches(sink, output, job):
        names = batch.schema.names
        uris = batch.column(names.index("uri")).to_pylist()
        for uri, shard, kind in zip(uris, batch.column(names.index("shard_id")).to_pylist(), batch.column(names.index("kind")).to_pylist()):
            key = object_key(uri)
            reason = reasons.get((shard, key))
            if reason is not None:
                for name, value in zip(REMOVED_SCHEMA.names, (uri, key.hex(), shard, kind, reason)):
                    rows[name].append(value)
    pq.write_table(pa.table(rows, schema=REMOVED_SCHEMA), str(local), compression="zstd")
    return len(rows["uri"])


def _next_generation(
    config: JobConfig, sink: Storage, job: JobRecord, diff: Diff, summary: PlanSummary, plan: Path, removed: Path | None
) -> JobRecord:
    """Write the new generation's plan and removed list, then the job record: the commit point.

    Killed before the job record, the files are orphans the next --incremental run rewrites;
    after it, a plain rerun resumes the generation like any incomplete job.
    """
    generation = job.generation + 1
    plan_data = plan.read_bytes()
    sink.write_bytes(join_uri(config.output, generation_plan_path(generation)), plan_data)
    entry: dict[str, Any] = {
        "generation": generation,
        "first_shard": job.shards,
        "shards": summary.shards,
        "objects": summary.objects,
        "new": diff.new,
        "removed": diff.removed,
        "changed": diff.changed,
        "replanned": len(diff.superseded),
        "unchanged": diff.unchanged,
        "plan": generation_plan_path(generation),
        "removed_file": "",
        "removed_sha256": "",
        "removed_rows": 0,
        "listing_sha256": summary.listing_sha256,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if removed is not None:
        data = removed.read_bytes()
        sink.write_bytes(join_uri(config.output, removed_path(generation)), data)
        entry.update(
            removed_file=removed_path(generation),
            removed_sha256=hashlib.sha256(data).hexdigest(),
            removed_rows=pq.ParquetFile(str(removed)).metadata.num_rows,
        )
    grown = JobRecord(
        settings=config.plan_settings(),
        listing_sha256=job.listing_sha256,
        objects=job.objects + summary.objects,
        shards=job.shards + summary.shards,
        created_at=job.created_at,
        generations=[*job.generations, entry],
    )
    write_record(sink, config.output, JOB_FILE, grown)
    return grown


def removed_entries(job: JobRecord) -> list[dict[str, Any]]:
    """The manifest's `removed`: one entry per generation that recorded removed objects."""
    return [
        {"generation": g["generation"], "path": g["removed_file"], "objects": g["removed_rows"], "sha256": g["removed_sha256"]}
        for g in job.generations
        if g.get("removed_file")
    ]


class RemovedRows:
    """Rows a reader must hide: loose images by (shard, image id), containers by shard."""

    def __init__(self, images: set[tuple[int, str]], containers: set[int]):
        self.images, self.containers = images, containers

    def __bool__(self) -> bool:
        return bool(self.images or self.containers)

    def hides(self, part_path: str, image_id: str) -> bool:
        shard = shard_id_of_part(part_path)
        return shard in self.containers or (shard, image_id) in self.images


def removed_rows(sink: Storage, output: str, manifest: Manifest | None) -> RemovedRows:
    """The manifest's removed objects as a RemovedRows (empty for a catalog of one generation)."""
    images: set[tuple[int, str]] = set()
    containers: set[int] = set()
    for entry in manifest.removed if manifest is not None else ():
        with sink.open_seekable(join_uri(output, entry["path"])) as handle:
            table = pq.read_table(handle, columns=["object_id", "shard_id", "kind"])
        for object_id, shard, kind in zip(*(table.column(i).to_pylist() for i in range(3))):
            if kind == "files":
                images.add((shard, object_id))
            else:
                containers.add(shard)
    return RemovedRows(images, containers)


def index_record(sink: Storage, output: str, kind: str) -> IndexRecord | None:
    """The record of the `kind` index the manifest names, or None (none registered, or unreadable: rebuilt anyway)."""
    try:
        manifest = find_manifest(sink, output)
        entry = manifest.index.get(kind) if manifest is not None else None
        if not entry:
            return None
        uri = join_uri(output, registered_index_files(kind, entry)[2])
        return IndexRecord.from_json(sink.read_bytes(uri), source=uri)
    except (FileNotFoundError, NotADirectoryError, MissingLocation, DamagedOutput):
        return None


def index_is_current(kind: str, record: IndexRecord, manifest: Manifest | None) -> bool:
    """Whether the registered `kind` index holds exactly the manifest's parts (a rerun with nothing new)."""
    if manifest is None:
        return False
    entry = manifest.index.get(kind)
    indexed = [(p["path"], p.get("sha256", "")) for p in record.parts]
    return (
        entry is not None
        and entry.get("sha256") == record.index_sha256
        and indexed == [(p["path"], p.get("sha256", "")) for p in manifest.parts]
    )


def index_note(kind: str, before: IndexRecord, after: IndexRecord) -> str:
    """One line: the index was extended in place, or rebuilt (and why, when the chooser changed its mind)."""
    added = after.vectors - before.vectors
    if after.factory == before.factory and after.tuned_vectors == before.tuned_vectors and added > 0:
        return f"{kind} index extended with {added} vectors ({after.factory} still suits {after.vectors})"
    if after.factory != before.factory:
        return f"{kind} index rebuilt: {after.vectors} vectors now suit {after.factory}, not {before.factory}"
    return f"{kind} index rebuilt ({after.vectors} vectors, {after.factory})"
