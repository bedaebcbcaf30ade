"""`loupe bench index --peer`: the budgets, the inputs the peer reads, both rows per budget, the table."""

import json
import stat
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from loupe.jobs.bench.peer import compare, parse_budgets, table
from loupe.jobs.cli import app
from loupe.schemas.errors import UserError


def test_budgets_are_shares_of_flat():
    assert [str(s) for s in parse_budgets("1/16, 1/8,0.25,1")] == ["1/16", "1/8", "1/4", "1"]
    for bad in ("", "0", "2", "1/0", "a quarter", "-1/4"):
        with pytest.raises(UserError):
            parse_budgets(bad)


def test_an_unknown_peer_or_budget_is_one_line(tmp_path):
    for args, said in ((["--peer", "annoy"], "unknown --peer 'annoy'"), (["--peer", "autofaiss", "--budgets", "3"], "at most 1")):
        result = CliRunner().invoke(app, ["bench", "index", "--vectors", "100", *args, "--workdir", str(tmp_path)])
        assert result.exit_code == 2 and said in result.output, result.output
        assert "Traceback" not in result.output


def test_both_systems_at_every_budget_on_the_same_inputs(tmp_path):
    # A stand-in for the peer's interpreter: it checks the files it is handed as autofaiss would
    # read them and answers as autofaiss_peer.py does (the real peer is run by the benchmark).
    fake = tmp_path / "peer-python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, glob, numpy as np\n"
        "script, work, budget = sys.argv[1:4]\n"
        "if sys.argv[4:5] == ['--serve']:\n"
        "    assert open(f'{work}/peer-{budget}.index').read() == 'kept' and sys.argv[5] == ''\n"
        "    print(json.dumps({'bytes': 7, 'recall_at_10': 0.5, 'median_ms': 0.25, 'p99_ms': 0.75})); sys.exit()\n"
        "open(f'{work}/peer-{budget}.index', 'w').write('kept')\n"
        "vectors = np.concatenate([np.load(p) for p in sorted(glob.glob(work + '/vectors/*.npy'))])\n"
        "truth, queries = np.load(work + '/truth.npy'), np.load(work + '/queries.npy')\n"
        "assert script.endswith('autofaiss_peer.py') and truth.shape == (len(queries), 10)\n"
        "print(json.dumps({'index_key': 'Flat', 'index_param': '', 'bytes': vectors.nbytes, 'recall_at_10': 1.0,\n"
        "  'median_ms': 0.5, 'p99_ms': 1.0, 'build_seconds': 0.1, 'peak_build_bytes': int(budget)}))\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = compare(
        12_000, 64, budgets=parse_budgets("1/4,1/2"), work=tmp_path / "work", python=fake, queries=50
    )
    rows = result["rows"]
    assert [(r["budget"], r["system"]) for r in rows] == [
        ("1/4", "autofaiss"), ("1/4", "loupe"), ("1/2", "autofaiss"), ("1/2", "loupe")
    ]
    assert rows[0]["peak_build_bytes"] == 12_000 * 64 * 4 // 4  # the budget reached the peer in bytes
    loupe = [r for r in rows if r["system"] == "loupe"]
    assert all(0 < r["bytes"] <= 1.1 * result["flat_bytes"] / 2 for r in loupe)
    assert all(0 < r["recall_at_10"] <= 1 and r["median_ms"] > 0 and r["peak_build_bytes"] > 0 for r in loupe)
    # Both are tuned to the build's target, 0.95, on queries of their own: each reaches about it
    # (the larger budget's finer code searching fewer lists for it).
    assert all(r["recall_at_10"] >= 0.93 for r in loupe), loupe
    truth = np.load(tmp_path / "work" / "truth.npy")
    assert truth.shape == (50, 10)
    shown = table(result)
    assert all(len(line) <= 80 for line in shown.splitlines()), shown
    assert shown.count("autofaiss") >= 2 and shown.count("loupe") >= 2
    assert "loupe's search tuned to recall@10 0.95" in " ".join(shown.split())
    json.dumps(result)
    # A rerun on the same inputs keeps the peer's rows (half an hour a budget at 1M x 768) and says
    # so; on other inputs the peer runs again.
    broken = tmp_path / "broken-python"
    broken.write_text(f"#!{sys.executable}\nraise SystemExit('not run')\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    again = compare(
        12_000, 64, budgets=parse_budgets("1/4,1/2"), work=tmp_path / "work", python=broken, queries=50, target_recall=0.999
    )
    assert [r for r in again["rows"] if r["system"] == "autofaiss"] == rows[::2]
    assert "2 autofaiss rows are from an earlier run" in " ".join(table(again).split())
    # loupe's index built again the same way, its search tuned further for the higher target.
    for before, after in zip(loupe, [r for r in again["rows"] if r["system"] == "loupe"]):
        assert after["index"].split()[0] == before["index"].split()[0] and after["target_recall"] == 0.999
        nprobe = [int(row["index"].split("nprobe=")[1].split(",")[0]) for row in (before, after)]
        assert nprobe[1] > nprobe[0] and after["recall_at_10"] > before["recall_at_10"], (before, after)
    assert "tuned to recall@10 0.999" in " ".join(table(again).split())
    # Measured again from the kept index files: the builds' own columns stay, the measured ones are new.
    measured = compare(12_000, 64, budgets=parse_budgets("1/4,1/2"), work=tmp_path / "work", python=fake, queries=50, remeasure=True)
    assert measured["remeasured"] and [(r["budget"], r["system"]) for r in measured["rows"]] == [
        (r["budget"], r["system"]) for r in rows
    ]
    for before, after in zip(again["rows"], measured["rows"]):  # the latest builds' rows
        assert after["index"] == before["index"] and after["build_seconds"] == before["build_seconds"]
        assert after["peak_build_bytes"] == before["peak_build_bytes"]
        if after["system"] == "autofaiss":
            assert (after["recall_at_10"], after["median_ms"]) == (0.5, 0.25)
        else:  # the same index read back and searched with the same parameters: the same hits
            assert after["recall_at_10"] == before["recall_at_10"] and after["median_ms"] > 0
    assert "measured again from the kept index files" in " ".join(table(measured).split())
    (tmp_path / "work" / f"loupe-{12_000 * 64 * 4 // 2}.faiss").unlink()
    with pytest.raises(UserError, match="no kept loupe index at 1/2 .*without --remeasure"):
        compare(12_000, 64, budgets=parse_budgets("1/2"), work=tmp_path / "work", python=fake, queries=50, remeasure=True)
    with pytest.raises(RuntimeError, match="autofaiss failed.*not run"):
        compare(12_000, 64, budgets=parse_budgets("1/4"), work=tmp_path / "work", python=broken, queries=40)
    with pytest.raises(UserError, match="too small"):  # from the build's own process, in one line
        compare(12_000, 64, budgets=parse_budgets("1/64"), work=tmp_path / "work", python=fake, queries=50)


