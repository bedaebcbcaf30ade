"""The `loupe` command line: thin Typer wrappers over the library API."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from loupe.jobs.bench.commands import bench_app
from loupe.jobs.console import ProgressBar, add_flagged, one_line_errors, print_summary
from loupe.schemas.errors import UserError

app = typer.Typer(
    help="Turn huge image collections into captioned, moderated, searchable catalogs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
@app.command()
def run(
    input: Annotated[str, typer.Argument(help="Local folder, s3://bucket/prefix/, .tar or .parquet file(s).")],
    output: Annotated[str, typer.Argument(help="Local folder or s3://bucket/prefix/ for the Parquet parts.")],
    model: Annotated[Optional[str], typer.Option(help="Hugging Face id or local path of a LLaVA-family checkpoint.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Instruction given with every image.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest caption, in tokens.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per model call.")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Loose images per shard (one part file each).")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="Model replicas (default: one per GPU, or 1 on CPU).")] = None,
    gpus_per_replica: Annotated[Optional[float], typer.Option(help="GPUs per replica; a fraction packs small models.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help="Join this Ray cluster instead of starting a local one.")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint (MinIO, R2, ...).")] = None,
    image_column: Annotated[Optional[str], typer.Option(help="Image-bytes column of Parquet inputs.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated: caption, moderate, embed (default: all).")] = None,
    taxonomy: Annotated[Optional[Path], typer.Option(help="Moderation categories as TOML (see `loupe moderation taxonomy`).")] = None,
    moderation_model: Annotated[Optional[str], typer.Option(help="A separate judge checkpoint (e.g. LlavaGuard); default: --model.")] = None,
    moderation_gpus: Annotated[Optional[float], typer.Option(help="GPUs of each separate moderation replica.")] = None,
    image_embedding_model: Annotated[Optional[str], typer.Option(help="CLIP checkpoint for image vectors and text-to-image search.")] = None,
    text_embedding_model: Annotated[Optional[str], typer.Option(help="Sentence model for caption vectors.")] = None,
    text_column: Annotated[Optional[str], typer.Option(help="Embed this source text (Parquet column or WebDataset sidecar, e.g. txt) instead of the caption.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML job file; flags override its values.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different job already in OUTPUT.")] = False,
) -> None:
    """Caption every image of INPUT into Parquet parts under OUTPUT; rerun to resume."""
    from loupe.jobs.runner import run_job
    from loupe.schemas.config import load_config

    with one_line_errors():
        job = load_config(
            config,
            input=input,
            output=output,
            model=model,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            shard_size=shard_size,
            replicas=replicas,
            gpus_per_replica=gpus_per_replica,
            ray_address=ray_address,
            endpoint_url=endpoint_url,
            image_column=image_column,
            tasks=tasks,
            taxonomy=taxonomy,
            moderation_model=moderation_model,
            moderation_gpus=moderation_gpus,
            image_embedding_model=image_embedding_model,
            text_embedding_model=text_embedding_model,
            text_column=text_column,
            overwrite=overwrite or None,
        )
        with ProgressBar() as bar:
            try:
                result = run_job(job, bar)
            except RuntimeError as exc:
                bar.stop()
                typer.echo(f"loupe: job stopped: {exc}", err=True)
                raise typer.Exit(1) from None
        print_summary(result)
        if not result.complete:
            raise typer.Exit(1)


@app.command()
def status(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """Show shards done/total, rows ok/error, failed shards, images/s and completeness."""
    from loupe.jobs.status import job_status

    with one_line_errors():
        state = job_status(output, endpoint_url)
    if as_json:
        typer.echo(json.dumps(state.to_dict(), indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_row("output", state.output)
    table.add_row("model", state.model)
    table.add_row("shards", f"{state.shards_done}/{state.shards_total} done")
    table.add_row("rows", f"{state.rows_ok} ok, {state.rows_error} error")
    for code, count in state.error_codes.items():
        table.add_row("", f"{count} {code}")
    add_flagged(table, state.rows_flagged, state.flagged)
    table.add_row("throughput", f"{state.images_per_second:.2f} images/s")
    table.add_row("failed shards", ", ".join(str(f["shard_id"]) for f in state.failed_shards) or "none")
    table.add_row("complete", "yes" if state.complete else "no")
    Console().print(table)


@app.command("random-model")
def random_model(
    dest: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    family: Annotated[str, typer.Option(help="llava, llava-next, llava-onevision or clip.")] = "llava",
    size: Annotated[str, typer.Option(help="tiny (tests), small (CPU benchmarks) or 7b (built on a GPU).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights; the tokenizer is the same for every seed.")] = 0,
) -> None:
    """Write a random-weight checkpoint that loads like a real one (for tests, demos, benchmarks)."""
    from loupe.workers.models.random import build_random_model

    with one_line_errors():
        path = build_random_model(dest, family, size, seed=seed)
    typer.echo(f"wrote a random-weight {family} ({size}) checkpoint to {path}; its captions are noise")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Argument(help="Where the demo writes its model, images and output.")] = Path(".loupe-demo"),
) -> None:
    """Build a tiny model and sample images, run a whole job on a local Ray cluster, show the result."""
    from loupe.jobs.demo import run_demo

    with one_line_errors():
        run_demo(workdir, ProgressBar, print_summary)


app.add_typer(bench_app, name="bench")


@app.command()
def index(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run with the embed task.")],
    kind: Annotated[str, typer.Option(help="image (CLIP vectors) or caption (sentence vectors).")] = "image",
    memory_budget: Annotated[str, typer.Option(help="Memory the index may take, e.g. 4GB or 512MiB.")] = "4GB",
    target_recall: Annotated[float, typer.Option(help="recall@10 against exact search to tune for.")] = 0.95,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """Build (or rebuild and re-tune) the FAISS index of OUTPUT's embeddings."""
    with one_line_errors():
        from loupe.jobs.indexing import build_output_index  # without FAISS: one line
        from loupe.workers.index.choose import parse_size

        if not 0 < target_recall <= 1:
            raise UserError("invalid option 'target_recall': must be in (0, 1]")
        record = build_output_index(
            output, kind=kind, memory_budget=parse_size(memory_budget), target_recall=target_recall,
            endpoint_url=endpoint_url,
        )
    typer.echo(
        f"{kind} index: {record.vectors} vectors, {record.factory}, recall@10 {record.recall_at_10:.3f} "
        f"(target {target_recall}), built in {record.build_seconds:.1f} s"
    )


