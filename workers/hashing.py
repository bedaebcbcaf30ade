"""PDQ perceptual hashes of decoded images: the 256-bit hash as 64 hex characters, its quality, its dihedral variants.

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

from typing import NamedTuple

import numpy as np
import pdqhash
from PIL import Image

# The reference photo hasher's working size (pdqio.cpp's DOWNSAMPLE_DIMS).
DOWNSAMPLE_SIDE = 512

# The order of pdqhash.compute_dihedral's hashes: each is the hash the image would have after
# that transform, computed from the same DCT without transforming any pixel.
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
