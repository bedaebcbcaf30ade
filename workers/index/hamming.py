"""Range search over 256-bit hashes (PDQ) within a Hamming distance: binary FAISS indexes, NumPy as the reference.

Two FAISS indexes answer the same exact range search. `flat` (IndexBinaryFlat) compares every
pair with SIMD popcounts; `multihash` (IndexBinaryMultiHash: 16 tables of 16 bits, probing
every bucket within distance // 16 bits) compares only the codes that share a bucket with the
query, which is exact by the pigeonhole principle: 16 chunks whose distances sum to at most d
cannot all be further than d // 16. `brute_force_pairs` is the plain NumPy baseline the two
are tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from loupe.workers.index.library import faiss

CODE_BITS = 256
CODE_BYTES = CODE_BITS // 8
# Meta's reference threshold: at most 31 differing bits is a match (20 or fewer a confident one);
# unrelated images are about 128 apart.
MAX_DISTANCE = 31
# Below this quality a PDQ hash comes from a nearly featureless image (flat colour, heavy blur)
# and lies near many others: such hashes are kept but never matched.
MIN_QUALITY = 50

Method = Literal["flat", "multihash"]
METHODS: tuple[Method, ...] = ("flat", "multihash")

_MULTIHASH_TABLES = 16
_BRUTE_FORCE_BLOCK = 1 << 22  # query x base pairs per NumPy step: 128 MiB of XORed words


@dataclass(frozen=True)
class Pairs:
    """Matches as aligned arrays: query row, base row, Hamming distance; sorted by query, then base."""

    query: np.ndarray
    base: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return len(self.query)

    @classmethod
    def build(cls, query: np.ndarray, base: np.ndarray, distance: np.ndarray) -> Pairs:
        order = np.lexsort((base, query))
        return cls(
            query=np.asarray(query, np.int64)[order],
            base=np.asarray(base, np.int64)[order],
            distance=np.asarray(distance, np.int16)[order],
        )


def codes_from_hex(hashes: Sequence[str]) -> np.ndarray:
    """Hex hashes (64 characters each) as an (n, 32) uint8 array; a ValueError naming the first bad one."""
    codes = np.empty((len(hashes), CODE_BYTES), np.uint8)
    for row, text in enumerate(hashes):
        try:
            if len(text) != 2 * CODE_BYTES:
                raise ValueError
            codes[row] = np.frombuffer(bytes.fromhex(text), np.uint8)
        except (ValueError, TypeError):
            raise ValueError(f"hash {row}: {text!r} is not {2 * CODE_BYTES} hex characters") from None
    return codes


def matchable(quality: np.ndarray | None, count: int) -> np.ndarray:
    """Which of `count` hashes may be matched: those of quality MIN_QUALITY or more (all of them without qualities)."""
    if quality is None:
        return np.ones(count, bool)
    return np.asarray(quality) >= MIN_QUALITY


class HammingIndex:
    """A binary FAISS index over (n, 32) uint8 codes, answering range searches within a Hamming distance."""

    def __init__(self, codes: np.ndarray, method: Method = "flat") -> None:
        codes = _check_codes(codes)
        if method == "flat":
            self.index = faiss.IndexBinaryFlat(CODE_BITS)
        elif method == "multihash":
            self.index = faiss.IndexBinaryMultiHash(CODE_BITS, _MULTIHASH_TABLES, CODE_BITS // _MULTIHASH_TABLES)
        else:
            raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
        self.method = method
        self.index.add(self._readable(codes))

    def search(self, queries: np.ndarray, max_distance: int = MAX_DISTANCE) -> Pairs:
        """Every (query, code) pair at most `max_distance` bits apart."""
        queries = _check_codes(queries)
        if not len(queries) or not self.index.ntotal:
            return _no_pairs()
        if self.method == "multihash":
            self.index.nflip = max_distance // _MULTIHASH_TABLES
        # FAISS keeps distances strictly under the radius.
        lims, distances, labels = self.index.range_search(self._readable(queries), max_distance + 1)
        query = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
        return Pairs.build(query, labels, distances)

    def _readable(self, codes: np.ndarray) -> np.ndarray:
        """The codes, followed in memory by 8 spare bytes for multihash: it reads each table's bits
        as one 8-byte word, which for the last table runs 6 bytes past the end of a code."""
        if self.method != "multihash":
            return codes
        buffer = np.zeros(codes.size + 8, np.uint8)
        buffer[: codes.size] = codes.ravel()
        return buffer[: codes.size].reshape(codes.shape)


def range_pairs(
    base: np.ndarray,
    queries: np.ndarray,
    max_distance: int = MAX_DISTANCE,
    *,
    base_quality: np.ndarray | None = None,
    query_quality: np.ndarray | None = None,
    method: Method = "flat",
) -> Pairs:
    """Every (query, base) pair within `max_distance`, numbered as in the arrays given; a low-quality
    hash on either side never matches."""
    base_rows = np.flatnonzero(matchable(base_quality, len(base)))
    query_rows = np.flatnonzero(matchable(query_quality, len(queries)))
    if not len(base_rows) or not len(query_rows):
        return _no_pairs()
    found = HammingIndex(base[base_rows], method).search(queries[query_rows], max_distance)
    return Pairs.build(query_rows[found.query], base_rows[found.base], found.distance)


def self_pairs(
    codes: np.ndarray, max_distance: int = MAX_DISTANCE, *, quality: np.ndarray | None = None, method: Method = "flat"
) -> Pairs:
    """Every pair of distinct rows within `max_distance`, once each (query < base): one set's near-duplicates."""
    found = range_pairs(codes, codes, max_distance, base_quality=quality, query_quality=quality, method=method)
    keep = found.query < found.base
    return Pairs(found.query[keep], found.base[keep], found.distance[keep])


def brute_force_pairs(base: np.ndarray, queries: np.ndarray, max_distance: int = MAX_DISTANCE) -> Pairs:
    """The same pairs as HammingIndex.search, by XOR and popcount over every pair in NumPy: the reference."""
    words = _check_codes(base).view(np.uint64)
    query_words = _check_codes(queries).view(np.uint64)
    step = max(1, _BRUTE_FORCE_BLOCK // max(1, len(words)))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, len(query_words), step):
        block = query_words[start : start + step]
        distances = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(axis=2, dtype=np.int16)
        query, row = np.nonzero(distances <= max_distance)
        found.append((query + start, row, distances[query, row]))
    if not found:
        return _no_pairs()
    return Pairs.build(*(np.concatenate(parts) for parts in zip(*found)))


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2 or codes.shape[1] != CODE_BYTES:
        raise ValueError(f"codes must be an (n, {CODE_BYTES}) uint8 array, not shape {codes.shape}")
    return codes


def _no_pairs() -> Pairs:
    empty = np.empty(0, np.int64)
    return Pairs(empty, empty, np.empty(0, np.int16))
