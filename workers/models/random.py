"""Random-weight LLaVA-family and CLIP checkpoints built offline that load exactly like real ones."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from loupe.schemas.errors import UserError
from loupe.workers.models.random_tokenizers import CHAT_TEMPLATES, TOKENIZERS, train_tokenizer

T = TypeVar("T")

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
# llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 and Llama-2-7B, two-layer GELU projector.
_LLAVA_7B = ModelShape(
    vision=_CLIP_L_336,
    text=TextShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab_size=32064),
    max_tiles=3,
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
    # llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP so400m/14-384 (26 layers, no head), Qwen2-7B,
    # a 6x6 anyres grid pooled beyond 9 base images ("anyres_max_9").
    "llava-onevision": ModelShape(
        vision=VisionShape(hidden=1152, layers=26, heads=16, intermediate=4304, image_size=384),
        text=TextShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab_size=152128),
        max_tiles=6,
        onevision_max_patches=9,
        dtype="bfloat16",
    ),
}
SIZES = (*_SHAPES, FULL_SIZE)

_CLIP_SHAPES: dict[str, ClipShape] = {
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
    if size not in _SHAPES:
        raise UserError(f"unknown model size {size!r}; choose one of: {', '.join(SIZES)}")
    return _SHAPES[size]


def random_model_config(family: str, size: str):
    """The transformers config that build_random_model writes for `family` and `size` (no weights)."""
    return _build_config(family, model_shape(family, size), train_tokenizer(TOKENIZERS[family]))


def parameter_count(family: str, size: str) -> int:
    """Parameters of the random checkpoint of `family` and `size`, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForImageTextToText

    config = random_model_config(family, size)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build_random_model(
    dest: str | Path, family: str, size: str = "tiny", seed: int = 0, device: str | None = None
) -> Path:
    """Write a random-weight checkpoint of `family` and `size` to `dest` and return `dest`.

    Config, safetensors weights, tokenizer, image processor and chat template are written
    with transformers' own save_pretrained, so the checkpoint loads with AutoProcessor and
    AutoModelForImageTextToText like any checkpoint from the hub ("clip": build_random_clip).
    The same arguments always produce the same files.

    tiny and small are built on the CPU. The 7b size is created directly on a CUDA GPU in
    bfloat16 (`device`, default the current GPU) and refused without one: its float32 copy
    alone would be 28 GB of host memory.
    """
    if family == CLIP_FAMILY:
        return build_random_clip(dest, size, seed)
    import torch
    from transformers import AutoModelForImageTextToText

    shape = model_shape(family, size)
    target = _full_size_device(family, shape, device) if size == FULL_SIZE else None
    tokenizer = train_tokenizer(TOKENIZERS[family])
    processor = _build_processor(family, shape, tokenizer)
    config = _build_config(family, shape, tokenizer)
    dtype = getattr(torch, shape.dtype)
    model = _seeded(seed, target, lambda: AutoModelForImageTextToText.from_config(config, dtype=dtype))
    _mute_unreadable_tokens(model, tokenizer)
    _save(Path(dest), model, processor)
    if target is not None:
        del model
        torch.cuda.empty_cache()
    return Path(dest)


