"""`loupe bench job|moderation|index|serve|pdq|incremental|embed-texts`: thin Typer commands over the benchmarks (`loupe bench` alone: job)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from loupe.jobs.console import one_line_errors
from loupe.schemas.errors import UserError

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
    tasks: Annotated[str, typer.Option(help="Comma-separated: caption, moderate, embed, hash.")] = "caption",
    gpus_per_replica: Annotated[Optional[int], typer.Option(help="GPUs the replica spreads over (CUDA; default: planned from the checkpoint).")] = None,
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
            gpus_per_replica=gpus_per_replica,
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
    peer: Annotated[Optional[str], typer.Option(help="Also build this peer's index at every --budgets share: autofaiss.")] = None,
    budgets: Annotated[str, typer.Option(help="With --peer: the budgets, as shares of flat's bytes.")] = "1/16,1/8,1/4,1/2",
    workdir: Annotated[Optional[Path], typer.Option(help="With --peer: where the vectors, indexes and the peer's virtual environment go.")] = None,
    remeasure: Annotated[bool, typer.Option(help="With --peer: build nothing; measure both systems' kept indexes in --workdir again.")] = False,
    embeddings: Annotated[Optional[Path], typer.Option(help="Your own vectors instead of synthetic ones: a .npy float matrix; --queries rows are held out as queries.")] = None,
    target_recall: Annotated[float, typer.Option(min=0.01, max=1.0, help="With --peer: the recall@10 loupe's search is tuned to, as `loupe index --target-recall`.")] = 0.95,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """The index chosen for a share of flat's memory against exact flat search (or, with --peer, against the peer's index at each budget)."""
    with one_line_errors():
        if peer is not None:
            import tempfile

            from loupe.jobs.bench import peer as peers

            if peer not in peers.PEERS:
                raise UserError(f"unknown --peer {peer!r}; choose one of: {', '.join(peers.PEERS)}")
            shares = peers.parse_budgets(budgets)
            where = workdir or Path(tempfile.gettempdir()) / "loupe-bench-peer"
            python = peers.peer_python(where / f"venv-{peer}")
            result = peers.compare(
                vectors, dim, budgets=shares, work=where, python=python, queries=queries, seed=seed,
                remeasure=remeasure, embeddings=embeddings, target_recall=target_recall,
            )  # fmt: skip
            typer.echo(json.dumps(result, indent=2) if as_json else peers.table(result))
            return
        from loupe.jobs.bench.index import EmbeddingFile, run, table

        data = None if embeddings is None else EmbeddingFile(embeddings, queries, seed)
        result = run(vectors, dim, budget_fraction=budget_fraction, queries=queries, seed=seed, data=data)
    typer.echo(json.dumps(result, indent=2) if as_json else table(result))


@bench_app.command()
def serve(
    output: Annotated[Optional[str], typer.Argument(help="Benchmark this OUTPUT (with an image index); default: a synthetic catalog.")] = None,
    vectors: Annotated[int, typer.Option(min=1, help="Without OUTPUT: rows (and image vectors) of the synthetic catalog.")] = 1_000_000,
    dim: Annotated[int, typer.Option(min=2, help="Without OUTPUT: their dimension (the random CLIP's projection).")] = 768,
    clients: Annotated[str, typer.Option(help="Comma-separated counts of concurrent clients.")] = "1,8,32",
    requests: Annotated[int, typer.Option(min=1, help="Requests per client count (at least 4 per client).")] = 200,
    query: Annotated[str, typer.Option(help="The text searched for.")] = "a red square",
    k: Annotated[int, typer.Option("-k", min=1, help="Results per search.")] = 10,
    fresh_runs: Annotated[int, typer.Option(min=0, help="Runs of `loupe search` in a fresh process (median).")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic vectors, rows, model and index.")] = 0,
    workdir: Annotated[Optional[Path], typer.Option(help="Keep the synthetic catalog here between runs (default: $TMPDIR/loupe-bench-serve).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Search latency (p50, p99) and requests/s through `loupe serve` on loopback, beside `loupe search` in a fresh process."""
    import tempfile

    from rich.console import Console

    _offline_transformers()
    with one_line_errors():
        from loupe.jobs.bench.serve import parse_clients, run_serve_bench
        from loupe.jobs.serve.bench import format_table

        console = Console(stderr=True)
        result = run_serve_bench(
            output, vectors=vectors, dim=dim, workdir=workdir or Path(tempfile.gettempdir()) / "loupe-bench-serve",
            clients=parse_clients(clients), requests=requests, query=query, k=k, fresh_runs=fresh_runs, seed=seed,
            log=lambda line: console.print(f"[dim]{line}[/]"),
        )
    typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@bench_app.command()
