"""OUTPUT <-> index: the parts' vectors streamed in, a numbered build under index/{kind}/ written and registered, loaded sha-checked."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loupe.jobs.output import find_job, list_folder, read_manifest, write_manifest
from loupe.schemas.errors import DamagedOutput, UserError
from loupe.schemas.layout import (
    IDS_FILE,
    INDEX_FILE,
    INDEX_RECORD_FILE,
    index_build_of,
    index_build_path,
    index_path,
    registered_index_files,
)
from loupe.schemas.records import IndexRecord
from loupe.schemas.rows import text_embedding_column
from loupe.workers.index.build import as_vectors, build_index
from loupe.workers.index.choose import choose_index
from loupe.workers.index.ids import IdMap, IdWriter
from loupe.workers.index.library import faiss
from loupe.workers.index.threads import use_cpu_share
from loupe.workers.index.tune import apply_params
from loupe.workers.storage import Storage, join_uri, open_storage

# The kinds of index, and the job setting naming the model that embeds each kind's queries.
KINDS = ("image", "caption")
MODEL_SETTINGS = {"image": "image_embedding_model", "caption": "text_embedding_model"}
READ_BATCH = 16_384
# A build's claim on its number, taken exclusively under its record's name before anything else
# is written, and replaced by the record once the index and the id map are in place.
_CLAIM = b'{"building": true}\n'
_CLAIM_ATTEMPTS = 100
# A reader whose manifest's files were removed by builds since re-reads the manifest this often.
_LOAD_ATTEMPTS = 3


def build_output_index(
    output: str,
    *,
    kind: str = "image",
    memory_budget: int,
    target_recall: float = 0.95,
    endpoint_url: str | None = None,
    incremental: bool = False,
    seed: int = 0,
) -> IndexRecord:
    """Index the `kind` embeddings of every part in OUTPUT's manifest under OUTPUT/index/{kind}/.

    Writes a new numbered build, build-NNNNN.index.faiss, .ids.parquet (faiss id -> image_id,
    part, row) and .index.json, then points _manifest.json at it in one write:
    {"index": {kind: {"path", "sha256", "vectors", "record", "ids"}}}; then removes the builds
    no reader needs any more (see _sweep). With
    `incremental`, parts that are new since the last build are added to the trained index when
    it still suits the total size (same choose_index result); otherwise it is rebuilt.
    """
    _check_kind(kind)
    use_cpu_share()
    storage = open_storage(output, endpoint_url)
    parts = [dict(p) for p in read_manifest(storage, output).parts]
    if not parts:
        raise UserError(f"the job at {output} has no parts to index")
    job = find_job(storage, output)
    if job is not None and "embed" not in job.settings.get("tasks", ("embed",)):
        raise UserError(
            f"the job at {output} did not run the embed task, so it has no vectors to index "
            "(rerun it with --tasks including embed)"
        )
    settings = job.settings if job else {}
    model = settings.get(MODEL_SETTINGS[kind])
    column = "image_embedding" if kind == "image" else text_embedding_column(settings.get("text_column"))
    if incremental:
        record = _extend(storage, output, kind, column, parts, memory_budget, model)
        if record is not None:
            return record
    source = _PartVectors(storage, output, parts, column)
    try:
        index, record = build_index(
            source,
            memory_budget_bytes=memory_budget,
            target_recall=target_recall,
            seed=seed,
            vectors_hint=sum(int(p.get("rows", 0)) for p in parts) or None,
        )
    except BaseException:
        if source.ids_path:
            os.unlink(source.ids_path)
        raise
    record.column, record.model = column, model
    record.parts = _indexed_parts(parts, source.vectors_per_part)
    try:
        _save(storage, output, kind, index, record, source.ids_path)
    finally:
        os.unlink(source.ids_path)
    return record


def load_index(
    output: str, kind: str = "image", endpoint_url: str | None = None
) -> tuple[faiss.Index, IdMap, IndexRecord]:
    """The index of `kind` with its id map and record, search parameters applied.

    Exactly the files the manifest names are opened. The index file's sha256 must equal both
    its record's and the manifest's before faiss parses a byte of it (faiss.read_index on a
    crafted file can corrupt memory).
    """
    use_cpu_share()
    index, ids, record, _ = _load(open_storage(output, endpoint_url), output, kind)
    return index, ids, record


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def _indexed_parts(parts: list[dict[str, Any]], vectors: list[int]) -> list[dict[str, Any]]:
    """IndexRecord.parts: the manifest's entries of the parts indexed, with their vector counts."""
    return [
        {"path": p["path"], "sha256": p.get("sha256", ""), "rows": p.get("rows"), "vectors": count}
        for p, count in zip(parts, vectors, strict=True)
    ]


