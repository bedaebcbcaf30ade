"""Random-weight LLaVA-family and CLIP checkpoints built offline that load exactly like real ones."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from loupe.schemas.errors import UserError
from loupe.workers.models.random_shapes import (
    CLIP_FAMILY,
    CLIP_SHAPES,
    FAMILIES,
    FULL_SIZE,
    GPU_SIZES,
    SIZES,
    ModelShape,
    model_shape,
)
from loupe.workers.models.random_tokenizers import (
    CHAT_TEMPLATES,
    TOKENIZERS,
    train_tokenizer,
)

__all__ = ["CLIP_FAMILY", "FAMILIES", "FULL_SIZE", "GPU_SIZES", "SIZES", "build_random_clip", "build_random_model", "meta_model", "model_shape", "parameter_count", "random_model_config"]

T = TypeVar("T")

def random_model_config(family: str, size: str):
    """The transformers config that build_random_model writes for `family` and `size` (no weights).

    GPU sizes set their vocabulary size, so their shape is known without training the tokenizer;
    their special token ids then differ from a built checkpoint's, their shape does not.
    """
    shape = model_shape(family, size)
    tokenizer = _ShapeOnlyVocab() if size in GPU_SIZES else train_tokenizer(TOKENIZERS[family])
    return _build_config(family, shape, tokenizer)


def meta_model(family: str, size: str):
    """The random checkpoint's model of `family` and `size` on the meta device: every shape, no memory."""
    import torch

    from loupe.workers.models.devices import meta_model as empty_model

    return empty_model(random_model_config(family, size), getattr(torch, model_shape(family, size).dtype))


def parameter_count(family: str, size: str) -> int:
    """Parameters of the random checkpoint of `family` and `size`, counted on the meta device (no memory)."""
    return sum(p.numel() for p in meta_model(family, size).parameters())


class _ShapeOnlyVocab:
    """Stands for a tokenizer where only the config's shape matters: no tokens, fixed special ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<image>": 3, "<video>": 4}[token]


def build_random_model(
    dest: str | Path, family: str, size: str = "tiny", seed: int = 0, device: str | None = None
) -> Path:
    """Write a random-weight checkpoint of `family` and `size` to `dest` and return `dest`.

    Config, safetensors weights, tokenizer, image processor and chat template are written
    with transformers' own save_pretrained, so the checkpoint loads with AutoProcessor and
    AutoModelForImageTextToText like any checkpoint from the hub ("clip": build_random_clip).
    The same arguments always produce the same files.

    tiny and small are built on the CPU. The GPU sizes (7b, and the 13b/34b/72b of one family
    each) are created directly on a CUDA GPU in bfloat16 (`device`, default the current GPU) and
    refused without one: the 7B's float32 copy alone would be 28 GB of host memory.
    """
    if family == CLIP_FAMILY:
        return build_random_clip(dest, size, seed)
    import torch
    from transformers import AutoModelForImageTextToText

    shape = model_shape(family, size)
    target = _full_size_device(family, size, shape, device) if size in GPU_SIZES else None
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


def build_random_clip(dest: str | Path, size: str = "tiny", seed: int = 0, projection_dim: int | None = None) -> Path:
    """Write a random-weight CLIPModel and CLIPProcessor to `dest` and return `dest`.

    They load with CLIPModel / CLIPProcessor.from_pretrained like openai/clip-vit-base-patch32;
    the same arguments always produce the same files. `projection_dim` overrides the size's
    vector width (768 is ViT-L/14's).
    """
    if size not in CLIP_SHAPES:
        raise UserError(f"unknown model size {size!r}; choose one of: {', '.join(CLIP_SHAPES)}")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    shape = CLIP_SHAPES[size]
    spec = TOKENIZERS[CLIP_FAMILY]
    tokenizer = train_tokenizer(spec)
    config = CLIPConfig(
        text_config=shape.text.config(tokenizer, spec.model_max_length),
        vision_config=shape.vision.config(),
        projection_dim=projection_dim or shape.projection_dim,
    )
    model = _seeded(seed, None, lambda: CLIPModel(config))
    side = shape.vision.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
    )
    _save(Path(dest), model, processor)
    return Path(dest)


def _full_size_device(family: str, size: str, shape: ModelShape, device: str | None):
    """The CUDA GPU a GPU-size checkpoint is created on, with room for it; UserError where there is none."""
    import torch
    from loupe.workers.models.loading import resolve_device

    gigabytes = parameter_count(family, size) * getattr(torch, shape.dtype).itemsize / 1e9
    if not torch.cuda.is_available():
        raise UserError(
            f"the {size} checkpoint is built on a CUDA GPU (about {gigabytes:.0f} GB in {shape.dtype}) "
            "and none is available here; use a GPU machine, or --size small on a CPU"
        )
    target = resolve_device(device)
    if target.type != "cuda":
        raise UserError(f"the {size} checkpoint is built on a CUDA GPU, not on {device!r}")
    free, _ = torch.cuda.mem_get_info(target)
    if free < gigabytes * 1.1e9:
        raise UserError(
            f"the {size} checkpoint needs about {gigabytes * 1.1:.0f} GB free on {target}, "
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
