"""A shard's source (loose files, a WebDataset tar, a Parquet file) as a stream of samples in source order."""

from __future__ import annotations

import contextlib
import hashlib
import re
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from loupe.schemas.codes import ErrorCode
from loupe.schemas.errors import UserError, one_line
from loupe.schemas.plan import IMAGE_EXTENSIONS, Shard, ShardKind
from loupe.workers.storage import Storage

TAR_READ_SIZE = 1 << 20
PARQUET_BATCH_ROWS = 64  # rows per Arrow batch: images are large, a few dozen MB at a time is plenty


@dataclass
class Sample:
    """One image's bytes (or why there are none) with its id, where it came from and its sidecar text."""

    image_id: str
    source_uri: str
    data: bytes | None
    metadata: dict[str, str] = field(default_factory=dict)
    error: tuple[ErrorCode, str] | None = None


def image_id_for(source_uri: str) -> str:
    """The stable id of the image at `source_uri`: the first 128 bits of its sha256, in hex.

    128 bits keeps ids as short as a UUID while collisions stay out of reach: among a billion
    images the chance of any collision is about 1e-21 (at 64 bits it would be about 3%).
    """
    return hashlib.sha256(source_uri.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def read_shard(
    shard: Shard, storage: Storage, *, image_column: str = "image", max_concurrency: int = 16
) -> Iterator[Sample]:
    """Samples of `shard` in source order; an unreadable image is a Sample with an error, not an exception."""
    if shard.kind == ShardKind.FILES:
        yield from _read_files(shard.uris, storage, max_concurrency)
    elif shard.kind == ShardKind.TAR:
        for uri in shard.uris:
            yield from _read_tar(uri, storage)
    elif shard.kind == ShardKind.PARQUET:
        for uri in shard.uris:
            yield from _read_parquet(uri, storage, image_column)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def _sample(
    source_uri: str, data: bytes | None, metadata: dict[str, str] | None = None, error=None
) -> Sample:
    return Sample(image_id_for(source_uri), source_uri, data, metadata or {}, error)


# -- loose files ---------------------------------------------------------------------------


def _read_files(uris: tuple[str, ...], storage: Storage, max_concurrency: int) -> Iterator[Sample]:
    # Small-object GETs are latency-bound, so many are kept in flight; the window caps how many
    # finished-but-not-yet-consumed images sit in memory.
    window = 2 * max_concurrency
    pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="loupe-fetch")
    pending: deque[tuple[str, Future[bytes]]] = deque()
    try:
        for uri in uris:
            pending.append((uri, pool.submit(storage.read_bytes, uri)))
            if len(pending) >= window:
                yield _fetched(*pending.popleft())
        while pending:
            yield _fetched(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fetched(uri: str, future: Future[bytes]) -> Sample:
    # Storage has already retried what passes; storage-wide trouble (bad credentials, an
    # unreachable endpoint) is not an OSError and still fails the shard.
    try:
        return _sample(uri, future.result())
    except OSError as exc:
        return _sample(uri, None, error=(_read_error_code(exc), one_line(exc, 200)))


def _read_error_code(exc: OSError) -> ErrorCode:
    """The error-row code for an object that could not be read: permanent (not found, access
    denied) or a transient failure that outlived its retries."""
    if isinstance(exc, FileNotFoundError):
        return ErrorCode.NOT_FOUND
    if isinstance(exc, PermissionError):
        return ErrorCode.ACCESS_DENIED
    return ErrorCode.READ_FAILED


# -- WebDataset tar ------------------------------------------------------------------------

# WebDataset's split: the key keeps the directory; the extension starts at the basename's first dot.
_KEY_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class _StrictTarInfo(tarfile.TarInfo):
    """Treats a tar that stops without its end-of-archive block as truncated instead of finished.

    tarfile ends iteration quietly at a short, empty or garbled header past the first member,
    which would drop the rest of a half-uploaded shard without a word.
    """

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            raise tarfile.ReadError(f"truncated or corrupt tar ({exc or type(exc).__name__})") from None


def _read_tar(uri: str, storage: Storage) -> Iterator[Sample]:
    # Reads of a MiB instead of tarfile's 10 KiB default: fewer, larger reads from an HTTP body.
    with (
        storage.open(uri) as stream,
        tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo, bufsize=TAR_READ_SIZE) as tar,
    ):
        key: str | None = None
        members: dict[str, bytes] = {}
        while (member := tar.next()) is not None:
            tar.members = []  # a stream has no use for the member list tarfile keeps growing
            match = _KEY_EXTENSION.match(member.name)
            if not member.isfile() or match is None:
                continue
            if match[1] != key:
                if key is not None:
                    yield _tar_sample(uri, key, members)
                key, members = match[1], {}
            members[match[2].lower()] = tar.extractfile(member).read()  # lower-cased, as WebDataset does
        if key is not None:
            yield _tar_sample(uri, key, members)


def _tar_sample(tar_uri: str, key: str, members: dict[str, bytes]) -> Sample:
    image: bytes | None = None
    metadata: dict[str, str] = {}
    for extension, data in members.items():
        if image is None and extension in IMAGE_EXTENSIONS:
            image = data
            continue
        with contextlib.suppress(UnicodeDecodeError):  # binary sidecars (masks, arrays) are not metadata
            metadata[extension] = data.decode("utf-8")
    source = f"{tar_uri}#{key}"
    if image is None:
        return _sample(source, None, metadata, (ErrorCode.MISSING_IMAGE, f"no image member for key {key}"))
    return _sample(source, image, metadata)


# -- Parquet -------------------------------------------------------------------------------


def _read_parquet(uri: str, storage: Storage, image_column: str) -> Iterator[Sample]:
    with storage.open_seekable(uri) as stream, pq.ParquetFile(stream) as parquet:
        schema = parquet.schema_arrow
        if image_column not in schema.names:
            raise UserError(
                f"{uri} has no image column {image_column!r}; its columns are: {', '.join(schema.names)}"
            )
        image_type = schema.field(image_column).type
        is_struct = pa.types.is_struct(image_type)
        if not (_is_binary(image_type) or (is_struct and image_type.get_field_index("bytes") >= 0)):
            raise UserError(
                f"{uri}: column {image_column!r} has type {image_type};"
                " expected binary or a struct with a 'bytes' field"
            )
        text_columns = [f.name for f in schema if f.name != image_column and _is_text(f.type)]
        row = 0
        for batch in parquet.iter_batches(
            batch_size=PARQUET_BATCH_ROWS, columns=[image_column, *text_columns]
        ):
            images = batch.column(image_column)
            if is_struct:  # the Hugging Face datasets Image feature: {bytes, path}
                images = images.flatten()[image_type.get_field_index("bytes")]  # a null struct -> null bytes
            texts = {name: batch.column(name).to_pylist() for name in text_columns}
            for i, data in enumerate(images.to_pylist()):
                metadata = {name: values[i] for name, values in texts.items() if values[i] is not None}
                source = f"{uri}#{row}"
                if data is None:
                    error = (ErrorCode.MISSING_IMAGE, f"row {row} has no bytes in column {image_column!r}")
                    yield _sample(source, None, metadata, error)
                else:
                    yield _sample(source, data, metadata)
                row += 1


def _is_binary(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
