"""What serve loads at start: a damaged OUTPUT or index refused in one line, a partial job served as it stands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loupe.jobs.serve import serve_command
from loupe.jobs.serve.app import create_app
from loupe.jobs.serve.catalog import Catalog
from loupe.schemas.errors import DamagedOutput, UserError


@pytest.fixture
def copy(catalog_output, tmp_path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(catalog_output, target)
    return target


def manifest(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def rewrite_manifest(out: Path, **changes) -> None:
    (out / "_manifest.json").write_text(json.dumps(manifest(out) | changes))


def corrupt_index(out: Path) -> None:
    with open(out / manifest(out)["index"]["image"]["path"], "ab") as f:  # the build the manifest names
        f.write(b"\0")


def drop_part(out: Path) -> None:
    (out / manifest(out)["parts"][1]["path"]).unlink()


def shorten_part(out: Path) -> None:
    path = out / manifest(out)["parts"][0]["path"]
    pq.write_table(pq.read_table(path).slice(1), path)


def reverse_part(out: Path) -> None:
    path = out / manifest(out)["parts"][0]["path"]
    table = pq.read_table(path)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), path)


@pytest.mark.parametrize(
    "damage, error, words",
    [
        (corrupt_index, DamagedOutput, "does not match its recorded sha256"),
        (drop_part, DamagedOutput, "listed in the manifest, is missing"),
        (shorten_part, DamagedOutput, "rows but the manifest lists"),
        (reverse_part, DamagedOutput, "no longer matches the parts"),
        (lambda out: (out / "_manifest.json").write_text("{not json"), DamagedOutput, "not a valid Manifest"),
        (lambda out: (out / "_job.json").unlink(), UserError, "no loupe job"),
    ],
)
def test_a_damaged_output_is_refused_at_start(copy, damage, error, words):
    damage(copy)
    with pytest.raises(error, match=words) as caught:
        create_app(str(copy))
    assert "\n" not in str(caught.value)


def test_the_command_says_so_in_one_line(copy):
    corrupt_index(copy)
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["serve", str(copy), "--port", "0"])
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loupe: damaged output: ") and "index.faiss" in lines[0]


def test_a_partial_job_is_served_as_far_as_its_manifest_goes(copy):
    parts = manifest(copy)["parts"]
    rewrite_manifest(copy, complete=False, parts=parts[:2], index={})
    (copy / "_stats" / f"shard-{parts[2]['shard_id']:05d}.json").unlink()
    client = TestClient(create_app(str(copy)))
    status = client.get("/api/status").json()
    assert not status["complete"] and status["shards_done"] == 2 and status["shards_total"] == 3
    assert status["serving"] == {"parts": 2, "rows": 10, "manifest_complete": False, "indexes": {}}
    refused = client.get("/api/search", params={"q": "x"})
    assert refused.status_code == 400 and refused.json()["detail"].startswith("no image index in ")
    assert client.get("/api/review/violence_gore").json()["total"] == 8  # 10 rows, 2 of them errors


def test_a_job_without_a_manifest_yet_serves_its_status(copy):
    (copy / "_manifest.json").unlink()
    catalog = Catalog.open(str(copy))
    assert catalog.rows.num_rows == 0 and not catalog.complete and catalog.locate("x") is None
    client = TestClient(create_app(str(copy)))
    assert client.get("/api/status").json()["serving"]["rows"] == 0
    assert client.get("/api/review/violence_gore").json() == {
        "category": "violence_gore", "threshold": 0.56, "total": 0, "offset": 0, "items": [],
    }


def test_duplicates_collapse_and_removed_rows_hide_as_loupe_search_does(copy):
    from loupe.jobs.dedup import DUPLICATE_SCHEMA
    from loupe.jobs.incremental import REMOVED_SCHEMA
    from loupe.jobs.search import search
    from loupe.schemas.layout import DUPLICATES_FILE, removed_path

    ok = [r for p in manifest(copy)["parts"] for r in pq.read_table(copy / p["path"]).to_pylist() if r["status"] == "ok"]
    # What `loupe dedup` would write for a group of three, and an incremental rerun for one gone image.
    group = sorted(r["image_id"] for r in ok[2:5])
    (copy / DUPLICATES_FILE).parent.mkdir(parents=True)
    pq.write_table(pa.table({
        "image_id": group, "group_id": [0, 0, 0], "representative": [group[0]] * 3, "group_size": [3, 3, 3],
    }, schema=DUPLICATE_SCHEMA), copy / DUPLICATES_FILE)
    gone = ok[7]
    (copy / removed_path(2)).parent.mkdir(parents=True)
    pq.write_table(pa.table({
        "uri": [gone["source_uri"]], "object_id": [gone["image_id"]], "shard_id": [gone["shard_id"]],
        "kind": ["files"], "reason": ["removed"],
    }, schema=REMOVED_SCHEMA), copy / removed_path(2))
    rewrite_manifest(copy, removed=[{"generation": 2, "path": removed_path(2), "objects": 1, "sha256": ""}], removed_objects=1)

    client = TestClient(create_app(str(copy)))
    for params, kwargs in (
        ({"q": "a red square", "k": 12}, {"text": "a red square", "k": 12}),
        ({"q": "a red square", "k": 12, "all_duplicates": "true"}, {"text": "a red square", "k": 12, "all_duplicates": True}),
        ({"q": "a red square", "k": 3, "exclude_flagged": "true"}, {"text": "a red square", "k": 3, "exclude_flagged": True}),
    ):
        expected = [hit.to_dict() for hit in search(str(copy), **kwargs)]
        assert client.get("/api/search", params=params).json()["hits"] == expected
    collapsed = client.get("/api/search", params={"q": "a red square", "k": 12}).json()["hits"]
    assert len(collapsed) == 9 and {h["image_id"]: h["duplicates"] for h in collapsed}[group[0]] == 2
    assert gone["image_id"] not in {h["image_id"] for h in collapsed}
    assert client.get(f"/api/images/{gone['image_id']}").status_code == 404
    assert client.get(f"/api/images/{gone['image_id']}/thumbnail").status_code == 404
    assert client.get("/api/review/violence_gore").json()["total"] == 11
