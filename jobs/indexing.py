"""FAISS indexes over the stored embeddings: type from size and budget, recall-tuned, sha-checked on load."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from loupe.schemas.errors import UserError
from loupe.schemas.layout import JOB_FILE, MANIFEST_FILE
from loupe.workers.storage import Storage, join_uri, open_storage


class FaissMissing(UserError, ModuleNotFoundError):
    """Neither FAISS build is installed: the CLI prints it as one line, importers see an ImportError."""


try:
    import faiss
except ModuleNotFoundError as exc:
    if exc.name != "faiss":
        raise  # faiss is there but something it needs is not: that message says what
    raise FaissMissing(
        "faiss is not installed: pip install 'loupe[cpu]' (or 'loupe[gpu]' on CUDA 12)", name="faiss"
    ) from None

# The embedding column each kind of index is built from, and the job setting naming its model.
KINDS = {"image": "image_embedding", "caption": "caption_embedding"}
MODEL_SETTINGS = {"image": "image_embedding_model", "caption": "text_embedding_model"}
INDEX_DIR = "index"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
RECORD_FILE = "index.json"
INDEX_FORMAT = 1

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
POINTS_PER_CENTROID = 100  # k-means needs ~100 points per centroid to place it well...
MIN_POINTS_PER_CENTROID = 39  # ...and faiss warns below 39
MAX_NLIST = 1 << 18
PQ_CODE_BYTES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 8)  # best first
PQ_TRAIN_POINTS = 256 * MIN_POINTS_PER_CENTROID
LLOYD_BITS = (7, 6, 5)  # per dimension, between SQ8 and SQ4
LLOYD_TRAIN_POINTS = 65_536  # residuals the per-dimension codebooks train on: 512 per level at 7 bits
LLOYD_ITERATIONS = 40
OPQ_MIN_SUBVECTOR = 8
ID_BYTES = 8  # faiss stores an int64 id beside every code in an inverted list
# Of the memory budget, for the training sample: the index is still empty while it trains, and
# every list needs 39 points. More lists mean shorter lists to scan (1M x 768 with SQ6: 3.5 ms a
# query with 4096 lists, 9.4 ms with 2048) and smaller residuals to encode (recall@10 0.954 ->
# 0.969 from 512 to 2048 lists on 300k vectors; no gain from 2048 to 4096 at 1M).
TRAIN_SHARE = 0.75
TUNING_QUERIES = 1000
PLATEAU = 0.001  # tuning stops once recall@10 gains less than this...
PLATEAU_STEPS = 4  # ...over this many steps (4x the search width)
# A setting is taken when its measured recall, less this many standard errors, reaches the target:
# one-sided 95% confidence that the recall of queries to come does (1000 tuning queries put a
# standard error of about 0.002 on recall@10 near 0.95, so the margin is ~0.004).
CONFIDENCE_Z = 1.645
IDS_ROW_GROUP = 65_536  # search reads one row group of ids.parquet per hit, so keep them small
READ_BATCH = 16_384

_IDS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),  # position in IndexRecord.parts
        pa.field("row", pa.int64(), nullable=False),  # row number inside that part's file
    ]
)


# ---------------------------------------------------------------------------------------
# Threads


def cpu_share() -> int:
    """The CPUs this process may keep busy: its affinity mask, capped by a cgroup CPU quota
    (a container's --cpus, a Kubernetes limit) and, inside a Ray task or actor, by its num_cpus."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    for limit in (_cgroup_cpus(), _ray_cpus()):
        if limit is not None:
            # Threads beyond a fractional share are throttled, not run: round down.
            cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def _cgroup_cpus() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 means none
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _ray_cpus() -> float | None:
    ray = sys.modules.get("ray")  # never imported here: only a process Ray runs in has a share
    try:
        if ray is None or not ray.is_initialized():
            return None
        # {} in the driver; {"CPU": 2.0, ...} inside a task or an actor that reserved CPUs.
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - an older or partly started Ray: fall back to the affinity mask
        return None


def use_cpu_share() -> int:
    """Size FAISS's OpenMP pool to cpu_share(), unless OMP_NUM_THREADS says otherwise; the count."""
    # OpenMP starts one thread per core of the machine where it cannot see the quota; with more
    # threads than CPUs, its spinning workers wait on each other and searches slow down manyfold.
    if not os.environ.get("OMP_NUM_THREADS"):
        faiss.omp_set_num_threads(cpu_share())
    return faiss.omp_get_max_threads()


use_cpu_share()


# ---------------------------------------------------------------------------------------
# Choosing the index


@dataclass(frozen=True)
class IndexChoice:
    """An index type and its shape: what choose_index decided and why it fits the budget."""

    kind: str  # "flat" | "hnsw" | "ivf_flat" | "ivf_sq" | "ivf_lloyd" | "ivf_pq"
    factory: str  # faiss.index_factory string
    nlist: int | None = None  # IVF lists
    m: int | None = None  # code bytes per vector (SQ or PQ)
    hnsw_m: int | None = None  # graph degree of the HNSW index or of the IVF's coarse quantizer
    opq_dim: int | None = None  # dimension after the OPQ rotation
    train_vectors: int = 0  # size of the training sample; 0 when the index needs no training
    estimated_bytes: int = 0  # the index in memory once every vector is added


def choose_index(n_vectors: int, dim: int, memory_budget_bytes: int) -> IndexChoice:
    """The index for `n_vectors` unit vectors of `dim` within the budget, by autofaiss's rules.

    Flat below FLAT_MAX_VECTORS; else HNSW with the densest graph (8..32) that fits; else, below
    1M vectors, IVF with flat lists if they fit; else IVF (with an HNSW coarse quantizer when
    the lists are many) with the most precise codes that fit: 8 bits per dimension (SQ8), then
    7, 6 or 5 (a Lloyd-Max codebook per dimension behind a random rotation), then 4 (SQ4), then
    PQ (behind an OPQ rotation where sub-vectors are long) with the largest code. nlist is the
    power of two nearest 4·sqrt(n), lowered until the training sample (at most TRAIN_SHARE of the budget) holds MIN_POINTS_PER_CENTROID points per list.
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
    max_train = int(budget * TRAIN_SHARE) // (4 * dim)
    nlist = _nlist(n, max_train)
    if nlist is None:
        raise too_small
    train = min(n, POINTS_PER_CENTROID * nlist, max_train)
    coarse_m = HNSW_MAX_M if nlist >= COARSE_HNSW_MIN_NLIST else None
    coarse = f"IVF{nlist}_HNSW{coarse_m}" if coarse_m else f"IVF{nlist}"

    def quantizer_bytes(d: int) -> int:
        return nlist * (4 * d + (8 * coarse_m if coarse_m else 0))

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
    # codes' precision, not by how many lists are probed (200k x 768 clustered vectors, 2048
    # lists: flat lists reach recall@10 0.999 at nprobe 4, where SQ8 stops at 0.992, SQ6 at 0.971
    # and SQ4 at 0.898 however many lists are probed), so every bit counts.
    #
    # 8 bits: faiss's uniform SQ8, scanned fastest.
    size = n * (dim + ID_BYTES) + quantizer_bytes(dim) + 8 * dim
    if size <= budget:
        return IndexChoice(
            "ivf_sq", f"{coarse},SQ8", nlist=nlist, m=dim, hnsw_m=coarse_m, train_vectors=train, estimated_bytes=size
        )
    # 7 to 5 bits: a Lloyd-Max codebook per dimension (a PQ with one-dimensional sub-vectors,
    # trained by _train_lloyd_max): at equal bits the scalar code of least squared error, half
    # or less that of a uniform SQ over the sample's range (and faiss has no 5- or 7-bit SQ).
    # Behind a random rotation, as in EDEN or RaBitQ: the error of a per-dimension code grows
    # with each dimension's spread, and a query weighs most the dimensions where the data spreads
    # most (embedding models, CLIP among them, have a few dimensions of outsized variance), so
    # the rotation spreads the data, and with it the error, evenly over all dimensions: never
    # worse, often better. Same data as above: 7 bits 0.985 (even with faiss's own k-means
    # codebooks) where SQ6 stops at 0.971. (Cutting dimensions with PCA to fit SQ8 instead
    # loses more: SQ8 on 736 of the 768 dims, 0.960.)
    for bits in LLOYD_BITS:
        code = -(-dim * bits // 8)  # b-bit codes packed end to end
        size = (
            n * (code + ID_BYTES)
            + quantizer_bytes(dim)
            + 4 * dim * dim  # the rotation
            + 4 * dim * (1 << bits)  # the codebooks
        )
        if size <= budget:
            return IndexChoice(
                "ivf_lloyd",
                f"RR{dim},{coarse},PQ{dim}x{bits}np",
                nlist=nlist,
                m=code,
                hnsw_m=coarse_m,
                train_vectors=train,
                estimated_bytes=size,
            )
    # 4 bits: uniform SQ4, faster to scan than a 4-bit codebook per dimension.
    size = n * (dim // 2 + ID_BYTES) + quantizer_bytes(dim) + 8 * dim
    if size <= budget:
        return IndexChoice(
            "ivf_sq", f"{coarse},SQ4", nlist=nlist, m=dim // 2, hnsw_m=coarse_m, train_vectors=train, estimated_bytes=size
        )
    # PQ's 256-centroid codebooks want 39 points per centroid as much as the lists do.
    train = max(train, min(n, max_train, PQ_TRAIN_POINTS))
    for m in PQ_CODE_BYTES:
        if m > dim // 4:  # from here on SQ4 is as small and both better and faster to train
            continue
        padded = -(-dim // m) * m  # an OPQ rotation pads to a multiple of m
        # OPQ retrains the PQ ~50 times; it is worth it where sub-vectors are long enough for
        # uneven variance between them to hurt (its training time also grows fastest when short).
        opq = padded // m >= OPQ_MIN_SUBVECTOR
        work_dim = padded if opq else dim
        if not opq and dim % m:
            continue
        size = (
            n * (m + ID_BYTES)
            + quantizer_bytes(work_dim)
            + (4 * dim * work_dim if opq else 0)  # the rotation matrix
            + 4 * 256 * work_dim  # the PQ codebooks
        )
        if size <= budget:
            return IndexChoice(
                "ivf_pq",
                # "np": no polysemous training, which takes minutes at large m and serves only
                # Hamming-threshold filtering that this search does not use.
                f"{f'OPQ{m}_{padded},' if opq else ''}{coarse},PQ{m}x8np",
                nlist=nlist,
                m=m,
                hnsw_m=coarse_m,
                opq_dim=padded if opq else None,
                train_vectors=train,
                estimated_bytes=size,
            )
    raise too_small


def _nlist(n: int, max_train: int) -> int | None:
    nlist = min(MAX_NLIST, 2 ** round(math.log2(4 * math.sqrt(n))))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > min(n, max_train):
        nlist //= 2
    # PQ codebooks have 256 centroids each; fewer training points than that cannot train them.
    return nlist if min(n, max_train, POINTS_PER_CENTROID * nlist) >= 256 else None


# ---------------------------------------------------------------------------------------
# Sizes


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
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------------------------------
# The record


@dataclass
class IndexRecord:
    """OUTPUT/index/{kind}/index.json: how the index was built, what it holds, and its checksums."""

    kind: str
    factory: str
    params: dict[str, int]  # search parameters chosen by tune_search, applied on load
    vectors: int
    dim: int
    recall_at_10: float  # measured against exact search on held-out data vectors
    target_recall: float
    build_seconds: float
    index_sha256: str = ""
    index_bytes: int = 0
    ids_sha256: str = ""
    column: str = ""
    model: str | None = None  # the embedding model that made the vectors
    metric: str = "inner_product"
    tuning_queries: int = 0
    train_vectors: int = 0
    memory_budget: int = 0
    seed: int = 0
    # Every part whose vectors are in the index, in id order: {"path", "sha256", "rows", "vectors"}.
    parts: list[dict[str, Any]] = field(default_factory=list)
    # Vectors when recall was last measured: incremental adds keep the tuned parameters.
    tuned_vectors: int = 0
    faiss_version: str = ""
    created_at: str = ""
    format: int = INDEX_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> IndexRecord:
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        # Fields from a newer loupe are ignored rather than refused: the checksums still decide.
        return cls(**{key: value for key, value in raw.items() if key in known})


# ---------------------------------------------------------------------------------------
# Building from numpy batches

VectorSource = Callable[[], Iterable[np.ndarray]] | Sequence[np.ndarray]


def build_index(
    vectors_batches: VectorSource,
    *,
    memory_budget_bytes: int,
    target_recall: float = 0.95,
    k: int = 10,
    seed: int = 0,
    choice: IndexChoice | None = None,
    vectors_hint: int | None = None,
    tuning_queries: int = TUNING_QUERIES,
) -> tuple[faiss.Index, IndexRecord]:
    """Build, fill and tune an inner-product index over L2-normalized float32 vectors.

    `vectors_batches` is read twice (a sample to train on and to query with, then every vector
    to add), so it is a list of arrays or a function returning a fresh iterator. Faiss ids are
    row numbers in batch order. The training sample stays within TRAIN_SHARE of the budget;
    vectors are added batch by batch. `vectors_hint`, an upper bound on the count, sizes the
    sample before the count is known.
    """
    if not 0 < target_recall <= 1:
        raise UserError(f"the target recall must be in (0, 1], got {target_recall}")
    source = _reiterable(vectors_batches)
    started = time.perf_counter()

    # Pass 1: count, and keep a uniform sample for training and held-out tuning queries.
    sampler: _Reservoir | None = None
    n = 0
    for batch in source():
        batch = _as_vectors(batch, sampler.dim if sampler else None)
        if sampler is None:
            sampler = _Reservoir(
                _sample_size(batch.shape[1], memory_budget_bytes, choice, vectors_hint, tuning_queries),
                batch.shape[1],
                np.random.default_rng(seed),
            )
        sampler.offer(batch, n)
        n += len(batch)
    if sampler is None or n == 0:
        raise UserError("there are no vectors to index")
    dim = sampler.dim
    choice = choice or choose_index(n, dim, memory_budget_bytes)
    n_queries = min(tuning_queries, max(1, n // 10), sampler.filled)
    queries, query_rows, train = sampler.split(n_queries, choice.train_vectors)
    del sampler

    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if train is not None:
        _train(index, train)
        train_count = len(train)
        del train
    else:
        train_count = 0

    # Pass 2: add every vector; the exact neighbours of the queries come from the same pass.
    exact = choice.kind != "flat"
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True) if exact else None
    added = 0
    for batch in source():
        batch = _as_vectors(batch, dim)
        index.add(batch)
        if heap is not None:
            distances, labels = faiss.knn(
                queries, batch, min(k + 1, len(batch)), metric=faiss.METRIC_INNER_PRODUCT
            )
            heap.add_result(_pad(distances, k + 1, -np.inf), _pad(labels + added, k + 1, -1))
        added += len(batch)
    if added != n:
        raise UserError(
            f"the vectors changed while the index was built ({n} on the first pass, {added} on the second)"
        )

    if heap is not None:
        heap.finalize()
        params, recall = tune_search(index, queries, heap.I, target_recall, k=k, query_ids=query_rows)
    else:
        params, recall = {}, 1.0
    record = IndexRecord(
        kind=choice.kind,
        factory=choice.factory,
        params=params,
        vectors=n,
        dim=dim,
        recall_at_10=round(float(recall), 4),
        target_recall=target_recall,
        build_seconds=round(time.perf_counter() - started, 3),
        tuning_queries=len(queries),
        train_vectors=train_count,
        memory_budget=memory_budget_bytes,
        seed=seed,
        tuned_vectors=n,
        faiss_version=faiss.__version__,
        created_at=_now(),
    )
    return index, record


def _reiterable(batches: VectorSource) -> Callable[[], Iterable[np.ndarray]]:
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise TypeError(
            "build_index reads the vectors twice: pass a list of arrays or a function returning an iterator"
        )
    return lambda: batches


def _as_vectors(batch: Any, dim: int | None) -> np.ndarray:
    array = np.ascontiguousarray(batch, dtype=np.float32)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        raise UserError(f"embedding batch of shape {array.shape} does not match dimension {dim}")
    if not np.isfinite(array).all():
        raise UserError("some embeddings are not finite (NaN or infinity)")
    return array


def _pad(array: np.ndarray, width: int, fill: float) -> np.ndarray:
    if array.shape[1] == width:
        return array
    out = np.full((array.shape[0], width), fill, dtype=array.dtype)
    out[:, : array.shape[1]] = array
    return out


def _sample_size(dim: int, budget: int, choice: IndexChoice | None, hint: int | None, queries: int) -> int:
    if choice is not None:
        return choice.train_vectors + queries
    cap = int(budget * TRAIN_SHARE) // (4 * dim)
    if hint:
        try:
            cap = min(cap, choose_index(hint, dim, budget).train_vectors)
        except UserError:
            pass  # the real count decides, and reports, once it is known
    return max(cap, 0) + queries


class _Reservoir:
    """A uniform sample of fixed size from a stream of batches: the smallest random keys win."""

    def __init__(self, size: int, dim: int, rng: np.random.Generator):
        self.size, self.dim, self.rng = size, dim, rng
        self.keys = np.full(size, np.inf)
        self.vectors = np.zeros((size, dim), dtype=np.float32)  # pages are only touched when filled
        self.rows = np.full(size, -1, dtype=np.int64)

    def offer(self, batch: np.ndarray, first_row: int) -> None:
        keys = self.rng.random(len(batch))
        candidates = np.flatnonzero(keys < self.keys.max())
        if not len(candidates) or not self.size:
            return
        merged = np.concatenate([self.keys, keys[candidates]])
        keep = (
            np.argpartition(merged, self.size - 1)[: self.size]
            if len(merged) > self.size
            else np.arange(len(merged))
        )
        incoming = keep[keep >= self.size] - self.size
        stays = np.zeros(self.size, dtype=bool)
        stays[keep[keep < self.size]] = True
        slots = np.flatnonzero(~stays)[: len(incoming)]
        chosen = candidates[incoming]
        self.keys[slots] = keys[chosen]
        self.vectors[slots] = batch[chosen]
        self.rows[slots] = first_row + chosen

    @property
    def filled(self) -> int:
        return int(np.isfinite(self.keys).sum())

    def split(self, n_queries: int, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Disjoint uniform samples: (queries, their row numbers, training vectors or None).

        The keys are random, so the rows with the smallest keys are the queries and the next
        n_train train. When training takes all the rest, the queries are swapped to the end
        and the training set is a view: no second copy of a sample as large as the budget allows.
        """
        slots = np.flatnonzero(np.isfinite(self.keys))
        order = slots[np.argsort(self.keys[slots], kind="stable")]
        query_slots, train_slots = order[:n_queries], order[n_queries : n_queries + n_train]
        queries, rows = self.vectors[query_slots].copy(), self.rows[query_slots].copy()
        if not n_train:
            return queries, rows, None
        if len(order) < self.size or len(train_slots) < len(order) - n_queries:
            # A partly filled reservoir, or training on only some of its rows: copy those rows.
            return queries, rows, self.vectors[train_slots]
        tail = self.size - n_queries
        is_query = np.zeros(self.size, dtype=bool)
        is_query[query_slots] = True
        misplaced = np.flatnonzero(is_query[:tail])  # queries inside the training block...
        free = tail + np.flatnonzero(~is_query[tail:])  # ...and training rows to swap them with
        self.vectors[misplaced], self.vectors[free] = self.vectors[free], self.vectors[misplaced].copy()
        return queries, rows, self.vectors[:tail]


def _gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return get() if get is not None else 0


def _train(index: faiss.Index, train: np.ndarray) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    lloyd = _lloyd_ivf(index)
    if lloyd is not None:
        # faiss's k-means is slow on one-dimensional sub-vectors (minutes for 768 of them) and,
        # from random starts, settles far from the optimum; _train_lloyd_max replaces its result.
        lloyd.pq.cp.niter = 0
        lloyd.pq.cp.min_points_per_centroid = 1  # nor warn about its sample size, unused
    clustering = None
    if ivf is not None and _gpu_count() > 0:
        # k-means is where the time goes; a GPU flat index does its assignments, while the
        # coarse quantizer (HNSW, which has no GPU version) receives the centroids afterwards.
        # `clustering` keeps the GPU index alive: the C++ field does not own it.
        clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
        ivf.clustering_index = clustering
    try:
        index.train(train)
    finally:
        if clustering is not None:
            ivf.clustering_index = None  # GPU resources must not outlive training or reach the file
            del clustering
    if lloyd is not None:
        _train_lloyd_max(index, lloyd, train[:LLOYD_TRAIN_POINTS])


def _lloyd_ivf(index: faiss.Index) -> Any:
    """The IVF-PQ inside `index` when its PQ has one-dimensional sub-vectors, else None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    ivf = faiss.downcast_index(ivf)
    return ivf if isinstance(ivf, faiss.IndexIVFPQ) and ivf.pq.dsub == 1 else None


def _train_lloyd_max(index: faiss.Index, ivf: Any, sample: np.ndarray) -> None:
    """Set each dimension's codebook to the Lloyd-Max quantizer of the sample's IVF residuals."""
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    residuals = np.empty((len(sample), ivf.d), dtype=np.float32)
    for start in range(0, len(sample), READ_BATCH):  # a batch at a time: one copy of the sample
        vectors = _pre_transform(index, sample[start : start + READ_BATCH])
        assigned = ivf.quantizer.assign(vectors, 1).ravel()
        residuals[start : start + len(vectors)] = vectors - centroids[assigned]
    levels = ivf.pq.ksub
    codebooks = np.stack([lloyd_max(residuals[:, j], levels) for j in range(residuals.shape[1])])
    faiss.copy_array_to_vector(codebooks.astype(np.float32).ravel(), ivf.pq.centroids)
    _ready_to_add(index)


def lloyd_max(values: np.ndarray, levels: int, iterations: int = LLOYD_ITERATIONS) -> np.ndarray:
    """The `levels` reconstruction points of least squared error for `values` (1-d k-means).

    Starts from the points that are optimal at high rate for a Gaussian of the sample's mean and
    spread (their density follows p^(1/3): quantiles of a Gaussian three times as wide), which
    rotated residuals nearly are, then runs Lloyd's iterations on the sorted sample.
    """
    data = np.sort(np.asarray(values, dtype=np.float64))
    if len(data) == 0:
        return np.zeros(levels)
    sums = np.concatenate([[0.0], np.cumsum(data)])
    spread = data.std() or 1.0
    quantiles = [NormalDist().inv_cdf((i + 0.5) / levels) for i in range(levels)]
    points = data.mean() + np.sqrt(3) * spread * np.array(quantiles)
    points = np.clip(points, data[0], data[-1])
    for _ in range(iterations):
        edges = np.concatenate([[0], np.searchsorted(data, (points[1:] + points[:-1]) / 2), [len(data)]])
        counts = np.diff(edges)
        means = (sums[edges[1:]] - sums[edges[:-1]]) / np.maximum(counts, 1)
        moved = np.sort(np.where(counts > 0, means, points))  # an empty cell keeps its point
        if np.allclose(moved, points, rtol=0, atol=1e-7 * spread):
            points = moved
            break
        points = moved
    return points


def _pre_transform(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """`vectors` as the IVF inside `index` sees them: through its rotation, if it has one."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vectors = faiss.downcast_VectorTransform(index.chain.at(i)).apply(vectors)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _ready_to_add(index: faiss.Index) -> None:
    """Build the in-memory helpers that encoding needs for speed (not saved with the index)."""
    lloyd = _lloyd_ivf(index)
    if lloyd is not None:
        # Encodes one-dimensional sub-vectors ~10x faster; the codes are the same.
        lloyd.pq.sync_transposed_centroids()


# ---------------------------------------------------------------------------------------
# Tuning


def tune_search(
    index: faiss.Index,
    queries: np.ndarray,
    ground_truth: np.ndarray,
    target_recall: float,
    *,
    k: int = 10,
    query_ids: np.ndarray | None = None,
) -> tuple[dict[str, int], float]:
    """The cheapest nprobe / efSearch whose recall@k against `ground_truth` reaches the target.

    `ground_truth` holds the exact k+1 nearest ids of each query over everything in the index.
    Queries are vectors of the data, so with `query_ids` each query's own id is left out of both
    lists. Recall on a sample of queries is an estimate: a setting is taken once the estimate,
    less CONFIDENCE_Z standard errors, reaches the target, so that queries to come reach it too.
    When no setting does, the cheapest within 0.005 of the best recall (and at the target, where
    the best is) is kept; the recall returned says so. The index is left set to the parameters
    returned.
    """
    space = faiss.ParameterSpace()
    measured: list[tuple[dict[str, int], float]] = []
    best, since_best = -1.0, 0
    for params in _parameter_grid(index, k):
        space.set_index_parameters(index, _param_string(params))
        _, found = index.search(queries, k + 1)
        hits, totals = _hits_per_query(found, ground_truth, k, query_ids)
        recall = float(hits.sum() / totals.sum()) if totals.sum() else 1.0
        measured.append((params, recall))
        if recall - CONFIDENCE_Z * _standard_error(hits, totals) >= target_recall:
            return params, recall
        best, since_best = (recall, 0) if recall > best + PLATEAU else (max(best, recall), since_best + 1)
        if since_best >= PLATEAU_STEPS:
            # The codes, not the search width, limit recall now: probing up to every list
            # (a full scan per query) would cost minutes and gain nothing.
            break
    best = max(recall for _, recall in measured)
    enough = best - 0.005 if best < target_recall else max(target_recall, best - 0.005)
    params, recall = next((p, r) for p, r in measured if r >= enough)
    space.set_index_parameters(index, _param_string(params))
    return params, recall


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int, query_ids: np.ndarray | None = None) -> float:
    """Share of the exact k nearest neighbours that `found` returns in its first k, self-matches left out."""
    hits, totals = _hits_per_query(found, truth, k, query_ids)
    return float(hits.sum() / totals.sum()) if totals.sum() else 1.0


