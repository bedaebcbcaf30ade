"""What a person sees of a command: one-line errors, the progress bar and the summary tables."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loupe.schemas.errors import DamagedOutput, UserError

# Progress and messages go to stderr, so stdout stays clean for --json and tables.
console = Console(stderr=True)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A user mistake (exit 2) or a damaged OUTPUT (exit 3) is one line on stderr; an interrupted job says how to resume."""
    try:
        yield
    except (UserError, DamagedOutput) as exc:
        kind = "error" if isinstance(exc, UserError) else "damaged output"
        typer.echo(f"loupe: {kind}: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("loupe: interrupted; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None


class ProgressBar:
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

    def __enter__(self) -> ProgressBar:
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


def print_summary(result) -> None:
    table = Table(title="loupe run", show_header=False, box=None, title_justify="left")
    table.add_row("output", result.output)
    table.add_row("shards", f"{result.shards_done}/{result.shards_total} done ({result.shards_skipped} from an earlier run)")
    table.add_row("rows", f"{result.rows_ok} ok, {result.rows_error} error")
    for code, count in result.error_codes.items():
        table.add_row("", f"{count} {code}")
    add_flagged(table, result.rows_flagged, result.flagged)
    table.add_row("this run", f"{result.images_this_run} images in {result.seconds:.1f} s ({result.images_per_second:.2f} images/s)")
    if result.nodes:
        table.add_row("nodes", str(len(result.nodes)))
    for failure in result.failures:
        table.add_row("[red]failed shard", f"{failure.shard_id}: {failure.error}")
    for kind, record in result.indexes.items():
        table.add_row(f"{kind} index", f"{record.vectors} vectors, {record.factory}, recall@10 {record.recall_at_10:.3f}")
    table.add_row("complete", "yes: _manifest.json lists every part" if result.complete else "no: rerun the same command to retry")
    Console().print(table)


def add_flagged(table: Table, rows_flagged: int, flagged: dict[str, int]) -> None:
    table.add_row("flagged", f"{rows_flagged} rows")
    for key, count in sorted(flagged.items(), key=lambda kv: -kv[1]):
        table.add_row("", f"{count} {key}")
