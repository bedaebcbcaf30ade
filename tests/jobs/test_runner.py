"""Whole jobs on the session's two-node Ray cluster: output contract, resume, failures, S3."""

import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from loupe.jobs.runner import run_job
from loupe.jobs.status import job_status
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError
from loupe.schemas.layout import JOB_FILE, MANIFEST_FILE, STATS_DIR
from loupe.schemas.records import Manifest, ShardStats

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _config(input, output, model, **kw):
    settings = dict(
        input=str(input), output=str(output), model=model, max_new_tokens=4, batch_size=4, shard_size=4,
        tasks="caption,moderate",
    )
    return JobConfig(**(settings | kw))


def _rows(output: Path):
    manifest = Manifest.from_json((output / MANIFEST_FILE).read_bytes())
    rows = []
    for part in manifest.parts:
        rows += pq.read_table(output / part["path"]).to_pylist()
    return rows


def _comparable(rows):
    return sorted((r["image_id"], r["status"], r["error_code"], r["caption"], r["shard_id"]) for r in rows)


def test_job_output_contract_and_both_nodes(sample_images, tiny_llava, tmp_path):
    out = tmp_path / "out"
    result = run_job(_config(sample_images, out, tiny_llava, replicas=2))

    assert result.complete and (result.shards_total, result.rows_ok, result.rows_error) == (4, 12, 2)
    assert result.error_codes == {"empty_file": 1, "truncated": 1}
    assert len(result.nodes) == 2, "two replicas on a two-node cluster should both have worked"
    job = json.loads((out / JOB_FILE).read_text())
    assert job["settings"]["model"] == tiny_llava and job["shards"] == 4 and job["objects"] == 14

    manifest = Manifest.from_json((out / MANIFEST_FILE).read_bytes())
    assert manifest.complete and [p["path"] for p in manifest.parts] == [
        f"parts/part-{i:05d}.parquet" for i in range(4)
    ]
    import hashlib

    for part in manifest.parts:
        data = (out / part["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        assert pq.read_metadata(io.BytesIO(data)).num_rows == part["rows"]
    rows = _rows(out)
    assert len({r["image_id"] for r in rows}) == 14
    assert not list(out.rglob("*.tmp*")), "no temporary files may be left behind"

    state = job_status(str(out))
    assert (state.shards_done, state.shards_total, state.rows_ok, state.rows_error, state.complete) == (
        4, 4, 12, 2, True,
    )
    assert state.images_per_second > 0


def test_rerun_resumes_and_different_plan_is_refused(sample_images, tiny_llava, tmp_path):
    out = tmp_path / "out"
    config = _config(sample_images, out, tiny_llava)
    run_job(config)
    clean = _comparable(_rows(out))

    # Lose two shards as a crash would (part written, stats not; or nothing at all).
    for shard_id in (1, 3):
        (out / STATS_DIR / f"shard-{shard_id:05d}.json").unlink()
    (out / "parts" / "part-00003.parquet").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    again = run_job(config.model_copy(update={"replicas": 2}))  # speed knobs may change
    assert (again.shards_skipped, again.images_this_run, again.complete) == (2, 6, True)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert _comparable(_rows(out)) == clean

    nothing = run_job(config)
    assert (nothing.shards_skipped, nothing.images_this_run) == (4, 0)

    with pytest.raises(UserError, match="different job .*prompt"):
        run_job(config.model_copy(update={"prompt": "What is this?"}))
    fresh = run_job(config.model_copy(update={"prompt": "What is this?", "overwrite": True}))
    assert fresh.shards_skipped == 0 and fresh.complete
    assert {r["prompt"] for r in _rows(out)} == {"What is this?"}


def _tar(path: Path, images: list[Path]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            tar.add(image, arcname=f"{i:04d}{image.suffix}")
            text = f"alt text {i}".encode()
            info = tarfile.TarInfo(f"{i:04d}.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))


def test_bad_shard_is_retried_then_reported(sample_images, tiny_llava, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    scenes = sorted(sample_images.glob("scene-*"))
    _tar(folder / "a.tar", scenes[:3])
    good = (folder / "a.tar").read_bytes()
    (folder / "b.tar").write_bytes(good[: len(good) // 2 + 100])  # cut mid-member
    out = tmp_path / "out"
    result = run_job(_config(folder, out, tiny_llava, max_shard_retries=1))

    assert not result.complete and result.shards_done == 1
    (failure,) = result.failures
    assert failure.shard_id == 1 and failure.attempts == 2 and failure.error
    rows = _rows(out)
    assert len(rows) == 3 and {r["source_metadata"][0][0] for r in rows} == {"txt"}
    state = job_status(str(out))
    assert not state.complete and [f["shard_id"] for f in state.failed_shards] == [1]
    manifest = Manifest.from_json((out / MANIFEST_FILE).read_bytes())
    assert not manifest.complete and manifest.failed_shards == [1] and len(manifest.parts) == 1

    # The user replaces the broken tar; the rerun retries only the failed shard.
    (folder / "b.tar").write_bytes(good)
    fixed = run_job(_config(folder, out, tiny_llava))
    assert fixed.complete and fixed.images_this_run == 3 and not job_status(str(out)).failed_shards


def test_replica_killed_mid_job_is_restarted_and_its_shards_retried(sample_images, tiny_llava, tmp_path):
    import psutil

    out = tmp_path / "out"
    config = _config(sample_images, out, tiny_llava, shard_size=1, replicas=1, max_new_tokens=8)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run_job(config)))
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / STATS_DIR).glob("*.json")) if (out / STATS_DIR).exists() else []) < 1:
        time.sleep(0.05)
    # Ray titles an actor's process after its class; only this session's cluster (started by
    # this process) counts, not another Ray job on the same machine.
    ours = os.getpid()
    (replica,) = [
        p
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith("ray::Replica") and ours in {a.pid for a in p.parents()}
    ]
    os.kill(replica.pid, signal.SIGKILL)
    thread.join(timeout=300)

    result = outcome["result"]
    assert result.complete and result.rows_ok + result.rows_error == 14
    attempts = [ShardStats.from_json(p.read_bytes()).attempt for p in (out / STATS_DIR).glob("*.json")]
    assert max(attempts) == 2, "the shards in flight on the killed replica were retried"
    assert len({r["image_id"] for r in _rows(out)}) == 14


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": "/nonexistent/loupe/input"}, "no such file or folder"),
        ({"model": "/nonexistent/loupe/model"}, "not found"),
        ({"input": "EMPTY"}, "no images"),
    ],
)
def test_user_mistakes_leave_no_output(sample_images, tiny_llava, tmp_path, change, message):
    if change.get("input") == "EMPTY":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "README.txt").write_text("nothing here")
        change = {"input": str(tmp_path / "empty")}
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        run_job(_config(sample_images, out, tiny_llava).model_copy(update=change))
    assert not out.exists()


