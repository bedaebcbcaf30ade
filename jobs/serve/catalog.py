"""What `loupe serve` reads from OUTPUT, once: the job, the rows the manifest lists, the taxonomy, the duplicates."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loupe.jobs.dedup import group_sizes, representatives
from loupe.jobs.incremental import removed_rows
from loupe.jobs.output import find_manifest, read_job
from loupe.schemas.errors import DamagedOutput, UserError, one_line
from loupe.schemas.layout import MANIFEST_FILE
from loupe.schemas.records import JobRecord, Manifest
from loupe.schemas.taxonomy import DEFAULT_TAXONOMY, Category
from loupe.workers.storage import Storage, join_uri, open_storage

# Held in memory for every listed row: enough for search hits, filters, the review order and
# the thumbnail's source. The rest of a row (metadata, prompt, ...) is read from its part on demand.
HELD_COLUMNS = ("image_id", "source_uri", "status", "caption", "flagged", "flagged_categories", "moderation")
EMBEDDING_COLUMNS = ("image_embedding", "caption_embedding", "text_embedding")
_READ_CONCURRENCY = 8


@dataclass(frozen=True)
class PartEntry:
    """One part the manifest lists: its path, its rows, and where its rows start in the catalog."""

    path: str
    sha256: str
    rows: int
    start: int


class Catalog:
    """The rows of the parts OUTPUT's manifest lists, looked up by image id, and the job they came from.

    Rows whose source objects are gone from INPUT (an incremental rerun) stay in the parts but
    are hidden, as `loupe search` hides them. Row numbers run over the parts in manifest order.
    """

    def __init__(self, storage: Storage, output: str, endpoint_url: str | None, job: JobRecord, manifest: Manifest | None):
        self.storage, self.output, self.endpoint_url = storage, output, endpoint_url
        self.job, self.manifest = job, manifest
        self.categories = job_categories(job.settings)
        self.parts: list[PartEntry] = []
        for entry in manifest.parts if manifest else []:
            try:
                start = self.parts[-1].start + self.parts[-1].rows if self.parts else 0
                self.parts.append(PartEntry(str(entry["path"]), str(entry.get("sha256", "")), int(entry["rows"]), start))
            except (KeyError, TypeError, ValueError):
                raise DamagedOutput(f"{join_uri(output, MANIFEST_FILE)} lists a part it does not describe") from None
        self._starts = np.array([p.start for p in self.parts], dtype=np.int64)
        text_column = job.settings.get("text_column")
        with ThreadPoolExecutor(max_workers=_READ_CONCURRENCY) as pool:
            tables = list(pool.map(lambda part: _held_rows(storage, output, part, text_column), self.parts))
        self.rows = (pa.concat_tables(tables, promote_options="permissive") if tables else _no_rows()).combine_chunks()
        self.removed = removed_rows(storage, output, manifest)
        self.hidden = self._removed(self.removed)
        # Near-duplicate groups of `loupe dedup`: a search shows each group as its representative.
        self.representative = representatives(storage, output)
        self.group_size = group_sizes(self.representative)
        ids = np.array(self.rows.column("image_id").to_pylist(), dtype=bytes) if self.rows.num_rows else np.zeros(0, "S1")
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._flagged = self.rows.column("flagged").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        self._scores: dict[str, np.ndarray] = {}
        self._review: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, output: str, endpoint_url: str | None = None) -> Catalog:
        """Read OUTPUT's job record, manifest and listed parts; a damaged OUTPUT is refused in one line."""
        storage = open_storage(output, endpoint_url)
        job = read_job(storage, output)
        return cls(storage, output, endpoint_url, job, find_manifest(storage, output))  # no manifest yet: no rows

    @property
    def complete(self) -> bool:
        return bool(self.manifest and self.manifest.complete)

    @property
    def settings(self) -> dict[str, Any]:
        return self.job.settings

    @property
    def decode_side(self) -> int | None:
        """How the job decoded its images: a query image decoded alike embeds as its catalog row does."""
        return self.manifest.decode_side if self.manifest else None

    def locate(self, image_id: str) -> int | None:
        """The catalog row of `image_id`, or None when no listed part holds it (or it is hidden)."""
        key = image_id.encode("utf-8", "surrogateescape")
        at = int(np.searchsorted(self._sorted_ids, key))
        if at < len(self._sorted_ids) and self._sorted_ids[at] == key and not self.hidden[self._order[at]]:
            return int(self._order[at])
        return None

    def held(self, row: int) -> dict[str, Any]:
        """The in-memory columns of one catalog row."""
        return {name: self.rows.column(name)[row].as_py() for name in self.rows.column_names}

    def part_of(self, row: int) -> tuple[PartEntry, int]:
        """The part holding catalog row `row`, and the row's number within it."""
        number = int(np.searchsorted(self._starts, row, side="right") - 1)
        return self.parts[number], row - self.parts[number].start

    def full_row(self, row: int, columns: list[str] | None = None) -> dict[str, Any]:
        """One row as its part stores it (without the embeddings unless asked), read from the part."""
        part, offset = self.part_of(row)
        with self.storage.open_seekable(join_uri(self.output, part.path)) as stream:
            parquet = pq.ParquetFile(stream)
            names = columns or [n for n in parquet.schema_arrow.names if n not in EMBEDDING_COLUMNS]
            group, first = 0, 0
            while first + parquet.metadata.row_group(group).num_rows <= offset:
                first += parquet.metadata.row_group(group).num_rows
                group += 1
            found = parquet.read_row_group(group, columns=names).slice(offset - first, 1).to_pylist()[0]
        if isinstance(found.get("source_metadata"), list):  # an Arrow map reads as (key, value) pairs
            found["source_metadata"] = dict(found["source_metadata"])
        return found

    def is_flagged(self, row: int) -> bool:
        return bool(self._flagged[row])

    def review_order(self, category: str) -> np.ndarray:
        """Visible catalog rows with a score for `category`, highest score first (ties in catalog order)."""
        if category not in {c.key for c in self.categories}:
            raise UserError(f"unknown category {category!r}; this job's categories are: {self.category_list()}")
        scores = self.scores(category)
        with self._lock:
            if category not in self._review:
                rows = np.flatnonzero(~np.isnan(scores) & ~self.hidden)
                self._review[category] = rows[np.argsort(-scores[rows], kind="stable")]
            return self._review[category]

    def scores(self, category: str) -> np.ndarray:
        """Every row's score for `category`, NaN where there is none (error rows, no moderation)."""
        with self._lock:
            if category not in self._scores:
                moderation = self.rows.column("moderation")
                if pa.types.is_struct(moderation.type) and moderation.type.get_field_index(category) >= 0:
                    values = pc.struct_field(moderation, category).fill_null(np.nan)
                    self._scores[category] = values.to_numpy(zero_copy_only=False).astype(np.float64)
                else:
                    self._scores[category] = np.full(self.rows.num_rows, np.nan)
            return self._scores[category]

    def category_list(self) -> str:
        return ", ".join(c.key for c in self.categories) or "(none: the job did not moderate)"

    def _removed(self, removed) -> np.ndarray:
        hidden = np.zeros(self.rows.num_rows, dtype=bool)
        if removed:
            ids = self.rows.column("image_id").to_pylist()
            for part in self.parts:
                for row in range(part.start, part.start + part.rows):
                    hidden[row] = removed.hides(part.path, ids[row])
        return hidden


