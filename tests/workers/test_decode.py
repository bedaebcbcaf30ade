"""decode_image against the poison corpus: every file gives an RGB image or the right reason code."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from PIL import Image

from loupe.schemas.codes import ErrorCode
from loupe.workers.decode import DecodeError, decode_image, decode_sized, needed_side
from tests.poison import make_poison_corpus

# pytest resets warning filters around each test; restore the one decode installs at import, so
# these tests see what production sees.
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("poison")
    return folder, make_poison_corpus(folder)


def _names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return sorted(make_poison_corpus(Path(folder)))


@pytest.mark.parametrize("name", _names())
def test_poison(corpus, name):
    folder, expected = corpus
    expect = expected[name]
    data = (folder / name).read_bytes()
    if expect.code is not None:
        with pytest.raises(DecodeError) as caught:
            decode_image(data)
        assert caught.value.code == expect.code, caught.value.message
        assert caught.value.message and "\n" not in caught.value.message
    else:
        im = decode_image(data)
        assert im.mode == "RGB"
        assert im.size == expect.size
        im.tobytes()  # fully loaded: no file handle or lazy decoder behind it


def test_16_bit_is_scaled_not_saturated(corpus):
    folder, _ = corpus
    for name in ("gray16.png", "gray16.tif", "float32.tif"):
        im = decode_image((folder / name).read_bytes()).convert("L")
        row = [im.getpixel((x, 0)) for x in range(im.width)]
        assert row[0] == 0 and row[-1] == 255, name
        assert 120 <= row[im.width // 2] <= 135, name  # the ramp's middle is mid-grey, not white
        assert row == sorted(row), name


def test_transparency_is_flattened_onto_white(corpus):
    folder, _ = corpus
    im = decode_image((folder / "palette_transparent.png").read_bytes())
    assert im.getpixel((0, 0)) == (0, 0, 255)  # opaque palette entry
    assert im.getpixel((31, 0)) == (255, 255, 255)  # transparent index
    assert decode_image((folder / "rgba.png").read_bytes()).getpixel((0, 0)) == (255, 255, 255)


def test_first_frame_of_animation(corpus):
    folder, _ = corpus
    assert decode_image((folder / "animated.gif").read_bytes()).getpixel((5, 5)) == (255, 0, 0)


def test_pixel_limit_holds_without_the_warnings_filter(corpus, monkeypatch):
    # Another library may reset the process's warning filters; the header check still refuses.
    folder, _ = corpus
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    with pytest.raises(DecodeError, match="10000x10000 is more than") as caught:
        decode_image((folder / "bomb_warning_zone.png").read_bytes())
    assert caught.value.code == ErrorCode.DECOMPRESSION_BOMB
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 - 1)  # read at call time, not import
    with pytest.raises(DecodeError) as caught:
        decode_image((folder / "normal.jpg").read_bytes())
    assert caught.value.code == ErrorCode.DECOMPRESSION_BOMB


def test_bomb_warning_is_an_error_outside_pytest(corpus):
    # pytest swaps the warnings filters around every test, so check the import-time filter in a
    # fresh interpreter: Pillow's own DecompressionBombWarning must refuse the image.
    folder, _ = corpus
    code = (
        "import sys; from loupe.workers.decode import decode_image, DecodeError\n"
        "try: decode_image(open(sys.argv[1], 'rb').read())\n"
        "except DecodeError as e: print(e.code.value, e.message)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder / "bomb_warning_zone.png")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("decompression_bomb DecompressionBombWarning"), out


def test_decoding_from_many_threads(corpus):
    folder, expected = corpus
    items = [((folder / name).read_bytes(), expect) for name, expect in expected.items()]
    failures: list[str] = []

    def work() -> None:
        for data, expect in items * 3:
            try:
                got = decode_image(data).size
            except DecodeError as exc:
                got = exc.code
            if got not in (expect.size, expect.code):
                failures.append(f"{expect} -> {got}")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def _jpeg(size: tuple[int, int], orientation: int | None = None) -> bytes:
    image = Image.radial_gradient("L").resize(size).convert("RGB")
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize(
    ("size", "min_side", "decoded"),
    [
        ((1600, 1200), 224, (400, 300)),  # a quarter still covers 224 on both sides
        ((1600, 1200), 336, (800, 600)),  # a quarter would leave 300 < 336: a half
        ((640, 480), 336, (640, 480)),  # no smaller scale keeps 336: in full
        ((1600, 1200), None, (1600, 1200)),
    ],
)
def test_jpeg_decoded_at_the_smallest_scale_that_covers_min_side(size, min_side, decoded):
    image, full = decode_sized(_jpeg(size), min_side=min_side)
    assert image.mode == "RGB" and image.size == decoded and full == size


def test_reduced_decode_reports_the_oriented_full_size():
    # EXIF orientation 6: stored 1600x1200, shown turned a quarter, 1200x1600.
    image, full = decode_sized(_jpeg((1600, 1200), orientation=6), min_side=224)
    assert full == (1200, 1600) and image.size == (300, 400)


def test_min_side_leaves_other_formats_alone():
    out = io.BytesIO()
    Image.new("RGB", (900, 700), "red").save(out, "PNG")
    image, full = decode_sized(out.getvalue(), min_side=100)
    assert image.size == full == (900, 700)


def test_needed_side_follows_the_processor():
    from types import SimpleNamespace

    crop = SimpleNamespace(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert needed_side(crop) == 336
    anyres = SimpleNamespace(size={"shortest_edge": 336}, image_grid_pinpoints=[[336, 672], [1008, 336]])
    assert needed_side(anyres) == 1008
    square = SimpleNamespace(size={"height": 384, "width": 384})
    assert needed_side(square) == 384
    assert needed_side(SimpleNamespace(size={"longest_edge": 1024})) is None  # rule unknown: in full
    assert needed_side(SimpleNamespace()) is None
