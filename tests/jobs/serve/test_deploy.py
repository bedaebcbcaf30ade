"""`--replicas 2`: the same app as a Ray Serve deployment on the session's two-node local cluster."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
import socket
import time
import urllib.error
import urllib.request

import pytest

from loupe.jobs.search import search
from loupe.jobs.serve.deploy import APP_NAME, start_deployment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, token: str | None = None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.headers, json.loads(response.read())


@pytest.fixture
def deployment(ray_cluster, catalog_output):
    from ray import serve

    try:
        address = start_deployment(
            catalog_output, replicas=2, host="127.0.0.1", port=free_port(), token="t0ken", endpoint_url=None
        )
        yield address
    finally:
        serve.shutdown()


def test_two_replicas_serve_the_same_answers(deployment, catalog_output):
    from ray import serve

    deployments = serve.status().applications[APP_NAME].deployments
    assert [d.replica_states for d in deployments.values()] == [{"RUNNING": 2}]

    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"{deployment}api/status")
    assert refused.value.code == 401  # each replica checks the token

    expected = [hit.to_dict() for hit in search(catalog_output, text="a red square", k=5)]
    replicas = set()
    deadline = time.monotonic() + 120
    # Serve routes to the proxy's own node first: concurrent requests spill over to the other replica.
    with ThreadPoolExecutor(max_workers=16) as pool:
        while len(replicas) < 2 and time.monotonic() < deadline:
            for headers, body in pool.map(lambda _: get(f"{deployment}api/search?q=a+red+square&k=5", "t0ken"), range(32)):
                assert body["hits"] == expected
                replicas.add(headers["X-Loupe-Replica"])
    assert len(replicas) == 2, "both replicas should have answered"
