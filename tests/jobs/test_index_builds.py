"""Index builds under new names: a reader keeps the index its manifest names, killed builds and old builds are swept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loupe.jobs import indexing as index_module
from loupe.jobs.indexing import build_output_index, load_index
from tests.jobs.test_indexing import GB, grow, registered, storage_for, write_job, write_manifest
from tests.workers.index.vectors import clustered

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

data = clustered(1000)  # small flat indexes: built and searched in milliseconds


def index_files(storage, output: str) -> list[str]:
    return sorted(obj.uri.rsplit("/", 1)[-1] for obj in storage.list(f"{output}/index/image"))


def build_files(*builds: int) -> list[str]:
    return sorted(f"build-{b:05d}.{name}" for b in builds for name in ("index.faiss", "ids.parquet", "index.json"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_reader_holding_the_old_manifest_opens_the_old_index_after_an_update(where, tmp_path, request, monkeypatch):
    uri, endpoint = str(tmp_path / "out"), None
    if where == "s3":
        uri, endpoint = f"s3://{request.getfixturevalue('s3_bucket')}/out", request.getfixturevalue("s3_endpoint")
    storage = storage_for(uri, endpoint)
    parts = write_job(storage.write_bytes, uri, data[:900], 3, errors_every=0)
    write_manifest(storage.write_bytes, uri, parts[:2])
    before = build_output_index(uri, memory_budget=GB, endpoint_url=endpoint)
    grow(storage, uri, parts)  # part 2 is new
    real = index_module.read_manifest
    updated = []

    def read_then_update(*args):
        manifest = real(*args)
        if not updated:
            # The reader has its manifest; the update writes its files and the next manifest now,
            # before the reader opens a file.
            monkeypatch.setattr(index_module, "read_manifest", real)
            updated.append(build_output_index(uri, memory_budget=GB, endpoint_url=endpoint, incremental=True))
        return manifest

    monkeypatch.setattr(index_module, "read_manifest", read_then_update)
    index, ids, record = load_index(uri, "image", endpoint)
    assert updated[0].vectors == 900 and updated[0].factory == before.factory  # extended, as a new build
    assert record == before and index.ntotal == 600  # the old index, whole: no sha256 mismatch
    _, found = index.search(data[10:11], 1)
    assert ids.lookup([int(found[0, 0])])[0][0] == f"{10:032x}"
    assert index_files(storage, uri) == build_files(1, 2)
    index, _, record = load_index(uri, "image", endpoint)  # a reader starting now: the new one
    assert record == updated[0] and index.ntotal == 900


class Killed(BaseException):
    """The build's process dies here."""


def test_a_build_killed_before_its_manifest_leaves_the_old_index_and_is_swept(tmp_path, monkeypatch):
    from loupe.jobs.preflight import clear_output
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    parts = write_job(storage.write_bytes, uri, data[:600], 2, errors_every=0)
    write_manifest(storage.write_bytes, uri, parts)
    before = build_output_index(uri, memory_budget=GB)
    parts += write_job(storage.write_bytes, uri, data[600:900], 1, start=2, errors_every=0)
    grow(storage, uri, parts)

    def killed(*args):
        raise Killed

    real = index_module.write_manifest
    monkeypatch.setattr(index_module, "write_manifest", killed)
    with pytest.raises(Killed):
        build_output_index(uri, memory_budget=GB, incremental=True)
    index, _, record = load_index(uri, "image")
    assert record == before and index.ntotal == 600
    assert index_files(storage, uri) == build_files(1, 2)  # build 2 written whole, never registered
    # A local write killed half-way leaves its temp file too.
    Path(uri, "index/image/.build-00002.index.faiss.0123abcd.tmp").write_bytes(b"half")

    monkeypatch.setattr(index_module, "write_manifest", real)
    after = build_output_index(uri, memory_budget=GB, incremental=True)
    assert after.vectors == 900 and load_index(uri, "image")[2] == after
    # The killed build and its temp file are gone; build 1 stays for readers of the last manifest.
    assert index_files(storage, uri) == build_files(1, 3)
    parts += write_job(storage.write_bytes, uri, data[900:1000], 1, start=3, errors_every=0)
    grow(storage, uri, parts)
    assert build_output_index(uri, memory_budget=GB, incremental=True).vectors == 1000
    assert index_files(storage, uri) == build_files(3, 4)
    clear_output(uri, storage)  # --overwrite
    assert list(storage.list(f"{uri}/index")) == []


