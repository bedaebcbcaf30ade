"""Indexes over OUTPUT: built from the parts, registered, sha-checked on load, extended; damage named."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from loupe.jobs import indexing as index_module
from loupe.jobs.cli import app
from loupe.jobs.indexing import build_output_index, load_index
from loupe.schemas.errors import DamagedOutput, UserError
from loupe.schemas.records import IndexRecord
from loupe.workers.index import ids as ids_module
from tests.workers.index.vectors import clustered

GB = 10**9

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def data():
    return clustered(12_000)


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


def grow(storage, output: str, parts: list[dict]) -> None:
    """A manifest listing `parts` that keeps the index entries, as the job's next manifest does."""
    current = json.loads(storage.read_bytes(f"{output}/_manifest.json"))
    write_manifest(storage.write_bytes, output, parts, index=current.get("index", {}))


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
    monkeypatch.setattr(ids_module, "IDS_ROW_GROUP", 500)  # so lookups cross row groups
    uri, endpoint = output
    storage = storage_for(uri, endpoint)
    vectors = data[:3000]
    parts = write_job(storage.write_bytes, uri, vectors, 3)
    write_manifest(storage.write_bytes, uri, parts, failed_shards=[7], written_at="2025-06-30T12:00:00+00:00")

    record = build_output_index(
        uri, kind="image", memory_budget=GB, target_recall=0.95, endpoint_url=endpoint
    )
    ok_rows = [i for i in range(len(vectors)) if i % 7 != 3]
    assert record.vectors == len(ok_rows)
    assert (record.kind, record.column, record.model) == ("flat", "image_embedding", "clip-test")
    assert [p["path"] for p in record.parts] == [p["path"] for p in parts]
    assert sum(p["vectors"] for p in record.parts) == record.vectors

    manifest = json.loads(storage.read_bytes(f"{uri}/_manifest.json"))
    # The job's own entries are kept: `loupe index` adds its entry and changes nothing else.
    assert (manifest["failed_shards"], manifest["written_at"]) == ([7], "2025-06-30T12:00:00+00:00")
    assert manifest["parts"] == parts
    assert manifest["index"]["image"] == {
        "path": "index/image/build-00001.index.faiss",
        "sha256": record.index_sha256,
        "vectors": record.vectors,
        "record": "index/image/build-00001.index.json",
        "ids": "index/image/build-00001.ids.parquet",
    }
    assert IndexRecord.from_json(storage.read_bytes(f"{uri}/index/image/build-00001.index.json")) == record

    index, ids, loaded = load_index(uri, "image", endpoint)
    assert loaded == record and index.ntotal == record.vectors
    ids_file = storage.read_bytes(f"{uri}/index/image/build-00001.ids.parquet")
    assert pq.ParquetFile(pa.BufferReader(ids_file)).num_row_groups == 6
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

    monkeypatch.setattr(faiss, "deserialize_index", refuse)
    monkeypatch.setattr(faiss, "read_index", refuse)


def registered(uri: str, key: str = "path", kind: str = "image") -> Path:
    """The local file the manifest's `kind` index entry names under `key` (path, ids, record)."""
    return Path(uri, json.loads(Path(uri, "_manifest.json").read_text())["index"][kind][key])


def _one_line_error(uri: str, match: str, error: type[Exception] = DamagedOutput) -> str:
    with pytest.raises(error, match=match) as raised:
        load_index(uri, "image")
    assert "\n" not in str(raised.value)
    return str(raised.value)


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_tampered_index_files_are_refused_before_faiss_reads_them(built, faiss_must_not_parse, damage):
    uri, _, _, _ = built
    path = registered(uri)
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
    registered(uri).write_bytes(forged)
    record.index_sha256 = hashlib.sha256(forged).hexdigest()
    registered(uri, "record").write_bytes(record.to_json())
    _one_line_error(uri, "does not match its recorded sha256")


def test_a_tampered_id_map_is_refused(built):
    uri, _, _, _ = built
    path = registered(uri, "ids")
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_error(uri, "ids.parquet does not match")


def test_missing_index_says_how_to_build_it(tmp_path, data):
    from loupe.workers.storage import LocalStorage

    uri = str(tmp_path / "out")
    parts = write_job(LocalStorage().write_bytes, uri, data[:100], 1)
    write_manifest(LocalStorage().write_bytes, uri, parts)
    message = _one_line_error(uri, "no image index", UserError)
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


def test_damaged_parts_are_named_in_one_line(tmp_path, data):
    from loupe.workers.storage import LocalStorage

    uri = str(tmp_path / "out")
    parts = write_job(LocalStorage().write_bytes, uri, data[:300], 3)
    write_manifest(LocalStorage().write_bytes, uri, parts)
    second = Path(uri, parts[1]["path"])

    def refused(match: str) -> None:
        with pytest.raises(DamagedOutput, match=re.escape(f"{second}{match}")) as raised:
            build_output_index(uri, memory_budget=GB)
        assert "\n" not in str(raised.value)

    second.write_bytes(b"PAR1 not a Parquet file PAR1")
    refused(" is not a readable Parquet part")
    table = pq.read_table(pa.BufferReader(_read(uri, parts[0]["path"])))
    column = table.schema.get_field_index("image_embedding")
    pq.write_table(table.set_column(column, "image_embedding", pa.array(["0.5"] * len(table))), second)
    refused(": column image_embedding is string, not a list of floats")
    second.unlink()
    refused(", listed in the manifest, is missing")


