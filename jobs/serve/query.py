"""Search over a loaded catalog: loupe search's Searcher, plus the filters and row lookups only serve has."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from loupe.jobs.indexing import KINDS
from loupe.jobs.search import Hit, open_searcher
from loupe.jobs.serve.catalog import Catalog
from loupe.schemas.errors import DamagedOutput, UserError


@dataclass(frozen=True)
class Filters:
    """Which rows a search keeps: loupe search's two flags, and a minimum score per category."""

    exclude_flagged: bool = False
    flagged: str | None = None
    min_scores: dict[str, float] = field(default_factory=dict)
    all_duplicates: bool = False  # every near-duplicate, not only each group's representative
    skip_row: int | None = None  # the query image itself, when searching for its neighbours

    def deepens(self, catalog: Catalog) -> bool:
        """Whether rows may be dropped, so the search must start deeper than k (as loupe search does)."""
        collapse = bool(catalog.representative) and not self.all_duplicates
        chosen = self.exclude_flagged or self.flagged or self.min_scores or self.skip_row is not None
        return bool(chosen or collapse or catalog.removed)

    def check(self, catalog: Catalog) -> None:
        """Refuse filters the job cannot answer, in loupe search's words."""
        if self.exclude_flagged and self.flagged is not None:
            raise UserError("exclude_flagged and flagged ask for opposite rows; give one of them")
        wanted = ([self.flagged] if self.flagged is not None else []) + list(self.min_scores)
        if (self.exclude_flagged or wanted) and not catalog.categories:
            raise UserError("this job has no moderation labels to filter on (it did not run the moderate task)")
        known = {c.key for c in catalog.categories}
        for category in wanted:
            if category not in known:
                raise UserError(f"unknown category {category!r}; this job's categories are: {catalog.category_list()}")
        for category, minimum in self.min_scores.items():
            if not 0.0 <= minimum <= 1.0:
                raise UserError(f"the minimum score for {category} must be between 0 and 1, got {minimum}")


class Searcher:
    """One kind of index with the model that embeds its queries (loupe search's Searcher), over the held catalog."""

    def __init__(self, catalog: Catalog, kind: str):
        self.catalog, self.kind = catalog, kind
        # Serve shows a running job's catalog as far as it goes, so a partial job is not refused.
        self.ranking = open_searcher(catalog.output, kind, catalog.endpoint_url, partial=True)
        self.index, self.record = self.ranking.index, self.ranking.record
        self.rows = _catalog_rows(catalog, self.ranking.ids.table, self.record.parts, kind)
        self.text_column = catalog.settings.get("text_column") if kind == "caption" else None

    def text_vector(self, text: str) -> np.ndarray:
        return self.ranking.text_vector(text)

    def image_vector(self, data: bytes, name: str) -> np.ndarray:
        """The query vector of uploaded bytes, decoded by the same safe decoder as the job's images."""
        if self.kind != "image":
            raise UserError("an image query searches the image index; use kind=image")
        return self.ranking.image_vector(data, name)

    def stored_vector(self, row: int) -> np.ndarray:
        """The vector the job stored for a catalog row (for its nearest neighbours)."""
        vector = self.catalog.full_row(row, columns=[self.record.column])[self.record.column]
        if vector is None:
            raise UserError(f"image {self.catalog.rows.column('image_id')[row]} has no {self.kind} vector")
        return np.asarray([vector], dtype=np.float32)

    def search(self, query: np.ndarray, k: int, filters: Filters = Filters()) -> list[Hit]:
        """The k nearest catalog rows that pass `filters`, ranked by loupe search's Searcher."""
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        filters.check(self.catalog)
        keep = _keeper(self.catalog, filters)
        return self.ranking.ranked(
            query, k, lambda found: self._hits(found, keep, k, filters.all_duplicates), deepen=filters.deepens(self.catalog)
        )

    def _hits(self, found: list[tuple[float, int]], keep: Callable[[int], bool], k: int, every_copy: bool) -> list[Hit]:
        sizes = {} if every_copy else self.catalog.group_size
        hits: list[Hit] = []
        for score, faiss_id in found:
            row = int(self.rows[faiss_id])
            if not keep(row):
                continue
            held = self.catalog.held(row)
            hits.append(
                Hit(
                    rank=len(hits) + 1,
                    score=score,
                    image_id=held["image_id"],
                    source_uri=held["source_uri"] or "",
                    caption=held["caption"],
                    flagged_categories=list(held["flagged_categories"] or []),
                    duplicates=sizes.get(held["image_id"], 1) - 1,
                    text=held["text"] if self.text_column else None,
                )
            )
            if len(hits) == k:
                break
        return hits

def load_searchers(catalog: Catalog) -> dict[str, Searcher]:
    """A searcher for each index the manifest lists; a damaged one is refused (as loupe search refuses it)."""
    listed = (catalog.manifest.index or {}) if catalog.manifest else {}
    return {kind: Searcher(catalog, kind) for kind in KINDS if kind in listed}


def _catalog_rows(catalog: Catalog, ids, index_parts: list[dict], kind: str) -> np.ndarray:
    """The catalog row of every faiss id, checked against the image ids the index recorded."""
    by_path = {part.path: part for part in catalog.parts}
    starts = []
    for part in index_parts:
        entry = by_path.get(part["path"])
        if entry is None or (part.get("sha256") and entry.sha256 and part["sha256"] != entry.sha256):
            raise DamagedOutput(
                f"the {kind} index covers {part['path']}, which the manifest does not list as it was indexed; "
                f"rebuild it with loupe index {catalog.output}"
            )
        starts.append(entry.start)
    if not len(ids):
        return np.zeros(0, dtype=np.int64)
    parts = ids.column("part").to_numpy(zero_copy_only=False)
    rows = np.asarray(starts, dtype=np.int64)[parts] + ids.column("row").to_numpy(zero_copy_only=False)
    if rows.max() >= catalog.rows.num_rows or not pc.all(
        pc.equal(catalog.rows.column("image_id").take(rows), ids.column("image_id"))
    ).as_py():
        raise DamagedOutput(
            f"the {kind} index no longer matches the parts (a part was rewritten); "
            f"rebuild it with loupe index {catalog.output}"
        )
    return rows


def _keeper(catalog: Catalog, filters: Filters) -> Callable[[int], bool]:
    checks: list[Callable[[int], bool]] = [lambda row: not catalog.hidden[row]]
    if catalog.representative and not filters.all_duplicates:
        ids = catalog.rows.column("image_id")

        def representative(row: int) -> bool:  # a copy is shown by its group's representative
            image_id = ids[row].as_py()
            return catalog.representative.get(image_id, image_id) == image_id

        checks.append(representative)
    if filters.exclude_flagged:
        checks.append(lambda row: not catalog.is_flagged(row))
    if filters.flagged is not None:
        column = catalog.rows.column("flagged_categories")
        checks.append(lambda row: filters.flagged in (column[row].as_py() or ()))
    for category, minimum in filters.min_scores.items():
        scores = catalog.scores(category)
        checks.append(lambda row, scores=scores, minimum=minimum: bool(scores[row] >= minimum))
    if filters.skip_row is not None:
        checks.append(lambda row: row != filters.skip_row)
    return lambda row: all(check(row) for check in checks)
