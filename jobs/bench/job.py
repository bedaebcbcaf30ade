"""`loupe bench`: images/s of the real job path beside the model alone and a naive loop, and where the time goes.

    loupe bench [--family llava|llava-next|llava-onevision] [--size tiny|small|7b] [--images N]
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

import io
import logging
import math
import os
import platform
import random
import shutil
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# The benchmark never touches the network; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from loupe.schemas.config import DEFAULT_PROMPT, TASKS  # noqa: E402
from loupe.schemas.errors import UserError  # noqa: E402

DEVICES = ("cpu", "cuda")
SOURCES = ("local", "s3")
# Defaults: 64-token captions as in the H100 reference; sized so that `--size small` takes
# a couple of minutes on a 2-core CPU. Batches of 32: on the CPU, 16 left the decoding steps
# bound by reading the weights (110 against 89 ms per image for the model, docs/benchmarks.md).
DEFAULT_IMAGES = 256
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_NAIVE_IMAGES = 16
_BUCKET = "loupe-bench"

# Photo sizes from a thumbnail to a 2-megapixel camera frame, landscape, portrait and square.
_PHOTO_SIZES = (
    (320, 240), (480, 640), (640, 480), (800, 600), (1024, 768), (768, 1024), (1280, 720),
    (720, 1280), (1080, 1080), (1200, 800), (1600, 900), (1600, 1200), (1200, 1600),
)  # fmt: skip

# The stages of the breakdown, in the order an image meets them, and where each is measured.
STAGES = {
    "fetch": "job: reading the object (summed over fetch threads, overlaps the model)",
    "decode": "job: bytes to RGB (summed over decode threads, overlaps the model)",
    "preprocess": "job: chat template, tokenizer, image processor (overlaps a GPU model, takes turns with a CPU one)",
    "vision_tower": "model alone: the vision tower's forward (hook)",
    "prefill": "model alone: the first forward of generate without the vision tower (projector, merge, prompt)",
    "decode_steps": "model alone: every later forward of generate (one new token each)",
    "generate_other": "model alone: generate's own work between forwards, detokenizing",
    "moderate": "model alone: moderation scores (read from the caption's KV cache when the judge is the captioner)",
    "embed": "model alone: image and caption embeddings",
    "write": "job: Parquet part and stats record (the shard's thread, overlaps the next shard's model work)",
}


@dataclass(frozen=True)
class BenchOptions:
    """The `loupe bench` flags; validated by run_bench."""

    family: str = "llava"
    size: str = "small"
    images: int = DEFAULT_IMAGES
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    tasks: str = "caption"
    source: str = "local"
    device: str | None = None  # default: cuda when a GPU is there, else cpu
    threads: int | None = None  # CPU: logical CPUs of the local Ray cluster, so torch threads of the replica
    naive_images: int | None = None  # default: DEFAULT_NAIVE_IMAGES, at most --images
    repeats: int = 1  # job and model alone, taking turns; the medians are reported
    shard_size: int | None = None  # default: about four shards, a multiple of the batch size
    workdir: str | None = None  # keeps the checkpoint and images between runs; default: a temp dir
    endpoint_url: str | None = None  # with source s3: this endpoint instead of a loopback one
    seed: int = 0

    def command(self) -> str:
        """The command line that reproduces these options."""
        words = ["loupe", "bench"]
        defaults = BenchOptions()
        for name, value in asdict(self).items():
            if value is not None and value != getattr(defaults, name):
                words += [f"--{name.replace('_', '-')}", str(value)]
        return " ".join(words)


@dataclass
class _Phase:
    """One way of running the images: how many, how long, and what it generated."""

    images: int = 0
    seconds: float = 0.0
    tokens: int = 0
    stages: Counter[str] = field(default_factory=Counter)

    job_seconds: float = 0.0  # end to end: the whole run_job, start-up and loading included
    shards: int = 0
    memory: int | None = None  # model alone on CUDA: max_memory_allocated
    prompt_tokens: float = 0.0  # model alone: mean tokens per caption prompt

    def joined(self, other: _Phase) -> _Phase:
        """Both runs' images and seconds as one run (model alone: the two halves of a turn)."""
        images = self.images + other.images
        memory = [m for m in (self.memory, other.memory) if m is not None]
        stages = Counter(self.stages)
        stages.update(other.stages)  # not `+`, which drops stages that took no time
        return _Phase(
            images=images,
            seconds=self.seconds + other.seconds,
            tokens=self.tokens + other.tokens,
            stages=stages,
            memory=max(memory) if memory else None,
            prompt_tokens=(self.prompt_tokens * self.images + other.prompt_tokens * other.images) / max(1, images),
        )

    def rates(self) -> dict[str, float]:
        return {
            "images": self.images,
            "seconds": round(self.seconds, 4),
            "images_per_second": round(self.images / self.seconds, 4) if self.seconds else 0.0,
            "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
        }


