"""Lloyd-Max codes: codebooks of least squared error, the same codes after a round trip and later adds."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from loupe.workers.index.build import build_index
from loupe.workers.index.choose import IndexChoice
from loupe.workers.index.codes import lloyd_max, ready_to_add
from loupe.workers.index.tune import apply_params

GB = 10**9


@pytest.mark.parametrize("bits", [7, 6, 5])
def test_lloyd_max_codebooks_reach_the_least_squared_error(bits):
    rng = np.random.default_rng(bits)
    points = np.sort(lloyd_max(rng.standard_normal(65_536), 1 << bits))
    fresh = rng.standard_normal(200_000)
    nearest = points[np.searchsorted((points[1:] + points[:-1]) / 2, fresh)]
    error = ((nearest - fresh) ** 2).mean()
    # Panter and Dite's high-rate error of the optimal quantizer of a unit Gaussian: sqrt(3)·pi/2
    # per 4^bits; a uniform quantizer over the sample's range makes over twice as much.
    optimal = np.sqrt(3) * np.pi / 2 / 4**bits
    assert 0.9 * optimal < error < 1.1 * optimal
    uniform_step = (fresh.max() - fresh.min()) / (1 << bits)
    assert error < 0.5 * uniform_step**2 / 12


def test_lloyd_codes_survive_a_round_trip_and_later_adds(data):
    choice = IndexChoice("ivf_lloyd", "RR32,IVF64,PQ32x7np", nlist=64, m=28, train_vectors=6400)
    index, record = build_index([data[:10_000]], memory_budget_bytes=GB, choice=choice, tuning_queries=300)
    loaded = faiss.deserialize_index(faiss.serialize_index(index))
    apply_params(loaded, record.params)
    assert (loaded.search(data[:50], 10)[1] == index.search(data[:50], 10)[1]).all()
    # A loaded index encodes new vectors exactly as the one that was trained (the fast encoder's
    # tables are rebuilt, not saved).
    ready_to_add(loaded)
    index.add(data[10_000:])
    loaded.add(data[10_000:])
    assert faiss.serialize_index(loaded).tobytes() == faiss.serialize_index(index).tobytes()
