"""Storage on a local folder and on a real S3 endpoint on loopback: same listing order, same behaviour."""

from __future__ import annotations

import io
import os
import random
import socket
import threading

import pytest
import requests
from botocore.exceptions import ClientError

from loupe.schemas.errors import UserError
from loupe.workers import storage as storage_module
from loupe.workers.s3 import MIN_PART_SIZE, S3Storage
from loupe.workers.storage import (
    LocalStorage,
    MissingLocation,
    join_uri,
    open_storage,
)

# Mixed case, digits, nesting, unicode, and the pairs that a per-folder sort gets wrong:
# "a-b.jpg" < "a/..." < "a0.jpg" < "a.b/..." is not alphabetical by folder.
KEYS = [
    "A.jpg",
    "B/x.jpg",
    "Z.jpg",
    "a b.jpg",
    "a-b.jpg",
    "a.b/c.jpg",
    "a.jpg",
    "a/10.jpg",
    "a/9.jpg",
    "a/B/c.jpg",
    "a/b.jpg",
    "a0.jpg",
    "b.jpg",
    "z/ü/ß.jpg",
    "~x",
    "é.jpg",
    "日本/画像.png",
    "😀.png",
]


def _counting(storage: S3Storage, operation: str) -> list[dict]:
    """Records the parameters of every `operation` call the storage's client makes."""
    calls: list[dict] = []
    storage.client.meta.events.register(
        f"before-parameter-build.s3.{operation}", lambda params, **_: calls.append(params)
    )
    return calls


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> tuple[object, str]:
    """(storage, root URI) on each backend, starting empty."""
    if request.param == "local":
        return LocalStorage(), str(tmp_path / "root")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(endpoint_url=endpoint), f"s3://{bucket}/root"


def test_listing_order_is_utf8_byte_order_on_both_backends(tmp_path, s3_endpoint, s3_client, s3_bucket):
    local_root = tmp_path / "images"
    for key in KEYS:
        (local_root / key).parent.mkdir(parents=True, exist_ok=True)
        (local_root / key).write_bytes(key.encode())
        s3_client.put_object(Bucket=s3_bucket, Key=f"images/{key}", Body=key.encode())

    local = [o for o in LocalStorage().list(str(local_root))]
    remote = [o for o in S3Storage(endpoint_url=s3_endpoint).list(f"s3://{s3_bucket}/images")]

    expected = sorted(KEYS, key=lambda k: k.encode())
    assert [o.uri.removeprefix(f"{local_root}/") for o in local] == expected
    assert [o.uri.removeprefix(f"s3://{s3_bucket}/images/") for o in remote] == expected
    assert [o.size for o in local] == [o.size for o in remote] == [len(k.encode()) for k in expected]


def test_listing_is_paginated_and_streamed(s3_endpoint, s3_client, s3_bucket):
    keys = [f"p/{i:03d}.jpg" for i in range(25)]
    for key in keys:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    storage = S3Storage(endpoint_url=s3_endpoint, page_size=4)
    calls = _counting(storage, "ListObjectsV2")

    listing = storage.list(f"s3://{s3_bucket}/p/")
    first = next(listing)
    assert (first.uri, first.size) == (f"s3://{s3_bucket}/p/000.jpg", 1)
    assert len(calls) == 1  # only the first page has been fetched
    rest = list(listing)
    assert [o.uri for o in rest] == [f"s3://{s3_bucket}/{k}" for k in keys[1:]]
    assert len(calls) == 7 and all(c["MaxKeys"] == 4 for c in calls)


def test_s3_listing_carries_each_objects_etag(s3_endpoint, s3_client, s3_bucket):
    """A rewrite of the same size is told apart by its ETag (the incremental diff reads it)."""
    s3_client.put_object(Bucket=s3_bucket, Key="a.jpg", Body=b"xx")
    storage = S3Storage(endpoint_url=s3_endpoint)
    (before,) = storage.list(f"s3://{s3_bucket}/")
    s3_client.put_object(Bucket=s3_bucket, Key="a.jpg", Body=b"yy")
    (after,) = storage.list(f"s3://{s3_bucket}/a.jpg")  # a single object: HeadObject
    assert before.size == after.size == 2
    assert before.etag and after.etag and before.etag != after.etag


