"""Object storage by URI: local paths and s3://bucket/prefix on any S3-compatible endpoint."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as EndpointUnreachable  # refused, timed out, TLS, proxy

from loupe.schemas.errors import UserError

MiB = 1 << 20
MULTIPART_THRESHOLD = 64 * MiB  # below it, write_bytes is one PUT
READ_AHEAD = 1 * MiB  # open_seekable's buffer: Parquet footers and page headers are small reads


class MissingLocation(UserError):
    """A listed folder or prefix that does not exist (unlike a missing bucket or a refused request)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object found by a listing: its full URI and its size in bytes."""

    uri: str
    size: int


class Storage(ABC):
    """Read, list and write objects addressed by full URIs."""

    @abstractmethod
    def list(self, uri: str) -> Iterator[ObjectInfo]:
        """Every object under a folder or prefix (or the one object `uri` names), in UTF-8 byte order."""

    @abstractmethod
    def open(self, uri: str) -> BinaryIO:
        """A sequential read stream."""

    @abstractmethod
    def open_seekable(self, uri: str) -> BinaryIO:
        """A random-access read stream."""

    def read_bytes(self, uri: str) -> bytes:
        with self.open(uri) as stream:
            return stream.read()

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Replace the object with `data`; readers see the old object or the new one, never part of it."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether the object (locally: any path) is there."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove the object; a missing one is fine."""


