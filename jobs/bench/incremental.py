"""Benchmark: an incremental run that adds a few percent to a catalog, against a full run over the final listing.

Both runs embed with a tiny random-weight CLIP (`--tasks embed`) on a local Ray cluster, so the
numbers are loupe's own costs (listing, planning, the catalog's manifest and indexes, Ray and
replica start) around a model that takes little time. Listing is timed apart. A second part
times the catalog step alone (load the plans, diff a listing) on synthetic catalogs ten times
apart in size, to show that it grows linearly.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from loupe.jobs.incremental import Diff, diff_listing, load_catalog
from loupe.jobs.planner import plan_objects, write_plan
from loupe.schemas.records import JobRecord
from loupe.workers.storage import LocalStorage, ObjectInfo


def make_images(folder: Path, first: int, count: int, side: int = 48) -> None:
    """`count` small distinct JPEGs (image-{i}.jpg from `first`), reproducible."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        pixels = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image-{i:06d}.jpg", quality=80)


def _listing_seconds(folder: Path) -> tuple[float, int]:
    started = time.perf_counter()
    count = sum(1 for _ in LocalStorage().list(str(folder)))
    return time.perf_counter() - started, count


def run_incremental_bench(workdir: Path, *, images: int = 10_000, added: float = 0.01, shard_size: int = 1000,
                          threads: int | None = None) -> dict[str, Any]:
    """A catalog of `images`, `added` more of them, then --incremental beside a full run over all."""
    from loupe.jobs.replicas import connect_ray
    from loupe.jobs.runner import run_job
    from loupe.schemas.config import JobConfig
    from loupe.workers.models.random import build_random_model

    clip = workdir / "clip"
    if not (clip / "config.json").exists():
        build_random_model(clip, "clip", "tiny")
    photos = workdir / "photos"
    extra = max(1, round(images * added))
    shutil.rmtree(photos, ignore_errors=True)
    make_images(photos, 0, images)
    for name in ("catalog", "full"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    connect_ray(own_cluster=True, num_cpus=threads or os.cpu_count() or 1)

    def config(output: str, **kw: Any) -> JobConfig:
        return JobConfig(input=str(photos), output=str(workdir / output), tasks="embed", image_embedding_model=str(clip),
                         shard_size=shard_size, batch_size=32, replicas=1, **kw)

    started = time.perf_counter()
    base = run_job(config("catalog"))
    base_seconds = time.perf_counter() - started
    make_images(photos, images, extra)
    listing_seconds, listed = _listing_seconds(photos)

    started = time.perf_counter()
    grown = run_job(config("catalog", incremental=True))
    incremental_seconds = time.perf_counter() - started
    started = time.perf_counter()
    run_job(config("catalog", incremental=True))  # nothing new: timed only
    idle_seconds = time.perf_counter() - started
    started = time.perf_counter()
    full = run_job(config("full"))
    full_seconds = time.perf_counter() - started
    diff = grown.growth.diff
    return {
        "catalog_images": images,
        "added_images": extra,
        "listed_objects": listed,
        "shard_size": shard_size,
        "catalog_run_s": round(base_seconds, 2),
        "incremental_run_s": round(incremental_seconds, 2),
        "incremental_processed": grown.images_this_run,
        "incremental_listing_s": round(diff.listing_seconds, 3),
        "incremental_planning_s": round(grown.growth.planning_seconds, 3),
        "incremental_new_shards": grown.shards_total - base.shards_total,
        "index_notes": [n for n in grown.notes if "index" in n],
        "nothing_new_run_s": round(idle_seconds, 2),
        "full_run_s": round(full_seconds, 2),
        "full_processed": full.images_this_run,
        "listing_s": round(listing_seconds, 3),
        "speedup": round(full_seconds / incremental_seconds, 1),
    }


def catalog_scaling(workdir: Path, sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)) -> list[dict[str, Any]]:
    """The catalog step alone (plans loaded, a listing with 1% more diffed), per catalog size."""
    results = []
    for size in sizes:
        output = workdir / f"scaling-{size}"
        output.mkdir(parents=True, exist_ok=True)
        listing = [ObjectInfo(f"s3://bucket/photos/{i:09d}.jpg", 1000 + i % 7) for i in range(size)]
        write_plan(plan_objects(listing, 1000), str(output / "_plan.parquet"))
        job = JobRecord(settings={}, listing_sha256="", objects=size, shards=-(-size // 1000), created_at="")
        started = time.perf_counter()
        catalog = load_catalog(LocalStorage(), str(output), job)
        loaded = time.perf_counter() - started
        grown = listing + [ObjectInfo(f"s3://bucket/photos/{i:09d}.jpg", 5) for i in range(size, size + size // 100)]
        diff = Diff()
        started = time.perf_counter()
        new = sum(1 for _ in diff_listing(iter(grown), catalog, diff))
        diffed = time.perf_counter() - started
        bytes_per_object = (catalog.ids.nbytes + catalog.shards.nbytes + catalog.sizes.nbytes + catalog.etags.nbytes) / size
        results.append(
            {
                "catalog_objects": size,
                "load_s": round(loaded, 3),
                "diff_s": round(diffed, 3),
                "new": new,
                "us_per_object": round(1e6 * (loaded + diffed) / size, 2),
                "bytes_per_object": round(bytes_per_object, 1),
            }
        )
        shutil.rmtree(output)
    return results


def format_report(run: dict[str, Any] | None, scaling: list[dict[str, Any]]) -> str:
    """The benchmark as a few lines a person reads once."""
    lines = []
    if run is not None:
        lines += [
            f"catalog: {run['catalog_images']} images, {run['shard_size']} a shard, built in {run['catalog_run_s']} s",
            f"added:   {run['added_images']} images ({run['listed_objects']} objects listed in {run['listing_s']} s)",
            (
                f"incremental run: {run['incremental_run_s']} s, {run['incremental_processed']} images processed "
                f"in {run['incremental_new_shards']} new shards (listing {run['incremental_listing_s']} s, "
                f"catalog and plan {run['incremental_planning_s']} s)"
            ),
            *(f"  {note}" for note in run["index_notes"]),
            f"full run over the final listing: {run['full_run_s']} s, {run['full_processed']} images processed",
            f"incremental is {run['speedup']}x faster; a second --incremental with nothing new: {run['nothing_new_run_s']} s",
        ]
    if scaling:
        lines.append("catalog step alone (plans loaded, a listing 1% larger diffed):")
        for row in scaling:
            lines.append(
                f"  {row['catalog_objects']:>9} objects: load {row['load_s']} s, diff {row['diff_s']} s, "
                f"{row['us_per_object']} us and {row['bytes_per_object']} bytes an object"
            )
    return "\n".join(lines)