def _child_peak(results):
    from loupe.jobs.bench.index import peak_resident_bytes

    results.put(peak_resident_bytes())


def test_a_build_process_reports_its_own_peak_not_its_parents():
    import multiprocessing

    from loupe.jobs.bench.index import child_result, peak_resident_bytes

    held = np.ones(400 * 2**20 // 8)  # the parent peaks 400 MiB above the child's needs
    held[::512] = 2.0  # touched: resident
    parent = peak_resident_bytes()
    del held
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_child_peak, args=(results,))
    child.start()
    own = child_result(child, results, 120)
    assert 0 < own < parent - 300 * 2**20, (own, parent)  # ru_maxrss would have carried the parent's over


def test_a_kept_row_without_its_build_figures_shows_dashes():
    row = {"budget": "1/4", "system": "autofaiss", "index": "OPQ256_1024,IVF16384_HNSW32,PQ256x8 nprobe=197",
           "bytes": 340_000_000, "recall_at_10": 0.84, "median_ms": 7.5, "p99_ms": 12.0,
           "build_seconds": None, "peak_build_bytes": None}  # fmt: skip
    shown = table({"vectors": 10**6, "dim": 768, "queries": 1000, "k": 10, "flat_bytes": 3_072_000_000, "rows": [row]})
    (line,) = [line for line in shown.splitlines() if "autofaiss" in line]
    assert line.split()[-2:] == ["–", "–"] and "0.111" in line