def test_listing_a_single_object_and_folder_semantics(root):
    storage, base = root
    for key in ("d/x.jpg", "d/y.jpg", "d2/z.jpg", "d.jpg"):
        storage.write_bytes(join_uri(base, key), b"12345")
    assert [(o.uri, o.size) for o in storage.list(join_uri(base, "d/x.jpg"))] == [(join_uri(base, "d/x.jpg"), 5)]
    # A folder name without its slash is still the folder, not a string prefix ("d2/", "d.jpg").
    assert [o.uri for o in storage.list(join_uri(base, "d"))] == [
        join_uri(base, "d/x.jpg"),
        join_uri(base, "d/y.jpg"),
    ]
    assert [o.uri for o in storage.list(base + "/d/")] == [
        join_uri(base, "d/x.jpg"),
        join_uri(base, "d/y.jpg"),
    ]


def test_s3_folder_markers_are_not_objects(s3_endpoint, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="f/", Body=b"")
    s3_client.put_object(Bucket=s3_bucket, Key="f/a.jpg", Body=b"a")
    assert [o.uri for o in S3Storage(endpoint_url=s3_endpoint).list(f"s3://{s3_bucket}/f")] == [
        f"s3://{s3_bucket}/f/a.jpg"
    ]


def test_write_read_exists_delete(root):
    storage, base = root
    uri = join_uri(base, "deep/er/part.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"second"
    with storage.open(uri) as stream:
        assert stream.read(3) == b"sec" and stream.read() == b"ond"
    storage.delete(uri)
    storage.delete(uri)  # missing is fine
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)


