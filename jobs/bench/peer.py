"""`loupe bench index --peer autofaiss`: loupe's index and autofaiss's on the same vectors, queries and memory budgets.

autofaiss runs in its own virtual environment (its pins, faiss-cpu 1.8 and numpy < 2, conflict
with loupe's), created on first use under the work folder, and reads the vectors from .npy
files as its users give them. Both indexes are built in a process of their own (so each
build's peak resident memory is its own) and measured the same way: read back from the file
by a fresh process, recall@10 against exact search and the latency of single queries.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np

from loupe.jobs.bench.index import (
    ClusteredVectors,
    EmbeddingFile,
    VectorSet,
    child_result,
    measure_file,
    peak_resident_bytes,
)
from loupe.schemas.errors import UserError
from loupe.workers.index.build import build_index
from loupe.workers.index.choose import format_size
from loupe.workers.index.library import faiss
from loupe.workers.index.threads import use_cpu_share

PEERS = ("autofaiss",)
# What autofaiss 2.18 runs with: with faiss 1.15 it fails in OPQMatrix(M=...).
PEER_PINS = ("autofaiss==2.18.0", "faiss-cpu==1.8.0", "numpy<2", "pyarrow<16", "packaging")
PEER_SCRIPT = Path(__file__).with_name("autofaiss_peer.py")
DEFAULT_BUDGETS = "1/16,1/8,1/4,1/2"
# Building an index of 1M x 768 vectors takes minutes for loupe and up to half an hour for autofaiss on 2 cores.
BUILD_TIMEOUT_S = 4 * 3600
INSTALL_TIMEOUT_S = 1800


def parse_budgets(text: str) -> list[Fraction]:
    """"1/16,1/8,0.25" as shares of flat's bytes, each in (0, 1]."""
    try:
        shares = [Fraction(part.strip()) for part in text.split(",") if part.strip()]
    except (ValueError, ZeroDivisionError):
        raise UserError(f"invalid --budgets {text!r}; give shares of flat's bytes such as 1/16,1/8,0.25") from None
    if not shares or any(not 0 < share <= 1 for share in shares):
        raise UserError(f"--budgets {text!r}: every share must be above 0 and at most 1")
    return shares


def peer_python(venv: Path) -> Path:
    """The peer's interpreter, in a virtual environment created with its pins on first use."""
    python = venv / "bin" / "python"
    done = venv / ".complete"
    if not done.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=600)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *PEER_PINS], check=True, timeout=INSTALL_TIMEOUT_S
        )
        done.touch()
    return python


