"""A finished job's rows, comparable between runs, for the tests that hold a faulty run to a clean one."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow.parquet as pq
from loupe.jobs.output import read_manifest
from loupe.workers.storage import join_uri, open_storage


def rows_of(output: Path | str, endpoint: str | None = None) -> list[tuple]:
    """What a job found, comparable between runs: id, status, code, caption, shard, then the scores.

    Also checks the manifest: complete, one part per shard, each part's rows and sha256 as listed.
    """
    storage = open_storage(str(output), endpoint)
    manifest = read_manifest(storage, str(output))
    assert manifest.complete and len(manifest.parts) == manifest.shards_total
    assert [p["shard_id"] for p in manifest.parts] == list(range(manifest.shards_total))
    rows = []
    for part in manifest.parts:
        data = storage.read_bytes(join_uri(str(output), part["path"]))
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows == part["rows"]
        rows += table.to_pylist()
    return sorted((r["image_id"], r["status"], r["error_code"], r["caption"], r["shard_id"], r["moderation"]) for r in rows)


# Moderation scores of one image move by up to this much with the batch it is scored in (tiny
# random-weight model; see docs/reliability.md): a fault that changes batches may move them.
SCORE_TOLERANCE = 0.02


def assert_same(rows: list[tuple], clean: list[tuple], exact_scores: bool = True) -> None:
    """Equal rows; scores exactly, or within SCORE_TOLERANCE where the fault changed the batches."""
    assert [r[:5] for r in rows] == [r[:5] for r in clean]
    for row, want in zip(rows, clean, strict=True):
        if row[5] is None or want[5] is None or exact_scores:
            assert row[5] == want[5], row[0]
        else:
            assert max(abs(row[5][k] - want[5][k]) for k in want[5]) <= SCORE_TOLERANCE, (row[0], row[5], want[5])