class _PartVectors:
    """The embedding column of the manifest's parts, streamed row group by row group.

    Each full pass also writes the (image_id, part, row) of every vector it yields to a local
    Parquet file; after build_index the last pass's file is ids.parquet, in faiss id order.
    """

    def __init__(
        self, storage: Storage, output: str, parts: list[dict[str, Any]], column: str, first_part: int = 0
    ):
        self.storage, self.output, self.parts, self.column = storage, output, parts, column
        self.first_part = first_part
        self.ids_path: str | None = None
        self.vectors_per_part: list[int] = []

    def __call__(self) -> Iterator[np.ndarray]:
        handle, path = tempfile.mkstemp(prefix="loupe-ids-", suffix=".parquet")
        os.close(handle)
        before = self.vectors_per_part  # the last full pass's counts: none before the first
        counts = []
        try:
            with IdWriter(path) as ids:
                for number, part in enumerate(self.parts):
                    count = 0
                    for vectors, image_ids, rows in self._read_part(part):
                        count += len(vectors)
                        ids.add(image_ids, self.first_part + number, rows)
                        yield vectors
                    if before and count != before[number]:
                        raise DamagedOutput(
                            f"{join_uri(self.output, part['path'])} changed while the index was built "
                            f"({before[number]} vectors on the first pass, {count} on the second)"
                        )
                    counts.append(count)
        except BaseException:
            os.unlink(path)
            raise
        if self.ids_path:
            os.unlink(self.ids_path)
        self.ids_path, self.vectors_per_part = path, counts

    def _read_part(self, part: dict[str, Any]) -> Iterator[tuple[np.ndarray, pa.Array, np.ndarray]]:
        uri = join_uri(self.output, part["path"])
        try:
            with self.storage.open_seekable(uri) as stream:
                parquet = pq.ParquetFile(stream)
                if self.column not in parquet.schema_arrow.names:
                    raise UserError(
                        f"{uri} has no {self.column} column: the job did not compute these embeddings "
                        "(run it with the embed task)"
                    )
                offset = 0
                for batch in parquet.iter_batches(batch_size=READ_BATCH, columns=[self.column, "image_id"]):
                    column = batch.column(0)
                    valid = column.is_valid().to_numpy(zero_copy_only=False)
                    rows = offset + np.flatnonzero(valid)
                    offset += batch.num_rows
                    if not len(rows):
                        continue
                    kept = column.filter(column.is_valid())
                    yield _list_to_matrix(kept, uri, self.column), batch.column(1).filter(valid), rows
        except FileNotFoundError:
            raise DamagedOutput(f"{uri}, listed in the manifest, is missing") from None
        except pa.ArrowInvalid as exc:
            raise DamagedOutput(f"{uri} is not a readable Parquet part ({str(exc).splitlines()[0]})") from None


