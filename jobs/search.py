"""Search a job's catalog by text or by image, filtered on the stored moderation labels."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loupe.jobs.indexing import KINDS, MODEL_SETTINGS, load_index
from loupe.jobs.incremental import RemovedRows, removed_rows
from loupe.jobs.output import find_job, find_manifest
from loupe.schemas.errors import DamagedOutput, UserError
from loupe.schemas.records import IndexRecord
from loupe.workers.index.ids import IdMap
from loupe.workers.index.library import faiss
from loupe.workers.index.tune import apply_params
from loupe.workers.storage import Storage, join_uri, open_storage

# A filtered search asks for this many times k first, then four times more each round, so a
# filter that keeps one hit in a thousand costs a handful of searches rather than one per hit.
FIRST_DEPTH = 4
GROWTH = 4
# faiss allocates k results per query up front; past this depth a filter that selective returns
# what it found rather than asking for the whole of a billion-vector index.
MAX_DEPTH = 1 << 20
_DETAIL_COLUMNS = ("image_id", "source_uri", "caption", "flagged", "flagged_categories", "source_metadata")


@dataclass
class Hit:
    """One search result: where it ranks, how close it is, and the row it points to."""

    rank: int
    score: float
    image_id: str
    source_uri: str
    caption: str | None
    flagged_categories: list[str] = field(default_factory=list)
    duplicates: int = 0  # near-duplicates this hit stands for (`loupe dedup`), shown unless --all-duplicates
    text: str | None = None  # the source text the caption index embedded (--text-column), when not the caption

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def search(
    output: str,
    *,
    text: str | None = None,
    image: str | None = None,
    k: int = 10,
    kind: str = "image",
    exclude_flagged: bool = False,
    flagged: str | None = None,
    endpoint_url: str | None = None,
    all_duplicates: bool = False,
) -> list[Hit]:
    """The k nearest rows of OUTPUT to a text or an image (a local path or s3:// URI).

    Text queries on the image index go through the CLIP text tower of the job's image model,
    on the caption index through its sentence model; image queries through the CLIP image
    tower. `exclude_flagged` drops flagged rows, `flagged` keeps only rows flagged for that
    category; either way the search goes deeper until k rows pass or the index is exhausted.
    Once `loupe dedup` has grouped near-duplicates, a group shows as its representative alone
    (its hit counting the copies) unless `all_duplicates`.
    """
    _check_query(text, image is not None, kind, k, exclude_flagged, flagged, "--image PATH_OR_URI", "--kind image")
    # Mistakes the job record or the query image show answer before the index and model load.
    storage = open_storage(output, endpoint_url)
    job = find_job(storage, output)
    if exclude_flagged or flagged is not None:
        _check_moderation(job.settings if job else {}, flagged)
    query_bytes = _read_query_image(image, endpoint_url) if image is not None else None
    searcher = open_searcher(output, kind, endpoint_url)
    return searcher.search(
        text=text, image_bytes=query_bytes, image_name=image, k=k, exclude_flagged=exclude_flagged,
        flagged=flagged, all_duplicates=all_duplicates,
    )


def open_searcher(output: str, kind: str = "image", endpoint_url: str | None = None, *, partial: bool = False) -> Searcher:
    """Load OUTPUT's `kind` index, its id map, the rows it hides and the model that embeds its queries, once.

    A job still running or interrupted is refused (its catalog is not whole) unless `partial`,
    as `loupe serve` serves what a running job has written so far.
    """
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    storage = open_storage(output, endpoint_url)
    job = find_job(storage, output)
    settings = job.settings if job else {}
    manifest = find_manifest(storage, output)
    if not partial and job is not None and (manifest is None or not manifest.complete):
        from loupe.jobs.status import partial_job

        raise UserError(partial_job(storage, output, job))
    if "embed" not in settings.get("tasks", ("embed",)):
        raise UserError(f"the job at {output} did not run the embed task, so it has no vectors to search (rerun it with --tasks including embed)")
    index, ids, record = load_index(output, kind, endpoint_url)
    model = settings.get(MODEL_SETTINGS[kind]) or record.model
    if not model:
        raise UserError(
            f"the job at {output} does not record its {kind} embedding model ({MODEL_SETTINGS[kind]})"
        )
    if record.model and record.model != model:
        # Queries must come from the model that made the indexed vectors.
        raise UserError(
            f"the {kind} index holds vectors of {record.model!r} but the job now uses {model!r}; "
            f"rebuild it with loupe index {output}"
        )
    removed = removed_rows(storage, output, manifest)  # gone from INPUT: their rows are never returned
    from loupe.jobs.dedup import representatives

    embedder = _embedder(kind, model)
    if embedder.dim != record.dim:
        raise UserError(
            f"model {model!r} makes {embedder.dim}-dimensional vectors but the {kind} index holds "
            f"{record.dim}-dimensional ones; rebuild the index with loupe index {output}"
        )
    rows = _PartRows(storage, output, record)
    rows.text_column = settings.get("text_column") if kind == "caption" else None
    return Searcher(
        kind, settings, index, ids, record, rows, removed, representatives(storage, output), embedder,
        manifest.decode_side if manifest else None,
    )


class Searcher:
    """One job's index of one kind and the model that embeds its queries, loaded once and searched many times."""

    def __init__(
        self, kind: str, settings: dict[str, Any], index, ids: IdMap, record: IndexRecord, rows: _PartRows,
        removed: RemovedRows | None, representative: dict[str, str], embedder, decode_side: int | None,
    ):
        from loupe.jobs.dedup import group_sizes

        self.kind, self.settings, self.index, self.ids, self.record = kind, settings, index, ids, record
        self.rows, self.removed, self.embedder, self.decode_side = rows, removed, embedder, decode_side
        self.representative = representative  # near-duplicate -> its group's representative
        self.group_size = group_sizes(representative)
        # Widening an IVF search changes the index's nprobe (and the part rows cache fills):
        # one search at a time per searcher.
        self._lock = threading.Lock()

    def search(
        self,
        text: str | None = None,
        image_bytes: bytes | None = None,
        *,
        image_name: str | None = None,
        k: int = 10,
        exclude_flagged: bool = False,
        flagged: str | None = None,
        all_duplicates: bool = False,
    ) -> list[Hit]:
        """The k nearest rows to a text or an image's bytes, filtered as `search` filters them."""
        _check_query(text, image_bytes is not None, self.kind, k, exclude_flagged, flagged, "--image PATH_OR_URI", "--kind image")
        if exclude_flagged or flagged is not None:
            _check_moderation(self.settings, flagged)
        if image_bytes is not None:
            query = self.image_vector(image_bytes, image_name or "the query image")
        else:
            query = self.text_vector(text or "")
        collapse = {} if all_duplicates else self.representative
        sizes = {} if all_duplicates else self.group_size

        def keep(row: dict[str, Any]) -> bool:
            if collapse.get(row["image_id"], row["image_id"]) != row["image_id"]:
                return False  # a copy: its representative stands for it
            if exclude_flagged:
                return not row.get("flagged")
            if flagged is not None:
                return flagged in (row.get("flagged_categories") or ())
            return True

        def hits_of(found: list[tuple[float, int]]) -> list[Hit]:
            hits = _hits(found, self.ids, self.rows, keep, k, self.removed)
            for hit in hits:
                hit.duplicates = sizes.get(hit.image_id, 1) - 1
            return hits

        return self.ranked(query, k, hits_of, deepen=bool(exclude_flagged or flagged or collapse or self.removed))

    def text_vector(self, text: str) -> np.ndarray:
        if not text.strip():
            raise UserError("the text query is empty")
        return self.embedder.embed_texts([text])

    def image_vector(self, data: bytes, name: str) -> np.ndarray:
        """The query vector of an image's bytes, decoded as the job decoded its images."""
        from loupe.workers.decode import DecodeError, decode_sized

        try:
            # Decoded as the job decoded its images, so a catalog image finds itself first.
            picture, _ = decode_sized(data, min_side=self.decode_side)
        except DecodeError as exc:
            raise UserError(f"cannot read image {name}: {exc}") from None
        return self.embedder.embed_images([picture])

    def ranked(
        self, query: np.ndarray, k: int, hits_of: Callable[[list[tuple[float, int]]], list[Hit]], *, deepen: bool
    ) -> list[Hit]:
        """The first k hits `hits_of` makes of the nearest (score, faiss id) pairs, searching deeper until k pass.

        `deepen`: whether hits_of may drop pairs, so the search starts at FIRST_DEPTH times k.
        """
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        ntotal = self.index.ntotal
        depth = min(k * FIRST_DEPTH, max(ntotal, k)) if deepen else k
        with self._lock:
            params = dict(self.record.params)
            try:
                while True:
                    scores, labels = self.index.search(query, depth)
                    found = [(float(s), int(i)) for s, i in zip(scores[0], labels[0], strict=True) if i >= 0]
                    hits = hits_of(found)
                    if len(hits) >= k:
                        return hits
                    if len(found) < depth:
                        # An IVF index's probed lists ran dry before `depth` results: probe more lists.
                        if not _widen(self.index, params):
                            return hits
                    elif depth >= min(ntotal, MAX_DEPTH):
                        return hits
                    else:
                        depth = min(depth * GROWTH, ntotal, MAX_DEPTH)
            finally:
                if params != self.record.params:  # the next search starts from the tuned probe again
                    apply_params(self.index, self.record.params)


def _check_query(
    text: str | None, has_image: bool, kind: str, k: int, exclude_flagged: bool, flagged: str | None,
    image_flag: str, kind_flag: str,
) -> None:
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if (text is None) == (not has_image):
        raise UserError(f"give exactly one query: a text or {image_flag}")
    if text is not None and not text.strip():
        raise UserError("the text query is empty")
    if has_image and kind != "image":
        raise UserError(f"an image query searches the image index; use {kind_flag}")
    if exclude_flagged and flagged is not None:
        raise UserError("--exclude-flagged and --flagged CATEGORY ask for opposite rows; give one of them")


def _check_moderation(settings: dict[str, Any], category: str | None) -> None:
    tasks = settings.get("tasks")
    taxonomy = settings.get("taxonomy")
    if (tasks is not None and "moderate" not in tasks) or (tasks is None and not taxonomy):
        raise UserError("this job has no moderation labels to filter on (it did not run the moderate task)")
    if category is not None:
        keys = [c["key"] for c in taxonomy or ()]
        if not keys:
            from loupe.schemas.taxonomy import DEFAULT_TAXONOMY

            keys = list(DEFAULT_TAXONOMY.keys)
        if category not in keys:
            raise UserError(f"unknown category {category!r}; this job's categories are: {', '.join(keys)}")


def _read_query_image(image: str, endpoint_url: str | None) -> bytes:
    try:
        return open_storage(image, endpoint_url).read_bytes(image)
    except FileNotFoundError:
        raise UserError(f"cannot read image {image}: no such file or object") from None
    except IsADirectoryError:
        raise UserError(f"cannot read image {image}: it is a folder") from None
    except PermissionError:
        raise UserError(f"cannot read image {image}: permission denied") from None


def _embedder(kind: str, model: str):
    # transformers (and torch) are imported only here, once the query is known to be good: a
    # mistake answers in a second, not after the seconds their import takes.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a query loads one small model: no "Loading weights" bar
    if kind == "image":
        from loupe.workers.models.embedder import ImageEmbedder

        return ImageEmbedder(model, device="cpu")
    from loupe.workers.models.embedder import TextEmbedder

    return TextEmbedder(model, device="cpu")


def _widen(index, params: dict[str, int]) -> bool:
    """Double nprobe in `params` and on the index (its candidate lists ran dry); False at the limit."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.nprobe >= ivf.nlist:
        return False
    params["nprobe"] = min(ivf.nlist, 2 * ivf.nprobe)
    if "quantizer_efSearch" in params:
        params["quantizer_efSearch"] = max(2 * params["nprobe"], params["quantizer_efSearch"])
    apply_params(index, params)
    return True


def _hits(
    found: list[tuple[float, int]], ids: IdMap, rows: _PartRows, keep, k: int, removed: RemovedRows | None = None
) -> list[Hit]:
    located = ids.lookup([faiss_id for _, faiss_id in found])
    details = rows.get([(part, row) for _, part, row in located])
    hits: list[Hit] = []
    for (score, _), (image_id, part, row) in zip(found, located, strict=True):
        detail = details[part, row]
        if detail["image_id"] != image_id:
            raise DamagedOutput(
                f"the index no longer matches {rows.uri(part)} (a part was rewritten); "
                f"rebuild it with loupe index {rows.output}"
            )
        if not keep(detail) or (removed and removed.hides(rows.parts[part]["path"], image_id)):
            continue
        hits.append(
            Hit(
                rank=len(hits) + 1,
                score=score,
                image_id=image_id,
                source_uri=detail.get("source_uri") or "",
                caption=detail.get("caption"),
                flagged_categories=list(detail.get("flagged_categories") or []),
                text=dict(detail.get("source_metadata") or ()).get(rows.text_column) if rows.text_column else None,
            )
        )
        if len(hits) == k:
            break
    return hits


class _PartRows:
    """Rows of the parts by (part, row), reading only the row groups that hold them, once."""

    def __init__(self, storage: Storage, output: str, record: IndexRecord):
        self.storage, self.output, self.parts = storage, output, record.parts
        self.text_column: str | None = None  # the caption index embedded this source text instead
        self._files: dict[int, tuple[pq.ParquetFile, np.ndarray, list[str]]] = {}
        self._groups: dict[tuple[int, int], list[dict[str, Any]]] = {}

    def get(self, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
        by_group: dict[tuple[int, int], list[int]] = defaultdict(list)
        for part, row in wanted:
            parquet, starts, _ = self._open(part)
            group = int(np.searchsorted(starts, row, side="right") - 1)
            by_group[part, group].append(row)
        out = {}
        for (part, group), part_rows in by_group.items():
            if (part, group) not in self._groups:
                parquet, starts, columns = self._open(part)
                self._groups[part, group] = parquet.read_row_group(group, columns=columns).to_pylist()
            start = int(self._open(part)[1][group])
            for row in part_rows:
                out[part, row] = self._groups[part, group][row - start]
        return out

    def uri(self, part: int) -> str:
        return join_uri(self.output, self.parts[part]["path"])

    def _open(self, part: int) -> tuple[pq.ParquetFile, np.ndarray, list[str]]:
        if part not in self._files:
            uri = self.uri(part)
            try:
                parquet = pq.ParquetFile(self.storage.open_seekable(uri))
            except FileNotFoundError:
                raise DamagedOutput(
                    f"{uri}, indexed, is missing; rebuild the index with loupe index {self.output}"
                ) from None
            except pa.ArrowInvalid as exc:
                raise DamagedOutput(f"{uri} is not a readable Parquet part ({str(exc).splitlines()[0]})") from None
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            columns = [c for c in _DETAIL_COLUMNS if c in parquet.schema_arrow.names]
            self._files[part] = (parquet, starts, columns)
        return self._files[part]
