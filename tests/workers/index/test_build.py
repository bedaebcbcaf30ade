"""Building from a stream of batches: reproducible, read twice, a uniform disjoint sample, bad vectors refused."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from loupe.schemas.errors import DamagedOutput, UserError
from loupe.workers.index.build import Reservoir, build_index
from loupe.workers.index.choose import IndexChoice

GB = 10**9


def test_builds_are_reproducible_and_read_the_source_twice(data):
    calls = []

    def source():
        calls.append(1)
        yield from (data[i : i + 4000] for i in range(0, len(data), 4000))

    choice = IndexChoice("ivf_flat", "IVF32,Flat", nlist=32, train_vectors=3200)
    first, a = build_index(source, memory_budget_bytes=GB, choice=choice, seed=3)
    second, b = build_index(source, memory_budget_bytes=GB, choice=choice, seed=3)
    assert len(calls) == 4
    assert faiss.serialize_index(first).tobytes() == faiss.serialize_index(second).tobytes()
    assert (a.params, a.recall_at_10) == (b.params, b.recall_at_10)
    with pytest.raises(TypeError, match="twice"):
        build_index(iter([data]), memory_budget_bytes=GB)


def test_bad_vectors_are_user_errors(data):
    with pytest.raises(UserError, match="dimension"):
        build_index([data[:100], data[:100, :16]], memory_budget_bytes=GB)
    broken = data[:100].copy()
    broken[5, 3] = np.nan
    with pytest.raises(UserError, match="finite"):
        build_index([broken], memory_budget_bytes=GB)
    with pytest.raises(UserError, match="no vectors"):
        build_index([], memory_budget_bytes=GB)


def test_vectors_that_change_between_the_two_reads_are_damaged_output(data):
    reads = []

    def source():
        reads.append(1)
        yield data[: 1000 if len(reads) == 1 else 900]

    with pytest.raises(DamagedOutput, match=r"changed while the index was built \(1000 .* 900") as raised:
        build_index(source, memory_budget_bytes=GB)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("stream", [1000, 30])
def test_the_sample_splits_into_disjoint_queries_and_training_rows(stream):
    reservoir = Reservoir(50, 2, np.random.default_rng(0))
    rows = np.arange(stream, dtype=np.float32)
    for start in range(0, stream, 64):
        batch = rows[start : start + 64]
        reservoir.offer(np.stack([batch, -batch], axis=1), start)
    held = min(stream, 50)
    queries, query_rows, train = reservoir.split(10, held - 10)
    assert list(queries[:, 0]) == list(query_rows) and len(train) == held - 10
    # A full reservoir's training rows are a view: no second copy of a sample that may be most
    # of the memory budget.
    assert np.shares_memory(train, reservoir.vectors) == (stream > 50)
    together = sorted([*query_rows, *train[:, 0].astype(int)])
    assert together == sorted(set(together)) and len(together) == held
    assert (train[:, 1] == -train[:, 0]).all()  # rows moved whole
    if stream > 50:
        assert max(together) > 500  # late rows are as likely as early ones


def test_the_sample_is_uniform():
    counts = np.zeros(200)
    for seed in range(300):
        reservoir = Reservoir(20, 1, np.random.default_rng(seed))
        for start in range(0, 200, 32):
            reservoir.offer(np.arange(start, min(start + 32, 200), dtype=np.float32)[:, None], start)
        _, rows, train = reservoir.split(5, 15)
        counts[rows] += 1
        counts[train[:, 0].astype(int)] += 1
    # Each row is kept with probability 20/200: 30 times in 300 draws, give or take ~5.
    assert counts.min() > 10 and counts.max() < 55 and abs(counts[:100].sum() - counts[100:].sum()) < 300
