"""Generates the poison-image corpus: files that break naive decoders, each with its expected outcome."""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, features

from loupe.schemas.codes import ErrorCode


@dataclass(frozen=True)
class Expect:
    """What decode_image should do with a file: give an RGB image of `size`, or fail with `code`."""

    size: tuple[int, int] | None = None
    code: ErrorCode | None = None


def ok(width: int, height: int) -> Expect:
    return Expect(size=(width, height))


def fail(code: ErrorCode) -> Expect:
    return Expect(code=code)


def _encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _photo(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    # Noise, so that codecs produce real pixel data worth truncating.
    rng = random.Random(size[0] * 7919 + size[1])
    im = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    return im.convert(mode)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming any size, with one tiny IDAT: a few dozen bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def gradient16(size: tuple[int, int] = (256, 32)) -> Image.Image:
    """A 16-bit grayscale left-to-right ramp over the full 0..65535 range."""
    width, height = size
    row = [round(x * 65535 / (width - 1)) for x in range(width)]
    im = Image.new("I;16", size)
    im.frombytes(struct.pack(f"<{width * height}H", *(row * height)))
    return im


def make_poison_corpus(folder: Path) -> dict[str, Expect]:
    """Write the corpus into `folder`; returns, per file name, what decoding it must give."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[bytes, Expect]] = {}

    def add(name: str, data: bytes, expect: Expect) -> None:
        files[name] = (data, expect)

    jpeg = _encode(_photo((64, 48)), "JPEG", quality=90)
    png = _encode(_photo((64, 48)), "PNG")
    add("normal.jpg", jpeg, ok(64, 48))
    add("empty.jpg", b"", fail(ErrorCode.EMPTY))
    add(
        "random.bin",
        bytes(random.Random(7).getrandbits(8) for _ in range(4096)),
        fail(ErrorCode.NOT_AN_IMAGE),
    )
    add(
        "text.jpg",
        b"this is not a jpeg, it is a text file with a .jpg name\n" * 4,
        fail(ErrorCode.NOT_AN_IMAGE),
    )
    add("truncated.jpg", jpeg[: len(jpeg) // 2], fail(ErrorCode.TRUNCATED))
    add("truncated.png", png[: len(png) // 2], fail(ErrorCode.TRUNCATED))
    # Both sides of Pillow's limit: over 2x MAX_IMAGE_PIXELS it raises DecompressionBombError,
    # between 1x and 2x only a DecompressionBombWarning that loupe must turn into a refusal.
    add("bomb.png", _png_header_only(20000, 20000), fail(ErrorCode.DECOMPRESSION_BOMB))
    add("bomb_warning_zone.png", _png_header_only(10000, 10000), fail(ErrorCode.DECOMPRESSION_BOMB))
    add("wide_65000x1.png", _png_header_only(65000, 1), fail(ErrorCode.BAD_DIMENSIONS))
    add("tall_1x40000.png", _png_header_only(1, 40000), fail(ErrorCode.BAD_DIMENSIONS))
    add(
        "banner_2000x20.png",
        _encode(Image.new("RGB", (2000, 20), "red"), "PNG"),
        fail(ErrorCode.BAD_DIMENSIONS),
    )
    # Pillow rejects a zero side while identifying the file, like any other broken header.
    add("zero_width.png", _png_header_only(0, 10), fail(ErrorCode.TRUNCATED))
    add("cmyk.jpg", _encode(_photo((40, 30), "CMYK"), "JPEG"), ok(40, 30))
    add("gray16.png", _encode(gradient16(), "PNG"), ok(256, 32))
    add("gray16.tif", _encode(gradient16(), "TIFF"), ok(256, 32))
    add("float32.tif", _encode(gradient16().convert("F"), "TIFF"), ok(256, 32))

    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    ImageDraw.Draw(palette).rectangle((0, 0, 15, 31), fill=1)
    add("palette_transparent.png", _encode(palette, "PNG", transparency=0), ok(32, 32))
    add("la.png", _encode(Image.new("LA", (20, 10), (128, 100)), "PNG"), ok(20, 10))
    add("rgba.png", _encode(Image.new("RGBA", (20, 10), (0, 0, 255, 0)), "PNG"), ok(20, 10))
    add("bilevel.png", _encode(Image.new("1", (24, 8), 1), "PNG"), ok(24, 8))

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    add("exif_rotated.jpg", _encode(_photo((40, 20)), "JPEG", exif=exif), ok(20, 40))

    frames = [Image.new("RGB", (30, 20), color) for color in ("red", "lime", "blue")]
    add(
        "animated.gif",
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        ok(30, 20),
    )
    add("plain.bmp", _encode(_photo((33, 17)), "BMP"), ok(33, 17))
    if features.check("webp"):
        add("plain.webp", _encode(_photo((50, 40)), "WEBP"), ok(50, 40))
    add("icon.ico", _encode(_photo((32, 32)), "ICO"), fail(ErrorCode.UNSUPPORTED_FORMAT))
    add("image.ppm", _encode(_photo((8, 8)), "PPM"), fail(ErrorCode.UNSUPPORTED_FORMAT))

    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: expect for name, (_, expect) in files.items()}
