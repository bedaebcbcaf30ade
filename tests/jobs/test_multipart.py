"""A driver SIGKILLed while a part goes up to S3 in parts: no part visible; the next run aborts the upload and completes."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from typer.testing import CliRunner

from loupe.jobs.cli import app
from loupe.jobs.runner import run_job
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError
from loupe.schemas.layout import MANIFEST_FILE, part_path
from loupe.workers.faults import ENV as FAULTS_ENV
from loupe.workers.s3 import MIN_PART_SIZE, MULTIPART_THRESHOLD, PART_SIZE_ENV, S3Storage
from tests.jobs.outputs import assert_same, rows_of

PART_MIB = MIN_PART_SIZE >> 20  # the smallest part S3 (and moto) takes
ROWS_PER_FILE = 3  # one shard per Parquet file
NOTES_BYTES = 2 << 20  # random bytes per row, base64 in a text column: ~6 MiB parts, two upload parts each


@pytest.mark.parametrize("value", ["4", "0", "-5", "5.5", "five", "5121", "٥"])
def test_a_part_size_s3_does_not_take_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(PART_SIZE_ENV, value)
    with pytest.raises(UserError, match=rf"^{PART_SIZE_ENV} must be a whole number of MiB from 5 ") as refused:
        S3Storage()
    assert "\n" not in str(refused.value)


def test_the_part_size_setting(monkeypatch):
    monkeypatch.delenv(PART_SIZE_ENV, raising=False)
    assert S3Storage().multipart_threshold == MULTIPART_THRESHOLD
    monkeypatch.setenv(PART_SIZE_ENV, " 8 ")
    assert S3Storage().multipart_threshold == 8 << 20
    assert S3Storage(multipart_threshold=MIN_PART_SIZE).multipart_threshold == MIN_PART_SIZE  # a caller's own wins


def test_loupe_run_refuses_a_wrong_part_size_before_output_is_touched(s3_endpoint, s3_client, s3_bucket, sample_images, tiny_llava):
    result = CliRunner().invoke(
        app,
        ["run", str(sample_images), f"s3://{s3_bucket}/out", "--model", tiny_llava, "--endpoint-url", s3_endpoint],
        env={PART_SIZE_ENV: "4"},
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and PART_SIZE_ENV in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


@pytest.fixture(scope="module")
def wide_rows(sample_images, tmp_path_factory) -> Path:
    """Two Parquet files of three images each, every row carrying 2 MiB of random text (source metadata)."""
    folder = tmp_path_factory.mktemp("wide-rows")
    scenes = sorted(sample_images.glob("scene-*"))[: 2 * ROWS_PER_FILE]
    rng = random.Random(12)
    for n in range(2):
        chunk = scenes[n * ROWS_PER_FILE : (n + 1) * ROWS_PER_FILE]
        table = pa.table(
            {
                "image": [p.read_bytes() for p in chunk],
                "notes": [base64.b64encode(rng.randbytes(NOTES_BYTES)).decode() for _ in chunk],
            }
        )
        pq.write_table(table, folder / f"batch-{n}.parquet")
    return folder


def _replicas() -> set[psutil.Process]:
    """The replica actors' processes of this session's Ray cluster (started by this process)."""
    ours = os.getpid()
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            if (process.info["cmdline"] or [""])[0].startswith("ray::Replica") and ours in {
                p.pid for p in process.parents()
            }:
                found.add(process)
        except psutil.Error:  # gone meanwhile
            continue
    return found


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _open_uploads(s3_client, bucket: str) -> list[dict]:
    return s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_a_driver_killed_mid_multipart_upload_leaves_no_part_and_the_rerun_aborts_it(
    ray_cluster, s3_endpoint, s3_client, s3_bucket, wide_rows, tiny_llava, tmp_path
):
    output = f"s3://{s3_bucket}/out"
    settings = {"model": tiny_llava, "max_new_tokens": 4, "batch_size": 4, "tasks": "caption,moderate"}
    run_job(JobConfig(input=str(wide_rows), output=str(tmp_path / "clean"), **settings))
    clean = rows_of(tmp_path / "clean")

    command = [
        sys.executable, "-m", "loupe.jobs.cli", "run", str(wide_rows), output, "--model", tiny_llava,
        "--max-new-tokens", "4", "--batch-size", "4", "--tasks", "caption,moderate", "--replicas", "1",
        "--endpoint-url", s3_endpoint, "--ray-address", ray_cluster.address,
    ]  # fmt: skip
    # Set where `loupe run` runs only: the driver forwards it to the replicas, which write the parts.
    env = os.environ | {PART_SIZE_ENV: str(PART_MIB)}
    held = tmp_path / "tokens" / "held"
    plan = [{"point": "upload_part", "action": "hang", "match": "parts/part-00000", "seconds": 600, "token": str(held)}]
    before = _replicas()
    log = tmp_path / "killed-driver.log"  # a file, not a pipe nobody reads that could fill and stall the driver
    with log.open("wb") as stderr:
        driver = subprocess.Popen(command, env=env | {FAULTS_ENV: json.dumps(plan)}, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        while not Path(f"{held}.0").exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None and Path(f"{held}.0").exists(), log.read_text()[-3000:]
        replicas = _replicas() - before
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    assert replicas, "the job's replica was not found"
    # With its driver gone Ray ends the job's actors: the held upload can never complete later.
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in replicas) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in replicas), "the killed job's replica lives on"

    key = f"out/{part_path(0)}"
    left = _open_uploads(s3_client, s3_bucket)  # part 0's, and the other shard's if it was mid-upload too
    (upload,) = [u for u in left if u["Key"] == key]
    assert s3_client.list_parts(Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"])["Parts"], "no part was sent"
    with pytest.raises(ClientError, match="404|Not Found"):
        s3_client.head_object(Bucket=s3_bucket, Key=key)  # nothing visible for the shard
    with pytest.raises(ClientError, match="404|Not Found"):
        s3_client.head_object(Bucket=s3_bucket, Key=f"out/{MANIFEST_FILE}")

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    # The summary counts what the rerun's start-up sweep aborted: at least the killed part's. An
    # upload of the other shard's may instead be aborted when the rerun writes that same part.
    reported = re.search(r"(\d+) unfinished from an earlier run, aborted", rerun.stdout)
    assert reported and 1 <= int(reported.group(1)) <= len(left), rerun.stdout
    assert _open_uploads(s3_client, s3_bucket) == []
    with pytest.raises(ClientError, match="NoSuchUpload"):
        s3_client.list_parts(Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"])  # aborted, not completed
    head = s3_client.head_object(Bucket=s3_bucket, Key=key)
    parts = -(-head["ContentLength"] // MIN_PART_SIZE)
    assert parts >= 2 and head["ETag"].strip('"').endswith(f"-{parts}"), "the part went up in parts"
    assert_same(rows_of(output, s3_endpoint), clean, exact_scores=False)