def join_uri(base: str, *parts: str) -> str:
    """Join with single slashes: join_uri("s3://b/out/", "parts", "x") == "s3://b/out/parts/x"."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts if part.strip("/"))])


def open_storage(uri: str, endpoint_url: str | None = None, *, max_attempts: int = 10) -> Storage:
    """The storage for `uri`'s scheme; cheap, so each worker makes its own.

    `max_attempts` bounds S3 retries: patient for the job's reads and writes, low for a
    preflight check that should tell a user about a wrong endpoint in seconds.
    """
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "s3":
        return S3Storage(endpoint_url=endpoint_url, max_attempts=max_attempts)
    if scheme in ("", "file"):
        return LocalStorage()
    raise UserError(f"unsupported storage scheme {scheme}:// in {uri} (use a local path or s3://)")


def _utf8(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class LocalStorage(Storage):
    """A local (or mounted network) file system; URIs are absolute paths."""

    @staticmethod
    def _path(uri: str) -> str:
        # Absolute, so that a Ray worker with another working directory reads the same file.
        return os.path.abspath(uri.removeprefix("file://"))

    def list(self, uri: str) -> Iterator[ObjectInfo]:
        root = self._path(uri)
        if os.path.isfile(root):
            yield ObjectInfo(root, os.path.getsize(root))
            return
        if not os.path.isdir(root):
            raise MissingLocation(f"no such file or folder: {uri}")
        yield from self._walk(root)

    def _walk(self, folder: str) -> Iterator[ObjectInfo]:
        # A folder sorts as "name/", which makes this depth-first walk produce exactly the
        # byte order of the full paths that S3 uses ("a-b" < "a/x" because "-" < "/").
        with os.scandir(folder) as scan:
            entries = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in scan]
        entries.sort(key=lambda pair: _utf8(pair[0]))
        for name, entry in entries:
            if name.endswith("/"):
                yield from self._walk(entry.path)
            elif entry.is_file():
                yield ObjectInfo(entry.path, entry.stat().st_size)

    def open(self, uri: str) -> BinaryIO:
        return open(self._path(uri), "rb")

    def open_seekable(self, uri: str) -> BinaryIO:
        return open(self._path(uri), "rb")

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = Path(self._path(uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            # os.open with 0o666 lets the umask decide the mode, as for any other new file
            # (mkstemp would leave 0600 behind).
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with open(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        # The rename itself is only durable once the directory entry is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def exists(self, uri: str) -> bool:
        return os.path.exists(self._path(uri))

    def delete(self, uri: str) -> None:
        Path(self._path(uri)).unlink(missing_ok=True)


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise UserError(f"no bucket in {uri} (expected s3://bucket/prefix)")
    return bucket, key


# Error codes that mean the user has to fix something; the messages never quote the service's
# own text, which can echo request details.
_USER_ERRORS = {
    "NoSuchBucket": "bucket does not exist",
    "InvalidBucketName": "invalid bucket name",
    "AccessDenied": "access denied",
    "403": "access denied or invalid credentials",
    "AllAccessDisabled": "access denied",
    "InvalidAccessKeyId": "invalid credentials (unknown access key id)",
    "SignatureDoesNotMatch": "invalid credentials (secret key does not match)",
    "InvalidToken": "invalid credentials (bad session token)",
    "ExpiredToken": "invalid credentials (session token expired)",
    "AuthorizationHeaderMalformed": "invalid credentials or wrong region",
    "PermanentRedirect": "wrong region or endpoint for this bucket",
}


class S3Storage(Storage):
    """S3 or any S3-compatible store (MinIO, Ceph, R2, ...), through one lazily made boto3 client."""

    def __init__(
        self,
        endpoint_url: str | None = None,
        *,
        page_size: int = 1000,
        max_attempts: int = 10,
        max_pool_connections: int = 32,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.max_pool_connections = max_pool_connections
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                config = Config(
                    retries={"mode": "standard", "max_attempts": self.max_attempts},
                    max_pool_connections=self.max_pool_connections,
                )
                # A Session of our own: boto3's default session is not safe to share between threads.
                # endpoint_url=None lets boto3 read AWS_ENDPOINT_URL itself.
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, config=config
                )
            return self._client

    @contextlib.contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Errors a user can fix become one-line UserErrors; a missing key, FileNotFoundError."""
        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"no such object: {uri}") from None
            if code in _USER_ERRORS:
                raise UserError(f"{_USER_ERRORS[code]}: {uri} ({code})") from None
            raise
        except (NoCredentialsError, PartialCredentialsError):
            raise UserError(f"no usable AWS credentials for {uri}") from None
        except EndpointUnreachable:
            endpoint = self.client.meta.endpoint_url
            raise UserError(f"cannot reach the S3 endpoint {endpoint} for {uri}") from None

    def list(self, uri: str) -> Iterator[ObjectInfo]:
        bucket, key = _split_s3(uri)
        with self._errors(uri):
            if key and not key.endswith("/"):
                try:
                    head = self.client.head_object(Bucket=bucket, Key=key)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                        raise
                else:
                    yield ObjectInfo(uri, head["ContentLength"])
                    return
            prefix = key.rstrip("/") + "/" if key else ""
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
            )
            found = False
            for page in pages:
                for obj in page.get("Contents", ()):
                    found = True
                    # Zero-byte "folder/" markers from consoles have no local counterpart.
                    if not obj["Key"].endswith("/"):
                        yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"])
            if not found and prefix:
                raise MissingLocation(f"nothing found under {uri}")

    def open(self, uri: str) -> BinaryIO:
        bucket, key = _split_s3(uri)
        with self._errors(uri):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"]

    def open_seekable(self, uri: str) -> BinaryIO:
        bucket, key = _split_s3(uri)
        with self._errors(uri):
            head = self.client.head_object(Bucket=bucket, Key=key)
        raw = _S3RangeReader(self, uri, head["ContentLength"], head["ETag"])
        return io.BufferedReader(raw, buffer_size=READ_AHEAD)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = _split_s3(uri)
        # One PUT up to the threshold; above it a multipart upload that S3 only makes visible
        # when it is completed, and that boto3 aborts if a part fails.
        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_THRESHOLD,
            preferred_transfer_client="classic",
        )
        with self._errors(uri):
            self.client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)

    def exists(self, uri: str) -> bool:
        bucket, key = _split_s3(uri)
        try:
            with self._errors(uri):
                self.client.head_object(Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, uri: str) -> None:
        bucket, key = _split_s3(uri)
        with self._errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)


class _S3RangeReader(io.RawIOBase):
    """Random access to one S3 object by ranged GETs, pinned to the ETag it had when opened."""

    def __init__(self, storage: S3Storage, uri: str, size: int, etag: str) -> None:
        self._storage, self._uri, self._size, self._etag = storage, uri, size, etag
        self._bucket, self._key = _split_s3(uri)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size or len(buffer) == 0:
            return 0
        last = min(self._pos + len(buffer), self._size) - 1
        # IfMatch: if the object is replaced mid-read, fail (412) rather than mix two versions.
        with self._storage._errors(self._uri):
            body = self._storage.client.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-{last}", IfMatch=self._etag
            )["Body"]
        with body:
            data = body.read()
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
