"""`loupe bench chaos`: a job under a seeded random schedule of every fault loupe claims to survive, compared with a clean run."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from loupe.jobs.bench.faulty_s3 import (
    DELAY,
    DROP_REPLY,
    INTERNAL_ERROR,
    RESET_GET,
    SLOWDOWN,
    FaultyS3,
)
from loupe.jobs.bench.source import image_source
from loupe.jobs.lease import LeaseHeld
from loupe.jobs.output import read_manifest
from loupe.jobs.replicas import local_cluster
from loupe.jobs.runner import run_job
from loupe.jobs.scheduler import JobStopped
from loupe.schemas.config import JobConfig
from loupe.workers.faults import ENV
from loupe.workers.storage import join_uri, open_storage

# Moderation scores of one image move by up to this much with the batch it is scored in (tiny
# random-weight model): faults that change batches (out of memory, retries) may move them.
SCORE_TOLERANCE = 0.02
# Runs after which a job still not complete counts as lost.
MAX_RUNS = 5


@dataclass
class ChaosReport:
    """What a chaos run injected, what it survived, and how its output compares with a clean run's."""

    images: int
    seed: int
    nodes: int
    injected: dict[str, int]
    runs: int  # `loupe run`s until complete, the --retry-errors run included
    rows: int
    rows_lost: int
    duplicates: int
    rows_differing: int
    seconds: float
    max_score_delta: float
    notes: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return self.rows_lost == 0 and self.duplicates == 0 and self.rows_differing == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"survived": self.survived}


