"""S3 storage through a misbehaving endpoint: reads retried or resumed, lost replies checked, nothing orphaned."""

from __future__ import annotations

import io
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest

from loupe.schemas.codes import ErrorCode
from loupe.schemas.plan import Shard, ShardKind
from loupe.workers.reader import read_shard
from loupe.workers.s3 import MIN_PART_SIZE, S3Storage
from loupe.workers.storage import TransientError
from loupe.jobs.bench.faulty_s3 import (
    DELAY,
    DROP_REPLY,
    INTERNAL_ERROR,
    KINDS,
    NO_SUCH_UPLOAD,
    RESET_GET,
    SLOWDOWN,
    Fault,
    FaultyS3,
)

# Every fault the tests in this file met, by kind (printed at the end of the session with -s).
SEEN: Counter[str] = Counter()


@pytest.fixture
def faulty(s3_endpoint):
    """A fault-injecting endpoint in front of the loopback S3 server; its counts go into SEEN."""
    with FaultyS3(s3_endpoint, seed=12) as proxy:
        yield proxy
    SEEN.update(proxy.counts)


@pytest.fixture(scope="module", autouse=True)
def _report_faults():
    yield
    print(f"\nfaults met in {__name__}: {dict(sorted(SEEN.items()))}")


def _storage(proxy: FaultyS3, **options) -> S3Storage:
    return S3Storage(endpoint_url=proxy.url, backoff_s=0.01, **options)


def _calls(storage: S3Storage, operation: str) -> list[dict]:
    calls: list[dict] = []
    storage.client.meta.events.register(
        f"before-parameter-build.s3.{operation}", lambda params, **_: calls.append(params)
    )
    return calls


def _sends(storage: S3Storage, operation: str) -> list[str]:
    """Every HTTP attempt of `operation`, botocore's own retries included."""
    sends: list[str] = []
    storage.client.meta.events.register(f"before-send.s3.{operation}", lambda request, **_: sends.append(request.url))
    return sends


# -- reads -------------------------------------------------------------------------------------


def test_a_body_cut_mid_stream_is_resumed_where_it_stopped(faulty, s3_client, s3_bucket):
    data = random.Random(3).randbytes(3 * 1024 * 1024)
    s3_client.put_object(Bucket=s3_bucket, Key="blob", Body=data)
    storage = _storage(faulty)
    gets = _calls(storage, "GetObject")
    faulty.script(Fault(RESET_GET, "/blob"))
    assert storage.read_bytes(f"s3://{s3_bucket}/blob") == data
    assert faulty.counts[RESET_GET] == 1
    # The second GET asks for the rest only, and only from the version the read began with.
    assert len(gets) == 2 and "Range" not in gets[0]
    assert gets[1]["Range"] != "bytes=0-" and gets[1]["Range"].startswith("bytes=")
    assert gets[1]["IfMatch"] == s3_client.head_object(Bucket=s3_bucket, Key="blob")["ETag"]


def test_a_tar_shard_read_through_cuts_equals_a_clean_read(faulty, s3_endpoint, s3_client, s3_bucket):
    buf = io.BytesIO()
    rng = random.Random(4)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(6):
            payload = rng.randbytes(300_000)
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    s3_client.put_object(Bucket=s3_bucket, Key="00000.tar", Body=buf.getvalue())
    shard = Shard(0, ShardKind.TAR, (f"s3://{s3_bucket}/00000.tar",))
    clean = [(s.image_id, s.data) for s in read_shard(shard, S3Storage(endpoint_url=s3_endpoint))]
    faulty.script(*[Fault(RESET_GET, "/00000.tar")] * 3)
    assert [(s.image_id, s.data) for s in read_shard(shard, _storage(faulty))] == clean
    assert faulty.counts[RESET_GET] == 3


def test_a_seekable_read_retries_its_range(faulty, s3_client, s3_bucket):
    data = random.Random(5).randbytes(2 * 1024 * 1024)
    s3_client.put_object(Bucket=s3_bucket, Key="blob", Body=data)
    with _storage(faulty).open_seekable(f"s3://{s3_bucket}/blob") as stream:
        faulty.script(Fault(RESET_GET), Fault(SLOWDOWN), Fault(RESET_GET))
        stream.seek(1_000_000)
        assert stream.read(500_000) == data[1_000_000:1_500_000]
    assert (faulty.counts[RESET_GET], faulty.counts[SLOWDOWN]) == (2, 1)


