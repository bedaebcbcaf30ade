"""Hamming range search: both FAISS indexes give exactly the brute force's pairs; low-quality hashes never match."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.workers.hashing import pdq, pdq_dihedral
from loupe.workers.index.hamming import (
    MAX_DISTANCE,
    METHODS,
    HammingIndex,
    brute_force_pairs,
    codes_from_hex,
    range_pairs,
    self_pairs,
)
from tests.photos import DIHEDRAL_EDITS, PHOTOS, SURVIVED, edited


def random_codes(count: int, rng: np.random.Generator) -> np.ndarray:
    return np.packbits(rng.integers(0, 2, (count, 256), dtype=np.uint8), axis=1)


def flipped(codes: np.ndarray, bits: list[int], rng: np.random.Generator) -> np.ndarray:
    """Each code with exactly bits[i] of its bits flipped."""
    unpacked = np.unpackbits(codes, axis=1)
    for row, count in enumerate(bits):
        unpacked[row, rng.choice(256, count, replace=False)] ^= 1
    return np.packbits(unpacked, axis=1)


@pytest.fixture(scope="module")
def planted():
    """3,000 random codes and 300 queries: copies of the first 300 at 0 to 59 flipped bits."""
    rng = np.random.default_rng(7)
    base = random_codes(3000, rng)
    queries = flipped(base[:300], [i % 60 for i in range(300)], rng)
    return base, queries


def as_set(pairs) -> set[tuple[int, int, int]]:
    return set(zip(pairs.query.tolist(), pairs.base.tolist(), pairs.distance.tolist()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("radius", [0, 5, 15, 16, 31, 32, 47])
def test_faiss_matches_the_brute_force_exactly(planted, method, radius):
    base, queries = planted
    expected = brute_force_pairs(base, queries, radius)
    found = HammingIndex(base, method).search(queries, radius)
    assert as_set(found) == as_set(expected)
    assert (np.diff(found.query) >= 0).all()
    # Every planted copy within the radius is found, at exactly its distance; the boundary is inclusive.
    planted_pairs = {(i, i, i % 60) for i in range(300) if i % 60 <= radius}
    assert planted_pairs <= as_set(found)
    assert found.distance.max() <= radius


def test_the_brute_force_is_right_on_a_few_pairs():
    a = "00" * 32
    b = "ff" + "00" * 31  # 8 bits apart
    c = "0f" * 32  # 128 bits from a
    pairs = brute_force_pairs(codes_from_hex([a, b, c]), codes_from_hex([a]), 8)
    assert as_set(pairs) == {(0, 0, 0), (0, 1, 8)}


def test_low_quality_hashes_are_never_matched(planted):
    base, queries = planted
    base_quality = np.full(len(base), 100)
    base_quality[:100] = 49  # the first 100 planted copies' originals
    query_quality = np.full(len(queries), 100)
    query_quality[150:200] = 10
    for method in METHODS:
        found = range_pairs(base, queries, base_quality=base_quality, query_quality=query_quality, method=method)
        assert found.base.min() >= 100
        assert not ((found.query >= 150) & (found.query < 200)).any()
        expected = {(i, i, i % 60) for i in range(100, 300) if i % 60 <= MAX_DISTANCE and not 150 <= i < 200}
        assert {p for p in as_set(found) if p[0] == p[1]} == expected


def test_self_pairs_lists_each_near_duplicate_pair_once():
    rng = np.random.default_rng(3)
    originals = random_codes(50, rng)
    codes = np.concatenate([originals, flipped(originals[:10], [20] * 10, rng)])
    for method in METHODS:
        assert as_set(self_pairs(codes, method=method)) == {(i, 50 + i, 20) for i in range(10)}


def test_empty_sides_and_bad_input():
    codes = codes_from_hex(["ab" * 32])
    assert len(range_pairs(codes, codes[:0])) == 0
    assert len(range_pairs(codes[:0], codes)) == 0
    assert len(brute_force_pairs(codes[:0], codes)) == 0
    with pytest.raises(ValueError, match="hash 1"):
        codes_from_hex(["ab" * 32, "xyz"])
    with pytest.raises(ValueError, match="hash 0"):
        codes_from_hex(["ab" * 31])
    with pytest.raises(ValueError, match="unknown method"):
        HammingIndex(codes, "ivf")  # type: ignore[arg-type]


def test_photo_copies_are_found_and_nothing_else():
    """Catalog: every photo and its edited copies; queries: the originals' eight dihedral hashes."""
    catalog = [(name, edit) for name in PHOTOS for edit in ("original", *SURVIVED, *DIHEDRAL_EDITS)]
    codes = codes_from_hex([pdq(edited(*key)).hash for key in catalog])
    queries = [(name, h) for name in PHOTOS for h in pdq_dihedral(edited(name, "original")).hashes]
    for method in METHODS:
        found = range_pairs(codes, codes_from_hex([h for _, h in queries]), method=method)
        matched = {(queries[q][0], catalog[b]) for q, b in zip(found.query.tolist(), found.base.tolist())}
        assert matched == {(key[0], key) for key in catalog}
