"""What moderation costs per image next to captioning: shared image prefix against one forward per category.

    loupe bench moderation [--family llava] [--images 16] [--batch-size 8]
                           [--max-new-tokens 32] [--repeats 3] [--json]

Times, per image and on the model's thread only (preparing inputs runs on a producer thread
in the pipeline), after a warm-up, the median over repeats:

- prefill: one forward of the caption prompt with the image, no generation;
- caption: the Captioner, every caption exactly max-new-tokens long;
- caption+moderation: the caption, then the Moderator over the default categories reading the
  image prefix from the caption's KV cache, as the pipeline runs them;
- moderation: the Moderator alone (`--tasks moderate`), image prefix encoded once for all categories;
- naive: one full forward (image + whole question) per image and category.

What moderation adds to an image's time is caption+moderation - caption.
Targets: that <= 1 prefill, and naive >= 5x that.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loupe.jobs.bench.options import ModerationOptions

STAGES = ("prefill", "caption", "caption+moderation", "moderation", "naive")
CLOCKS = ("wall", "cpu")


def _images(folder: Path, count: int):
    from PIL import Image

    from loupe.jobs.demo import make_sample_images

    # The demo's generated scenes: several sizes and aspect ratios, so anyres families pad.
    return [Image.open(path).convert("RGB") for path in make_sample_images(folder, count=count)]


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(): CPU time is this process's, all its threads."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_moderation_bench(options: ModerationOptions) -> dict:
    """Build or load the checkpoint, time every stage, and return the results as plain data."""
    import torch

    from loupe.schemas.taxonomy import DEFAULT_TAXONOMY
    from loupe.workers.models.captioner import Captioner
    from loupe.workers.models.moderator import Moderator
    from loupe.workers.models.random import build_random_model

    options.check()
    if options.threads:
        torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as tmp:
        model = options.model or str(build_random_model(Path(tmp) / "model", options.family, options.size))
        images = _images(Path(tmp) / "images", options.images)
        captioner = Captioner(
            model,
            max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.max_new_tokens,
            device=options.device,
            dtype=options.dtype,
        )
        # As in the pipeline: one set of weights serves both.
        moderator = Moderator(model, DEFAULT_TAXONOMY, share=captioner)

    batches = [images[i : i + options.batch_size] for i in range(0, len(images), options.batch_size)]
    caption_inputs = [captioner.prepare(batch) for batch in batches]
    moderation_inputs = [moderator.prepare(batch) for batch in batches]
    on_cuda = captioner.device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    @torch.inference_mode()
    def prefill(i: int) -> None:
        inputs = {
            key: value.to(captioner.device, dtype=captioner.dtype if value.is_floating_point() else None)
            for key, value in caption_inputs[i].items()
        }
        captioner.model(**inputs, logits_to_keep=1)

    def caption_and_moderation(i: int) -> None:
        _, encoded = captioner.generate_encoded(caption_inputs[i])
        moderator.score_encoded(encoded)

    stages = {
        "prefill": prefill,
        "caption": lambda i: captioner.generate(caption_inputs[i]),
        "caption+moderation": caption_and_moderation,
        "moderation": lambda i: moderator.score(moderation_inputs[i]),
        "naive": lambda i: moderator.score_independent(batches[i]),
    }
    for stage in stages.values():  # warm-up: allocator, kernels, lazy initialisation
        stage(0)
    per_image: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in STAGES} for clock in CLOCKS}
    for _ in range(options.repeats):
        # Stages interleaved within each repeat, so that load from elsewhere on the machine
        # falls on all of them alike.
        for name, stage in stages.items():
            times = [_timed(lambda s=stage, i=i: s(i), sync) for i in range(len(batches))]
            for clock, column in zip(CLOCKS, zip(*times, strict=True), strict=True):
                per_image[clock][name].append(sum(column) / len(images))

    median: dict[str, dict[str, float]] = {}
    for clock, stage_times in per_image.items():
        median[clock] = {name: statistics.median(times) for name, times in stage_times.items()}
        # Each repeat's difference or sum, then the median, rather than two medians combined.
        median[clock]["moderation_added"] = statistics.median(
            cm - c for c, cm in zip(stage_times["caption"], stage_times["caption+moderation"], strict=True)
        )
        median[clock]["caption+naive"] = statistics.median(
            c + n for c, n in zip(stage_times["caption"], stage_times["naive"], strict=True)
        )
    # Other processes on a shared CPU stretch wall time but not this process's CPU time; on a
    # GPU the CPU only waits, so there wall time is the cost.
    clock = "wall" if on_cuda else "cpu"

    caption_tokens = torch.cat([inputs["attention_mask"].sum(-1) for inputs in caption_inputs]).float()
    prefix_tokens = torch.cat([inputs["attention_mask"].sum(-1) for inputs in moderation_inputs]).float()
    moderation_over_prefill = median[clock]["moderation_added"] / median[clock]["prefill"]
    naive_over_moderation = median[clock]["naive"] / median[clock]["moderation_added"]
    alone_over_prefill = median[clock]["moderation"] / median[clock]["prefill"]
    return {
        "family": options.family if options.model is None else None,
        "model": options.model or f"random {options.family} ({options.size})",
        "device": str(captioner.device),
        "dtype": str(captioner.dtype).removeprefix("torch."),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "images": len(images),
        "batch_size": options.batch_size,
        "max_new_tokens": options.max_new_tokens,
        "repeats": options.repeats,
        "categories": len(DEFAULT_TAXONOMY.categories),
        "tokens": {
            "caption_prompt_mean": round(float(caption_tokens.mean()), 1),
            "moderation_prefix_mean": round(float(prefix_tokens.mean()), 1),
            "instruction": len(moderator.shared_ids),
            "suffixes_per_image": sum(len(ids) for ids in moderator.suffix_ids),
        },
        "clock": clock,
        "seconds_per_image": {c: {name: round(v, 5) for name, v in values.items()} for c, values in median.items()},
        "seconds_per_image_all_repeats": {
            c: {name: [round(t, 5) for t in times] for name, times in values.items()} for c, values in per_image.items()
        },
        "moderation_over_prefill": round(moderation_over_prefill, 3),
        "moderation_alone_over_prefill": round(alone_over_prefill, 3),
        "naive_over_moderation": round(naive_over_moderation, 2),
        "targets_met": {
            "moderation adds <= 1 prefill": moderation_over_prefill <= 1.0,
            # Compared as a product: what moderation adds can be below the repeats' noise, even negative.
            "naive >= 5x what moderation adds": median[clock]["naive"] >= 5.0 * median[clock]["moderation_added"],
        },
    }


def format_table(result: dict) -> str:
    """The result as a readable table."""
    wall, cpu = result["seconds_per_image"]["wall"], result["seconds_per_image"]["cpu"]
    cost = result["seconds_per_image"][result["clock"]]
    rows = [
        ("prefill", "prefill (1 forward, caption prompt + image)"),
        ("caption", f"caption ({result['max_new_tokens']} new tokens)"),
        ("caption+moderation", f"caption + moderation ({result['categories']} categories, from the cache)"),
        ("moderation_added", "  what moderation adds"),
        ("moderation", "moderation alone, image prefix shared by categories"),
        ("naive", "moderation, naive (1 forward per category)"),
        ("caption+naive", "caption + naive moderation"),
    ]
    tokens = result["tokens"]
    lines = [
        f"{result['model']} on {result['device']} ({result['dtype']}; {result['machine']})",
        (
            f"{result['images']} images, batch {result['batch_size']}, median of {result['repeats']} repeats; "
            f"tokens per image: caption prompt {tokens['caption_prompt_mean']}, "
            f"moderation prefix {tokens['moderation_prefix_mean']}, instruction {tokens['instruction']}, "
            f"suffixes {tokens['suffixes_per_image']}"
        ),
        "",
        f"{'stage':<60} {'wall ms/img':>12} {'CPU ms/img':>12} {'x prefill':>10}",
    ]
    lines += [
        f"{label:<60} {wall[key] * 1000:>12.1f} {cpu[key] * 1000:>12.1f} {cost[key] / cost['prefill']:>10.2f}"
        for key, label in rows
    ]
    lines += ["", f"targets, on {result['clock']} time:"]
    (prefill_target, prefill_met), (naive_target, naive_met) = result["targets_met"].items()
    lines.append(f"{'met   ' if prefill_met else 'MISSED'} {prefill_target}  ({result['moderation_over_prefill']:.2f})")
    ratio = result["naive_over_moderation"]
    shown = f"{ratio:.1f}x" if ratio > 0 else "moderation's cost is below the noise of the repeats"
    lines.append(f"{'met   ' if naive_met else 'MISSED'} {naive_target}  ({shown})")
    return "\n".join(lines)
