"""The job benchmark's result: every figure as plain data (the `--json` output), and the same as a text table."""

from __future__ import annotations

import os
import platform
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loupe.jobs.bench.measure import Phase
from loupe.jobs.bench.options import BenchOptions

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


def _total_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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


def _median(phases: list[Phase]) -> Phase:
    """The run with the median rate (the lower middle one of an even count)."""
    return sorted(phases, key=lambda p: p.images / p.seconds)[(len(phases) - 1) // 2]


def build_report(
    options: BenchOptions,
    tasks: tuple[str, ...],
    device,
    parameters: int,
    models: Any,
    paths: list[Path],
    shard_size: int,
    threads: int | None,
    e2e_runs: list[Phase],
    alone_runs: list[Phase],
    naive: Phase,
) -> dict[str, Any]:
    """Every figure as plain data: the median turn of each way, per-image stage times, the machine and the workload."""
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
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
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
            "clock": "first shard start to last shard end: excludes Ray start-up and model loading",
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


def format_table(result: dict[str, Any], width: int | None = None) -> str:
    """The result as a report a person reads once: numbered in reading order, wrapped to `width`
    (default: the terminal's, at most 100 columns), every figure saying what it measures."""
    import shutil
    import textwrap

    width = width or min(100, shutil.get_terminal_size((100, 24)).columns)
    m, w, model = result["machine"], result["workload"], result["model"]
    out: list[str] = []

    def say(text: str, indent: str = "") -> None:
        out.extend(textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent or "  ", break_on_hyphens=False) or [""])

    gpu = f", {m['gpu']}" if m["gpu"] else ", no GPU"
    say(f"loupe bench, {result['date']}: {result['command']}")
    say(f"machine: {m['cpus']} CPUs, {m['memory_gb']} GiB{gpu}; torch {m['torch']}, transformers {m['transformers']}")
    threads = f", {model['torch_threads']} torch threads" if model["torch_threads"] else ""
    say(
        f"model: random-weight {model['family']} ({model['size']}, {model['parameters'] / 1e6:.1f}M parameters, "
        f"{model['dtype']}) on {model['device']}{threads}"
    )
    say(
        f"workload: {w['images']} JPEGs ({len(w['image_sizes'])} size{'s' if len(w['image_sizes']) != 1 else ''}, "
        f"{w['mean_jpeg_kb']} KB mean); per image "
        f"{w['prompt_tokens_mean']} prompt tokens and {w['new_tokens']} new tokens; batches of {w['batch_size']}, "
        f"{w['shards']} shards of {w['shard_size']}; tasks {', '.join(result['arguments']['tasks'])}"
    )
    out.append("")
    label_width = max(12, min(30, width - 38))
    out.append(f"{'':<{label_width}}{'images/s':>10}{'tokens/s':>10}{'images':>8}{'seconds':>9}")

    def row(label: str, key: str) -> None:
        r = result[key]
        out.append(
            f"{label[:label_width]:<{label_width}}{r['images_per_second']:>10.3f}{r['tokens_per_second']:>10.1f}"
            f"{r['images']:>8}{r['seconds']:>9.2f}"
        )

    row("1. end to end", "end_to_end")
    row("2. model alone", "model_alone")
    repeats = result["repeats"]
    efficiencies = [r["efficiency"] for r in repeats]
    out.append("")
    say(f"3. pipeline efficiency, (1) / (2): {result['efficiency']:.3f}")
    say(
        "How close the whole job comes to the model alone on the same batches; 1.0 means the reading, decoding, "
        "preprocessing and writing cost nothing.",
        "   ",
    )
    if len(repeats) > 1:
        say(
            f"Median of {len(repeats)} turns ({', '.join(f'{e:.3f}' for e in efficiencies)}); their spread, "
            f"{max(efficiencies) - min(efficiencies):.3f}, is the noise of this machine, so smaller differences mean nothing.",
            "   ",
        )
    else:
        say("One turn only: rerun with --repeats 3 or more to see how much of this is noise.", "   ")
    out.append("")
    row("4. naive, one at a time", "naive")
    say(f"Speed-up of (1) over (4): {result['speedup_over_naive']:.2f}x", "   ")
    out.append("")
    say(
        f"Clocks: (1) runs from the first shard's start to the last shard's end, so it leaves out starting Ray and "
        f"loading the model (the whole job took {result['end_to_end']['job_seconds']} s); (2) times the model calls "
        "alone, inputs prepared beforehand; (4) times every step of each image."
    )
    out.append("")
    say("5. where the time goes, ms per image:")
    for stage, seconds in result["seconds_per_image"].items():
        if seconds is not None:
            say(f"{stage} {seconds * 1000:.2f}: {result['stage_notes'][stage]}", "   ")
    if result["gpu_memory_peak_bytes"] is not None:
        say(f"GPU memory high-water mark (model alone): {result['gpu_memory_peak_bytes'] / 2**30:.2f} GiB", "   ")
    if result["targets"]:
        out += ["", "targets:"]
        out += [f"   {'met   ' if met else 'MISSED'} {name}" for name, met in result["targets"].items()]
    return "\n".join(out)
