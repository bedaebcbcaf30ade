"""The captioning model replica: a LLaVA-family checkpoint turning batches of images into captions."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loupe.schemas.errors import UserError

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature

from loupe.schemas.config import DEFAULT_MODEL, DEFAULT_PROMPT  # noqa: E402  (re-exported)

# What transformers raises for a checkpoint that is missing, unreadable or of an unknown type.
# Anything else (out of memory, a bug) is not the user's mistake and propagates unchanged.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def _load_error(model: str, exc: BaseException) -> UserError:
    if Path(model).exists():
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        return UserError(f"model {model!r} could not be loaded from the local path: {reason}")
    return UserError(
        f"model {model!r} not found: not a local checkpoint and not in the Hugging Face cache "
        "(HF hub unreachable or unknown id)"
    )


def _load_config(model: str):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:
        config = AutoConfig.from_pretrained(model)
    except _LOAD_ERRORS as exc:
        raise _load_error(model, exc) from exc
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise UserError(
            f"model {model!r} is a {config.model_type!r} checkpoint, not an image-text-to-text model "
            "(expected a LLaVA-family checkpoint)"
        )
    return config


def _load_processor(model: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model)
    except _LOAD_ERRORS as exc:
        raise _load_error(model, exc) from exc
    if getattr(processor, "chat_template", None) is None:
        raise UserError(f"model {model!r} has no chat template, so its prompt format is unknown")
    return processor


@dataclass
class Encoded:
    """What a generate() call leaves on the device: its prompt and the KV cache of prompt and output.

    The moderator reads the image prefix's keys and values from it instead of encoding the
    image a second time.
    """

    input_ids: torch.Tensor  # (images, width), left-padded
    attention_mask: torch.Tensor  # (images, width)
    cache: Any  # a transformers Cache: the prompt's keys and values, then the generated tokens'


def check_model(model: str) -> None:
    """Raise UserError unless `model` is a loadable image-text-to-text checkpoint; reads no weights."""
    _load_config(model)
    _load_processor(model)


class Captioner:
    """One captioning replica: weights loaded once, then called on batches of RGB images."""

    def __init__(
        self,
        model: str,
        *,
        prompt: str = DEFAULT_PROMPT,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        device: str | None = None,
        dtype: str | None = None,
    ):
        from transformers import AutoModelForImageTextToText

        self.model_id = model
        self.prompt = prompt
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as exc:
            raise UserError(f"unknown device {device!r}; use e.g. cpu, cuda or cuda:1") from exc
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"device {device!r} requested but no CUDA GPU is available")
            if self.device.index is None:
                # Pinned to an index so that device_map and tensor moves agree on one GPU.
                self.device = torch.device("cuda", torch.cuda.current_device())
        if dtype is None:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif dtype in _DTYPES:
            self.dtype = _DTYPES[dtype]
        else:
            raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(_DTYPES)}")

        config = _load_config(model)
        self.processor = _load_processor(model)
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, config=config, dtype=self.dtype, attn_implementation="sdpa", device_map=self.device
            )
        except _LOAD_ERRORS as exc:
            raise _load_error(model, exc) from exc
        self.model.eval()

        tokenizer = self.processor.tokenizer
        # New tokens are appended on the right, so prompts of different lengths (anyres gives
        # every aspect ratio its own image token count) must be padded on the left.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Encoding sets padding state on the Rust tokenizer while decoding borrows it, and the two
        # fail ("Already borrowed") when they overlap; a private copy for decoding lets generate()
        # finish one batch while prepare() encodes the next in another thread.
        self._decoder = copy.deepcopy(tokenizer)
        self._prepare_lock = threading.Lock()

        # Greedy and deterministic whatever the checkpoint's generation_config.json asks for.
        self.generation_config = copy.deepcopy(self.model.generation_config)
        self.generation_config.update(
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            # The cache comes back with the tokens, for a moderator that reads the image prefix from it.
            return_dict_in_generate=True,
        )

    def _conversation(self, image: Image.Image) -> list[dict]:
        content = [{"type": "image", "image": image}, {"type": "text", "text": self.prompt}]
        return [{"role": "user", "content": content}]

    def prepare(self, images: list[Image.Image]) -> BatchFeature:
        """Chat template, left-padded tokenization and image preprocessing, on the CPU; thread-safe."""
        conversations = [self._conversation(image) for image in images]
        with self._prepare_lock:
            inputs = self.processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
            )
        if self.device.type == "cuda":
            # Page-locked here, off the generating thread, so generate()'s copy is asynchronous.
            for key, value in list(inputs.items()):
                if isinstance(value, torch.Tensor):
                    inputs[key] = value.pin_memory()
        return inputs

    def image_tokens(self, sizes: list[tuple[int, int]]) -> list[int] | None:
        """Tokens each image of (width, height) takes in the prompt, by the processor's own arithmetic.

        No pixels are touched. None where the processor cannot say (then batches are not bucketed).
        """
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is None:
            return None
        try:
            return [int(n) for n in count(image_sizes=[(height, width) for width, height in sizes]).num_image_tokens]
        except Exception:  # a processor whose arithmetic needs more than the size: no bucketing
            return None

    def generate(self, inputs: BatchFeature) -> list[str]:
        """Greedy-decode prepared inputs on the device; one stripped caption per image."""
        return self.generate_encoded(inputs)[0]

    @torch.inference_mode()
    def generate_encoded(self, inputs: BatchFeature) -> tuple[list[str], Encoded]:
        """generate(), also returning the prompt and KV cache it left on the device."""
        on_cuda = self.device.type == "cuda"
        batch = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                if on_cuda and not value.is_pinned():
                    value = value.pin_memory()
                dtype = self.dtype if value.is_floating_point() else None
                value = value.to(self.device, dtype=dtype, non_blocking=on_cuda)
            batch[key] = value
        output = self.model.generate(**batch, generation_config=self.generation_config)
        new_tokens = output.sequences[:, batch["input_ids"].shape[1] :]
        captions = [text.strip() for text in self._decoder.batch_decode(new_tokens, skip_special_tokens=True)]
        return captions, Encoded(batch["input_ids"], batch["attention_mask"], output.past_key_values)

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """Caption a batch of images: prepare() then generate() in the calling thread."""
        return self.generate(self.prepare(images))
