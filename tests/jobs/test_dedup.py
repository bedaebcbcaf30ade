"""dedup on real photos and their edits: each photo's copies grouped and nothing else; propagate shares a group's flags."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from loupe.jobs.dedup import (
    DUPLICATE_SCHEMA,
    Inherited,
    dedup,
    propagate,
    representatives,
)
from loupe.jobs.match import match_catalog
from loupe.schemas.errors import UserError
from loupe.schemas.layout import DUPLICATES_FILE, PROPAGATED_FILE
from loupe.workers.hashing import KNOWN_CONTENT
from loupe.workers.storage import LocalStorage

from tests.photos import EDITS, PHOTOS, SURVIVED, catalog_rows, hashed, write_catalog


def groups_in(output) -> dict[str, set[str]]:
    """representative -> the image ids of its group, as written."""
    groups: dict[str, set[str]] = {}
    for row in pq.read_table(output / DUPLICATES_FILE).to_pylist():
        groups.setdefault(row["representative"], set()).add(row["image_id"])
    return groups


def representative(members: set[str], rows: list[dict]) -> str:
    quality = {r["image_id"]: r["pdq_quality"] for r in rows}
    return min(members, key=lambda image_id: (-quality[image_id], image_id))


def with_vectors(rows: list[dict]) -> list[dict]:
    """Each photo's copies get image vectors near one another (cosine about 0.99), as CLIP gives
    a photo and its mirror; the low-quality photo and the error row get none."""
    rng = np.random.default_rng(0)
    centres = {name: rng.standard_normal(16) for name in PHOTOS}
    out = []
    for row in rows:
        name = row["image_id"].split("-")[0]
        vector = centres[name] + 0.1 * rng.standard_normal(16) if name in centres else None
        out.append({**row, "image_embedding": None if vector is None else vector.astype(np.float32).tolist()})
    return out


@pytest.fixture
def catalog(tmp_path):
    rows = catalog_rows()
    rows = [
        {
            **r,
            "flagged_categories": ["violence_gore"] if r["image_id"] == "astronaut-original" else [],
            "matched_labels": ["list-b"] if r["image_id"] == "coffee-resize" else None,
        }
        for r in rows
    ]
    return tmp_path, rows


def test_pdq_groups_each_photos_surviving_copies_and_nothing_else(catalog):
    output, rows = catalog
    write_catalog(output, [{**r, "image_embedding": None} for r in rows])  # a job without the embed task
    summary = dedup(str(output))

    expected = {name: {f"{name}-{edit}" for edit in ("original", *SURVIVED)} for name in PHOTOS}
    groups = groups_in(output)
    assert sorted(groups.values(), key=sorted) == sorted(expected.values(), key=sorted)
    for rep, members in groups.items():
        assert rep == representative(members, rows)
    # Mirrors and quarter turns need the dihedral hashes (a query's, not a catalog row's), crops
    # are beyond PDQ, and the low-quality clock and its JPEG copy (4 bits apart) never pair.
    table = pq.read_table(output / DUPLICATES_FILE)
    assert table.schema.equals(DUPLICATE_SCHEMA)
    assert set(table["group_size"].to_pylist()) == {4}
    assert summary.groups == 6 and summary.duplicates == 18 and summary.largest_group == 4
    assert summary.pdq_pairs == 6 * 6 and summary.vector_pairs == 0
    assert summary.images == len(rows) and summary.hashed == len(rows) - 1
    collapsed = representatives(LocalStorage(), str(output))
    assert collapsed["coffee-resize"] == collapsed["coffee-original"] == representative(expected["coffee"], rows)
    assert "coffee-mirror" not in collapsed


def test_image_vectors_join_the_copies_pdq_cannot(catalog):
    output, rows = catalog
    rows = with_vectors(rows)
    write_catalog(output, rows)
    summary = dedup(str(output), image_threshold=0.95)
    expected = {frozenset(f"{name}-{edit}" for edit in ("original", *EDITS)) for name in PHOTOS}
    assert {frozenset(m) for m in groups_in(output).values()} == expected
    assert summary.with_vectors == len(PHOTOS) * 7 and summary.vector_pairs == 6 * 21
    # Without the vectors' help the groups are PDQ's alone again.
    dedup(str(output), image_threshold=None)
    assert all(len(m) == 4 for m in groups_in(output).values())


def test_group_ids_and_representatives_are_deterministic(catalog):
    output, rows = catalog
    write_catalog(output, rows, parts=3)
    dedup(str(output), image_threshold=None)
    first = pq.read_table(output / DUPLICATES_FILE).to_pylist()
    write_catalog(output, list(reversed(rows)), parts=2)
    dedup(str(output), image_threshold=None)
    assert pq.read_table(output / DUPLICATES_FILE).to_pylist() == first
    brightest = "astronaut-brightness"  # quality 100 like its group, and first by image_id
    assert first[0] == {"image_id": brightest, "group_id": 0, "representative": brightest, "group_size": 4}


def test_propagate_lists_each_copy_of_a_flagged_image_with_what_it_inherits(catalog, tmp_path_factory):
    output, rows = catalog
    write_catalog(output, with_vectors(rows))
    listing = tmp_path_factory.mktemp("list") / "known.txt"
    listing.write_text(hashed("chelsea", "original").hash + "\n")
    match_catalog(str(output), str(listing))  # matches chelsea's original and its PDQ-surviving copies
    dedup(str(output))
    inherited = propagate(str(output))

    group_of = {r["image_id"]: r["group_id"] for r in pq.read_table(output / DUPLICATES_FILE).to_pylist()}
    chelsea_matched = sorted(f"chelsea-{edit}" for edit in ("original", *SURVIVED))
    expected = [
        *(Inherited(f"astronaut-{e}", "violence_gore", ["astronaut-original"], 0) for e in EDITS),
        *(Inherited(f"chelsea-{e}", KNOWN_CONTENT, chelsea_matched, 0) for e in ("crop", "mirror", "quarter_turn")),
        *(Inherited(f"coffee-{e}", KNOWN_CONTENT, ["coffee-resize"], 0) for e in ("original", *EDITS) if e != "resize"),
    ]
    expected = [Inherited(i.image_id, i.flag, i.from_image_ids, group_of[i.image_id]) for i in expected]
    assert sorted(inherited, key=lambda i: (i.image_id, i.flag)) == sorted(expected, key=lambda i: (i.image_id, i.flag))
    written = pq.read_table(output / PROPAGATED_FILE).to_pylist()
    assert sorted(written, key=lambda r: r["image_id"]) == sorted(
        (asdict(i) for i in inherited), key=lambda r: r["image_id"]
    )


def test_propagate_before_dedup_is_a_user_error(catalog):
    output, rows = catalog
    write_catalog(output, rows)
    with pytest.raises(UserError, match="run loupe dedup first"):
        propagate(str(output))
    assert representatives(LocalStorage(), str(output)) == {}
    with pytest.raises(UserError, match="pdq-distance"):
        dedup(str(output), pdq_distance=-1)
