"""Parametric OPQ: the principal axes dealt out evenly, codes that beat a random rotation and survive a round trip."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from loupe.workers.index.build import build_index
from loupe.workers.index.choose import IndexChoice
from loupe.workers.index.codes import balanced_rotation
from loupe.workers.index.tune import apply_params
from tests.workers.index.vectors import clustered

GB = 10**9


def test_balanced_rotation_deals_the_principal_axes_out_evenly():
    rng = np.random.default_rng(0)
    spread = np.arange(1, 49) ** -1.0  # variance falling as 1/i, as in the benchmark's vectors
    axes = np.linalg.qr(rng.standard_normal((48, 48)))[0]
    residuals = (rng.standard_normal((20_000, 48)) * np.sqrt(spread)) @ axes.T
    covariance = residuals.T @ residuals / len(residuals)
    rotation = balanced_rotation(covariance, 8, 40)  # 8 sub-vectors of 5
    assert rotation.shape == (40, 48)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(40), atol=1e-4)  # orthonormal rows
    variances = ((residuals @ rotation.T) ** 2).mean(axis=0)
    # The 8 axes of least spread are the ones left out...
    kept = np.sort(variances)[::-1]
    np.testing.assert_allclose(kept, spread[:40], rtol=0.05)
    # ...and every sub-vector holds one of the 8 largest: the products of their spreads are even
    # (within a factor of 3, where sub-vectors of consecutive axes would differ 20,000-fold).
    products = np.log(variances.reshape(8, 5)).sum(axis=1)
    assert products.max() - products.min() < np.log(3)
    np.testing.assert_array_equal(np.sort(variances.reshape(8, 5).max(axis=1)), np.sort(variances)[-8:])
    with pytest.raises(ValueError, match="do not split"):
        balanced_rotation(covariance, 8, 42)


def test_opq_codes_beat_a_random_rotation_and_survive_a_round_trip():
    data = clustered(16_000, dim=64)
    queries, base = data[:200], data[200:]
    truth = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    recalls = {}
    for factory in ("OPQ8_64,IVF64,PQ8x8np", "RR64,IVF64,PQ8x8np"):
        choice = IndexChoice("ivf_pq", factory, nlist=64, m=8, train_vectors=10_000)
        index, record = build_index([base], memory_budget_bytes=GB, choice=choice, tuning_queries=300)
        apply_params(index, {"nprobe": 64})
        found = index.search(queries, 10)[1]
        recalls[factory] = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
        loaded = faiss.deserialize_index(faiss.serialize_index(index))
        apply_params(loaded, {"nprobe": 64})
        assert (loaded.search(queries, 10)[1] == found).all()
    assert recalls["OPQ8_64,IVF64,PQ8x8np"] > recalls["RR64,IVF64,PQ8x8np"] + 0.03, recalls


def test_few_vectors_coded_without_lists_build_and_search_every_code():
    data = clustered(20_000, dim=64)
    queries, base = data[:200], data[200:]
    truth = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    # 1/8 of flat's bytes: 26 bytes of code a vector, no lists, nothing to tune.
    index, record = build_index([base], memory_budget_bytes=4 * 64 * len(base) // 8, tuning_queries=300)
    assert (record.kind, record.factory, record.params) == ("pq", "OPQ26_52,PQ26x8np", {})
    assert index.ntotal == len(base) and faiss.try_extract_index_ivf(index) is None
    found = index.search(queries, 10)[1]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall > 0.6 and abs(recall - record.recall_at_10) < 0.1, (recall, record.recall_at_10)
    assert len(faiss.serialize_index(index)) <= record.memory_budget


@pytest.mark.parametrize("factory", ["OPQ8_56,IVF32,PQ8x8np", "RR64,IVF32,PQ16x8np", "IVF32,SQ6", "IVF32,SQ8", "OPQ8_64,PQ8x8np", "PQ16x8np"])
def test_residuals_made_in_the_samples_own_memory_train_the_same_index(factory):
    from loupe.workers.index.codes import train_codes

    sample = clustered(12_000, dim=64)
    trained = {}
    for overwrite in (False, True):
        index = faiss.index_factory(64, factory, faiss.METRIC_INNER_PRODUCT)
        scratch = sample.copy()
        train_codes(index, scratch, overwrite=overwrite)
        index.add(sample[:2000])
        trained[overwrite] = faiss.serialize_index(index).tobytes()
        # The caller's sample is left alone unless it is scratch (and a PQ alone codes it as it is).
        assert np.array_equal(scratch, sample) == (not overwrite or factory == "PQ16x8np")
    assert trained[True] == trained[False]
