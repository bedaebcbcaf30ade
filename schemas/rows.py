"""The Arrow schema of output rows, declared once; writers and tests import it."""

from __future__ import annotations

from enum import Enum
from functools import lru_cache

import pyarrow as pa

from loupe.schemas.taxonomy import DEFAULT_TAXONOMY, Taxonomy


class RowStatus(str, Enum):
    """Whether an image produced its outputs or became an error row."""

    OK = "ok"
    ERROR = "error"


_BASE_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("shard_id", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("size_bytes", pa.int64()),
    pa.field("sha256", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("source_metadata", pa.map_(pa.string(), pa.string())),
]


# The hash task's columns: null on error rows and without the task; matched_labels and
# known_content are null unless the job matched a list (--match-list).
_HASH_FIELDS = [
    pa.field("pdq", pa.string()),  # the 256-bit PDQ hash, 64 lowercase hex characters
    pa.field("pdq_quality", pa.int16()),  # 0-100; below 50 the hash is kept but never matched
    pa.field("matched_labels", pa.list_(pa.string())),  # the distinct labels of the list entries matched
    pa.field("known_content", pa.bool_()),  # kept apart from the model's flagged_categories
]


def moderation_type(taxonomy: Taxonomy) -> pa.StructType:
    """One float per category, so SQL reads `moderation.violence_gore`."""
    return pa.struct([pa.field(key, pa.float32()) for key in taxonomy.keys])


def embedding_type(dim: int | None) -> pa.DataType:
    """L2-normalized float32 vectors; fixed-size once the model's dimension is known."""
    return pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())


def text_embedding_column(text_column: str | None) -> str:
    """The column holding a job's text vectors: named for what was embedded, the caption or the
    source text that --text-column names."""
    return "text_embedding" if text_column else "caption_embedding"


@lru_cache(maxsize=8)
def output_schema(
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    image_dim: int | None = None,
    text_dim: int | None = None,
    text_column: str | None = None,
) -> pa.Schema:
    """The row schema of a job; the moderation struct's fields are the taxonomy's keys.

    Moderation and embedding columns are null on error rows and when the job does not run
    that task (an embedding column of a job without the embed task has no fixed size).
    """
    return pa.schema(
        [
            *_BASE_FIELDS,
            pa.field("moderation", moderation_type(taxonomy)),
            pa.field("flagged", pa.bool_()),
            pa.field("flagged_categories", pa.list_(pa.string())),
            pa.field("moderation_model", pa.string()),
            pa.field("taxonomy_sha256", pa.string()),
            pa.field("image_embedding", embedding_type(image_dim)),
            pa.field(text_embedding_column(text_column), embedding_type(text_dim)),
            *_HASH_FIELDS,
        ],
        metadata={"loupe.schema_version": "3"},
    )


OUTPUT_SCHEMA = output_schema()
