"""Run by the peer's own Python, never imported by loupe: autofaiss builds its index for a memory budget, then it is measured.

`python autofaiss_peer.py WORK BUDGET_BYTES` reads WORK/vectors/*.npy, WORK/queries.npy and
WORK/truth.npy (written by loupe.jobs.bench.peer), writes the index to WORK/peer-BUDGET_BYTES.index
and prints one JSON object: the index autofaiss chose, its build seconds and the build's peak
resident memory, then, as loupe's index benchmark measures its own index, the index read back
from its file in a fresh process: the memory reading it took, recall@10 and single-query
latencies. `... WORK BUDGET_BYTES --serve INDEX_PARAM` measures a kept index again. Only the standard library,
numpy, faiss and autofaiss are imported: the peer's pins (faiss-cpu 1.8, numpy < 2) conflict
with loupe's.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import time


def _heap_bytes() -> int:
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _peak_resident_bytes() -> int:
    # VmHWM, not ru_maxrss: Linux carries the launching process's peak into ru_maxrss across exec.
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def build(work: str, budget: int) -> dict:
    from autofaiss import build_index

    started = time.perf_counter()
    _, metrics = build_index(
        embeddings=os.path.join(work, "vectors"),
        index_path=_index_path(work, budget),
        index_infos_path=os.path.join(work, f"peer-{budget}.json"),
        max_index_memory_usage=f"{budget}B",
        current_memory_available="16G",
        max_index_query_time_ms=10.0,  # autofaiss's default query time target
        metric_type="ip",
        verbose=logging.WARNING,
    )
    seconds = time.perf_counter() - started
    if metrics is None:
        raise SystemExit(f"autofaiss built no index for a budget of {budget} bytes")
    return {
        "index_key": metrics.get("index_key"),
        "index_param": metrics.get("index_param"),
        "build_seconds": round(seconds, 1),
        "peak_build_bytes": _peak_resident_bytes(),
    }


def _index_path(work: str, budget: int) -> str:
    return os.path.join(work, f"peer-{budget}.index")


def serve(work: str, budget: int, index_param: str | None, k: int = 10) -> dict:
    import faiss
    import numpy as np

    queries = np.load(os.path.join(work, "queries.npy"))
    truth = np.load(os.path.join(work, "truth.npy"))
    heap = _heap_bytes()
    index = faiss.read_index(_index_path(work, budget))
    if index_param:
        faiss.ParameterSpace().set_index_parameters(index, index_param)
    heap = _heap_bytes() - heap
    _, found = index.search(queries, k)
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth))
    latencies = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None, :], k)
        latencies.append((time.perf_counter() - started) * 1000)
    return {
        "bytes": heap,
        "file_bytes": os.path.getsize(_index_path(work, budget)),
        "recall_at_10": round(hits / (k * len(queries)), 4),
        "median_ms": round(float(np.median(latencies)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
    }


def main() -> None:
    work, budget = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[3] == "--serve":
        print(json.dumps(serve(work, budget, sys.argv[4] if len(sys.argv) > 4 else None)))
        return
    result = build(work, budget)
    # Read back by a fresh process, as loupe's index is: a built index holds spare list capacity.
    served = subprocess.run(
        [sys.executable, __file__, work, str(budget), "--serve", result["index_param"] or ""],
        check=True, capture_output=True, text=True, timeout=3600,
    )
    result |= json.loads(served.stdout.strip().splitlines()[-1])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