def run_chaos(
    workdir: Path,
    *,
    images: int = 300,
    seed: int = 0,
    shard_size: int = 16,
    shard_timeout_s: float = 20.0,
    cluster: Any = None,
) -> ChaosReport:
    """A clean run and a chaos run of the same `images` on S3; `cluster` is a ray.cluster_utils.Cluster
    already connected to (one of two nodes is started here otherwise)."""
    from loupe.jobs.demo import make_sample_images
    from loupe.workers.models.random import build_random_model

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "model"
    if not (model / "config.json").exists():
        build_random_model(model, "llava", "tiny", seed=0)
    folder = workdir / "images"
    if len(list(folder.glob("*"))) != images:
        make_sample_images(folder, count=images - 2, seed=seed)  # and two broken files
    paths = sorted(folder.iterdir())
    shutil.rmtree(workdir / "tokens", ignore_errors=True)  # a fault plan's firings start from none
    # The bucket first: it sets the loopback endpoint's credentials, which Ray's workers inherit.
    with image_source("s3", paths, None) as (uri, endpoint, _), _cluster(cluster) as ray_cluster:
        settings = dict(
            input=uri, model=str(model), max_new_tokens=4, batch_size=4, shard_size=shard_size,
            tasks="caption,moderate", endpoint_url=endpoint, build_index=False,
        )
        bucket = uri.rstrip("/").rsplit("/", 1)[0]
        clean_out = join_uri(bucket, "clean")
        run_job(JobConfig(output=clean_out, **settings))
        clean = _rows(clean_out, endpoint)
        rng = random.Random(seed)
        rates = {SLOWDOWN: 0.02, INTERNAL_ERROR: 0.02, RESET_GET: 0.02, DROP_REPLY: 0.04, DELAY: 0.02}
        with FaultyS3(endpoint, seed=seed, rates=rates, delay_s=0.05) as proxy:
            out = join_uri(bucket, "chaos")
            chaos = JobConfig(
                output=out, replicas=3, shard_timeout_s=shard_timeout_s, **(settings | {"endpoint_url": proxy.url})
            )
            shards = -(-images // shard_size)
            injected, runs = _chaos_runs(chaos, workdir / "tokens", paths, rng, ray_cluster, shards, endpoint)
            injected.update({f"s3_{kind}": count for kind, count in proxy.counts.items()})
        rows = _rows(out, endpoint)
    return _compare(clean, rows, images, seed, injected, runs, time.monotonic() - started)


def _chaos_runs(
    config: JobConfig, tokens: Path, paths: list[Path], rng: random.Random, cluster: Any, shards: int, endpoint: str
) -> tuple[Counter[str], int]:
    """The chaos job's runs until it is complete: faults drawn from `rng`, then --retry-errors without read faults."""
    names = [p.name for p in paths if p.name.startswith("scene-")]
    unreadable = rng.sample(names, 3)
    plan = [
        # In the first tenth of the images (shards are dispatched in order), so that the hang is
        # noticed before OUTPUT fills up, which stops the run.
        {"point": "model", "action": "hang", "match": rng.choice(names[: max(1, len(names) // 10)]), "seconds": 3600,
         "token": str(tokens / "hang")},
        {"point": "model", "action": "oom", "min_batch": 2, "token": str(tokens / "oom"), "times": rng.randint(2, 5)},
        {"point": "model", "action": "raise", "match": rng.choice(names), "token": str(tokens / "model_raise")},
        # The last part (shards are dispatched in order): written after the hang was noticed and
        # while the second driver meets a running job; the run stops there and the next resumes.
        {"point": "write", "action": "enospc", "match": f"part-{shards - 1:05d}",
         "token": str(tokens / "enospc")},
        *({"point": "read", "action": "read_failed", "match": name} for name in unreadable),
    ]
    injected: Counter[str] = Counter()
    _orphan_upload(config.output, endpoint)
    injected["orphan_multipart_upload"] = 1
    runs = 0
    disrupt = _Disruptions(cluster, config)
    with _fault_plan(plan):
        while runs < MAX_RUNS:
            runs += 1
            disrupt.replace_node()
            try:
                result = run_job(config, disrupt)
            except JobStopped as stopped:
                injected["output_full_stops"] += 1
                injected["hung_replicas"] += stopped.hung
                continue
            injected["read_failed_rows"] = result.error_codes.get("read_failed", 0)
            injected["hung_replicas"] += result.hung_replicas
            if result.complete:
                break
    for rule in plan:
        if rule.get("token"):
            injected[f"plan_{Path(rule['token']).name}"] = len(list(tokens.glob(Path(rule["token"]).name + ".*")))
    runs += 1
    disrupt.replace_node()
    try:
        retried = run_job(config.model_copy(update={"retry_errors": True}))
    finally:
        disrupt.finish()
    injected["rows_retried"] = retried.rows_retried
    injected.update(disrupt.injected)
    return injected, runs


class _Disruptions:
    """A job observer that starts a second driver while the first run runs, and loses a node (with a
    replica on it) as the second run starts; the lost node is replaced before the next run, as a
    cluster's autoscaler would.

    The node goes in the second run, not the first, so that it cannot take the hung replica with it.
    """

    def __init__(self, cluster: Any, config: JobConfig) -> None:
        self.cluster, self.config = cluster, config
        self.node: Any = None
        self.lost = False
        self.injected: Counter[str] = Counter()
        self.runs = 0
        self.second: threading.Thread | None = None

    def replace_node(self) -> None:
        if self.node is None:
            # Without the fault plan: a node's processes would keep it after it is lifted.
            with _fault_plan(None):
                self.node = self.cluster.add_node(num_cpus=2)
            self.cluster.wait_for_nodes()

    def started(self, *args: Any) -> None:
        self.runs += 1
        if self.second is None:
            self.second = threading.Thread(target=self._second_driver, daemon=True)
            self.second.start()
        elif self.runs == 2 and not self.lost and self.node is not None:
            self.cluster.remove_node(self.node)
            self.node, self.lost = None, True
            self.injected["node_lost"] += 1

    def shard_done(self, stats: Any) -> None:
        pass

    def shard_failed(self, failure: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # other progress calls a runner makes
        return lambda *args, **kwargs: None

    def _second_driver(self) -> None:
        try:
            run_job(self.config)
            self.injected["second_driver_not_refused"] += 1
        except LeaseHeld:
            self.injected["second_driver_refused"] += 1

    def finish(self) -> None:
        if self.second is not None:
            self.second.join(timeout=600)
        if self.node is not None:
            self.cluster.remove_node(self.node)
            self.node = None


def _orphan_upload(output: str, endpoint: str) -> None:
    """A multipart upload of a part begun and never finished, as a driver killed mid-upload leaves it."""
    import boto3

    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint)
    key = join_uri(prefix, "parts/part-00000.parquet")
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * (5 << 20))


@contextmanager
def _fault_plan(plan: list[dict[str, Any]] | None):
    """LOUPE_FAULTS set to `plan` (unset for None) within the block."""
    before = os.environ.get(ENV)
    if plan is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = json.dumps(plan)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


@contextmanager
def _cluster(cluster: Any):
    if cluster is not None:
        yield cluster
        return
    with local_cluster(nodes=2) as own:
        yield own


def _rows(output: str, endpoint: str) -> list[dict[str, Any]]:
    storage = open_storage(output, endpoint)
    manifest = read_manifest(storage, output)
    rows = []
    for part in manifest.parts:
        with storage.open_seekable(join_uri(output, part["path"])) as handle:
            rows += pq.read_table(handle, columns=["image_id", "status", "error_code", "caption", "moderation"]).to_pylist()
    return rows


def _compare(
    clean: list[dict], rows: list[dict], images: int, seed: int, injected: Counter[str], runs: int, seconds: float
) -> ChaosReport:
    want = {r["image_id"]: r for r in clean}
    got: dict[str, dict] = {}
    for row in rows:
        got.setdefault(row["image_id"], row)
    differing, delta, notes = 0, 0.0, []
    for image_id, row in got.items():
        expected = want.get(image_id)
        if expected is None or [row[k] for k in ("status", "error_code", "caption")] != [
            expected[k] for k in ("status", "error_code", "caption")
        ]:
            differing += 1
            keys = ("status", "error_code", "caption")
            notes.append(f"{image_id}: {[row[k] for k in keys]} != {[expected[k] for k in keys] if expected else None}")
            continue
        if row["moderation"] and expected["moderation"]:
            moved = max(abs(row["moderation"][k] - expected["moderation"][k]) for k in expected["moderation"])
            delta = max(delta, moved)
            differing += moved > SCORE_TOLERANCE
    return ChaosReport(
        images=images,
        seed=seed,
        nodes=2,
        injected=dict(sorted((k, v) for k, v in injected.items() if v)),
        runs=runs,
        rows=len(rows),
        rows_lost=len(want.keys() - got.keys()),
        duplicates=len(rows) - len(got),
        rows_differing=differing,
        seconds=round(seconds, 1),
        max_score_delta=round(delta, 4),
        notes=notes[:10],
    )


def format_report(report: ChaosReport) -> str:
    """The report as the table docs/reliability.md shows."""
    lines = ["| fault | injected |", "| --- | --- |"]
    lines += [f"| {kind} | {count} |" for kind, count in report.injected.items()]
    lines += [
        "",
        f"images {report.images}, seed {report.seed}, runs {report.runs}, {report.seconds:.0f} s",
        (
            f"rows {report.rows}, rows lost {report.rows_lost}, duplicates {report.duplicates},"
            f" rows differing {report.rows_differing} (largest score change {report.max_score_delta})"
        ),
        "survived: " + ("yes" if report.survived else "NO"),
    ]
    return "\n".join(lines)