def test_throttling_errors_and_delays_are_retried(faulty, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="k", Body=b"payload")
    storage = _storage(faulty)
    faulty.script(Fault(SLOWDOWN), Fault(INTERNAL_ERROR), Fault(DELAY), Fault(SLOWDOWN, "HEAD"))
    assert storage.read_bytes(f"s3://{s3_bucket}/k") == b"payload"
    assert storage.exists(f"s3://{s3_bucket}/k")
    assert {kind: faulty.counts[kind] for kind in (SLOWDOWN, INTERNAL_ERROR, DELAY)} == {
        SLOWDOWN: 2,
        INTERNAL_ERROR: 1,
        DELAY: 1,
    }


def test_retries_are_bounded_then_the_image_is_a_read_failed_row(s3_endpoint, s3_client, s3_bucket):
    data = random.Random(6).randbytes(100_000)
    s3_client.put_object(Bucket=s3_bucket, Key="cut.jpg", Body=data)
    s3_client.put_object(Bucket=s3_bucket, Key="tiny.jpg", Body=b"x")  # too short to cut
    with FaultyS3(s3_endpoint, rates={RESET_GET: 1.0}) as always_cut:
        storage = _storage(always_cut, read_attempts=3)
        with pytest.raises(TransientError, match="still failing after 3 attempts"):
            storage.read_bytes(f"s3://{s3_bucket}/cut.jpg")
        assert always_cut.counts[RESET_GET] == 3
        shard = Shard(0, ShardKind.FILES, (f"s3://{s3_bucket}/cut.jpg", f"s3://{s3_bucket}/tiny.jpg"))
        cut, tiny = read_shard(shard, storage)
    SEEN.update(always_cut.counts)
    assert cut.data is None and cut.error[0] == ErrorCode.READ_FAILED and "cut.jpg" in cut.error[1]
    assert tiny.data == b"x" and tiny.error is None


def test_a_missing_object_is_a_not_found_row_at_once(faulty, s3_bucket):
    storage = _storage(faulty)
    gets = _sends(storage, "GetObject")
    shard = Shard(0, ShardKind.FILES, (f"s3://{s3_bucket}/nowhere.jpg",))
    (sample,) = read_shard(shard, storage)
    assert sample.error[0] == ErrorCode.NOT_FOUND
    assert len(gets) == 1  # permanent: not retried


# -- writes ------------------------------------------------------------------------------------


def test_a_put_whose_reply_was_lost_is_written_once(faulty, s3_client, s3_bucket):
    storage = _storage(faulty)
    faulty.script(Fault(DROP_REPLY, "PUT"))
    storage.write_bytes(f"s3://{s3_bucket}/part", b"contents")
    assert faulty.counts[DROP_REPLY] == 1
    assert s3_client.get_object(Bucket=s3_bucket, Key="part")["Body"].read() == b"contents"


def test_a_conditional_create_whose_reply_was_lost_is_ours(faulty, s3_bucket):
    storage = _storage(faulty)
    puts = _sends(storage, "PutObject")
    gets = _sends(storage, "GetObject")
    uri = f"s3://{s3_bucket}/_lease.json"
    faulty.script(Fault(DROP_REPLY, "PUT"))
    # The retry meets the first PUT's object (412); its bytes are ours, so it was created here.
    assert storage.create_exclusive(uri, b'{"holder": "me"}')
    assert len(puts) == 2 and faulty.counts[DROP_REPLY] == 1 and gets == []  # settled by the ETag
    assert not storage.create_exclusive(uri, b'{"holder": "someone else"}')
    assert storage.read_bytes(uri) == b'{"holder": "me"}'


def test_a_compare_and_swap_whose_reply_was_lost_is_ours(faulty, s3_bucket):
    storage = _storage(faulty)
    uri = f"s3://{s3_bucket}/_lease.json"
    storage.create_exclusive(uri, b"v1")
    _, version = storage.read_with_version(uri)
    faulty.script(Fault(DROP_REPLY, "PUT"))
    assert storage.replace_if(uri, b"v2", version)
    assert faulty.counts[DROP_REPLY] == 1
    assert not storage.replace_if(uri, b"v3", version)
    assert storage.read_bytes(uri) == b"v2"