@app.command()
def search(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run with an index.")],
    query: Annotated[Optional[str], typer.Argument(help="Text to search for.")] = None,
    image: Annotated[Optional[str], typer.Option(help="Search by an image instead: a local path or s3:// URI.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="How many results.")] = 10,
    kind: Annotated[str, typer.Option(help="image (CLIP) or caption (sentence vectors) index.")] = "image",
    exclude_flagged: Annotated[bool, typer.Option("--exclude-flagged", help="Leave out images flagged by moderation.")] = False,
    flagged: Annotated[Optional[str], typer.Option(help="Only images flagged for this category.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of results.")] = False,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """Search the catalog by text or by image; filter on the stored moderation labels."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with one_line_errors():
        from loupe.jobs.search import search as run_search  # without FAISS: one line

        hits = run_search(
            output, text=query, image=image, k=k, kind=kind, exclude_flagged=exclude_flagged,
            flagged=flagged, endpoint_url=endpoint_url,
        )
    if as_json:
        typer.echo(json.dumps([asdict(hit) for hit in hits], indent=2))
        return
    table = Table(box=None)
    for column in ("rank", "score", "image_id", "source", "caption", "flagged"):
        table.add_column(column, overflow="fold")
    for hit in hits:
        table.add_row(
            str(hit.rank), f"{hit.score:.3f}", hit.image_id, hit.source_uri, (hit.caption or "")[:80],
            ", ".join(hit.flagged_categories),
        )
    Console().print(table)


moderation_app = typer.Typer(help="Moderation taxonomy and evaluation against human labels.", no_args_is_help=True)
app.add_typer(moderation_app, name="moderation")


@moderation_app.command("taxonomy")
def moderation_taxonomy() -> None:
    """Print the default moderation taxonomy as TOML, ready to edit and pass with --taxonomy."""
    from loupe.schemas.taxonomy import DEFAULT_TAXONOMY

    typer.echo(DEFAULT_TAXONOMY.to_toml(), nl=False)


@moderation_app.command("evaluate")
def moderation_evaluate(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run with the moderate task.")],
    labels: Annotated[Path, typer.Argument(help="CSV: image_id, then one 0/1 column per category (missing allowed).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """Precision, recall and F1 per category at its threshold, and the threshold that maximizes F1."""
    from loupe.jobs.evaluate import evaluate

    with one_line_errors():
        report = evaluate(output, str(labels), endpoint_url)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"{report.matched} labelled images matched ({report.unmatched} not in the job)")
    for column in ("category", "support", "threshold", "precision", "recall", "F1", "best threshold", "best F1"):
        table.add_column(column, justify="left" if column == "category" else "right", no_wrap=column == "category")
    for c in report.categories:
        table.add_row(
            c.category, f"{c.support}/{c.labelled}", f"{c.threshold:.2f}", f"{c.precision:.3f}",
            f"{c.recall:.3f}", f"{c.f1:.3f}", f"{c.best_threshold:.3f}", f"{c.best_f1:.3f}",
        )
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
