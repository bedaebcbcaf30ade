"""`loupe bench embed-texts`: lines of text embedded as loupe embeds captions, for `loupe bench index --embeddings`.

The index benchmark's own vectors are synthetic; these are a real sentence-embedding model's,
with the spread and crowding real embeddings have (docs/benchmarks.md embeds the Brown corpus
with the packaged all-MiniLM-L6-v2).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from loupe.schemas.errors import UserError

CHUNK = 2048  # lines embedded, then written, at a time


def distinct_lines(files: Iterable[Path]) -> list[str]:
    """Every distinct non-empty line of the files, stripped, in order of first appearance."""
    seen: dict[str, None] = {}
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if text := line.strip():
                        seen.setdefault(text)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return list(seen)


def embed_lines(files: list[Path], out: Path, model: str, *, progress: bool = True) -> tuple[int, int]:
    """Write the distinct lines' unit embeddings to `out` (.npy, one row a line, in order): (rows, dim).

    The file appears whole or not at all: it is written beside `out` and renamed.
    """
    from loupe.workers.models.embedder import TextEmbedder

    lines = distinct_lines(files)
    if not lines:
        raise UserError("the text files hold no non-empty line to embed")
    embedder = TextEmbedder(model)
    partial = out.with_name(f".{out.name}.partial")
    matrix = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(lines), embedder.dim))
    try:
        for start in range(0, len(lines), CHUNK):
            matrix[start : start + CHUNK] = embedder.embed_texts(lines[start : start + CHUNK])
            if progress:
                print(f"\rembedded {min(start + CHUNK, len(lines)):,} of {len(lines):,} lines", end="", file=sys.stderr, flush=True)
        matrix.flush()
        del matrix
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
        if progress:
            print(file=sys.stderr)
    return len(lines), embedder.dim