def build_random_clip(dest: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight CLIPModel and CLIPProcessor to `dest` and return `dest`.

    They load with CLIPModel / CLIPProcessor.from_pretrained like openai/clip-vit-base-patch32;
    the same arguments always produce the same files.
    """
    if size not in _CLIP_SHAPES:
        raise UserError(f"unknown model size {size!r}; choose one of: {', '.join(_CLIP_SHAPES)}")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    shape = _CLIP_SHAPES[size]
    spec = TOKENIZERS[CLIP_FAMILY]
    tokenizer = train_tokenizer(spec)
    config = CLIPConfig(
        text_config=shape.text.config(tokenizer, spec.model_max_length),
        vision_config=shape.vision.config(),
        projection_dim=shape.projection_dim,
    )
    model = _seeded(seed, None, lambda: CLIPModel(config))
    side = shape.vision.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
    )
    _save(Path(dest), model, processor)
    return Path(dest)


def _full_size_device(family: str, shape: ModelShape, device: str | None):
    """The CUDA GPU the 7B checkpoint is created on, with room for it; UserError where there is none."""
    import torch

    from loupe.workers.models.loading import resolve_device

    gigabytes = parameter_count(family, FULL_SIZE) * getattr(torch, shape.dtype).itemsize / 1e9
    if not torch.cuda.is_available():
        raise UserError(
            f"the {FULL_SIZE} checkpoint is built on a CUDA GPU (about {gigabytes:.0f} GB in {shape.dtype}) "
            "and none is available here; use a GPU machine, or --size small on a CPU"
        )
    target = resolve_device(device)
    if target.type != "cuda":
        raise UserError(f"the {FULL_SIZE} checkpoint is built on a CUDA GPU, not on {device!r}")
    free, _ = torch.cuda.mem_get_info(target)
    if free < gigabytes * 1.1e9:
        raise UserError(
            f"the {FULL_SIZE} checkpoint needs about {gigabytes * 1.1:.0f} GB free on {target}, "
            f"{free / 1e9:.0f} GB are free"
        )
    return target


def _seeded(seed: int, device: Any, make: Callable[[], T]) -> T:
    """make() with weights drawn from `seed` alone, on `device` (None: the CPU); callers' RNG state is untouched."""
    import torch

    with torch.random.fork_rng(devices=[device] if device is not None else []):
        with torch.device(device) if device is not None else contextlib.nullcontext():
            torch.manual_seed(seed)
            return make()


def _save(dest: Path, model: Any, processor: Any) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    # Shards small enough that saving a 7B model copies a few GB at a time to host memory, not the
    # whole model; smaller ones stay one file.
    model.save_pretrained(dest, max_shard_size="2GB")
    processor.save_pretrained(dest)


def _mute_unreadable_tokens(model, tokenizer) -> None:
    """Zero the output rows of special tokens (but EOS), bare bytes, spaces and unused ids.

    Random logits are centred on zero with a maximum well above it, so a zero row never wins
    the argmax: captions stay made of word pieces and never contain `<image>` or chat markers,
    while EOS can still end a caption the way it does in a real model.
    """
    import torch

    lm_head = model.get_output_embeddings().weight
    readable = torch.zeros(lm_head.shape[0], dtype=torch.bool)
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        readable[token_id] = token_id == tokenizer.eos_token_id or (
            token_id not in special and "\ufffd" not in text and any(c.isalnum() for c in text)
        )
    with torch.no_grad():
        lm_head[~readable.to(lm_head.device)] = 0.0


# ---------------------------------------------------------------------------------------
# LLaVA-family configs and processors


def _grid_pinpoints(base: int, max_tiles: int, family: str) -> list[list[int]]:
    """The family's anyres resolutions, as (height, width), scaled to `base` and capped at max_tiles."""
    if family == "llava-next":
        grid = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]  # LLaVA-NeXT's own grid, in tiles
    else:
        grid = list(itertools.product(range(1, 7), repeat=2))  # OneVision's: every h x w up to 6x6
    return [[h * base, w * base] for h, w in grid if max(h, w) <= max_tiles]


def _build_processor(family: str, shape: ModelShape, tokenizer):
    from transformers import (
        LlavaImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        LlavaProcessor,
    )

    size = shape.vision.image_size
    template = CHAT_TEMPLATES[family]
    if family == "llava":
        return LlavaProcessor(
            image_processor=LlavaImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            ),
            tokenizer=tokenizer,
            patch_size=shape.vision.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token
            chat_template=template,
        )
    pinpoints = _grid_pinpoints(size, shape.max_tiles, family)
    if family == "llava-next":
        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                size={"shortest_edge": size},
                crop_size={"height": size, "width": size},
                image_grid_pinpoints=pinpoints,
            ),
            tokenizer=tokenizer,
            patch_size=shape.vision.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": size, "width": size}),
        num_image_tokens=(size // shape.vision.patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{shape.onevision_max_patches}",
        chat_template=template,
    )

def _build_config(family: str, shape: ModelShape, tokenizer):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text, vision = shape.text.config(tokenizer, max_positions=8192), shape.vision.config()
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    tokens_per_tile = (shape.vision.image_size // shape.vision.patch_size) ** 2
    if family == "llava":
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**vision),
            text_config=LlamaConfig(**text),
            image_token_index=image_token,
            image_seq_length=tokens_per_tile,
        )
    pinpoints = _grid_pinpoints(shape.vision.image_size, shape.max_tiles, family)
    if family == "llava-next":
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision),
            # As in llava-v1.6-mistral-7b-hf: a Mistral text model, no sliding window.
            text_config=MistralConfig(sliding_window=None, **text),
            image_token_index=image_token,
            image_grid_pinpoints=pinpoints,
            image_seq_length=tokens_per_tile,
        )
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(vision_use_head=False, **vision),
        text_config=Qwen2Config(**text),
        image_token_index=image_token,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=f"anyres_max_{shape.onevision_max_patches}",
    )
