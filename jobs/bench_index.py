"""Benchmark: the index choose_index picks for a quarter of flat's memory, against exact flat search."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import faiss
import numpy as np

from loupe.jobs.index import build_index, choose_index, format_size, recall_at_k

CLUSTERS = 1000
BATCH = 50_000


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


def _latencies_ms(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    times = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - started) * 1000)
    return np.array(times)


def run(
    n: int,
    dim: int,
    *,
    budget_fraction: float = 0.25,
    queries: int = 1000,
    flat_latency_queries: int = 100,
    k: int = 10,
    seed: int = 0,
) -> dict:
    data = ClusteredVectors(n, dim, seed)
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
    _, found = index.search(xq, k)
    index_ms = _latencies_ms(index, xq, k)
    index_size = len(faiss.serialize_index(index))

    result = {
        "vectors": n,
        "dim": dim,
        "threads": faiss.omp_get_max_threads(),
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
            "recall_at_10": round(recall_at_k(found, truth, k), 4),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget-fraction", type=float, default=0.25, help="memory budget as a share of flat's bytes"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = run(
        args.vectors, args.dim, budget_fraction=args.budget_fraction, queries=args.queries, seed=args.seed
    )
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