# -- entry point -----------------------------------------------------------------------------


def run_bench(options: BenchOptions, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Build, generate, run all three ways and return every figure as plain data (see the module doc)."""
    from loupe.workers.torch_thread import on_torch_thread

    tasks = _validate(options)
    device = _device(options.device)
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
        with _source(options.source, paths, options.endpoint_url) as (input_uri, endpoint_url, fetch):
            started_ray = _start_ray(device, options.threads)
            e2e, alone = [], []
            try:
                threads = _replica_threads(device)
                with _torch_threads(threads):  # the replica's own setting (the job runs in its actor)
                    models = _load_models(options, tasks, model, clip, work, shard_size, device)
                    batches = _batches(_decoded(models, paths), options.batch_size, shard_size, models.captioner)
                    before, after = batches[: len(batches) // 2], batches[len(batches) // 2 :]
                    # Each turn runs the model alone on half of the batches, the job, then the model
                    # alone on the other half: load from elsewhere and a drift in the machine's speed
                    # fall on both sides of the ratio alike.
                    for repeat in range(options.repeats):
                        turn = f" ({repeat + 1}/{options.repeats})" if options.repeats > 1 else ""
                        log(f"model alone{turn}: the first {len(before)} of the job's batches, prepared beforehand")
                        first = _model_alone(models, before, device)
                        log(f"end to end{turn}: {options.images} images through run_job from {options.source}, one replica")
                        e2e.append(_end_to_end(options, tasks, model, clip, input_uri, endpoint_url, work, shard_size))
                        log(f"model alone{turn}: the other {len(after)} batches")
                        alone.append(first.joined(_model_alone(models, after, device)))
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
            with _torch_threads(threads):
                log(f"naive: {naive_images} images one at a time through plain transformers")
                # On the torch thread too: one OpenMP team in this process (see workers/torch_thread.py).
                naive = on_torch_thread(_naive, models, model, paths[:naive_images], fetch, options.max_new_tokens, device)
        return _report(options, tasks, device, parameters, models, paths, shard_size, threads, e2e, alone, naive)


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


def _validate(options: BenchOptions) -> tuple[str, ...]:
    from loupe.workers.models.random import FAMILIES, SIZES

    if options.family not in FAMILIES:
        raise UserError(f"unknown --family {options.family!r}; choose one of: {', '.join(FAMILIES)}")
    if options.size not in SIZES:
        raise UserError(f"unknown --size {options.size!r}; choose one of: {', '.join(SIZES)}")
    if options.source not in SOURCES:
        raise UserError(f"unknown --source {options.source!r}; choose one of: {', '.join(SOURCES)}")
    if options.device is not None and options.device.split(":")[0] not in DEVICES:
        raise UserError(f"unknown --device {options.device!r}; choose one of: {', '.join(DEVICES)}")
    for name in ("images", "batch_size", "max_new_tokens", "threads", "naive_images", "shard_size", "repeats"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if options.endpoint_url is not None:
        if options.source != "s3":
            raise UserError("--endpoint-url is for --source s3")
        if not options.endpoint_url.startswith(("http://", "https://")):
            raise UserError(f"--endpoint-url {options.endpoint_url!r} must start with http:// or https://")
    names = [t.strip() for t in options.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown --tasks {options.tasks!r}; choose from {', '.join(TASKS)}, comma-separated")
    if "caption" not in names:
        raise UserError("--tasks must include caption: the benchmark compares caption throughput")
    return tuple(t for t in TASKS if t in names)


def _device(requested: str | None):
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is available on this machine")
    try:
        return torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested!r}; use cpu, cuda or cuda:N") from None


def _check_memory(options: BenchOptions, device) -> int:
    """Refuse, before anything is built, a model whose weights cannot fit; return its parameter count.

    In the captioner's dtype (float32 on the CPU, bfloat16 on a GPU), two copies at once: the
    replica's and the benchmark's own, which runs the model alone around each job.
    """
    import torch
    from loupe.workers.models.random import parameter_count

    parameters = parameter_count(options.family, options.size)
    itemsize = 2 if device.type == "cuda" else 4
    need = parameters * itemsize * 2 * 1.2  # weights plus activations, KV cache and loader slack
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where, hint = f"free on {device}", "use a larger GPU or a smaller --size"
    else:
        free = _available_memory()
        where, hint = "of memory available", "use a GPU (--device cuda) or --size small"
    if need > free:
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        raise UserError(
            f"--size {options.size} needs about {need / 1e9:.0f} GB on {device.type} ({parameters / 1e9:.2f}B "
            f"parameters in {dtype} plus working memory), {free / 1e9:.0f} GB {where}; {hint}"
        )
    return parameters


def _available_memory() -> int:
    """Bytes of host memory a new allocation can take without swapping (MemAvailable on Linux)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _total_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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


def _checkpoint(work: Path, family: str, size: str, seed: int, device) -> str:
    """The random checkpoint under work/models/, built once; a half-built one is never reused."""
    from loupe.workers.models.random import FULL_SIZE, build_random_model

    dest = work / "models" / f"{family}-{size}-seed{seed}"
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        target = str(device) if size == FULL_SIZE else None
        build_random_model(dest, family, size, seed=seed, device=target)
        (dest / ".complete").touch()
    return str(dest)


# -- images ----------------------------------------------------------------------------------


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs of varied sizes and aspect ratios, 1.4 to 2.7 bits per pixel as camera JPEGs are.

    Smooth colour fields, blurred shapes, mid-frequency texture and sensor noise, saved at
    quality 88: decode cost and file sizes close to real photos, unlike flat synthetic shapes.
    The same arguments give the same files; a finished folder is reused.
    """
    marker = folder / ".complete"
    paths = [folder / f"photo-{i:05d}.jpg" for i in range(count)]
    if marker.exists():
        return paths
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seeds = [rng.randrange(2**32) for _ in paths]  # drawn up front: images come out the same in any order

    def save(i: int) -> None:
        _photo(random.Random(seeds[i])).save(paths[i], "JPEG", quality=88)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow and numpy release the GIL
        list(pool.map(save, range(count)))
    marker.touch()
    return paths


def _photo(rng: random.Random):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    width, height = rng.choice(_PHOTO_SIZES)
    noise = np.random.default_rng(rng.randrange(2**32))
    coarse = noise.integers(0, 256, (max(2, height // 80), max(2, width // 80), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 10)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randint(width // 10, width // 2), y0 + rng.randint(height // 10, height // 2)]
        rng.choice([draw.rectangle, draw.ellipse])(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    texture = noise.integers(0, 256, (max(1, height // 4), max(1, width // 4)), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    # Busy or smooth scenes, clean or grainy sensors: about 1.4 to 2.7 bits per pixel once compressed.
    pixels += (texture[..., None] - 128) // rng.choice((3, 4, 6))
    grain = rng.choice((4, 7, 10, 14))
    pixels += noise.integers(-grain, grain + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@contextmanager
def _source(
    kind: str, paths: list[Path], endpoint_url: str | None
) -> Iterator[tuple[str, str | None, Callable[[int], bytes]]]:
    """(input URI, endpoint URL, fetch(i) -> bytes of image i): the local folder, or a bucket on S3.

    S3 is a loopback endpoint started for the run (moto's server), or `endpoint_url`; either way
    the images go to a fresh bucket, removed with everything in it at the end.
    """
    if kind == "local":
        yield str(paths[0].parent), None, lambda i: paths[i].read_bytes()
        return
    # Any credentials do for the loopback endpoint; set before Ray starts so replicas inherit them.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "loupe-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "loupe-bench-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = None
    if endpoint_url is None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise UserError(
                "--source s3 starts a loopback S3 endpoint with moto's server (pip install 'moto[server]'); "
                "or point --endpoint-url at an S3-compatible endpoint"
            ) from None

        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        server.start()
        endpoint_url = f"http://127.0.0.1:{port}"
    try:
        with _bucket(endpoint_url, paths) as (uri, fetch):
            yield uri, endpoint_url, fetch
    finally:
        if server is not None:
            server.stop()


@contextmanager
def _bucket(endpoint_url: str, paths: list[Path]) -> Iterator[tuple[str, Callable[[int], bytes]]]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url)
    bucket = f"{_BUCKET}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        keys = [f"images/{path.name}" for path in paths]
        for key, path in zip(keys, paths, strict=True):
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())

        def fetch(i: int) -> bytes:
            return client.get_object(Bucket=bucket, Key=keys[i])["Body"].read()

        yield f"s3://{bucket}/images/", fetch
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            objects = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if objects:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
        client.delete_bucket(Bucket=bucket)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- 1. end to end ---------------------------------------------------------------------------


def _start_ray(device, threads: int | None) -> bool:
    """Start a local Ray cluster shaped for the device unless one is connected; True if started here."""
    import ray

    started = not ray.is_initialized()
    if started:
        settings: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if not os.environ.get("RAY_ADDRESS"):
            # A cluster of its own, shaped below, even where another local one is running.
            settings["address"] = "local"
            if threads:
                settings["num_cpus"] = threads
            if device.type == "cpu":
                settings["num_gpus"] = 0  # or the runner would put the replica on a GPU
        try:
            ray.init(**settings)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = os.environ.get("RAY_ADDRESS") or "the local machine"
            raise UserError(f"could not start or reach a Ray cluster at {where}: {' '.join(str(exc).split())[:300]}") from None
    elif threads:
        raise UserError("--threads sets the CPUs of the Ray cluster the benchmark starts, but Ray is already running")
    gpus = ray.cluster_resources().get("GPU", 0)
    mismatch = None
    if device.type == "cuda" and not gpus:
        mismatch = "--device cuda: the Ray cluster has no GPU, so the job would run on the CPU"
    elif device.type == "cpu" and gpus:
        mismatch = "--device cpu: the Ray cluster has GPUs, so the job would run on them"
    if mismatch:
        if started:
            ray.shutdown()
        raise UserError(mismatch)
    return started


def _replica_threads(device) -> int | None:
    """The torch threads the runner gives a CPU replica (all of a node's share), None on a GPU."""
    import ray

    if device.type == "cuda":
        return None
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    return max(1, math.floor(round(min(node_cpus, ray.cluster_resources().get("CPU", 1.0)), 2)))


def _job_config(
    options: BenchOptions,
    tasks: tuple[str, ...],
    model: str,
    clip: str | None,
    input_uri: str,
    output: str,
    endpoint_url: str | None,
    shard_size: int,
):
    from loupe.schemas.config import JobConfig

    return JobConfig(
        input=input_uri,
        output=output,
        model=model,
        prompt=DEFAULT_PROMPT,
        max_new_tokens=options.max_new_tokens,
        min_new_tokens=options.max_new_tokens,  # random weights must not stop early
        batch_size=options.batch_size,
        shard_size=shard_size,
        replicas=1,
        tasks=tasks,
        endpoint_url=endpoint_url,
        max_shard_retries=0,  # a retried shard would time two attempts
        build_index=False,  # indexing happens once per job, after the throughput measured here
        overwrite=True,
        **({"image_embedding_model": clip} if clip else {}),
    )


def _end_to_end(
    options: BenchOptions,
    tasks: tuple[str, ...],
    model: str,
    clip: str | None,
    input_uri: str,
    endpoint_url: str | None,
    work: Path,
    shard_size: int,
) -> _Phase:
    from loupe.jobs.runner import run_job
    from loupe.schemas.layout import STATS_DIR
    from loupe.schemas.records import ShardStats
    from loupe.workers.storage import join_uri, open_storage

    run = uuid.uuid4().hex[:12]
    output = join_uri(input_uri.removesuffix("images/"), "runs", run) if endpoint_url else str(work / "runs" / run)
    config = _job_config(options, tasks, model, clip, input_uri, output, endpoint_url, shard_size)
    try:
        result = run_job(config)
        if not result.complete or result.rows_error:
            failures = "; ".join(f.error for f in result.failures) or f"{result.rows_error} error rows"
            raise RuntimeError(f"the benchmark job did not finish cleanly: {failures}")
        storage = open_storage(output, endpoint_url)
        stats = [ShardStats.from_json(storage.read_bytes(obj.uri)) for obj in storage.list(join_uri(output, STATS_DIR))]
    finally:
        if not endpoint_url:
            shutil.rmtree(output, ignore_errors=True)
    phase = _Phase(
        images=sum(s.rows_ok for s in stats),
        seconds=max(s.finished_at for s in stats) - min(s.started_at for s in stats),
    )
    phase.tokens = phase.images * options.max_new_tokens
    for s in stats:
        phase.stages.update(s.timings)
    phase.job_seconds, phase.shards = result.seconds, len(stats)
    return phase


# -- 2. the model alone ----------------------------------------------------------------------


def _load_models(
    options: BenchOptions, tasks: tuple[str, ...], model: str, clip: str | None, work: Path, shard_size: int, device
):
    """A ShardProcessor with the job's settings, loading the models as a replica does (on the torch thread)."""
    from loupe.workers.pipeline import ShardProcessor

    config = _job_config(options, tasks, model, clip, str(work), str(work / "alone"), None, shard_size)
    return ShardProcessor(config, device=str(device))


class _ForwardClock:
    """Forward hooks timing, inside generate only: the vision tower, the first forward (prefill), the others.

    On CUDA each hook synchronizes, so a forward's time is its kernels' time; generate already
    waits on the GPU once per token to test for the end, so this adds little.
    """

    def __init__(self, model: Any, sync: Callable[[], None]) -> None:
        self.seconds: Counter[str] = Counter()
        self._sync = sync
        self._on = False
        self._forwards = 0
        self._started: dict[str, float] = {}
        modules = {"model": model}
        vision = getattr(getattr(model, "model", model), "vision_tower", None)
        if vision is not None:
            modules["vision_tower"] = vision
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._before(name)))
            self._handles.append(module.register_forward_hook(self._after(name)))

    @contextmanager
    def generating(self) -> Iterator[None]:
        self._on, self._forwards = True, 0
        try:
            yield
        finally:
            self._on = False

    def _before(self, name: str) -> Callable:
        def hook(module: Any, args: Any) -> None:
            if self._on:
                self._sync()
                self._started[name] = time.perf_counter()

        return hook

    def _after(self, name: str) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> None:
            if not self._on or name not in self._started:
                return
            self._sync()
            seconds = time.perf_counter() - self._started.pop(name)
            if name == "vision_tower":
                self.seconds["vision_tower"] += seconds
                if "model" in self._started:  # ran inside the first forward, not before it
                    self.seconds["vision_in_forward"] += seconds
            else:
                self.seconds["first_forward" if self._forwards == 0 else "decode_steps"] += seconds
                self._forwards += 1

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _batches(images: list, batch_size: int, shard_size: int, captioner: Any = None) -> list[list]:
    """The job's batches: shards of shard_size in listing order, each bucketed by prompt length as the pipeline does."""
    from loupe.workers.pipeline import BUCKET_BATCHES, bucketed

    batches = []
    for start in range(0, len(images), shard_size):
        shard = images[start : start + shard_size]
        for first in range(0, len(shard), BUCKET_BATCHES * batch_size):
            window = shard[first : first + BUCKET_BATCHES * batch_size]
            batches += bucketed(window, [image.size for image in window], batch_size, captioner)
    return batches


def _decoded(models: Any, paths: list[Path]) -> list:
    """The images decoded as the job decodes them (at the scale the models need)."""
    from loupe.workers.decode import decode_image

    return [decode_image(path.read_bytes(), min_side=models.decode_side) for path in paths]


def _model_alone(models: Any, batches: list[list], device) -> _Phase:
    """The replica's model calls (ShardProcessor.run_batch) on some of the job's batches, each prepared beforehand."""
    import torch

    if not batches:  # a one-batch run has no first half
        return _Phase()
    captioner = models.captioner
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    clock = _ForwardClock(captioner.model, sync)
    generate_encoded = captioner.generate_encoded

    def timed(inputs: Any) -> Any:  # the forward hooks count generate's forwards only, not moderation's
        with clock.generating():
            return generate_encoded(inputs)

    captioner.generate_encoded = timed
    try:
        models.run_batch(models.prepare_images(batches[0]))  # warm-up, not counted
        clock.seconds.clear()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        phase = _Phase()
        prompt_tokens = 0
        for images in batches:
            prepared = models.prepare_images(images)  # outside the clock: the job does it beside or between batches
            prompt_tokens += int(prepared.caption_inputs["attention_mask"].sum())
            sync()
            t0 = time.perf_counter()
            _, stages = models.run_batch(prepared)
            sync()
            phase.seconds += time.perf_counter() - t0
            phase.stages.update(stages)
            phase.images += len(images)
        phase.tokens = phase.images * captioner.generation_config.max_new_tokens
        # transformers may run the vision tower inside the first forward or just before it.
        forwards = clock.seconds["first_forward"] + clock.seconds["decode_steps"]
        forwards += clock.seconds["vision_tower"] - clock.seconds["vision_in_forward"]
        phase.stages["vision_tower"] = clock.seconds["vision_tower"]
        phase.stages["prefill"] = clock.seconds["first_forward"] - clock.seconds["vision_in_forward"]
        phase.stages["decode_steps"] = clock.seconds["decode_steps"]
        phase.stages["generate_other"] = max(0.0, phase.stages["generate"] - forwards)
    finally:
        del captioner.generate_encoded  # the class's method again
        clock.remove()
    phase.memory = int(torch.cuda.max_memory_allocated(device)) if on_cuda else None
    phase.prompt_tokens = prompt_tokens / max(1, phase.images)
    return phase


# -- 4. naive --------------------------------------------------------------------------------


def _naive(
    models: Any, model: str, paths: list[Path], fetch: Callable[[int], bytes], max_new_tokens: int, device
) -> _Phase:
    """One image at a time as a plain transformers script does it: read, PIL, AutoProcessor, generate.

    The same weights, dtype and device as the captioner (one copy in memory); moderation, when
    asked for, one full forward per category (Moderator.score_independent), embeddings one image
    and one caption per call.
    """
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    hf_model = models.captioner.model
    dtype = models.captioner.dtype
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def one(i: int) -> None:
        image = Image.open(io.BytesIO(fetch(i))).convert("RGB")
        conversation = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": DEFAULT_PROMPT}]}
        ]
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(device, dtype=dtype)
        output = hf_model.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, pad_token_id=pad,
        )
        caption = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if models.moderator is not None:
            models.moderator.score_independent([image])
        if models.image_embedder is not None:
            models.image_embedder.embed_images([image])
            if caption.strip():
                models.text_embedder.embed_texts([caption])

    one(0)  # warm-up: the chat template and processor's first call
    phase = _Phase()
    for i in range(len(paths)):
        sync()
        t0 = time.perf_counter()
        one(i)
        sync()
        phase.seconds += time.perf_counter() - t0
        phase.images += 1
    phase.tokens = phase.images * max_new_tokens
    return phase


