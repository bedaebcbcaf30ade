"""The `loupe` command line: thin Typer wrappers over the library API."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from loupe.jobs.bench.commands import bench_app
from loupe.jobs.serve import serve_command
from loupe.jobs.console import (
    PlainFlags,
    ProgressBar,
    add_flagged,
    add_known_content,
    one_line_errors,
    print_evaluation,
    print_hits,
    print_summary,
)
from loupe.schemas import config as defaults
from loupe.schemas.errors import UserError

app = typer.Typer(
    help="Turn huge image collections into captioned, moderated, searchable catalogs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=PlainFlags,
)


@contextlib.contextmanager
def _sole_writer(output: str, endpoint_url: str | None) -> Iterator[None]:
    """OUTPUT has one writer at a time: a run (which writes its indexes under its own lease), or
    a command that writes beside the catalog (index, match, dedup, moderation propagate)."""
    from loupe.jobs.lease import Lease
    from loupe.workers.storage import open_storage

    with Lease.acquire(open_storage(output, endpoint_url), output):
        yield


def _default(name: str) -> str:
    """A JobConfig default as `--help` shows it (the flags default to None so a TOML file can set them)."""
    return str(defaults.JobConfig.model_fields[name].default)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"loupe {version('loupe')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print loupe's version and exit.")] = False,
) -> None:
    """Turn huge image collections into captioned, moderated, searchable catalogs."""


@app.command()
def run(
    input: Annotated[str, typer.Argument(help="Local folder, s3://bucket/prefix/, .tar or .parquet file(s).")],
    output: Annotated[str, typer.Argument(help="Local folder or s3://bucket/prefix/ for the Parquet parts.")],
    model: Annotated[Optional[str], typer.Option(help=f"Hugging Face id or local path of a LLaVA-family checkpoint. (default: {defaults.DEFAULT_MODEL})")] = None,
    prompt: Annotated[Optional[str], typer.Option(help=f"Instruction given with every image. (default: {defaults.DEFAULT_PROMPT})")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=f"Longest caption, in tokens. (default: {_default('max_new_tokens')})")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Images per model call. (default: {_default('batch_size')})")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help=f"Loose images per shard (one part file each; the unit a rerun resumes from). (default: {_default('shard_size')})")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="Model replicas. (default: one per GPU, or 1 on CPU)")] = None,
    gpus_per_replica: Annotated[Optional[float], typer.Option(help="GPUs per replica: a fraction (at most 1) packs small models, a whole number spreads big ones. (default: worked out from the checkpoint's size and the cluster's GPUs)")] = None,
    cpus_per_replica: Annotated[Optional[int], typer.Option(help="CPUs (and torch threads) beside each GPU replica, for image preprocessing. (default: the node's CPUs split by its GPU shares)")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="8bit or 4bit: load the weights through bitsandbytes (GPU only).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help="Join this Ray cluster instead of starting a local one.")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint (MinIO, R2, ...).")] = None,
    image_column: Annotated[Optional[str], typer.Option(help="Image-bytes column of Parquet inputs.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated: caption, moderate, embed, hash (default: all).")] = None,
    taxonomy: Annotated[Optional[Path], typer.Option(help="Moderation categories as TOML (see `loupe moderation taxonomy`).")] = None,
    moderation_model: Annotated[Optional[str], typer.Option(help="A separate judge checkpoint (e.g. LlavaGuard); default: --model.")] = None,
    moderation_gpus: Annotated[Optional[float], typer.Option(help="GPUs of each separate moderation replica.")] = None,
    image_embedding_model: Annotated[Optional[str], typer.Option(help=f"CLIP checkpoint for image vectors and text-to-image search. (default: {defaults.DEFAULT_IMAGE_EMBEDDING_MODEL})")] = None,
    text_embedding_model: Annotated[Optional[str], typer.Option(help=f"Sentence model for caption vectors. (default: {defaults.DEFAULT_TEXT_EMBEDDING_MODEL})")] = None,
    text_column: Annotated[Optional[str], typer.Option(help="Embed this source text (Parquet column or WebDataset sidecar, e.g. txt) instead of the caption.")] = None,
    match_list: Annotated[Optional[str], typer.Option(help="Known PDQ hashes (one per line, or hash,label CSV; path or s3:// URI): matching rows get known_content.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML job file; flags override its values.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different job already in OUTPUT.")] = False,
    incremental: Annotated[bool, typer.Option("--incremental", help="On a complete job: process only the objects INPUT gained since (a new generation); record the removed ones.")] = False,
    replan_changed: Annotated[bool, typer.Option("--replan-changed", help="With --incremental: process again objects whose size or ETag changed.")] = False,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Process again the rows whose error is transient (read_failed, model_failed).")] = False,
    shard_timeout: Annotated[Optional[float], typer.Option(help="Seconds a replica may give no result before it is restarted and its shards go elsewhere. (default: 10x the slowest shard seen, at least 600)")] = None,
) -> None:
    """Caption every image of INPUT into Parquet parts under OUTPUT; rerun to resume."""
    began = time.monotonic()
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
            cpus_per_replica=cpus_per_replica,
            quantize=quantize,
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
            match_list=match_list,
            overwrite=overwrite or None,
            incremental=incremental or None,
            replan_changed=replan_changed or None,
            retry_errors=retry_errors or None,
            shard_timeout_s=shard_timeout,
        )
        with ProgressBar() as bar:
            try:
                result = run_job(job, bar)
            except RuntimeError as exc:
                bar.stop()
                typer.echo(f"loupe: job stopped: {exc}", err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                bar.stop()
                typer.echo(f"loupe: {bar.interrupted()}", err=True)
                raise typer.Exit(130) from None
        for note in result.notes:  # resumed, what INPUT gained or lost, how the indexes grew
            typer.echo(f"loupe: {note}", err=True)
        print_summary(result, job, time.monotonic() - began)
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
    if state.generation > 1:
        table.add_row("generations", f"{state.generation} ({state.removed_objects} source objects removed since the first)")
        for g in state.generations:
            table.add_row("", f"{g['generation']}: {g['new']} new, {g['removed']} removed, shards from {g['first_shard']}")
    table.add_row("rows", f"{state.rows_ok} ok, {state.rows_error} error")
    for code, count in state.error_codes.items():
        table.add_row("", f"{count} {code}")
    if "moderate" in state.tasks:
        add_flagged(table, state.rows_flagged, state.flagged)
    add_known_content(table, state.rows_known_content)
    table.add_row("throughput", f"{state.images_per_second:.2f} images/s, first shard start to last shard end")
    table.add_row("failed shards", ", ".join(str(f["shard_id"]) for f in state.failed_shards) or "none")
    if state.complete:
        table.add_row("complete", "yes")
    else:
        left = state.shards_total - state.shards_done
        table.add_row("complete", f"no: partial, {left} of {state.shards_total} shards to go; finish with:")
        table.add_row("", state.finish_command)
    Console().print(table)


@app.command("random-model")
def random_model(
    dest: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    family: Annotated[str, typer.Option(help="llava, llava-next, llava-onevision or clip.")] = "llava",
    size: Annotated[str, typer.Option(help="tiny (tests), small (CPU benchmarks), 7b, or the public 13b (llava), 34b (llava-next) and 72b (llava-onevision) shapes (built on a GPU).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights; the tokenizer is the same for every seed.")] = 0,
) -> None:
    """Write a random-weight checkpoint that loads like a real one (for tests, demos, benchmarks)."""
    from transformers.utils import logging as hf_logging

    from loupe.workers.models.random import build_random_model

    hf_logging.disable_progress_bar()  # "Writing model shards" for one tiny file says nothing
    with one_line_errors():
        path = build_random_model(dest, family, size, seed=seed)
    noise = "its vectors are noise" if family == "clip" else "its captions are noise"
    typer.echo(f"wrote a random-weight {family} ({size}) checkpoint to {path}; {noise}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Argument(help="Where the demo writes its model, images and output.")] = Path(".loupe-demo"),
) -> None:
    """Build a tiny model and sample images, run a whole job on a local Ray cluster, show the result."""
    from loupe.jobs.demo import run_demo

    with one_line_errors():
        run_demo(workdir, ProgressBar, print_summary)


app.add_typer(bench_app, name="bench")
app.command("serve")(serve_command)


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
        with _sole_writer(output, endpoint_url):
            record = build_output_index(
                output, kind=kind, memory_budget=parse_size(memory_budget), target_recall=target_recall,
                endpoint_url=endpoint_url,
            )
    typer.echo(
        f"{kind} index: {record.vectors} vectors, {record.factory}, recall@10 {record.recall_at_10:.3f} "
        f"(target {target_recall}), built in {record.build_seconds:.1f} s"
    )
    for note in (record.target_note, record.budget_note):
        if note:
            typer.echo(note)


@app.command()
def search(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run with an index.")],
    query: Annotated[Optional[str], typer.Argument(help="Text to search for.")] = None,
    image: Annotated[Optional[str], typer.Option(help="Search by an image instead: a local path or s3:// URI.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many results.")] = 10,
    kind: Annotated[str, typer.Option(help="image (CLIP) or caption (sentence vectors) index.")] = "image",
    exclude_flagged: Annotated[bool, typer.Option("--exclude-flagged", help="Leave out images flagged by moderation.")] = False,
    flagged: Annotated[Optional[str], typer.Option(help="Only images flagged for this category.")] = None,
    all_duplicates: Annotated[bool, typer.Option("--all-duplicates", help="Show every near-duplicate, not one per `loupe dedup` group.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of results.")] = False,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """Search the catalog by text or by image; filter on the stored moderation labels."""
    with one_line_errors():
        from loupe.jobs.search import search as run_search  # without FAISS: one line

        hits = run_search(
            output, text=query, image=image, k=k, kind=kind, exclude_flagged=exclude_flagged,
            flagged=flagged, endpoint_url=endpoint_url, all_duplicates=all_duplicates,
        )
    if as_json:
        typer.echo(json.dumps([asdict(hit) for hit in hits], indent=2))
        return
    if not hits and (exclude_flagged or flagged):
        reason = "every image in the index is flagged (--exclude-flagged)" if exclude_flagged else f"no image is flagged for {flagged}"
        typer.echo(f"no results: {reason}")
        return
    print_hits(hits)


moderation_app = typer.Typer(help="Moderation taxonomy and evaluation against human labels.", no_args_is_help=True)
app.add_typer(moderation_app, name="moderation")


@moderation_app.command("taxonomy")
def moderation_taxonomy() -> None:
    """Print the default moderation taxonomy as TOML, ready to edit and pass with --taxonomy."""
    from loupe.schemas.taxonomy import DEFAULT_TAXONOMY

    typer.echo(DEFAULT_TAXONOMY.to_toml(), nl=False)


@moderation_app.command("propagate")
def moderation_propagate(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run, after loupe dedup.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """List every near-duplicate of a flagged image with the flag it inherits and from which images."""
    with one_line_errors():
        from loupe.jobs.dedup import propagate

        with _sole_writer(output, endpoint_url):
            inherited = propagate(output, endpoint_url)
    if as_json:
        typer.echo(json.dumps([asdict(item) for item in inherited], indent=2))
        return
    table = Table(box=None)
    for column in ("image_id", "inherits", "from", "group"):
        table.add_column(column, overflow="fold")
    for item in inherited:
        table.add_row(item.image_id, item.flag, ", ".join(item.from_image_ids), str(item.group_id))
    Console().print(table)


@moderation_app.command("evaluate")
def moderation_evaluate(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run with the moderate task.")],
    labels: Annotated[Path, typer.Argument(help="CSV: a key column (image_id, source_uri or file_name), then one 0/1 column per category (empty: unlabelled).")],
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
    print_evaluation(report)


@app.command()
def match(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run with the hash task.")],
    hash_list: Annotated[str, typer.Argument(metavar="LIST", help="Known PDQ hashes: one per line, or hash,label CSV (path or s3:// URI).")],
    max_distance: Annotated[int, typer.Option(help="Most differing bits of a match (PDQ's usual 31).")] = 31,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """Match every catalog image's PDQ hash against a list of known hashes into OUTPUT/matches/."""
    with one_line_errors():
        from loupe.jobs.match import match_catalog  # without FAISS: one line

        with _sole_writer(output, endpoint_url):
            summary = match_catalog(output, hash_list, max_distance, endpoint_url)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    typer.echo(
        f"{summary.images_matched} of {summary.catalog_hashes} hashed images match {summary.list_hashes} list hashes "
        f"within {summary.max_distance} bits ({summary.matches} matches, {summary.low_quality} hashes too low in "
        f"quality to match) in {summary.seconds:.1f} s; written to {summary.path}"
    )
    for label, count in summary.images_by_label.items():
        typer.echo(f"  {count} {label}")


@app.command()
def dedup(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run with the hash task.")],
    pdq_distance: Annotated[int, typer.Option(help="Most differing PDQ bits of two near-duplicates.")] = 31,
    image_threshold: Annotated[float, typer.Option(help="Least cosine of two near-duplicates' CLIP image vectors (where the embed task ran).")] = 0.95,
    pdq_only: Annotated[bool, typer.Option("--pdq-only", help="Group by PDQ hashes alone, ignoring image vectors.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
) -> None:
    """Group near-duplicate images into OUTPUT/duplicates/ (image id, group, representative)."""
    with one_line_errors():
        from loupe.jobs.dedup import dedup as run_dedup  # without FAISS: one line

        with _sole_writer(output, endpoint_url):
            summary = run_dedup(output, pdq_distance, None if pdq_only else image_threshold, endpoint_url)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    typer.echo(
        f"{summary.groups} groups of near-duplicates ({summary.duplicates} copies beside their representatives, "
        f"largest {summary.largest_group}) among {summary.images} images; written to {summary.path}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
