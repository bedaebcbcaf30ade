"""The Arrow schema of output rows, declared once; writers and tests import it."""

from __future__ import annotations

from enum import Enum

import pyarrow as pa


class RowStatus(str, Enum):
    """Whether an image produced a caption or an error row."""

    OK = "ok"
    ERROR = "error"


OUTPUT_SCHEMA = pa.schema(
    [
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
    ],
    metadata={"loupe.schema_version": "1"},
)
