"""choose_index on plain numbers: the index type and shape for a count, a dimension and a budget; sizes."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from loupe.schemas.errors import UserError
from loupe.workers.index.choose import (
    EXACT_KINDS,
    HNSW_MIN_M,
    SCAN_ALL_MAX_BYTES,
    TRAIN_MIN_VECTORS,
    TRAIN_SHARE,
    budget_for_recall,
    budget_note,
    choose_index,
    expected_recall,
    parse_size,
    sq_bytes,
)

GB = 10**9


def test_small_sets_are_searched_exactly():
    assert choose_index(1, 768, GB).kind == "flat"
    assert choose_index(9_999, 768, GB).factory == "Flat"


def test_hnsw_when_its_graph_fits_the_budget():
    choice = choose_index(50_000, 768, GB)
    assert (choice.kind, choice.factory, choice.hnsw_m) == ("hnsw", "HNSW32", 32)
    # Room for 4·d + 8·M bytes a vector with M = 12 only: a sparser graph, still HNSW.
    tight = choose_index(50_000, 768, 50_000 * (4 * 768 + 8 * 12))
    assert (tight.kind, tight.hnsw_m) == ("hnsw", 12)


def test_ivf_flat_below_a_million_when_hnsw_does_not_fit():
    # 1.555 GB: HNSW would get M = 4; IVF lists take 4·768 + 8 bytes a vector plus the centroids.
    choice = choose_index(500_000, 768, 1_555_000_000)
    assert choice.kind == "ivf_flat"
    assert choice.factory == "IVF2048_HNSW32,Flat"  # 4·sqrt(500k) = 2828 -> 2^11 (nearest power of two)
    assert choice.estimated_bytes == 500_000 * (4 * 768 + 8) + 2048 * (4 * 768 + 8 * 32)
    assert choice.train_vectors == 100 * 2048
    assert choice.train_vectors * 4 * 768 <= TRAIN_SHARE * 1_555_000_000


def test_large_sets_get_compressed_codes_within_the_budget():
    # The benchmark's case: a quarter of flat's memory for 1M x 768 is 768 bytes a vector, too
    # little for SQ8's 768 bytes of code plus 8 of id: SQ6, 576 bytes.
    choice = choose_index(1_000_000, 768, 768_000_000)
    assert choice.kind == "ivf_sq" and choice.factory == "IVF4096_HNSW32,SQ6"  # 4·sqrt(1M) = 4000
    assert choice.m == 768 * 6 // 8
    assert choice.estimated_bytes == 1_000_000 * (576 + 8) + 4096 * (4 * 768 + 8 * 32) + 8 * 768
    assert choice.train_vectors == int(0.75 * 768_000_000) // (4 * 768)  # 46 points a list
    # Room for a byte a dimension and the rest: SQ8.
    roomy = choose_index(1_000_000, 768, 800_000_000)
    assert (roomy.kind, roomy.factory, roomy.m) == ("ivf_sq", "IVF4096_HNSW32,SQ8", 768)
    # No code between SQ6 and SQ8 (faiss scans those ten times slower), nor between PQ's byte a
    # pair of dimensions and SQ6: the finest that fits.
    assert choose_index(1_000_000, 768, 789_000_000).factory == "IVF4096_HNSW32,SQ6"
    assert choose_index(1_000_000, 768, 600_000_000).factory == "IVF2048_HNSW32,SQ6"
    assert choose_index(1_000_000, 768, 580_000_000).factory == "OPQ384_768,IVF2048_HNSW32,PQ384x8np"


def test_below_six_bits_a_dimension_pq_behind_opq_takes_every_byte_that_fits():
    # 1/8 of flat's bytes: 384 a vector, less 8 of id and 1% of slack for the allocator, less
    # the centroids (2048 lists: 39 training points each is all the budget's sample holds), the
    # rotation and the codebooks leave 366 bytes; the ladder's step below is 362: two dimensions
    # each, the 44 least spread axes left out.
    choice = choose_index(1_000_000, 768, 384_000_000)
    assert choice.kind == "ivf_pq" and choice.factory == "OPQ362_724,IVF2048_HNSW32,PQ362x8np"
    assert (choice.m, choice.opq_dim, choice.nlist) == (362, 724, 2048)
    assert choice.estimated_bytes == (
        1_000_000 * (362 + 8) + 2048 * (4 * 724 + 8 * 32) + 4 * 768 * 724 + 4 * 256 * 724
    )
    assert 0.98 * 384_000_000 < choice.estimated_bytes <= 0.99 * 384_000_000
    # A catalog that grows by less than a step keeps its index's shape, so it is extended, not rebuilt.
    grown = choose_index(1_000_000, 768, 395_000_000).factory
    assert choose_index(1_020_000, 768, 395_000_000).factory == grown == choice.factory
    assert choose_index(1_100_000, 768, 384_000_000).factory == "OPQ317_634,IVF2048_HNSW32,PQ317x8np"
    # Up to a byte a pair of dimensions, however large the budget below SQ6's.
    assert choose_index(1_000_000, 768, 470_000_000).factory == "OPQ384_768,IVF2048_HNSW32,PQ384x8np"
    # 1/16: 173 bytes, four dimensions each.
    assert choose_index(1_000_000, 768, 192_000_000).factory == "OPQ173_692,IVF1024_HNSW32,PQ173x8np"
    # A hundred million vectors in 4 GB: 30 bytes over 25 dimensions each, an HNSW coarse quantizer.
    big = choose_index(100_000_000, 768, 4 * GB)
    assert big.factory == "OPQ30_750,IVF16384_HNSW32,PQ30x8np" and big.estimated_bytes <= 4 * GB


def test_pq_refuses_budgets_below_eight_bytes_a_vector():
    # 8 bytes of code, 8 of id, and the centroids, rotation and slack: 17 bytes a vector fit lists...
    assert choose_index(1_000_000, 64, 17_000_000).factory == "OPQ8_64,IVF1024_HNSW32,PQ8x8np"
    # ...16 do not: 8 bytes of code without lists, a scan of 8 MB a query, and no more.
    small = choose_index(1_000_000, 64, 16_000_000)
    assert (small.kind, small.factory, small.nlist) == ("pq", "OPQ8_64,PQ8x8np", None)
    assert "inverted lists and their ids do not fit" in budget_note(small, 1_000_000, 64, 16_000_000)
    assert choose_index(1_000_000, 64, 8_200_000).factory == "OPQ8_64,PQ8x8np"
    with pytest.raises(UserError, match="too small"):
        choose_index(1_000_000, 64, 8_000_000)


def test_few_vectors_in_a_small_budget_are_coded_without_lists():
    # 55,418 MiniLM vectors within 1/16 of flat's bytes, 96 a vector. Lists would cost 8 bytes of
    # id a vector and their centroids, and this few are mostly probed anyway: without them, 76 bytes
    # of code fit, a 4.2 MB scan a query.
    n, dim, budget = 55_418, 384, 5_320_128
    choice = choose_index(n, dim, budget)
    assert (choice.kind, choice.factory, choice.nlist) == ("pq", "OPQ76_380,PQ76x8np", None)
    assert choice.estimated_bytes == n * 76 + 4 * dim * 380 + 4 * 256 * 380
    assert 0.95 * budget < choice.estimated_bytes <= budget
    assert n * choice.m <= SCAN_ALL_MAX_BYTES
    # Trained on TRAIN_MIN_VECTORS, more than 3/4 of the budget holds (2,597): PQ's codebooks
    # want 39 points a word.
    assert choice.train_vectors == TRAIN_MIN_VECTORS > TRAIN_SHARE * budget / (4 * dim)
    # Twice the budget: codes that would take a longer scan get lists, whose centroids take at
    # most 1/32 of the budget (128 lists, where the sample would hold 39 points for 512).
    wider = choose_index(n, dim, 2 * budget)
    assert wider.factory == "OPQ158_316,IVF128,PQ158x8np" and n * 158 > SCAN_ALL_MAX_BYTES
    assert 4 * dim * wider.nlist <= 2 * budget / 32 < 4 * dim * 2 * wider.nlist


@pytest.mark.parametrize("dim", [64, 384, 768])
def test_the_budget_is_spent_whenever_a_finer_index_would_fit(dim):
    """Where the choice leaves more than a fifth of the budget unused, nothing finer that scans fast fits
    in it, and budget_note says which finer code would need how much."""
    n = 1_000_000
    seen = set()
    for budget in np.geomspace(n * 20, n * 4 * dim * 1.2, 60).astype(int):
        choice = choose_index(n, dim, int(budget))
        note = budget_note(choice, n, dim, int(budget))
        if choice.estimated_bytes >= 0.8 * budget:
            assert note == ""
            continue
        seen.add(choice.factory.rsplit(",", 1)[-1])
        if choice.factory.endswith(",SQ8"):
            # SQ8 is the finest code: the next finer index keeps every vector whole (IVF-Flat from
            # 1M vectors on, or HNSW), which needs 4·dim bytes a vector and more.
            assert budget < n * (4 * dim + 8 * HNSW_MIN_M)
            assert "SQ8 is the finest code" in note
        elif choice.factory.endswith(",SQ6"):
            assert budget < sq_bytes(n, dim, 8, choice.nlist, choice.hnsw_m)  # SQ8 does not fit
            assert "SQ8 needs" in note
        else:  # PQ at a byte a pair of dimensions, the most it takes; SQ6 does not fit
            assert choice.kind == "ivf_pq" and choice.m == dim // 2, (budget, choice)
            assert budget < sq_bytes(n, dim, 6, choice.nlist, choice.hnsw_m)
            assert "SQ6 needs" in note
        assert note.startswith(f"uses {choice.estimated_bytes / budget:.0%} of the ")
    assert "SQ8" in seen and "SQ6" in seen  # both gaps were crossed


@pytest.mark.parametrize("n", [10_000, 123_456, 1_000_000, 30_000_000, 2_000_000_000])
@pytest.mark.parametrize("dim", [64, 384, 768])
@pytest.mark.parametrize("budget", [10**8, GB, 16 * GB, 256 * GB])
def test_every_choice_fits_its_budget(n, dim, budget):
    try:
        choice = choose_index(n, dim, budget)
    except UserError as exc:
        assert "too small" in str(exc) and "\n" not in str(exc)
        assert budget < n * 32  # only refused when not even the smallest code fits
        return
    assert choice.estimated_bytes <= budget
    # The sample holds at most TRAIN_SHARE of the budget, or TRAIN_MIN_VECTORS however small it is.
    assert choice.train_vectors * 4 * dim <= max(TRAIN_SHARE * budget, 4 * dim * TRAIN_MIN_VECTORS)
    assert choice.train_vectors <= n
    if choice.nlist:
        assert choice.nlist & (choice.nlist - 1) == 0
        assert choice.train_vectors >= 39 * choice.nlist
        faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)  # a valid factory string


def test_more_budget_never_means_a_coarser_index():
    order = ["pq", "ivf_pq", "codes", "ivf_flat", "hnsw", "flat"]
    budgets = [10**8, 1.2 * 10**8, 1.5 * 10**8, 1.8 * 10**8, 2 * 10**8, 3 * 10**8, 7 * 10**8, 2 * GB]
    choices = [choose_index(400_000, 384, int(budget)) for budget in budgets]
    # One code a dimension (SQ6, SQ8) ranks by its bytes.
    ranks = [(order.index("codes" if c.kind == "ivf_sq" else c.kind), c.m if c.kind == "ivf_sq" else 0) for c in choices]
    assert ranks == sorted(ranks)
    assert {c.factory.rsplit(",", 1)[-1] for c in choices} >= {"SQ6", "SQ8", "HNSW32"}


def test_impossible_budgets_and_counts_are_user_errors():
    with pytest.raises(UserError, match="too small"):
        choose_index(5_000, 768, 1000)
    with pytest.raises(UserError, match="no vectors"):
        choose_index(0, 768, GB)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4GB", 4 * 10**9),
        ("512MiB", 512 << 20),
        ("1e9", 10**9),
        ("4G", 4 << 30),
        ("1.5 kb", 1500),
        ("100", 100),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "four", "4XB", "-1GB", "0", "4iB"])
def test_bad_sizes_are_user_errors(text):
    with pytest.raises(UserError, match="size"):
        parse_size(text)


def test_a_budget_left_unused_is_explained_and_a_spent_one_is_not():
    n = 1_000_000
    assert budget_note(choose_index(n, 768, 384_000_000), n, 768, 384_000_000) == ""
    half = choose_index(n, 768, 1_536_000_000)
    assert budget_note(half, n, 768, 1_536_000_000) == (
        "uses 51% of the 1.54 GB budget: SQ8 is the finest code, and an index of whole vectors (HNSW) needs 3.14 GB"
    )
    assert budget_note(choose_index(5_000, 768, GB), 5_000, 768, GB).endswith(": exact search needs no more")
    assert budget_note(choose_index(50_000, 768, GB), 50_000, 768, GB).endswith("searches no better")


def test_the_budget_named_for_a_target_is_the_smallest_expected_to_reach_it():
    n, dim, budget = 1_000_000, 768, 192_000_000
    choice = choose_index(n, dim, budget)
    assert choice.kind == "ivf_pq" and expected_recall(choice, dim) < 0.95
    # Measured as expected: the first budget whose code is expected to reach 0.95.
    named = budget_for_recall(n, dim, budget, 0.95, measured=expected_recall(choice, dim))
    assert expected_recall(choose_index(n, dim, named), dim) >= 0.95
    assert expected_recall(choose_index(n, dim, int(named / 1.05)), dim) < 0.95
    # Vectors harder than the benchmark's (0.1 short of what was expected) need a finer code still.
    harder = budget_for_recall(n, dim, budget, 0.95, measured=expected_recall(choice, dim) - 0.1)
    assert harder > named
    # Short by more than any code makes up: an index of whole vectors.
    assert choose_index(n, dim, budget_for_recall(n, dim, budget, 0.95, measured=0.2)).kind in EXACT_KINDS
    # More bits a dimension, more recall expected.
    recalls = [expected_recall(choose_index(n, dim, int(3.072 * GB * s)), dim) for s in (1 / 16, 1 / 8, 1 / 4, 1 / 2)]
    assert recalls == sorted(recalls) and recalls[0] < recalls[-1]
