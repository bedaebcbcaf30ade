"""The shapes of the random-weight checkpoints: tiny and small for tests and CPU benchmarks, and
the public LLaVA-family checkpoints' own, layer for layer, for GPUs and meta-device tests."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from loupe.schemas.errors import UserError

FAMILIES = ("llava", "llava-next", "llava-onevision")
CLIP_FAMILY = "clip"


@dataclass(frozen=True)
class VisionShape:
    """Shape of a vision tower: CLIP for llava, llava-next and CLIP itself, SigLIP for llava-onevision."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int = 14

    def config(self) -> dict[str, Any]:
        """The vision config's fields of this shape."""
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )


@dataclass(frozen=True)
class TextShape:
    """Shape of a text model; vocab_size None means exactly the trained tokenizer's size."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None  # grouped-query attention; None for CLIP's text tower, which has none
    vocab_size: int | None = None

    def config(self, tokenizer: Any, max_positions: int) -> dict[str, Any]:
        """The text config's fields of this shape, with the tokenizer's vocabulary and special ids."""
        fields = dict(
            vocab_size=max(len(tokenizer), self.vocab_size or 0),
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=max_positions,
            # CLIP's text tower pools at the first EOS, so the ids must be the tokenizer's own.
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if self.kv_heads is not None:
            fields["num_key_value_heads"] = self.kv_heads
        return fields


@dataclass(frozen=True)
class ModelShape:
    """One row of the size table: both towers, the anyres grid, and the dtype of the saved weights."""

    vision: VisionShape
    text: TextShape
    # Tiles per side of the anyres grid (llava-next and llava-onevision), in base image sizes.
    max_tiles: int
    # OneVision pools tiled features once they exceed this many base images ("anyres_max_N").
    # Real checkpoints use 9 on a 6x6 grid; kept below the grid's capacity here as well so that
    # the pooling path, and the processor's matching token arithmetic, really run.
    onevision_max_patches: int
    dtype: str = "float32"


@dataclass(frozen=True)
class ClipShape:
    """Both CLIP towers and the shared embedding size they project to."""

    vision: VisionShape
    text: TextShape
    projection_dim: int


# 2x2 patches per tile keep image token counts tiny.
_TINY_VISION = VisionShape(hidden=32, layers=2, heads=2, intermediate=64, image_size=28)

_SHAPES: dict[str, ModelShape] = {
    # For tests: a 3x3 tile grid gives each aspect ratio its own token count, so batches need
    # real padding.
    "tiny": ModelShape(
        vision=_TINY_VISION,
        text=TextShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
        max_tiles=3,
        onevision_max_patches=4,
    ),
    # For CPU benchmarks: large enough that the model, not I/O, dominates the time per image, and
    # with a 7B-on-a-GPU balance of work: there, one image's prefill (576 image tokens) costs about
    # 1/20 of decoding 64 tokens one image at a time, since a GPU computes some 300 times faster
    # than it reads memory; a CPU only some 10 times, so the prompt is shorter to keep that
    # balance (224-pixel input in 28-pixel patches: 64 image tokens; docs/benchmarks.md).
    "small": ModelShape(
        vision=VisionShape(hidden=384, layers=4, heads=6, intermediate=1536, image_size=224, patch_size=28),
        text=TextShape(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376),
        max_tiles=2,
        onevision_max_patches=2,
    ),
}

# Full size: each family's public 7B checkpoint, layer for layer, in bfloat16 (about 14-16 GB).
# Never built on the CPU: the weights are created on a GPU (see build_random_model).
FULL_SIZE = "7b"
_CLIP_L_336 = VisionShape(hidden=1024, layers=24, heads=16, intermediate=4096, image_size=336)
_SIGLIP_384 = VisionShape(hidden=1152, layers=26, heads=16, intermediate=4304, image_size=384)
# llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 and Llama-2-7B, two-layer GELU projector.
_LLAVA_7B = ModelShape(
    vision=_CLIP_L_336,
    text=TextShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab_size=32064),
    max_tiles=3,
    onevision_max_patches=9,
    dtype="bfloat16",
)
# llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP so400m/14-384 (26 layers, no head), Qwen2-7B,
# a 6x6 anyres grid pooled beyond 9 base images ("anyres_max_9").
_ONEVISION_7B = ModelShape(
    vision=_SIGLIP_384,
    text=TextShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab_size=152128),
    max_tiles=6,
    onevision_max_patches=9,
    dtype="bfloat16",
)
_FULL_SHAPES: dict[str, ModelShape] = {
    "llava": _LLAVA_7B,
    # llava-hf/llava-v1.6-mistral-7b-hf: the same tower, Mistral-7B (grouped-query attention),
    # and LLaVA-NeXT's five anyres grids up to 3 tiles of 336 px.
    "llava-next": replace(
        _LLAVA_7B,
        text=TextShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab_size=32064),
    ),
    "llava-onevision": _ONEVISION_7B,
}
# The big public checkpoints, one family each: too big for one 80 GB GPU with a batch beside
# them (34B, 72B), they are what spreading a replica over GPUs is for. Their shapes are tested
# on the meta device; a GPU builds them like the 7B ones.
_BIG_SHAPES: dict[str, tuple[str, ModelShape]] = {
    # llava-hf/llava-1.5-13b-hf: Llama-2-13B.
    "13b": ("llava", replace(_LLAVA_7B, text=TextShape(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab_size=32064))),
    # llava-hf/llava-v1.6-34b-hf: Nous-Hermes-2-Yi-34B (grouped-query attention, 64k vocabulary).
    "34b": ("llava-next", replace(_LLAVA_7B, text=TextShape(hidden=7168, layers=60, heads=56, kv_heads=8, intermediate=20480, vocab_size=64064))),
    # llava-hf/llava-onevision-qwen2-72b-ov-hf: Qwen2-72B.
    "72b": ("llava-onevision", replace(_ONEVISION_7B, text=TextShape(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=29568, vocab_size=152128))),
}
GPU_SIZES = (FULL_SIZE, *_BIG_SHAPES)
SIZES = (*_SHAPES, *GPU_SIZES)

CLIP_SHAPES: dict[str, ClipShape] = {
    "tiny": ClipShape(
        vision=_TINY_VISION, text=TextShape(hidden=32, layers=2, heads=2, intermediate=64), projection_dim=48
    ),
    # The embedding size of the real openai/clip-vit-base-patch32, so index and Parquet sizes
    # in benchmarks are realistic.
    "small": ClipShape(
        vision=VisionShape(hidden=384, layers=4, heads=6, intermediate=1536, image_size=224, patch_size=32),
        text=TextShape(hidden=384, layers=4, heads=6, intermediate=1536),
        projection_dim=512,
    ),
}


def model_shape(family: str, size: str) -> ModelShape:
    """The shape table's row for `family` at `size`; UserError for an unknown family or size."""
    if family not in FAMILIES:
        raise UserError(
            f"unknown model family {family!r}; choose one of: {', '.join((*FAMILIES, CLIP_FAMILY))}"
        )
    if size == FULL_SIZE:
        return _FULL_SHAPES[family]
    if size in _BIG_SHAPES:
        owner, shape = _BIG_SHAPES[size]
        if family != owner:
            raise UserError(f"the {size} size is {owner}'s only (its public {size} checkpoint); not {family}")
        return shape
    if size not in _SHAPES:
        raise UserError(f"unknown model size {size!r}; choose one of: {', '.join(SIZES)}")
    return _SHAPES[size]
