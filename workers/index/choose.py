"""Which FAISS index fits a number of vectors in a memory budget, and the sizes that budgets are given in."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from loupe.schemas.errors import UserError

# Exact search over 10k vectors costs about a millisecond, less than embedding the query, so
# below that an approximate index would only lose recall. (autofaiss stops at 1k.)
FLAT_MAX_VECTORS = 10_000
# PQ's 256-centroid codebooks and IVF's lists need this many vectors to train on.
QUANTIZE_MIN_VECTORS = 10_000
# Above this, uncompressed IVF lists cost as much memory as flat for little gain (autofaiss's limit).
IVF_FLAT_MAX_VECTORS = 1_000_000
HNSW_MAX_M = 32
HNSW_MIN_M = 8  # sparser graphs lose recall faster than they save memory
COARSE_HNSW_MIN_NLIST = 1024  # below this, exact assignment to the centroids is as fast
# The centroids take at most this share of the budget: bytes they take, the codes lose. 1M x 768
# within 1/16 of flat: 1024 lists, 1.6%; 55k MiniLM vectors within 1/8: 128 lists, not 512.
COARSE_MAX_SHARE = 1 / 32
POINTS_PER_CENTROID = 100  # k-means needs ~100 points per centroid to place it well...
MIN_POINTS_PER_CENTROID = 39  # ...and faiss warns below 39
MAX_NLIST = 1 << 18
HEAP_SLACK = 100  # 1/100 of the budget
PQ_MIN_BYTES = 8  # below 8 bytes a vector no code tells neighbours apart
PQ_STEPS = sorted({int(2 ** (i / 16)) for i in range(48, 209)})  # 8 ... 8192 bytes, ~4.4% apart
PQ_TRAIN_POINTS = 256 * MIN_POINTS_PER_CENTROID
ID_BYTES = 8  # faiss stores an int64 id beside every code in an inverted list
# Of the memory budget, for the training sample: the index is still empty while it trains, and
# every list needs 39 points. More lists mean shorter lists to scan (1M x 768 with SQ6: 3.5 ms a
# query with 4096 lists, 9.4 ms with 2048) and smaller residuals to encode (recall@10 0.954 ->
# 0.969 from 512 to 2048 lists on 300k vectors; no gain from 2048 to 4096 at 1M).
TRAIN_SHARE = 0.75
# However small the budget, the sample holds this many vectors (or all of them), as one batch of
# vectors would: 61 MB at 768 dimensions. PQ's codebooks want 39 points a word and more: on 55k
# MiniLM vectors within 1/16 of flat's bytes (5.3 MB), the 2,597 that TRAIN_SHARE holds trained
# OPQ66,IVF64,PQ66 to recall@10 0.777, 10,000 to 0.794, 25,000 to 0.795 (docs/benchmarks.md).
TRAIN_MIN_VECTORS = 2 * PQ_TRAIN_POINTS
# PQ codes without inverted lists when a query's scan of them all is at most this many bytes:
# ~4 ms on one core (~0.5 ms a MB), under autofaiss's 10 ms target. Lists cost an 8-byte id a
# vector and their centroids, and this few vectors are probed mostly anyway (nprobe 32-45 of 64
# lists on 55k MiniLM vectors): within 1/16 of flat, OPQ66,IVF64,PQ66 reached recall@10 0.795,
# OPQ80,PQ80 without lists 0.838 at 2.1 ms a query.
SCAN_ALL_MAX_BYTES = 8_000_000


@dataclass(frozen=True)
class IndexChoice:
    """An index type and its shape: what choose_index decided and why it fits the budget."""

    kind: str  # "flat" | "hnsw" | "ivf_flat" | "ivf_sq" | "ivf_pq" | "pq" (PQ without lists)
    factory: str  # faiss.index_factory string
    nlist: int | None = None  # IVF lists
    m: int | None = None  # code bytes per vector (SQ or PQ)
    hnsw_m: int | None = None  # graph degree of the HNSW index or of the IVF's coarse quantizer
    opq_dim: int | None = None  # dimension after the OPQ rotation
    train_vectors: int = 0  # size of the training sample; 0 when the index needs no training
    estimated_bytes: int = 0  # the index in memory once every vector is added


def choose_index(n_vectors: int, dim: int, memory_budget_bytes: int) -> IndexChoice:
    """The index for `n_vectors` unit vectors of `dim` within the budget.

    Flat below FLAT_MAX_VECTORS; else HNSW with the densest graph (8..32) that fits; else, below
    1M vectors, IVF with flat lists if they fit; else IVF (with an HNSW coarse quantizer when
    the lists are many) with the most precise codes that fit and scan fast: 8 bits a dimension
    (SQ8), then 6 (SQ6), then PQ with 8-bit codes over two dimensions or more behind parametric
    OPQ, as many bytes as fit, without lists when scanning every code is quick. nlist is the
    power of two nearest 4·sqrt(n), lowered until the training sample (at most TRAIN_SHARE of
    the budget, or TRAIN_MIN_VECTORS) holds MIN_POINTS_PER_CENTROID points per list and the
    centroids take at most COARSE_MAX_SHARE of the budget. A pure function of its arguments.
    """
    if n_vectors < 1:
        raise UserError("there are no vectors to index")
    if dim < 1:
        raise ValueError(f"dimension must be positive, got {dim}")
    if memory_budget_bytes < 1:
        raise UserError(f"the memory budget must be positive, got {memory_budget_bytes}")
    n, budget = n_vectors, memory_budget_bytes
    flat_bytes = 4 * dim * n
    if n < FLAT_MAX_VECTORS and flat_bytes <= budget:
        return IndexChoice("flat", "Flat", estimated_bytes=flat_bytes)
    # HNSW keeps the raw vectors and 2·M int32 links per vector on its bottom layer.
    hnsw_m = min(HNSW_MAX_M, (budget // n - 4 * dim) // 8)
    if hnsw_m >= HNSW_MIN_M:
        return IndexChoice("hnsw", f"HNSW{hnsw_m}", hnsw_m=hnsw_m, estimated_bytes=n * (4 * dim + 8 * hnsw_m))
    too_small = UserError(
        f"a memory budget of {format_size(budget)} is too small for {n:,} vectors of dimension {dim}; "
        "raise --memory-budget"
    )
    if n < QUANTIZE_MIN_VECTORS:
        raise too_small
    max_train = max_train_vectors(n, dim, budget)
    nlist = _nlist(n, dim, budget, max_train)
    if nlist is None:
        raise too_small
    train = min(n, POINTS_PER_CENTROID * nlist, max_train)
    coarse_m = HNSW_MAX_M if nlist >= COARSE_HNSW_MIN_NLIST else None
    coarse = f"IVF{nlist}_HNSW{coarse_m}" if coarse_m else f"IVF{nlist}"

    def quantizer_bytes(d: int) -> int:
        return coarse_bytes(nlist, d, coarse_m)

    if n < IVF_FLAT_MAX_VECTORS:
        size = n * (4 * dim + ID_BYTES) + quantizer_bytes(dim)
        if size <= budget:
            return IndexChoice(
                "ivf_flat",
                f"{coarse},Flat",
                nlist=nlist,
                hnsw_m=coarse_m,
                train_vectors=train,
                estimated_bytes=size,
            )
    # Then one code per dimension, the finest that fits. Recall at this size is limited by the
    # codes' precision, not by how many lists are probed (1M of the benchmark's vectors, 4096
    # lists: SQ8 0.968 at nprobe 16, SQ6 0.927 at 16 and 0.935 at 32), so every bit counts...
    #
    # ...but so does the scan. Only faiss's uniform SQ8 and SQ6 are decoded with SIMD: ~1 ms a
    # query at 1M x 768 (SQ8 0.86, SQ6 0.99). Codes between them were measured and left out:
    # 7-bit Lloyd-Max codebooks (a PQ of one-dimensional sub-vectors) reach 0.964, nearly SQ8,
    # but faiss scans codes that are not whole bytes one sub-code at a time, 13 ms a query, past
    # what a search server can answer (autofaiss's own limit is 10 ms); SQ8 on the 736 principal
    # axes that fit reaches 0.918, less than SQ6 on all 768; a random rotation before SQ6 changes
    # nothing here (0.927) and costs a matrix-vector product a query.
    for bits in (8, 6):
        size = sq_bytes(n, dim, bits, nlist, coarse_m)
        if size <= budget:
            return IndexChoice(
                "ivf_sq",
                f"{coarse},SQ{bits}",
                nlist=nlist,
                m=-(-dim * bits // 8),
                hnsw_m=coarse_m,
                train_vectors=train,
                estimated_bytes=size,
            )
    # 4 bits a dimension and fewer: PQ with 8-bit codes over sub-vectors of two dimensions or more,
    # behind parametric OPQ (codes.balanced_rotation: the residuals' principal axes dealt out
    # so that every sub-vector holds an even share of their spread). At equal bytes it beats
    # a per-dimension code (SQ4) because a 256-word codebook over two dimensions
    # can follow the axes' unequal spread, and it beats a random rotation, which makes them equal:
    # on 200k of the benchmark's vectors, PQ192x8 behind it reaches recall@10 0.858, behind a
    # random rotation 0.794. As many bytes as fit, up to one a dimension pair: m bytes take
    # m·⌊dim/m⌋ of the axes, the least spread ones (fewer than m) left out, which costs least:
    # a query's own spread there is as small, so its inner products hardly depend on them.
    train = max(train, min(n, max_train, PQ_TRAIN_POINTS))
    # The rotation and codebooks at most this big whatever the sub-vectors: out_dim <= dim.
    rotation_and_codebooks = 4 * dim * dim + 4 * 256 * dim
    # Sized to the byte, so keep the allocator's share: a loaded index holds ~0.6% more heap than its
    # codes, ids and centroids (list headers, the graph's upper layers; 1M x PQ192: 208.0 MB for 206.8).
    room = budget - budget // HEAP_SLACK - rotation_and_codebooks
    m = _pq_bytes(room // n, dim)  # without lists: no ids, no centroids
    if n * m > SCAN_ALL_MAX_BYTES:
        listed = _pq_bytes((room - quantizer_bytes(dim)) // n - ID_BYTES, dim)
        if listed >= PQ_MIN_BYTES:
            return _pq_choice(n, dim, listed, train, coarse, nlist, coarse_m)
        m = _pq_bytes(SCAN_ALL_MAX_BYTES // n, dim)  # no room for lists and their ids: what a quick scan allows
    if m < PQ_MIN_BYTES:
        raise too_small
    return _pq_choice(n, dim, m, min(n, max_train))


def _pq_choice(
    n: int, dim: int, m: int, train: int, coarse: str = "", nlist: int | None = None, coarse_m: int | None = None
) -> IndexChoice:
    """PQ of m bytes behind OPQ, in the inverted lists of `coarse` (nlist of them) or without lists."""
    out_dim = m * (dim // m)  # m·⌊dim/m⌋ axes: the least spread (fewer than m) left out
    lists = n * ID_BYTES + coarse_bytes(nlist, out_dim, coarse_m) if nlist else 0
    return IndexChoice(
        "ivf_pq" if nlist else "pq",
        # "np": no polysemous training, which takes minutes at large m and serves only
        # Hamming-threshold filtering that this search does not use.
        f"OPQ{m}_{out_dim},{coarse + ',' if coarse else ''}PQ{m}x8np",
        nlist=nlist,
        m=m,
        hnsw_m=coarse_m,
        opq_dim=out_dim,
        train_vectors=train,
        estimated_bytes=n * m + lists + 4 * dim * out_dim + 4 * 256 * out_dim,
    )


def max_train_vectors(n: int | None, dim: int, budget: int) -> int:
    """The most vectors the training sample holds: TRAIN_SHARE of the budget, or TRAIN_MIN_VECTORS
    (of `n`, when known) however small the budget is."""
    return max(int(budget * TRAIN_SHARE) // (4 * dim), TRAIN_MIN_VECTORS if n is None else min(n, TRAIN_MIN_VECTORS))


def _pq_bytes(fits: int, dim: int) -> int:
    """The PQ code within `fits` bytes a vector, up to one a dimension pair, on a ladder of sizes
    ~4.4% apart, not to the byte: a growing catalog keeps its index (new vectors are added to it)
    until it outgrows the step, instead of a rebuild at every run. 0 when none fits."""
    fits = min(dim // 2, fits)
    return max((step for step in (*PQ_STEPS, dim // 2) if step <= fits), default=0)


def sq_bytes(n: int, dim: int, bits: int, nlist: int, coarse_m: int | None) -> int:
    """An IVF-SQ index of `bits` a dimension in memory: codes, ids, centroids (and their graph), the SQ's ranges."""
    code = -(-dim * bits // 8)
    return n * (code + ID_BYTES) + coarse_bytes(nlist, dim, coarse_m) + 8 * dim


def coarse_bytes(nlist: int, dim: int, coarse_m: int | None) -> int:
    """The IVF's centroids in `dim` dimensions, and the links of their HNSW graph when it has one."""
    return nlist * (4 * dim + 8 * (coarse_m or 0))


def _nlist(n: int, dim: int, budget: int, max_train: int) -> int | None:
    nlist = min(MAX_NLIST, 2 ** round(math.log2(4 * math.sqrt(n))))
    centroids_fit = budget * COARSE_MAX_SHARE
    while nlist > 1 and (
        nlist * MIN_POINTS_PER_CENTROID > min(n, max_train) or coarse_bytes(nlist, dim, None) > centroids_fit
    ):
        nlist //= 2
    # PQ codebooks have 256 centroids each; fewer training points than that cannot train them.
    return nlist if min(n, max_train, POINTS_PER_CENTROID * nlist) >= 256 else None


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kmgtp]?)(i?)(b?)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in "4GB" (10^9), "512MiB" (2^20), "4G" (2^30, as ulimit and docker read it) or "1e9"."""
    match = _SIZE.fullmatch(str(text))
    if not match or (match.group(3) and not match.group(2)):
        raise UserError(f"invalid size {text!r}; use e.g. 4GB, 512MiB or 1e9")
    number, unit, binary, suffix_b = match.groups()
    power = "kmgtp".find(unit.lower()) + 1 if unit else 0
    base = 1024 if (binary or (unit and not suffix_b)) else 1000
    value = float(number) * base**power
    if not math.isfinite(value) or value < 1:
        raise UserError(f"invalid size {text!r}: it must be at least one byte")
    return int(value)


def format_size(size: int) -> str:
    """A byte count for people: "1.55 GB", "768 MB", "12 B"."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