def test_a_reader_whose_manifest_files_were_swept_reads_the_manifest_again(tmp_path, monkeypatch):
    from loupe.schemas.records import Manifest
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    parts = write_job(storage.write_bytes, uri, data[:600], 2, errors_every=0)
    write_manifest(storage.write_bytes, uri, parts)
    build_output_index(uri, memory_budget=GB)
    stale = Path(uri, "_manifest.json").read_bytes()  # names build 1
    for start, stop in ((600, 700), (700, 800)):
        parts += write_job(storage.write_bytes, uri, data[start:stop], 1, start=len(parts), errors_every=0)
        grow(storage, uri, parts)
        latest = build_output_index(uri, memory_budget=GB, incremental=True)
    assert index_files(storage, uri) == build_files(2, 3)
    real = index_module.read_manifest
    reads = []

    def stale_first(*args):
        reads.append(1)
        return Manifest.from_json(stale) if len(reads) == 1 else real(*args)

    monkeypatch.setattr(index_module, "read_manifest", stale_first)
    index, _, record = load_index(uri, "image")
    assert record == latest and index.ntotal == 800 and len(reads) == 2


def test_an_index_registered_under_the_fixed_names_of_before_still_loads(tmp_path):
    from loupe.jobs.incremental import index_record
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    parts = write_job(storage.write_bytes, uri, data[:600], 2, errors_every=0)
    write_manifest(storage.write_bytes, uri, parts)
    before = build_output_index(uri, memory_budget=GB)
    # The layout before builds were numbered: fixed names, and no "ids" in the manifest's entry.
    folder = Path(uri, "index/image")
    for name in ("index.faiss", "ids.parquet", "index.json"):
        (folder / f"build-00001.{name}").rename(folder / name)
    manifest = json.loads(Path(uri, "_manifest.json").read_text())
    manifest["index"]["image"] = {
        "path": "index/image/index.faiss",
        "sha256": before.index_sha256,
        "vectors": 600,
        "record": "index/image/index.json",
    }
    Path(uri, "_manifest.json").write_text(json.dumps(manifest))

    index, ids, record = load_index(uri, "image")
    assert record == before and index.ntotal == 600 and len(ids) == 600
    assert index_record(storage, uri, "image") == before
    # Extended as a numbered build; the fixed-name files stay while the replaced manifest names them.
    parts += write_job(storage.write_bytes, uri, data[600:900], 1, start=2, errors_every=0)
    grow(storage, uri, parts)
    assert build_output_index(uri, memory_budget=GB, incremental=True).vectors == 900
    assert index_files(storage, uri) == sorted(build_files(1) + ["ids.parquet", "index.faiss", "index.json"])
    parts += write_job(storage.write_bytes, uri, data[900:1000], 1, start=3, errors_every=0)
    grow(storage, uri, parts)
    assert build_output_index(uri, memory_budget=GB, incremental=True).vectors == 1000
    assert index_files(storage, uri) == build_files(1, 2)


def test_a_build_beside_another_claims_its_own_number_and_keeps_the_later_one(tmp_path, monkeypatch):
    from loupe.workers.storage import LocalStorage

    storage = LocalStorage()
    uri = str(tmp_path / "out")
    write_manifest(storage.write_bytes, uri, write_job(storage.write_bytes, uri, data[:300], 1, errors_every=0))
    build_output_index(uri, memory_budget=GB)
    folder = Path(uri, "index/image")
    real_list, real_write = index_module.list_folder, index_module.write_manifest

    def listed_then_another_claims(*args):
        # Another build claims number 2 after this one listed the folder, before it claims.
        monkeypatch.setattr(index_module, "list_folder", real_list)
        found = real_list(*args)
        (folder / "build-00002.index.json").write_bytes(b"another build's claim")
        return found

    def another_starts_then_write(*args):
        (folder / "build-00004.index.json").write_bytes(b"a build started since")
        real_write(*args)

    monkeypatch.setattr(index_module, "list_folder", listed_then_another_claims)
    monkeypatch.setattr(index_module, "write_manifest", another_starts_then_write)
    record = build_output_index(uri, memory_budget=GB)
    assert registered(uri) == folder / "build-00003.index.faiss" and load_index(uri, "image")[2] == record
    assert (folder / "build-00004.index.json").read_bytes() == b"a build started since"  # not swept
    assert (folder / "build-00001.index.faiss").exists()  # the replaced manifest's
