"""PDQ on real photographs: a re-upload's edits match within 31 bits, crops do not, different photos never do.

Measured with Pillow 13 and pdqhash 0.2.8 on the six photos (astronaut, camera, chelsea, coffee,
coins, rocket), distance of each edited copy's hash to the original's:
resize to half 6-22, JPEG quality 50 0-4, brightness x1.3 2-12; a mirror 116-132 and a quarter
turn 120-136 plainly, but 6-18 to the nearest of the original's dihedral hashes; a 5% crop of
each side 78-132 (78-114 to the nearest dihedral hash): PDQ does not survive crops (a 2% crop
measured 28-52: a slight trim is at the edge of what matches). Different photos, edited copies
included, are 104 or more apart.
"""

from __future__ import annotations

import itertools

import numpy as np
import pdqhash
import pytest
from PIL import Image

from loupe.workers.hashing import DIHEDRAL, PdqHash, pdq, pdq_dihedral
from loupe.workers.index.hamming import MAX_DISTANCE, MIN_QUALITY
from tests.photos import (
    DIHEDRAL_EDITS,
    LOW_QUALITY_PHOTO,
    NOT_SURVIVED,
    PHOTOS,
    SURVIVED,
    distance,
    edited,
    hashed,
    photo,
)


def test_hash_is_64_hex_characters_and_a_quality():
    result = pdq(photo("astronaut"))
    assert len(result.hash) == 64 and result.hash == result.hash.lower()
    int(result.hash, 16)
    assert result.quality == 100
    assert pdq(photo("astronaut")) == result


def test_hash_is_the_reference_bits_most_significant_first():
    image = photo("chelsea")  # 451 x 300: hashed as decoded
    bits, quality = pdqhash.compute(np.asarray(image))
    assert pdq(image) == (f"{int(''.join(map(str, bits)), 2):064x}", quality)


def test_grayscale_and_rgb_give_the_same_hash():
    gray = photo("camera").convert("L")
    assert pdq(gray) == pdq(gray.convert("RGB"))


@pytest.mark.parametrize("name", PHOTOS)
def test_edits_pdq_survives_match_within_31(name):
    original = pdq(photo(name))
    for edit in SURVIVED:
        copy = pdq(edited(name, edit))
        assert copy.quality >= MIN_QUALITY
        assert distance(original.hash, copy.hash) <= MAX_DISTANCE, edit


@pytest.mark.parametrize("name", PHOTOS)
def test_mirror_and_quarter_turn_match_through_the_dihedral_hashes(name):
    original = pdq(photo(name))
    dihedral = pdq_dihedral(photo(name))
    assert dihedral.hashes[0] == original.hash and dihedral.quality == original.quality
    for edit, variant in zip(DIHEDRAL_EDITS, ("flip_y", "rotate90")):
        copy = pdq(edited(name, edit)).hash
        assert distance(original.hash, copy) > MAX_DISTANCE, f"{edit} should need the dihedral hashes"
        distances = [distance(h, copy) for h in dihedral.hashes]
        assert min(distances) <= MAX_DISTANCE, edit
        assert DIHEDRAL[distances.index(min(distances))] == variant


@pytest.mark.parametrize("name", PHOTOS)
def test_a_small_crop_is_not_survived(name):
    dihedral = pdq_dihedral(photo(name)).hashes
    for edit in NOT_SURVIVED:
        copy = pdq(edited(name, edit)).hash
        assert min(distance(h, copy) for h in dihedral) > MAX_DISTANCE


def test_different_photos_do_not_match():
    hashes = {(name, edit): pdq(edited(name, edit)).hash for name in PHOTOS for edit in ("original", *SURVIVED)}
    for (a, ha), (b, hb) in itertools.combinations(hashes.items(), 2):
        if a[0] != b[0]:
            assert distance(ha, hb) > 3 * MAX_DISTANCE, (a, b)


def test_a_large_image_is_hashed_at_512_a_side_as_the_reference_hasher_does():
    large = photo("astronaut").resize((1536, 1536), Image.Resampling.BICUBIC)
    assert pdq(large) == pdq(large.resize((512, 512), Image.Resampling.NEAREST))
    assert distance(pdq(large).hash, pdq(photo("astronaut")).hash) <= MAX_DISTANCE


def test_featureless_images_get_a_low_quality():
    assert pdq(photo(LOW_QUALITY_PHOTO)).quality < MIN_QUALITY  # a motion-blurred clock: 34
    assert pdq(Image.new("RGB", (300, 200), (90, 120, 200))).quality < MIN_QUALITY
    tiny = pdq(Image.new("RGB", (4, 4), (255, 0, 0)))
    assert tiny == ("0" * 64, 0)


def test_known_content_labels_each_hash_once_and_never_a_low_quality_one():
    from loupe.workers.hashing import KNOWN_CONTENT, HashList, KnownContent

    original = hashed("astronaut", "original")
    near = hashed("astronaut", "brightness")
    known = KnownContent(HashList([original.hash, near.hash, "5a" * 32], ["list-a", None, "other"]))
    low = PdqHash(original.hash, 10)
    found = known.match([original, hashed("coffee", "original"), None, low])
    assert found == [sorted(["list-a", KNOWN_CONTENT]), [], None, []]
    assert KnownContent(HashList([original.hash], [None]), max_distance=0).match([near]) == [[]]


def test_a_read_list_carries_the_sha256_of_its_bytes(tmp_path):
    import hashlib

    from loupe.workers.hashing import read_hash_list

    data = ("5a" * 32 + ",x\n").encode()
    (tmp_path / "l.csv").write_bytes(data)
    assert read_hash_list(str(tmp_path / "l.csv")).sha256 == hashlib.sha256(data).hexdigest()