# -- report ----------------------------------------------------------------------------------


def _machine(device) -> dict[str, Any]:
    import ray
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(_total_memory() / 2**30, 1),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        # libgomp's spin-waiting makes CPU timings depend on other load; record how it was set.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _targets(options: BenchOptions, device, efficiency: float, speedup: float, e2e_rate: float) -> dict[str, bool]:
    """Issue 5's targets that apply to this run."""
    from loupe.workers.models.random import FULL_SIZE

    if device.type == "cpu" and options.size == "small":
        return {"efficiency >= 0.9": efficiency >= 0.9, "speed-up over naive >= 5": speedup >= 5}
    if device.type == "cuda" and options.size == FULL_SIZE:
        return {"end to end >= 30 images/s": e2e_rate >= 30, "efficiency >= 0.9": efficiency >= 0.9}
    return {}


def _median(phases: list[_Phase]) -> _Phase:
    """The run with the median rate (the lower middle one of an even count)."""
    return sorted(phases, key=lambda p: p.images / p.seconds)[(len(phases) - 1) // 2]


def _report(
    options: BenchOptions,
    tasks: tuple[str, ...],
    device,
    parameters: int,
    models: Any,
    paths: list[Path],
    shard_size: int,
    threads: int | None,
    e2e_runs: list[_Phase],
    alone_runs: list[_Phase],
    naive: _Phase,
) -> dict[str, Any]:
    e2e, alone = _median(e2e_runs), _median(alone_runs)
    e2e_rates, alone_rates, naive_rates = e2e.rates(), alone.rates(), naive.rates()
    # Per turn, job and model alone ran back to back under the same load; the median of those
    # ratios (the lower middle one of an even count), not the ratio of two medians from different turns.
    turns = sorted(j.images / j.seconds / (a.images / a.seconds) for j, a in zip(e2e_runs, alone_runs, strict=True))
    efficiency = turns[(len(turns) - 1) // 2]
    speedup = e2e.images / e2e.seconds / (naive.images / naive.seconds)
    # Stage times summed over every repeat, per image.
    job_stages, alone_stages = Counter(), Counter()
    for phase in e2e_runs:
        job_stages.update(phase.stages)
    for phase in alone_runs:
        alone_stages.update(phase.stages)
    job_images = sum(p.images for p in e2e_runs)
    alone_images = sum(p.images for p in alone_runs)
    per_image: dict[str, float | None] = {}
    for stage in STAGES:
        stages, images = (job_stages, job_images) if stage in ("fetch", "decode", "preprocess", "write") else (alone_stages, alone_images)
        present = stage in stages or stage not in ("moderate", "embed")
        per_image[stage] = round(stages.get(stage, 0.0) / images, 6) if present else None
    from PIL import Image

    sizes: Counter[str] = Counter()
    for path in paths:
        with Image.open(path) as image:
            sizes[f"{image.width}x{image.height}"] += 1
    arguments = asdict(options) | {
        "tasks": list(tasks),
        "device": str(device),
        "shard_size": shard_size,
        "naive_images": naive.images,
    }
    memory = [p.memory for p in alone_runs if p.memory is not None]
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": options.command(),
        "arguments": arguments,
        "machine": _machine(device),
        "model": {
            "family": options.family,
            "size": options.size,
            "parameters": parameters,
            "dtype": str(models.captioner.dtype).removeprefix("torch."),
            "device": str(device),
            "torch_threads": threads,
        },
        "workload": {
            "images": len(paths),
            "image_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
            "mean_jpeg_kb": round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1),
            "prompt_tokens_mean": round(alone.prompt_tokens, 1),
            "new_tokens": options.max_new_tokens,
            "batch_size": options.batch_size,
            "shard_size": shard_size,
            "shards": e2e.shards,
        },
        "end_to_end": e2e_rates
        | {
            "clock": "first shard start to last shard end (ShardStats started_at/finished_at): "
            "excludes Ray start-up and model loading",
            "job_seconds": round(e2e.job_seconds, 2),
        },
        "model_alone": alone_rates
        | {"clock": "model calls only, after one warm-up batch; inputs decoded and prepared beforehand"},
        "naive": naive_rates | {"clock": "per image: read, decode, preprocess, generate, detokenize"},
        "efficiency": round(efficiency, 4),
        "speedup_over_naive": round(speedup, 4),
        "repeats": [
            {
                "end_to_end": round(j.images / j.seconds, 4),
                "model_alone": round(a.images / a.seconds, 4),
                "efficiency": round(j.images / j.seconds / (a.images / a.seconds), 4),
            }
            for j, a in zip(e2e_runs, alone_runs, strict=True)
        ],
        "tokens_per_second": {
            "end_to_end": e2e_rates["tokens_per_second"],
            "model_alone": alone_rates["tokens_per_second"],
            "naive": naive_rates["tokens_per_second"],
        },
        "seconds_per_image": per_image,
        "job_seconds_per_image": {k: round(v / job_images, 6) for k, v in sorted(job_stages.items())},
        "stage_notes": dict(STAGES),
        "gpu_memory_peak_bytes": max(memory) if memory else None,
        "targets": _targets(options, device, efficiency, speedup, e2e.images / e2e.seconds),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a readable table."""
    m, w, model = result["machine"], result["workload"], result["model"]
    gpu = f", {m['gpu']}" if m["gpu"] else ", no GPU"
    lines = [
        f"loupe bench  {result['date']}  {result['command']}",
        f"machine: {m['cpus']} CPUs, {m['memory_gb']} GiB{gpu}; torch {m['torch']}, transformers {m['transformers']}",
        f"model: random {model['family']} ({model['size']}, {model['parameters'] / 1e6:.1f}M parameters, "
        f"{model['dtype']}) on {model['device']}"
        + (f", {model['torch_threads']} torch threads" if model["torch_threads"] else ""),
        f"workload: {w['images']} JPEGs ({len(w['image_sizes'])} sizes, {w['mean_jpeg_kb']} KB mean), "
        f"{w['prompt_tokens_mean']} prompt tokens and {w['new_tokens']} new tokens per image, "
        f"batch {w['batch_size']}, {w['shards']} shards of {w['shard_size']}, tasks {','.join(result['arguments']['tasks'])}",
        "",
        f"{'':<34}{'images/s':>10}{'tokens/s':>10}{'images':>8}{'seconds':>9}",
    ]
    for key, label in (
        ("end_to_end", "1. end to end (run_job)"),
        ("model_alone", "2. model alone"),
        ("naive", "4. naive, one image at a time"),
    ):
        row = result[key]
        lines.append(
            f"{label:<34}{row['images_per_second']:>10.3f}{row['tokens_per_second']:>10.1f}"
            f"{row['images']:>8}{row['seconds']:>9.2f}"
        )
    if len(result["repeats"]) > 1:
        turns = ", ".join(f"{r['efficiency']:.3f}" for r in result["repeats"])
        lines.append(
            f"(medians of {len(result['repeats'])} turns of job and model alone; efficiency per turn: {turns}, "
            "their median reported)"
        )
    lines += [
        f"3. pipeline efficiency (1)/(2): {result['efficiency']:.3f}",
        f"   speed-up of (1) over (4): {result['speedup_over_naive']:.2f}x",
        f"   end to end clock: {result['end_to_end']['clock']} (whole job {result['end_to_end']['job_seconds']} s)",
        "",
        "5. where the time goes, ms per image:",
    ]
    for stage, seconds in result["seconds_per_image"].items():
        if seconds is not None:
            lines.append(f"   {stage:<16}{seconds * 1000:>9.2f}   {result['stage_notes'][stage]}")
    if result["gpu_memory_peak_bytes"] is not None:
        lines.append(f"   GPU memory high-water mark (model alone): {result['gpu_memory_peak_bytes'] / 2**30:.2f} GiB")
    if result["targets"]:
        lines += ["", "targets:"]
        lines += [f"   {'met   ' if met else 'MISSED'} {name}" for name, met in result["targets"].items()]
    return "\n".join(lines)
