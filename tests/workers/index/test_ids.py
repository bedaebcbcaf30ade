"""The id map: ids.parquet written in whole row groups, faiss ids looked up across them, strays refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loupe.schemas.errors import DamagedOutput
from loupe.workers.index import ids
from loupe.workers.index.ids import IDS_SCHEMA, IdMap, IdWriter


def row_groups(path) -> list[int]:
    metadata = pq.ParquetFile(path).metadata
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def test_ids_are_written_in_whole_row_groups_and_looked_up_across_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ids, "IDS_ROW_GROUP", 100)
    path = tmp_path / "ids.parquet"
    with IdWriter(str(path)) as writer:
        for part in range(3):
            rows = np.arange(0, 170, 2)  # 85 vectors a part: every other row had none
            writer.add(pa.array([f"{part}-{row}" for row in rows]), part, rows)
    assert row_groups(path) == [100, 100, 55]
    assert pq.read_schema(path).equals(IDS_SCHEMA)

    id_map = IdMap(path.read_bytes())
    assert len(id_map) == 255
    assert id_map.lookup([0, 99, 100, 254]) == [
        ("0-0", 0, 0),
        ("1-28", 1, 28),
        ("1-30", 1, 30),
        ("2-168", 2, 168),
    ]
    with pytest.raises(DamagedOutput, match="id 255, outside ids.parquet") as raised:
        id_map.lookup([255])
    assert "\n" not in str(raised.value)

    # Extending: the old map as it was, the new ids after it in row groups of their own.
    merged = tmp_path / "merged.parquet"
    with IdWriter(str(merged)) as writer:
        writer.add_table(id_map.table)
        writer.add_table(id_map.table.slice(0, 30))
    assert row_groups(merged) == [100, 100, 55, 30]
    assert IdMap(merged.read_bytes()).lookup([254, 255, 284]) == [
        ("2-168", 2, 168),
        ("0-0", 0, 0),
        ("0-58", 0, 58),
    ]

