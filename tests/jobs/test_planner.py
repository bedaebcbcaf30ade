"""Shard planning as a pure function of the listing, and the plan file round trip."""

from dataclasses import dataclass

import pytest
from loupe.jobs.planner import PlanSummary, kind_of, plan_shards, read_plan, write_plan
from loupe.schemas.plan import ShardKind


@dataclass
class Obj:
    uri: str
    size: int = 1


def test_loose_images_grouped_in_listing_order():
    listing = [Obj(f"in/{i:03d}.jpg") for i in range(7)]
    shards = list(plan_shards(listing, shard_size=3))
    assert [s.shard_id for s in shards] == [0, 1, 2]
    assert [len(s.uris) for s in shards] == [3, 3, 1]
    assert [u for s in shards for u in s.uris] == [o.uri for o in listing]
    assert all(s.kind is ShardKind.FILES for s in shards)


def test_containers_are_one_shard_each_and_others_ignored():
    listing = [Obj("a.jpg"), Obj("b.tar"), Obj("c.PNG"), Obj("d.parquet"), Obj("notes.txt"), Obj("e.jpeg")]
    summary = PlanSummary()
    shards = list(plan_shards(listing, shard_size=2, summary=summary))
    assert [(s.kind, s.uris) for s in shards] == [
        (ShardKind.TAR, ("b.tar",)),
        (ShardKind.FILES, ("a.jpg", "c.PNG")),
        (ShardKind.PARQUET, ("d.parquet",)),
        (ShardKind.FILES, ("e.jpeg",)),
    ]
    assert (summary.shards, summary.objects, summary.ignored) == (4, 5, 1)


def test_same_listing_same_plan_and_fingerprint():
    listing = [Obj(f"x/{i}.webp", size=i) for i in range(10)]
    one, two = PlanSummary(), PlanSummary()
    assert list(plan_shards(listing, 4, one)) == list(plan_shards(listing, 4, two))
    assert one.listing_sha256 == two.listing_sha256
    changed = PlanSummary()
    list(plan_shards(listing[:-1] + [Obj("x/9.webp", size=99)], 4, changed))
    assert changed.listing_sha256 != one.listing_sha256


def test_empty_listing_and_bad_size():
    assert list(plan_shards([], 5)) == []
    with pytest.raises(ValueError):
        list(plan_shards([Obj("a.jpg")], 0))


def test_kind_of_is_by_extension():
    assert kind_of("s3://b/p/x.TAR") is ShardKind.TAR
    assert kind_of("/a/b.c/noext") is None
    assert kind_of("/a/img.tif") is ShardKind.FILES


def test_plan_file_round_trip(tmp_path):
    listing = [Obj(f"in/{i:04d}.jpg") for i in range(150_001)] + [Obj("z.tar")]
    shards = list(plan_shards(listing, shard_size=1000))
    path = tmp_path / "_plan.parquet"
    write_plan(iter(shards), str(path))
    assert list(read_plan(str(path))) == shards


def test_record_names_ignore_leftover_temp_files():
    from loupe.schemas.layout import shard_id_from_path

    assert shard_id_from_path("s3://b/out/_stats/shard-00042.json") == 42
    assert shard_id_from_path("/out/_stats/.shard-00002.json.fdcdfbf0545a.tmp") is None


def test_next_generation_numbers_shards_after_the_existing_ones():
    listing = [Obj("n/a.jpg"), Obj("n/b.tar"), Obj("n/c.jpg"), Obj("n/d.jpg")]
    shards = list(plan_shards(listing, shard_size=2, first_shard=7))
    assert [(s.shard_id, s.kind, s.uris) for s in shards] == [
        (7, ShardKind.TAR, ("n/b.tar",)),
        (8, ShardKind.FILES, ("n/a.jpg", "n/c.jpg")),
        (9, ShardKind.FILES, ("n/d.jpg",)),
    ]


def test_plan_file_keeps_sizes_and_etags_and_old_plans_still_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from loupe.jobs.planner import plan_objects

    @dataclass
    class S3Obj:
        uri: str
        size: int
        etag: str

    path = tmp_path / "_plan.parquet"
    listing = [S3Obj("s3://b/x.jpg", 5, '"abc"'), S3Obj("s3://b/y.jpg", 6, "")]
    write_plan(plan_objects(listing, 10), str(path))
    table = pq.read_table(path)
    assert table.column("size").to_pylist() == [5, 6] and table.column("etag").to_pylist() == ['"abc"', ""]
    assert [s.uris for s in read_plan(str(path))] == [("s3://b/x.jpg", "s3://b/y.jpg")]

    old = tmp_path / "old.parquet"  # written before sizes were kept: three columns
    pq.write_table(pa.table({"shard_id": pa.array([0], pa.int32()), "kind": ["files"], "uri": ["/a.jpg"]}), old)
    assert [s.uris for s in read_plan(str(old))] == [("/a.jpg",)]
