"""The PDQ benchmark's functions, run small: real photos timed, and every matching method agreeing on the same pairs."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.jobs.bench.pdq import BRUTE_FORCE, format_table, match_inputs, pdq_like_codes, time_match, time_pdq
from loupe.workers.index.hamming import METHODS
from tests.photos import PHOTOS, photo


def test_time_pdq_on_real_photos():
    result = time_pdq([photo(name) for name in PHOTOS], repeats=1)
    assert result["images"] == len(PHOTOS)
    assert 0 < result["ms_median"] <= result["ms_max"]
    assert result["megapixels_max"] == pytest.approx(640 * 427 / 1e6, abs=1e-3)  # the rocket
    assert "PDQ:" in format_table(result, None)


def test_match_inputs_are_pdq_like_with_planted_copies():
    codes = pdq_like_codes(50, np.random.default_rng(0))
    assert (np.unpackbits(codes, axis=1).sum(axis=1) == 128).all()
    catalog, known = match_inputs(1000, 40)
    assert catalog.shape == (1000, 32) and known.shape == (40, 32)


def test_every_method_finds_the_same_pairs():
    result = time_match(3000, 60)
    assert list(result["methods"]) == [*METHODS, BRUTE_FORCE]
    pairs = {t["pairs"] for t in result["methods"].values()}
    assert len(pairs) == 1 and pairs.pop() > 0  # about half the planted copies are within 31 bits
    assert "multihash" in format_table(None, result)
