"""One command from a folder of images to a searchable catalog: run with embed, then search."""

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from loupe.jobs.cli import app
from loupe.schemas.layout import MANIFEST_FILE
from loupe.schemas.records import Manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_run_builds_indexes_and_search_finds_rows(sample_images, tiny_llava, tiny_clip, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "run", str(sample_images), str(out), "--model", tiny_llava, "--image-embedding-model", tiny_clip,
        "--max-new-tokens", "6", "--shard-size", "5",
    ])
    assert result.exit_code == 0, result.output
    assert "image index" in result.stdout and "caption index" in result.stdout

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert set(manifest["index"]) == {"image", "caption"} and manifest["index"]["image"]["vectors"] == 12
    assert Manifest.from_json((out / MANIFEST_FILE).read_bytes()).complete
    rows = [r for p in manifest["parts"] for r in pq.read_table(out / p["path"]).to_pylist()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 12 and all(len(r["image_embedding"]) and len(r["caption_embedding"]) for r in ok)

    hits = json.loads(runner.invoke(app, ["search", str(out), "a red square", "-k", "5", "--json"]).stdout)
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert {h["image_id"] for h in hits} <= {r["image_id"] for r in ok}
    # The same image as a query finds itself first.
    first = ok[0]["source_uri"]
    by_image = json.loads(runner.invoke(app, ["search", str(out), "--image", first, "-k", "3", "--json"]).stdout)
    assert by_image[0]["source_uri"] == first
    caption = ok[1]["caption"]
    by_caption = json.loads(
        runner.invoke(app, ["search", str(out), caption, "--kind", "caption", "-k", "1", "--json"]).stdout
    )
    assert by_caption[0]["caption"] == caption

    bad = runner.invoke(app, ["search", str(out), "x", "-k", "0"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_every_catalog_image_finds_itself_first_by_its_own_file(tiny_llava, tiny_clip, tmp_path):
    """Query images are decoded as the job decoded them (JPEGs at a reduced DCT scale), so each
    photo of the catalog comes back as its own best match with the same vector."""
    from loupe.jobs.bench.photos import make_photos
    from loupe.jobs.runner import run_job
    from loupe.jobs.search import search
    from loupe.schemas.config import JobConfig

    photos = make_photos(tmp_path / "photos", 8, seed=3)
    out = tmp_path / "out"
    config = JobConfig(
        input=str(tmp_path / "photos"), output=str(out), model=tiny_llava, image_embedding_model=tiny_clip,
        tasks=("caption", "embed"), max_new_tokens=2, shard_size=4,
    )
    result = run_job(config)
    assert result.complete and result.rows_ok == 8
    manifest = Manifest.from_json((out / MANIFEST_FILE).read_bytes())
    assert manifest.decode_side is not None  # the camera-sized JPEGs were decoded at a reduced scale
    for photo in photos:
        best = search(str(out), image=str(photo), k=2)[0]
        # The same pixels give the same vector up to float rounding; decoded at full size instead,
        # the tiny CLIP scores these photos 0.99998-0.999997 against themselves.
        assert best.source_uri == str(photo) and best.score >= 0.999999, (photo, best)
