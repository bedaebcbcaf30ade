"""`loupe bench serve`: search through the API on loopback, over a given catalog or a synthetic one the size of the index benchmark's."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loupe.jobs.bench.index import ClusteredVectors
from loupe.jobs.indexing import build_output_index
from loupe.jobs.output import find_job, find_manifest, write_manifest, write_record
from loupe.jobs.serve.bench import CLIENTS, bench_serve
from loupe.schemas.codes import ErrorCode
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError
from loupe.schemas.layout import JOB_FILE
from loupe.schemas.plan import Shard, ShardKind
from loupe.schemas.records import JobRecord, Manifest, ShardStats
from loupe.schemas.rows import output_schema
from loupe.workers.reader import Sample, image_id_for
from loupe.workers.rows import Item, Result, RowBuilder
from loupe.workers.storage import open_storage
from loupe.workers.writer import write_part, write_stats

SHARD_SIZE = JobConfig.model_fields["shard_size"].default  # rows a part, as a job writes them by default
BUDGET_FRACTION = 0.25  # the index benchmark's memory budget: a quarter of flat's bytes
ERROR_EVERY = 200  # one listed object in 200 became an error row (real listings hold a few broken files)
SIZES = ((4032, 3024), (3024, 4032), (1920, 1080), (1280, 960), (800, 600), (640, 640))
_SUBJECTS = ("a brown dog", "two children", "a red bicycle", "an old man", "a plate of food", "a city street",
             "a white cat", "a group of people", "a wooden boat", "a mountain lake", "a black car", "a bowl of fruit")
_ACTIONS = ("standing", "sitting", "lying", "parked", "shown up close", "seen from above", "waiting", "resting")
_PLACES = ("on a sandy beach", "in a small kitchen", "next to a brick wall", "under a cloudy sky",
           "in a crowded market", "on a wooden table", "in a green park", "at night under street lights")
_DETAILS = ("The light is warm and soft.", "Several trees stand in the background.",
            "The photo is slightly blurred.", "Bright colours fill the frame.", "A few people walk past.",
            "The scene looks calm and quiet.")


def synthetic_catalog(
    workdir: Path, vectors: int, dim: int, seed: int = 0, log: Callable[[str], None] = lambda line: None
) -> str:
    """OUTPUT of a finished job whose image index holds `vectors` of the index benchmark's vectors; built once per (vectors, dim, seed).

    Rows come from the job's own RowBuilder and part writer (ok rows with a caption, moderation
    scores and the vector; one object in ERROR_EVERY an error row), the index from
    build_output_index at a quarter of flat's bytes, and the job's CLIP is a random-weight one
    whose projection is `dim` wide, so a text query embeds exactly as on a real catalog.
    """
    output, clip = workdir / f"catalog-{vectors}x{dim}-seed{seed}", workdir / f"clip-{dim}-seed{seed}"
    manifest = find_manifest(open_storage(str(output)), str(output)) if output.exists() else None
    if manifest is not None and manifest.complete and "image" in manifest.index and (clip / "config.json").exists():
        log(f"reusing the synthetic catalog at {output}")
        return str(output)
    if output.exists():
        shutil.rmtree(output)  # left half-built by an interrupted run
    random_clip(clip, dim, seed)
    started = time.perf_counter()
    config = JobConfig(
        input="s3://loupe-bench-photos/", output=str(output), tasks=("caption", "moderate", "embed"),
        image_embedding_model=str(clip), shard_size=SHARD_SIZE,
    )
    _write_job(config, vectors, dim, seed, log)
    log(f"{vectors:,} rows written in {time.perf_counter() - started:.0f} s; building the image index")
    # The index benchmark's budget; a catalog too small to need one gets a MiB (Flat fits).
    budget = max(int(4 * vectors * dim * BUDGET_FRACTION), 1 << 20)
    record = build_output_index(str(output), kind="image", memory_budget=budget, seed=seed)
    log(f"index {record.factory} {record.params} built in {record.build_seconds:.0f} s")
    return str(output)


def random_clip(dest: Path, dim: int, seed: int = 0) -> Path:
    """A random-weight CLIP checkpoint whose image and text vectors have `dim` dimensions, built once at `dest`.

    The tiny CLIP up to 64 dimensions, else the small one (openai/clip-vit-base-patch32's
    width), with projections to `dim` (768: ViT-L/14's).
    """
    if (dest / "config.json").exists():
        return dest
    from loupe.workers.models.random import build_random_clip

    building = dest.with_name(dest.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    build_random_clip(building, "tiny" if dim <= 64 else "small", seed, projection_dim=dim)
    os.replace(building, dest)
    return dest


def _write_job(config: JobConfig, vectors: int, dim: int, seed: int, log: Callable[[str], None]) -> None:
    """The job record, one part and stats record per shard, and a complete manifest, as a finished run leaves them."""
    output, storage = config.output, open_storage(config.output)
    builder = RowBuilder(config)
    # A real job's rows also hold caption vectors; no index here reads them, so they stay null.
    schema = output_schema(config.taxonomy, image_dim=dim, text_dim=None, text_column=None)
    rng = np.random.default_rng([seed, 3])
    parts, rows_ok, rows_error = [], 0, 0
    keys = config.taxonomy.keys
    stream = _rechunk(ClusteredVectors(vectors, dim, seed)(), SHARD_SIZE - SHARD_SIZE // ERROR_EVERY)
    for shard_id, batch in enumerate(stream):
        started = time.time()
        shard = Shard(shard_id, ShardKind.FILES, ())
        results, errors = _shard_items(shard_id, batch, keys, rng)
        rows = builder.shard_rows(shard, results, errors)
        written = write_part(storage, output, shard_id, rows.rows, schema)
        write_stats(storage, output, ShardStats(
            shard_id=shard_id, part=written.path, part_sha256=written.sha256, part_bytes=written.bytes,
            rows=written.rows, rows_ok=rows.rows_ok, rows_error=rows.rows_error, error_codes=rows.error_codes,
            seconds=time.time() - started, started_at=started, finished_at=time.time(),
            rows_flagged=rows.rows_flagged, flagged=rows.flagged,
        ))
        parts.append({"path": written.path, "shard_id": shard_id, "rows": written.rows, "sha256": written.sha256, "bytes": written.bytes})
        rows_ok, rows_error = rows_ok + rows.rows_ok, rows_error + rows.rows_error
        if shard_id % 100 == 99:
            log(f"{rows_ok:,} of {vectors:,} rows written")
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    job = JobRecord(settings=config.plan_settings(), listing_sha256="", objects=rows_ok + rows_error, shards=len(parts), created_at=now)
    write_record(storage, output, JOB_FILE, job)
    write_manifest(storage, output, Manifest(
        complete=True, shards_total=len(parts), rows_ok=rows_ok, rows_error=rows_error, parts=parts,
        failed_shards=[], listing_sha256="", written_at=now,
    ))


def _rechunk(batches: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The rows of `batches` again, `size` at a time (the last chunk shorter)."""
    carry = None
    for batch in batches:
        if carry is not None:
            batch = np.concatenate([carry, batch])
        ends = range(size, len(batch) + 1, size)
        for end in ends:
            yield batch[end - size:end]
        carry = batch[(len(batch) // size) * size:]
    if carry is not None and len(carry):
        yield carry


def _shard_items(
    shard_id: int, vectors: np.ndarray, keys: Sequence[str], rng: np.random.Generator
) -> tuple[list[Result], list[Item]]:
    """One ok result per vector (caption, scores, size) with an error item after every ERROR_EVERY - 1 of them."""
    count = len(vectors)
    picks = rng.integers(0, 1 << 16, size=(count, 5))
    # Mostly low scores, a few over a threshold: about one image in a hundred is flagged.
    scores = rng.beta(0.5, 8.0, size=(count, len(keys))).astype(np.float32)
    results, errors, seq = [], [], 0
    for i in range(count):
        if seq % ERROR_EVERY == ERROR_EVERY - 1:
            errors.append(Item(seq, _sample(shard_id, seq), error=(ErrorCode.NOT_AN_IMAGE, "cannot identify image file")))
            seq += 1
        p = picks[i]
        caption = (
            f"{_SUBJECTS[p[0] % len(_SUBJECTS)].capitalize()} {_ACTIONS[p[1] % len(_ACTIONS)]} "
            f"{_PLACES[p[2] % len(_PLACES)]}. {_DETAILS[p[3] % len(_DETAILS)]}"
        )
        item = Item(seq, _sample(shard_id, seq), size=SIZES[p[4] % len(SIZES)])
        results.append(Result(item, caption=caption, scores=dict(zip(keys, scores[i].tolist())), image_embedding=vectors[i]))
        seq += 1
    return results, errors


def _sample(shard_id: int, seq: int) -> Sample:
    uri = f"s3://loupe-bench-photos/{shard_id:05d}/{seq:04d}.jpg"
    return Sample(image_id_for(uri), uri, None)


def run_serve_bench(
    output: str | None,
    *,
    vectors: int,
    dim: int,
    workdir: Path,
    clients: Sequence[int] = CLIENTS,
    requests: int = 200,
    query: str = "a red square",
    k: int = 10,
    fresh_runs: int = 3,
    seed: int = 0,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """bench_serve over OUTPUT, or over the synthetic catalog of `vectors` x `dim` when OUTPUT is None."""
    built = None
    if output is None:
        started = time.perf_counter()
        output = synthetic_catalog(workdir, vectors, dim, seed, log)
        built = round(time.perf_counter() - started, 1)
    result = bench_serve(output, query=query, k=k, clients=clients, requests=requests, fresh_runs=fresh_runs, log=log)
    manifest = find_manifest(open_storage(output), output)
    job = find_job(open_storage(output), output)
    entry = (manifest.index if manifest else {}).get("image") or {}
    result["catalog"] = {
        "synthetic": built is not None,
        "prepare_seconds": built,
        "rows": (manifest.rows_ok + manifest.rows_error) if manifest else 0,
        "vectors": entry.get("vectors"),
        "model": (job.settings if job else {}).get("image_embedding_model"),
    }
    return result


def parse_clients(text: str) -> tuple[int, ...]:
    """`--clients 1,8,32` as counts; anything but positive whole numbers is one UserError line."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise UserError(f"--clients takes comma-separated positive counts such as 1,8,32, not {text!r}")
    return counts
