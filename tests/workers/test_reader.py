"""read_shard on loose files, WebDataset tars and Parquet files, from a local folder and from S3."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loupe.schemas.codes import ErrorCode
from loupe.schemas.errors import UserError
from loupe.schemas.plan import Shard, ShardKind
from loupe.workers.reader import image_id_for, read_shard
from loupe.workers.s3 import S3Storage
from loupe.workers.storage import LocalStorage, TransientError, join_uri


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(storage, root URI) on each backend."""
    if request.param == "local":
        return LocalStorage(), str(tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(endpoint_url=request.getfixturevalue("s3_endpoint")), f"s3://{bucket}/in"


def test_image_id_is_128_bits_of_sha256_of_the_uri():
    uri = "s3://bucket/images/cat.jpg"
    assert image_id_for(uri) == hashlib.sha256(uri.encode()).hexdigest()[:32]
    # Pinned: ids must never change between releases, or resumed jobs would duplicate rows.
    assert image_id_for(uri) == "f882ec08ca8a0f5486171af2ee304c42"
    assert image_id_for("s3://bucket/images/cat.jpg#0") != image_id_for(uri)
    assert len(image_id_for(uri)) == 32


# -- loose files -------------------------------------------------------------------------------


def test_files_shard_in_order_with_missing_object(root):
    storage, base = root
    uris = [join_uri(base, f"img/{i:03d}.jpg") for i in range(40)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, f"image {i}".encode())
    missing = join_uri(base, "img/gone.jpg")
    shard = Shard(0, ShardKind.FILES, tuple([*uris[:20], missing, *uris[20:]]))

    samples = list(read_shard(shard, storage, max_concurrency=4))

    assert [s.source_uri for s in samples] == list(shard.uris)
    assert [s.image_id for s in samples] == [image_id_for(u) for u in shard.uris]
    gone = samples[20]
    assert gone.data is None and gone.error[0] == ErrorCode.NOT_FOUND and "gone.jpg" in gone.error[1]
    ok = samples[:20] + samples[21:]
    assert [s.data for s in ok] == [f"image {i}".encode() for i in range(40)]
    assert all(s.error is None and s.metadata == {} for s in ok)
    # Same URIs, same ids, on every run.
    assert [s.image_id for s in read_shard(shard, storage, max_concurrency=4)] == [
        s.image_id for s in samples
    ]


class _SlowStorage(LocalStorage):
    """Local storage whose reads take a while, recording how many run at once and how many started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.peak = self.started = 0

    def read_bytes(self, uri: str) -> bytes:
        with self.lock:
            self.started += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        return super().read_bytes(uri)


class _RefusingStorage(LocalStorage):
    """Local storage that refuses some reads the way a store does: denied, or failing transiently."""

    def read_bytes(self, uri: str) -> bytes:
        if "denied" in uri:
            raise PermissionError(13, "Permission denied", uri)
        if "flaky" in uri:
            raise TransientError(f"{uri}: still failing after 5 attempts (SlowDown)")
        return super().read_bytes(uri)


def test_read_failures_become_rows_with_a_code_saying_which(tmp_path):
    names = ["ok.jpg", "denied.jpg", "flaky.jpg", "gone.jpg"]
    for name in names[:3]:
        (tmp_path / name).write_bytes(b"x")
    shard = Shard(0, ShardKind.FILES, tuple(str(tmp_path / n) for n in names))
    samples = list(read_shard(shard, _RefusingStorage()))
    assert [s.error[0] if s.error else None for s in samples] == [
        None,
        ErrorCode.ACCESS_DENIED,
        ErrorCode.READ_FAILED,
        ErrorCode.NOT_FOUND,
    ]
    assert all("\n" not in s.error[1] and names[i] in s.error[1] for i, s in enumerate(samples) if s.error)


def test_files_are_fetched_concurrently_with_bounded_read_ahead(tmp_path):
    for i in range(64):
        (tmp_path / f"{i}.jpg").write_bytes(b"x")
    storage = _SlowStorage()
    samples = read_shard(
        Shard(0, ShardKind.FILES, tuple(str(tmp_path / f"{i}.jpg") for i in range(64))),
        storage,
        max_concurrency=8,
    )
    next(samples)
    time.sleep(0.1)
    assert storage.started <= 16  # at most 2 x max_concurrency ahead of the consumer
    assert len(list(samples)) == 63
    assert 1 < storage.peak <= 8


# -- WebDataset tar ------------------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            if name.endswith("/"):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


WDS = [
    ("shard/", b""),
    ("shard/000.jpg", b"jpeg-0"),
    ("shard/000.txt", "a cat on a mat, ünïcode".encode()),
    ("shard/000.json", b'{"w": 1}'),
    ("shard/001.cls", b"7"),
    ("shard/001.PNG", b"png-1"),
    ("shard/002.txt", b"caption but no image"),
    ("shard/003.jpeg", b"jpeg-3"),
    ("shard/003.npy", b"\x93NUMPY\xff\xfe"),  # binary sidecar: not metadata
    ("shard/v1.2/004.webp", b"webp-4"),  # a dot in a folder name is not an extension
]


def test_tar_shard_groups_members_by_key(root):
    storage, base = root
    uri = join_uri(base, "00000.tar")
    storage.write_bytes(uri, _tar(WDS))
    samples = list(read_shard(Shard(3, ShardKind.TAR, (uri,)), storage))

    assert [s.source_uri for s in samples] == [
        f"{uri}#shard/000",
        f"{uri}#shard/001",
        f"{uri}#shard/002",
        f"{uri}#shard/003",
        f"{uri}#shard/v1.2/004",
    ]
    assert [s.image_id for s in samples] == [image_id_for(s.source_uri) for s in samples]
    assert [s.data for s in samples] == [b"jpeg-0", b"png-1", None, b"jpeg-3", b"webp-4"]
    assert samples[0].metadata == {"txt": "a cat on a mat, ünïcode", "json": '{"w": 1}'}
    assert samples[1].metadata == {"cls": "7"}
    assert samples[2].error[0] == ErrorCode.MISSING_IMAGE and samples[2].metadata == {
        "txt": "caption but no image"
    }
    assert samples[3].metadata == {} and samples[3].error is None


def test_compressed_tar_is_read_too(tmp_path):
    path = tmp_path / "s.tar.gz"
    path.write_bytes(_tar(WDS, mode="w:gz"))
    assert len(list(read_shard(Shard(0, ShardKind.TAR, (str(path),)), LocalStorage()))) == 5


@pytest.mark.parametrize("cut", ["mid-data", "at-member-boundary", "mid-header", "no-end-marker"])
def test_truncated_tar_raises(tmp_path, cut):
    data = _tar([(f"{i:03d}.jpg", bytes(1000)) for i in range(4)])
    # Each member is a 512-byte header and 1024 bytes of padded data.
    end = {
        "mid-data": 2 * 1536 + 700,
        "at-member-boundary": 2 * 1536,
        "mid-header": 2 * 1536 + 100,
        "no-end-marker": 4 * 1536,
    }[cut]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:end])
    with pytest.raises(tarfile.ReadError):
        list(read_shard(Shard(0, ShardKind.TAR, (str(path),)), LocalStorage()))


# -- Parquet -------------------------------------------------------------------------------------


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=3)  # several row groups, so row numbers must carry over
    return buf.getvalue()


def test_parquet_shard_with_binary_column(root):
    storage, base = root
    table = pa.table(
        {
            "caption": ["c0", None, "c2", "c3", "c4", "c5", "c6"],
            "image": pa.array([b"i0", b"i1", None, b"i3", b"i4", b"i5", b"i6"], pa.large_binary()),
            "width": [1, 2, 3, 4, 5, 6, 7],
            "url": pa.array([f"http://x/{i}" for i in range(7)], pa.large_string()),
        }
    )
    uri = join_uri(base, "data.parquet")
    storage.write_bytes(uri, _parquet(table))
    samples = list(read_shard(Shard(0, ShardKind.PARQUET, (uri,)), storage))

    assert [s.source_uri for s in samples] == [f"{uri}#{i}" for i in range(7)]
    assert [s.data for s in samples] == [b"i0", b"i1", None, b"i3", b"i4", b"i5", b"i6"]
    assert samples[0].metadata == {"caption": "c0", "url": "http://x/0"}
    assert samples[1].metadata == {"url": "http://x/1"}
    assert samples[2].error[0] == ErrorCode.MISSING_IMAGE
    assert all(s.error is None for i, s in enumerate(samples) if i != 2)


def test_parquet_shard_with_hugging_face_image_struct(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array(
        [
            {"bytes": b"a", "path": "a.jpg"},
            {"bytes": None, "path": "elsewhere.jpg"},
            None,
            {"bytes": b"d", "path": None},
        ],
        image_type,
    )
    path = tmp_path / "hf.parquet"
    path.write_bytes(_parquet(pa.table({"image": images, "text": ["ta", "tb", "tc", "td"]})))
    samples = list(read_shard(Shard(0, ShardKind.PARQUET, (str(path),)), LocalStorage()))
    assert [s.data for s in samples] == [b"a", None, None, b"d"]
    assert [s.error[0] if s.error else None for s in samples] == [
        None,
        ErrorCode.MISSING_IMAGE,
        ErrorCode.MISSING_IMAGE,
        None,
    ]
    assert [s.metadata for s in samples] == [{"text": t} for t in ("ta", "tb", "tc", "td")]


def test_parquet_without_the_image_column_is_a_user_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(_parquet(pa.table({"jpg": [b"x"], "caption": ["c"]})))
    with pytest.raises(UserError, match=r"no image column 'image'; its columns are: jpg, caption"):
        list(read_shard(Shard(0, ShardKind.PARQUET, (str(path),)), LocalStorage()))
    assert [
        s.data
        for s in read_shard(Shard(0, ShardKind.PARQUET, (str(path),)), LocalStorage(), image_column="jpg")
    ] == [b"x"]
    with pytest.raises(UserError, match=r"column 'caption' has type string"):
        list(read_shard(Shard(0, ShardKind.PARQUET, (str(path),)), LocalStorage(), image_column="caption"))
