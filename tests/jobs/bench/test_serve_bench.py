"""`loupe bench serve` on a tiny synthetic catalog: the catalog it builds, the table, answers with real hits."""

from __future__ import annotations

import contextlib
import io
import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from loupe.jobs.cli import app

runner = CliRunner()
VECTORS, DIM = 2000, 48


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    from loupe.jobs.bench.serve import synthetic_catalog

    workdir = tmp_path_factory.mktemp("bench-serve")
    return workdir, synthetic_catalog(workdir, VECTORS, DIM, seed=0)


def test_synthetic_catalog_is_a_finished_job_with_the_index_benchmarks_vectors(catalog):
    from loupe.jobs.bench.index import ClusteredVectors
    from loupe.jobs.bench.serve import ERROR_EVERY, synthetic_catalog
    from loupe.jobs.output import read_job, read_manifest
    from loupe.workers.storage import LocalStorage

    workdir, output = catalog
    manifest, job = read_manifest(LocalStorage(), output), read_job(LocalStorage(), output)
    assert manifest.complete and manifest.rows_ok == VECTORS and manifest.index["image"]["vectors"] == VECTORS
    assert 0 < manifest.rows_error <= VECTORS // (ERROR_EVERY - 1) + 1
    assert "embed" in job.settings["tasks"] and job.settings["image_embedding_model"].startswith(str(workdir))
    rows = pq.read_table(f"{output}/{manifest.parts[0]['path']}")
    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    errors = rows.filter(pc.equal(rows.column("status"), "error"))
    assert errors.num_rows and set(errors.column("error_code").to_pylist()) == {"not_an_image"}
    assert all(ok.column("caption").to_pylist()) and ok.column("moderation").null_count == 0
    first = next(ClusteredVectors(VECTORS, DIM, 0)())[0]  # the index benchmark's first vector is row 0's
    assert ok.column("image_embedding")[0].as_py() == pytest.approx(first.tolist())
    logged: list[str] = []
    assert synthetic_catalog(workdir, VECTORS, DIM, seed=0, log=logged.append) == output
    assert logged == [f"reusing the synthetic catalog at {output}"]  # cached: not rebuilt


def test_bench_serve_answers_every_client_count_with_real_hits(catalog):
    from loupe.jobs.serve.bench import format_table

    workdir, output = catalog
    result = runner.invoke(app, [
        "bench", "serve", "--vectors", str(VECTORS), "--dim", str(DIM), "--workdir", str(workdir),
        "--clients", "1,4", "--requests", "16", "--fresh-runs", "0", "-k", "5", "--json",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["output"] == output and data["catalog"]["vectors"] == VECTORS
    assert 0 < data["server_resident_bytes"] <= data["server_peak_bytes"]
    # Every answer was a 200 equal to the first one (errors count the others): 5 catalog rows.
    assert len(data["hits"]) == 5 and all(hit["caption"] and hit["image_id"] for hit in data["hits"])
    assert [hit["rank"] for hit in data["hits"]] == [1, 2, 3, 4, 5]
    for level, clients in zip(data["levels"], (1, 4), strict=True):
        assert level["clients"] == clients and level["requests"] == 16 and level["errors"] == 0
        assert 0 < level["p50_ms"] <= level["p99_ms"] and level["requests_per_second"] > 0
    lines = format_table(data).splitlines()
    assert lines[0] == f"loupe serve search benchmark: {output}"
    assert [line.split()[:2] for line in lines[4:6]] == [["1", "16"], ["4", "16"]]
    assert all(len(line) <= 80 for line in lines[1:])


def test_fresh_process_probe_times_load_and_query(catalog):
    from loupe.jobs.serve.bench import format_table, probe_search

    _, output = catalog
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        probe_search(output, "a red square", "3", "image")
    phases = json.loads(printed.getvalue())
    assert phases["hits"] == 3 and min(phases["load_seconds"], phases["query_seconds"], phases["again_seconds"]) > 0
    table = format_table({
        "output": output, "query": "q", "k": 3, "kind": "image", "server_startup_seconds": 9.0, "levels": [],
        "fresh_process_search_seconds": 12.5,
        "fresh_phases": {"startup_seconds": 12.0, "imports_seconds": 8.0, "load_seconds": 4.0, "query_seconds": 0.05,
                         "again_seconds": 0.02},
    })
    assert table.splitlines()[-3:] == [
        "fresh process: start-up 12.00 s (imports 8.00, index+model 4.00), query 50 ms",
        "  the same query again in that process: 20 ms",
        "loupe search in a fresh process, same query: 12.50 s",
    ]


def test_bad_client_counts_are_one_line():
    result = runner.invoke(app, ["bench", "serve", "/nowhere", "--clients", "1,x"])
    assert result.exit_code == 2 and "--clients takes comma-separated positive counts" in result.output
    assert "Traceback" not in result.output


def test_the_table_keeps_to_80_columns_however_slow_the_machine_or_long_the_query():
    from loupe.jobs.serve.bench import format_table

    slow = {
        "output": "out", "kind": "image", "k": 10, "query": "a very long query " * 10,
        "server_startup_seconds": 1234.5, "server_peak_bytes": 123 * 2**30, "server_resident_bytes": 100 * 2**30,
        "levels": [{"clients": 128, "requests": 100000, "p50_ms": 123456.7, "p99_ms": 1234567.8,
                    "requests_per_second": 0.1, "errors": 99999}],
    }
    lines = format_table(slow).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[1].startswith("image index, k=10, query 'a very long query") and lines[1].endswith("…")
