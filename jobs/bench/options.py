"""The benchmarks' options: their defaults, their checks, and the command line that reproduces them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from loupe.jobs.bench.source import SOURCES
from loupe.schemas.config import TASKS
from loupe.schemas.errors import UserError

DEVICES = ("cpu", "cuda")
# Defaults: 64-token captions as in the H100 reference; sized so that `--size small` takes
# a couple of minutes on a 2-core CPU. Batches of 32: on the CPU, 16 left the decoding steps
# bound by reading the weights (110 against 89 ms per image for the model, docs/benchmarks.md).
DEFAULT_IMAGES = 256
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_NAIVE_IMAGES = 16


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
    gpus_per_replica: int | None = None  # GPUs the replica (and the model-alone copy) spreads over; default: planned
    seed: int = 0

    def command(self) -> str:
        """The command line that reproduces these options."""
        words = ["loupe", "bench"]
        defaults = BenchOptions()
        for name, value in asdict(self).items():
            if value is not None and value != getattr(defaults, name):
                words += [f"--{name.replace('_', '-')}", str(value)]
        return " ".join(words)

    def checked_tasks(self) -> tuple[str, ...]:
        """The tasks in pipeline order, once every flag is known to be good; a bad one raises UserError naming it."""
        _check_random_model(self.family, self.size)
        if self.source not in SOURCES:
            raise UserError(f"unknown --source {self.source!r}; choose one of: {', '.join(SOURCES)}")
        if self.device is not None and self.device.split(":")[0] not in DEVICES:
            raise UserError(f"unknown --device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        _check_counts(self, "images", "batch_size", "max_new_tokens", "threads", "naive_images", "shard_size", "repeats", "gpus_per_replica")
        if self.gpus_per_replica is not None and (self.device or "cuda").split(":")[0] != "cuda":
            raise UserError("--gpus-per-replica is for --device cuda")
        if self.endpoint_url is not None:
            if self.source != "s3":
                raise UserError("--endpoint-url is for --source s3")
            if not self.endpoint_url.startswith(("http://", "https://")):
                raise UserError(f"--endpoint-url {self.endpoint_url!r} must start with http:// or https://")
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in TASKS]
        if unknown or not names:
            raise UserError(f"unknown --tasks {self.tasks!r}; choose from {', '.join(TASKS)}, comma-separated")
        if "caption" not in names:
            raise UserError("--tasks must include caption: the benchmark compares caption throughput")
        return tuple(t for t in TASKS if t in names)


@dataclass(frozen=True)
class ModerationOptions:
    """The `loupe bench moderation` flags; checked by run_moderation_bench."""

    family: str = "llava"
    size: str = "small"  # of the random checkpoint
    model: str | None = None  # this checkpoint instead of a random one
    images: int = 16
    batch_size: int = 8
    max_new_tokens: int = 32
    repeats: int = 3
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # default: bfloat16 on cuda, float32 on cpu
    threads: int | None = None  # torch CPU threads; default: torch's choice

    def check(self) -> None:
        """Raise UserError naming the first bad flag."""
        _check_random_model(self.family, self.size)
        _check_counts(self, "images", "batch_size", "max_new_tokens", "repeats", "threads")


def _check_random_model(family: str, size: str) -> None:
    from loupe.workers.models.random import FAMILIES, SIZES

    if family not in FAMILIES:
        raise UserError(f"unknown --family {family!r}; choose one of: {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise UserError(f"unknown --size {size!r}; choose one of: {', '.join(SIZES)}")


def _check_counts(options: object, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
