"""Whole jobs under injected faults (a fault plan in LOUPE_FAULTS, a second driver, a lost node): output equal to a clean run's."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from loupe.jobs.lease import LeaseHeld
from loupe.jobs.runner import run_job
from loupe.jobs.scheduler import JobStopped
from loupe.schemas.config import JobConfig
from loupe.schemas.layout import FAILED_DIR, LEASE_FILE, MANIFEST_FILE, STATS_DIR
from loupe.schemas.records import Manifest, ShardStats
from loupe.workers.faults import ENV

from loupe.jobs.bench.faulty_s3 import (
    DELAY,
    DROP_REPLY,
    INTERNAL_ERROR,
    RESET_GET,
    SLOWDOWN,
    Fault,
    FaultyS3,
)
from tests.jobs.outputs import assert_same, rows_of

pytestmark = pytest.mark.usefixtures("ray_cluster")


def config(input, output, model, **kw) -> JobConfig:
    settings = dict(
        input=str(input), output=str(output), model=model, max_new_tokens=4, batch_size=4, shard_size=4,
        tasks="caption,moderate",
    )
    return JobConfig(**(settings | kw))


def stats_of(output: Path) -> list[ShardStats]:
    return [ShardStats.from_json(p.read_bytes()) for p in sorted((output / STATS_DIR).glob("shard-*.json"))]


@pytest.fixture(scope="module")
def clean(sample_images, tiny_llava, tmp_path_factory):
    """The rows of a clean run, which every faulty run must equal."""
    out = tmp_path_factory.mktemp("clean") / "out"
    run_job(config(sample_images, out, tiny_llava))
    return rows_of(out)


def faults(monkeypatch, *rules) -> None:
    monkeypatch.setenv(ENV, json.dumps(list(rules)))


def test_out_of_memory_splits_batches_and_loses_nothing(monkeypatch, sample_images, tiny_llava, tmp_path, clean):
    faults(monkeypatch, {"point": "model", "action": "oom", "min_batch": 2})  # every batch of 2+ runs out
    out = tmp_path / "out"
    result = run_job(config(sample_images, out, tiny_llava, replicas=1))
    assert result.complete
    assert_same(rows_of(out), clean, exact_scores=False)
    stats = stats_of(out)
    assert sum(s.oom_splits for s in stats) >= 3 and {s.batch_size for s in stats} == {1}
    assert "model_failed" not in result.error_codes


def test_a_hung_model_call_is_noticed_and_the_shard_runs_elsewhere(monkeypatch, sample_images, tiny_llava, tmp_path, clean):
    token = tmp_path / "tokens" / "hang"
    faults(monkeypatch, {"point": "model", "action": "hang", "match": "scene-005", "seconds": 600, "token": str(token)})
    out = tmp_path / "out"
    result = run_job(config(sample_images, out, tiny_llava, replicas=2, shard_timeout_s=6))
    assert result.complete and result.hung_replicas == 1
    assert_same(rows_of(out), clean)
    assert "--shard-timeout" in result.shard_timeout
    assert max(s.attempt for s in stats_of(out)) == 2


def test_retry_errors_redoes_only_transient_rows_in_their_parts(monkeypatch, sample_images, tiny_llava, tmp_path, clean):
    faults(monkeypatch, {"point": "read", "action": "read_failed", "match": "scene-002"},
           {"point": "read", "action": "read_failed", "match": "scene-007"})
    out = tmp_path / "out"
    first = run_job(config(sample_images, out, tiny_llava))
    assert first.complete and first.error_codes.get("read_failed") == 2
    touched = {r[4] for r in rows_of(out) if r[2] == "read_failed"}
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    monkeypatch.delenv(ENV)

    again = run_job(config(sample_images, out, tiny_llava, retry_errors=True))
    assert again.complete and again.rows_retried == 2 and "read_failed" not in again.error_codes
    assert_same(rows_of(out), clean, exact_scores=False)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    changed = {int(name[5:10]) for name in after if after[name] != before[name]}
    assert changed == touched, "only the parts that held transient rows are rewritten"
    manifest = Manifest.from_json((out / MANIFEST_FILE).read_bytes())
    assert manifest.rows_error == 2 and all(
        p["sha256"] == s.part_sha256 for p, s in zip(manifest.parts, stats_of(out), strict=True)
    )
    assert not list(out.rglob("*.tmp"))


def test_a_full_output_stops_the_job_in_one_line_and_a_rerun_completes(monkeypatch, sample_images, tiny_llava, tmp_path, clean):
    token = tmp_path / "tokens" / "full"
    faults(monkeypatch, {"point": "write", "action": "enospc", "token": str(token), "times": 100})
    out = tmp_path / "out"
    with pytest.raises(JobStopped, match=r"^OUTPUT is full: .*No space left on device") as stopped:
        run_job(config(sample_images, out, tiny_llava, replicas=1, max_shard_retries=3))
    assert "\n" not in str(stopped.value)
    # One replica runs two shards at once: at most those two met the full disk, none was retried.
    assert 1 <= len(list(token.parent.iterdir())) <= 2
    assert not (out / "parts").exists() or not list((out / "parts").iterdir()), "nothing half-written is visible"
    assert not (out / MANIFEST_FILE).exists() and not (out / LEASE_FILE).exists()
    monkeypatch.delenv(ENV)  # space freed
    assert run_job(config(sample_images, out, tiny_llava)).complete
    assert_same(rows_of(out), clean)
    assert not (out / FAILED_DIR).exists() or not list((out / FAILED_DIR).iterdir())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_on_one_output_one_is_refused(where, request, sample_images, tiny_llava, tmp_path, clean):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        out, endpoint = f"s3://{bucket}/out", request.getfixturevalue("s3_endpoint")
    else:
        out, endpoint = str(tmp_path / "out"), None
    job = config(sample_images, out, tiny_llava, endpoint_url=endpoint)
    outcomes: list = []
    start = threading.Barrier(2)

    def drive():
        start.wait(timeout=30)
        try:
            outcomes.append(run_job(job))
        except LeaseHeld as exc:
            outcomes.append(exc)

    drivers = [threading.Thread(target=drive) for _ in range(2)]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join(timeout=300)
    refused = [o for o in outcomes if isinstance(o, LeaseHeld)]
    assert len(outcomes) == 2 and len(refused) == 1, outcomes
    message = str(refused[0])
    assert "\n" not in message and "in use by another loupe run" in message and "last renewed" in message
    assert_same(rows_of(out, endpoint), clean)  # INPUT is the same local folder: the same image ids


def test_a_node_lost_mid_job(ray_cluster, sample_images, tiny_llava, tmp_path, clean):
    # A third node for this test alone: the session's two are left as they were.
    node = ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    lost = threading.Event()

    class RemoveOnFirstShard:
        def started(self, *args):
            pass

        def shard_done(self, stats):
            if not lost.is_set():
                lost.set()
                ray_cluster.remove_node(node)

        def shard_failed(self, failure):
            pass

        def __getattr__(self, name):  # any other progress call the runner makes
            return lambda *args, **kwargs: None

    out = tmp_path / "out"
    try:
        result = run_job(config(sample_images, out, tiny_llava, replicas=3, shard_size=2), RemoveOnFirstShard())
    finally:
        if not lost.is_set():
            ray_cluster.remove_node(node)
    assert lost.is_set() and result.complete
    # Shards of two here (shard ids and batches differ from the clean run's): the rest must be equal.
    assert_same([(*r[:4], 0, r[5]) for r in rows_of(out)], [(*r[:4], 0, r[5]) for r in clean], exact_scores=False)


def test_a_job_on_a_misbehaving_s3_equals_a_clean_run(s3_client, s3_bucket, s3_endpoint, sample_images, tiny_llava):
    for path in sorted(sample_images.iterdir()):
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{path.name}", Body=path.read_bytes())
    source = f"s3://{s3_bucket}/in/"
    run_job(config(source, f"s3://{s3_bucket}/clean", tiny_llava, endpoint_url=s3_endpoint))
    rates = {SLOWDOWN: 0.04, INTERNAL_ERROR: 0.04, RESET_GET: 0.08, DROP_REPLY: 0.08, DELAY: 0.04}
    with FaultyS3(s3_endpoint, seed=3, rates=rates, delay_s=0.05) as proxy:
        # Beside the seeded schedule (whose draws follow the order concurrent requests come in),
        # an image read reset and an output write applied but unanswered, whatever the order.
        proxy.script(Fault(RESET_GET, f"GET /{s3_bucket}/in/"), Fault(DROP_REPLY, f"PUT /{s3_bucket}/faulty/"))
        result = run_job(config(source, f"s3://{s3_bucket}/faulty", tiny_llava, endpoint_url=proxy.url))
    print(f"\nfaults met by the job on S3: {dict(sorted(proxy.counts.items()))} in {proxy.requests} requests")
    assert result.complete and "read_failed" not in result.error_codes
    assert sum(proxy.counts.values()) >= 5 and proxy.counts[RESET_GET] >= 1 and proxy.counts[DROP_REPLY] >= 1
    # The same source URIs, so the same image ids: rows equal to the letter.
    assert rows_of(f"s3://{s3_bucket}/faulty", s3_endpoint) == rows_of(f"s3://{s3_bucket}/clean", s3_endpoint)
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