def job_categories(settings: dict[str, Any]) -> tuple[Category, ...]:
    """The job's moderation categories with their thresholds; none when it did not run the moderate task."""
    tasks = settings.get("tasks")
    taxonomy = settings.get("taxonomy")
    if (tasks is not None and "moderate" not in tasks) or (tasks is None and not taxonomy):
        return ()
    if not taxonomy:
        return DEFAULT_TAXONOMY.categories
    return tuple(Category(c["key"], c.get("definition", ""), float(c.get("threshold", 0.5))) for c in taxonomy)


def _held_rows(storage: Storage, output: str, part: PartEntry, text_column: str | None) -> pa.Table:
    uri = join_uri(output, part.path)
    try:
        with storage.open_seekable(uri) as stream:
            parquet = pq.ParquetFile(stream)
            names = parquet.schema_arrow.names
            if "image_id" not in names:
                raise DamagedOutput(f"{uri} has no image_id column: not a part loupe wrote")
            if parquet.metadata.num_rows != part.rows:
                raise DamagedOutput(f"{uri} holds {parquet.metadata.num_rows} rows but the manifest lists {part.rows}")
            wanted = [*HELD_COLUMNS, *(["source_metadata"] if text_column else [])]
            table = parquet.read(columns=[c for c in wanted if c in names])
    except FileNotFoundError:
        raise DamagedOutput(f"{uri}, listed in the manifest, is missing") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DamagedOutput(f"{uri} is not a readable Parquet part ({one_line(exc, 200)})") from None
    for name in HELD_COLUMNS:
        if name not in table.column_names:  # a job without that task: nulls, a type concat promotes
            table = table.append_column(name, pa.nulls(table.num_rows))
    if text_column:
        # The source text the caption index embedded instead of the caption (--text-column).
        metadata = table.column("source_metadata") if "source_metadata" in table.column_names else None
        text = pa.nulls(table.num_rows, pa.string()) if metadata is None else pc.map_lookup(metadata, text_column, "first")
        table = table.append_column("text", text)
    return table.select([*HELD_COLUMNS, *(["text"] if text_column else [])])


def _no_rows() -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array([], pa.string()),
            "source_uri": pa.array([], pa.string()),
            "status": pa.array([], pa.string()),
            "caption": pa.array([], pa.string()),
            "flagged": pa.array([], pa.bool_()),
            "flagged_categories": pa.array([], pa.list_(pa.string())),
            "moderation": pa.nulls(0),
            "text": pa.array([], pa.string()),
        }
    )
