"""A real catalog for `loupe serve`'s tests: a whole job over generated images, one caption made hostile."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

XSS_CAPTION = "<script>alert(1)</script><img src=x onerror=alert(2)>\nand a second line"
# The tiny random judge scores every category between 0.49 and 0.61, with a gap around 0.56:
# about half the images are flagged, and two categories flag none.
THRESHOLD = 0.56
NEVER = ("hate_symbols", "self_harm")


def build_catalog(images: Path, output: Path, llava: str, clip: str) -> str:
    """Run the job (caption, moderate, embed), give one row XSS_CAPTION, then index it; returns OUTPUT."""
    from loupe.jobs.indexing import build_output_index
    from loupe.jobs.output import read_manifest, read_record, write_manifest, write_record
    from loupe.jobs.runner import run_job
    from loupe.schemas.config import JobConfig
    from loupe.schemas.layout import stats_path
    from loupe.schemas.records import ShardStats
    from loupe.schemas.taxonomy import DEFAULT_TAXONOMY, Category, Taxonomy
    from loupe.workers.models.embedder import TextEmbedder
    from loupe.workers.storage import LocalStorage, join_uri

    taxonomy = Taxonomy(
        tuple(Category(c.key, c.definition, 0.9 if c.key in NEVER else THRESHOLD) for c in DEFAULT_TAXONOMY.categories)
    )
    config = JobConfig(
        input=str(images), output=str(output), model=llava, image_embedding_model=clip, taxonomy=taxonomy,
        max_new_tokens=6, batch_size=4, shard_size=5, build_index=False,
    )
    result = run_job(config)
    assert result.complete and result.rows_ok == 12, result

    # The hostile caption goes into the first ok row, as if the model had written it: the part is
    # rewritten with the caption's own vector, and the manifest and stats record name its new sha256.
    out, storage = str(output), LocalStorage()
    manifest = read_manifest(storage, out)
    entry = manifest.parts[0]
    table = pq.read_table(output / entry["path"])
    row = table.column("status").to_pylist().index("ok")
    captions = table.column("caption").to_pylist()
    captions[row] = XSS_CAPTION
    vectors = table.column("caption_embedding").to_pylist()
    vectors[row] = TextEmbedder(config.text_embedding_model, device="cpu").embed_texts([XSS_CAPTION])[0].tolist()
    for name, values in (("caption", captions), ("caption_embedding", vectors)):
        at = table.schema.get_field_index(name)
        table = table.set_column(at, table.schema.field(at), pa.array(values, table.schema.field(at).type))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    storage.write_bytes(join_uri(out, entry["path"]), data)
    digest = hashlib.sha256(data).hexdigest()
    entry.update(sha256=digest, bytes=len(data))
    write_manifest(storage, out, manifest)
    stats_uri = join_uri(out, stats_path(entry["shard_id"]))
    stats = read_record(storage, stats_uri, ShardStats)
    stats.part_sha256, stats.part_bytes = digest, len(data)
    write_record(storage, out, stats_path(entry["shard_id"]), stats)

    for kind in ("image", "caption"):
        build_output_index(out, kind=kind, memory_budget=1 << 30)
    return out


@pytest.fixture(scope="session")
def catalog_output(ray_cluster, sample_images, tiny_llava, tiny_clip, tmp_path_factory) -> str:
    """OUTPUT of a finished job over the session's sample images (12 ok rows, 2 error rows), indexed."""
    return build_catalog(sample_images, tmp_path_factory.mktemp("serve") / "out", tiny_llava, tiny_clip)


@pytest.fixture(scope="session")
def loaded(catalog_output):
    """The catalog and its searchers, loaded once for the session (apps with other tokens share them)."""
    from loupe.jobs.serve.catalog import Catalog
    from loupe.jobs.serve.query import load_searchers

    catalog = Catalog.open(catalog_output)
    return catalog, load_searchers(catalog)


@pytest.fixture(scope="session")
def served_app(loaded):
    """The app over the catalog, without a token."""
    from loupe.jobs.serve.app import build_app

    return build_app(*loaded)


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


# -- a live server and a real browser ----------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSER_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000",
)


@contextlib.contextmanager
def live_server(app, host: str = "127.0.0.1"):
    """The app on a free port of `host` in a thread of this process; yields its URL."""
    import uvicorn

    from loupe.jobs.serve.command import listen, url

    sock = listen(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield url(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def site(served_app):
    with live_server(served_app) as address:
        yield address


def require_browser(*paths: str) -> None:
    missing = [path for path in paths if not os.access(path, os.X_OK)]
    if missing:
        reason = f"browser tests need {' and '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """Debian's headless Chromium through its chromedriver; missing, the tests skip (and fail under CI=true)."""
    require_browser(CHROMIUM, CHROMEDRIVER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium, request, tmp_path):
    """The session's browser for one test; a screenshot is saved (and its path printed) when the test fails."""
    chromium.get("about:blank")
    chromium.get_log("browser")  # drop what earlier tests logged
    yield chromium
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        path = tmp_path / "failure.png"
        chromium.save_screenshot(str(path))
        line = f"screenshot of the failed browser test: {path}"
        report.sections.append(("screenshot", line))  # shown with the failure in the summary
        terminal = request.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.report_call = report
