"""match_catalog on real photos and their edits: every expected match and no other; plain and CSV lists; bad lines refused."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from loupe.jobs.match import MATCH_SCHEMA, match_catalog
from loupe.schemas.errors import UserError
from loupe.schemas.layout import MATCHES_FILE
from loupe.workers.hashing import parse_hash_list, pdq
from PIL import ImageEnhance

from tests.photos import (
    LOW_QUALITY_PHOTO,
    PHOTOS,
    SURVIVED,
    catalog_rows,
    distance,
    hashed,
    photo,
    write_catalog,
)

UNRELATED = "5a" * 32


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    output = tmp_path_factory.mktemp("catalog")
    write_catalog(output, catalog_rows())
    return output


def known_list() -> dict[str, tuple[str, set[str]]]:
    """List hash -> (label, the catalog photo whose plain-hash copies it must match)."""
    darker = pdq(ImageEnhance.Brightness(photo("chelsea")).enhance(0.7)).hash  # an edit the catalog lacks
    return {
        hashed("astronaut", "original").hash: ("list-a", "astronaut"),
        hashed("coffee", "jpeg50").hash: ("list-b", "coffee"),  # an edited copy's hash
        darker: ("list-b", "chelsea"),
        UNRELATED: ("unrelated", None),
        hashed(LOW_QUALITY_PHOTO, "original").hash: ("blurred", None),  # the catalog's copies are low quality
    }


def expected_pairs() -> set[tuple[str, str]]:
    pairs = set()
    for list_hash, (_, name) in known_list().items():
        if name:
            pairs |= {(f"{name}-{edit}", list_hash) for edit in ("original", *SURVIVED)}
    return pairs


def read_matches(output):
    return pq.read_table(output / MATCHES_FILE)


def test_csv_list_finds_every_expected_match_and_nothing_else(catalog, tmp_path):
    listing = tmp_path / "known.csv"
    lines = ["# shared list, exchanged as hash,label", "hash,label", ""]
    lines += [f"{h.upper() if i == 0 else h},{label}" for i, (h, (label, _)) in enumerate(known_list().items())]
    listing.write_text("\n".join(lines) + "\n")

    summary = match_catalog(str(catalog), str(listing))

    table = read_matches(catalog)
    assert table.schema.equals(MATCH_SCHEMA)
    rows = table.to_pylist()
    assert {(r["image_id"], r["matched_hash"]) for r in rows} == expected_pairs()
    catalog_by_id = {r["image_id"]: r for r in catalog_rows()}
    for row in rows:
        assert row["pdq"] == catalog_by_id[row["image_id"]]["pdq"]
        assert row["source_uri"] == catalog_by_id[row["image_id"]]["source_uri"]
        assert row["distance"] == distance(row["pdq"], row["matched_hash"]) <= 31
        assert row["label"] == known_list()[row["matched_hash"]][0]
    assert summary.matches == len(rows) == 12
    assert summary.images_matched == 12
    assert summary.images_by_label == {"list-a": 4, "list-b": 8}
    assert summary.list_hashes == 5
    assert summary.catalog_hashes == len(PHOTOS) * 7 + 2  # the error row has no hash
    assert summary.low_quality == 2
    assert summary.path.endswith(MATCHES_FILE)


def test_plain_list_gives_the_same_matches_without_labels(catalog, tmp_path):
    listing = tmp_path / "known.txt"
    listing.write_text("\n".join(known_list()) + "\n")
    match_catalog(str(catalog), str(listing))
    rows = read_matches(catalog).to_pylist()
    assert {(r["image_id"], r["matched_hash"]) for r in rows} == expected_pairs()
    assert {r["label"] for r in rows} == {None}


def test_a_tighter_distance_keeps_only_the_nearer_copies(catalog, tmp_path):
    listing = tmp_path / "one.txt"
    listing.write_text(hashed("astronaut", "original").hash + "\n")
    summary = match_catalog(str(catalog), str(listing), max_distance=4)
    rows = read_matches(catalog).to_pylist()
    assert {r["image_id"] for r in rows} == {"astronaut-original", "astronaut-jpeg50"}  # 0 and 2 bits
    assert summary.max_distance == 4


def test_no_match_still_replaces_the_matches_file(catalog, tmp_path):
    listing = tmp_path / "none.txt"
    listing.write_text(UNRELATED + "\n")
    assert match_catalog(str(catalog), str(listing)).matches == 0
    assert read_matches(catalog).num_rows == 0


def test_a_malformed_line_is_refused_with_its_number():
    good = "ab" * 32
    with pytest.raises(UserError, match=r"known\.csv, line 4: .*'not-a-hash,label'"):
        parse_hash_list(f"# list\n{good},x\n\nnot-a-hash,label\n", "known.csv")
    with pytest.raises(UserError, match="line 2"):
        parse_hash_list(f"{good}\n{good},label,extra\n")
    with pytest.raises(UserError, match="line 1"):
        parse_hash_list(f"{good[:-1]}\n")
    with pytest.raises(UserError, match="holds no hashes"):
        parse_hash_list("# nothing here\n\n")


def test_list_parsing_accepts_quoted_labels_and_a_bom():
    parsed = parse_hash_list('\ufeffpdq,label\n' + "AB" * 32 + ',"terror, tier 1"\n' + "cd" * 32 + ",\n")
    assert parsed.hashes == ["ab" * 32, "cd" * 32]
    assert parsed.labels == ["terror, tier 1", None]


def test_user_mistakes_are_one_line_errors(catalog, tmp_path):
    listing = tmp_path / "known.txt"
    listing.write_text(UNRELATED + "\n")
    with pytest.raises(UserError, match="no hash list"):
        match_catalog(str(catalog), str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="max-distance"):
        match_catalog(str(catalog), str(listing), max_distance=300)
    with pytest.raises(UserError, match="no _manifest.json"):
        match_catalog(str(tmp_path / "empty"), str(listing))
    unhashed = tmp_path / "unhashed"
    write_catalog(unhashed, [{k: v for k, v in r.items() if not k.startswith("pdq")} for r in catalog_rows()])
    with pytest.raises(UserError, match="no pdq, pdq_quality column.*hash task"):
        match_catalog(str(unhashed), str(listing))
