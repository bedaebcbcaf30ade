"""`loupe run --retry-errors` on a worker: retried rows replace their ids' rows in the shard's existing part."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.parquet as pq
from loupe.schemas.layout import part_path
from loupe.schemas.rows import RowStatus
from loupe.schemas.taxonomy import Taxonomy
from loupe.workers.rows import ShardRows
from loupe.workers.storage import Storage, join_uri


def merge_retried(storage: Storage, output: str, shard_id: int, retried: ShardRows, taxonomy: Taxonomy) -> ShardRows:
    """The shard's existing rows, with each retried row in place of the row of the same image id, and their counts."""
    with storage.open_seekable(join_uri(output, part_path(shard_id))) as handle:
        rows = pq.read_table(handle).to_pylist()
    fresh = {row["image_id"]: row for row in retried.rows}
    # Rows read back (a map column as a list of pairs) are what the writer takes again.
    merged = [fresh.pop(row["image_id"], row) for row in rows]
    if fresh:  # an id that was not in the part: the shard's source changed since, refuse to guess
        raise RuntimeError(f"shard {shard_id}: {len(fresh)} retried images are not in its part")
    return count_rows(merged, taxonomy)


def count_rows(rows: list[dict[str, Any]], taxonomy: Taxonomy) -> ShardRows:
    """A shard's rows with the counts its stats record gives."""
    ok = [row for row in rows if row["status"] == RowStatus.OK.value]
    codes = Counter(row["error_code"] for row in rows if row["status"] != RowStatus.OK.value)
    flagged = Counter(key for row in ok for key in row.get("flagged_categories") or ())
    return ShardRows(
        rows=rows,
        rows_ok=len(ok),
        rows_error=len(rows) - len(ok),
        error_codes=dict(sorted(codes.items())),
        rows_flagged=sum(bool(row.get("flagged")) for row in ok),
        flagged={key: flagged[key] for key in taxonomy.keys if flagged[key]},
        rows_known_content=sum(bool(row.get("known_content")) for row in ok),
    )

