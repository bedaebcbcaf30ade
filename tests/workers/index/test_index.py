"""Index: type choice on plain numbers, recall after tuning per type, round trips, tamper checks, extension."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from loupe.jobs import indexing as index_module
from loupe.jobs.indexing import (
    TRAIN_SHARE,
    IndexChoice,
    IndexRecord,
    build_index,
    build_output_index,
    choose_index,
    load_index,
    parse_size,
    recall_at_k,
)
from loupe.schemas.errors import UserError

GB = 10**9


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Small indexes build faster on one thread, and OpenMP's spinning threads starve when
    other test runs share the machine's cores."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# choose_index: a pure function of three numbers


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
    # little for SQ8's 768 bytes of code plus 8 of id: 7-bit Lloyd-Max codes behind a rotation.
    choice = choose_index(1_000_000, 768, 768_000_000)
    assert choice.kind == "ivf_lloyd" and choice.factory == "RR768,IVF4096_HNSW32,PQ768x7np"  # 4·sqrt(1M) = 4000
    assert choice.m == 768 * 7 // 8
    assert choice.estimated_bytes == (
        1_000_000 * (672 + 8) + 4096 * (4 * 768 + 8 * 32) + 4 * 768 * 768 + 4 * 768 * 128
    )
    assert choice.train_vectors == int(0.75 * 768_000_000) // (4 * 768)  # 46 points a list
    # Room for a byte a dimension and the rest: SQ8, scanned fastest.
    roomy = choose_index(1_000_000, 768, 800_000_000)
    assert (roomy.kind, roomy.factory) == ("ivf_sq", "IVF4096_HNSW32,SQ8")
    # Less room, fewer bits: 6, then 5 bits a dimension, then SQ4.
    assert choose_index(1_000_000, 768, 600_000_000).factory.endswith(",PQ768x6np")
    assert choose_index(1_000_000, 768, 500_000_000).factory.endswith(",PQ768x5np")
    assert choose_index(1_000_000, 768, 400_000_000).factory.endswith(",SQ4")
    # Half that budget cannot hold 39 training points for each of 4096 lists.
    assert choose_index(1_000_000, 768, 384_000_000).factory.startswith("IVF2048_HNSW32")
    # A hundred million vectors in 4 GB: PQ behind an OPQ rotation, an HNSW coarse quantizer.
    big = choose_index(100_000_000, 768, 4 * GB)
    assert big.kind == "ivf_pq" and big.factory.startswith("OPQ") and "_HNSW32," in big.factory
    assert big.factory.endswith(f"PQ{big.m}x8np") and big.m <= 768 // 4


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
    assert choice.train_vectors * 4 * dim <= TRAIN_SHARE * budget
    assert choice.train_vectors <= n
    if choice.nlist:
        assert choice.nlist & (choice.nlist - 1) == 0
        assert choice.train_vectors >= 39 * choice.nlist
        faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)  # a valid factory string


def test_more_budget_never_means_a_coarser_index():
    order = ["ivf_pq", "codes", "ivf_flat", "hnsw", "flat"]
    budgets = [10**8, 1.2 * 10**8, 1.5 * 10**8, 1.8 * 10**8, 2 * 10**8, 3 * 10**8, 7 * 10**8, 2 * GB]
    choices = [choose_index(400_000, 384, int(budget)) for budget in budgets]
    # One code a dimension (SQ4, Lloyd-Max at 5 to 7 bits, SQ8) ranks by its bytes.
    ranks = [
        (order.index("codes" if c.kind in ("ivf_sq", "ivf_lloyd") else c.kind), c.m if c.kind in ("ivf_sq", "ivf_lloyd") else 0)
        for c in choices
    ]
    assert ranks == sorted(ranks)
    assert {c.kind for c in choices} >= {"ivf_sq", "ivf_lloyd", "hnsw"}


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


# ---------------------------------------------------------------------------------------
# Recall of each index type after tuning


def clustered(n: int, dim: int = 32, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Unit vectors in clusters whose spread falls off across directions, as in real embeddings."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    centres = np.random.default_rng(1000).standard_normal((clusters, dim)).astype(np.float32) * scale
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32) * scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return clustered(12_000)


@pytest.mark.parametrize(
    ("choice", "target"),
    [
        (IndexChoice("flat", "Flat"), 1.0),
        (IndexChoice("hnsw", "HNSW16", hnsw_m=16), 0.95),
        (IndexChoice("ivf_flat", "IVF64,Flat", nlist=64, train_vectors=6400), 0.95),
        (IndexChoice("ivf_sq", "IVF64_HNSW32,SQ8", nlist=64, train_vectors=6400), 0.95),
        (IndexChoice("ivf_lloyd", "RR32,IVF64,PQ32x7np", nlist=64, m=28, train_vectors=6400), 0.95),
        # PQ's ceiling is its code size: 16 bytes for 32 dimensions cannot reach 0.95.
        # (OPQ would train ten times longer; its factory strings are checked above.)
        (IndexChoice("ivf_pq", "IVF64,PQ16x8np", nlist=64, m=16, train_vectors=10_000), 0.7),
    ],
    ids=lambda value: value.kind if isinstance(value, IndexChoice) else None,
)
def test_each_index_type_reaches_its_target_recall(data, choice, target):
    batches = [data[i : i + 2500] for i in range(0, len(data), 2500)]
    index, record = build_index(
        batches, memory_budget_bytes=GB, target_recall=target, choice=choice, tuning_queries=300
    )
    assert index.ntotal == len(data) == record.vectors
    assert (record.kind, record.factory) == (choice.kind, choice.factory)
    assert record.recall_at_10 >= target
    assert record.train_vectors == choice.train_vectors
    # The recorded recall holds on fresh queries from the same distribution.
    queries = clustered(300, seed=99)
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data)
    _, truth = exact.search(queries, 10)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, truth, 10) >= target - 0.03
    if choice.kind != "flat":
        assert record.params  # nprobe or efSearch were chosen, not left at faiss's defaults


@pytest.mark.parametrize("bits", [7, 6, 5])
def test_lloyd_max_codebooks_reach_the_least_squared_error(bits):
    rng = np.random.default_rng(bits)
    points = np.sort(index_module.lloyd_max(rng.standard_normal(65_536), 1 << bits))
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
    index_module.apply_params(loaded, record.params)
    assert (loaded.search(data[:50], 10)[1] == index.search(data[:50], 10)[1]).all()
    # A loaded index encodes new vectors exactly as the one that was trained (the fast encoder's
    # tables are rebuilt, not saved).
    index_module._ready_to_add(loaded)
    index.add(data[10_000:])
    loaded.add(data[10_000:])
    assert faiss.serialize_index(loaded).tobytes() == faiss.serialize_index(index).tobytes()


def test_tuning_leaves_a_margin_of_the_recall_estimates_error(data, monkeypatch):
    choice = IndexChoice("ivf_flat", "IVF64,Flat", nlist=64, train_vectors=6400)
    _, confident = build_index([data], memory_budget_bytes=GB, target_recall=0.9, choice=choice, tuning_queries=300)
    monkeypatch.setattr(index_module, "CONFIDENCE_Z", 0.0)
    _, bare = build_index([data], memory_budget_bytes=GB, target_recall=0.9, choice=choice, tuning_queries=300)
    assert bare.params["nprobe"] <= confident.params["nprobe"]
    assert 0.9 <= bare.recall_at_10 <= confident.recall_at_10
    # The standard error of a mean of independent per-query recalls is the textbook one.
    hits = np.random.default_rng(0).binomial(10, 0.9, 4000).astype(float)
    error = index_module._standard_error(hits, np.full(4000, 10.0))
    assert error == pytest.approx(np.sqrt(0.9 * 0.1 / 40_000), rel=0.05)


def test_tuning_picks_the_cheapest_setting_that_reaches_the_target(data):
    choice = IndexChoice("ivf_flat", "IVF64,Flat", nlist=64, train_vectors=6400)
    _, low = build_index([data], memory_budget_bytes=GB, target_recall=0.8, choice=choice, tuning_queries=300)
    _, high = build_index(
        [data], memory_budget_bytes=GB, target_recall=0.99, choice=choice, tuning_queries=300
    )
    assert low.params["nprobe"] < high.params["nprobe"]
    assert 0.8 <= low.recall_at_10 < high.recall_at_10


def test_an_unreachable_target_keeps_the_cheapest_of_the_best_settings_and_says_so(data):
    # Four bits per dimension cap recall far below 0.99 whatever the number of lists probed.
    choice = IndexChoice("ivf_sq", "IVF64,SQ4", nlist=64, train_vectors=6400)
    index, record = build_index(
        [data], memory_budget_bytes=GB, target_recall=0.99, choice=choice, tuning_queries=300
    )
    assert record.recall_at_10 < record.target_recall == 0.99
    assert faiss.extract_index_ivf(index).nprobe == record.params["nprobe"] < 64


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


# ---------------------------------------------------------------------------------------
# OUTPUT/index on local disk and S3


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def write_job(
    storage_write, output: str, vectors: np.ndarray, parts: int, *, start: int = 0, errors_every: int = 7
):
    """Parts like the job writes, error rows (null embeddings) among them; the image_id of row i
    of the whole data set is i in hex, and the first part is number `start`."""
    from loupe.workers.storage import join_uri

    entries = []
    first_row = 0
    for number in range(start):
        first_row += int(
            pq.read_metadata(pa.BufferReader(_read(output, f"parts/part-{number:05d}.parquet"))).num_rows
        )
    chunks = np.array_split(np.arange(first_row, first_row + len(vectors)), parts)
    for number, rows in enumerate(chunks, start=start):
        ids = [f"{i:032x}" for i in rows]
        error = [bool(errors_every) and i % errors_every == 3 for i in rows]
        table = pa.table(
            {
                "image_id": ids,
                "source_uri": [f"s3://photos/{i:06d}.jpg" for i in rows],
                "status": ["error" if e else "ok" for e in error],
                "caption": [None if e else f"caption {i}" for i, e in zip(rows, error)],
                "flagged": [None if e else bool(i % 3 == 0) for i, e in zip(rows, error)],
                "flagged_categories": [
                    None if e else (["violence_gore"] if i % 3 == 0 else []) for i, e in zip(rows, error)
                ],
                "image_embedding": pa.array(
                    [None if e else vectors[i - first_row].tolist() for i, e in zip(rows, error)],
                    type=embedding_type(vectors.shape[1]),
                ),
                "caption_embedding": pa.array([None] * len(rows), type=embedding_type(4)),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=500)
        data = sink.getvalue().to_pybytes()
        path = f"parts/part-{number:05d}.parquet"
        storage_write(join_uri(output, path), data)
        entries.append(
            {
                "path": path,
                "shard_id": number,
                "rows": len(rows),
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
            }
        )
    return entries


def _read(output: str, path: str) -> bytes:
    from loupe.workers.storage import join_uri, open_storage

    return open_storage(output).read_bytes(join_uri(output, path))


def write_manifest(storage_write, output: str, parts: list[dict], **extra):
    from loupe.workers.storage import join_uri

    manifest = {
        "complete": True,
        "shards_total": len(parts),
        "rows_ok": sum(p["rows"] for p in parts),
        "rows_error": 0,
        "parts": parts,
        "failed_shards": [],
        "listing_sha256": "0" * 64,
        "written_at": "2026-01-01T00:00:00+00:00",
        "loupe_format": 1,
        **extra,
    }
    storage_write(join_uri(output, "_manifest.json"), json.dumps(manifest).encode())
    job = {
        "settings": {
            "image_embedding_model": "clip-test",
            "text_embedding_model": "minilm-test",
            "tasks": ["caption", "embed"],
        },
        "listing_sha256": "0" * 64,
        "objects": 0,
        "shards": len(parts),
        "created_at": "2026-01-01T00:00:00+00:00",
        "loupe_format": 1,
    }
    storage_write(join_uri(output, "_job.json"), json.dumps(job).encode())


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An OUTPUT URI (a folder, or a prefix in a fresh bucket) and its storage's endpoint."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/jobs/out", endpoint


def storage_for(output, endpoint):
    from loupe.workers.storage import open_storage

    return open_storage(output, endpoint)


def test_build_and_load_round_trip(output, data, monkeypatch):
    monkeypatch.setattr(index_module, "IDS_ROW_GROUP", 500)  # so lookups cross row groups
    uri, endpoint = output
    storage = storage_for(uri, endpoint)
    vectors = data[:3000]
    parts = write_job(storage.write_bytes, uri, vectors, 3)
    write_manifest(storage.write_bytes, uri, parts, custom_key={"kept": True})

    record = build_output_index(
        uri, kind="image", memory_budget=GB, target_recall=0.95, endpoint_url=endpoint
    )
    ok_rows = [i for i in range(len(vectors)) if i % 7 != 3]
    assert record.vectors == len(ok_rows)
    assert (record.kind, record.column, record.model) == ("flat", "image_embedding", "clip-test")
    assert [p["path"] for p in record.parts] == [p["path"] for p in parts]
    assert sum(p["vectors"] for p in record.parts) == record.vectors

    manifest = json.loads(storage.read_bytes(f"{uri}/_manifest.json"))
    assert manifest["custom_key"] == {"kept": True} and manifest["parts"] == parts
    assert manifest["index"]["image"] == {
        "path": "index/image/index.faiss",
        "sha256": record.index_sha256,
        "vectors": record.vectors,
        "record": "index/image/index.json",
    }
    assert IndexRecord.from_json(storage.read_bytes(f"{uri}/index/image/index.json")) == record

    index, ids, loaded = load_index(uri, "image", endpoint)
    assert loaded == record and index.ntotal == record.vectors
    assert (
        pq.ParquetFile(pa.BufferReader(storage.read_bytes(f"{uri}/index/image/ids.parquet"))).num_row_groups
        == 6
    )
    # Every stored vector finds itself, and the id map leads back to its row in its part.
    sample = ok_rows[::47]
    _, found = index.search(vectors[sample], 1)
    for row, (faiss_id,) in zip(sample, found):
        image_id, part, part_row = ids.lookup([int(faiss_id)])[0]
        assert image_id == f"{row:032x}"
        table = pq.read_table(pa.BufferReader(storage.read_bytes(f"{uri}/{record.parts[part]['path']}")))
        assert table["image_id"][part_row].as_py() == image_id


def test_an_approximate_index_on_s3_keeps_its_tuned_parameters(s3_endpoint, s3_bucket, data):
    uri = f"s3://{s3_bucket}/big"
    storage = storage_for(uri, s3_endpoint)
    parts = write_job(storage.write_bytes, uri, data, 4, errors_every=0)
    write_manifest(storage.write_bytes, uri, parts)
    record = build_output_index(uri, memory_budget=10**6, target_recall=0.9, endpoint_url=s3_endpoint)
    assert record.kind == "ivf_sq" and record.vectors == len(data)
    assert record.recall_at_10 >= 0.9 and record.params["nprobe"] >= 1
    index, _, _ = load_index(uri, "image", s3_endpoint)
    assert faiss.extract_index_ivf(index).nprobe == record.params["nprobe"]


@pytest.fixture
def built(tmp_path, data):
    from loupe.workers.storage import LocalStorage

    uri = str(tmp_path / "out")
    storage = LocalStorage()
    parts = write_job(storage.write_bytes, uri, data[:2000], 2)
    write_manifest(storage.write_bytes, uri, parts)
    record = build_output_index(uri, memory_budget=GB)
    return uri, storage, parts, record


@pytest.fixture
def faiss_must_not_parse(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("faiss parsed an index file that failed its checksum")

    monkeypatch.setattr(index_module.faiss, "deserialize_index", refuse)
    monkeypatch.setattr(index_module.faiss, "read_index", refuse)


def _one_line_error(uri: str, match: str) -> str:
    with pytest.raises(UserError, match=match) as raised:
        load_index(uri, "image")
    assert "\n" not in str(raised.value)
    return str(raised.value)


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_tampered_index_files_are_refused_before_faiss_reads_them(built, faiss_must_not_parse, damage):
    uri, _, _, _ = built
    path = Path(uri, "index/image/index.faiss")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data += b"\0" * 8
    path.write_bytes(bytes(data))
    message = _one_line_error(uri, "does not match its recorded sha256")
    assert "index.faiss" in message and "loupe index" in message


def test_a_file_matching_a_forged_record_is_still_refused_by_the_manifest(built, faiss_must_not_parse):
    uri, _, _, record = built
    forged = faiss.serialize_index(faiss.IndexFlatIP(record.dim)).tobytes()
    Path(uri, "index/image/index.faiss").write_bytes(forged)
    record.index_sha256 = hashlib.sha256(forged).hexdigest()
    Path(uri, "index/image/index.json").write_bytes(record.to_json())
    _one_line_error(uri, "does not match its recorded sha256")


def test_a_tampered_id_map_is_refused(built):
    uri, _, _, _ = built
    path = Path(uri, "index/image/ids.parquet")
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_error(uri, "ids.parquet does not match")


def test_missing_index_says_how_to_build_it(tmp_path, data):
    from loupe.workers.storage import LocalStorage

    uri = str(tmp_path / "out")
    parts = write_job(LocalStorage().write_bytes, uri, data[:100], 1)
    write_manifest(LocalStorage().write_bytes, uri, parts)
    message = _one_line_error(uri, "no image index")
    assert message.endswith(f"run loupe index {uri}")
    with pytest.raises(UserError, match="no _manifest.json"):
        load_index(str(tmp_path / "elsewhere"), "image")


def test_parts_without_the_column_or_vectors_are_user_errors(tmp_path, data):
    from loupe.workers.storage import LocalStorage

    uri = str(tmp_path / "out")
    parts = write_job(LocalStorage().write_bytes, uri, data[:100], 1)
    write_manifest(LocalStorage().write_bytes, uri, parts)
    with pytest.raises(UserError, match="no vectors"):
        build_output_index(uri, kind="caption", memory_budget=GB)  # every caption_embedding is null
    with pytest.raises(UserError, match="unknown index kind"):
        build_output_index(uri, kind="audio", memory_budget=GB)


# ---------------------------------------------------------------------------------------
# Extending


def test_new_parts_are_added_without_retraining(tmp_path, data, monkeypatch):
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    first = write_job(storage.write_bytes, uri, data[:10_500], 4, errors_every=0)
    write_manifest(storage.write_bytes, uri, first)
    before = build_output_index(uri, memory_budget=10**6, target_recall=0.9)
    assert before.kind == "ivf_sq"

    more = write_job(storage.write_bytes, uri, data[10_500:], 1, start=4, errors_every=0)
    # Part ids continue where the first run stopped: rows 10500.. are in part 4.
    write_manifest(storage.write_bytes, uri, first + more)
    monkeypatch.setattr(index_module, "build_index", lambda *a, **k: pytest.fail("retrained"))
    after = build_output_index(uri, memory_budget=10**6, target_recall=0.9, incremental=True)
    assert after.vectors == 12_000 and len(after.parts) == 5
    assert (after.factory, after.params, after.train_vectors) == (
        before.factory,
        before.params,
        before.train_vectors,
    )
    assert after.tuned_vectors == 10_500

    index, ids, _ = load_index(uri, "image")
    _, found = index.search(data[11_990:11_991], 1)
    assert ids.lookup([int(found[0, 0])])[0][:2] == (f"{11_990:032x}", 4)
    # Nothing new: the index is left as it is.
    again = build_output_index(uri, memory_budget=10**6, incremental=True)
    assert again.index_sha256 == after.index_sha256


def test_extending_past_what_the_index_suits_rebuilds_it(tmp_path, data):
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    first = write_job(storage.write_bytes, uri, data[:3000], 1, errors_every=0)
    write_manifest(storage.write_bytes, uri, first)
    assert build_output_index(uri, memory_budget=GB).kind == "flat"
    more = write_job(storage.write_bytes, uri, data[3000:], 2, start=1, errors_every=0)
    write_manifest(storage.write_bytes, uri, first + more)
    after = build_output_index(uri, memory_budget=GB, incremental=True)
    assert after.kind == "hnsw" and after.vectors == len(data) and after.tuned_vectors == len(data)


@pytest.mark.parametrize("stream", [1000, 30])
def test_the_sample_splits_into_disjoint_queries_and_training_rows(stream):
    reservoir = index_module._Reservoir(50, 2, np.random.default_rng(0))
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
        reservoir = index_module._Reservoir(20, 1, np.random.default_rng(seed))
        for start in range(0, 200, 32):
            reservoir.offer(np.arange(start, min(start + 32, 200), dtype=np.float32)[:, None], start)
        _, rows, train = reservoir.split(5, 15)
        counts[rows] += 1
        counts[train[:, 0].astype(int)] += 1
    # Each row is kept with probability 20/200: 30 times in 300 draws, give or take ~5.
    assert counts.min() > 10 and counts.max() < 55 and abs(counts[:100].sum() - counts[100:].sum()) < 300
