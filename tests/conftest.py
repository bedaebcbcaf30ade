"""Session-wide real local components: an S3 endpoint on loopback, a Ray cluster, tiny models."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

pytest.register_assert_rewrite("tests.jobs.outputs")  # shared assertions keep pytest's explanations

# Credentials for the loopback S3 endpoint. Set before anything starts so that Ray workers,
# which inherit this process's environment, see them too.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "loupe-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "loupe-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API over HTTP on 127.0.0.1 (moto's server mode); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    """A boto3 client pointed at the loopback endpoint, exactly as a user points one at MinIO."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client):
    """A fresh, empty bucket for one test; yields its name."""
    name = f"loupe-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster of two nodes for the whole session (start-up costs seconds).

    Two nodes of two logical CPUs each, so a job with two replicas spreads over both.
    """
    from loupe.jobs.replicas import local_cluster

    with local_cluster(nodes=2, cpus_per_node=2) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The tiny random-weight checkpoint of each LLaVA family (seed 0), built offline once per session."""
    from loupe.workers.models.random import FAMILIES, build_random_model

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {family: build_random_model(root / family, family, "tiny", seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llava(tiny_checkpoints):
    """The tiny random-weight LLaVA-1.5 checkpoint's path."""
    return str(tiny_checkpoints["llava"])


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    """A folder of generated images (and two broken files), shared read-only by tests."""
    from loupe.jobs.demo import make_sample_images

    folder = tmp_path_factory.mktemp("samples")
    make_sample_images(folder, count=12)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random-weight CLIP checkpoint for image embeddings, built offline once."""
    from loupe.workers.models.random import build_random_model

    return str(build_random_model(tmp_path_factory.mktemp("tiny-clip"), "clip", "tiny"))


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS on one thread for a module (use with pytestmark): small indexes build and search
    faster on one, OpenMP's spinning threads starve when other test runs share the cores, and
    build_output_index and load_index, which size FAISS's pool to this process's CPUs, find a
    share of one."""
    import faiss

    from loupe.workers.index import threads

    count = faiss.omp_get_max_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threads, "cpu_share", lambda: 1)
        faiss.omp_set_num_threads(1)
        yield
    faiss.omp_set_num_threads(count)
