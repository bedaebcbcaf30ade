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


def test_the_brute_force_on_part_of_the_list_is_checked_and_scaled_up():
    result = time_match(3000, 60, brute_force_list=15)
    numpy = result["methods"][BRUTE_FORCE]
    assert numpy["extrapolated_from"] == 15 and numpy["seconds"] == pytest.approx(4 * numpy["measured_seconds"], abs=2e-3)
    assert numpy["pairs"] <= result["methods"]["flat"]["pairs"]
    assert "scaled linearly" in format_table(None, result)


def test_bench_pdq_command(tmp_path):
    import json

    from typer.testing import CliRunner

    from loupe.jobs.cli import app

    result = CliRunner().invoke(app, [
        "bench", "pdq", "--images", "2", "--catalog", "2000", "--list", "40", "--brute-force-list", "10",
        "--workdir", str(tmp_path), "--json",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pdq"]["images"] == 2 and set(report["match"]["methods"]) == {*METHODS, BRUTE_FORCE}