def _fake_peer(path):
    """A stand-in for the peer's interpreter that answers from the vectors it is handed."""
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, glob, numpy as np\n"
        "script, work, budget = sys.argv[1:4]\n"
        "open(f'{work}/peer-{budget}.index', 'w').write('kept')\n"
        "vectors = np.concatenate([np.load(p) for p in sorted(glob.glob(work + '/vectors/*.npy'))])\n"
        "print(json.dumps({'index_key': 'Flat', 'index_param': '', 'bytes': vectors.nbytes, 'recall_at_10': 1.0,\n"
        "  'median_ms': 0.5, 'p99_ms': 1.0, 'build_seconds': 0.1, 'peak_build_bytes': len(vectors)}))\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_both_systems_on_a_file_of_real_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    # Unnormalized rows of unequal spread, as a model's raw outputs may be.
    matrix = (rng.standard_normal((12_000, 48)) * np.linspace(3, 0.1, 48)).astype(np.float32)
    np.save(tmp_path / "mine.npy", matrix)
    fake = _fake_peer(tmp_path / "peer-python")
    result = compare(1, 1, budgets=parse_budgets("1/4"), work=tmp_path / "work", python=fake, queries=60,
                     embeddings=tmp_path / "mine.npy")  # fmt: skip
    assert (result["vectors"], result["dim"], result["embeddings"]) == (12_000 - 60, 48, "mine.npy")
    peer, ours = result["rows"]
    assert peer["peak_build_bytes"] == 12_000 - 60  # the peer read every row but the held-out queries
    queries, truth = np.load(tmp_path / "work" / "queries.npy"), np.load(tmp_path / "work" / "truth.npy")
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, rtol=1e-5)  # unit rows, as loupe indexes them
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    held = [int(np.argmax(unit @ q)) for q in queries[:5]]
    np.testing.assert_allclose(unit[held], queries[:5], atol=1e-6)  # the queries are rows of the file...
    indexed = np.concatenate([np.load(p) for p in sorted((tmp_path / "work" / "vectors").glob("*.npy"))])
    assert not (np.abs(indexed @ queries[:5].T - 1) < 1e-6).any()  # ...that are not indexed
    assert 0.5 < ours["recall_at_10"] <= 1 and truth.shape == (60, 10)
    assert "from mine.npy" in " ".join(table(result).split())
    # Another file is other inputs: nothing kept is reused.
    np.save(tmp_path / "other.npy", matrix[:, :32])
    other = compare(1, 1, budgets=parse_budgets("1/4"), work=tmp_path / "work", python=fake, queries=60,
                    embeddings=tmp_path / "other.npy")  # fmt: skip
    assert other["dim"] == 32 and not other["peer_rows_reused"]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (np.zeros(100, dtype=np.float32), "not a matrix of floats"),
        (np.zeros((100, 8), dtype=np.int64), "not a matrix of floats"),
        (np.zeros((40, 8), dtype=np.float32), "too few to hold out 50"),
        (b"not numpy", "cannot read --embeddings"),
    ],
)
def test_a_bad_embeddings_file_is_one_line(tmp_path, content, said):
    path = tmp_path / "bad.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    for args in ([], ["--peer", "autofaiss", "--workdir", str(tmp_path / "work")]):
        result = CliRunner().invoke(app, ["bench", "index", "--embeddings", str(path), "--queries", "50", *args])
        assert result.exit_code == 2 and said in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
