"""What the per-shard pipeline relies on from a model stage: one small Protocol per role.

The model classes meet them, and so do test stand-ins and stages that hand their work to
another process. A class that names its role's Protocol as a base takes the defaults of what
it does not define: no torch in this process, images decoded in full, no shared prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


@dataclass
class Encoded:
    """What a generate() call leaves on the device: its prompt and the KV cache of prompt and output.

    The moderator reads the image prefix's keys and values from it instead of encoding the
    image a second time.
    """

    input_ids: torch.Tensor  # (images, width), left-padded
    attention_mask: torch.Tensor  # (images, width)
    cache: Any  # a transformers Cache: the prompt's keys and values, then the generated tokens'


class Stage(Protocol):
    """What the pipeline asks of every stage besides its work: where that work runs."""

    # The device its calls run torch on; None where they run none in this process (a test's
    # stand-in, a stage handing its batches to another replica).
    device: torch.device | None = None


class ImageStage(Stage, Protocol):
    """A stage reading images: prepare() on the CPU ahead of time, then its model call on the batch."""

    # The side images can be decoded down to without changing what prepare() makes of them;
    # None: decode in full.
    decode_side: int | None = None

    def prepare(self, images: list[Image.Image]) -> Any:
        """The batch's model inputs, made on the CPU; thread-safe."""
        ...


class Captioning(ImageStage, Protocol):
    """Captions batches of images."""

    def generate(self, inputs: Any) -> list[str]:
        """One caption per prepared image, in order."""
        ...

    def generate_encoded(self, inputs: Any) -> tuple[list[str], Encoded]:
        """generate(), also returning what it left on the device; called only for a moderator that reads it."""
        raise NotImplementedError(f"{type(self).__name__} keeps no encoded prompt")

    def image_tokens(self, sizes: list[tuple[int, int]]) -> list[int] | None:
        """Prompt tokens each image of (width, height) takes; None where unknown (batches are not bucketed)."""
        return None


class Moderating(ImageStage, Protocol):
    """Scores batches of images against the job's taxonomy: P(Yes) per category."""

    def score(self, prepared: Any) -> list[dict[str, float]]:
        """Scores per category for each prepared image, in order."""
        ...

    def reads_prefix_of(self, captioner: Captioning | None) -> bool:
        """Whether score_encoded() reads this captioner's generation cache instead of prepare() and score()."""
        return False

    def score_encoded(self, encoded: Encoded) -> list[dict[str, float]]:
        """score() for the images the captioner this stage reads_prefix_of has just captioned."""
        raise NotImplementedError(f"{type(self).__name__} reads no captioner's cache")


class ImageEmbedding(ImageStage, Protocol):
    """Embeds batches of images as unit vectors."""

    dim: int

    def embed(self, prepared: Any) -> np.ndarray:
        """(images, dim) float32 unit vectors for a prepared batch."""
        ...


class TextEmbedding(Stage, Protocol):
    """Embeds captions (or a source's own text) as unit vectors."""

    dim: int

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(texts, dim) float32 unit vectors."""
        ...
