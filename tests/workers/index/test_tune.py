"""Tuning: each index type reaches its target recall, with a margin for the estimate, at the cheapest setting."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from loupe.workers.index import tune
from loupe.workers.index.build import build_index
from loupe.workers.index.choose import IndexChoice
from loupe.workers.index.tune import recall_at_k, standard_error
from tests.workers.index.vectors import clustered

GB = 10**9


@pytest.mark.parametrize(
    ("choice", "target"),
    [
        (IndexChoice("flat", "Flat"), 1.0),
        (IndexChoice("hnsw", "HNSW16", hnsw_m=16), 0.95),
        (IndexChoice("ivf_flat", "IVF64,Flat", nlist=64, train_vectors=6400), 0.95),
        (IndexChoice("ivf_sq", "IVF64_HNSW32,SQ8", nlist=64, train_vectors=6400), 0.95),
        # SQ6's ceiling on these 32 tightly clustered dimensions is ~0.875.
        (IndexChoice("ivf_sq", "IVF64,SQ6", nlist=64, m=24, train_vectors=6400), 0.85),
        # PQ's ceiling is its code size: 16 bytes for 32 dimensions cannot reach 0.95.
        # (OPQ would train ten times longer; its factory strings are checked above.)
        (IndexChoice("ivf_pq", "IVF64,PQ16x8np", nlist=64, m=16, train_vectors=10_000), 0.7),
    ],
    ids=lambda value: value.kind if isinstance(value, IndexChoice) else None,
)
def test_each_index_type_reaches_its_target_recall(data, choice, target):
    batches = [data[i : i + 2500] for i in range(0, len(data), 2500)]
    index, record = build_index(
        batches, memory_budget_bytes=GB, target_recall=target, choice=choice, tuning_queries=300
    )
    assert index.ntotal == len(data) == record.vectors
    assert (record.kind, record.factory) == (choice.kind, choice.factory)
    assert record.recall_at_10 >= target
    assert record.train_vectors == choice.train_vectors
    # The recorded recall holds on fresh queries from the same distribution.
    queries = clustered(300, seed=99)
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data)
    _, truth = exact.search(queries, 10)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, truth, 10) >= target - 0.03
    if choice.kind != "flat":
        assert record.params  # nprobe or efSearch were chosen, not left at faiss's defaults


def test_tuning_leaves_a_margin_of_the_recall_estimates_error(data, monkeypatch):
    choice = IndexChoice("ivf_flat", "IVF64,Flat", nlist=64, train_vectors=6400)
    _, confident = build_index([data], memory_budget_bytes=GB, target_recall=0.9, choice=choice, tuning_queries=300)
    monkeypatch.setattr(tune, "CONFIDENCE_Z", 0.0)
    _, bare = build_index([data], memory_budget_bytes=GB, target_recall=0.9, choice=choice, tuning_queries=300)
    assert bare.params["nprobe"] <= confident.params["nprobe"]
    assert 0.9 <= bare.recall_at_10 <= confident.recall_at_10
    # The standard error of a mean of independent per-query recalls is the textbook one.
    hits = np.random.default_rng(0).binomial(10, 0.9, 4000).astype(float)
    error = standard_error(hits, np.full(4000, 10.0))
    assert error == pytest.approx(np.sqrt(0.9 * 0.1 / 40_000), rel=0.05)


def test_tuning_picks_the_cheapest_setting_that_reaches_the_target(data):
    choice = IndexChoice("ivf_flat", "IVF64,Flat", nlist=64, train_vectors=6400)
    _, low = build_index([data], memory_budget_bytes=GB, target_recall=0.8, choice=choice, tuning_queries=300)
    _, high = build_index(
        [data], memory_budget_bytes=GB, target_recall=0.99, choice=choice, tuning_queries=300
    )
    assert low.params["nprobe"] < high.params["nprobe"]
    assert 0.8 <= low.recall_at_10 < high.recall_at_10


def test_an_unreachable_target_keeps_the_cheapest_of_the_best_settings_and_says_so(data):
    # Four bits per dimension cap recall far below 0.99 whatever the number of lists probed.
    choice = IndexChoice("ivf_sq", "IVF64,SQ4", nlist=64, train_vectors=6400)
    index, record = build_index(
        [data], memory_budget_bytes=GB, target_recall=0.99, choice=choice, tuning_queries=300
    )
    assert record.recall_at_10 < record.target_recall == 0.99
    assert faiss.extract_index_ivf(index).nprobe == record.params["nprobe"] < 64