def _list_to_matrix(column: pa.Array, uri: str, name: str) -> np.ndarray:
    if not (
        pa.types.is_fixed_size_list(column.type)
        or pa.types.is_list(column.type)
        or pa.types.is_large_list(column.type)
    ):
        raise DamagedOutput(f"{uri}: column {name} is {column.type}, not a list of floats")
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    else:
        lengths = np.unique(column.value_lengths().to_numpy(zero_copy_only=False))
        if len(lengths) != 1:
            raise DamagedOutput(f"{uri}: the {name} vectors do not all have the same length")
        dim = int(lengths[0])
    values = column.flatten()
    if values.null_count:
        raise DamagedOutput(f"{uri}: some {name} vectors have null values")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), dim)


def _extend(
    storage: Storage,
    output: str,
    kind: str,
    column: str,
    parts: list[dict[str, Any]],
    budget: int,
    model: str | None,
) -> IndexRecord | None:
    """Add the new parts' vectors to the registered index, or None when a full rebuild is needed."""
    try:
        index, ids, record, files = _load(storage, output, kind)
    except (UserError, DamagedOutput):
        return None  # none registered, damaged or stale: rebuild from the parts
    indexed = {(p["path"], p["sha256"]) for p in record.parts}
    current = {(p["path"], p.get("sha256", "")) for p in parts}
    if not indexed <= current or record.model != model:
        return None  # a part was rewritten or removed, or another model made the vectors
    new_parts = [p for p in parts if (p["path"], p.get("sha256", "")) not in indexed]
    if not new_parts:
        _sweep(storage, output, kind, index_build_of(files[0]) or 0, keep=set(files))  # a killed build's leftovers
        return record
    estimate = record.vectors + sum(int(p.get("rows", 0)) for p in new_parts)
    try:
        still = choose_index(estimate, record.dim, budget)
    except UserError:
        return None
    if (still.kind, still.factory) != (record.kind, record.factory):
        return None
    source = _PartVectors(storage, output, new_parts, column, first_part=len(record.parts))
    started = time.perf_counter()
    try:
        for batch in source():
            index.add(as_vectors(batch, record.dim))
        handle, merged = tempfile.mkstemp(prefix="loupe-ids-", suffix=".parquet")
        os.close(handle)
        with IdWriter(merged) as writer:
            writer.add_table(ids.table)
            writer.add_table(pq.read_table(source.ids_path))
    finally:
        if source.ids_path:
            os.unlink(source.ids_path)
    record.parts += _indexed_parts(new_parts, source.vectors_per_part)
    record.vectors = int(index.ntotal)
    record.build_seconds = round(record.build_seconds + time.perf_counter() - started, 3)
    record.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        _save(storage, output, kind, index, record, merged)
    finally:
        os.unlink(merged)
    return record


def _save(
    storage: Storage, output: str, kind: str, index: faiss.Index, record: IndexRecord, ids_path: str
) -> None:
    build = _claim_build(storage, output, kind)
    files = tuple(index_build_path(kind, build, name) for name in (INDEX_FILE, IDS_FILE, INDEX_RECORD_FILE))
    data = faiss.serialize_index(index).tobytes()
    record.index_sha256 = hashlib.sha256(data).hexdigest()
    record.index_bytes = len(data)
    storage.write_bytes(join_uri(output, files[0]), data)
    del data
    with open(ids_path, "rb") as handle:
        ids = handle.read()
    record.ids_sha256 = hashlib.sha256(ids).hexdigest()
    storage.write_bytes(join_uri(output, files[1]), ids)
    del ids
    # The record after the files it describes, and the manifest last: readers trust the manifest.
    storage.write_bytes(join_uri(output, files[2]), record.to_json())
    _register(storage, output, kind, record, files, build)


def _claim_build(storage: Storage, output: str, kind: str) -> int:
    """A build number above every build in the folder, claimed exclusively: two builds never
    write the same file, and a killed build's number is never reused."""
    built = (index_build_of(obj.uri) for obj in list_folder(storage, output, index_path(kind)))
    build = max((number for number in built if number is not None), default=0)
    for _ in range(_CLAIM_ATTEMPTS):
        build += 1
        if storage.create_exclusive(join_uri(output, index_build_path(kind, build, INDEX_RECORD_FILE)), _CLAIM):
            return build
    raise UserError(
        f"{_CLAIM_ATTEMPTS} {kind} index build numbers in {join_uri(output, index_path(kind))} were taken "
        "meanwhile: is another loupe index running on this OUTPUT?"
    )


