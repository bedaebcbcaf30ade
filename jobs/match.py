"""`loupe match`: a catalog's PDQ hashes against a list of known hashes, every match into OUTPUT/matches/."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from loupe.jobs.output import read_manifest
from loupe.schemas.errors import DamagedOutput, UserError
from loupe.schemas.layout import MATCHES_FILE
from loupe.workers.hashing import read_hash_list
from loupe.workers.index.hamming import (
    CODE_BITS,
    MAX_DISTANCE,
    Method,
    codes_from_hex,
    matchable,
    range_pairs,
)
from loupe.workers.index.threads import use_cpu_share
from loupe.workers.storage import MissingLocation, Storage, join_uri, open_storage
from loupe.workers.writer import encode_part

MATCH_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("pdq", pa.string(), nullable=False),
        pa.field("matched_hash", pa.string(), nullable=False),
        pa.field("label", pa.string()),  # null for a list without labels
        pa.field("distance", pa.int16(), nullable=False),
    ]
)


def read_catalog(storage: Storage, output: str, columns: Sequence[str], optional: Sequence[str] = ()) -> pa.Table:
    """The named columns of every part OUTPUT's manifest lists, as one table (`optional` ones where every part has them).

    A required column a part lacks is a UserError naming the task that writes it.
    """
    manifest = read_manifest(storage, output)
    present = list(optional)
    tables = []
    for part in manifest.parts:
        with storage.open_seekable(join_uri(output, part["path"])) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise UserError(
                    f"the rows in {output} have no {', '.join(missing)} column: the job ran without the task "
                    "that writes it (pdq and pdq_quality: the hash task)"
                )
            present = [c for c in present if c in names]
            tables.append(parquet.read(columns=[*columns, *present]))
    if not tables:
        return pa.table({c: pa.array([]) for c in columns})
    return pa.concat_tables([t.select([*columns, *present]) for t in tables], promote_options="default")


def catalog_codes(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of `table` that carry a PDQ hash (their positions), their (n, 32) codes and their qualities."""
    rows = np.flatnonzero(pc.is_valid(table["pdq"]).to_numpy(zero_copy_only=False))
    try:
        codes = codes_from_hex(table["pdq"].take(rows).to_pylist())
    except ValueError as exc:
        raise DamagedOutput(f"a pdq value in the catalog is not a PDQ hash ({exc})") from None
    # A hash without its quality cannot be trusted: quality 0, never matched.
    quality = np.array([q or 0 for q in table["pdq_quality"].take(rows).to_pylist()], np.int16)
    return rows, codes, quality


@dataclass
class MatchSummary:
    """What `loupe match` found: how many hashes on each side, how many matched, per label."""

    path: str
    max_distance: int
    list_hashes: int
    catalog_hashes: int  # rows with a PDQ hash
    low_quality: int  # of those, below MIN_QUALITY: never matched
    matches: int  # (image, list hash) pairs
    images_matched: int
    images_by_label: dict[str, int] = field(default_factory=dict)  # labelled entries only
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def match_catalog(
    output: str,
    list_path: str,
    max_distance: int = MAX_DISTANCE,
    endpoint_url: str | None = None,
    method: Method = "flat",
) -> MatchSummary:
    """Match every catalog hash against the list; write OUTPUT/matches/matches.parquet (replacing an
    earlier run's) and return the summary."""
    if not 0 <= max_distance <= CODE_BITS:
        raise UserError(f"--max-distance must be between 0 and {CODE_BITS}, not {max_distance}")
    started = time.perf_counter()
    storage = open_storage(output, endpoint_url)
    known = read_hash_list(list_path, endpoint_url)
    table = read_catalog(storage, output, ["image_id", "source_uri", "pdq", "pdq_quality"])
    hashed, codes, quality = catalog_codes(table)
    use_cpu_share()
    pairs = range_pairs(codes, known.codes(), max_distance, base_quality=quality, method=method)
    # One row per (image, list entry), in catalog order, nearest entry first.
    order = np.lexsort((pairs.query, pairs.distance, pairs.base))
    image_rows = hashed[pairs.base[order]].tolist()
    entries, distances = pairs.query[order].tolist(), pairs.distance[order].tolist()
    image_ids, sources, hashes = (table[c].to_pylist() for c in ("image_id", "source_uri", "pdq"))
    matched = [
        {
            "image_id": image_ids[row],
            "source_uri": sources[row],
            "pdq": hashes[row],
            "matched_hash": known.hashes[entry],
            "label": known.labels[entry],
            "distance": distance,
        }
        for row, entry, distance in zip(image_rows, entries, distances)
    ]
    uri = join_uri(output, MATCHES_FILE)
    storage.write_bytes(uri, encode_part(matched, MATCH_SCHEMA))
    by_label: dict[str, set[int]] = {}
    for row, entry in zip(image_rows, entries):
        if known.labels[entry] is not None:
            by_label.setdefault(known.labels[entry], set()).add(row)
    return MatchSummary(
        path=uri,
        max_distance=max_distance,
        list_hashes=len(known.hashes),
        catalog_hashes=len(codes),
        low_quality=int(np.count_nonzero(~matchable(quality, len(quality)))),
        matches=len(pairs),
        images_matched=len(set(image_rows)),
        images_by_label={label: len(found) for label, found in sorted(by_label.items())},
        seconds=round(time.perf_counter() - started, 3),
    )


def read_matches(storage: Storage, output: str) -> pa.Table | None:
    """OUTPUT/matches/matches.parquet, or None before `loupe match` has run."""
    try:
        with storage.open_seekable(join_uri(output, MATCHES_FILE)) as handle:
            return pq.read_table(handle)
    except (FileNotFoundError, MissingLocation):
        return None