def test_vectors_that_change_while_the_index_is_built_are_named(tmp_path, data, monkeypatch):
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    parts = write_job(storage.write_bytes, uri, data[:300], 3, errors_every=0)
    write_manifest(storage.write_bytes, uri, parts)
    create = faiss.index_factory

    def rewrite_the_last_part_then_create(*args):
        # Between the two reads of the parts: the sample is drawn, the index not yet filled.
        write_job(storage.write_bytes, uri, data[200:250], 1, start=2, errors_every=0)
        return create(*args)

    monkeypatch.setattr(faiss, "index_factory", rewrite_the_last_part_then_create)
    last = Path(uri, parts[2]["path"])
    with pytest.raises(DamagedOutput, match=re.escape(f"{last} changed while the index was built (100 vectors")):
        build_output_index(uri, memory_budget=GB)


def test_the_cli_says_damaged_output_in_one_line_and_exits_3(built):
    uri, _, parts, _ = built
    runner = CliRunner()
    registered(uri).write_bytes(b"not the index that was built")
    searched = runner.invoke(app, ["search", uri, "a dog"])
    assert searched.exit_code == 3, searched.output
    assert searched.stderr.startswith("loupe: damaged output: ") and searched.stderr.count("\n") == 1
    assert "index.faiss does not match its recorded sha256" in searched.stderr
    Path(uri, parts[0]["path"]).unlink()
    indexed = runner.invoke(app, ["index", uri])
    assert indexed.exit_code == 3, indexed.output
    missing = Path(uri, parts[0]["path"])
    assert indexed.stderr == f"loupe: damaged output: {missing}, listed in the manifest, is missing\n"


# ---------------------------------------------------------------------------------------
# Extending


# An IVF with scalar codes, and a PQ without lists (a budget where its code is a byte a pair of
# dimensions at either count, so that growing does not change its shape).
@pytest.mark.parametrize(("budget", "kind"), [(10**6, "ivf_sq"), (260_000, "pq")])
def test_new_parts_are_added_without_retraining(tmp_path, data, monkeypatch, budget, kind):
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    first = write_job(storage.write_bytes, uri, data[:10_500], 4, errors_every=0)
    write_manifest(storage.write_bytes, uri, first)
    before = build_output_index(uri, memory_budget=budget, target_recall=0.9)
    assert before.kind == kind

    more = write_job(storage.write_bytes, uri, data[10_500:], 1, start=4, errors_every=0)
    # Part ids continue where the first run stopped: rows 10500.. are in part 4.
    grow(storage, uri, first + more)
    monkeypatch.setattr(index_module, "build_index", lambda *a, **k: pytest.fail("retrained"))
    after = build_output_index(uri, memory_budget=budget, target_recall=0.9, incremental=True)
    assert after.vectors == 12_000 and len(after.parts) == 5
    assert (after.factory, after.params, after.train_vectors) == (
        before.factory,
        before.params,
        before.train_vectors,
    )
    assert after.tuned_vectors == 10_500

    index, ids, _ = load_index(uri, "image")
    _, found = index.search(data[11_990:11_991], 10)
    assert (f"{11_990:032x}", 4) in [ids.lookup([int(row)])[0][:2] for row in found[0] if row >= 0]
    # Nothing new: the index is left as it is.
    again = build_output_index(uri, memory_budget=budget, incremental=True)
    assert again.index_sha256 == after.index_sha256


def test_extending_past_what_the_index_suits_rebuilds_it(tmp_path, data):
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    first = write_job(storage.write_bytes, uri, data[:3000], 1, errors_every=0)
    write_manifest(storage.write_bytes, uri, first)
    assert build_output_index(uri, memory_budget=GB).kind == "flat"
    more = write_job(storage.write_bytes, uri, data[3000:], 2, start=1, errors_every=0)
    grow(storage, uri, first + more)
    after = build_output_index(uri, memory_budget=GB, incremental=True)
    assert after.kind == "hnsw" and after.vectors == len(data) and after.tuned_vectors == len(data)


def test_an_index_short_of_its_target_names_the_budget_that_would_reach_it(tmp_path, data):
    from loupe.workers.storage import LocalStorage

    uri = str(tmp_path / "out")
    storage = LocalStorage()
    write_manifest(storage.write_bytes, uri, write_job(storage.write_bytes, uri, data, 2))
    runner = CliRunner()
    tight = runner.invoke(app, ["index", uri, "--memory-budget", "250kB", "--target-recall", "0.99"])
    assert tight.exit_code == 0, tight.output
    record = IndexRecord.from_json(registered(uri, "record").read_bytes())
    assert record.kind == "pq" and record.recall_at_10 < 0.99, record  # few vectors: PQ without lists
    assert record.estimated_bytes <= 250_000 and record.budget_note == ""  # it spends the budget
    # One line says so, and index.json records it with the budget the chooser expects to do.
    assert record.budget_for_target > 250_000
    assert re.fullmatch(
        rf"recall@10 {record.recall_at_10:.3f} falls short of the target 0.99: no finer code fits in 250 kB; "
        r"the chooser expects a budget of [0-9.]+ [kM]B to reach it",
        record.target_note,
    )
    assert tight.output.splitlines()[1:] == [record.target_note]
    # That budget buys a finer index, and the recall with it.
    roomy = build_output_index(uri, memory_budget=record.budget_for_target, target_recall=0.99)
    assert roomy.recall_at_10 > record.recall_at_10 + 0.05 and roomy.estimated_bytes > 250_000
