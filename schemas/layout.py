"""OUTPUT's layout: every file and folder name a job writes, and the paths built from them."""

from __future__ import annotations

import re

JOB_FILE = "_job.json"
PLAN_FILE = "_plan.parquet"  # generation 1's plan; later generations' are generation_plan_path(n)
MANIFEST_FILE = "_manifest.json"
PARTS_DIR = "parts"
STATS_DIR = "_stats"
FAILED_DIR = "_failed"
INDEX_DIR = "index"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
INDEX_RECORD_FILE = "index.json"
LEASE_FILE = "_lease.json"  # who drives the job on OUTPUT (jobs/lease.py)
MATCHES_FILE = "matches/matches.parquet"  # `loupe match`: catalog images on a known-content hash list
DUPLICATES_FILE = "duplicates/duplicates.parquet"  # `loupe dedup`: image id -> group, representative
PROPAGATED_FILE = "duplicates/propagated.parquet"  # flags inherited by near-duplicates


def part_path(shard_id: int) -> str:
    return f"{PARTS_DIR}/part-{shard_id:05d}.parquet"


def stats_path(shard_id: int) -> str:
    return f"{STATS_DIR}/shard-{shard_id:05d}.json"


def failed_path(shard_id: int) -> str:
    return f"{FAILED_DIR}/shard-{shard_id:05d}.json"


PLANS_DIR = "_plans"  # the plans of a catalog's generations after the first (`loupe run --incremental`)
REMOVED_DIR = "_removed"  # per generation, the source objects found gone (their rows are hidden)


def generation_plan_path(generation: int) -> str:
    """The plan of a catalog's generation: the first is PLAN_FILE, later ones beside it."""
    return PLAN_FILE if generation <= 1 else f"{PLANS_DIR}/generation-{generation:05d}.parquet"


def removed_path(generation: int) -> str:
    """The source objects that generation found gone (or, re-planned, changed) from INPUT."""
    return f"{REMOVED_DIR}/generation-{generation:05d}.parquet"


def index_path(kind: str, name: str = "") -> str:
    """A file of the `kind` index's folder (the folder itself without a name)."""
    return f"{INDEX_DIR}/{kind}/{name}" if name else f"{INDEX_DIR}/{kind}"


_INDEX_BUILD = re.compile(r"build-(\d+)\.")


def index_build_path(kind: str, build: int, name: str) -> str:
    """A file of one numbered build of the `kind` index (index/{kind}/build-NNNNN.{name}).

    Every build writes new names and the manifest names them: a reader holding an older
    manifest still finds the very files it names, never a newer index under the same name.
    """
    return index_path(kind, f"build-{build:05d}.{name}")


def index_build_of(path: str) -> int | None:
    """The build number in an index file's name (or its local temp file's); None for the fixed
    names (index.faiss, ids.parquet, index.json) of catalogs written before builds were numbered."""
    match = _INDEX_BUILD.search(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def registered_index_files(kind: str, entry: dict) -> tuple[str, str, str]:
    """The (index, ids, record) paths a manifest's index entry names. Entries written before
    builds were numbered name no "ids": theirs is the fixed ids.parquet beside the index."""
    ids = entry.get("ids") or index_path(kind, IDS_FILE)
    return entry["path"], ids, entry.get("record") or index_path(kind, INDEX_RECORD_FILE)


_RECORD_NAME = re.compile(r"shard-(\d+)\.json")


def shard_id_from_path(path: str) -> int | None:
    """The shard number in a stats or failure record's file name; None for anything else
    (such as the temp file of a write that a killed process left behind)."""
    match = _RECORD_NAME.fullmatch(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


_PART_NAME = re.compile(r"part-(\d+)\.parquet")


def shard_id_of_part(path: str) -> int | None:
    """The shard number in a part's file name (parts/part-NNNNN.parquet); None for anything else."""
    match = _PART_NAME.fullmatch(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def is_leftover_temp(path: str) -> bool:
    """A local write's temp file (".name.<hex>.tmp") that a killed run never renamed into place."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".tmp")
