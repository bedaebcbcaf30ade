"""The `loupe` command line: thin Typer wrappers over the library API."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loupe.schemas.errors import UserError

app = typer.Typer(
    help="Turn huge image collections into captioned, moderated, searchable catalogs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A user mistake is one line on stderr and exit 2; an interrupted job says how to resume."""
    try:
        yield
    except UserError as exc:
        typer.echo(f"loupe: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("loupe: interrupted; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None


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

    with _user_errors():
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
        with _ProgressBar() as bar:
            try:
                result = run_job(job, bar)
            except RuntimeError as exc:
                bar.stop()
                typer.echo(f"loupe: job stopped: {exc}", err=True)
                raise typer.Exit(1) from None
        _print_summary(result)
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

    with _user_errors():
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
    _add_flagged(table, state.rows_flagged, state.flagged)
    table.add_row("throughput", f"{state.images_per_second:.2f} images/s")
    table.add_row("failed shards", ", ".join(str(f["shard_id"]) for f in state.failed_shards) or "none")
    table.add_row("complete", "yes" if state.complete else "no")
    Console().print(table)


@app.command("random-model")
def random_model(
    dest: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    family: Annotated[str, typer.Option(help="llava, llava-next or llava-onevision.")] = "llava",
    size: Annotated[str, typer.Option(help="tiny (tests) or small (CPU benchmarks).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights and tokenizer.")] = 0,
) -> None:
    """Write a random-weight checkpoint that loads like a real one (for tests, demos, benchmarks)."""
    from loupe.workers.models.random import build_random_model

    with _user_errors():
        path = build_random_model(dest, family, size, seed=seed)
    typer.echo(f"wrote a random-weight {family} ({size}) checkpoint to {path}; its captions are noise")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Argument(help="Where the demo writes its model, images and output.")] = Path(".loupe-demo"),
) -> None:
    """Build a tiny model and sample images, run a whole job on a local Ray cluster, show the result."""
    from loupe.jobs.demo import run_demo

    with _user_errors():
        run_demo(workdir, _ProgressBar, _print_summary)


@app.command()
def bench(
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
    from loupe.jobs.bench.job import BenchOptions, format_table, run_bench  # first: it sets offline mode
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    options = BenchOptions(
        family=family, size=size, images=images, batch_size=batch_size, max_new_tokens=max_new_tokens,
        tasks=tasks, source=source, device=device, threads=threads, naive_images=naive_images, repeats=repeats,
        shard_size=shard_size, workdir=str(workdir) if workdir else None, endpoint_url=endpoint_url,
    )
    with _user_errors():
        result = run_bench(options, log=lambda line: console.print(f"[dim]{line}[/]"))
    typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))


class _ProgressBar:
    """Shards and images done, and images/s, while a job runs (a JobObserver)."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]shards"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[images]} images, {task.fields[rate]:.1f} images/s"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = None
        self._images = 0

    def __enter__(self) -> _ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._progress.stop()

    def started(self, shards_total: int, shards_done: int, replicas: int) -> None:
        if shards_done:
            console.print(f"resuming: {shards_done} of {shards_total} shards already done")
        self._task = self._progress.add_task("job", total=shards_total, completed=shards_done, images=0, rate=0.0)

    def shard_done(self, stats) -> None:
        self._images += stats.rows
        elapsed = self._progress.tasks[0].elapsed or 0.0
        self._progress.update(
            self._task, advance=1, images=self._images, rate=self._images / elapsed if elapsed else 0.0
        )

    def shard_failed(self, failure) -> None:
        console.print(f"[red]shard {failure.shard_id} failed after {failure.attempts} attempts:[/] {failure.error}")


def _print_summary(result) -> None:
    table = Table(title="loupe run", show_header=False, box=None, title_justify="left")
    table.add_row("output", result.output)
    table.add_row("shards", f"{result.shards_done}/{result.shards_total} done ({result.shards_skipped} from an earlier run)")
    table.add_row("rows", f"{result.rows_ok} ok, {result.rows_error} error")
    for code, count in result.error_codes.items():
        table.add_row("", f"{count} {code}")
    _add_flagged(table, result.rows_flagged, result.flagged)
    table.add_row("this run", f"{result.images_this_run} images in {result.seconds:.1f} s ({result.images_per_second:.2f} images/s)")
    if result.nodes:
        table.add_row("nodes", str(len(result.nodes)))
    for failure in result.failures:
        table.add_row("[red]failed shard", f"{failure.shard_id}: {failure.error}")
    for kind, record in result.indexes.items():
        table.add_row(f"{kind} index", f"{record.vectors} vectors, {record.factory}, recall@10 {record.recall_at_10:.3f}")
    table.add_row("complete", "yes: _manifest.json lists every part" if result.complete else "no: rerun the same command to retry")
    Console().print(table)


def _add_flagged(table: Table, rows_flagged: int, flagged: dict[str, int]) -> None:
    table.add_row("flagged", f"{rows_flagged} rows")
    for key, count in sorted(flagged.items(), key=lambda kv: -kv[1]):
        table.add_row("", f"{count} {key}")


@app.command()
def index(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run with the embed task.")],
    kind: Annotated[str, typer.Option(help="image (CLIP vectors) or caption (sentence vectors).")] = "image",
    memory_budget: Annotated[str, typer.Option(help="Memory the index may take, e.g. 4GB or 512MiB.")] = "4GB",
    target_recall: Annotated[float, typer.Option(help="recall@10 against exact search to tune for.")] = 0.95,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """Build (or rebuild and re-tune) the FAISS index of OUTPUT's embeddings."""
    with _user_errors():
        from loupe.jobs.indexing import build_output_index, parse_size  # without FAISS: one line

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
    with _user_errors():
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

    with _user_errors():
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
