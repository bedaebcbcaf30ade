"""Object storage by URI: the Storage interface, local paths, and the choice of backend (S3 is in s3.py)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loupe.schemas.errors import UserError

# S3's multipart threshold and part size in MiB, when not s3.MULTIPART_THRESHOLD; named here, with
# no boto3 import, because the driver forwards it to the replicas.
PART_SIZE_ENV = "LOUPE_S3_PART_MIB"


class MissingLocation(UserError):
    """A listed folder or prefix that does not exist (unlike a missing bucket or a refused request)."""


class AccessDenied(UserError, PermissionError):
    """The store refused access to an object: a PermissionError (one image's error row) that the
    CLI, where it stops a command, still prints as one line."""


class TransientError(OSError):
    """Storage kept failing in a way that passes (throttled, 5xx, a body cut mid-stream, a timeout)
    after every retry; an image read this way becomes a `read_failed` row, worth retrying later."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object found by a listing: its full URI, its size in bytes, and its ETag where the store has one."""

    uri: str
    size: int
    etag: str = ""  # S3's entity tag (content fingerprint); "" for local files


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
    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create the object with `data` unless it exists: True if this call created it, False if not."""

    @abstractmethod
    def read_with_version(self, uri: str) -> tuple[bytes, str]:
        """The object's bytes and an opaque version for `replace_if`; FileNotFoundError if missing."""

    @abstractmethod
    def replace_if(self, uri: str, data: bytes, version: str) -> bool:
        """Compare-and-swap for small records: replace the object with `data` only if it is still at
        `version`; False (nothing written) if it changed or is gone."""

    @abstractmethod
    def abort_uploads(self, uri: str) -> int:
        """Abort the unfinished multipart uploads under a folder or prefix; how many there were."""

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
        # Imported here because s3.py builds on this module (and local jobs never load boto3).
        from loupe.workers.s3 import S3Storage

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
        with self._temp_copy(path, data) as temp:
            os.replace(temp, path)
        _fsync_dir(path.parent)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        path = Path(self._path(uri))
        # A hard link of a complete temp file: as exclusive as O_CREAT|O_EXCL, and nobody ever
        # reads the record half-written.
        with self._temp_copy(path, data) as temp:
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
        _fsync_dir(path.parent)
        return True

    def read_with_version(self, uri: str) -> tuple[bytes, str]:
        with open(self._path(uri), "rb") as stream:
            data = stream.read()
        return data, _content_version(data)

    def replace_if(self, uri: str, data: bytes, version: str) -> bool:
        path = Path(self._path(uri))
        # The version is the content's hash, like S3's ETag; the folder's lock makes the
        # compare and the rename one step for every process on this host (and NFS clients
        # whose flock is a real lock).
        if not path.parent.is_dir():
            return False
        with _locked(path.parent):
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            if _content_version(current) != version:
                return False
            self.write_bytes(uri, data)
        return True

    def abort_uploads(self, uri: str) -> int:
        return 0  # local writes have no multipart uploads: a killed write leaves a temp file at most

    def exists(self, uri: str) -> bool:
        return os.path.exists(self._path(uri))

    def delete(self, uri: str) -> None:
        Path(self._path(uri)).unlink(missing_ok=True)

    @staticmethod
    @contextlib.contextmanager
    def _temp_copy(path: Path, data: bytes) -> Iterator[Path]:
        """`data` in a synced temp file beside `path` (".name.<hex>.tmp"), removed afterwards."""
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
            yield temp
        finally:
            temp.unlink(missing_ok=True)


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    # A rename or link is only durable once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
