"""A shard's output rows: an ok row from what the models said of an image, an error row from why it failed."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from loupe.schemas.codes import ErrorCode
from loupe.schemas.config import JobConfig
from loupe.schemas.plan import Shard
from loupe.schemas.rows import RowStatus, text_embedding_column
from loupe.workers.hashing import PdqHash
from loupe.workers.reader import Sample


@dataclass
class Item:
    """One image on its way through a shard; `seq` keeps rows in source order."""

    seq: int
    sample: Sample
    image: Image.Image | None = None
    size: tuple[int, int] | None = None  # the full image's (width, height), whatever scale it was decoded at
    error: tuple[ErrorCode, str] | None = None
    pdq: PdqHash | None = None  # the hash task's, computed on the decode pool
    matched_labels: list[str] | None = None  # None: no list matched (see KnownContent.match)


@dataclass
class Result:
    """What the models said of one image."""

    item: Item
    caption: str | None = None
    scores: dict[str, float] | None = None
    image_embedding: Any = None  # np.ndarray (dim,) float32, L2-normalized
    text_embedding: Any = None  # of the caption, or of the source text --text-column names


@dataclass(frozen=True)
class ShardRows:
    """A shard's rows in source order, and the counts its stats record gives."""

    rows: list[dict[str, Any]]
    rows_ok: int
    rows_error: int
    error_codes: dict[str, int]
    rows_flagged: int
    flagged: dict[str, int]  # per category key, only those with flagged images
    rows_known_content: int = 0


class RowBuilder:
    """Builds the output rows of a job's shards; plain dicts keyed by the output schema's fields."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.text_vectors = text_embedding_column(config.text_column)
        self._taxonomy_sha256 = config.taxonomy.content_hash()

    def shard_rows(self, shard: Shard, results: list[Result], errors: list[Item]) -> ShardRows:
        """One row per image of the shard, ok or error, in source order."""
        ok_rows = [(result.item.seq, self._ok_row(shard, result)) for result in results]
        error_rows = [(item.seq, self._error_row(shard, item)) for item in errors]
        codes = Counter(item.error[0].value for item in errors if item.error)
        flagged = Counter(key for _, row in ok_rows for key in row.get("flagged_categories") or ())
        return ShardRows(
            rows=[row for _, row in sorted(ok_rows + error_rows, key=lambda pair: pair[0])],
            rows_ok=len(ok_rows),
            rows_error=len(error_rows),
            error_codes=dict(sorted(codes.items())),
            rows_flagged=sum(bool(row.get("flagged")) for _, row in ok_rows),
            flagged={key: flagged[key] for key in self.config.taxonomy.keys if flagged[key]},
            rows_known_content=sum(bool(row.get("known_content")) for _, row in ok_rows),
        )

    def _base_row(self, shard: Shard, item: Item) -> dict[str, Any]:
        data = item.sample.data
        return {
            "image_id": item.sample.image_id,
            "source_uri": item.sample.source_uri,
            "shard_id": shard.shard_id,
            "size_bytes": len(data) if data is not None else None,
            "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
            "model": self.config.model,
            "prompt": self.config.prompt,
            "source_metadata": list(item.sample.metadata.items()) or None,
        }

    def _ok_row(self, shard: Shard, result: Result) -> dict[str, Any]:
        item = result.item
        assert item.size is not None
        row = self._base_row(shard, item) | {
            "status": RowStatus.OK.value,
            "width": item.size[0],
            "height": item.size[1],
            "caption": result.caption,
            "image_embedding": result.image_embedding,
            self.text_vectors: result.text_embedding,
        }
        if item.pdq is not None:
            row |= {"pdq": item.pdq.hash, "pdq_quality": item.pdq.quality}
        if item.matched_labels is not None:
            row |= {"matched_labels": item.matched_labels, "known_content": bool(item.matched_labels)}
        if result.scores is not None:
            over = [c.key for c in self.config.taxonomy.categories if result.scores[c.key] >= c.threshold]
            row |= {
                "moderation": result.scores,
                "flagged": bool(over),
                "flagged_categories": over,
                "moderation_model": self.config.judge,
                "taxonomy_sha256": self._taxonomy_sha256,
            }
        return row

    def _error_row(self, shard: Shard, item: Item) -> dict[str, Any]:
        assert item.error is not None
        code, message = item.error
        return self._base_row(shard, item) | {
            "status": RowStatus.ERROR.value,
            "error_code": code.value,
            "error_message": message,
        }
