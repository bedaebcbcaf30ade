"""Known content end to end: a real job hashes real photos and their edited copies, matches a list
during the run, then `loupe match`, `loupe dedup`, collapsed search and `loupe moderation propagate`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from loupe.jobs.cli import app
from loupe.schemas.layout import JOB_FILE, MANIFEST_FILE
from loupe.schemas.rows import output_schema
from tests.photos import EDITS, LOW_QUALITY_PHOTO, PHOTOS, SURVIVED, distance, edited, hashed

pytestmark = pytest.mark.usefixtures("ray_cluster")

UNRELATED = "5a" * 32
MAX_DISTANCE = 31


def _save(image, path: Path, **options) -> None:
    image.save(path, **options)


def photo_folder(folder: Path) -> list[str]:
    """Each photo and its edits as files (JPEG for the original and the quality-50 copy, PNG for the
    rest, lossless), and the low-quality photo; returns the image ids (file stems)."""
    folder.mkdir(parents=True)
    for name in PHOTOS:
        _save(edited(name, "original"), folder / f"{name}-original.jpg", quality=95)
        _save(edited(name, "original"), folder / f"{name}-jpeg50.jpg", quality=50)
        for edit in EDITS:
            if edit != "jpeg50":
                _save(edited(name, edit), folder / f"{name}-{edit}.png")
    _save(edited(LOW_QUALITY_PHOTO, "original"), folder / f"{LOW_QUALITY_PHOTO}-original.png")
    (folder / "broken-file.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # an error row: no hash
    return sorted(p.stem for p in folder.iterdir())


def run_list() -> dict[str, str | None]:
    """The list given to `loupe run --match-list`: hash -> label (None: an unlabelled line)."""
    return {
        hashed("astronaut", "original").hash: "list-a",
        hashed("coffee", "jpeg50").hash: "list-b",  # an edited copy's hash
        hashed("chelsea", "mirror").hash: None,  # a mirror: only the catalog's mirrored copy is near it
        UNRELATED: "other",
        hashed(LOW_QUALITY_PHOTO, "original").hash: "blurred",  # the catalog's copy is too low in quality
    }


def write_list(path: Path, entries: dict[str, str | None]) -> str:
    path.write_text("pdq,label\n" + "".join(f"{h},{label or ''}\n" for h, label in entries.items()))
    return str(path)


def image_id(row: dict) -> str:
    return Path(row["source_uri"]).stem


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_clip):
    """One job (hash and embed tasks) over the photo folder, with the run list; shared by every test."""
    root = tmp_path_factory.mktemp("known")
    ids = photo_folder(root / "photos")
    listing = write_list(root / "run-list.csv", run_list())
    out = root / "out"
    result = CliRunner().invoke(app, [
        "run", str(root / "photos"), str(out), "--tasks", "hash,embed", "--image-embedding-model", tiny_clip,
        "--shard-size", "16", "--match-list", listing,
    ])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    rows = [r for p in manifest["parts"] for r in pq.read_table(out / p["path"]).to_pylist()]
    return {"root": root, "out": out, "ids": ids, "rows": {image_id(r): r for r in rows}, "list": listing,
            "summary": result.stdout, "images": root / "photos", "clip": tiny_clip}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_every_ok_row_gets_its_pdq_hash_and_quality(job):
    rows = dict(job["rows"])
    assert sorted(rows) == job["ids"]
    broken = rows.pop("broken-file")
    assert broken["status"] == "error"
    assert [broken[c] for c in ("pdq", "pdq_quality", "matched_labels", "known_content")] == [None] * 4
    assert all(r["status"] == "ok" for r in rows.values())
    table = pq.read_table(job["out"] / json.loads((job["out"] / MANIFEST_FILE).read_text())["parts"][0]["path"])
    for column in ("pdq", "pdq_quality", "matched_labels", "known_content"):
        assert table.schema.field(column).type == output_schema().field(column).type
    for key, row in rows.items():
        assert len(row["pdq"]) == 64 and int(row["pdq"], 16) >= 0
        name, edit = key.split("-")
        # Hashed on the decoded file (JPEGs at a reduced DCT scale of 512 a side or more): within a few
        # bits of the same image hashed in full in memory.
        reference = hashed(name, "original" if edit == "jpeg50" else edit)
        limit = 31 if edit == "jpeg50" else 6  # the file is the quality-50 copy, not the in-memory one
        assert distance(row["pdq"], reference.hash) <= limit, (key, distance(row["pdq"], reference.hash))
        assert (row["pdq_quality"] >= 50) == (name != LOW_QUALITY_PHOTO)


def test_match_list_flags_exactly_the_expected_rows(job):
    rows = job["rows"]
    labels = {h: label or "known_content" for h, label in run_list().items()}
    # Expected by an independent popcount over the rows' own hashes...
    expected = {
        key: sorted({labels[h] for h in labels if distance(row["pdq"], h) <= MAX_DISTANCE})
        for key, row in rows.items()
        if row["status"] == "ok" and row["pdq_quality"] >= 50
    }
    expected = {key: found for key, found in expected.items() if found}
    # ...and by what the edits are: PDQ survives resize, JPEG and brightness; a mirror matches the
    # mirror's hash; the blurred photo is never matched; the unrelated hash matches nothing.
    assert expected == {
        **{f"astronaut-{e}": ["list-a"] for e in ("original", *SURVIVED)},
        **{f"coffee-{e}": ["list-b"] for e in ("original", *SURVIVED)},
        "chelsea-mirror": ["known_content"],
    }
    got = {key: r["matched_labels"] for key, r in rows.items() if r["known_content"]}
    assert got == expected
    unmatched = [r for k, r in rows.items() if k not in got and r["status"] == "ok"]
    assert unmatched and all(r["matched_labels"] == [] and r["known_content"] is False for r in unmatched)
    assert "known content" in job["summary"] and f"{len(expected)} rows" in job["summary"]
    status = json.loads(cli("status", str(job["out"]), "--json").stdout)
    assert status["rows_known_content"] == len(expected)
    settings = json.loads((job["out"] / JOB_FILE).read_text())["settings"]
    assert len(settings["match_list_sha256"]) == 64 and "hash" in settings["tasks"]


def test_loupe_match_finds_every_expected_match_and_no_other(job, tmp_path):
    rows = job["rows"]
    # Some of the catalog's own hashes, an edited copy's hash the catalog does not hold, and noise.
    entries = {
        rows["camera-original"]["pdq"]: "cam",
        rows["rocket-brightness"]["pdq"]: None,
        hashed("coins", "jpeg50").hash: "coins",
        UNRELATED: "other",
    }
    listing = write_list(tmp_path / "list.csv", entries)
    result = cli("match", str(job["out"]), listing, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    found = {(r["image_id"], r["matched_hash"]): r["distance"] for r in pq.read_table(summary["path"]).to_pylist()}
    by_id = {r["image_id"]: key for key, r in rows.items()}
    expected = {
        (row["image_id"], h): distance(row["pdq"], h)
        for row in rows.values()
        for h in entries
        if row["status"] == "ok" and row["pdq_quality"] >= 50 and distance(row["pdq"], h) <= MAX_DISTANCE
    }
    assert found == expected
    assert {by_id[i].split("-")[0] for i, _ in found} == {"camera", "rocket", "coins"}
    for name in ("camera", "rocket", "coins"):  # every surviving copy of each listed photo is found
        assert {f"{name}-{e}" for e in ("original", *SURVIVED)} <= {by_id[i] for i, _ in found}
    assert summary["images_by_label"]["cam"] >= 4 and summary["list_hashes"] == 4

    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"{h}\n" for h in entries))
    assert json.loads(cli("match", str(job["out"]), str(plain), "--json").stdout)["matches"] == len(expected)


def test_dedup_groups_each_photos_copies_and_nothing_else(job):
    result = cli("dedup", str(job["out"]), "--pdq-only", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    by_id = {r["image_id"]: key for key, r in job["rows"].items()}
    groups: dict[str, set[str]] = {}
    for row in pq.read_table(summary["path"]).to_pylist():
        groups.setdefault(row["representative"], set()).add(by_id[row["image_id"]])
    # Mirrors and quarter turns need the dihedral hashes, crops are beyond PDQ (tests/photos.py).
    assert sorted(map(sorted, groups.values())) == sorted(
        sorted(f"{name}-{e}" for e in ("original", *SURVIVED)) for name in PHOTOS
    )
    assert summary["groups"] == len(PHOTOS) and summary["duplicates"] == 3 * len(PHOTOS)


def test_search_collapses_duplicates_unless_asked_for_all(job):
    assert cli("dedup", str(job["out"]), "--pdq-only").exit_code == 0
    groups = {
        r["image_id"]: r["representative"]
        for r in pq.read_table(job["out"] / "duplicates" / "duplicates.parquet").to_pylist()
    }
    query = str(job["images"] / "astronaut-resize.png")
    every = len(job["rows"])
    collapsed = json.loads(cli("search", str(job["out"]), "--image", query, "-k", str(every), "--json").stdout)
    shown = [h["image_id"] for h in collapsed]
    ok = [r["image_id"] for r in job["rows"].values() if r["status"] == "ok"]
    assert sorted(shown) == sorted(i for i in ok if groups.get(i, i) == i)
    assert {h["image_id"]: h["duplicates"] for h in collapsed if h["duplicates"]} == {
        rep: 3 for rep in set(groups.values())
    }
    full = json.loads(
        cli("search", str(job["out"]), "--image", query, "-k", str(every), "--all-duplicates", "--json").stdout
    )
    assert len(full) == every - 1 and all(h["duplicates"] == 0 for h in full)  # every ok row


def test_propagate_lists_the_flags_copies_inherit(job, tmp_path):
    rows = job["rows"]
    assert cli("dedup", str(job["out"]), "--pdq-only").exit_code == 0
    # One rocket copy on a list, matched exactly: its group's other copies inherit the flag.
    listing = write_list(tmp_path / "one.csv", {rows["rocket-resize"]["pdq"]: "rocket"})
    assert cli("match", str(job["out"]), listing, "--max-distance", "0").exit_code == 0
    result = cli("moderation", "propagate", str(job["out"]), "--json")
    assert result.exit_code == 0, result.output
    by_id = {r["image_id"]: key for key, r in rows.items()}
    inherited = {
        (by_id[i["image_id"]], i["flag"]): [by_id[f] for f in i["from_image_ids"]] for i in json.loads(result.stdout)
    }
    expected = {(f"rocket-{e}", "known_content"): ["rocket-resize"] for e in ("original", "jpeg50", "brightness")}
    assert inherited == expected
    table = cli("moderation", "propagate", str(job["out"]))
    assert table.exit_code == 0 and table.stdout.count("known_content") == 3


def test_a_malformed_list_is_refused_with_its_line_number(job, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"pdq,label\n{UNRELATED},ok\nnot-a-hash,x\n")
    out = tmp_path / "never"
    result = cli("run", str(job["images"]), str(out), "--tasks", "hash", "--match-list", str(bad))
    assert result.exit_code == 2 and "line 3" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    result = cli("match", str(job["out"]), str(bad))
    assert result.exit_code == 2 and "line 3" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = cli("run", str(job["images"]), str(out), "--tasks", "embed", "--match-list", str(bad))
    assert result.exit_code == 2 and "hash task" in result.stderr


def test_a_resume_with_another_list_is_refused(job, tmp_path):
    other = write_list(tmp_path / "other.csv", {UNRELATED: "other"})
    result = cli(
        "run", str(job["images"]), str(job["out"]), "--tasks", "hash,embed", "--image-embedding-model", job["clip"],
        "--shard-size", "16", "--match-list", other,
    )
    assert result.exit_code == 2 and "match_list_sha256" in result.stderr, result.output
    # The same list resumes: every shard is already done.
    same = cli(
        "run", str(job["images"]), str(job["out"]), "--tasks", "hash,embed", "--image-embedding-model", job["clip"],
        "--shard-size", "16", "--match-list", job["list"],
    )
    assert same.exit_code == 0, same.output
    assert "0 images" in same.stdout or "from an earlier run" in same.stdout


def _process(folder: Path, out: Path, **settings):
    from loupe.schemas.config import JobConfig
    from loupe.schemas.plan import Shard, ShardKind
    from loupe.workers.pipeline import ShardProcessor

    config = JobConfig(input=str(folder), output=str(out), **settings)
    names = ["astronaut-original.jpg", "astronaut-resize.png", "broken-file.jpg"]
    processor = ShardProcessor(config, decode_threads=2)
    stats = processor.process(Shard(0, ShardKind.FILES, tuple(str(folder / n) for n in names)))
    rows = pq.read_table(out / stats.part).to_pylist()
    return processor, stats, rows


def test_the_hash_task_alone_needs_no_model_and_matches_in_process(job, tmp_path):
    """No model at all: decoded in full, hashed on the decode pool, matched per window; an edited
    list refused by the replica that loads it."""
    listing = write_list(tmp_path / "list.csv", {hashed("astronaut", "original").hash: "a"})
    processor, stats, rows = _process(job["images"], tmp_path / "out", tasks="hash", match_list=listing)
    assert processor.decode_side is None and stats.timings["hash"] > 0
    assert [r["known_content"] for r in rows] == [True, True, None] and stats.rows_known_content == 2
    assert rows[0]["pdq"] == job["rows"]["astronaut-original"]["pdq"]
    from loupe.schemas.config import JobConfig
    from loupe.workers.pipeline import ShardProcessor

    changed = JobConfig(input="x", output=str(tmp_path), tasks="hash", match_list=listing, match_list_sha256="0" * 64)
    with pytest.raises(RuntimeError, match="changed since the job started"):
        ShardProcessor(changed)


def test_a_job_without_the_hash_task_leaves_its_columns_null(job, tmp_path):
    processor, _, rows = _process(
        job["images"], tmp_path / "out", tasks="embed", image_embedding_model=job["clip"]
    )
    assert processor.decode_side is not None and processor.decode_side < 512  # CLIP's own side, not PDQ's
    assert rows[0]["status"] == "ok" and rows[0]["image_embedding"] is not None
    assert all(r[c] is None for r in rows for c in ("pdq", "pdq_quality", "matched_labels", "known_content"))
