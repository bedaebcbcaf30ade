"""Grouping a shard's images into batches: windows of the source, bucketed by prompt length."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TypeVar

from loupe.workers.models.stages import Captioning

T = TypeVar("T")

# Decoded images are grouped this many batches at a time by their prompt's length, so that a
# batch pads little (anyres models give each aspect ratio and size its own image token count).
BUCKET_BATCHES = 4


def bucketed(
    items: list[T], sizes: list[tuple[int, int]], batch_size: int, captioner: Captioning | None
) -> list[list[T]]:
    """Batches of the items (images of these sizes), those whose prompts are about as long together.

    The captioner counts each image's prompt tokens from its size; equal lengths keep their
    order, and with no captioner, or one that cannot count, the order is kept.
    """
    if captioner is not None and len(items) > batch_size:
        lengths = captioner.image_tokens(sizes)
        if lengths is not None:
            items = [item for _, item in sorted(zip(lengths, items, strict=True), key=lambda pair: pair[0])]
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter), taken as they come."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
