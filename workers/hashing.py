"""PDQ perceptual hashes of decoded images (hex hash, quality, dihedral variants) and known-content hash lists.

The hashing is Meta's reference C++ (ThreatExchange's pdq/cpp) through `pdqhash`, its Python
bindings. `threatexchange`'s PDQ signal type was the other candidate; its hasher is the same
`pdqhash.compute` plus a hex conversion, and installing it would also bring requests, dacite,
a C extension for Levenshtein distances and a hard `faiss-cpu` requirement, which would
install a second `faiss` module over the `gpu` extra's faiss-gpu-cu12. `pdqhash` alone gives
the reference hash, its quality and the eight dihedral hashes in one pass, with numpy as its
only runtime need (it ships as source, so installing it compiles C++).

Images larger than 512 pixels a side are first resized to 512 x 512 (nearest neighbour), as the
reference photo hasher (pdq-photo-hasher) does: PDQ reduces every image to 64 x 64 anyway, and
hashing a camera frame at full size costs hundreds of milliseconds where this costs a few.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pdqhash
from loupe.schemas.errors import UserError
from loupe.workers.storage import MissingLocation, open_storage
from PIL import Image

# The reference photo hasher's working size (pdqio.cpp's DOWNSAMPLE_DIMS).
DOWNSAMPLE_SIDE = 512
# The shortest side a job decodes JPEGs at when it hashes them: a DCT-scaled decode this large
# hashes within 2 bits of the full image (at 224, up to 14 bits off; docs/benchmarks.md).
HASH_DECODE_SIDE = DOWNSAMPLE_SIDE

# The order of pdqhash.compute_dihedral's hashes: each is the hash the image would have after
# that transform, computed from the same DCT without transforming any pixel.
# The label a row gets for a match with a list entry that has none; also the flag of every match,
# kept apart from the model's categories.
KNOWN_CONTENT = "known_content"
# Header words a list may start with (a CSV export's column names).
_HEADER_WORDS = {"hash", "pdq"}
_HEX_CHARACTERS = 64

DIHEDRAL = ("original", "rotate90", "rotate180", "rotate270", "flip_x", "flip_y", "flip_plus1", "flip_minus1")


class PdqHash(NamedTuple):
    """A PDQ hash as 64 lowercase hex characters (the reference's bit order) and its quality, 0 to 100."""

    hash: str
    quality: int


class DihedralHashes(NamedTuple):
    """The hashes of an image's eight rotations and mirrors, in DIHEDRAL's order, and its quality."""

    hashes: tuple[str, ...]
    quality: int


def pdq(image: Image.Image) -> PdqHash:
    """The PDQ hash of a decoded image; an image under 5 pixels a side gets the all-zero hash, quality 0."""
    bits, quality = pdqhash.compute(_pixels(image))
    return PdqHash(_hex(bits), int(quality))


def pdq_dihedral(image: Image.Image) -> DihedralHashes:
    """The eight dihedral hashes of a query image: a mirrored or quarter-turned copy is near one of them."""
    vectors, quality = pdqhash.compute_dihedral(_pixels(image))
    return DihedralHashes(tuple(_hex(bits) for bits in vectors), int(quality))


def _pixels(image: Image.Image) -> np.ndarray:
    if image.width > DOWNSAMPLE_SIDE or image.height > DOWNSAMPLE_SIDE:
        image = image.resize((DOWNSAMPLE_SIDE, DOWNSAMPLE_SIDE), Image.Resampling.NEAREST)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _hex(bits: np.ndarray) -> str:
    # pdqhash returns the bits most significant first, as the reference's hex format prints them.
    return np.packbits(bits.astype(np.uint8)).tobytes().hex()


@dataclass(frozen=True)
class HashList:
    """Known PDQ hashes (lowercase hex) and their labels (None where the list gives none), in file order."""

    hashes: list[str]
    labels: list[str | None]
    sha256: str = ""  # of the list's bytes, as read: a job records it in its plan

    def codes(self) -> np.ndarray:
        # Imported here: the hamming module needs FAISS, which only matching does.
        from loupe.workers.index.hamming import codes_from_hex

        return codes_from_hex(self.hashes)


def parse_hash_list(text: str, source: str = "the hash list") -> HashList:
    """A list of known hashes: one per line, or `hash,label` CSV; blank lines, `#` comments and a
    `hash,label` header allowed; any other line refused with its number."""
    hashes: list[str] = []
    labels: list[str | None] = []
    for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = [f.strip() for f in next(csv.reader([stripped]))]
        if not hashes and fields[0].lower() in _HEADER_WORDS:
            continue
        value = fields[0].lower()
        if len(fields) > 2 or not _is_hash(value):
            raise UserError(
                f"{source}, line {number}: expected a PDQ hash (64 hex characters), optionally "
                f"followed by ,label; got {stripped[:80]!r}"
            )
        hashes.append(value)
        labels.append(fields[1] if len(fields) == 2 and fields[1] else None)
    if not hashes:
        raise UserError(f"{source} holds no hashes")
    return HashList(hashes, labels)


def read_hash_list(uri: str, endpoint_url: str | None = None) -> HashList:
    """The hash list at a local path or s3:// URI, with the sha256 of its bytes."""
    try:
        data = open_storage(uri, endpoint_url).read_bytes(uri)
    except (FileNotFoundError, MissingLocation):
        raise UserError(f"no hash list at {uri}") from None
    except IsADirectoryError:
        raise UserError(f"the hash list {uri} is a folder, not a file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{uri} is not a UTF-8 text file of hashes") from None
    parsed = parse_hash_list(text, uri)
    return HashList(parsed.hashes, parsed.labels, hashlib.sha256(data).hexdigest())


class KnownContent:
    """A hash list loaded once (a binary FAISS index over its hashes): the labels each image's hash matches."""

    def __init__(self, known: HashList, max_distance: int | None = None) -> None:
        from loupe.workers.index.hamming import MAX_DISTANCE, HammingIndex

        self.index = HammingIndex(known.codes())
        self.max_distance = MAX_DISTANCE if max_distance is None else max_distance
        self.labels = [label or KNOWN_CONTENT for label in known.labels]
        self.sha256 = known.sha256

    @classmethod
    def load(cls, uri: str, endpoint_url: str | None = None, sha256: str | None = None) -> KnownContent:
        """The list at `uri`; a RuntimeError if it is no longer the list whose sha256 the job recorded."""
        known = read_hash_list(uri, endpoint_url)
        if sha256 is not None and known.sha256 != sha256:
            raise RuntimeError(f"the match list {uri} changed since the job started (sha256 {known.sha256[:12]}...)")
        return cls(known)

    def match(self, hashes: Sequence[PdqHash | None]) -> list[list[str] | None]:
        """Per hash, the distinct labels of the entries within max_distance, sorted ([]: none, or a
        hash below MIN_QUALITY, which is never matched); None where there is no hash."""
        from loupe.workers.index.hamming import MIN_QUALITY, codes_from_hex

        found: list[list[str] | None] = [None if h is None else [] for h in hashes]
        rows = [i for i, h in enumerate(hashes) if h is not None and h.quality >= MIN_QUALITY]
        if not rows:
            return found
        pairs = self.index.search(codes_from_hex([hashes[i].hash for i in rows]), self.max_distance)  # type: ignore[union-attr]
        labels: dict[int, set[str]] = {}
        for query, entry in zip(pairs.query.tolist(), pairs.base.tolist()):
            labels.setdefault(rows[query], set()).add(self.labels[entry])
        for row, names in labels.items():
            found[row] = sorted(names)
        return found


def _is_hash(value: str) -> bool:
    return len(value) == _HEX_CHARACTERS and all(c in "0123456789abcdef" for c in value)