def pdq(
    images: Annotated[int, typer.Option(help="Photo-like JPEGs of camera sizes to hash, decoded in full.")] = 32,
    catalog: Annotated[int, typer.Option(help="Catalog hashes to match against (0: skip matching).")] = 1_000_000,
    list_size: Annotated[int, typer.Option("--list", help="Known hashes in the list.")] = 10_000,
    max_distance: Annotated[int, typer.Option(help="Most differing bits of a match.")] = 31,
    brute_force_list: Annotated[Optional[int], typer.Option(help="Time NumPy's brute force on this many list hashes and scale up (default: all).")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Keep the generated photos here between runs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """PDQ's cost per image on the CPU, and `loupe match`'s search (binary FAISS) against a NumPy popcount brute force."""
    import tempfile

    with one_line_errors():
        from PIL import Image

        from loupe.jobs.bench.pdq import format_table, time_match, time_pdq
        from loupe.jobs.bench.photos import make_photos

        with tempfile.TemporaryDirectory(prefix="loupe-bench-pdq-") as tmp:
            paths = make_photos(Path(workdir or tmp) / "photos", images)
            decoded = []
            for path in paths:
                with Image.open(path) as image:
                    decoded.append(image.convert("RGB"))
        hashing = time_pdq(decoded)
        matching = time_match(catalog, list_size, max_distance, brute_force_list=brute_force_list) if catalog else None
    result = {"pdq": hashing, "match": matching}
    typer.echo(json.dumps(result, indent=2) if as_json else format_table(hashing, matching))


@bench_app.command()
def chaos(
    images: Annotated[int, typer.Option(help="Generated images (two of them broken) on a loopback S3 endpoint.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the fault schedule and the images.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Images per shard.")] = 16,
    shard_timeout: Annotated[float, typer.Option(help="--shard-timeout of the chaos job (a hung model call is injected).")] = 20.0,
    workdir: Annotated[Optional[Path], typer.Option(help="Keep the model and images here between runs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """A job under a seeded schedule of every fault loupe survives, on a two-node local Ray cluster, against a clean run."""
    import tempfile

    _offline_transformers()
    with one_line_errors():
        from loupe.jobs.bench.chaos import format_report, run_chaos

        with tempfile.TemporaryDirectory(prefix="loupe-bench-chaos-") as tmp:
            report = run_chaos(Path(workdir or tmp), images=images, seed=seed, shard_size=shard_size, shard_timeout_s=shard_timeout)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    if not report.survived:
        raise typer.Exit(1)


@bench_app.command()
def incremental(
    images: Annotated[int, typer.Option(help="Images in the catalog before it grows.")] = 10_000,
    added: Annotated[float, typer.Option(help="Share of new images added, then run with --incremental.")] = 0.01,
    shard_size: Annotated[int, typer.Option(help="Images per shard.")] = 1000,
    threads: Annotated[Optional[int], typer.Option(help="CPUs of the local Ray cluster.")] = None,
    scaling: Annotated[str, typer.Option(help="Comma-separated synthetic catalog sizes for the catalog step alone ('' skips).")] = "10000,100000,1000000",
    skip_run: Annotated[bool, typer.Option("--skip-run", help="Only the catalog step's scaling, no jobs.")] = False,
    workdir: Annotated[Optional[Path], typer.Option(help="Keep the model and images here between runs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """An incremental run adding a share of new images to a catalog, against a full run over the final listing."""
    import tempfile

    _offline_transformers()
    with one_line_errors():
        from loupe.jobs.bench.incremental import catalog_scaling, format_report, run_incremental_bench

        with tempfile.TemporaryDirectory(prefix="loupe-bench-incremental-") as tmp:
            where = Path(workdir or tmp)
            sizes = tuple(int(s) for s in scaling.split(",") if s.strip())
            scaled = catalog_scaling(where, sizes) if sizes else []
            run = None if skip_run else run_incremental_bench(where, images=images, added=added, shard_size=shard_size, threads=threads)
    result = {"run": run, "catalog_scaling": scaled}
    typer.echo(json.dumps(result, indent=2) if as_json else format_report(run, scaled))


@bench_app.command("embed-texts")
def embed_texts(
    texts: Annotated[list[Path], typer.Argument(help="Text files: every distinct non-empty line is one text.")],
    out: Annotated[Path, typer.Option("--out", help="The .npy matrix to write, a unit vector a line.")],
    model: Annotated[Optional[str], typer.Option(help="The text embedding model (hub id or local path); default: the captions' model.")] = None,
) -> None:
    """Real embeddings for `loupe bench index --embeddings`: lines of text embedded as captions are."""
    _offline_transformers()
    with one_line_errors():
        from loupe.jobs.bench.texts import embed_lines
        from loupe.schemas.config import DEFAULT_TEXT_EMBEDDING_MODEL

        rows, dim = embed_lines(texts, out, model or DEFAULT_TEXT_EMBEDDING_MODEL)
    typer.echo(f"{rows:,} texts embedded in {dim} dimensions: {out}")
