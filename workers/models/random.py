"""Random-weight LLaVA-family and CLIP checkpoints built offline that load exactly like real ones."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from pathlib import Path

from loupe.schemas.errors import UserError

FAMILIES = ("llava", "llava-next", "llava-onevision")


@dataclass(frozen=True)
class VisionShape:
    """Shape of the vision tower: CLIP for llava and llava-next, SigLIP for llava-onevision."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int = 14


@dataclass(frozen=True)
class TextShape:
    """Shape of the language model; vocab_size None means exactly the trained tokenizer's size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_size: int | None = None


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


_SHAPES: dict[str, ModelShape] = {
    # For tests: 2x2 patches per tile keep image token counts tiny, while a 3x3 tile grid still
    # gives each aspect ratio its own token count, so batches need real padding.
    "tiny": ModelShape(
        vision=VisionShape(hidden=32, layers=2, heads=2, intermediate=64, image_size=28),
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
    shape = model_shape(family, size)
    tokenizer = _train_tokenizer(_TOKENIZERS[family])
    return _build_config(family, shape, tokenizer, max(len(tokenizer), shape.text.vocab_size or 0))


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
    shape = model_shape(family, size)
    if size == FULL_SIZE:
        return _build_full_size(Path(dest), family, shape, seed, device)
    import torch
    from transformers import AutoModelForImageTextToText

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(_TOKENIZERS[family])
    processor = _build_processor(family, shape, tokenizer)
    vocab_size = max(len(tokenizer), shape.text.vocab_size or 0)
    config = _build_config(family, shape, tokenizer, vocab_size)
    # A private RNG stream: the weights depend on `seed` alone, and callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, shape.dtype))
    _mute_unreadable_tokens(model, tokenizer)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


def _build_full_size(dest: Path, family: str, shape: ModelShape, seed: int, device: str | None) -> Path:
    """The 7B checkpoint, its weights created on the GPU in their saved dtype and never on the CPU."""
    import torch
    from transformers import AutoModelForImageTextToText

    gigabytes = parameter_count(family, FULL_SIZE) * getattr(torch, shape.dtype).itemsize / 1e9
    if not torch.cuda.is_available():
        raise UserError(
            f"the {FULL_SIZE} checkpoint is built on a CUDA GPU (about {gigabytes:.0f} GB in {shape.dtype}) "
            "and none is available here; use a GPU machine, or --size small on a CPU"
        )
    try:
        target = torch.device(device or "cuda")
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r}; use e.g. cuda or cuda:1") from exc
    if target.type != "cuda":
        raise UserError(f"the {FULL_SIZE} checkpoint is built on a CUDA GPU, not on {device!r}")
    target = torch.device("cuda", target.index if target.index is not None else torch.cuda.current_device())
    free, _ = torch.cuda.mem_get_info(target)
    if free < gigabytes * 1.1e9:
        raise UserError(
            f"the {FULL_SIZE} checkpoint needs about {gigabytes * 1.1:.0f} GB free on {target}, "
            f"{free / 1e9:.0f} GB are free"
        )
    tokenizer = _train_tokenizer(_TOKENIZERS[family])
    processor = _build_processor(family, shape, tokenizer)
    config = _build_config(family, shape, tokenizer, max(len(tokenizer), shape.text.vocab_size or 0))
    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[target]), torch.device(target):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, shape.dtype))
    _mute_unreadable_tokens(model, tokenizer)
    # Shards small enough that saving copies a few GB at a time to host memory, not the whole model.
    model.save_pretrained(dest, max_shard_size="2GB")
    processor.save_pretrained(dest)
    del model
    torch.cuda.empty_cache()
    return dest


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
# Tokenizer

_COLOURS = (
    "red orange yellow green blue purple pink brown black white grey golden silver beige teal "
    "navy maroon olive crimson violet turquoise ivory amber bronze copper cream"
).split()
_OBJECTS = (
    "dog cat bird horse cow sheep goat pig duck chicken rabbit deer bear fox wolf lion tiger "
    "elephant giraffe zebra monkey fish whale dolphin turtle frog snake butterfly bee spider owl "
    "eagle parrot car truck bicycle motorcycle scooter boat ship train bus plane helicopter rocket "
    "tractor wagon tree flower bush rose tulip sunflower cactus palm leaf mushroom grass house "
    "building tower castle church temple bridge tunnel mountain hill valley river lake ocean sea "
    "beach island desert forest jungle waterfall volcano glacier cave chair table sofa bed desk "
    "shelf cabinet mirror cup mug glass bottle plate bowl spoon fork knife pan kettle book "
    "newspaper magazine phone laptop computer keyboard camera television radio lamp candle window "
    "door wall roof floor stairs road street path sidewalk child woman man girl boy baby family "
    "crowd player musician chef farmer teacher doctor soldier dancer guitar piano violin drum kite "
    "ball umbrella clock watch sign fence gate field cloud sky sun moon star rainbow storm garden "
    "kitchen bathroom bedroom office classroom library museum market shop restaurant cafe station "
    "airport harbor stadium playground bench statue fountain pizza sandwich cake apple banana "
    "orange grape lemon bread cheese salad soup coffee tea hat shirt dress jacket shoe bag "
    "backpack scarf glove suitcase basket box toy doll robot balloon flag map painting poster"
).split()
_ADJECTIVES = (
    "small large old new bright dark wet dry sunny cloudy rainy snowy foggy quiet busy empty "
    "crowded wooden metal plastic glass stone tall short tiny huge round square long narrow wide "
    "shiny dusty clean dirty colorful striped spotted fluffy smooth rough soft hard warm cold "
    "modern ancient rustic elegant simple fancy broken happy sleepy curious playful calm"
).split()
_VERBS = (
    "sits stands lies runs walks jumps rests waits flies floats hangs leans grows shines plays "
    "eats drinks reads sleeps swims climbs rides holds carries looks smiles watches crosses "
    "glows moves stays turns"
).split()
_PLACES = (
    "on the grass|in the park|near the water|under a tree|on a table|in the snow|at night|"
    "in the city|by the window|on the road|in a field|at the beach|in the kitchen|on a hill|"
    "in the morning|at sunset|during the day|in the rain|next to a wall|behind a fence|"
    "in front of a house|inside a room|on the shelf|along the river|across the street|"
    "in the distance|in the background|in the foreground|on the left|on the right"
).split("|")
_OPENERS = (
    "A photo of|An image of|A picture showing|A close up of|There is|This image shows|A view of|"
    "A photograph of|A painting of|A drawing of|A scene with|Here we see"
).split("|")
_NUMBERS = "one two three four five six seven eight nine ten several many few some".split()
# Every word the captioner's prompts and the chat templates use, so prompts encode as word
# pieces the way they do with a real tokenizer rather than as single characters.
_PROMPT_TEXT = (
    "USER: ASSISTANT: [INST] [/INST] system user assistant You are a helpful assistant. "
    "Describe this image in one or two sentences. What is shown in this image? "
    "Does the image show it? Answer Yes or No. yes no"
)
_VOCAB_SIZE = 1536


def _moderation_lines() -> list[str]:
    """The moderator's questions about the default categories, answered "Yes" or "No".

    Real tokenizers have "Yes" and "No" as single tokens both bare (an answer's first word,
    after the assistant's chat marker) and after a space; the moderator reads their logits.
    """
    from loupe.schemas.taxonomy import DEFAULT_TAXONOMY

    lines = []
    for category in DEFAULT_TAXONOMY.categories:
        question = f"Answer Yes or No. Does this image show {category.definition}?"
        lines += [f"{question}\nassistant\nYes", f"{question}\nassistant\nNo", f"{question} Yes. {question} No."]
    return lines


def _corpus() -> list[str]:
    """A few hundred simple English sentences about objects, colours and scenes."""
    rng = random.Random(1234)  # fixed: the tokenizer is the same whatever the weights' seed
    lines = [_PROMPT_TEXT] * 20 + _moderation_lines()
    lines += [" ".join(words) for words in (_COLOURS, _OBJECTS, _ADJECTIVES, _VERBS, _NUMBERS)]
    for _ in range(600):
        lines.append(
            f"{rng.choice(_OPENERS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_COLOURS)} "
            f"{rng.choice(_OBJECTS)} that {rng.choice(_VERBS)} {rng.choice(_PLACES)}. "
            f"The {rng.choice(_OBJECTS)} is {rng.choice(_COLOURS)} and {rng.choice(_ADJECTIVES)},\n"
            f"with {rng.choice(_NUMBERS)} {rng.choice(_OBJECTS)}s {rng.choice(_PLACES)}."
        )
    return lines


@dataclass(frozen=True)
class _TokenizerSpec:
    byte_level: bool  # Qwen2's byte-level BPE; otherwise Llama/Mistral's metaspace BPE
    bos: str | None  # prepended to every encoded text when set, as Llama tokenizers do
    eos: str
    pad: str
    unk: str | None
    extra_special: tuple[str, ...]


_TOKENIZERS = {
    "llava": _TokenizerSpec(False, "<s>", "</s>", "<pad>", "<unk>", ("<image>",)),
    "llava-next": _TokenizerSpec(False, "<s>", "</s>", "<pad>", "<unk>", ("<image>",)),
    "llava-onevision": _TokenizerSpec(
        True, None, "<|im_end|>", "<|endoftext|>", None, ("<|im_start|>", "<image>", "<video>")
    ),
}


def _train_tokenizer(spec: _TokenizerSpec):
    """Train a small BPE tokenizer on the built-in corpus, shaped like the family's real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import TokenizersBackend

    named = (spec.unk, spec.bos, spec.eos, spec.pad)
    special = list(dict.fromkeys(t for t in (*named, *spec.extra_special) if t))
    if spec.byte_level:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend = Tokenizer(models.BPE(unk_token=spec.unk))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        # Printable ASCII and newline: any English prompt encodes without <unk>.
        alphabet = [chr(c) for c in range(33, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    if spec.bos:
        bos_id = backend.token_to_id(spec.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
        )
    roles = {"eos_token": spec.eos, "pad_token": spec.pad, "bos_token": spec.bos, "unk_token": spec.unk}
    tokenizer = TokenizersBackend(tokenizer_object=backend, **{k: v for k, v in roles.items() if v})
    # Chat markers are listed as additional special tokens, as in Qwen2's own tokenizer config.
    markers = [t for t in spec.extra_special if t not in ("<image>", "<video>")]
    if markers:
        tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer


# ---------------------------------------------------------------------------------------
# Chat templates of llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf and
# llava-hf/llava-onevision-qwen2-*-ov-hf, so prompts render exactly as with real weights.

_CHAT_TEMPLATES = {
    "llava": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
        "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
        "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "llava-next": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
        "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
        "{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
        "message['content'][0]['text'] + '<\\\\s> '}}{% else %}{{ raise_exception('Only user and assistant "
        "roles are supported!') }}{% endif %}{% endfor %}"
    ),
    "llava-onevision": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
        "{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
        "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
        "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
}


# ---------------------------------------------------------------------------------------
# Configs and processors


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
    template = _CHAT_TEMPLATES[family]
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


def _build_config(family: str, shape: ModelShape, tokenizer, vocab_size: int):
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

    v, t = shape.vision, shape.text
    text = dict(
        vocab_size=vocab_size,
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        hidden_size=v.hidden,
        intermediate_size=v.intermediate,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    tokens_per_tile = (v.image_size // v.patch_size) ** 2
    if family == "llava":
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**vision),
            text_config=LlamaConfig(**text),
            image_token_index=image_token,
            image_seq_length=tokens_per_tile,
        )
    pinpoints = _grid_pinpoints(v.image_size, shape.max_tiles, family)
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


# ---------------------------------------------------------------------------------------
# CLIP: the image and text towers behind image embeddings and text-to-image search

CLIP_FAMILY = "clip"


@dataclass(frozen=True)
class ClipShape:
    """Both CLIP towers and the shared embedding size they project to."""

    vision: VisionShape
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    projection_dim: int
    max_text_length: int = 77  # CLIP's context length


_CLIP_SHAPES: dict[str, ClipShape] = {
    "tiny": ClipShape(
        vision=VisionShape(hidden=32, layers=2, heads=2, intermediate=64, image_size=28),
        text_hidden=32,
        text_layers=2,
        text_heads=2,
        text_intermediate=64,
        projection_dim=48,
    ),
    # The embedding size of the real openai/clip-vit-base-patch32, so index and Parquet sizes
    # in benchmarks are realistic.
    "small": ClipShape(
        vision=VisionShape(hidden=384, layers=4, heads=6, intermediate=1536, image_size=224, patch_size=32),
        text_hidden=384,
        text_layers=4,
        text_heads=6,
        text_intermediate=1536,
        projection_dim=512,
    ),
}


def build_random_clip(dest: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight CLIPModel and CLIPProcessor to `dest` and return `dest`.

    They load with CLIPModel / CLIPProcessor.from_pretrained like openai/clip-vit-base-patch32;
    the same arguments always produce the same files.
    """
    if size not in _CLIP_SHAPES:
        raise UserError(f"unknown model size {size!r}; choose one of: {', '.join(_CLIP_SHAPES)}")
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    shape = _CLIP_SHAPES[size]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_clip_tokenizer(shape.max_text_length)
    v = shape.vision
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_intermediate,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            max_position_embeddings=shape.max_text_length,
            # The text tower pools at the first EOS, so it must be the tokenizer's own id.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=v.hidden,
            intermediate_size=v.intermediate,
            num_hidden_layers=v.layers,
            num_attention_heads=v.heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
        ),
        projection_dim=shape.projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size}
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


def _train_clip_tokenizer(max_length: int):
    """A small lower-casing byte-level BPE framed as CLIP's: <|startoftext|> text <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import TokenizersBackend

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))],
    )
    # As in openai's CLIP tokenizer, padding is EOS; the text tower pools at the first one.
    return TokenizersBackend(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        unk_token=eos,
        model_max_length=max_length,
    )
