"""The serve benchmark's measuring loop against a live server, and its table."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

from loupe.jobs.serve.bench import format_table, measure_clients


def test_concurrent_clients_are_timed_and_checked(site):
    port = urllib.parse.urlsplit(site).port
    path = "/api/search?q=a+red+square&k=5"
    with urllib.request.urlopen(f"{site}{path[1:]}", timeout=60) as response:
        expected = json.loads(response.read())
    level = measure_clients(port, path, 4, 12, expected)
    assert level["clients"] == 4 and level["requests"] == 12 and level["errors"] == 0
    assert 0 < level["p50_ms"] <= level["p99_ms"] and level["requests_per_second"] > 0
    wrong = measure_clients(port, "/api/search?q=something+else&k=5", 2, 4, expected)
    assert wrong["errors"] == 4

    table = format_table({
        "output": "/data/out", "query": "a red square", "k": 5, "kind": "image", "server_startup_seconds": 3.2,
        "levels": [level], "fresh_process_search_seconds": 7.5,
    })
    lines = table.splitlines()
    assert lines[0].startswith("loupe serve search benchmark: /data/out") and lines[-1].endswith("7.50 s")
    assert lines[4].split()[:2] == ["4", "12"]
