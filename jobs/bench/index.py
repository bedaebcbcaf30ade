"""Benchmark: the index choose_index picks for a quarter of flat's memory, against exact flat search.

The index is measured as loupe serves it: written to a file, then read back by a fresh process
that reports how much resident memory reading it took (every code, id, centroid and graph
link, whatever the file format), its recall@10 and its per-query latency.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loupe.schemas.errors import UserError
from loupe.workers.index.build import build_index
from loupe.workers.index.choose import choose_index, format_size
from loupe.workers.index.library import faiss
from loupe.workers.index.threads import use_cpu_share
from loupe.workers.index.tune import apply_params, recall_at_k

CLUSTERS = 1000
BATCH = 50_000
# Reading an index and 1,000 single queries take seconds; a child silent this long has died.
MEASURE_TIMEOUT_S = 1800


class ClusteredVectors:
    """Synthetic unit vectors shaped like real embeddings, generated batch by batch, reproducibly.

    Isotropic Gaussian clusters in high dimension make every neighbour almost equally far, which
    real embeddings are not: their variance is concentrated in few directions. Here the variance
    along the i-th (randomly rotated) direction falls as 1/i, both between the CLUSTERS centres
    and within each cluster.
    """

    def __init__(self, n: int, dim: int, seed: int = 0):
        self.n, self.dim, self.seed = n, dim, seed
        rng = np.random.default_rng(seed)
        self.scale = (np.arange(1, dim + 1, dtype=np.float32) ** -0.5).astype(np.float32)
        self.centres = rng.standard_normal((CLUSTERS, dim), dtype=np.float32) * self.scale
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim), dtype=np.float32))[0].astype(np.float32)

    def _make(self, count: int, rng: np.random.Generator) -> np.ndarray:
        labels = rng.integers(0, CLUSTERS, count)
        x = self.centres[labels] + 0.7 * rng.standard_normal((count, self.dim), dtype=np.float32) * self.scale
        x = x @ self.rotation
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def __call__(self) -> Iterator[np.ndarray]:
        """The same n vectors on every call, BATCH at a time."""
        rng = np.random.default_rng([self.seed, 1])
        for start in range(0, self.n, BATCH):
            yield self._make(min(BATCH, self.n - start), rng)

    def queries(self, count: int) -> np.ndarray:
        """Fresh vectors from the same distribution, not in the data."""
        return self._make(count, np.random.default_rng([self.seed, 2]))


class EmbeddingFile:
    """A user's own embeddings from a .npy matrix, unit-normalized as loupe indexes them: `queries`
    rows, drawn at random (seeded), are held out as the queries and the rest are indexed."""

    def __init__(self, path: Path, queries: int, seed: int = 0):
        try:
            self.matrix = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read --embeddings {path}: {exc}") from None
        shape = self.matrix.shape
        if len(shape) != 2 or not np.issubdtype(self.matrix.dtype, np.floating) or shape[1] < 1:
            raise UserError(f"--embeddings {path} holds a {self.matrix.dtype} array of shape {shape}, not a matrix of floats")
        if shape[0] <= queries:
            raise UserError(f"--embeddings {path} has {shape[0]:,} rows: too few to hold out {queries:,} queries and index the rest")
        held = np.zeros(shape[0], dtype=bool)
        held[np.random.default_rng([seed, 3]).choice(shape[0], queries, replace=False)] = True
        self.held, self.rows = np.flatnonzero(held), np.flatnonzero(~held)
        self.n, self.dim = len(self.rows), shape[1]

    def _unit(self, rows: np.ndarray) -> np.ndarray:
        x = np.asarray(self.matrix[rows], dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms > 0, norms, 1)

    def __call__(self) -> Iterator[np.ndarray]:
        for start in range(0, self.n, BATCH):
            yield self._unit(self.rows[start : start + BATCH])

    def queries(self, count: int) -> np.ndarray:
        return self._unit(self.held[:count])


VectorSet = ClusteredVectors | EmbeddingFile  # what the benchmarks index: n, dim, batches, queries


def _latencies_ms(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    times = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - started) * 1000)
    return np.array(times)


def peak_resident_bytes() -> int:
    """This process's own peak resident memory (VmHWM): getrusage's ru_maxrss would also count
    the peak of the process that spawned it, which Linux carries across fork and exec."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _heap_bytes() -> int | None:
    """Bytes malloc has handed out and not had back (glibc 2.33+), or None elsewhere.

    Every faiss structure lives in memory from malloc (std::vector, new), so the change in this
    count across read_index is what the index holds, allocator headers included, whether or not
    its pages are resident yet.
    """
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _serve(path: str, params: dict, queries: np.ndarray, truth: np.ndarray, k: int, results) -> None:
    """In a fresh process: read the index file as load_index does, then search it."""
    use_cpu_share()
    heap, resident = _heap_bytes(), _resident_bytes()
    index = faiss.read_index(path)
    apply_params(index, params)
    heap = None if heap is None else _heap_bytes() - heap
    resident = _resident_bytes() - resident
    _, found = index.search(queries, k)
    latencies = _latencies_ms(index, queries, k)
    results.put(
        {
            "heap_bytes": heap,
            "resident_bytes": resident,
            "threads": faiss.omp_get_max_threads(),
            "recall": recall_at_k(found, truth, k),
            "latencies": latencies,
        }
    )


