"""Search a job's catalog by text or by image, filtered on the stored moderation labels."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loupe.jobs.indexing import KINDS, MODEL_SETTINGS, load_index
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
_DETAIL_COLUMNS = ("image_id", "source_uri", "caption", "flagged", "flagged_categories")


@dataclass
class Hit:
    """One search result: where it ranks, how close it is, and the row it points to."""

    rank: int
    score: float
    image_id: str
    source_uri: str
    caption: str | None
    flagged_categories: list[str] = field(default_factory=list)

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
) -> list[Hit]:
    """The k nearest rows of OUTPUT to a text or an image (a local path or s3:// URI).

    Text queries on the image index go through the CLIP text tower of the job's image model,
    on the caption index through its sentence model; image queries through the CLIP image
    tower. `exclude_flagged` drops flagged rows, `flagged` keeps only rows flagged for that
    category; either way the search goes deeper until k rows pass or the index is exhausted.
    """
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if (text is None) == (image is None):
        raise UserError("give exactly one query: a text or --image PATH_OR_URI")
    if text is not None and not text.strip():
        raise UserError("the text query is empty")
    if image is not None and kind != "image":
        raise UserError("an image query searches the image index; use --kind image")
    if exclude_flagged and flagged is not None:
        raise UserError("--exclude-flagged and --flagged CATEGORY ask for opposite rows; give one of them")

    storage = open_storage(output, endpoint_url)
    job = find_job(storage, output)
    settings = job.settings if job else {}
    if exclude_flagged or flagged is not None:
        _check_moderation(settings, flagged)
    query_bytes = _read_query_image(image, endpoint_url) if image is not None else None

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
    manifest = find_manifest(storage, output)
    decode_side = manifest.decode_side if manifest else None
    query = _embed_query(kind, model, text, query_bytes, image, decode_side)
    if query.shape[1] != record.dim:
        raise UserError(
            f"model {model!r} makes {query.shape[1]}-dimensional vectors but the {kind} index holds "
            f"{record.dim}-dimensional ones; rebuild the index with loupe index {output}"
        )

    def keep(row: dict[str, Any]) -> bool:
        if exclude_flagged:
            return not row.get("flagged")
        if flagged is not None:
            return flagged in (row.get("flagged_categories") or ())
        return True

    rows = _PartRows(storage, output, record)
    depth = k if not (exclude_flagged or flagged) else min(k * FIRST_DEPTH, max(index.ntotal, k))
    while True:
        scores, labels = index.search(query, depth)
        found = [(float(s), int(i)) for s, i in zip(scores[0], labels[0]) if i >= 0]
        hits = _hits(found, ids, rows, keep, k)
        if len(hits) >= k:
            return hits
        if len(found) < depth:
            # An IVF index's probed lists ran dry before `depth` results: probe more lists.
            if not _widen(index, record):
                return hits
        elif depth >= min(index.ntotal, MAX_DEPTH):
            return hits
        else:
            depth = min(depth * GROWTH, index.ntotal, MAX_DEPTH)


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


def _embed_query(
    kind: str, model: str, text: str | None, data: bytes | None, name: str | None, decode_side: int | None
) -> np.ndarray:
    if data is not None:
        from loupe.workers.decode import DecodeError, decode_sized
        from loupe.workers.models.embedder import ImageEmbedder

        try:
            # Decoded as the job decoded its images, so a catalog image finds itself first.
            picture, _ = decode_sized(data, min_side=decode_side)
        except DecodeError as exc:
            raise UserError(f"cannot read image {name}: {exc}") from None
        return ImageEmbedder(model, device="cpu").embed_images([picture])
    if kind == "image":
        from loupe.workers.models.embedder import ImageEmbedder

        return ImageEmbedder(model, device="cpu").embed_texts([text])
    from loupe.workers.models.embedder import TextEmbedder

    return TextEmbedder(model, device="cpu").embed_texts([text])


def _widen(index, record: IndexRecord) -> bool:
    """Double nprobe (an IVF index's candidate lists run dry before k' results); False at the limit."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.nprobe >= ivf.nlist:
        return False
    params = dict(record.params)
    params["nprobe"] = min(ivf.nlist, 2 * ivf.nprobe)
    if "quantizer_efSearch" in params:
        params["quantizer_efSearch"] = max(2 * params["nprobe"], params["quantizer_efSearch"])
    apply_params(index, params)
    record.params = params
    return True


def _hits(found: list[tuple[float, int]], ids: IdMap, rows: _PartRows, keep, k: int) -> list[Hit]:
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
        if not keep(detail):
            continue
        hits.append(
            Hit(
                rank=len(hits) + 1,
                score=score,
                image_id=image_id,
                source_uri=detail.get("source_uri") or "",
                caption=detail.get("caption"),
                flagged_categories=list(detail.get("flagged_categories") or []),
            )
        )
        if len(hits) == k:
            break
    return hits


class _PartRows:
    """Rows of the parts by (part, row), reading only the row groups that hold them, once."""

    def __init__(self, storage: Storage, output: str, record: IndexRecord):
        self.storage, self.output, self.parts = storage, output, record.parts
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
