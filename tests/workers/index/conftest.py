"""The FAISS library's tests: one FAISS thread, and one set of clustered vectors per module."""

from __future__ import annotations

import faiss
import pytest

from tests.workers.index.vectors import clustered


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Small indexes build faster on one thread, and OpenMP's spinning threads starve when
    other test runs share the machine's cores."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return clustered(12_000)
