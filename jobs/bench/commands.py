"""`loupe bench job|moderation|index`: thin Typer commands over the three benchmarks (`loupe bench` alone: job)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from loupe.jobs.console import one_line_errors

bench_app = typer.Typer(
    help="Benchmarks on random-weight models and generated data; `loupe bench` alone runs `loupe bench job`.",
    add_completion=False,
)


def _offline_transformers() -> None:
    """Before transformers is first imported: no network (the weights are built here), no progress bars or warnings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@bench_app.callback(invoke_without_command=True)
def job(
    ctx: typer.Context,
    family: Annotated[str, typer.Option(help="llava, llava-next or llava-onevision.")] = "llava",
    size: Annotated[str, typer.Option(help="tiny, small (CPU-sized) or 7b (the family's 7B shape; GPU).")] = "small",
    images: Annotated[int, typer.Option(help="Generated JPEGs of varied sizes to caption.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per caption, fixed (minimum = maximum).")] = 64,
    tasks: Annotated[str, typer.Option(help="Comma-separated: caption, moderate, embed.")] = "caption",
    source: Annotated[str, typer.Option(help="local folder, or s3 (a loopback S3 endpoint started for the run).")] = "local",
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when a GPU is there).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPUs of the local Ray cluster, so torch threads per replica (CPU).")] = None,
    naive_images: Annotated[Optional[int], typer.Option(help="Images for the one-at-a-time baseline (default 16).")] = None,
    repeats: Annotated[int, typer.Option(help="Turns of job and model alone; medians are reported (noisy machines).")] = 1,
    shard_size: Annotated[Optional[int], typer.Option(help="Images per shard (default: about four shards).")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Keep the checkpoint and images here between runs.")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(help="With --source s3: this S3-compatible endpoint (a bucket is created and removed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Images/s of a whole job beside the model alone and a naive loop, and where the time goes."""
    if ctx.invoked_subcommand is not None:  # this ran as the group's callback, before another benchmark
        if any(ctx.get_parameter_source(name).name == "COMMANDLINE" for name in ctx.params):
            where = f"after `loupe bench job`, not before `{ctx.invoked_subcommand}`"
            typer.echo(f"loupe: error: the job benchmark's flags go {where}", err=True)
            raise typer.Exit(2)
        return
    from rich.console import Console

    with one_line_errors():
        _offline_transformers()
        from loupe.jobs.bench.job import run_bench
        from loupe.jobs.bench.options import BenchOptions
        from loupe.jobs.bench.report import format_table

        options = BenchOptions(
            family=family, size=size, images=images, batch_size=batch_size, max_new_tokens=max_new_tokens,
            tasks=tasks, source=source, device=device, threads=threads, naive_images=naive_images, repeats=repeats,
            shard_size=shard_size, workdir=str(workdir) if workdir else None, endpoint_url=endpoint_url,
        )
        console = Console(stderr=True)
        result = run_bench(options, log=lambda line: console.print(f"[dim]{line}[/]"))
    typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))


bench_app.command("job")(job)


@bench_app.command()
def moderation(
    family: Annotated[str, typer.Option(help="llava, llava-next or llava-onevision.")] = "llava",
    size: Annotated[str, typer.Option(help="Random checkpoint size: tiny, small or 7b.")] = "small",
    model: Annotated[Optional[str], typer.Option(help="Benchmark this checkpoint instead of building a random one.")] = None,
    images: Annotated[int, typer.Option(help="Generated images.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per caption, fixed (minimum = maximum).")] = 32,
    repeats: Annotated[int, typer.Option(help="Repeats of every stage; medians are reported.")] = 3,
    device: Annotated[Optional[str], typer.Option(help="Default: cuda if available, else cpu.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Default: bfloat16 on cuda, float32 on cpu.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch CPU threads (default: torch's choice).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """What moderation costs per image next to captioning: shared image prefix against one forward per category."""
    with one_line_errors():
        _offline_transformers()
        from loupe.jobs.bench.moderation import ModerationOptions, format_table, run_moderation_bench

        options = ModerationOptions(
            family=family, size=size, model=model, images=images, batch_size=batch_size,
            max_new_tokens=max_new_tokens, repeats=repeats, device=device, dtype=dtype, threads=threads,
        )
        result = run_moderation_bench(options)
    typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@bench_app.command()
def index(
    vectors: Annotated[int, typer.Option(help="Synthetic clustered unit vectors to index.")] = 1_000_000,
    dim: Annotated[int, typer.Option(help="Their dimension.")] = 768,
    queries: Annotated[int, typer.Option(help="Fresh queries for recall and latency.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the vectors and the index build.")] = 0,
    budget_fraction: Annotated[float, typer.Option(help="Memory budget as a share of flat's bytes.")] = 0.25,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """The index chosen for a share of flat's memory against exact flat search: bytes, recall@10, latency."""
    with one_line_errors():
        from loupe.jobs.bench.index import run, table

        result = run(vectors, dim, budget_fraction=budget_fraction, queries=queries, seed=seed)
    typer.echo(json.dumps(result, indent=2) if as_json else table(result))
