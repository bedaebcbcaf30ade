"""What a person sees of a command: one-line errors, the progress bar and the summary tables."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from loupe.schemas.errors import DamagedOutput, UserError

# Progress and messages go to stderr, so stdout stays clean for --json and tables.
console = Console(stderr=True)


@contextlib.contextmanager
def one_line_errors(*, interrupted: str | None = "interrupted; rerun the same command to resume") -> Iterator[None]:
    """A user mistake (exit 2) or a damaged OUTPUT (exit 3) is one line on stderr; an interrupt exits 130.

    The interrupt prints `interrupted` as its one line, or nothing when it is None (a server
    stopped with Ctrl-C has nothing to resume).
    """
    try:
        yield
    except (UserError, DamagedOutput) as exc:
        kind = "error" if isinstance(exc, UserError) else "damaged output"
        typer.echo(f"loupe: {kind}: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if interrupted is not None:
            typer.echo(f"loupe: {interrupted}", err=True)
        raise typer.Exit(130) from None


class PlainFlags(TyperGroup):
    """A Typer group whose help shows no `<bool>` type beside on/off flags (--json, --help)."""

    def get_params(self, ctx: Any) -> list:
        return _plain(super().get_params(ctx))

    def get_command(self, ctx: Any, name: str) -> Any:
        command = super().get_command(ctx, name)
        if command is not None:
            _plain_all(command, ctx)
        return command


def _plain_all(command: Any, ctx: Any) -> None:
    _plain([*command.params, command.get_help_option(ctx)])
    for sub in getattr(command, "commands", {}).values():  # a sub-group's commands
        _plain_all(sub, ctx)


def _plain(params: list) -> list:
    for param in params:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # typer shows the metavar, when set, instead of the type
    return params


class ProgressBar:
    """Images and shards done, this run's images/s and an ETA while a job runs (a JobObserver).

    Replicas report images per batch (images_done), so the bar moves inside a shard; a shard's
    stats record (shard_done) then replaces its reported count with its exact row count.
    """

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.fields[images]:>6} images"),
            BarColumn(bar_width=20),
            TextColumn("shards {task.fields[shards]}"),
            TextColumn("{task.fields[rate]:.1f} images/s this run  ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._lock = threading.Lock()  # images_done comes from the runner's polling thread
        self._task: Any = None
        self._began = time.monotonic()
        self.shards_total = 0
        self.shards_before = 0  # done by an earlier run
        self.shards_now = 0  # done by this run
        self.images_now = 0  # rows of the shards this run finished
        self._sizes: dict[int, int | None] = {}  # images of a queued shard (None: a tar or Parquet file)
        self._running: dict[int, int] = {}  # images reported of shards not done yet

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
        with self._lock:
            self.shards_total, self.shards_before = shards_total, shards_done
            self._began = time.monotonic()
            self._task = self._progress.add_task("job", total=shards_total, completed=shards_done, images=0, rate=0.0, shards="")
            self._refresh()

    def shard_queued(self, shard: Any) -> None:
        with self._lock:
            self._sizes[shard.shard_id] = len(shard.uris) if shard.kind.value == "files" else None

    def images_done(self, shard_id: int, images: int) -> None:
        with self._lock:
            if shard_id in self._sizes:  # not finished already (a late report)
                self._running[shard_id] = self._running.get(shard_id, 0) + images
                self._refresh()

    def shard_done(self, stats: Any) -> None:
        with self._lock:
            self._sizes.pop(stats.shard_id, None)
            self._running.pop(stats.shard_id, None)
            self.shards_now += 1
            self.images_now += stats.rows
            self._refresh()

    def shard_failed(self, failure: Any) -> None:
        with self._lock:
            self._sizes.pop(failure.shard_id, None)
            self._running.pop(failure.shard_id, None)
            self._refresh()
        console.print(f"[red]shard {failure.shard_id} failed after {failure.attempts} attempts:[/] {failure.error}")

    @property
    def images_running(self) -> int:
        """Images captioned in shards not finished yet: redone if the run stops now."""
        return sum(self._running.values())

    def _refresh(self) -> None:
        if self._task is None:
            return
        # Fractions of running shards make the bar (and rich's ETA) move inside a shard.
        partial = sum(min(1.0, n / size) for i, n in self._running.items() if (size := self._sizes.get(i)))
        images = self.images_now + self.images_running
        elapsed = time.monotonic() - self._began
        self._progress.update(
            self._task,
            completed=self.shards_before + self.shards_now + partial,
            images=images,
            rate=images / elapsed if elapsed > 0 else 0.0,
            shards=f"{self.shards_before + self.shards_now}/{self.shards_total}",
        )

    def interrupted(self) -> str:
        """What an interrupt keeps and what a rerun redoes, in one line."""
        with self._lock:
            if self._task is None:
                return "interrupted before any shard started; rerun the same command to start"
            kept = self.shards_before + self.shards_now
            running = len(self._running) or len(self._sizes)
            shards = "shard" if running == 1 else "shards"
            redo = f"{running} unfinished {shards} ({self.images_running} images captioned so far) will be redone"
            return (
                f"interrupted: {kept} of {self.shards_total} shards are saved ({self.images_now} images by this run); "
                f"{redo}; rerun the same command to resume"
            )


def print_summary(result: Any, config: Any, seconds: float) -> None:
    """The run's summary; `seconds` is the command's own wall time, so its speed is what the user waited."""
    table = Table(title="loupe run", show_header=False, box=None, title_justify="left")
    table.add_row("output", result.output)
    table.add_row("shards", f"{result.shards_done}/{result.shards_total} done ({result.shards_skipped} from an earlier run)")
    table.add_row("rows", f"{result.rows_ok} ok, {result.rows_error} error")
    for code, count in result.error_codes.items():
        table.add_row("", f"{count} {code}")
    if config.moderates:
        add_flagged(table, result.rows_flagged, result.flagged, config.taxonomy.keys)
    add_known_content(table, result.rows_known_content)
    rate = result.images_this_run / seconds if seconds > 0 else 0.0
    table.add_row("this run", f"{result.images_this_run} images in {seconds:.1f} s wall time ({rate:.2f} images/s)")
    if result.nodes:
        table.add_row("nodes", str(len(result.nodes)))
    for failure in result.failures:
        table.add_row("[red]failed shard", f"{failure.shard_id}: {failure.error}")
    if result.uploads_aborted:  # news only when an earlier run was killed mid-upload
        table.add_row("S3 uploads", f"{result.uploads_aborted} unfinished from an earlier run, aborted")
    if result.hung_replicas:  # news only when a replica hung
        table.add_row("hung replicas", f"{result.hung_replicas} restarted; shard timeout {result.shard_timeout}")
    for kind, record in result.indexes.items():
        table.add_row(f"{kind} index", f"{record.vectors} vectors, {record.factory}, recall@10 {record.recall_at_10:.3f}")
        for note in (record.target_note, record.budget_note):
            if note:
                table.add_row("", note)
    table.add_row("complete", "yes: _manifest.json lists every part" if result.complete else "no: rerun the same command to retry")
    Console().print(table)


def add_flagged(table: Table, rows_flagged: int, flagged: dict[str, int], categories: Any = ()) -> None:
    """Rows flagged, then every category of the job (zeros too), most flagged first."""
    counts = {key: 0 for key in categories} | flagged
    table.add_row("flagged", f"{rows_flagged} rows")
    for key, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row("", f"{count} {key}")


def add_known_content(table: Table, rows: int) -> None:
    """Rows on the job's known-content list, apart from the model's flags (only when there are any)."""
    if rows:
        table.add_row("known content", f"{rows} rows match the --match-list")


def print_hits(hits: list, out: Console | None = None) -> None:
    """Search results, each in two lines fitted to the terminal: rank, score, file name and flags, then the text."""
    out = out or Console()
    width = max(40, out.width)
    for hit in hits:
        name = hit.source_uri.rstrip("/").rsplit("/", 1)[-1] or hit.image_id
        flags = hit.flagged_categories
        flag = f"flagged: {flags[0]}" + (f" +{len(flags) - 1}" if len(flags) > 1 else "") if flags else ""
        copies = f"  ({hit.duplicates} near-duplicates)" if getattr(hit, "duplicates", 0) else ""
        head = f"{hit.rank:>3}. {hit.score:.3f}  "
        room = width - len(head) - len(flag) - len(copies) - 2
        out.print(fit_line(head + _cut(name, room) + copies + "  " + flag, width), markup=False, highlight=False, soft_wrap=True)
        text = " ".join((hit.text or hit.caption or "").split())
        if text:
            out.print(fit_line("      " + text, width), markup=False, highlight=False, soft_wrap=True)


def _cut(text: str, room: int) -> str:
    """`text` in at most `room` characters, its middle elided (file names differ at their ends)."""
    if len(text) <= room:
        return text.ljust(room)
    if room < 5:
        return text[: max(room, 0)]
    half = (room - 1) // 2
    return text[:half] + "…" + text[len(text) - (room - 1 - half) :]


def fit_line(line: str, width: int) -> str:
    """`line` cut to `width` characters, an ellipsis saying so."""
    line = line.rstrip()
    return line if len(line) <= width else line[: width - 1] + "…"


def print_evaluation(report: Any, out: Console | None = None) -> None:
    """`loupe moderation evaluate`'s table, narrow enough for 80 columns, its abbreviations said once."""
    out = out or Console()
    out.print(
        f"{report.matched} labelled images matched by {report.key} ({report.unmatched} not in the job)", highlight=False
    )
    table = Table(box=None, padding=(0, 1), pad_edge=False)
    for column in ("category", "pos/n", "thr", "prec", "recall", "F1", "best thr", "best F1"):
        table.add_column(column, justify="left" if column == "category" else "right", no_wrap=True)
    for c in report.categories:
        table.add_row(
            c.category, f"{c.support}/{c.labelled}", f"{c.threshold:.2f}", f"{c.precision:.3f}",
            f"{c.recall:.3f}", f"{c.f1:.3f}", f"{c.best_threshold:.3f}", f"{c.best_f1:.3f}",
        )
    out.print(table)
    out.print(
        "pos/n: labelled 1 of labelled; thr: the category's threshold; best thr: the threshold with the highest F1",
        highlight=False,
    )
