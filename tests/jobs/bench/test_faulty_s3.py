"""The fault-injecting S3 endpoint itself: it forwards faithfully, does each fault as described, and counts them."""

from __future__ import annotations

import random
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError

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


@pytest.fixture
def proxy(s3_endpoint):
    with FaultyS3(s3_endpoint, delay_s=0.3) as faults:
        yield faults


def _client(url: str):
    """A client that does not retry, so each fault reaches the test."""
    config = Config(retries={"mode": "standard", "total_max_attempts": 1})
    return boto3.session.Session().client("s3", endpoint_url=url, region_name="us-east-1", config=config)


def test_without_faults_it_is_the_server(proxy, s3_bucket):
    client = _client(proxy.url)
    data = random.Random(1).randbytes(6 * 1024 * 1024)  # large enough for Expect: 100-continue
    client.put_object(Bucket=s3_bucket, Key="a/x", Body=data)
    assert client.get_object(Bucket=s3_bucket, Key="a/x")["Body"].read() == data
    assert client.get_object(Bucket=s3_bucket, Key="a/x", Range="bytes=5-9")["Body"].read() == data[5:10]
    assert client.head_object(Bucket=s3_bucket, Key="a/x")["ContentLength"] == len(data)
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["a/x"]
    client.delete_object(Bucket=s3_bucket, Key="a/x")
    with pytest.raises(ClientError, match="404"):
        client.head_object(Bucket=s3_bucket, Key="a/x")
    assert proxy.requests == 7 and sum(proxy.counts.values()) == 0


@pytest.mark.parametrize(("kind", "status", "code"), [(SLOWDOWN, 503, "SlowDown"), (INTERNAL_ERROR, 500, "InternalError")])
def test_error_replies_are_s3_errors_and_never_reach_the_server(proxy, s3_client, s3_bucket, kind, status, code):
    client = _client(proxy.url)
    proxy.script(Fault(kind, "PUT"), Fault(kind, "HEAD"))
    with pytest.raises(ClientError) as caught:
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"data")
    error = caught.value.response
    assert (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]) == (code, status)
    assert "Contents" not in s3_client.list_objects_v2(Bucket=s3_bucket)  # not applied
    with pytest.raises(ClientError, match=str(status)):
        client.head_object(Bucket=s3_bucket, Key="k")  # no body for a HEAD: the status says it
    assert proxy.counts == {kind: 2}


def test_reset_get_sends_half_the_body_then_closes(proxy, s3_client, s3_bucket):
    data = bytes(range(256)) * 1000
    s3_client.put_object(Bucket=s3_bucket, Key="k", Body=data)
    proxy.script(Fault(RESET_GET, "/k"))
    body = _client(proxy.url).get_object(Bucket=s3_bucket, Key="k")["Body"]  # the headers arrive whole
    assert body.read(1000) == data[:1000]
    with pytest.raises(HTTPClientError):  # botocore's ResponseStreamingError
        body.read()
    assert proxy.counts == {RESET_GET: 1}


def test_drop_reply_applies_the_write_and_never_answers(proxy, s3_client, s3_bucket):
    proxy.script(Fault(DROP_REPLY, "GET"), Fault(DROP_REPLY, "PUT"))  # a GET is never dropped
    with pytest.raises(HTTPClientError):  # botocore's ConnectionClosedError
        _client(proxy.url).put_object(Bucket=s3_bucket, Key="k", Body=b"landed")
    assert s3_client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"landed"
    assert proxy.counts == {DROP_REPLY: 1}


def test_a_completed_upload_whose_reply_was_dropped_is_gone_afterwards(proxy, s3_client, s3_bucket):
    client = _client(proxy.url)
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="big")["UploadId"]
    etag = client.upload_part(Bucket=s3_bucket, Key="big", UploadId=upload, PartNumber=1, Body=b"p")["ETag"]
    parts = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
    proxy.script(Fault(DROP_REPLY, "POST"))
    for _ in range(2):
        with pytest.raises((HTTPClientError, ClientError)) as caught:
            client.complete_multipart_upload(Bucket=s3_bucket, Key="big", UploadId=upload, MultipartUpload=parts)
    assert caught.value.response["Error"]["Code"] == "NoSuchUpload"  # as S3 answers the retry
    assert s3_client.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == b"p"
    assert proxy.counts == {DROP_REPLY: 1, NO_SUCH_UPLOAD: 1}


def test_delay_holds_the_reply(proxy, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    proxy.script(Fault(DELAY))
    started = time.monotonic()
    assert _client(proxy.url).get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"
    assert time.monotonic() - started >= 0.3
    assert proxy.counts == {DELAY: 1}


def test_a_seed_gives_the_same_schedule(s3_endpoint):
    rates = {kind: 0.1 for kind in KINDS}
    requests = [(random.Random(i).choice(["GET", "PUT", "HEAD", "POST"]), f"/b/{i}") for i in range(300)]

    def schedule(seed: int) -> list[str | None]:
        proxy = FaultyS3(s3_endpoint, seed=seed, rates=rates)
        try:
            return [proxy.choose(method, path) for method, path in requests]
        finally:
            proxy.stop()

    first = schedule(5)
    assert first == schedule(5) != schedule(6)
    faulted = [(request, kind) for request, kind in zip(requests, first) if kind]
    assert {kind for _, kind in faulted} == set(KINDS)
    assert all(method == "GET" for (method, _), kind in faulted if kind == RESET_GET)
    assert all(method in ("PUT", "POST") for (method, _), kind in faulted if kind == DROP_REPLY)
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultyS3(s3_endpoint, rates={"meteor": 1.0})
