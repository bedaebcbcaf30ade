"""Building from a stream of vector batches: a reservoir sample to train and tune on, then every vector added."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from loupe.schemas.errors import DamagedOutput, UserError
from loupe.schemas.records import IndexRecord
from loupe.workers.index.choose import (
    EXACT_KINDS,
    IndexChoice,
    budget_for_recall,
    budget_note,
    choose_index,
    format_size,
    max_train_vectors,
)
from loupe.workers.index.codes import train_codes, trainable
from loupe.workers.index.fill import ExactFill
from loupe.workers.index.library import faiss
from loupe.workers.index.tune import TUNING_QUERIES, tune_search

ADD_ROWS = 4096  # 12 MB of 768-dim vectors, which faiss holds rotated, as residuals and as codes while encoding
COPY_ROWS = 4096  # rows moved into the sample at a time: the first batches fill most of it
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
    spill_dir: str | None = None,
) -> tuple[faiss.Index, IndexRecord]:
    """Build, fill and tune an inner-product index over L2-normalized float32 vectors.

    `vectors_batches` is read twice (a sample to train on and to query with, then every vector
    to add), so it is a list of arrays or a function returning a fresh iterator. Faiss ids are
    row numbers in batch order. The training sample stays within TRAIN_SHARE of the budget (or TRAIN_MIN_VECTORS);
    vectors are added batch by batch. `vectors_hint`, an upper bound on the count, sizes the
    sample before the count is known.
    """
    if not 0 < target_recall <= 1:
        raise UserError(f"the target recall must be in (0, 1], got {target_recall}")
    source = _reiterable(vectors_batches)
    started = time.perf_counter()

    # Pass 1: count, and keep a uniform sample for training and held-out tuning queries.
    sampler: Reservoir | None = None
    n = 0
    for batch in source():
        batch = as_vectors(batch, sampler.dim if sampler else None)
        if sampler is None:
            sampler = Reservoir(
                _sample_size(batch.shape[1], memory_budget_bytes, choice, vectors_hint, tuning_queries),
                batch.shape[1],
                np.random.default_rng(seed),
            )
        sampler.offer(batch, n)
        n += len(batch)
        del batch  # before the next is read: one batch in memory at a time, and none while training
    if sampler is None or n == 0:
        raise UserError("there are no vectors to index")
    dim = sampler.dim
    by_chooser = choice is None  # sized for the budget by choose_index
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

    # Pass 2: encode every vector; the exact neighbours of the queries come from the same pass.
    exact = choice.kind != "flat"
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True) if exact else None
    added = 0
    with ExactFill(index, spill_dir) as fill:
        for batch in source():
            batch = as_vectors(batch, dim)
            for start in range(0, len(batch), ADD_ROWS):
                fill.add(batch[start : start + ADD_ROWS])
            if heap is not None:
                distances, labels = faiss.knn(
                    queries, batch, min(k + 1, len(batch)), metric=faiss.METRIC_INNER_PRODUCT
                )
                heap.add_result(_pad(distances, k + 1, -np.inf), _pad(labels + added, k + 1, -1))
            added += len(batch)
            del batch
        if added != n:
            raise DamagedOutput(
                f"the vectors changed while the index was built ({n} on the first pass, {added} on the second)"
            )
        fill.finish()

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
        estimated_bytes=choice.estimated_bytes,
        budget_note=budget_note(choice, n, dim, memory_budget_bytes) if by_chooser else "",
        faiss_version=faiss.__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if recall < target_recall:
        record.target_note = f"recall@10 {recall:.3f} falls short of the target {target_recall}"
        if by_chooser and choice.kind not in EXACT_KINDS:
            record.budget_for_target = budget_for_recall(n, dim, memory_budget_bytes, target_recall, recall)
            record.target_note += (
                f": no finer code fits in {format_size(memory_budget_bytes)}; the chooser expects a budget of "
                f"{format_size(record.budget_for_target)} to reach it"
            )
        else:
            record.target_note += " at the widest search tried"
    return index, record


def _reiterable(batches: VectorSource) -> Callable[[], Iterable[np.ndarray]]:
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise TypeError(
            "build_index reads the vectors twice: pass a list of arrays or a function returning an iterator"
        )
    return lambda: batches


def as_vectors(batch: Any, dim: int | None) -> np.ndarray:
    """`batch` as a contiguous float32 matrix of `dim` columns (any when None), every value finite."""
    array = np.ascontiguousarray(batch, dtype=np.float32)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        raise UserError(f"embedding batch of shape {array.shape} does not match dimension {dim}")
    if not all(np.isfinite(array[start : start + ADD_ROWS]).all() for start in range(0, len(array), ADD_ROWS)):
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
    cap = max_train_vectors(hint, dim, budget)
    if hint:
        try:
            cap = min(cap, choose_index(hint, dim, budget).train_vectors)
        except UserError:
            pass  # the real count decides, and reports, once it is known
    return max(cap, 0) + queries


class Reservoir:
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
        for start in range(0, len(slots), COPY_ROWS):  # no copy of all the chosen rows at once
            self.vectors[slots[start : start + COPY_ROWS]] = batch[chosen[start : start + COPY_ROWS]]
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
    coded = trainable(index) is not None
    clustering = None
    if ivf is not None and _gpu_count() > 0:
        # k-means is where the time goes; a GPU flat index does its assignments, while the
        # coarse quantizer (HNSW, which has no GPU version) receives the centroids afterwards.
        # `clustering` keeps the GPU index alive: the C++ field does not own it.
        clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(train.shape[1] if coded else ivf.d, ivf.metric_type))
        ivf.clustering_index = clustering
    try:
        if coded:
            # No copies of the sample, rotated or as residuals: it is scratch here, deleted after training.
            train_codes(index, train, clustering, overwrite=True)
        else:
            index.train(train)
    finally:
        if clustering is not None:
            ivf.clustering_index = None  # GPU resources must not outlive training or reach the file
            del clustering


