"""Search parameters (nprobe, efSearch) tuned to a recall target measured against exact search."""

from __future__ import annotations

import numpy as np

from loupe.workers.index.library import faiss

TUNING_QUERIES = 1000
PLATEAU = 0.001  # tuning stops once recall@10 gains less than this...
PLATEAU_STEPS = 4  # ...over this many steps (4x the search width)
# A setting is taken when its measured recall, less this many standard errors, reaches the target:
# one-sided 95% confidence that the recall of queries to come does (1000 tuning queries put a
# standard error of about 0.002 on recall@10 near 0.95, so the margin is ~0.004).
CONFIDENCE_Z = 1.645


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
    measured: list[tuple[dict[str, int], float]] = []
    best, since_best = -1.0, 0
    for params in _parameter_grid(index, k):
        apply_params(index, params)
        _, found = index.search(queries, k + 1)
        hits, totals = _hits_per_query(found, ground_truth, k, query_ids)
        recall = float(hits.sum() / totals.sum()) if totals.sum() else 1.0
        measured.append((params, recall))
        if recall - CONFIDENCE_Z * standard_error(hits, totals) >= target_recall:
            return params, recall
        best, since_best = (recall, 0) if recall > best + PLATEAU else (max(best, recall), since_best + 1)
        if since_best >= PLATEAU_STEPS:
            # The codes, not the search width, limit recall now: probing up to every list
            # (a full scan per query) would cost minutes and gain nothing.
            break
    best = max(recall for _, recall in measured)
    enough = best - 0.005 if best < target_recall else max(target_recall, best - 0.005)
    params, recall = next((p, r) for p, r in measured if r >= enough)
    apply_params(index, params)
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


def standard_error(hits: np.ndarray, totals: np.ndarray) -> float:
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
    return [{}]  # codes without lists or graph: every one is scanned, nothing to tune


def _param_string(params: dict[str, int]) -> str:
    return ",".join(f"{key}={value}" for key, value in params.items())


def apply_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set recorded search parameters (nprobe, efSearch, ...) on a loaded index."""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, _param_string(params))

