"""Filling a trained index with every vector, holding its codes once: the inverted lists at their final size.

faiss's `IndexIVF.add` appends to each inverted list, a `std::vector` that doubles as it grows,
so a freshly filled index holds up to twice its codes (1.3x on average over many lists) until
it is written and read back, and the heap it leaves is fragmented. Here the codes are encoded
as `add` would (`sa_encode`: the list number, then the code), spilled to an unnamed temporary
file while the counts per list are kept, then copied into lists reserved at their exact size:
the build holds the index once, plus a slice of vectors and of codes. The codes, and so the
index, are the ones `add` makes, in the same order.
"""

from __future__ import annotations

import errno
import tempfile
from typing import IO, Any

import numpy as np

from loupe.schemas.errors import UserError
from loupe.workers.index.library import faiss

COPY_ROWS = 16_384  # codes read back from the spill file a slice at a time


class ExactFill:
    """`add(vectors)` for each slice in row order, then `finish()`; the index is full after it.

    Faiss ids are row numbers in the order added, as `index.add` gives them. An index that is
    not an empty IVF with in-memory lists (flat, HNSW, one already holding vectors) is added to
    directly. `spill_dir` is where the codes wait (the system's temporary directory by default,
    TMPDIR); the file has no name, so nothing is left behind if the process dies.
    """

    def __init__(self, index: faiss.Index, spill_dir: str | None = None):
        self.index = index
        self.spill_dir = spill_dir or tempfile.gettempdir()
        ivf = faiss.try_extract_index_ivf(index)
        lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
        self.ivf = ivf if isinstance(lists, faiss.ArrayInvertedLists) and ivf.ntotal == 0 else None
        self.spill: IO[bytes] | None = None
        if self.ivf is not None:
            self.coarse_bytes = self.ivf.coarse_code_size()
            self.row_bytes = self.ivf.sa_code_size()
            self.counts = np.zeros(self.ivf.nlist, dtype=np.int64)
            self.spill = tempfile.TemporaryFile(prefix="loupe-codes-", dir=self.spill_dir)

    def add(self, vectors: np.ndarray) -> None:
        if self.ivf is None:
            self.index.add(vectors)
            return
        codes = self.index.sa_encode(vectors)  # through the index's rotation, if it has one
        self.counts += np.bincount(list_numbers(codes, self.coarse_bytes), minlength=len(self.counts))
        _write(self.spill, codes, self.spill_dir)

    def finish(self) -> None:
        if self.ivf is None:
            return
        try:
            lists = self.ivf.invlists
            for number in np.flatnonzero(self.counts):
                # Allocated at the exact size, then emptied: a std::vector keeps its capacity, so
                # the appends below fill it without reallocating.
                lists.resize(int(number), int(self.counts[number]))
                lists.resize(int(number), 0)
            self.spill.seek(0)
            while chunk := self.spill.read(COPY_ROWS * self.row_bytes):
                codes = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, self.row_bytes)
                self.ivf.add_sa_codes(codes)  # ids: ntotal onwards, the row numbers
            self.index.ntotal = self.ivf.ntotal  # a rotation in front keeps its own count
        finally:
            self.close()

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None

    def __enter__(self) -> ExactFill:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def list_numbers(codes: np.ndarray, coarse_bytes: int) -> np.ndarray:
    """The inverted list of each `sa_encode` code: its first `coarse_bytes` bytes, little-endian."""
    numbers = np.zeros(len(codes), dtype=np.int64)
    for byte in range(coarse_bytes):
        numbers |= codes[:, byte].astype(np.int64) << (8 * byte)
    return numbers


def _write(spill: IO[bytes], codes: np.ndarray, where: str) -> None:
    try:
        spill.write(codes.data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"no room to hold the index's codes while it is built in {where}: "
                "free space there or point TMPDIR at a larger disk"
            ) from None
        raise
