"""Benchmark: search through `loupe serve` on loopback (p50, p99, requests/s) beside `loupe search` in a fresh process."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from loupe.jobs.console import fit_line
from loupe.schemas.errors import UserError

CLIENTS = (1, 8, 32)
STARTUP_SECONDS = 900  # a large index and two models load before the first answer


def bench_serve(
    output: str,
    *,
    query: str = "a red square",
    k: int = 10,
    kind: str = "image",
    clients: Sequence[int] = CLIENTS,
    requests: int = 200,
    fresh_runs: int = 3,
    endpoint_url: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Start `loupe serve OUTPUT` in a child process and time the same text search at each client count.

    Each level sends max(`requests`, 4 x clients) requests over keep-alive connections, one per
    client thread; latency is per request, requests/s over the level's wall time; an answer
    other than the first is an error. `fresh_runs` times `loupe search --json` in a new process
    for the same query (model and index load each time), and splits a second one into start-up
    and query (fresh_search). The server's peak resident memory is read before it stops.
    """
    path = "/api/search?" + urllib.parse.urlencode({"q": query, "k": k, "kind": kind})
    env = os.environ | ({"AWS_ENDPOINT_URL": endpoint_url} if endpoint_url else {})
    port = _free_port()
    with tempfile.TemporaryFile() as server_log:
        started = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "loupe.jobs.serve", output, "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=server_log, env=env,
        )
        try:
            expected = _wait_until_up(server, port, path, server_log)
            startup = time.perf_counter() - started
            log(f"server up in {startup:.1f} s; {len(expected['hits'])} hits per query")
            levels = []
            for count in clients:
                level = measure_clients(port, path, count, max(requests, 4 * count), expected)
                log(f"{count} clients: p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, "
                    f"{level['requests_per_second']:.1f} requests/s")
                levels.append(level)
            peak, resident = process_memory(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
    fresh = [fresh_search(output, query, k, kind, env) for _ in range(fresh_runs)]
    if fresh:
        log(f"loupe search in a fresh process: {np.median([f['wall_seconds'] for f in fresh]):.1f} s")
    return {
        "output": output,
        "query": query,
        "k": k,
        "kind": kind,
        "hits": expected["hits"],
        "server_startup_seconds": round(startup, 2),
        "server_peak_bytes": peak,
        "server_resident_bytes": resident,
        "levels": levels,
        "fresh_process_search_seconds": round(float(np.median([f["wall_seconds"] for f in fresh])), 2) if fresh else None,
        "fresh_phases": {
            name: round(float(np.median([f[name] for f in fresh])), 3) for name in fresh[0] if name != "wall_seconds"
        } if fresh else None,
        "fresh_runs": len(fresh),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result in lines of at most 80 characters, but for the catalog's path on the first."""
    peak, resident = result.get("server_peak_bytes"), result.get("server_resident_bytes")
    lines = [
        f"loupe serve search benchmark: {result['output']}",
        fit_line(f"{result['kind']} index, k={result['k']}, query {result['query']!r}", 80),
        f"server up in {result['server_startup_seconds']:.1f} s"
        + (f", {resident / 2**30:.2f} GiB resident (peak {peak / 2**30:.2f})" if peak and resident else ""),
        f"{'clients':>8} {'requests':>9} {'p50 ms':>9} {'p99 ms':>9} {'requests/s':>11} {'errors':>7}",
    ]
    for level in result["levels"]:
        lines.append(
            f"{level['clients']:>8} {level['requests']:>9} {level['p50_ms']:>9.1f} {level['p99_ms']:>9.1f} "
            f"{level['requests_per_second']:>11.1f} {level['errors']:>7}"
        )
    phases = result.get("fresh_phases")
    if phases:
        lines.append(
            f"fresh process: start-up {phases['startup_seconds']:.2f} s (imports {phases['imports_seconds']:.2f}, "
            f"index+model {phases['load_seconds']:.2f}), query {1000 * phases['query_seconds']:.0f} ms"
        )
        if "again_seconds" in phases:
            lines.append(f"  the same query again in that process: {1000 * phases['again_seconds']:.0f} ms")
    if result.get("fresh_process_search_seconds") is not None:
        lines.append(f"loupe search in a fresh process, same query: {result['fresh_process_search_seconds']:.2f} s")
    return "\n".join(lines)


def measure_clients(port: int, path: str, clients: int, total: int, expected: dict[str, Any]) -> dict[str, Any]:
    """`total` GETs of `path` on 127.0.0.1:`port` from `clients` threads at once; an answer other than `expected` is an error."""
    shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    # Every party arrives within moments of starting; a barrier still waiting after a minute is broken.
    gate = threading.Barrier(clients + 1, timeout=60)

    def client(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        gate.wait()
        for _ in range(shares[number]):
            began = time.perf_counter()
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200 and json.loads(body) == expected
            except (OSError, http.client.HTTPException, ValueError):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                ok = False
            latencies[number].append(time.perf_counter() - began)
            errors[number] += not ok
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    gate.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()  # bounded: each client makes a fixed number of requests, each with a 300 s timeout
    wall = time.perf_counter() - began
    times = np.concatenate([np.asarray(t) for t in latencies]) * 1000
    return {
        "clients": clients,
        "requests": int(len(times)),
        "p50_ms": round(float(np.percentile(times, 50)), 2),
        "p99_ms": round(float(np.percentile(times, 99)), 2),
        "requests_per_second": round(len(times) / wall, 1),
        "errors": int(sum(errors)),
    }


def _wait_until_up(server: subprocess.Popen, port: int, path: str, server_log) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            server_log.seek(0)
            lines = server_log.read().decode(errors="replace").strip().splitlines()
            last = lines[-1].removeprefix("loupe: error: ") if lines else "no output"
            raise UserError(f"loupe serve exited with {server.returncode}: {last}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            connection.close()
            if response.status != 200:
                raise UserError(f"the benchmark's query was refused: {json.loads(body).get('detail')}")
            return json.loads(body)
        except OSError:
            time.sleep(0.2)
    raise UserError(f"loupe serve did not answer within {STARTUP_SECONDS} s")


def fresh_search(output: str, query: str, k: int, kind: str, env: dict[str, str]) -> dict[str, float]:
    """`loupe search --json` in a new process, timed whole; then the same search in another new
    process that times its own phases (so the split costs the first timing nothing).

    start-up = the probe's wall time less its query: interpreter, imports (loupe, faiss, torch,
    transformers), then the index, its ids and the model loaded as `loupe search` loads them.
    """
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "loupe.jobs.cli", "search", output, query, "-k", str(k), "--kind", kind, "--json"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    wall = time.perf_counter() - began
    began = time.perf_counter()
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from loupe.jobs.serve.bench import probe_search; probe_search(*sys.argv[1:])",
         output, query, str(k), kind],
        check=True, capture_output=True, text=True, env=env,
    )
    probe_wall = time.perf_counter() - began
    phases = json.loads(probe.stdout.strip().splitlines()[-1])
    return {
        "wall_seconds": wall,
        "startup_seconds": probe_wall - phases["query_seconds"],
        "imports_seconds": probe_wall - phases["query_seconds"] - phases["load_seconds"],
        "load_seconds": phases["load_seconds"],
        "query_seconds": phases["query_seconds"],
        "again_seconds": phases["again_seconds"],
    }


def probe_search(output: str, query: str, k: str, kind: str) -> None:
    """In a fresh process: load as `loupe search` loads, search once, print the phases' seconds as JSON."""
    import torch  # noqa: F401  (imported by the model load anyway; counted with the imports)
    import transformers  # noqa: F401

    from loupe.jobs.search import open_searcher

    began = time.perf_counter()
    searcher = open_searcher(output, kind)
    loaded = time.perf_counter()
    hits = searcher.search(text=query, k=int(k))
    done = time.perf_counter()
    searcher.search(text=query, k=int(k))  # warm: what the first query paid once (threads, pages, kernels)
    again = time.perf_counter() - done
    print(json.dumps({"load_seconds": loaded - began, "query_seconds": done - loaded, "again_seconds": again, "hits": len(hits)}))


def process_memory(pid: int) -> tuple[int | None, int | None]:
    """Peak and current resident bytes of process `pid` (Linux's VmHWM, VmRSS); None where unreadable."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    found[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found.get("VmHWM"), found.get("VmRSS")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
