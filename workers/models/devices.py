"""Placing a model on its GPUs: the memory a batch needs beside the weights, device maps over several GPUs, precision by hardware."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loupe.schemas.errors import UserError

if TYPE_CHECKING:
    import torch

QUANTIZE = ("8bit", "4bit")
# Bytes per parameter of quantized weights (bitsandbytes keeps scales beside them).
_QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5}
# Share of a GPU's memory the model and its batch may plan on: the CUDA context, the caching
# allocator's fragmentation and other processes' contexts take the rest.
USABLE_FRACTION = 0.9
# The chat template's tokens around the prompt.
_CHAT_TOKENS = 32


@dataclass(frozen=True)
class BatchMemory:
    """What a replica holds on its GPUs: weights, and for one batch its KV cache and prefill activations."""

    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int  # keys and values of every layer, one token
    tokens: int  # one sequence: text prompt + image + generated tokens
    batch: int
    activation_bytes: int  # the prefill's largest live tensors (one layer's, as layers run in turn)

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.tokens * self.batch

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes


def image_tokens(config: Any) -> int:
    """The most tokens one image can take in a prompt of this checkpoint (anyres grids at their largest)."""
    vision = config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return int(getattr(config, "image_seq_length", per_tile) or per_tile)
    tiles = max(h * w for h, w in pinpoints) // vision.image_size**2
    limit = str(getattr(config, "vision_aspect_ratio", "") or "")
    if limit.startswith("anyres_max_"):
        tiles = min(tiles, int(limit.removeprefix("anyres_max_")))
    # The base image, the tiles, and a newline token per feature row of the grid.
    rows = int(math.isqrt(per_tile) * math.isqrt(tiles) + 1)
    return per_tile * (1 + tiles) + rows


def batch_memory(
    config: Any,
    parameters: int,
    *,
    batch_size: int,
    prompt_tokens: int,
    max_new_tokens: int,
    dtype_bytes: int = 2,
    quantize: str | None = None,
) -> BatchMemory:
    """Weights plus one batch's KV cache and prefill activations, from the checkpoint's config alone.

    KV cache: 2 (keys, values) x layers x kv_heads x head_dim x dtype bytes per token, for every
    token of every sequence. Activations of the prefill, which all of a batch's tokens go through
    at once: the MLP's two intermediate projections and four hidden-sized tensors (residual,
    norm, attention output, queries) per token, one layer at a time.
    """
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_param = _QUANTIZED_BYTES[quantize] if quantize else dtype_bytes
    tokens = prompt_tokens + image_tokens(config) + max_new_tokens
    prefill = batch_size * (tokens - max_new_tokens)
    return BatchMemory(
        parameters=parameters,
        weight_bytes=int(parameters * per_param),
        kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes,
        tokens=tokens,
        batch=batch_size,
        activation_bytes=prefill * (2 * text.intermediate_size + 4 * text.hidden_size) * dtype_bytes,
    )


def prompt_tokens(prompt: str) -> int:
    """About how many tokens the chat template and the prompt take (an over-estimate: 3 characters a token)."""
    return _CHAT_TOKENS + math.ceil(len(prompt) / 3)


def spread_device_map(config: Any, gpus: Sequence[int], dtype: torch.dtype, **batch: Any) -> dict[str, int]:
    """The device map of a checkpoint over `gpus`, each keeping room for a batch (batch_memory's settings).

    Every GPU holds one layer's activations at a time and its layers' share of the KV cache.
    """
    import torch

    skeleton = meta_model(config, dtype)
    memory = batch_memory(config, sum(p.numel() for p in skeleton.parameters()), dtype_bytes=dtype.itemsize, **batch)
    reserve = memory.activation_bytes + memory.kv_bytes // len(gpus)
    sizes = [torch.cuda.get_device_properties(gpu).total_memory for gpu in gpus]
    return plan_device_map(skeleton, gpu_budgets(gpus, sizes, reserve), dtype)


# -- device maps ------------------------------------------------------------------------------


def gpu_budgets(gpus: Sequence[int], gpu_bytes: Sequence[int] | int, reserve_bytes: int) -> dict[int, int]:
    """Per GPU, the bytes its share of the weights may take: the usable memory less a batch's reserve."""
    sizes = [gpu_bytes] * len(gpus) if isinstance(gpu_bytes, int) else list(gpu_bytes)
    budgets = {gpu: int(size * USABLE_FRACTION) - reserve_bytes for gpu, size in zip(gpus, sizes, strict=True)}
    if min(budgets.values(), default=1) <= 0:
        raise UserError(f"a batch needs {reserve_bytes / 1e9:.1f} GB per GPU, more than a GPU holds; lower --batch-size")
    return budgets


def plan_device_map(model: Any, budgets: dict[int, int], dtype: torch.dtype) -> dict[str, int]:
    """Modules to GPUs, balanced over `budgets` (GPU -> bytes) with no module split; nothing on CPU or disk.

    `model` may be on the meta device (built from the config under accelerate's
    init_empty_weights), so a map is planned before any weight is read.
    """
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    # Balanced: each GPU's limit is lowered to about its even share, so the layers spread over
    # every GPU instead of filling the first ones (the last GPU keeps its whole budget for the head).
    balanced = get_balanced_memory(model, max_memory=dict(budgets), no_split_module_classes=no_split, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    offloaded = sorted({str(d) for d in device_map.values() if d in ("cpu", "disk")})
    if offloaded:
        need = sum(p.numel() for p in model.parameters()) * dtype.itemsize
        raise UserError(
            f"the model ({need / 1e9:.1f} GB) does not fit in {len(budgets)} GPU(s) with "
            f"{min(budgets.values()) / 1e9:.1f} GB each left for weights; give a replica more GPUs"
        )
    return device_map


def meta_model(config: Any, dtype: torch.dtype) -> Any:
    """The checkpoint's model built from its config with empty (meta) weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def input_device(model: Any) -> torch.device:
    """Where a spread model reads its inputs: the input embeddings' device (accelerate's hooks move the rest)."""
    return model.get_input_embeddings().weight.device


# -- precision ---------------------------------------------------------------------------------


def native_half(device: torch.device) -> torch.dtype:
    """bfloat16 where the GPU computes it natively (Ampere and later), float16 elsewhere (T4, V100).

    On older GPUs bfloat16 is emulated and SDPA takes its slow path; float16 is native there.
    """
    import torch

    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def quantization_config(quantize: str | None, device: torch.device) -> Any:
    """A bitsandbytes config for --quantize 8bit|4bit; None without it; one-line UserError where it cannot run."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise UserError(f"unknown --quantize {quantize!r}; choose one of: {', '.join(QUANTIZE)}")
    check_quantize(quantize, gpu=device.type == "cuda")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=native_half(device))


