"""The held searcher against `loupe search` on an IVF index, where filters widen the probe."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from loupe.jobs.indexing import build_output_index
from loupe.jobs.search import search
from loupe.jobs.serve.catalog import Catalog
from loupe.jobs.serve.query import Filters, Searcher
from loupe.workers.index.library import faiss
from tests.jobs.test_search import image_rows, unit, write_catalog


@pytest.fixture(scope="module")
def ivf_output(tmp_path_factory, tiny_clip):
    """12,000 clustered vectors in an IVF index tuned to a few lists; 15 rows flagged self_harm."""
    from loupe.workers.models.embedder import ImageEmbedder

    dim = ImageEmbedder(tiny_clip, device="cpu").dim
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((30, dim))
    vectors = unit(centres[rng.integers(0, 30, 12_000)] + 0.5 * rng.standard_normal((12_000, dim)))
    output = str(tmp_path_factory.mktemp("ivf") / "out")
    rows = image_rows(12_000, vectors, lambda i: ["self_harm"] if i % 800 == 5 else [])
    write_catalog(output, rows, image_model=tiny_clip, parts=4)
    assert build_output_index(output, memory_budget=10**6, target_recall=0.9).kind.startswith("ivf_")
    return output


@pytest.fixture(scope="module")
def searcher(ivf_output):
    return Searcher(Catalog.open(ivf_output), "image")


@pytest.mark.parametrize(
    "k, filters, kwargs",
    [
        (10, Filters(), {}),
        (10, Filters(flagged="self_harm"), {"flagged": "self_harm"}),
        (20, Filters(flagged="self_harm"), {"flagged": "self_harm"}),
        (25, Filters(exclude_flagged=True), {"exclude_flagged": True}),
    ],
)
def test_the_same_hits_as_loupe_search_and_the_tuned_probe_kept(searcher, ivf_output, k, filters, kwargs):
    query = "a photo of a cat"
    expected = [hit.to_dict() for hit in search(ivf_output, text=query, k=k, **kwargs)]
    assert [hit.to_dict() for hit in searcher.search(searcher.text_vector(query), k, filters)] == expected
    assert faiss.extract_index_ivf(searcher.index).nprobe == searcher.record.params["nprobe"]


def test_concurrent_widening_searches_do_not_disturb_each_other(searcher, ivf_output):
    queries = ["a photo of a cat", "a red car", "mountains", "a bowl of soup"]
    expected = {q: [h.to_dict() for h in search(ivf_output, text=q, k=12, flagged="self_harm")] for q in queries}
    plain = {q: [h.to_dict() for h in search(ivf_output, text=q, k=12)] for q in queries}

    def one(i: int):
        q = queries[i % len(queries)]
        filters = Filters(flagged="self_harm") if i % 2 else Filters()
        return i, [h.to_dict() for h in searcher.search(searcher.text_vector(q), 12, filters)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        for i, hits in pool.map(one, range(32)):
            q = queries[i % len(queries)]
            assert hits == (expected[q] if i % 2 else plain[q])