def test_s3_input_and_output(sample_images, tiny_llava, tmp_path, s3_client, s3_bucket, s3_endpoint):
    scenes = sorted(sample_images.glob("scene-*"))[:5]
    for image in scenes:
        s3_client.upload_file(str(image), s3_bucket, f"photos/loose/{image.name}")
    _tar(tmp_path / "shard.tar", scenes[:2])
    s3_client.upload_file(str(tmp_path / "shard.tar"), s3_bucket, "photos/shard.tar")
    s3_client.put_object(Bucket=s3_bucket, Key="photos/loose/broken.jpg", Body=b"not a jpeg")

    config = _config(
        f"s3://{s3_bucket}/photos/", f"s3://{s3_bucket}/catalog/", tiny_llava, endpoint_url=s3_endpoint
    )
    result = run_job(config)
    assert result.complete and (result.rows_ok, result.rows_error) == (7, 1)

    def get(key):
        return s3_client.get_object(Bucket=s3_bucket, Key=f"catalog/{key}")["Body"].read()

    manifest = Manifest.from_json(get(MANIFEST_FILE))
    rows = [r for p in manifest.parts for r in pq.read_table(io.BytesIO(get(p["path"]))).to_pylist()]
    assert {r["source_uri"] for r in rows} >= {f"s3://{s3_bucket}/photos/loose/{s.name}" for s in scenes}
    assert sum(r["source_uri"].startswith(f"s3://{s3_bucket}/photos/shard.tar#") for r in rows) == 2
    assert job_status(config.output, s3_endpoint).complete
    assert run_job(config).shards_skipped == manifest.shards_total


def test_separate_moderation_replica_and_flagged_counts(sample_images, tiny_llava, tmp_path):
    from loupe.schemas.taxonomy import Category, Taxonomy
    from loupe.workers.models.random import build_random_model

    judge = str(build_random_model(tmp_path / "judge", "llava-onevision", "tiny", seed=1))
    # Thresholds of 0 and 1 make the flags certain whatever random weights say.
    taxonomy = Taxonomy((Category("violence_gore", "blood or gore", 0.0), Category("weapons", "a weapon", 1.0)))
    out = tmp_path / "out"
    config = _config(sample_images, out, tiny_llava, moderation_model=judge, taxonomy=taxonomy, replicas=1)
    result = run_job(config)

    assert result.complete and result.rows_flagged == 12 and result.flagged == {"violence_gore": 12}
    rows = [r for r in _rows(out) if r["status"] == "ok"]
    assert {r["moderation_model"] for r in rows} == {judge}
    assert all(r["caption"] and r["flagged_categories"] == ["violence_gore"] for r in rows)
    scores = {r["moderation"]["weapons"] for r in rows}
    assert len(scores) > 1 and all(0 < s < 1 for s in scores), "the judge scored each image"
    state = job_status(str(out))
    assert state.rows_flagged == 12 and state.flagged == {"violence_gore": 12, "weapons": 0}
    job = json.loads((out / JOB_FILE).read_text())
    assert job["settings"]["moderation_model"] == judge
    assert job["settings"]["taxonomy_sha256"] == taxonomy.content_hash()
