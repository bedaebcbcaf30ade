"""`loupe demo`: a whole job on generated images and a tiny random-weight model, offline."""

from __future__ import annotations

import random
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from rich.console import Console

from loupe.jobs.runner import JobObserver, JobResult, run_job
from loupe.schemas.config import JobConfig
from loupe.schemas.layout import MANIFEST_FILE, PARTS_DIR

_COLOURS = ["red", "orange", "gold", "green", "teal", "blue", "purple", "pink", "white", "black"]


def make_sample_images(folder: Path, count: int = 48, seed: int = 0) -> list[Path]:
    """Generated scenes of varied sizes and formats, plus two broken files that become error rows."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = rng.choice([(320, 240), (240, 320), (400, 400), (640, 360), (200, 500)])
        image = Image.new("RGB", (width, height), rng.choice(_COLOURS))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 5)):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            box = [x0, y0, x0 + rng.randint(20, width // 2), y0 + rng.randint(20, height // 2)]
            shape = rng.choice([draw.rectangle, draw.ellipse])
            shape(box, fill=rng.choice(_COLOURS), outline="black")
        path = folder / f"scene-{i:03d}.{'png' if i % 4 == 0 else 'jpg'}"
        image.save(path)
        paths.append(path)
    (folder / "broken-empty.jpg").write_bytes(b"")
    (folder / "broken-truncated.jpg").write_bytes(paths[1].read_bytes()[:200])
    return paths


def run_demo(
    workdir: Path,
    observer_factory: Callable[[], JobObserver],
    print_summary: Callable[[JobResult, JobConfig, float], None],
) -> JobResult:
    from transformers.utils import logging as hf_logging

    from loupe.workers.models.random import build_random_model

    began = time.monotonic()
    hf_logging.disable_progress_bar()

    console = Console()
    workdir = workdir.resolve()
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        console.print(f"building a tiny random-weight LLaVA checkpoint in {model_dir}")
        build_random_model(model_dir, "llava", "tiny")
    clip_dir = workdir / "clip"
    if not (clip_dir / "config.json").exists():
        build_random_model(clip_dir, "clip", "tiny")
    images = workdir / "images"
    if not images.exists():
        make_sample_images(images)
    output = workdir / "output"
    config = JobConfig(
        input=str(images),
        output=str(output),
        model=str(model_dir),
        max_new_tokens=16,
        batch_size=8,
        shard_size=10,
        replicas=2,
        image_embedding_model=str(clip_dir),  # random CLIP; captions embed with the real MiniLM
        overwrite=True,  # each demo run starts fresh
    )
    console.print(f"captioning, moderating and embedding {images} with 2 replicas on a local Ray cluster")
    with observer_factory() as observer:
        result = run_job(config, observer)
    print_summary(result, config, time.monotonic() - began)
    rows = pq.read_table(output / PARTS_DIR, columns=["source_uri", "status", "caption", "flagged_categories"])
    console.print(f"\nParquet parts: {output / PARTS_DIR}  (manifest: {output / MANIFEST_FILE})")
    for row in [r for r in rows.to_pylist() if r["status"] == "ok"][:3]:
        name = row["source_uri"].rsplit("/", 1)[-1]
        flags = ", ".join(row["flagged_categories"] or []) or "none"
        console.print(f"  {name}: {row['caption'][:60]!r}  flagged: {flags}")
    from loupe.jobs.search import search

    query = "a red ellipse on a blue background"
    console.print(f"\nloupe search {output} {query!r} -k 3 --kind caption")
    for hit in search(str(output), text=query, k=3, kind="caption"):
        console.print(f"  {hit.rank}. {hit.score:.3f} {hit.source_uri.rsplit('/', 1)[-1]}")
    console.print(
        "\n[bold yellow]The model has random weights, so these captions and scores are noise.[/] "
        "For real captions: loupe run INPUT OUTPUT --model llava-hf/llava-1.5-7b-hf "
        "(downloads from the Hugging Face hub, or give a local checkpoint path)."
    )
    # One unwrapped line, so the command copies whole from a narrow terminal.
    console.print(f"\nBrowse and search the catalog in a web page: loupe serve {shlex.quote(str(output))}", soft_wrap=True, markup=False)
    return result
