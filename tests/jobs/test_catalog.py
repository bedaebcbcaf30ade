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
