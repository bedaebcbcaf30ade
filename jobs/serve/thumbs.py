"""Thumbnails of catalog images, made on demand from their source objects by the safe decoder, kept in an LRU."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq

from loupe.jobs.serve.catalog import Catalog
from loupe.schemas.errors import UserError
from loupe.schemas.plan import IMAGE_EXTENSIONS, Shard, ShardKind
from loupe.workers.decode import DecodeError, decode_image
from loupe.workers.reader import read_shard
from loupe.workers.storage import Storage, open_storage

# The grid's tiles and the image view's picture; only these, so a client cannot grow the cache
# with sizes of its choosing.
SIZES = (256, 1024)
CACHE_BYTES = 64 << 20
JPEG_QUALITY = 85
DECODERS = 4


class NoThumbnail(LookupError):
    """This image has no picture to show (not listed, an error row, a source that is gone or undecodable)."""


class Thumbnails:
    """JPEG thumbnails by image id; only ids of rows the catalog holds, from the source URIs their rows name."""

    def __init__(self, catalog: Catalog, cache_bytes: int = CACHE_BYTES):
        self.catalog, self.cache_bytes = catalog, cache_bytes
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._storages: dict[str, Storage] = {}
        # A source may decode to ~270 MB (Pillow's pixel limit): a few at a time bound the memory.
        self._decoding = threading.BoundedSemaphore(DECODERS)

    def get(self, image_id: str, size: int) -> bytes:
        if size not in SIZES:
            raise UserError(f"size must be one of {', '.join(map(str, SIZES))}, got {size}")
        key = (image_id, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        row = self.catalog.locate(image_id)
        if row is None:
            raise NoThumbnail(f"no image {image_id} in this catalog")
        held = self.catalog.held(row)
        if held["status"] != "ok":
            raise NoThumbnail(f"image {image_id} is an error row: it has no picture")
        source = self._source_bytes(held["source_uri"])
        with self._decoding:
            data = _thumbnail(source, size, image_id)
        self._keep(key, data)
        return data

    def _keep(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = data
                self._held += len(data)
            while self._held > self.cache_bytes and self._cache:
                self._held -= len(self._cache.popitem(last=False)[1])

    def _source_bytes(self, uri: str) -> bytes:
        """The image bytes at a row's source URI: a loose object, a WebDataset member or a Parquet row."""
        container, _, member = uri.rpartition("#")
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        try:
            with self._lock:  # one storage (one S3 client and its connection pool) per scheme
                storage = self._storages.get(scheme) or open_storage(uri, self.catalog.endpoint_url)
                self._storages[scheme] = storage
            if uri.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS or not container:
                return storage.read_bytes(uri)
            if container.endswith(".parquet"):
                return _parquet_image(storage, container, int(member), self.catalog.settings.get("image_column") or "image")
            if container.endswith(".tar"):
                # A tar has no index: read up to the member (thumbnails are cached, so once).
                for sample in read_shard(Shard(0, ShardKind.TAR, (container,)), storage):
                    if sample.source_uri == uri and sample.data is not None:
                        return sample.data
                raise FileNotFoundError(uri)
            return storage.read_bytes(uri)
        except (OSError, ValueError, UserError, pa.ArrowException) as exc:
            raise NoThumbnail(f"the source of this image can no longer be read ({type(exc).__name__})") from None


def _parquet_image(storage, uri: str, row: int, column: str) -> bytes:
    with storage.open_seekable(uri) as stream:
        parquet = pq.ParquetFile(stream)
        first = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if row < first + rows:
                cell = parquet.read_row_group(group, columns=[column]).column(0)[row - first].as_py()
                break
            first += rows
        else:
            raise ValueError(f"row {row} is past the end")
    data = cell.get("bytes") if isinstance(cell, dict) else cell  # the datasets Image feature: {bytes, path}
    if not data:
        raise ValueError("no image bytes")
    return data


def _thumbnail(data: bytes, size: int, image_id: str) -> bytes:
    try:
        picture = decode_image(data, min_side=size)
    except DecodeError as exc:
        raise NoThumbnail(f"image {image_id} cannot be decoded ({exc.code.value})") from None
    picture.thumbnail((size, size))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