def check_quantize(quantize: str | None, *, gpu: bool) -> None:
    """Refuse --quantize in one line where bitsandbytes is not installed or there is no GPU."""
    if quantize is None:
        return
    import importlib.util

    if not gpu:
        raise UserError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); none is available here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--quantize {quantize} needs the bitsandbytes package; pip install bitsandbytes")


def device_lost(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a torch.AcceleratorError: the CUDA context is unusable from then on.

    An illegal address, a device-side assert or a hardware fault poisons every later call in the
    process; out of memory is a torch.OutOfMemoryError, not this, and the process stays usable.
    """
    import torch

    fatal = getattr(torch, "AcceleratorError", None)
    seen = set()
    while exc is not None and id(exc) not in seen and fatal is not None:
        if isinstance(exc, fatal):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def roomiest_gpu(gpus: Sequence[int]) -> str:
    """The device name of the GPU among `gpus` with the most free memory (for the models loaded after a spread one)."""
    import torch

    return f"cuda:{max(gpus, key=lambda gpu: torch.cuda.mem_get_info(gpu)[0])}"


def pin_in_dtype(inputs: Any, dtype: torch.dtype) -> None:
    """Page-lock a prepared batch's tensors in place, floating ones cast to the model's dtype first.

    Off the model's thread, so its copy to the GPU is asynchronous; in the model's dtype, since
    float32 pixels are twice the bytes (about 37 MB an OneVision image) and the pinned pool never shrinks.
    """
    import torch

    for key, value in list(inputs.items()):
        if isinstance(value, torch.Tensor):
            inputs[key] = (value.to(dtype) if value.is_floating_point() else value).pin_memory()


def out_of_memory(exc: BaseException) -> bool:
    import torch  # loaded already: the models run on it

    return isinstance(exc, torch.cuda.OutOfMemoryError)
