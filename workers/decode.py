"""Bytes to a fully loaded RGB image, or a DecodeError with a reason code; never a crash."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from loupe.schemas.codes import ErrorCode
from loupe.schemas.errors import one_line

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Limits on the header's dimensions, checked before any pixel is decoded. The pixel budget is
# Pillow's Image.MAX_IMAGE_PIXELS (read at call time, so a caller may tune it). Model
# preprocessors scale the shorter side to a few hundred pixels: at 50:1 that already makes a
# ~17,000-pixel strip, and beyond it the "image" is a banner, a spacer or a forged header.
# A side over 2^15 (twice WebP's own cap of 16383) is refused even within the pixel budget:
# no model input needs it, and it keeps one-pixel-thin headers out if the ratio is ever raised.
MAX_SIDE = 32768
MAX_ASPECT_RATIO = 50.0

# Once, at import: the warnings filter list is process-wide, and catch_warnings() per call
# would race between decode threads. The explicit pixel check in decode_image does not rely on
# this (pytest, for one, resets filters around each test).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # registers every plugin now, so identifying unsupported formats below is read-only


class DecodeError(Exception):
    """Why these bytes are not a usable image: a reason code and a short human message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def decode_image(data: bytes, *, min_side: int | None = None) -> Image.Image:
    """Decode to a fully loaded RGB image (first frame, EXIF orientation applied).

    With `min_side`, a JPEG larger than needed is decoded at a reduced scale (libjpeg's DCT
    scaling, 1/2 to 1/8) that keeps both sides at least `min_side`: a fraction of the work for
    a camera photo headed for a 336-pixel model input. See decode_sized for the original size.
    """
    return decode_sized(data, min_side=min_side)[0]


def decode_sized(data: bytes, *, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """decode_image, and the image's full (width, height) as oriented, whatever scale it was decoded at."""
    if not data:
        raise DecodeError(ErrorCode.EMPTY, "zero bytes")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(ErrorCode.DECOMPRESSION_BOMB, one_line(exc, 200)) from None
    except Exception as exc:  # a plugin choking on a damaged header
        raise DecodeError(ErrorCode.TRUNCATED, f"corrupt header ({one_line(exc, 200)})") from None
    header = im.size
    _check_dimensions(*header)
    if min_side:
        # Both sides kept at min_side or more, so a 90-degree EXIF turn cannot leave one short.
        im.draft(None, (min_side, min_side))  # JPEG only; a no-op for every other format
    try:
        im.load()  # the first frame only: animations are not advanced
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(ErrorCode.DECOMPRESSION_BOMB, one_line(exc, 200)) from None
    except Exception as exc:  # OSError "image file is truncated", broken zlib/JPEG data, ...
        raise DecodeError(ErrorCode.TRUNCATED, f"corrupt or truncated data ({one_line(exc, 200)})") from None
    loaded = im.size
    with contextlib.suppress(Exception):  # a malformed EXIF block must not cost a good image
        ImageOps.exif_transpose(im, in_place=True)
    size = header if im.size == loaded else (header[1], header[0])
    try:
        return _to_rgb(im), size
    except Exception as exc:  # a pixel mode Pillow cannot convert
        raise DecodeError(
            ErrorCode.UNSUPPORTED_FORMAT, f"cannot convert mode {im.mode} ({one_line(exc, 200)})"
        ) from None


def needed_side(image_processor: Any) -> int | None:
    """The shortest side an image can be decoded at without changing what this processor does with it.

    A processor that scales the shorter side to S and crops (LLaVA-1.5, CLIP) or resizes to S x S
    needs S pixels a side; an anyres one (LLaVA-NeXT, OneVision) needs its largest grid's side,
    since both its choice of grid and the tiles it cuts depend on the full resolution up to that.
    None where the rule is unknown (a longest-edge or pixel-budget processor): decode in full.
    """
    sides = [max(pinpoint) for pinpoint in getattr(image_processor, "image_grid_pinpoints", None) or ()]
    for attribute in ("size", "crop_size"):
        spec = getattr(image_processor, attribute, None)
        if spec is None:
            continue
        read = spec.get if isinstance(spec, dict) else (lambda key, spec=spec: getattr(spec, key, None))
        if any(read(key) for key in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")):
            return None
        sides += [value for key in ("shortest_edge", "height", "width") if (value := read(key))]
    return max(sides) if sides else None


def _check_dimensions(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(ErrorCode.BAD_DIMENSIONS, f"{width}x{height}: a side is zero")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise DecodeError(ErrorCode.DECOMPRESSION_BOMB, f"{width}x{height} is more than {limit} pixels")
    if max(width, height) > MAX_SIDE:
        raise DecodeError(ErrorCode.BAD_DIMENSIONS, f"{width}x{height}: a side is over {MAX_SIDE}")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise DecodeError(
            ErrorCode.BAD_DIMENSIONS, f"{width}x{height}: aspect ratio over {MAX_ASPECT_RATIO:g}:1"
        )


def _unidentified(data: bytes) -> DecodeError:
    # Only the plugins' signature checks run here, never a parser: parsing a format we refuse
    # is exactly the risk the allow-list avoids.
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        verdict = accept(prefix) if accept else False
        if not verdict or isinstance(verdict, str):
            continue
        if name in ALLOWED_FORMATS:
            # Pillow refuses, at identification, both damaged headers and a side of zero.
            return DecodeError(ErrorCode.TRUNCATED, f"{name} signature but an unreadable header")
        return DecodeError(ErrorCode.UNSUPPORTED_FORMAT, f"{name} images are not accepted")
    return DecodeError(ErrorCode.NOT_AN_IMAGE, "not a recognised image format")


def _to_rgb(im: Image.Image) -> Image.Image:
    im = _to_8_bits(im)
    if im.has_transparency_data:  # P with tRNS, LA, RGBA, PA, ...: flatten onto white
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def _to_8_bits(im: Image.Image) -> Image.Image:
    # Pillow's own conversions from 16/32-bit and float clip at 255, which turns an ordinary
    # 16-bit photo white. 16-bit has a known range; for I and F only the data can tell.
    if im.mode.startswith("I;16"):
        lo, hi = 0, 65535
        im = im.convert("I")
    elif im.mode in ("I", "F"):
        lo, hi = im.getextrema()
    else:
        return im
    scale = 255 / (hi - lo) if hi > lo else 0.0
    return im.point(lambda v: (v - lo) * scale).convert("L")