def test_local_write_leaves_no_temp_file_and_is_all_or_nothing(tmp_path, monkeypatch):
    storage = LocalStorage()
    target = tmp_path / "out" / "part.parquet"
    storage.write_bytes(str(target), b"old")
    storage.write_bytes(str(target), b"new")
    assert os.listdir(target.parent) == ["part.parquet"]
    assert target.read_bytes() == b"new"

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(storage_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        storage.write_bytes(str(target), b"never seen")
    assert os.listdir(target.parent) == ["part.parquet"]
    assert target.read_bytes() == b"new"


def test_s3_large_write_is_one_multipart_upload(s3_endpoint, s3_bucket):
    storage = S3Storage(endpoint_url=s3_endpoint, multipart_threshold=MIN_PART_SIZE)
    parts = _counting(storage, "UploadPart")
    puts = _counting(storage, "PutObject")
    data = random.Random(1).randbytes(11 * 1024 * 1024)
    storage.write_bytes(f"s3://{s3_bucket}/big.bin", data)
    assert (len(parts), len(puts)) == (3, 0)
    assert storage.read_bytes(f"s3://{s3_bucket}/big.bin") == data
    # Below the threshold, one PUT.
    storage.write_bytes(f"s3://{s3_bucket}/small.bin", data[: MIN_PART_SIZE - 1])
    assert (len(parts), len(puts)) == (3, 1)
    with pytest.raises(ValueError, match="at least"):
        S3Storage(multipart_threshold=MIN_PART_SIZE - 1)


def test_open_seekable_random_access(root):
    storage, base = root
    data = random.Random(2).randbytes(3 * 1024 * 1024 + 17)
    uri = join_uri(base, "blob.bin")
    storage.write_bytes(uri, data)
    with storage.open_seekable(uri) as f:
        assert f.seekable()
        assert f.seek(0, io.SEEK_END) == len(data)
        f.seek(-8, io.SEEK_END)
        assert f.read() == data[-8:]
        assert f.read(10) == b""
        for offset in (0, 1_500_000, 17, len(data) - 1_200_000):
            f.seek(offset)
            assert f.read(100_000) == data[offset : offset + 100_000]
        f.seek(10)
        f.read(5)
        assert f.tell() == 15


def test_s3_seekable_reads_are_ranged_and_pinned_to_one_version(s3_endpoint, s3_client, s3_bucket):
    storage = S3Storage(endpoint_url=s3_endpoint)
    uri = f"s3://{s3_bucket}/blob.bin"
    storage.write_bytes(uri, bytes(range(256)) * 20_000)  # ~5 MiB
    gets = _counting(storage, "GetObject")
    with storage.open_seekable(uri) as f:
        f.seek(-100, io.SEEK_END)
        assert len(f.read()) == 100
        assert len(gets) == 1 and gets[0]["Range"].startswith("bytes=")  # a footer read is not a download
        s3_client.put_object(Bucket=s3_bucket, Key="blob.bin", Body=b"replaced")
        f.seek(0)
        with pytest.raises(ClientError, match=r"PreconditionFailed|412"):
            f.read(10)


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(MissingLocation, match=r"no such file or folder: .*nowhere"):
        list(LocalStorage().list(str(tmp_path / "nowhere")))


def test_empty_local_folder_lists_nothing(tmp_path):
    assert list(LocalStorage().list(str(tmp_path))) == []


def test_missing_bucket_and_empty_prefix_are_user_errors(s3_endpoint, s3_bucket):
    storage = S3Storage(endpoint_url=s3_endpoint)
    with pytest.raises(UserError, match="bucket does not exist: s3://no-such-bucket-here/x") as caught:
        list(storage.list("s3://no-such-bucket-here/x"))
    assert not isinstance(caught.value, MissingLocation)  # a missing bucket is not an empty folder
    with pytest.raises(UserError, match="bucket does not exist"):
        storage.write_bytes("s3://no-such-bucket-here/x", b"1")
    with pytest.raises(MissingLocation, match=f"nothing found under s3://{s3_bucket}/nothing"):
        list(storage.list(f"s3://{s3_bucket}/nothing/"))
    assert list(storage.list(f"s3://{s3_bucket}")) == []  # an empty bucket is an empty folder


@pytest.fixture
def moto_auth(s3_endpoint):
    """Make the loopback endpoint check signatures and IAM permissions, as a real one does.

    moto accepts any credentials unless asked (its reset-auth API); yields an IAM user's real
    key pair that has no permissions.
    """
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1")
    user = f"loupe-{random.Random().getrandbits(32):x}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    previous = requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0").json()
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        requests.post(
            f"{s3_endpoint}/moto-api/reset-auth", data=previous["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
        )


@pytest.mark.parametrize(
    "which, message",
    [
        ("unknown key", "invalid credentials \\(unknown access key id\\)"),
        ("wrong secret", "invalid credentials \\(secret key does not match\\)"),
        ("no permission", "access denied"),
    ],
)
def test_bad_credentials_are_user_errors(s3_endpoint, s3_bucket, moto_auth, monkeypatch, which, message):
    key_id, secret = moto_auth
    key_id, secret = {
        "unknown key": ("AKIAUNKNOWNUNKNOWN00", "not-a-secret-1234"),
        "wrong secret": (key_id, "wrong-secret-5678"),
        "no permission": (key_id, secret),
    }[which]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage = S3Storage(endpoint_url=s3_endpoint, max_attempts=1)
    for attempt in (
        lambda: list(storage.list(f"s3://{s3_bucket}/x/")),
        lambda: storage.read_bytes(f"s3://{s3_bucket}/k"),
    ):
        with pytest.raises(UserError, match=message) as caught:
            attempt()
        # A refused object is one image's error row; bad credentials stop the job.
        assert isinstance(caught.value, PermissionError) == (which == "no permission")
        text = str(caught.value)
        assert s3_bucket in text and "\n" not in text
        assert secret not in text and key_id not in text


def test_no_credentials_is_a_user_error(s3_endpoint, s3_bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(UserError, match=f"no usable AWS credentials for s3://{s3_bucket}/x"):
        list(S3Storage(endpoint_url=s3_endpoint, max_attempts=1).list(f"s3://{s3_bucket}/x"))


def test_unreachable_endpoint_is_a_user_error():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    storage = S3Storage(endpoint_url=endpoint, max_attempts=2)
    with pytest.raises(UserError, match=f"cannot reach the S3 endpoint {endpoint} for s3://b/x"):
        list(storage.list("s3://b/x"))


def test_endpoint_from_environment(s3_endpoint, s3_client, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3_client.put_object(Bucket=s3_bucket, Key="e.jpg", Body=b"e")
    assert open_storage(f"s3://{s3_bucket}/e.jpg").read_bytes(f"s3://{s3_bucket}/e.jpg") == b"e"


def test_open_storage_and_join_uri(tmp_path):
    assert isinstance(open_storage("s3://b/p"), S3Storage)
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    with pytest.raises(UserError, match="gs://"):
        open_storage("gs://b/p")
    assert join_uri("s3://b/out/", "parts", "/x.parquet") == "s3://b/out/parts/x.parquet"
    assert join_uri("/data", "a/b") == "/data/a/b"
    assert join_uri("/", "a") == "/a"


# -- conditional writes and unfinished uploads ---------------------------------------------------


def test_create_exclusive_creates_once(root):
    storage, base = root
    uri = join_uri(base, "new/folder/_lease.json")
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    if isinstance(storage, LocalStorage):
        assert os.listdir(os.path.dirname(uri)) == ["_lease.json"]  # no temp file left behind


def _race(count: int, attempt) -> list:
    """`attempt(i)` from `count` threads released together; their results in order."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        results[i] = attempt(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_create_exclusive_has_one_winner(root):
    storage, base = root
    uri = join_uri(base, "_job.json")
    created = _race(8, lambda i: storage.create_exclusive(uri, f"writer {i}".encode()))
    assert created.count(True) == 1
    assert storage.read_bytes(uri) == f"writer {created.index(True)}".encode()


def test_replace_if_is_compare_and_swap(root):
    storage, base = root
    uri = join_uri(base, "record.json")
    with pytest.raises(FileNotFoundError):
        storage.read_with_version(uri)
    assert not storage.replace_if(uri, b"x", "any-version")  # nothing to replace
    storage.create_exclusive(uri, b"v1")
    data, version = storage.read_with_version(uri)
    assert data == b"v1"
    assert storage.replace_if(uri, b"v2", version)
    assert not storage.replace_if(uri, b"v3", version)  # stale: someone (we) changed it since
    data, newer = storage.read_with_version(uri)
    assert (data, newer != version) == (b"v2", True)
    swapped = _race(6, lambda i: storage.replace_if(uri, f"v3 by {i}".encode(), newer))
    assert swapped.count(True) == 1
    assert storage.read_bytes(uri) == f"v3 by {swapped.index(True)}".encode()
    assert not storage.replace_if(join_uri(base, "no/such/folder/x"), b"x", newer)


def test_abort_uploads_under_a_prefix_only(s3_endpoint, s3_client, s3_bucket, tmp_path):
    def start(key: str) -> None:
        upload = s3_client.create_multipart_upload(Bucket=s3_bucket, Key=key)
        s3_client.upload_part(
            Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"p" * 1024
        )

    for key in ("out/parts/part-00000.parquet", "out/parts/part-00001.parquet", "out2/parts/x", "outside"):
        start(key)
    storage = S3Storage(endpoint_url=s3_endpoint)
    assert storage.abort_uploads(f"s3://{s3_bucket}/out") == 2  # "out" is a folder: not "out2/"
    left = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert sorted(u["Key"] for u in left) == ["out2/parts/x", "outside"]
    assert storage.abort_uploads(f"s3://{s3_bucket}/out/") == 0
    assert not storage.exists(f"s3://{s3_bucket}/out/parts/part-00000.parquet")  # nothing ever visible
    assert LocalStorage().abort_uploads(str(tmp_path)) == 0
