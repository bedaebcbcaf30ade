"""The captioning model replica: a LLaVA-family checkpoint turning batches of images into captions."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from loupe.schemas.config import DEFAULT_PROMPT
from loupe.workers.decode import needed_side
from loupe.workers.models.devices import (
    input_device,
    pin_in_dtype,
    prompt_tokens,
    quantization_config,
    spread_device_map,
)
from loupe.workers.models.loading import (
    LOAD_ERRORS,
    load_error,
    resolve_device,
    resolve_dtype,
    vlm_config,
    vlm_processor,
)
from loupe.workers.models.stages import Captioning, Encoded

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature


class Captioner(Captioning):
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
        gpus: Sequence[int] | None = None,
        batch_size: int = 8,
        quantize: str | None = None,
    ):
        """`gpus` (torch's numbers) where the model is spread over several, each keeping room for a batch of `batch_size`."""
        from transformers import AutoModelForImageTextToText

        self.model_id = model
        self.prompt = prompt
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(self.device, dtype)

        config = vlm_config(model)
        self.processor = vlm_processor(model)
        device_map: Any = self.device
        if gpus is not None and len(gpus) > 1 and self.device.type == "cuda":
            device_map = spread_device_map(
                config, gpus, self.dtype, batch_size=batch_size, prompt_tokens=prompt_tokens(prompt),
                max_new_tokens=max_new_tokens, quantize=quantize,
            )
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                model,
                config=config,
                dtype=self.dtype,
                attn_implementation="sdpa",
                device_map=device_map,
                quantization_config=quantization_config(quantize, self.device),
            )
        except LOAD_ERRORS as exc:
            raise load_error(model, exc) from exc
        self.model.eval()
        # Spread over GPUs, the inputs go where the embeddings are; accelerate's hooks move each
        # layer's inputs to its own GPU from there.
        self.device = input_device(self.model) if self.device.type == "cuda" else self.device
        self.devices = sorted({str(d) for d in getattr(self.model, "hf_device_map", {}).values()}) or [str(self.device)]
        self.decode_side = needed_side(self.processor.image_processor)

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
        # Held while the tokenizer encodes; a moderator sharing these weights encodes under it too.
        self.encode_lock = threading.Lock()

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
            # A checkpoint asking for a static cache would otherwise compile generate on the first
            # batch and again for every new shape: minutes, and memory the batch plan never counted.
            disable_compile=True,
        )

    def _conversation(self, image: Image.Image) -> list[dict]:
        content = [{"type": "image", "image": image}, {"type": "text", "text": self.prompt}]
        return [{"role": "user", "content": content}]

    def prepare(self, images: list[Image.Image]) -> BatchFeature:
        """Chat template, left-padded tokenization and image preprocessing, on the CPU; thread-safe."""
        conversations = [self._conversation(image) for image in images]
        with self.encode_lock:
            inputs = self.processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
            )
        if self.device.type == "cuda":
            pin_in_dtype(inputs, self.dtype)
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