def _register(
    storage: Storage, output: str, kind: str, record: IndexRecord, files: tuple[str, ...], build: int
) -> None:
    """Point the manifest at the build's files in one write, then remove what no reader needs."""
    manifest = read_manifest(storage, output)
    previous = manifest.index.get(kind)
    manifest.index[kind] = {
        "path": files[0],
        "sha256": record.index_sha256,
        "vectors": record.vectors,
        "record": files[2],
        "ids": files[1],
    }
    write_manifest(storage, output, manifest)
    keep = set(files) | (set(registered_index_files(kind, previous)) if previous else set())
    _sweep(storage, output, kind, build, keep)


def _sweep(storage: Storage, output: str, kind: str, build: int, keep: set[str]) -> None:
    """Delete the `kind` index files that no manifest names any more.

    Kept: the files of the manifest just written and of the one it replaced, because a reader
    that read the replaced manifest a moment ago is opening those now (one that read an even
    older one re-reads the manifest when its files are gone, see _load); and builds numbered
    above `build`, which another build started since may still be writing. Deleted: older
    builds, the leftovers of killed builds (never registered), the fixed-name files of the
    layout before builds were numbered once no manifest in reach names them, local temp files.
    """
    for obj in list_folder(storage, output, index_path(kind)):
        number = index_build_of(obj.uri)
        if any(obj.uri.endswith("/" + path) for path in keep) or (number is not None and number > build):
            continue
        storage.delete(obj.uri)


def _load(storage: Storage, output: str, kind: str) -> tuple[faiss.Index, IdMap, IndexRecord, tuple[str, ...]]:
    missing = UserError(
        f"no {_check_kind(kind)} index in {output}; run loupe index {output}"
        + ("" if kind == "image" else f" --kind {kind}")
    )
    entry = read_manifest(storage, output).index.get(kind)
    for attempt in range(_LOAD_ATTEMPTS):
        if entry is None:
            raise missing
        files = registered_index_files(kind, entry)
        try:
            data, ids, raw_record = (storage.read_bytes(join_uri(output, path)) for path in files)
            break
        except FileNotFoundError:
            # Builds registered since this manifest was read have removed its files: the
            # manifest now names newer ones.
            newer = read_manifest(storage, output).index.get(kind)
            if newer == entry or attempt + 1 == _LOAD_ATTEMPTS:
                raise missing from None
            entry = newer
    index_uri, ids_uri, record_uri = (join_uri(output, path) for path in files)
    try:
        record = IndexRecord.from_json(raw_record, source=record_uri)
    except DamagedOutput as exc:
        raise DamagedOutput(f"{exc}; rebuild it with loupe index {output}") from None
    digest = hashlib.sha256(data).hexdigest()
    if {record.index_sha256, entry.get("sha256")} != {digest}:
        raise DamagedOutput(
            f"{index_uri} does not match its recorded sha256 (modified or truncated); "
            f"refusing to load it; rebuild it with loupe index {output}"
        )
    if hashlib.sha256(ids).hexdigest() != record.ids_sha256:
        raise DamagedOutput(
            f"{ids_uri} does not match its recorded sha256 (modified or truncated); "
            f"rebuild it with loupe index {output}"
        )
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    del data
    id_map = IdMap(ids)
    if index.ntotal != record.vectors or len(id_map) != record.vectors:
        raise DamagedOutput(
            f"the {kind} index in {output} is inconsistent with its record; rebuild it with loupe index {output}"
        )
    apply_params(index, record.params)
    return index, id_map, record, files
