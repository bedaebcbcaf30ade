"""`loupe bench [job]`: images/s of the real job path beside the model alone and a naive loop, and where the time goes.

    loupe bench [job] [--family llava|llava-next|llava-onevision] [--size tiny|small|7b] [--images N]
                      [--batch-size B] [--max-new-tokens T] [--tasks caption,moderate,embed]
                      [--source local|s3] [--device cpu|cuda] [--json]

One run, on a random-weight checkpoint of the family and size and on generated photo-like JPEGs
of varied sizes (local folder, or a loopback S3 endpoint started for the run), every caption
exactly T tokens long (min = max new tokens), measures:

1. end to end: `run_job` with one replica (fetch, decode, preprocess, model, Parquet part and
   stats writes), timed from the first shard's start to the last shard's end (ShardStats
   started_at / finished_at): Ray start-up and model loading are not counted;
2. the model alone: the same images decoded and prepared beforehand (outside the clock), the
   same batches, through the same ShardProcessor calls (run_batch), after one warm-up batch;
   half of the batches just before the job and half just after it, so that a machine whose
   speed drifts during the turn (a shared VM's does, by 10-20 % over a minute) slows both alike;
3. pipeline efficiency = (1) / (2) (with --repeats, the median of each turn's ratio);
4. naive: one image at a time, as a plain transformers script does it (read, PIL, AutoProcessor,
   generate, decode), the same weights, dtype and greedy settings; the speed-up of (1) over it;
5. seconds per image per stage: fetch, decode, preprocess, generate, moderate, embed and write
   summed over the job's shards (ShardStats.timings; fetch and decode are summed over their
   threads, so they overlap the model); vision tower, prefill and decode steps timed with
   forward hooks in the model-alone run; GPU memory high-water mark on CUDA; tokens/s.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loupe.jobs.bench import measure
from loupe.jobs.bench.options import DEFAULT_NAIVE_IMAGES, BenchOptions
from loupe.jobs.bench.photos import make_photos
from loupe.jobs.bench.report import build_report
from loupe.jobs.bench.source import image_source
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError

if TYPE_CHECKING:
    import torch


def run_bench(options: BenchOptions, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Build, generate, run all three ways and return every figure as plain data (see the module doc)."""
    from loupe.workers.models.loading import resolve_device
    from loupe.workers.torch_thread import on_torch_thread

    tasks = options.checked_tasks()
    device = resolve_device(options.device)
    parameters = _check_memory(options, device)
    shard_size = options.shard_size or _default_shard_size(options.images, options.batch_size)
    naive_images = min(options.images, options.naive_images or DEFAULT_NAIVE_IMAGES)
    with _workdir(options.workdir) as work:
        log(f"checkpoint: random {options.family} ({options.size}), {parameters / 1e6:.1f}M parameters")
        model = _checkpoint(work, options.family, options.size, options.seed, device)
        clip = None
        if "embed" in tasks:
            clip = _checkpoint(work, "clip", "tiny" if options.size == "tiny" else "small", options.seed, device)
        paths = make_photos(work / f"images-{options.images}-seed{options.seed}", options.images, options.seed)
        with image_source(options.source, paths, options.endpoint_url) as (input_uri, endpoint_url, fetch):
            config = measure.job_config(options, tasks, model, clip, input_uri, endpoint_url, work, shard_size)
            e2e, alone = [], []
            with _connected_ray(config, device, options.threads) as threads, _torch_threads(threads):
                # The replica's torch threads, here too: the job runs in its actor, the rest in this process.
                models = measure.load_models(config, work, device)
                images = measure.decoded_like_job(models, paths)
                batches = measure.job_batches(images, options.batch_size, shard_size, models.captioner)
                before, after = batches[: len(batches) // 2], batches[len(batches) // 2 :]
                # Each turn runs the model alone on half of the batches, the job, then the model
                # alone on the other half: load from elsewhere and a drift in the machine's speed
                # fall on both sides of the ratio alike.
                for repeat in range(options.repeats):
                    turn = f" ({repeat + 1}/{options.repeats})" if options.repeats > 1 else ""
                    log(f"model alone{turn}: the first {len(before)} of the job's batches, prepared beforehand")
                    first = measure.model_alone(models, before, device)
                    log(f"end to end{turn}: {options.images} images through run_job from {options.source}, one replica")
                    e2e.append(measure.end_to_end(config))
                    log(f"model alone{turn}: the other {len(after)} batches")
                    alone.append(first.joined(measure.model_alone(models, after, device)))
            with _torch_threads(threads):
                log(f"naive: {naive_images} images one at a time through plain transformers")
                # On the torch thread too: one OpenMP team in this process (see workers/torch_thread.py).
                naive = on_torch_thread(
                    measure.naive, models, model, paths[:naive_images], fetch, options.max_new_tokens, device
                )
        return build_report(options, tasks, device, parameters, models, paths, shard_size, threads, e2e, alone, naive)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """This process's torch threads set as the runner sets a CPU replica's, for the runs made here."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_memory(options: BenchOptions, device: torch.device) -> int:
    """Refuse, before anything is built, a model and batch that cannot fit; return its parameter count.

    In the captioner's dtype (float32 on the CPU, bf16 or fp16 on a GPU), two weight copies at
    once (the replica's and the benchmark's own, which runs the model alone around each job) and
    one batch's KV cache and prefill activations: the two copies run their batches in turn, and
    the model-alone copy gives its cached blocks back before each job (measure.model_alone).
    """
    import torch
    from loupe.schemas.config import DEFAULT_PROMPT
    from loupe.workers.models.devices import batch_memory, meta_model, prompt_tokens
    from loupe.workers.models.loading import resolve_dtype
    from loupe.workers.models.random import random_model_config

    dtype = resolve_dtype(device)
    config = random_model_config(options.family, options.size)
    parameters = sum(p.numel() for p in meta_model(config, dtype).parameters())
    batch = batch_memory(
        config, parameters, batch_size=options.batch_size, prompt_tokens=prompt_tokens(DEFAULT_PROMPT),
        max_new_tokens=options.max_new_tokens, dtype_bytes=dtype.itemsize,
    )
    need = (2 * batch.weight_bytes + batch.kv_bytes + batch.activation_bytes) * 1.1  # and loader slack
    if device.type == "cuda":
        gpus = bench_gpus(options, device)
        free = sum(torch.cuda.mem_get_info(gpu)[0] for gpu in gpus)
        where = f"free on {', '.join(f'cuda:{gpu}' for gpu in gpus)}"
        hint = "lower --batch-size, or use more GPUs (--gpus-per-replica) or a smaller --size"
    else:
        free = _available_memory()
        where, hint = "of memory available", "use a GPU (--device cuda) or --size small"
    if need > free:
        raise UserError(
            f"--size {options.size} needs about {need / 1e9:.0f} GB on {device.type} (two copies of "
            f"{parameters / 1e9:.2f}B parameters in {str(dtype).removeprefix('torch.')}, {batch.kv_bytes / 1e9:.1f} GB "
            f"of KV cache and {batch.activation_bytes / 1e9:.1f} GB of activations for a batch of {options.batch_size}), "
            f"{free / 1e9:.0f} GB {where}; {hint}"
        )
    return parameters


def bench_gpus(options: BenchOptions, device: torch.device) -> list[int]:
    """The GPUs the benchmark's model-alone copy spreads over: --gpus-per-replica of them from --device's."""
    first = device.index or 0
    return list(range(first, first + int(options.gpus_per_replica or 1)))


def _available_memory() -> int:
    """Bytes of host memory a new allocation can take without swapping (MemAvailable on Linux)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _default_shard_size(images: int, batch_size: int) -> int:
    """About four shards, each a whole number of batches, so shards overlap as in a real job."""
    return batch_size * max(1, math.ceil(images / batch_size / 4))


@contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path is not None:
        folder = Path(path).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="loupe-bench-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _checkpoint(work: Path, family: str, size: str, seed: int, device: torch.device) -> str:
    """The random checkpoint under work/models/, built once; a half-built one is never reused."""
    from loupe.workers.models.random import GPU_SIZES, build_random_model

    dest = work / "models" / f"{family}-{size}-seed{seed}"
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        target = str(device) if size in GPU_SIZES else None
        build_random_model(dest, family, size, seed=seed, device=target)
        (dest / ".complete").touch()
    return str(dest)


@contextmanager
def _connected_ray(config: JobConfig, device: torch.device, threads: int | None) -> Iterator[int | None]:
    """Ray connected and sized as the runner sees it; yields the torch threads of the job's replica (None on a GPU).

    Unless RAY_ADDRESS names a cluster, a fresh local one of `threads` CPUs (and no GPU for a CPU
    run, or the runner would put the replica on it), even where another local one runs; shut
    down at the end if started here.
    """
    import ray
    from loupe.jobs.replicas import connect_ray
    from loupe.jobs.sizing import size_replicas

    own = not os.environ.get("RAY_ADDRESS")
    gpus = 0 if own and device.type == "cpu" else None
    started = connect_ray(own_cluster=own, num_cpus=threads if own else None, num_gpus=gpus)
    try:
        if threads and not started:
            raise UserError("--threads sets the CPUs of the Ray cluster the benchmark starts, but Ray is already running")
        replicas = size_replicas(config)  # as the runner sizes it: a count no node has is refused here
        if replicas.device != device.type:
            raise UserError(
                "--device cuda: the Ray cluster has no GPU, so the job would run on the CPU"
                if device.type == "cuda"
                else "--device cpu: the Ray cluster has GPUs, so the job would run on them"
            )
        yield replicas.threads
    finally:
        if started:
            ray.shutdown()
