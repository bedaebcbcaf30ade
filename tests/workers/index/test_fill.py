"""Filling an index through spilled codes: the index `add` makes, holding its codes once, and a full disk said plainly."""

from __future__ import annotations

import ctypes
import errno
import os

import faiss
import numpy as np
import pytest

from loupe.schemas.errors import UserError
from loupe.workers.index import fill as fill_module
from loupe.workers.index.build import build_index
from loupe.workers.index.choose import IndexChoice
from loupe.workers.index.fill import ExactFill, list_numbers

GB = 10**9
CHOICES = [
    IndexChoice("ivf_flat", "IVF64,Flat", nlist=64, train_vectors=3000),
    IndexChoice("ivf_sq", "IVF300,SQ8", nlist=300, m=32, train_vectors=9000),  # two-byte list numbers
    IndexChoice("ivf_sq", "IVF64_HNSW32,SQ8", nlist=64, m=32, hnsw_m=32, train_vectors=3000),
    IndexChoice("ivf_sq", "IVF64,SQ6", nlist=64, m=24, train_vectors=6400),
    IndexChoice("ivf_pq", "OPQ8_32,IVF64,PQ8x8np", nlist=64, m=8, opq_dim=32, train_vectors=10_000),
]


def _empty_copy(index: faiss.Index) -> faiss.Index:
    empty = faiss.clone_index(index)
    empty.reset()
    return empty


@pytest.mark.parametrize("choice", CHOICES, ids=lambda choice: choice.factory)
def test_an_index_filled_through_the_spill_is_the_one_add_makes(data, choice, tmp_path):
    trained, _ = build_index([data], memory_budget_bytes=GB, choice=choice, tuning_queries=200)
    added, filled = _empty_copy(trained), _empty_copy(trained)
    with ExactFill(filled, str(tmp_path)) as fill:
        for start in range(0, len(data), 5000):
            added.add(data[start : start + 5000])
            fill.add(data[start : start + 5000])
        fill.finish()
    assert filled.ntotal == added.ntotal == len(data)
    assert np.array_equal(faiss.serialize_index(filled), faiss.serialize_index(added))
    assert os.listdir(tmp_path) == []  # the spill file had no name and is gone


def test_list_numbers_read_the_coarse_code_little_endian():
    codes = np.array([[0x2C, 0x01, 7], [0xFF, 0x00, 9], [0x00, 0x00, 1]], dtype=np.uint8)
    assert list_numbers(codes, 2).tolist() == [300, 255, 0]


def test_an_index_that_already_holds_vectors_or_is_not_ivf_is_added_to_directly(data):
    flat = faiss.IndexFlatIP(data.shape[1])
    fill = ExactFill(flat)
    fill.add(data[:100])
    fill.finish()
    assert flat.ntotal == 100 and fill.spill is None

    ivf = faiss.index_factory(data.shape[1], "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(data[:2000])
    ivf.add(data[:10])
    with ExactFill(ivf) as fill:  # reserving lists that hold entries would move them
        fill.add(data[10:100])
        fill.finish()
    assert ivf.ntotal == 100 and fill.spill is None
    assert ivf.search(data[50:51], 1)[1][0, 0] == 50


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2): what faiss's vectors hold."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def test_the_filled_lists_hold_their_codes_once_where_add_holds_more():
    dim, n = 64, 200_000
    rng = np.random.default_rng(0)
    trained = faiss.index_factory(dim, "IVF256,SQ8", faiss.METRIC_INNER_PRODUCT)
    trained.train(rng.standard_normal((10_000, dim), dtype=np.float32))
    held = {}
    for way in ("add", "exact"):
        index = _empty_copy(trained)
        before = _heap_in_use()
        fill = ExactFill(index) if way == "exact" else None
        for start in range(0, n, 16_384):
            vectors = np.random.default_rng(start).standard_normal((min(16_384, n - start), dim), dtype=np.float32)
            fill.add(vectors) if fill else index.add(vectors)
            del vectors
        if fill:
            fill.finish()
        held[way] = (_heap_in_use() - before) / (n * (dim + 8))  # SQ8 codes and int64 ids
        del index
    assert held["exact"] < 1.02
    assert held["add"] > 1.15  # the doubling lists this replaces: were they not, the test would show nothing


class _FullDisk:
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        pass


def test_a_full_disk_while_spilling_is_one_line_naming_tmpdir(data, monkeypatch, tmp_path):
    monkeypatch.setattr(fill_module.tempfile, "TemporaryFile", lambda **_: _FullDisk())
    with pytest.raises(UserError, match=f"^no room to hold the index's codes while it is built in {tmp_path}: .*TMPDIR"):
        build_index([data], memory_budget_bytes=GB, choice=CHOICES[0], tuning_queries=200, spill_dir=str(tmp_path))