# The recall@10 each code reached on the index benchmark's vectors (1M x 768, recall against
# exact search, the search width tuned to its plateau), by the code's bits a dimension: what the
# chooser expects of an index before it is built. PQ173 behind OPQ 0.758, PQ362 0.890, SQ6 0.927
# and SQ8 0.968 (docs/benchmarks.md, issue 17). Indexes that keep whole vectors (flat, HNSW,
# IVF-Flat) reach any target with a wide enough search.
EXPECTED_RECALL = ((1.80, 0.758), (3.77, 0.890), (6.0, 0.927), (8.0, 0.968))
EXACT_KINDS = ("flat", "hnsw", "ivf_flat")
BUDGET_STEP = 1.05  # the smallest budget that reaches a target, to within 5%


def expected_recall(choice: IndexChoice, dim: int) -> float:
    """The recall@10 the chooser expects of `choice` at best, from EXPECTED_RECALL."""
    if choice.kind in EXACT_KINDS:
        return 1.0
    bits, recalls = zip(*EXPECTED_RECALL)
    return float(np.interp(8 * (choice.m or 0) / dim, bits, recalls))


def budget_for_recall(n: int, dim: int, budget: int, target: float, measured: float) -> int:
    """The smallest budget above `budget` whose index the chooser expects to reach `target`.

    The index built within `budget` measured `measured`; where that falls short of what was
    expected of it, these vectors are harder than the benchmark's, and every larger index is
    expected to fall as far short.
    """
    shortfall = max(0.0, expected_recall(choose_index(n, dim, budget), dim) - measured)
    larger = budget
    while True:
        larger = math.ceil(larger * BUDGET_STEP)
        choice = choose_index(n, dim, larger)
        if choice.kind in EXACT_KINDS or expected_recall(choice, dim) - shortfall >= target:
            return larger


