"""`loupe dedup` and `loupe moderation propagate`: near-duplicate groups into OUTPUT/duplicates/, and the flags they share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from loupe.jobs.match import catalog_codes, read_catalog, read_matches
from loupe.schemas.errors import UserError
from loupe.schemas.layout import DUPLICATES_FILE, PROPAGATED_FILE
from loupe.workers.hashing import KNOWN_CONTENT
from loupe.workers.index.hamming import CODE_BITS, MAX_DISTANCE, Method, self_pairs
from loupe.workers.index.library import faiss
from loupe.workers.index.threads import use_cpu_share
from loupe.workers.storage import MissingLocation, Storage, join_uri, open_storage
from loupe.workers.writer import encode_part

IMAGE_THRESHOLD = 0.95

# Only images with at least one near-duplicate are listed: an image not in the file is alone.
DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("group_id", pa.int64(), nullable=False),  # groups numbered in their representatives' order
        pa.field("representative", pa.string(), nullable=False),  # the image_id that stands for the group
        pa.field("group_size", pa.int32(), nullable=False),
    ]
)
PROPAGATED_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("flag", pa.string(), nullable=False),  # a moderation category, or known_content
        pa.field("from_image_ids", pa.list_(pa.string()), nullable=False),  # the group's copies that carry it
        pa.field("group_id", pa.int64(), nullable=False),
    ]
)


@dataclass
class DedupSummary:
    """How `loupe dedup` grouped the catalog."""

    path: str
    images: int
    hashed: int  # rows with a PDQ hash (low-quality ones included, though they never pair)
    with_vectors: int  # rows with an image vector
    pdq_pairs: int
    vector_pairs: int
    groups: int
    duplicates: int  # images in a group that are not its representative
    largest_group: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dedup(
    output: str,
    pdq_distance: int = MAX_DISTANCE,
    image_threshold: float | None = IMAGE_THRESHOLD,
    endpoint_url: str | None = None,
    method: Method = "flat",
) -> DedupSummary:
    """Group near-duplicates: PDQ hashes within `pdq_distance`, or image vectors with cosine of at
    least `image_threshold` (None: PDQ alone), joined transitively. Writes OUTPUT/duplicates/duplicates.parquet.

    The representative of a group is its image of highest PDQ quality, then smallest image_id.
    """
    if not 0 <= pdq_distance <= CODE_BITS:
        raise UserError(f"--pdq-distance must be between 0 and {CODE_BITS}, not {pdq_distance}")
    if image_threshold is not None and not -1.0 <= image_threshold <= 1.0:
        raise UserError(f"--image-threshold is a cosine, between -1 and 1, not {image_threshold}")
    started = time.perf_counter()
    storage = open_storage(output, endpoint_url)
    table = read_catalog(storage, output, ["image_id", "pdq", "pdq_quality"], optional=["image_embedding"])
    image_ids = table["image_id"].to_pylist()
    hashed, codes, quality = catalog_codes(table)
    use_cpu_share()
    found = self_pairs(codes, pdq_distance, quality=quality, method=method)
    edges = [(hashed[found.query], hashed[found.base])]
    vector_rows, vector_pairs = np.empty(0, np.int64), 0
    if image_threshold is not None:
        vector_rows, vectors = _image_vectors(table)
        first, second = _cosine_pairs(vectors, image_threshold)
        edges.append((vector_rows[first], vector_rows[second]))
        vector_pairs = len(first)

    row_quality = np.full(len(image_ids), -1, np.int16)
    row_quality[hashed] = quality
    groups = _groups(len(image_ids), edges, sort_key=lambda row: (-int(row_quality[row]), image_ids[row]))
    listed = [
        {
            "image_id": image_ids[row],
            "group_id": group_id,
            "representative": image_ids[members[0]],
            "group_size": len(members),
        }
        for group_id, members in enumerate(groups)
        for row in sorted(members, key=image_ids.__getitem__)
    ]
    storage.write_bytes(join_uri(output, DUPLICATES_FILE), encode_part(listed, DUPLICATE_SCHEMA))
    return DedupSummary(
        path=join_uri(output, DUPLICATES_FILE),
        images=len(image_ids),
        hashed=len(codes),
        with_vectors=len(vector_rows),
        pdq_pairs=len(found),
        vector_pairs=vector_pairs,
        groups=len(groups),
        duplicates=len(listed) - len(groups),
        largest_group=max((len(m) for m in groups), default=0),
        seconds=round(time.perf_counter() - started, 3),
    )


def read_duplicates(storage: Storage, output: str) -> pa.Table:
    """OUTPUT/duplicates/duplicates.parquet; a UserError before `loupe dedup` has run."""
    table = find_duplicates(storage, output)
    if table is None:
        raise UserError(f"no near-duplicate groups in {output} yet: run loupe dedup first")
    return table


def find_duplicates(storage: Storage, output: str) -> pa.Table | None:
    """OUTPUT/duplicates/duplicates.parquet, or None before `loupe dedup` has run."""
    try:
        with storage.open_seekable(join_uri(output, DUPLICATES_FILE)) as handle:
            return pq.read_table(handle)
    except (FileNotFoundError, MissingLocation):
        return None


def representatives(storage: Storage, output: str) -> dict[str, str]:
    """image_id -> its group's representative, for every image with a near-duplicate ({} before
    `loupe dedup`): search shows one hit per representative unless asked for every copy."""
    table = find_duplicates(storage, output)
    if table is None:
        return {}
    return dict(zip(table["image_id"].to_pylist(), table["representative"].to_pylist()))


def group_sizes(representative_of: dict[str, str]) -> dict[str, int]:
    """representative -> the size of its group, from representatives()'s map."""
    sizes: dict[str, int] = {}
    for representative in representative_of.values():
        sizes[representative] = sizes.get(representative, 0) + 1
    return sizes


