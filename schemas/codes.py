"""Reason codes of error rows; every code a row can carry is declared here."""

from enum import Enum


class ErrorCode(str, Enum):
    """Why an image became an error row (documented in docs/architecture.md)."""

    # Throttling, 5xx, a body cut mid-stream or a timeout that outlived every retry: worth retrying later.
    READ_FAILED = "read_failed"
    # Permanent answers from storage, given at once without retrying:
    NOT_FOUND = "not_found"  # no such file or object (deleted since the listing; NoSuchKey, 404)
    ACCESS_DENIED = "access_denied"  # the store or the file system refused the read (AccessDenied, 403)
    EMPTY = "empty_file"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # no decoder recognises the bytes (random bytes, text, ...)
    UNSUPPORTED_FORMAT = "unsupported_format"  # an image format loupe refuses to open (FITS, PSD, ...)
    TRUNCATED = "truncated"  # the header parses but the pixel data ends early or is corrupt
    DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than Pillow's MAX_IMAGE_PIXELS
    BAD_DIMENSIONS = "bad_dimensions"  # a side is 0, absurdly long, or the aspect ratio is absurd
    MISSING_IMAGE = "missing_image"  # a WebDataset sample or Parquet row has no image bytes
    MODEL_FAILED = "model_failed"  # the model raised on this image alone


# Codes that a later run may clear by trying the image again (`loupe run --retry-errors`): a
# passing storage fault or a model failure, not a property of the file.
TRANSIENT_CODES = frozenset({ErrorCode.READ_FAILED, ErrorCode.MODEL_FAILED})