def compare(
    n: int,
    dim: int,
    *,
    budgets: list[Fraction],
    work: Path,
    python: Path,
    queries: int = 1000,
    k: int = 10,
    seed: int = 0,
    remeasure: bool = False,
    embeddings: Path | None = None,
    target_recall: float = 0.95,
) -> dict:
    """Both systems at every budget: index, bytes, recall@10, median and p99 ms, build s and peak build memory.

    With `remeasure`, nothing is built: both systems' kept indexes are read back and measured
    again (on an idle machine, when the builds had to share one), their build rows kept. loupe's
    search is tuned to `target_recall` (as `loupe index --target-recall`), autofaiss's to its
    default query time target.
    """
    use_cpu_share()
    data = ClusteredVectors(n, dim, seed) if embeddings is None else EmbeddingFile(embeddings, queries, seed)
    n, dim = data.n, data.dim
    xq = data.queries(queries)
    spec = {"vectors": n, "dim": dim, "seed": seed, "queries": queries, "k": k}
    if embeddings is not None:  # another file, or the same one changed, is other inputs
        embeddings = Path(embeddings)
        stat = embeddings.stat()
        spec["embeddings"] = {"path": str(embeddings.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    truth = _write_inputs(data, xq, k, work, spec)
    flat_bytes = 4 * n * dim
    about = {"vectors": n, "dim": dim, "queries": queries, "k": k, "flat_bytes": flat_bytes}
    if embeddings is not None:
        about["embeddings"] = embeddings.name
    if remeasure:
        rows = [row for share in budgets for row in _measure_again(python, work, share, int(flat_bytes * share), spec, xq, truth)]
        return {**about, "rows": rows, "remeasured": True}
    rows, reused = [], 0
    for share in budgets:
        budget = int(flat_bytes * share)
        # autofaiss takes half an hour a budget at 1M x 768: its row is kept for the same inputs.
        kept = work / f"autofaiss-{budget}.json"
        if kept.exists() and (saved := json.loads(kept.read_text())).get("inputs") == spec:
            peer, reused = saved["row"], reused + 1
        else:
            peer = _peer(python, work, budget)
            kept.write_text(json.dumps({"inputs": spec, "row": peer}))
        rows.append({"budget": str(share), "system": "autofaiss", **peer})
        ours = _loupe(data, budget, xq, truth, k, seed, work, target_recall)
        (work / f"loupe-{budget}.json").write_text(json.dumps({"inputs": spec, "row": ours}))
        rows.append({"budget": str(share), "system": "loupe", **ours})
    return {**about, "rows": rows, "peer_rows_reused": reused}


def _write_inputs(data: VectorSet, xq: np.ndarray, k: int, work: Path, spec: dict) -> np.ndarray:
    """The vectors as .npy files (autofaiss's input), the queries and their exact neighbours: written
    once for the same inputs (`spec`), which inputs.json records last."""
    stamp = work / "inputs.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return np.load(work / "truth.npy")
    stamp.unlink(missing_ok=True)
    folder = work / "vectors"
    folder.mkdir(parents=True, exist_ok=True)
    flat = faiss.IndexFlatIP(data.dim)
    for number, batch in enumerate(data()):
        np.save(folder / f"part-{number:05d}.npy", batch)
        flat.add(batch)
    _, truth = flat.search(xq, k)
    np.save(work / "queries.npy", xq)
    np.save(work / "truth.npy", truth)
    stamp.write_text(json.dumps(spec))
    return truth


def _measure_again(
    python: Path, work: Path, share: Fraction, budget: int, spec: dict, xq: np.ndarray, truth: np.ndarray
) -> list[dict]:
    """The two rows of a budget from their kept builds, recall and latencies measured again from the index files."""
    rows = []
    for system, index_file in (("autofaiss", f"peer-{budget}.index"), ("loupe", f"loupe-{budget}.faiss")):
        kept = work / f"{system}-{budget}.json"
        saved = json.loads(kept.read_text()) if kept.exists() else {}
        if saved.get("inputs") != spec or not (work / index_file).exists():
            raise UserError(
                f"no kept {system} index at {share} of flat's bytes for these inputs in {work}: "
                "run the benchmark without --remeasure first"
            )
        row = saved["row"]
        key, _, params = row["index"].partition(" ")
        if system == "autofaiss":
            done = subprocess.run(
                [str(python), str(PEER_SCRIPT), str(work), str(budget), "--serve", params],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"autofaiss's index could not be measured: {done.stderr.strip()[-500:]}")
            served = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            measured = measure_file(str(work / index_file), _parse_params(params), xq, truth, spec["k"])
            served = _served(measured)
        fresh = {name: served[name] for name in ("bytes", "recall_at_10", "median_ms", "p99_ms")}
        rows.append({"budget": str(share), "system": system, **row, **fresh})
    return rows


def _parse_params(text: str) -> dict:
    """`nprobe=16,quantizer_efSearch=32` as the dict it was printed from."""
    params = {}
    for pair in filter(None, text.split(",")):
        name, _, value = pair.partition("=")
        params[name] = int(value) if value.lstrip("-").isdigit() else float(value)
    return params


def _served(measured: dict) -> dict:
    latencies = measured["latencies"]
    return {
        "bytes": measured["heap_bytes"] or max(measured["resident_bytes"], measured["file_bytes"]),
        "recall_at_10": round(measured["recall"], 4),
        "median_ms": round(float(np.median(latencies)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
    }


def _peer(python: Path, work: Path, budget: int) -> dict:
    done = subprocess.run(
        [str(python), str(PEER_SCRIPT), str(work), str(budget)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"autofaiss failed at a budget of {format_size(budget)}: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "index": f"{result['index_key']} {result['index_param']}".strip(),
        "bytes": result["bytes"],
        "recall_at_10": result["recall_at_10"],
        "median_ms": result["median_ms"],
        "p99_ms": result["p99_ms"],
        "build_seconds": result["build_seconds"],
        "peak_build_bytes": result["peak_build_bytes"],
    }


def _loupe(
    data: VectorSet, budget: int, xq: np.ndarray, truth: np.ndarray, k: int, seed: int, work: Path, target: float
) -> dict:
    path = str(work / f"loupe-{budget}.faiss")  # one file a budget, left for a second look
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_build, args=(str(work / "vectors"), data.n, budget, k, seed, target, path, results))
    child.start()
    built = child_result(child, results, BUILD_TIMEOUT_S)
    if "error" in built:
        raise UserError(built["error"])
    params = ",".join(f"{key}={value}" for key, value in built["params"].items())
    return {
        "index": f"{built['factory']} {params}".strip(),  # an index without lists has no parameters
        **_served(measure_file(path, built["params"], xq, truth, k)),
        "build_seconds": built["build_seconds"],
        "peak_build_bytes": built["peak_build_bytes"],
        "target_recall": target,
    }


def _build(folder: str, n: int, budget: int, k: int, seed: int, target: float, path: str, results) -> None:
    """In a process of its own: build loupe's index for the budget, write it, report its peak memory.

    The vectors are read from the .npy files autofaiss reads, a part at a time, so the peak is the
    build's own: the training sample, the index and one part, not the making of synthetic vectors.
    """
    use_cpu_share()
    files = sorted(Path(folder).glob("part-*.npy"))
    try:
        index, record = build_index(
            lambda: (np.load(file) for file in files),
            memory_budget_bytes=budget, target_recall=target, k=k, seed=seed, vectors_hint=n,
        )
    except UserError as exc:  # a budget too small for any index: the parent says it in one line
        results.put({"error": str(exc)})
        return
    faiss.write_index(index, path)
    results.put(
        {
            "factory": record.factory,
            "params": record.params,
            "build_seconds": round(record.build_seconds, 1),
            "peak_build_bytes": peak_resident_bytes(),
        }
    )


def table(result: dict) -> str:
    """One line per system and budget, readable at 80 columns: the index on a line of its own."""
    flat = result["flat_bytes"]
    head = f"{'budget':>7} {'system':<9} {'bytes':>6} {'recall':>6} {'med ms':>7} {'p99 ms':>7} {'build s':>8} {'peak':>9}"
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        build, peak = row["build_seconds"], row["peak_build_bytes"]  # None: not recorded for a kept row
        lines.append(
            f"{row['budget']:>7} {row['system']:<9} {row['bytes'] / flat:>6.3f} {row['recall_at_10']:>6.3f} "
            f"{row['median_ms']:>7.2f} {row['p99_ms']:>7.2f} {'–' if build is None else f'{build:.1f}':>8} "
            f"{'–' if peak is None else format_size(peak):>9}"
        )
        lines.append(f"{'':>7} {row['index']}")
    footer = (
        f"{result['vectors']:,} vectors of dimension {result['dim']}"
        + (f" from {result['embeddings']}" if result.get("embeddings") else "")
        + f", {result['queries']} queries, k = {result['k']}, "
        f"{os.cpu_count()} cores; bytes as a share of flat's {format_size(flat)}; peak: the build's resident memory."
    )
    targets = sorted({str(row["target_recall"]) for row in result["rows"] if row.get("target_recall")})
    if targets:  # rows kept from before the target was recorded have none
        footer += f" loupe's search tuned to recall@10 {' or '.join(targets)}, autofaiss's to its 10 ms default."
    if result.get("peer_rows_reused"):
        footer += f" {result['peer_rows_reused']} autofaiss rows are from an earlier run on the same inputs."
    if result.get("remeasured"):
        footer += (
            " Bytes, recall and latencies measured again from the kept index files; build seconds and peak"
            " memory are the builds'."
        )
    return "\n".join([*lines, "", textwrap.fill(footer, 80)])
