"""Where the job benchmark reads its images from: the local folder, or a fresh bucket on an S3 endpoint."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from loupe.schemas.errors import UserError

SOURCES = ("local", "s3")
_BUCKET = "loupe-bench"


@contextmanager
def image_source(
    kind: str, paths: list[Path], endpoint_url: str | None
) -> Iterator[tuple[str, str | None, Callable[[int], bytes]]]:
    """(input URI, endpoint URL, fetch(i) -> bytes of image i): the local folder, or a bucket on S3.

    S3 is a loopback endpoint started for the run (moto's server), or `endpoint_url`; either way
    the images go to a fresh bucket, removed with everything in it at the end.
    """
    if kind == "local":
        yield str(paths[0].parent), None, lambda i: paths[i].read_bytes()
        return
    # Any credentials do for the loopback endpoint; set before Ray starts so replicas inherit them.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "loupe-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "loupe-bench-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = None
    if endpoint_url is None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise UserError(
                "--source s3 starts a loopback S3 endpoint with moto's server (pip install 'moto[server]'); "
                "or point --endpoint-url at an S3-compatible endpoint"
            ) from None

        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        server.start()
        endpoint_url = f"http://127.0.0.1:{port}"
    try:
        with _bucket(endpoint_url, paths) as (uri, fetch):
            yield uri, endpoint_url, fetch
    finally:
        if server is not None:
            server.stop()


@contextmanager
def _bucket(endpoint_url: str, paths: list[Path]) -> Iterator[tuple[str, Callable[[int], bytes]]]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url)
    bucket = f"{_BUCKET}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        keys = [f"images/{path.name}" for path in paths]
        for key, path in zip(keys, paths, strict=True):
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())

        def fetch(i: int) -> bytes:
            return client.get_object(Bucket=bucket, Key=keys[i])["Body"].read()

        yield f"s3://{bucket}/images/", fetch
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            objects = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if objects:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
        client.delete_bucket(Bucket=bucket)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