def serve_and_measure(index: faiss.Index, params: dict, queries: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """Resident bytes, recall and latencies of `index` saved to a file and loaded by a new process.

    A freshly built index holds spare capacity in its inverted lists (they grow by doubling
    as vectors arrive); a loaded one holds exactly its contents. The new process counts the
    latter: what a search server keeps in memory.
    """
    handle, path = tempfile.mkstemp(prefix="loupe-bench-", suffix=".faiss")
    os.close(handle)
    try:
        faiss.write_index(index, path)
        return measure_file(path, params, queries, truth, k)
    finally:
        os.unlink(path)


def measure_file(path: str, params: dict, queries: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """serve_and_measure for an index already in a file."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_serve, args=(path, params, queries, truth, k, results))
    child.start()
    measured = child_result(child, results, MEASURE_TIMEOUT_S)
    measured["file_bytes"] = os.path.getsize(path)
    return measured


def child_result(child: multiprocessing.process.BaseProcess, results, timeout: float) -> Any:
    """What a spawned child puts on `results`; a child that dies or overruns `timeout` is an error."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return results.get(timeout=1.0)
            except queue.Empty:
                if not child.is_alive():
                    try:
                        return results.get(timeout=1.0)  # put just before it exited
                    except queue.Empty:
                        raise RuntimeError(f"the benchmark's child process died (exit code {child.exitcode})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the benchmark's child process gave no result in {timeout:.0f} s") from None
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()


def run(
    n: int,
    dim: int,
    *,
    budget_fraction: float = 0.25,
    queries: int = 1000,
    flat_latency_queries: int = 100,
    k: int = 10,
    seed: int = 0,
    data: VectorSet | None = None,
) -> dict:
    use_cpu_share()
    data = data or ClusteredVectors(n, dim, seed)
    n, dim = data.n, data.dim
    flat_bytes = 4 * n * dim
    budget = int(flat_bytes * budget_fraction)
    choice = choose_index(n, dim, budget)
    xq = data.queries(queries)

    started = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    for batch in data():
        flat.add(batch)
    flat_build = time.perf_counter() - started
    _, truth = flat.search(xq, k)
    flat_ms = _latencies_ms(flat, xq[:flat_latency_queries], k)
    # Its vectors plus a header, without a second 3 GB copy from serialize_index.
    flat_size = flat.ntotal * flat.code_size + len(faiss.serialize_index(faiss.IndexFlatIP(dim)))
    del flat

    index, record = build_index(
        data, memory_budget_bytes=budget, target_recall=0.95, k=k, seed=seed, vectors_hint=n
    )
    served = serve_and_measure(index, record.params, xq, truth, k)
    del index
    index_ms = served["latencies"]
    # What the loaded index holds by malloc's count; where that count is not available, the
    # growth of resident memory, or the file if that came out smaller.
    index_size = served["heap_bytes"] or max(served["resident_bytes"], served["file_bytes"])

    result = {
        "vectors": n,
        "dim": dim,
        "threads": faiss.omp_get_max_threads(),
        "serving_threads": served["threads"],
        "memory_budget": budget,
        "flat": {
            "build_seconds": round(flat_build, 1),
            "bytes": flat_size,
            "recall_at_10": 1.0,
            "median_ms": round(float(np.median(flat_ms)), 3),
            "p99_ms": round(float(np.percentile(flat_ms, 99)), 3),
            "latency_queries": len(flat_ms),
        },
        "index": {
            "kind": record.kind,
            "factory": record.factory,
            "params": record.params,
            "build_seconds": round(record.build_seconds, 1),
            "bytes": index_size,
            "heap_bytes": served["heap_bytes"],
            "resident_bytes": served["resident_bytes"],
            "file_bytes": served["file_bytes"],
            "recall_at_10": round(served["recall"], 4),
            "tuned_recall_at_10": record.recall_at_10,
            "median_ms": round(float(np.median(index_ms)), 3),
            "p99_ms": round(float(np.percentile(index_ms, 99)), 3),
            "latency_queries": len(index_ms),
            "train_vectors": record.train_vectors,
        },
        "choice": {"nlist": choice.nlist, "estimated_bytes": choice.estimated_bytes},
    }
    result["speedup_median"] = round(result["flat"]["median_ms"] / result["index"]["median_ms"], 1)
    result["memory_ratio"] = round(index_size / flat_size, 3)
    return result


def table(result: dict) -> str:
    flat, index = result["flat"], result["index"]
    rows = [
        ("index", "build s", "bytes", "recall@10", "median ms", "p99 ms"),
        (
            "Flat (exact)",
            flat["build_seconds"],
            format_size(flat["bytes"]),
            "1.0000",
            flat["median_ms"],
            flat["p99_ms"],
        ),
        (
            f"{index['factory']} {','.join(f'{k}={v}' for k, v in index['params'].items())}",
            index["build_seconds"],
            format_size(index["bytes"]),
            f"{index['recall_at_10']:.4f}",
            index["median_ms"],
            index["p99_ms"],
        ),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(6)]
    lines = ["| " + " | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append(
        f"\n{result['vectors']:,} vectors of dimension {result['dim']}, {result['threads']} threads, budget "
        f"{format_size(result['memory_budget'])}: {result['speedup_median']}x faster (median), "
        f"{result['memory_ratio']:.3f} of flat's bytes"
    )
    return "\n".join(lines)