@dataclass(frozen=True)
class Inherited:
    """A flag an image inherits from the near-duplicates in its group that carry it."""

    image_id: str
    flag: str
    from_image_ids: list[str]
    group_id: int


def propagate(output: str, endpoint_url: str | None = None) -> list[Inherited]:
    """Every near-duplicate of a flagged image with each flag it inherits and from which images;
    also written to OUTPUT/duplicates/propagated.parquet.

    Flags are the model's `flagged_categories` and known_content: a row with `matched_labels`
    (matching during the job) or one that `loupe match` listed in OUTPUT/matches/.
    """
    storage = open_storage(output, endpoint_url)
    duplicates = read_duplicates(storage, output)
    flags = _flags(storage, output)
    members: dict[int, list[str]] = {}
    for image_id, group_id in zip(duplicates["image_id"].to_pylist(), duplicates["group_id"].to_pylist()):
        members.setdefault(group_id, []).append(image_id)
    inherited = []
    for group_id, images in sorted(members.items()):
        carriers: dict[str, list[str]] = {}
        for image_id in images:
            for flag in flags.get(image_id, ()):
                carriers.setdefault(flag, []).append(image_id)
        for flag, sources in sorted(carriers.items()):
            inherited += [
                Inherited(image_id, flag, sorted(sources), group_id)
                for image_id in sorted(images)
                if flag not in flags.get(image_id, ())
            ]
    rows = [asdict(item) for item in inherited]
    storage.write_bytes(join_uri(output, PROPAGATED_FILE), encode_part(rows, PROPAGATED_SCHEMA))
    return inherited


def _flags(storage: Storage, output: str) -> dict[str, set[str]]:
    table = read_catalog(storage, output, ["image_id"], optional=["flagged_categories", "matched_labels"])
    flags: dict[str, set[str]] = {}
    image_ids = table["image_id"].to_pylist()
    if "flagged_categories" in table.column_names:
        for image_id, categories in zip(image_ids, table["flagged_categories"].to_pylist()):
            if categories:
                flags.setdefault(image_id, set()).update(categories)
    if "matched_labels" in table.column_names:
        for image_id, labels in zip(image_ids, table["matched_labels"].to_pylist()):
            if labels:
                flags.setdefault(image_id, set()).add(KNOWN_CONTENT)
    matches = read_matches(storage, output)
    for image_id in matches["image_id"].to_pylist() if matches is not None else ():
        flags.setdefault(image_id, set()).add(KNOWN_CONTENT)
    return flags


def _image_vectors(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The rows with an image vector (none without the embed task) and their vectors, unit length."""
    if "image_embedding" not in table.column_names:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    column = table["image_embedding"].combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(valid)
    flat = column.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
    vectors = flat.astype(np.float32).reshape(len(rows), -1) if len(rows) else np.empty((0, 0), np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return rows, vectors


def _cosine_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of distinct rows (first < second) whose unit vectors have cosine >= threshold; exact,
    so quadratic in the rows with vectors."""
    if len(vectors) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    # FAISS keeps inner products strictly over the radius.
    lims, _, labels = index.range_search(vectors, float(np.nextafter(np.float32(threshold), np.float32(-2))))
    first = np.repeat(np.arange(len(vectors)), np.diff(lims.astype(np.int64)))
    keep = first < labels
    return first[keep], labels[keep]


def _groups(
    count: int, edges: list[tuple[np.ndarray, np.ndarray]], sort_key: Callable[[int], Any]
) -> list[list[int]]:
    """Connected components of two or more rows (union-find), each sorted by `sort_key` so its first
    row is the representative; the groups in their representatives' `sort_key` order."""
    parent = list(range(count))

    def find(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]  # path halving keeps the trees shallow
            row = parent[row]
        return row

    for first, second in edges:
        for a, b in zip(first.tolist(), second.tolist()):
            root_a, root_b = find(a), find(b)
            if root_a != root_b:
                parent[max(root_a, root_b)] = min(root_a, root_b)
    components: dict[int, list[int]] = {}
    for row in range(count):
        components.setdefault(find(row), []).append(row)
    groups = [sorted(rows, key=sort_key) for rows in components.values() if len(rows) > 1]
    return sorted(groups, key=lambda rows: sort_key(rows[0]))
