"""FAISS itself, imported in this one place: without a FAISS build, one line saying what to install."""

from __future__ import annotations

from loupe.schemas.errors import UserError


class FaissMissing(UserError, ModuleNotFoundError):
    """Neither FAISS build is installed: the CLI prints it as one line, importers see an ImportError."""


try:
    import faiss
except ModuleNotFoundError as exc:
    if exc.name != "faiss":
        raise  # faiss is there but something it needs is not: that message says what
    raise FaissMissing(
        "faiss is not installed: pip install 'loupe[cpu]' (or 'loupe[gpu]' on CUDA 12)", name="faiss"
    ) from None

__all__ = ["FaissMissing", "faiss"]
