"""Where a job stands, read from its OUTPUT alone (so it works while the job runs, or after)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loupe.jobs.output import done_shards, read_failures, read_job, read_stats
from loupe.schemas.records import JobRecord
from loupe.schemas.records import add_counts
from loupe.workers.storage import Storage, open_storage


@dataclass
class JobStatus:
    """Shards done and failed, rows by status, throughput, and whether the job is complete."""

    output: str
    shards_total: int
    shards_done: int
    rows_ok: int
    rows_error: int
    images_per_second: float
    failed_shards: list[dict[str, Any]] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)
    model: str = ""
    rows_flagged: int = 0
    flagged: dict[str, int] = field(default_factory=dict)  # rows at or over each category's threshold
    rows_known_content: int = 0  # rows matching the job's --match-list
    tasks: list[str] = field(default_factory=list)
    finish_command: str = ""  # the `loupe run` that resumes (or finishes) this job
    generation: int = 1  # a catalog grown with `loupe run --incremental` has one per run that added to it
    removed_objects: int = 0  # source objects gone from INPUT: rows kept, never returned by search
    generations: list[dict[str, Any]] = field(default_factory=list)  # after the first: new, removed, shards

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"complete": self.complete}


# The `loupe run` flag of each plan setting a resume must repeat (the rest have no flag or follow).
_RESUME_FLAGS = {
    "model": "--model",
    "prompt": "--prompt",
    "max_new_tokens": "--max-new-tokens",
    "shard_size": "--shard-size",
    "image_column": "--image-column",
    "moderation_model": "--moderation-model",
    "image_embedding_model": "--image-embedding-model",
    "text_embedding_model": "--text-embedding-model",
    "text_column": "--text-column",
}


def resume_command(settings: dict[str, Any], output: str) -> str:
    """The `loupe run` command line that resumes the job frozen with `settings` (defaults left out)."""
    import shlex

    from loupe.schemas.config import DEFAULT_TASKS, DEFAULT_TAXONOMY, JobConfig

    words = ["loupe", "run", settings.get("input", "INPUT"), output]
    for name, flag in _RESUME_FLAGS.items():
        value = settings.get(name)
        default = JobConfig.model_fields[name].default
        if value is not None and value != default and not (name == "moderation_model" and value == settings.get("model")):
            words += [flag, str(value)]
    tasks = settings.get("tasks")
    if tasks and tuple(tasks) != DEFAULT_TASKS:
        words += ["--tasks", ",".join(tasks)]
    taxonomy = settings.get("taxonomy_sha256")
    command = shlex.join(words)
    if taxonomy and taxonomy != DEFAULT_TAXONOMY.content_hash():
        command += " --taxonomy YOUR_TAXONOMY.toml"
    return command


def partial_job(storage: Storage, output: str, job: JobRecord) -> str:
    """The one line that says a job is partial, how far it got, and the command that finishes it."""
    done = len(done_shards(storage, output))
    return (
        f"{output} holds a partial job ({done} of {job.shards} shards done); "
        f"finish it with: {resume_command(job.settings, output)}"
    )


def job_status(output: str, endpoint_url: str | None = None) -> JobStatus:
    """Read the job record, the stats records and the failure records under OUTPUT."""
    storage = open_storage(output, endpoint_url)
    job = read_job(storage, output)
    stats = read_stats(storage, output)
    done = {s.shard_id for s in stats}
    failures = [f for f in read_failures(storage, output) if f.shard_id not in done]
    span = (max(s.finished_at for s in stats) - min(s.started_at for s in stats)) if stats else 0.0
    rows = sum(s.rows for s in stats)
    return JobStatus(
        output=output,
        shards_total=job.shards,
        shards_done=len(done),
        rows_ok=sum(s.rows_ok for s in stats),
        rows_error=sum(s.rows_error for s in stats),
        images_per_second=round(rows / span, 3) if span > 0 else 0.0,
        failed_shards=[{"shard_id": f.shard_id, "attempts": f.attempts, "error": f.error} for f in failures],
        error_codes=add_counts(s.error_codes for s in stats),
        model=str(job.settings.get("model", "")),
        rows_flagged=sum(s.rows_flagged for s in stats),
        # Every category of the job, zeros too: a category that flagged nothing is news as well.
        flagged={c["key"]: 0 for c in job.settings.get("taxonomy") or ()} | add_counts(s.flagged for s in stats),
        rows_known_content=sum(s.rows_known_content for s in stats),
        tasks=list(job.settings.get("tasks") or ()),
        finish_command=resume_command(job.settings, output),
        generation=job.generation,
        removed_objects=sum(g.get("removed", 0) for g in job.generations),
        generations=[
            {k: g.get(k) for k in ("generation", "first_shard", "shards", "new", "removed", "changed", "created_at")}
            for g in job.generations
        ],
    )

