"""Real photos for the known-content tests (scikit-image's public-domain samples), their edits, and a catalog of their hashes."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pyarrow as pa
import skimage.data
from PIL import Image, ImageEnhance, ImageOps

from loupe.schemas.layout import MANIFEST_FILE, part_path
from loupe.schemas.records import Manifest
from loupe.workers.hashing import PdqHash, pdq
from loupe.workers.writer import encode_part

# Six unrelated photographs: a portrait, a street scene, a cat, a cup, coins, a rocket launch.
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket")
# A real photo whose PDQ quality is below 50 (34: a motion-blurred clock): never to be matched.
LOW_QUALITY_PHOTO = "clock"


def _jpeg(image: Image.Image, quality: int = 50) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, fraction: float = 0.05) -> Image.Image:
    dx, dy = int(image.width * fraction), int(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "jpeg50": _jpeg,
    "brightness": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "mirror": ImageOps.mirror,
    "quarter_turn": lambda im: im.rotate(90, expand=True),
    "crop": _crop,  # 5% off every side
}
# The edits whose copy's plain PDQ hash stays within 31 of the original's.
SURVIVED = ("resize", "jpeg50", "brightness")
# The edits matched only through the original's dihedral hashes.
DIHEDRAL_EDITS = ("mirror", "quarter_turn")
# PDQ does not survive a crop: 5% off each side moves the hash 78 to 132 bits on these photos.
NOT_SURVIVED = ("crop",)


@cache
def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as an RGB image (grayscale ones converted)."""
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@cache
def edited(name: str, edit: str) -> Image.Image:
    """The photo after one of EDITS; "original" for the photo itself."""
    return photo(name) if edit == "original" else EDITS[edit](photo(name))


def distance(a: str, b: str) -> int:
    """Hamming distance of two hex hashes, computed independently of the code under test."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


@cache
def hashed(name: str, edit: str) -> PdqHash:
    """The PDQ hash of a photo after an edit (or "original")."""
    return pdq(edited(name, edit))


def catalog_rows() -> list[dict]:
    """Catalog rows as a job with the hash task writes them: each photo and every edit of it, the
    low-quality photo and a JPEG copy of it, and an error row without a hash."""
    keys = [(name, edit) for name in PHOTOS for edit in ("original", *EDITS)]
    keys += [(LOW_QUALITY_PHOTO, "original"), (LOW_QUALITY_PHOTO, "jpeg50")]
    rows = [
        {
            "image_id": f"{name}-{edit}",
            "source_uri": f"s3://photos/{name}/{edit}.jpg",
            "status": "ok",
            "pdq": hashed(name, edit).hash,
            "pdq_quality": hashed(name, edit).quality,
        }
        for name, edit in keys
    ]
    broken = {"image_id": "broken", "source_uri": "s3://photos/broken.jpg", "status": "error"}
    return [*rows, {**broken, "pdq": None, "pdq_quality": None}]


def write_catalog(output: Path, rows: list[dict], parts: int = 2) -> None:
    """Rows split over Parquet parts under OUTPUT/parts/ and the manifest that lists them, as a finished job leaves them."""
    parts_written = []
    for shard_id in range(parts):
        data = encode_part(rows[shard_id::parts], _catalog_schema(rows))
        path = part_path(shard_id)
        (output / path).parent.mkdir(parents=True, exist_ok=True)
        (output / path).write_bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        count = len(rows[shard_id::parts])
        parts_written.append({"path": path, "shard_id": shard_id, "rows": count, "sha256": sha256, "bytes": len(data)})
    manifest = Manifest(
        complete=True,
        shards_total=parts,
        rows_ok=sum(r["status"] == "ok" for r in rows),
        rows_error=sum(r["status"] == "error" for r in rows),
        parts=parts_written,
        failed_shards=[],
        listing_sha256="0" * 64,
        written_at="2026-01-01T00:00:00Z",
    )
    (output / MANIFEST_FILE).write_bytes(manifest.to_json())


def _catalog_schema(rows: list[dict]) -> pa.Schema:
    types = {
        "image_id": pa.string(),
        "source_uri": pa.string(),
        "status": pa.string(),
        "pdq": pa.string(),
        "pdq_quality": pa.int16(),
        "flagged_categories": pa.list_(pa.string()),
        "matched_labels": pa.list_(pa.string()),
        "image_embedding": pa.list_(pa.float32()),
    }
    return pa.schema([pa.field(name, kind) for name, kind in types.items() if name in rows[0]])
