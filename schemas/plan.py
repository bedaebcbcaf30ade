"""The unit of work: a shard of the input, as planned by the driver and read by a worker."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# Loose objects with these extensions are images; .tar and .parquet files are shards of their own.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})


class ShardKind(str, Enum):
    """How a shard's source is laid out."""

    FILES = "files"  # loose image objects, grouped --shard-size at a time
    TAR = "tar"  # one WebDataset .tar
    PARQUET = "parquet"  # one Parquet file with an image-bytes column


@dataclass(frozen=True)
class Shard:
    """A planned shard: its id (the part number) and the source objects it reads."""

    shard_id: int
    kind: ShardKind
    uris: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.shard_id:05d}"
