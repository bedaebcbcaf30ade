"""The FAISS library's tests: one FAISS thread, and one set of clustered vectors per module."""

from __future__ import annotations

import pytest

from tests.workers.index.vectors import clustered


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread(one_faiss_thread):
    """Every module of the FAISS library's tests runs on one FAISS thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def data():
    return clustered(12_000)
