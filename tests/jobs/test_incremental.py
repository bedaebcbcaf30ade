"""A catalog that grows: reruns that report what INPUT gained, --incremental generations, removed objects."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from loupe.jobs import runner
from loupe.jobs.incremental import Diff, diff_listing, load_catalog
from loupe.jobs.planner import plan_objects, write_plan
from loupe.jobs.runner import run_job
from loupe.jobs.search import search
from loupe.jobs.status import job_status
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError
from loupe.schemas.layout import JOB_FILE, LEASE_FILE, MANIFEST_FILE, STATS_DIR
from loupe.schemas.records import JobRecord, Manifest
from loupe.workers.reader import image_id_for
from loupe.workers.storage import LocalStorage, ObjectInfo


def _config(input, output, clip, **kw):
    settings = {"input": str(input), "output": str(output), "tasks": "embed", "image_embedding_model": clip,
                "shard_size": 2, "batch_size": 4}
    return JobConfig(**(settings | kw))


def _manifest(output: Path) -> Manifest:
    return Manifest.from_json((output / MANIFEST_FILE).read_bytes())


def _visible_rows(output: Path, storage=None) -> dict:
    """image_id -> (status, error code, source, vector) of every row search may return."""
    from loupe.jobs.incremental import removed_rows

    manifest = _manifest(output)
    removed = removed_rows(storage or LocalStorage(), str(output), manifest)
    rows = {}
    for part in manifest.parts:
        for r in pq.read_table(output / part["path"]).to_pylist():
            if not removed.hides(part["path"], r["image_id"]):
                rows[r["image_id"]] = (r["status"], r["error_code"], r["source_uri"], r["image_embedding"])
    return rows


def _assert_same_rows(one: dict, other: dict) -> None:
    """Equal rows; vectors equal up to float noise (a batch of other images sums in another order)."""
    assert one.keys() == other.keys()
    for image_id, (*meta, vector) in one.items():
        assert meta == list(other[image_id][:3])
        assert (vector is None) == (other[image_id][3] is None)
        if vector is not None:
            assert np.allclose(vector, other[image_id][3], atol=1e-5)


def _no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a run with nothing to do")

    monkeypatch.setattr(runner, "connect_ray", refuse)
    monkeypatch.setattr(runner, "start_replicas", refuse)


def _copy(images, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for image in images:
        shutil.copy(image, folder / image.name)
    return folder


def _tar(path: Path, images: list[Path]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            tar.add(image, arcname=f"{i:04d}{image.suffix}")


def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


# -- the catalog and the diff, no Ray ----------------------------------------------------------


def test_diff_counts_new_removed_changed_against_the_plans(tmp_path):
    listing = [ObjectInfo(f"/in/{i:02d}.jpg", 10) for i in range(6)] + [ObjectInfo("/in/x.tar", 99)]
    write_plan(plan_objects(listing, 4), str(tmp_path / "_plan.parquet"))
    job = JobRecord(settings={}, listing_sha256="", objects=7, shards=3, created_at="now")
    catalog = load_catalog(LocalStorage(), str(tmp_path), job)
    assert len(catalog) == 7 and catalog.ids.itemsize == 16  # 16-byte ids, not URIs

    now = [o for o in listing if o.uri != "/in/02.jpg"] + [ObjectInfo("/in/06.jpg", 10), ObjectInfo("/in/y.tar", 5)]
    now[0] = ObjectInfo("/in/00.jpg", 11)  # changed size
    now.append(ObjectInfo("/in/notes.txt", 1))  # ignored, as in planning
    diff = Diff()
    wanted = [o.uri for o in diff_listing(sorted(now, key=lambda o: o.uri), catalog, diff)]
    assert wanted == ["/in/06.jpg", "/in/y.tar"]
    assert (diff.new, diff.removed, diff.changed, diff.unchanged) == (2, 1, 1, 5)
    assert diff.changed_examples == ["/in/00.jpg"]

    diff = Diff()
    replanned = [o.uri for o in diff_listing(sorted(now, key=lambda o: o.uri), catalog, diff, replan_changed=True)]
    assert replanned == ["/in/00.jpg", "/in/06.jpg", "/in/y.tar"] and len(diff.superseded) == 1


def test_plans_written_before_sizes_still_load(tmp_path):
    import pyarrow as pa

    old = pa.table({"shard_id": pa.array([0, 0], pa.int32()), "kind": ["files", "files"], "uri": ["/a.jpg", "/b.jpg"]})
    pq.write_table(old, tmp_path / "_plan.parquet")
    job = JobRecord(settings={}, listing_sha256="", objects=2, shards=1, created_at="now")
    catalog = load_catalog(LocalStorage(), str(tmp_path), job)
    diff = Diff()
    list(diff_listing([ObjectInfo("/a.jpg", 5), ObjectInfo("/b.jpg", 7)], catalog, diff))
    assert (diff.unchanged, diff.changed) == (2, 0)  # no size recorded: nothing to compare


def test_input_is_compared_as_the_place_it_names(tmp_path, monkeypatch):
    from loupe.schemas.config import normalize_location

    monkeypatch.chdir(tmp_path)
    assert JobConfig(input="photos/", output="out").input == str(tmp_path / "photos")
    assert normalize_location("./photos") == normalize_location(str(tmp_path / "photos") + "/")
    assert normalize_location("s3://b/p/") == normalize_location("s3://b/p") != normalize_location("s3://b/q")
    assert JobConfig(input="s3://b/p/", output="out").input == "s3://b/p/"  # listing keeps what was given


# -- whole jobs --------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_local_catalog_grows_by_new_objects_only(sample_images, tiny_clip, tmp_path, monkeypatch):
    scenes = sorted(sample_images.glob("scene-*"))
    photos, out = tmp_path / "photos", tmp_path / "out"
    _copy(scenes[:5], photos)
    first = run_job(_config(photos, out, tiny_clip))
    assert first.complete and first.shards_total == 3

    # INPUT grows by three loose images and a tar of two, and loses one image.
    _copy(scenes[5:8], photos)
    _tar(photos / "more.tar", scenes[8:10])
    gone = photos / scenes[1].name
    gone_id = image_id_for(str(gone))
    gone.unlink()

    # A plain rerun of the complete job lists INPUT, says what changed, starts no Ray, writes nothing.
    before = _mtimes(out)
    with monkeypatch.context() as patch:
        _no_ray(patch)
        plain = run_job(_config(photos, out, tiny_clip))
    assert plain.images_this_run == 0 and _mtimes(out) == before
    assert any("4 new, 1 removed" in n and "--incremental" in n for n in plain.notes), plain.notes

    grown = run_job(_config(photos, out, tiny_clip, incremental=True))
    assert grown.complete and grown.images_this_run == 5
    assert (grown.growth.diff.new, grown.growth.diff.removed, grown.growth.diff.unchanged) == (4, 1, 4)
    assert any("4 new, 1 removed, 4 unchanged; 5 images processed" in n for n in grown.notes), grown.notes
    new_stats = sorted(p.name for p in (out / STATS_DIR).iterdir())
    assert new_stats[3:] == ["shard-00003.json", "shard-00004.json", "shard-00005.json"]  # after the first 3
    manifest = _manifest(out)
    assert (manifest.generation, manifest.removed_objects, manifest.shards_total) == (2, 1, 6)
    assert any(n.startswith("image index extended") or "index rebuilt" in n for n in grown.notes)

    # Equal to one clean run over the final listing, minus the removed image.
    clean = tmp_path / "clean"
    run_job(_config(photos, clean, tiny_clip))
    _assert_same_rows(_visible_rows(out), _visible_rows(clean))
    assert gone_id not in _visible_rows(out)

    # Search finds a new image and never the removed one; status counts generations and removals.
    added = photos / scenes[6].name
    assert search(str(out), image=str(added), k=1)[0].image_id == image_id_for(str(added))
    hits = search(str(out), image=str(scenes[1]), k=8)
    assert gone_id not in {h.image_id for h in hits} and len(hits) == 8
    state = job_status(str(out))
    assert (state.generation, state.removed_objects, state.complete) == (2, 1, True)

    # Nothing new: quick, says so, writes nothing.
    before = _mtimes(out)
    with monkeypatch.context() as patch:
        _no_ray(patch)
        started = time.monotonic()
        idle = run_job(_config(photos, out, tiny_clip, incremental=True))
    assert time.monotonic() - started < 5 and _mtimes(out) == before
    assert any("nothing new" in n and "nothing written" in n for n in idle.notes), idle.notes


@pytest.mark.usefixtures("ray_cluster")
def test_s3_changed_object_reported_then_replanned(sample_images, tiny_clip, s3_client, s3_bucket, s3_endpoint):
    scenes = sorted(sample_images.glob("scene-*"))
    for image in scenes[:3]:
        s3_client.upload_file(str(image), s3_bucket, f"photos/{image.name}")
    config = _config(f"s3://{s3_bucket}/photos/", f"s3://{s3_bucket}/catalog/", tiny_clip, endpoint_url=s3_endpoint)
    assert run_job(config).complete

    s3_client.upload_file(str(scenes[3]), s3_bucket, f"photos/{scenes[3].name}")  # new
    s3_client.upload_file(str(scenes[4]), s3_bucket, f"photos/{scenes[0].name}")  # same key, other bytes
    s3_client.delete_object(Bucket=s3_bucket, Key=f"photos/{scenes[2].name}")  # removed
    plain = run_job(config)
    assert any("1 new, 1 removed, 1 unchanged, 1 changed" in n for n in plain.notes), plain.notes

    grown = run_job(config.model_copy(update={"incremental": True}))
    assert grown.images_this_run == 1
    assert any("1 changed objects not processed again (--replan-changed does)" in n for n in grown.notes)

    changed_uri = f"s3://{s3_bucket}/photos/{scenes[0].name}"
    replanned = run_job(config.model_copy(update={"incremental": True, "replan_changed": True}))
    assert replanned.images_this_run == 1 and replanned.complete

    def get(key):
        return s3_client.get_object(Bucket=s3_bucket, Key=f"catalog/{key}")["Body"].read()

    manifest = Manifest.from_json(get(MANIFEST_FILE))
    assert manifest.generation == 3 and manifest.removed_objects == 1
    assert sum(entry["objects"] for entry in manifest.removed) == 2  # the gone one, and the changed one's old row
    hits = search(config.output, image=str(scenes[4]), k=1, endpoint_url=s3_endpoint)
    assert hits[0].image_id == image_id_for(changed_uri)
    assert sum(h.image_id == image_id_for(changed_uri) for h in search(config.output, image=str(scenes[4]), k=3, endpoint_url=s3_endpoint)) == 1
    assert job_status(config.output, s3_endpoint).removed_objects == 1


@pytest.mark.usefixtures("ray_cluster")
def test_mismatched_setting_refused_and_relative_input_resumes(sample_images, tiny_clip, tmp_path, monkeypatch):
    photos, out = tmp_path / "photos", tmp_path / "out"
    _copy(sorted(sample_images.glob("scene-*"))[:2], photos)
    run_job(_config(photos, out, tiny_clip))
    with pytest.raises(UserError, match="different job .*shard_size"):
        run_job(_config(photos, out, tiny_clip, shard_size=3, incremental=True))

    # A job recorded by an older loupe with a relative INPUT is the same job given absolutely.
    record = json.loads((out / JOB_FILE).read_text())
    record["settings"]["input"] = os.path.relpath(photos)
    (out / JOB_FILE).write_text(json.dumps(record))
    with monkeypatch.context() as patch:
        _no_ray(patch)
        again = run_job(_config(photos, out, tiny_clip))
    assert again.complete and any("INPUT is unchanged" in n for n in again.notes)


@pytest.mark.usefixtures("ray_cluster")
def test_killed_before_the_job_record_then_resumed(sample_images, tiny_clip, tmp_path, monkeypatch):
    scenes = sorted(sample_images.glob("scene-*"))
    photos, out = tmp_path / "photos", tmp_path / "out"
    _copy(scenes[:2], photos)
    run_job(_config(photos, out, tiny_clip))
    _copy(scenes[2:5], photos)

    from loupe.jobs import incremental

    real = incremental.write_record

    def die(storage, output, path, record):
        raise KeyboardInterrupt  # killed between the generation's files and its job record

    monkeypatch.setattr(incremental, "write_record", die)
    with pytest.raises(KeyboardInterrupt):
        run_job(_config(photos, out, tiny_clip, incremental=True))
    monkeypatch.setattr(incremental, "write_record", real)
    assert JobRecord.from_json((out / JOB_FILE).read_bytes()).generation == 1
    result = run_job(_config(photos, out, tiny_clip, incremental=True))
    assert result.complete and result.images_this_run == 3 and _manifest(out).generation == 2


def test_sigkill_during_incremental_run_then_plain_rerun(ray_cluster, sample_images, tiny_clip, tmp_path):
    scenes = sorted(sample_images.glob("scene-*"))
    photos, out, clean = tmp_path / "photos", tmp_path / "out", tmp_path / "clean"
    _copy(scenes[:2], photos)
    args = ["--tasks", "embed", "--image-embedding-model", tiny_clip, "--shard-size", "1", "--replicas", "1",
            "--ray-address", ray_cluster.address]
    command = [sys.executable, "-m", "loupe.jobs.cli", "run", str(photos), str(out), *args]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    _copy(scenes[2:12], photos)

    process = subprocess.Popen([*command, "--incremental"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if len(list((out / STATS_DIR).iterdir())) >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert _manifest(out).generation == 1  # readers still see the first generation whole
    # The killed driver's lease would block the rerun until it expires (tests/jobs/test_lease.py).
    (out / LEASE_FILE).unlink()

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming generation 2's frozen plan" in rerun.stderr
    run_job(_config(photos, clean, tiny_clip, shard_size=1))
    assert _manifest(out).generation == 2
    _assert_same_rows(_visible_rows(out), _visible_rows(clean))
