"""S3 and S3-compatible stores: reads that survive cut bodies, writes that survive lost replies, conditional writes."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import boto3
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as EndpointUnreachable  # refused, timed out, TLS, proxy
from botocore.exceptions import NoCredentialsError, PartialCredentialsError

from loupe.schemas.errors import UserError, one_line
from loupe.workers.faults import fault_point, planned
from loupe.workers.storage import PART_SIZE_ENV, AccessDenied, MissingLocation, ObjectInfo, Storage, TransientError

T = TypeVar("T")

MiB = 1 << 20
MULTIPART_THRESHOLD = 64 * MiB  # below it, write_bytes is one PUT; at or above, parts of this size
MIN_PART_SIZE = 5 * MiB  # S3's smallest part (but the last)
MAX_PART_SIZE = 5 * 1024 * MiB  # S3's largest part
READ_AHEAD = 1 * MiB  # open_seekable's buffer: Parquet footers and page headers are small reads
READ_CHUNK = 1 * MiB  # a whole-object read takes the body this much at a time, resumable between

# botocore retries a request, not the reading of its body (nor a request whose own retries ran
# out on a dropped connection): these are what a cut body or a dropped connection raise.
_TRANSIENT = (
    urllib3.exceptions.HTTPError,  # ProtocolError, IncompleteRead, ReadTimeoutError
    http.client.HTTPException,
    HTTPClientError,  # botocore's ResponseStreamingError, ReadTimeoutError, ConnectionClosedError
    IncompleteReadError,  # fewer bytes than Content-Length, then a clean end
    ConnectionError,
    TimeoutError,
)
# Error codes that mean the store is busy or briefly broken (a 5xx status is so too).
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "TooManyRequests"}
# A conditional write that the store refused because the condition did not hold.
_REFUSED_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled"}

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


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise UserError(f"no bucket in {uri} (expected s3://bucket/prefix)")
    return bucket, key


def _folder(key: str) -> str:
    """A key as a folder prefix: "out" and "out/" both mean "out/", never "out2/"."""
    return key.rstrip("/") + "/" if key else ""


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def part_size_setting() -> int:
    """The multipart threshold and part size in bytes: LOUPE_S3_PART_MIB when set, else
    MULTIPART_THRESHOLD; UserError (one line) for a value that is no part size S3 takes."""
    text = os.environ.get(PART_SIZE_ENV, "").strip()
    if not text:
        return MULTIPART_THRESHOLD
    mib = int(text) if text.isascii() and text.isdigit() else 0
    if not MIN_PART_SIZE <= mib * MiB <= MAX_PART_SIZE:
        raise UserError(
            f"{PART_SIZE_ENV} must be a whole number of MiB from {MIN_PART_SIZE // MiB} (S3's smallest part)"
            f" to {MAX_PART_SIZE // MiB} (its largest), not {text[:40]!r}"
        )
    return mib * MiB


def _name_part(params: dict, context: dict, **_) -> None:
    context["loupe_uri"] = f"s3://{params.get('Bucket')}/{params.get('Key')}"


def _part_sent(http_response, context: dict, **_) -> None:
    if http_response is not None and http_response.status_code == 200:
        fault_point("upload_part", [context.get("loupe_uri", "")])


class S3Storage(Storage):
    """S3 or any S3-compatible store (MinIO, Ceph, R2, ...), through one lazily made boto3 client.

    Requests are retried by botocore ("standard" mode, `max_attempts`); reading a body is not, so
    a read of one object resumes after a cut body or dropped connection until it has met
    `read_attempts` such faults, backing off exponentially (`backoff_s` doubling up to
    `backoff_cap_s`) with full jitter. Writes of `multipart_threshold` bytes or more (by default
    LOUPE_S3_PART_MIB, else MULTIPART_THRESHOLD) go up in parts of that size.
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        *,
        page_size: int = 1000,
        max_attempts: int = 10,
        max_pool_connections: int = 32,
        multipart_threshold: int | None = None,
        read_attempts: int = 5,
        backoff_s: float = 0.2,
        backoff_cap_s: float = 10.0,
    ) -> None:
        if multipart_threshold is None:
            multipart_threshold = part_size_setting()
        if multipart_threshold < MIN_PART_SIZE:
            raise ValueError(f"multipart_threshold must be at least {MIN_PART_SIZE} (S3's smallest part)")
        if read_attempts < 1:
            raise ValueError("read_attempts must be at least 1")
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.max_pool_connections = max_pool_connections
        self.multipart_threshold = multipart_threshold
        self.read_attempts = read_attempts
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
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
                if planned("upload_part"):  # a fault plan (tests): hold an upload after one of its parts
                    self._client.meta.events.register("before-parameter-build.s3.UploadPart", _name_part)
                    self._client.meta.events.register("after-call.s3.UploadPart", _part_sent)
            return self._client

    @contextlib.contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Errors a user can fix become one-line UserErrors (AccessDenied is a PermissionError too);
        a missing key, FileNotFoundError; a fault that outlived botocore's retries, TransientError."""
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"no such object: {uri}") from None
            if code in _DENIED_CODES:
                raise AccessDenied(f"{_USER_ERRORS[code]}: {uri} ({code})") from None
            if code in _USER_ERRORS:
                raise UserError(f"{_USER_ERRORS[code]}: {uri} ({code})") from None
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or code in _TRANSIENT_CODES:
                raise TransientError(f"{uri}: {code or status} after {self.max_attempts} attempts") from exc
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
                    if _code(exc) not in ("404", "NoSuchKey"):
                        raise
                else:
                    yield ObjectInfo(uri, head["ContentLength"], head.get("ETag", "").strip('"'))
                    return
            prefix = _folder(key)
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
            )
            found = False
            for page in pages:
                for obj in page.get("Contents", ()):
                    found = True
                    # Zero-byte "folder/" markers from consoles have no local counterpart.
                    if not obj["Key"].endswith("/"):
                        yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj.get("ETag", "").strip('"'))
            if not found and prefix:
                raise MissingLocation(f"nothing found under {uri}")

    def open(self, uri: str) -> BinaryIO:
        return _S3Stream(self, uri)

    def open_seekable(self, uri: str) -> BinaryIO:
        bucket, key = _split_s3(uri)
        with self._errors(uri):
            head = self.client.head_object(Bucket=bucket, Key=key)
        raw = _S3RangeReader(self, uri, head["ContentLength"], head["ETag"])
        return io.BufferedReader(raw, buffer_size=READ_AHEAD)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = _split_s3(uri)
        # One PUT below the threshold; at or above it a multipart upload that S3 only makes
        # visible when it is completed, and that boto3 aborts if a part fails.
        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_threshold,
            preferred_transfer_client="classic",
        )
        with self._errors(uri):
            try:
                self.client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)
            except (ClientError, BotoCoreError):
                # A CompleteMultipartUpload whose reply was lost is retried and answered
                # NoSuchUpload although the object was written (so is any write whose retries
                # ran out after it landed): the stored object decides.
                if not self._holds(bucket, key, data, self._etag_of(data)):
                    raise

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        return self._put_if(uri, data, IfNoneMatch="*")

    def read_with_version(self, uri: str) -> tuple[bytes, str]:
        with _S3Stream(self, uri) as stream:
            return stream.read(), stream.etag

    def replace_if(self, uri: str, data: bytes, version: str) -> bool:
        return self._put_if(uri, data, IfMatch=version)

    def _put_if(self, uri: str, data: bytes, **condition: str) -> bool:
        bucket, key = _split_s3(uri)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()  # one PUT's ETag
        with self._errors(uri):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
            except ClientError as exc:
                # The retry of a PUT whose reply was lost meets the PUT itself (412): if the
                # object holds our bytes, the write was ours.
                if self._holds(bucket, key, data, etag):
                    return True
                if _code(exc) in _REFUSED_CODES:
                    return False
                raise
            except BotoCoreError:
                if not self._holds(bucket, key, data, etag):
                    raise
        return True

    def _holds(self, bucket: str, key: str, data: bytes, etag: str) -> bool:
        """Whether the object holds exactly `data` (whose S3 ETag is `etag`); False when that
        cannot be found out."""
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
            if head["ContentLength"] != len(data):
                return False
            if head["ETag"].strip('"') == etag:
                return True
            # An ETag that is no MD5 (SSE-KMS, some S3-compatible stores): compare the bytes.
            return self.read_bytes(f"s3://{bucket}/{key}") == data
        except Exception:  # cannot tell: the caller's own error stands
            return False

    def _etag_of(self, data: bytes) -> str:
        """The ETag S3 gives `data` written by write_bytes: the MD5, or for a multipart upload the
        MD5 of the parts' MD5s and the number of parts."""
        if len(data) < self.multipart_threshold:
            return hashlib.md5(data, usedforsecurity=False).hexdigest()
        size = self.multipart_threshold
        digests = b"".join(
            hashlib.md5(data[i : i + size], usedforsecurity=False).digest() for i in range(0, len(data), size)
        )
        return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{-(-len(data) // size)}"

    def abort_uploads(self, uri: str) -> int:
        bucket, key = _split_s3(uri)
        aborted = 0
        with self._errors(uri):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=_folder(key)
            )
            for page in pages:
                for upload in page.get("Uploads", ()):
                    try:
                        self.client.abort_multipart_upload(
                            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    except ClientError as exc:
                        if _code(exc) != "NoSuchUpload":  # completed or aborted meanwhile
                            raise
                        continue
                    aborted += 1
        return aborted

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


class _Retries:
    """Runs the reads of one object, again after each transient fault, until the object has met
    `read_attempts` of them; then TransientError."""

    def __init__(self, storage: S3Storage, uri: str) -> None:
        self._storage, self._uri = storage, uri
        self._failed = 0

    def __call__(self, attempt: Callable[[], T]) -> T:
        while True:
            try:
                return attempt()
            except _TRANSIENT as exc:
                self._failed += 1
                storage = self._storage
                if self._failed >= storage.read_attempts:
                    message = f"{self._uri}: still failing after {self._failed} attempts ({one_line(exc, 200)})"
                    raise TransientError(message) from exc
                # Full jitter: readers cut off together do not come back together.
                ceiling = min(storage.backoff_cap_s, storage.backoff_s * 2 ** (self._failed - 1))
                time.sleep(random.uniform(0, ceiling))


class _S3Stream(io.RawIOBase):
    """One object read front to back; a body cut mid-stream is resumed by a ranged GET pinned to the
    ETag the read began with, so the bytes never mix two versions of the object."""

    def __init__(self, storage: S3Storage, uri: str) -> None:
        self._storage, self._uri = storage, uri
        self._bucket, self._key = _split_s3(uri)
        self._pos = self._size = 0
        self.etag = ""
        self._body = None
        self._retries = _Retries(storage, uri)
        self._retries(self._request)  # a missing object fails here, as open() does locally

    def _request(self) -> None:
        resume = {"Range": f"bytes={self._pos}-", "IfMatch": self.etag} if self.etag else {}
        with self._storage._errors(self._uri):
            response = self._storage.client.get_object(Bucket=self._bucket, Key=self._key, **resume)
        if not self.etag:
            self.etag, self._size = response["ETag"], response["ContentLength"]
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return self._retries(lambda: self._read(size))

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def _read(self, size: int) -> bytes:
        if self._pos >= self._size or size == 0:
            return b""
        try:
            if self._body is None:
                self._request()
            data = self._body.read(size)
            if not data:
                raise http.client.IncompleteRead(b"", self._size - self._pos)
        except BaseException:
            self._drop_body()
            raise
        self._pos += len(data)
        return data

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                body.close()

    def close(self) -> None:
        self._drop_body()
        super().close()


class _S3RangeReader(io.RawIOBase):
    """Random access to one S3 object by ranged GETs, pinned to the ETag it had when opened."""

    def __init__(self, storage: S3Storage, uri: str, size: int, etag: str) -> None:
        self._storage, self._uri, self._size, self._etag = storage, uri, size, etag
        self._bucket, self._key = _split_s3(uri)
        self._pos = 0
        self._retries = _Retries(storage, uri)

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
        data = self._retries(lambda: self._get(self._pos, last))
        memoryview(buffer).cast("B")[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _get(self, first: int, last: int) -> bytes:
        # IfMatch: if the object is replaced mid-read, fail (412) rather than mix two versions.
        with self._storage._errors(self._uri):
            body = self._storage.client.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={first}-{last}", IfMatch=self._etag
            )["Body"]
        try:
            return body.read()
        finally:
            body.close()
