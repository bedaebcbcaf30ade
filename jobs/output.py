"""OUTPUT on the driver: the one way to read and write its records (job, stats, failures, manifest)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from loupe.schemas.errors import UserError
from loupe.schemas.layout import (
    FAILED_DIR,
    JOB_FILE,
    MANIFEST_FILE,
    PARTS_DIR,
    STATS_DIR,
    is_leftover_temp,
    shard_id_from_path,
)
from loupe.schemas.records import JobRecord, Manifest, Record, ShardFailure, ShardStats
from loupe.workers.storage import MissingLocation, Storage, ObjectInfo, join_uri

R = TypeVar("R", bound=Record)

# Small records are fetched this many at a time (one GET each).
_READ_CONCURRENCY = 16


def read_record(storage: Storage, uri: str, cls: type[R]) -> R:
    """One record; FileNotFoundError when it is not there, DamagedOutput naming it when it does not parse."""
    return cls.from_json(storage.read_bytes(uri), source=uri)


def write_record(storage: Storage, output: str, path: str, record: Record) -> None:
    """One record at OUTPUT/path, written whole (atomic locally, one PUT on S3)."""
    storage.write_bytes(join_uri(output, path), record.to_json())


def read_job(storage: Storage, output: str) -> JobRecord:
    """OUTPUT/_job.json; a UserError when OUTPUT holds no loupe job."""
    job = find_job(storage, output)
    if job is None:
        raise UserError(f"no loupe job at {output} (no {JOB_FILE})")
    return job


def find_job(storage: Storage, output: str) -> JobRecord | None:
    """OUTPUT/_job.json, or None when there is none."""
    try:
        return read_record(storage, join_uri(output, JOB_FILE), JobRecord)
    except (FileNotFoundError, NotADirectoryError, MissingLocation):
        return None


def read_manifest(storage: Storage, output: str) -> Manifest:
    """OUTPUT/_manifest.json; a UserError saying the job has not written one yet when it is missing."""
    manifest = find_manifest(storage, output)
    if manifest is None:
        raise UserError(f"no {MANIFEST_FILE} in {output} yet: the job has not finished a run (run loupe run first)")
    return manifest


def find_manifest(storage: Storage, output: str) -> Manifest | None:
    try:
        return read_record(storage, join_uri(output, MANIFEST_FILE), Manifest)
    except (FileNotFoundError, NotADirectoryError, MissingLocation):
        return None


def write_manifest(storage: Storage, output: str, manifest: Manifest) -> None:
    """The manifest, replaced in one write: a reader sees the old one or the new one."""
    write_record(storage, output, MANIFEST_FILE, manifest)


def list_folder(storage: Storage, output: str, folder: str) -> list[ObjectInfo]:
    """Objects under an OUTPUT sub-folder; a folder not created yet holds nothing."""
    try:
        return list(storage.list(join_uri(output, folder)))
    except MissingLocation:
        return []


def done_shards(storage: Storage, output: str) -> set[int]:
    """The shards with a stats record: done."""
    return {shard_id_from_path(obj.uri) for obj in list_folder(storage, output, STATS_DIR)} - {None}  # type: ignore[return-value]


def read_stats(storage: Storage, output: str) -> list[ShardStats]:
    """Every shard stats record, in shard order."""
    return list(_read_records(storage, output, STATS_DIR, ShardStats))


def read_failures(storage: Storage, output: str) -> list[ShardFailure]:
    """Every shard failure record, in shard order."""
    return list(_read_records(storage, output, FAILED_DIR, ShardFailure))


def _read_records(storage: Storage, output: str, folder: str, cls: type[R]) -> Iterator[R]:
    found = {shard_id_from_path(o.uri): o.uri for o in list_folder(storage, output, folder)}
    uris = [found[i] for i in sorted(found.keys() - {None})]  # type: ignore[type-var]
    with ThreadPoolExecutor(max_workers=_READ_CONCURRENCY) as pool:
        yield from pool.map(lambda uri: read_record(storage, uri, cls), uris)


def sweep_leftovers(storage: Storage, output: str) -> int:
    """Delete the temp files of local writes that a killed run left half-done; how many.

    They were never renamed into place, so nothing trusts them; S3 has no such files (a PUT or
    a multipart upload is invisible until complete).
    """
    swept = 0
    for folder in (PARTS_DIR, STATS_DIR, FAILED_DIR):
        for obj in list_folder(storage, output, folder):
            if is_leftover_temp(obj.uri):
                storage.delete(obj.uri)
                swept += 1
    return swept
