"""ids.parquet: the part and row of each faiss id, written in small row groups and read one at a time."""

from __future__ import annotations

import io
from collections.abc import Iterable
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loupe.schemas.errors import DamagedOutput

IDS_ROW_GROUP = 65_536  # search reads one row group of ids.parquet per hit, so keep them small

IDS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),  # position in IndexRecord.parts
        pa.field("row", pa.int64(), nullable=False),  # row number inside that part's file
    ]
)


class IdWriter:
    """A local ids.parquet written in faiss id order, in row groups of IDS_ROW_GROUP rows."""

    def __init__(self, path: str):
        self._writer = pq.ParquetWriter(path, IDS_SCHEMA, compression="zstd")
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, image_ids: pa.Array, part: int, rows: np.ndarray) -> None:
        """The next ids: `rows` of part number `part`, whose image ids are `image_ids`."""
        batch = pa.record_batch(
            [image_ids, pa.array(np.full(len(rows), part, np.int32)), pa.array(rows)], schema=IDS_SCHEMA
        )
        self._pending.append(batch)
        self._pending_rows += len(rows)
        if self._pending_rows >= IDS_ROW_GROUP:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        """The next ids from another id map, in row groups from its first row (the last may be short)."""
        self._flush(final=True)
        for start in range(0, table.num_rows, IDS_ROW_GROUP):
            self._writer.write_table(
                table.slice(start, IDS_ROW_GROUP).cast(IDS_SCHEMA), row_group_size=IDS_ROW_GROUP
            )

    def _flush(self, final: bool = False) -> None:
        """Write the whole row groups pending (all of it when final); keep the rest pending."""
        table = pa.Table.from_batches(self._pending, schema=IDS_SCHEMA)
        cut = table.num_rows if final else (table.num_rows // IDS_ROW_GROUP) * IDS_ROW_GROUP
        for start in range(0, cut, IDS_ROW_GROUP):
            self._writer.write_table(
                table.slice(start, min(IDS_ROW_GROUP, cut - start)), row_group_size=IDS_ROW_GROUP
            )
        rest = table.slice(cut)
        self._pending = rest.to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def __enter__(self) -> IdWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if kind is None:
                self._flush(final=True)
        finally:
            self._writer.close()


class IdMap:
    """ids.parquet held in memory: faiss ids to (image_id, part, row), one small row group at a time."""

    def __init__(self, data: bytes):
        self._file = pq.ParquetFile(io.BytesIO(data))
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._groups: dict[int, pa.Table] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def table(self) -> pa.Table:
        return self._file.read()

    def lookup(self, ids: Iterable[int]) -> list[tuple[str, int, int]]:
        """(image_id, part, row) of each faiss id, in the order given."""
        out = []
        for faiss_id in ids:
            if not 0 <= faiss_id < len(self):
                raise DamagedOutput(
                    f"the index returned id {faiss_id}, outside ids.parquet; rebuild it with loupe index"
                )
            group = int(np.searchsorted(self._starts, faiss_id, side="right") - 1)
            if group not in self._groups:
                self._groups[group] = self._file.read_row_group(group)
            table = self._groups[group]
            row = int(faiss_id - self._starts[group])
            out.append(
                (table["image_id"][row].as_py(), table["part"][row].as_py(), table["row"][row].as_py())
            )
        return out