def _hits_per_query(
    found: np.ndarray, truth: np.ndarray, k: int, query_ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    hits, totals = np.zeros(len(found)), np.zeros(len(found))
    for i, (row_found, row_truth) in enumerate(zip(found, truth, strict=True)):
        own = -2 if query_ids is None else query_ids[i]
        expected = [x for x in row_truth if x >= 0 and x != own][:k]
        got = [x for x in row_found if x >= 0 and x != own][:k]
        hits[i], totals[i] = len(set(got).intersection(expected)), len(expected)
    return hits, totals


def _standard_error(hits: np.ndarray, totals: np.ndarray) -> float:
    """Standard error of the recall estimate sum(hits) / sum(totals), queries drawn at random
    (the ratio estimator's: the hits of a query's k neighbours are not independent draws)."""
    n, total = len(hits), totals.sum()
    if n < 2 or not total:
        return 0.0
    recall = hits.sum() / total
    residuals = hits - recall * totals
    return float(np.sqrt(n / (n - 1) * (residuals**2).sum()) / total)


def _parameter_grid(index: faiss.Index, k: int) -> list[dict[str, int]]:
    # Steps of about sqrt(2): fine enough that the first setting over the target is close to the
    # cheapest one, few enough that tuning costs a few dozen searches of the held-out queries.
    steps = sorted({round(2 ** (i / 2)) for i in range(41)})
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        coarse_hnsw = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
        grid = []
        for nprobe in [s for s in steps if s < ivf.nlist] + [ivf.nlist]:
            params = {"nprobe": nprobe}
            if coarse_hnsw:
                # autofaiss's rule: the graph search must surface at least nprobe good centroids.
                params["quantizer_efSearch"] = max(2 * nprobe, 16)
            grid.append(params)
        return grid
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        limit = max(index.ntotal, k + 1)
        return [{"efSearch": ef} for ef in steps if k + 1 <= ef <= limit and ef >= 16] or [
            {"efSearch": limit}
        ]
    return []


def _param_string(params: dict[str, int]) -> str:
    return ",".join(f"{key}={value}" for key, value in params.items())


def apply_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set recorded search parameters (nprobe, efSearch, ...) on a loaded index."""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, _param_string(params))


# ---------------------------------------------------------------------------------------
# OUTPUT/index/{kind}/


def index_dir(output: str, kind: str) -> str:
    return join_uri(output, INDEX_DIR, _check_kind(kind))


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def read_manifest(storage: Storage, output: str) -> dict[str, Any]:
    """OUTPUT/_manifest.json as a plain dict (keys this module does not know are kept)."""
    uri = join_uri(output, MANIFEST_FILE)
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise UserError(
            f"no {MANIFEST_FILE} in {output}: not a finished loupe job (run loupe run first)"
        ) from None
    except ValueError as exc:
        raise UserError(f"{uri} is not valid JSON ({exc})") from None


def read_job_settings(storage: Storage, output: str) -> dict[str, Any]:
    """The plan settings frozen in OUTPUT/_job.json, or {} when there is none."""
    uri = join_uri(output, JOB_FILE)
    try:
        return dict(json.loads(storage.read_bytes(uri)).get("settings") or {})
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError, TypeError) as exc:
        raise UserError(f"{uri} is not a valid job record ({exc})") from None


class _PartVectors:
    """The embedding column of the manifest's parts, streamed row group by row group.

    Each full pass also writes the (image_id, part, row) of every vector it yields to a local
    Parquet file; after build_index the last pass's file is ids.parquet, in faiss id order.
    """

    def __init__(
        self, storage: Storage, output: str, parts: list[dict[str, Any]], column: str, first_part: int = 0
    ):
        self.storage, self.output, self.parts, self.column = storage, output, parts, column
        self.first_part = first_part
        self.ids_path: str | None = None
        self.vectors_per_part: list[int] = []

    def __call__(self) -> Iterator[np.ndarray]:
        handle, path = tempfile.mkstemp(prefix="loupe-ids-", suffix=".parquet")
        os.close(handle)
        counts = []
        try:
            with pq.ParquetWriter(path, _IDS_SCHEMA, compression="zstd") as writer:
                pending: list[pa.RecordBatch] = []
                pending_rows = 0
                for number, part in enumerate(self.parts):
                    count = 0
                    for vectors, image_ids, rows in self._read_part(part):
                        count += len(vectors)
                        pending.append(
                            pa.record_batch(
                                [
                                    image_ids,
                                    pa.array(np.full(len(rows), self.first_part + number, np.int32)),
                                    pa.array(rows),
                                ],
                                schema=_IDS_SCHEMA,
                            )
                        )
                        pending_rows += len(rows)
                        if pending_rows >= IDS_ROW_GROUP:
                            pending_rows = _flush(writer, pending, IDS_ROW_GROUP)
                        yield vectors
                    counts.append(count)
                while pending:
                    _flush(writer, pending, IDS_ROW_GROUP, final=True)
        except BaseException:
            os.unlink(path)
            raise
        if self.ids_path:
            os.unlink(self.ids_path)
        self.ids_path, self.vectors_per_part = path, counts

    def _read_part(self, part: dict[str, Any]) -> Iterator[tuple[np.ndarray, pa.Array, np.ndarray]]:
        uri = join_uri(self.output, part["path"])
        try:
            with self.storage.open_seekable(uri) as stream:
                parquet = pq.ParquetFile(stream)
                if self.column not in parquet.schema_arrow.names:
                    raise UserError(
                        f"{uri} has no {self.column} column: the job did not compute these embeddings "
                        "(run it with the embed task)"
                    )
                offset = 0
                for batch in parquet.iter_batches(batch_size=READ_BATCH, columns=[self.column, "image_id"]):
                    column = batch.column(0)
                    valid = column.is_valid().to_numpy(zero_copy_only=False)
                    rows = offset + np.flatnonzero(valid)
                    offset += batch.num_rows
                    if not len(rows):
                        continue
                    kept = column.filter(column.is_valid())
                    yield _list_to_matrix(kept, uri, self.column), batch.column(1).filter(valid), rows
        except FileNotFoundError:
            raise UserError(f"{uri}, listed in the manifest, is missing") from None
        except pa.ArrowInvalid as exc:
            raise UserError(f"{uri} is not a readable Parquet part ({str(exc).splitlines()[0]})") from None


def _flush(writer: pq.ParquetWriter, pending: list[pa.RecordBatch], size: int, final: bool = False) -> int:
    """Write whole row groups of `size` rows from `pending` (all of it when final); return what is left."""
    table = pa.Table.from_batches(pending, schema=_IDS_SCHEMA)
    cut = table.num_rows if final else (table.num_rows // size) * size
    for start in range(0, cut, size):
        writer.write_table(table.slice(start, min(size, cut - start)), row_group_size=size)
    pending.clear()
    rest = table.slice(cut)
    if rest.num_rows:
        pending.extend(rest.to_batches())
    return rest.num_rows


def _list_to_matrix(column: pa.Array, uri: str, name: str) -> np.ndarray:
    if not (
        pa.types.is_fixed_size_list(column.type)
        or pa.types.is_list(column.type)
        or pa.types.is_large_list(column.type)
    ):
        raise UserError(f"{uri}: column {name} is {column.type}, not a list of floats")
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    else:
        lengths = np.unique(column.value_lengths().to_numpy(zero_copy_only=False))
        if len(lengths) != 1:
            raise UserError(f"{uri}: the {name} vectors do not all have the same length")
        dim = int(lengths[0])
    values = column.flatten()
    if values.null_count:
        raise UserError(f"{uri}: some {name} vectors have null values")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), dim)


def build_output_index(
    output: str,
    *,
    kind: str = "image",
    memory_budget: int,
    target_recall: float = 0.95,
    endpoint_url: str | None = None,
    incremental: bool = False,
    seed: int = 0,
) -> IndexRecord:
    """Index the `kind` embeddings of every part in OUTPUT's manifest under OUTPUT/index/{kind}/.

    Writes index.faiss, ids.parquet (faiss id -> image_id, part, row) and index.json, then adds
    {"index": {kind: {"path", "sha256", "vectors"}}} to _manifest.json, keeping its other keys.
    With `incremental`, parts that are new since the last build are added to the trained index
    when it still suits the total size (same choose_index result); otherwise it is rebuilt.
    """
    column = KINDS[_check_kind(kind)]
    storage = open_storage(output, endpoint_url)
    manifest = read_manifest(storage, output)
    parts = [dict(p) for p in manifest.get("parts", [])]
    if not parts:
        raise UserError(f"the job at {output} has no parts to index")
    model = read_job_settings(storage, output).get(MODEL_SETTINGS[kind])
    if incremental:
        record = _extend(storage, output, kind, column, parts, memory_budget, model)
        if record is not None:
            return record
    source = _PartVectors(storage, output, parts, column)
    try:
        index, record = build_index(
            source,
            memory_budget_bytes=memory_budget,
            target_recall=target_recall,
            seed=seed,
            vectors_hint=sum(int(p.get("rows", 0)) for p in parts) or None,
        )
    except BaseException:
        if source.ids_path:
            os.unlink(source.ids_path)
        raise
    record.column, record.model = column, model
    record.parts = [
        {"path": p["path"], "sha256": p.get("sha256", ""), "rows": p.get("rows"), "vectors": count}
        for p, count in zip(parts, source.vectors_per_part, strict=True)
    ]
    try:
        _save(storage, output, kind, index, record, source.ids_path)
    finally:
        os.unlink(source.ids_path)
    return record


def _extend(
    storage: Storage,
    output: str,
    kind: str,
    column: str,
    parts: list[dict[str, Any]],
    budget: int,
    model: str | None,
) -> IndexRecord | None:
    """Add the new parts' vectors to the existing index, or None when a full rebuild is needed."""
    folder = index_dir(output, kind)
    if not storage.exists(join_uri(folder, RECORD_FILE)):
        return None
    try:
        index, ids, record = _load(storage, output, kind, require_manifest_entry=False)
    except UserError:
        return None  # damaged or stale: rebuild from the parts
    indexed = {(p["path"], p["sha256"]) for p in record.parts}
    current = {(p["path"], p.get("sha256", "")) for p in parts}
    if not indexed <= current or record.model != model:
        return None  # a part was rewritten or removed, or another model made the vectors
    new_parts = [p for p in parts if (p["path"], p.get("sha256", "")) not in indexed]
    if not new_parts:
        _register(storage, output, kind, record)
        return record
    estimate = record.vectors + sum(int(p.get("rows", 0)) for p in new_parts)
    try:
        still = choose_index(estimate, record.dim, budget)
    except UserError:
        return None
    if (still.kind, still.factory) != (record.kind, record.factory):
        return None
    source = _PartVectors(storage, output, new_parts, column, first_part=len(record.parts))
    started = time.perf_counter()
    _ready_to_add(index)
    try:
        for batch in source():
            index.add(_as_vectors(batch, record.dim))
        handle, merged = tempfile.mkstemp(prefix="loupe-ids-", suffix=".parquet")
        os.close(handle)
        with pq.ParquetWriter(merged, _IDS_SCHEMA, compression="zstd") as writer:
            for table in (ids.table, pq.read_table(source.ids_path)):
                for start in range(0, table.num_rows, IDS_ROW_GROUP):
                    writer.write_table(
                        table.slice(start, IDS_ROW_GROUP).cast(_IDS_SCHEMA), row_group_size=IDS_ROW_GROUP
                    )
    finally:
        if source.ids_path:
            os.unlink(source.ids_path)
    record.parts += [
        {"path": p["path"], "sha256": p.get("sha256", ""), "rows": p.get("rows"), "vectors": count}
        for p, count in zip(new_parts, source.vectors_per_part, strict=True)
    ]
    record.vectors = int(index.ntotal)
    record.build_seconds = round(record.build_seconds + time.perf_counter() - started, 3)
    record.created_at = _now()
    try:
        _save(storage, output, kind, index, record, merged)
    finally:
        os.unlink(merged)
    return record


def _save(
    storage: Storage, output: str, kind: str, index: faiss.Index, record: IndexRecord, ids_path: str
) -> None:
    folder = index_dir(output, kind)
    data = faiss.serialize_index(index).tobytes()
    record.index_sha256 = hashlib.sha256(data).hexdigest()
    record.index_bytes = len(data)
    storage.write_bytes(join_uri(folder, INDEX_FILE), data)
    del data
    with open(ids_path, "rb") as handle:
        ids = handle.read()
    record.ids_sha256 = hashlib.sha256(ids).hexdigest()
    storage.write_bytes(join_uri(folder, IDS_FILE), ids)
    del ids
    # The record after the files it describes, and the manifest last: readers trust the manifest.
    storage.write_bytes(join_uri(folder, RECORD_FILE), record.to_json())
    _register(storage, output, kind, record)


def _register(storage: Storage, output: str, kind: str, record: IndexRecord) -> None:
    manifest = read_manifest(storage, output)
    entry = {
        "path": f"{INDEX_DIR}/{kind}/{INDEX_FILE}",
        "sha256": record.index_sha256,
        "vectors": record.vectors,
        "record": f"{INDEX_DIR}/{kind}/{RECORD_FILE}",
    }
    manifest.setdefault("index", {})[kind] = entry
    storage.write_bytes(
        join_uri(output, MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    )


# ---------------------------------------------------------------------------------------
# Loading


class IdMap:
    """ids.parquet held in memory: faiss ids to (image_id, part, row), one small row group at a time."""

    def __init__(self, data: bytes):
        self._file = pq.ParquetFile(io.BytesIO(data))
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._groups: dict[int, pa.Table] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def table(self) -> pa.Table:
        return self._file.read()

    def lookup(self, ids: Iterable[int]) -> list[tuple[str, int, int]]:
        """(image_id, part, row) of each faiss id, in the order given."""
        out = []
        for faiss_id in ids:
            if not 0 <= faiss_id < len(self):
                raise UserError(
                    f"the index returned id {faiss_id}, outside ids.parquet; rebuild it with loupe index"
                )
            group = int(np.searchsorted(self._starts, faiss_id, side="right") - 1)
            if group not in self._groups:
                self._groups[group] = self._file.read_row_group(group)
            table = self._groups[group]
            row = int(faiss_id - self._starts[group])
            out.append(
                (table["image_id"][row].as_py(), table["part"][row].as_py(), table["row"][row].as_py())
            )
        return out


def load_index(
    output: str, kind: str = "image", endpoint_url: str | None = None
) -> tuple[faiss.Index, IdMap, IndexRecord]:
    """The index of `kind` with its id map and record, search parameters applied.

    The index file's sha256 must equal both index.json's and the manifest's before faiss parses
    a byte of it (faiss.read_index on a crafted file can corrupt memory).
    """
    return _load(open_storage(output, endpoint_url), output, kind, require_manifest_entry=True)


def _load(
    storage: Storage, output: str, kind: str, *, require_manifest_entry: bool
) -> tuple[faiss.Index, IdMap, IndexRecord]:
    folder = index_dir(output, kind)
    missing = UserError(
        f"no {kind} index in {output}; run loupe index {output}"
        + ("" if kind == "image" else f" --kind {kind}")
    )
    entry = (read_manifest(storage, output).get("index") or {}).get(kind)
    if require_manifest_entry and entry is None:
        raise missing
    try:
        record = IndexRecord.from_json(storage.read_bytes(join_uri(folder, RECORD_FILE)))
        data = storage.read_bytes(join_uri(folder, INDEX_FILE))
        ids = storage.read_bytes(join_uri(folder, IDS_FILE))
    except FileNotFoundError:
        raise missing from None
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"{join_uri(folder, RECORD_FILE)} is not a valid index record ({exc}); rebuild it with loupe index {output}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    expected = {record.index_sha256} | ({entry.get("sha256")} if entry is not None else set())
    if expected != {digest}:
        raise UserError(
            f"{join_uri(folder, INDEX_FILE)} does not match its recorded sha256 (modified or truncated); "
            f"refusing to load it; rebuild it with loupe index {output}"
        )
    if hashlib.sha256(ids).hexdigest() != record.ids_sha256:
        raise UserError(
            f"{join_uri(folder, IDS_FILE)} does not match its recorded sha256 (modified or truncated); "
            f"rebuild it with loupe index {output}"
        )
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    del data
    id_map = IdMap(ids)
    if index.ntotal != record.vectors or len(id_map) != record.vectors:
        raise UserError(
            f"the {kind} index in {output} is inconsistent with its record; rebuild it with loupe index {output}"
        )
    apply_params(index, record.params)
    return index, id_map, record


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