def test_a_multipart_upload_whose_completion_reply_was_lost(faulty, s3_client, s3_bucket):
    storage = _storage(faulty, multipart_threshold=MIN_PART_SIZE)
    gets = _sends(storage, "GetObject")
    data = random.Random(7).randbytes(11 * 1024 * 1024)
    faulty.script(Fault(DROP_REPLY, f"POST /{s3_bucket}/parts/big.parquet?uploadId="))
    # Completed, reply lost, retried, answered NoSuchUpload: the stored object is the check.
    storage.write_bytes(f"s3://{s3_bucket}/parts/big.parquet", data)
    assert faulty.counts[DROP_REPLY] == 1 and faulty.counts[NO_SUCH_UPLOAD] >= 1
    assert gets == []  # the ETag (MD5 of the parts' MD5s) settled it without a download
    assert s3_client.get_object(Bucket=s3_bucket, Key="parts/big.parquet")["Body"].read() == data
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_a_writer_killed_mid_upload_leaves_nothing_visible(s3_endpoint, s3_client, s3_bucket):
    # The endpoint holds the replies to the parts, so the writer is mid-upload when killed.
    with FaultyS3(s3_endpoint, delay_s=10) as slow:
        slow.script(*[Fault(DELAY, f"PUT /{s3_bucket}/out/parts/")] * 3)
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, sys; from loupe.workers.s3 import S3Storage, MIN_PART_SIZE;"
                " S3Storage(endpoint_url=sys.argv[1], multipart_threshold=MIN_PART_SIZE)"
                ".write_bytes(sys.argv[2], os.urandom(11 << 20))",
                slow.url,
                f"s3://{s3_bucket}/out/parts/part-00000.parquet",
            ]
        )
        try:
            deadline = time.monotonic() + 60
            while slow.counts[DELAY] == 0 and writer.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert slow.counts[DELAY] >= 1, "the writer never reached its parts"
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
    SEEN.update(slow.counts)
    storage = S3Storage(endpoint_url=s3_endpoint)
    assert not storage.exists(f"s3://{s3_bucket}/out/parts/part-00000.parquet")
    assert storage.abort_uploads(f"s3://{s3_bucket}/out") == 1
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


# -- everything at once ------------------------------------------------------------------------


def test_a_seeded_storm_of_every_fault_loses_and_duplicates_nothing(s3_endpoint, s3_client, s3_bucket):
    rates = {SLOWDOWN: 0.05, INTERNAL_ERROR: 0.05, RESET_GET: 0.15, DROP_REPLY: 0.15, DELAY: 0.05}
    with FaultyS3(s3_endpoint, seed=2026, rates=rates, delay_s=0.05) as storm:
        storm.script(*(Fault(kind) for kind in KINDS))  # each kind at least once
        storage = _storage(storm)
        rng = random.Random(8)
        images = {f"s3://{s3_bucket}/in/{i:03d}.jpg": rng.randbytes(rng.randrange(1, 200_000)) for i in range(40)}
        for uri, data in images.items():
            storage.write_bytes(uri, data)
        samples = list(read_shard(Shard(0, ShardKind.FILES, tuple(images)), storage, max_concurrency=8))
        record = f"s3://{s3_bucket}/out/_lease.json"
        assert storage.create_exclusive(record, b"0")
        for i in range(1, 15):
            data, version = storage.read_with_version(record)
            assert data == str(i - 1).encode()
            assert storage.replace_if(record, str(i).encode(), version)
    SEEN.update(storm.counts)
    assert [(s.source_uri, s.data, s.error) for s in samples] == [(u, d, None) for u, d in images.items()]
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="in/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(u.removeprefix(f"s3://{s3_bucket}/") for u in images)
    assert S3Storage(endpoint_url=s3_endpoint).read_bytes(record) == b"14"
    assert all(storm.counts[kind] >= 1 for kind in KINDS), storm.counts