def budget_note(choice: IndexChoice, n: int, dim: int, budget: int) -> str:
    """Why `choice` leaves over a fifth of the budget unused, or "" when it does not."""
    if choice.estimated_bytes >= 0.8 * budget:
        return ""
    used = f"uses {choice.estimated_bytes / budget:.0%} of the {format_size(budget)} budget"
    if choice.kind == "flat":
        return f"{used}: exact search needs no more"
    if choice.kind == "hnsw":
        return f"{used}: a denser graph than HNSW{HNSW_MAX_M} searches no better"
    if choice.kind == "ivf_flat":
        return f"{used}: its lists keep every vector whole"
    if choice.kind == "ivf_sq" and choice.m == dim:
        whole = n * (4 * dim + 8 * HNSW_MIN_M)
        return (
            f"{used}: SQ8 is the finest code, and an index of whole vectors (HNSW) needs {format_size(whole)}"
        )
    if choice.kind == "ivf_sq":  # SQ6: SQ8 does not fit
        sq8 = sq_bytes(n, dim, 8, choice.nlist or 0, choice.hnsw_m)
        return f"{used}: SQ8 needs {format_size(sq8)}, and the codes between SQ6 and SQ8 scan ten times slower"
    if choice.kind in ("ivf_pq", "pq") and choice.m == dim // 2:
        sq6 = sq_bytes(n, dim, 6, choice.nlist or 0, choice.hnsw_m)
        return f"{used}: PQ takes at most a byte for each pair of dimensions, and SQ6 needs {format_size(sq6)}"
    if choice.kind == "pq":  # lists and their ids do not fit, and without them every code is scanned
        return (
            f"{used}: inverted lists and their ids do not fit, and without them a query scans every code: "
            f"{choice.m} bytes a vector keep that scan within {format_size(SCAN_ALL_MAX_BYTES)}"
        )
    return used
