"""The three ways the job benchmark runs the images, each timed: the job end to end, the model alone, naive."""

from __future__ import annotations

import io
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loupe.jobs.bench.options import BenchOptions
from loupe.schemas.config import DEFAULT_PROMPT, JobConfig

if TYPE_CHECKING:
    import torch

    from loupe.workers.pipeline import ShardProcessor


@dataclass
class Phase:
    """One way of running the images: how many, how long, and what it generated."""

    images: int = 0
    seconds: float = 0.0
    tokens: int = 0
    stages: Counter[str] = field(default_factory=Counter)

    job_seconds: float = 0.0  # end to end: the whole run_job, start-up and loading included
    shards: int = 0
    memory: int | None = None  # model alone on CUDA: max_memory_allocated
    prompt_tokens: float = 0.0  # model alone: mean tokens per caption prompt

    def joined(self, other: Phase) -> Phase:
        """Both runs' images and seconds as one run (model alone: the two halves of a turn)."""
        images = self.images + other.images
        memory = [m for m in (self.memory, other.memory) if m is not None]
        stages = Counter(self.stages)
        stages.update(other.stages)  # not `+`, which drops stages that took no time
        return Phase(
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


# -- 1. end to end ---------------------------------------------------------------------------


def job_config(
    options: BenchOptions,
    tasks: tuple[str, ...],
    model: str,
    clip: str | None,
    input_uri: str,
    endpoint_url: str | None,
    work: Path,
    shard_size: int,
) -> JobConfig:
    """The job the benchmark times: one replica, captions exactly max-new-tokens long, no retries, no index.

    Its output is the folder (or prefix) that each end-to-end run writes a run of its own under.
    """
    from loupe.workers.storage import join_uri

    return JobConfig(
        input=input_uri,
        output=join_uri(input_uri.removesuffix("images/"), "runs") if endpoint_url else str(work / "runs"),
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
        gpus_per_replica=options.gpus_per_replica,
        **({"image_embedding_model": clip} if clip else {}),
    )


def end_to_end(config: JobConfig) -> Phase:
    """One run_job of the benchmark's job into a fresh run folder, removed after its stats are read."""
    from loupe.jobs.output import read_stats
    from loupe.jobs.runner import run_job
    from loupe.workers.storage import join_uri, open_storage

    config = config.model_copy(update={"output": join_uri(config.output, uuid.uuid4().hex[:12])})
    try:
        result = run_job(config)
        if not result.complete or result.rows_error:
            failures = "; ".join(f.error for f in result.failures) or f"{result.rows_error} error rows"
            raise RuntimeError(f"the benchmark job did not finish cleanly: {failures}")
        stats = read_stats(open_storage(config.output, config.endpoint_url), config.output)
    finally:
        if not config.endpoint_url:
            shutil.rmtree(config.output, ignore_errors=True)
    phase = Phase(
        images=sum(s.rows_ok for s in stats),
        seconds=max(s.finished_at for s in stats) - min(s.started_at for s in stats),
    )
    phase.tokens = phase.images * config.max_new_tokens
    for s in stats:
        phase.stages.update(s.timings)
    phase.job_seconds, phase.shards = result.seconds, len(stats)
    return phase


# -- 2. the model alone ----------------------------------------------------------------------


def load_models(config: JobConfig, work: Path, device: torch.device) -> ShardProcessor:
    """A ShardProcessor with the job's settings, loading the models as a replica does (on the torch thread)."""
    from loupe.workers.pipeline import ShardProcessor

    local = {"input": str(work), "output": str(work / "alone"), "endpoint_url": None}  # it reads and writes nothing
    # Spread over as many GPUs as the job's replica, from --device's on.
    share = int(config.gpus_per_replica or 1)
    gpus = list(range(device.index or 0, (device.index or 0) + share)) if device.type == "cuda" and share > 1 else None
    return ShardProcessor(config.model_copy(update=local), device=str(device), gpus=gpus)


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


def job_batches(images: list, batch_size: int, shard_size: int, captioner: Any = None) -> list[list]:
    """The job's batches: shards of shard_size in listing order, each bucketed by prompt length as the pipeline does."""
    from loupe.workers.pipeline import BUCKET_BATCHES, bucketed

    batches = []
    for start in range(0, len(images), shard_size):
        shard = images[start : start + shard_size]
        for first in range(0, len(shard), BUCKET_BATCHES * batch_size):
            window = shard[first : first + BUCKET_BATCHES * batch_size]
            batches += bucketed(window, [image.size for image in window], batch_size, captioner)
    return batches


def decoded_like_job(models: Any, paths: list[Path]) -> list:
    """The images decoded as the job decodes them (at the scale the models need)."""
    from loupe.workers.decode import decode_image

    return [decode_image(path.read_bytes(), min_side=models.decode_side) for path in paths]


def model_alone(models: Any, batches: list[list], device) -> Phase:
    """The replica's model calls (ShardProcessor.run_batch) on some of the job's batches, each prepared beforehand."""
    import torch

    if not batches:  # a one-batch run has no first half
        return Phase()
    captioner = models.captioner
    on_cuda = device.type == "cuda"
    sync = device_sync(device)
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
        phase = Phase()
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
    if on_cuda:
        # Give back what this copy's batches reserved, so the job's replica, which runs next on the
        # same GPU, has the memory the memory check counted on.
        torch.cuda.empty_cache()
    return phase


def device_sync(device) -> Callable[[], None]:
    """A wait for this process's kernels on `device` and on every other GPU it sees (a model spread over several).

    A bare torch.cuda.synchronize() waits on the calling thread's current GPU, cuda:0 on the
    torch thread: with --device cuda:1 the stage split would time kernel launches.
    """
    import torch

    if device.type != "cuda":
        return lambda: None
    gpus = sorted({device.index or 0, *range(torch.cuda.device_count())})

    def sync() -> None:
        for gpu in gpus:
            torch.cuda.synchronize(gpu)

    return sync


# -- 4. naive --------------------------------------------------------------------------------


def naive(
    models: Any, model: str, paths: list[Path], fetch: Callable[[int], bytes], max_new_tokens: int, device
) -> Phase:
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
    sync = device_sync(device)

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
            num_beams=1, pad_token_id=pad, disable_compile=True,
        )
        caption = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if models.moderator is not None:
            models.moderator.score_independent([image])
        if models.image_embedder is not None:
            models.image_embedder.embed_images([image])
            if caption.strip():
                models.text_embedder.embed_texts([caption])

    one(0)  # warm-up: the chat template and processor's first call
    phase = Phase()
    for i in range(len(paths)):
        sync()
        t0 = time.perf_counter()
        one(i)
        sync()
        phase.seconds += time.perf_counter() - t0
        phase.images += 1
    phase.tokens = phase.images * max_new_tokens
    return phase
