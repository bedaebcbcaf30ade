"""The embedding replicas: CLIP image and text towers, and a sentence model for captions."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

# The default models are declared once, with the job config, and re-exported here.
from loupe.schemas.config import DEFAULT_IMAGE_EMBEDDING_MODEL as DEFAULT_IMAGE_MODEL
from loupe.schemas.config import DEFAULT_TEXT_EMBEDDING_MODEL as DEFAULT_TEXT_MODEL
from loupe.schemas.errors import UserError
from loupe.workers.decode import needed_side
from loupe.workers.models.loading import (
    LOAD_ERRORS,
    clip_config,
    load_error,
    resolve_device,
    resolve_dtype,
    resolve_text_model,
    text_encoder_config,
)
from loupe.workers.models.stages import ImageEmbedding, TextEmbedding

if TYPE_CHECKING:
    from PIL import Image

_TEXT_BATCH = 256  # bounds activation memory when a caller passes a whole part's captions
# float16 rather than the captioner's bfloat16: its 10-bit mantissa keeps cosine scores close
# enough to float32 that near neighbours keep their order.
_CUDA_DTYPE = torch.float16


def _normalized(features: Any) -> np.ndarray:
    # transformers 5 returns a model output whose pooler_output holds the projected features;
    # older releases returned the tensor itself.
    tensor = getattr(features, "pooler_output", features)
    tensor = torch.nn.functional.normalize(tensor.float(), dim=-1)
    return np.ascontiguousarray(tensor.cpu().numpy(), dtype=np.float32)


class ImageEmbedder(ImageEmbedding):
    """CLIP image and text towers: L2-normalized float32 vectors for images and text queries."""

    def __init__(
        self, model: str = DEFAULT_IMAGE_MODEL, *, device: str | None = None, dtype: str | None = None
    ):
        from transformers import AutoModel, AutoProcessor

        self.model_id = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(self.device, dtype, default_cuda=_CUDA_DTYPE)
        config = clip_config(model)
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModel.from_pretrained(
                model, config=config, dtype=self.dtype, device_map=self.device
            )
        except LOAD_ERRORS as exc:
            raise load_error(model, exc) from exc
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise UserError(f"model {model!r} ({type(self.model).__name__}) has no image and text towers")
        self.model.eval()
        self.decode_side = needed_side(self.processor.image_processor)
        self.dim = int(config.projection_dim)
        text_config = config.text_config
        self._max_text_tokens = int(getattr(text_config, "max_position_embeddings", 77))
        # The Rust tokenizer keeps padding state between calls; concurrent callers would mix it.
        self._text_lock = threading.Lock()

    def prepare(self, images: list[Image.Image]) -> Any:
        """Resize, crop and normalize on the CPU; thread-safe (the image processor keeps no state)."""
        if not images:
            return None
        return self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def embed(self, prepared: Any) -> np.ndarray:
        """(n, dim) float32 unit vectors for a prepare()d batch."""
        if prepared is None:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = prepared.to(self.device, dtype=self.dtype, non_blocking=self.device.type == "cuda")
        return _normalized(self.model.get_image_features(pixel_values=pixels))

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """embed(prepare(images)) in the calling thread."""
        return self.embed(self.prepare(images))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors of texts through the same model's text tower."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._text_lock:
            # CLIP's positions stop at 77 tokens; a longer query is cut there, as CLIP was trained.
            inputs = self.processor.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=self._max_text_tokens,
                return_tensors="pt",
            )
        inputs = {
            key: value.to(self.device)
            for key, value in inputs.items()
            if key in ("input_ids", "attention_mask")
        }
        return _normalized(self.model.get_text_features(**inputs))


class TextEmbedder(TextEmbedding):
    """A sentence-embedding model (mean pooling, as sentence-transformers does) for captions and text queries."""

    def __init__(
        self, model: str = DEFAULT_TEXT_MODEL, *, device: str | None = None, dtype: str | None = None
    ):
        from transformers import AutoModel, AutoTokenizer

        self.model_id = model
        self.path = resolve_text_model(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(self.device, dtype, default_cuda=_CUDA_DTYPE)
        config = text_encoder_config(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(
                self.path, config=config, dtype=self.dtype, device_map=self.device
            )
        except LOAD_ERRORS as exc:
            raise load_error(model, exc) from exc
        self.model.eval()
        self.dim = int(config.hidden_size)
        self._max_tokens = self._max_sequence_length(config)
        self._lock = threading.Lock()

    def _max_sequence_length(self, config) -> int:
        # sentence-transformers truncates at the max_seq_length of its own config (256 for
        # all-MiniLM-L6-v2, which was trained on pieces that short), not at BERT's 512.
        limit = int(getattr(config, "max_position_embeddings", 512))
        st_config = Path(self.path) / "sentence_bert_config.json"
        if st_config.is_file():
            import json

            limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length", limit)))
        return min(limit, int(getattr(self.tokenizer, "model_max_length", limit) or limit))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors: token states averaged over the attention mask."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        texts = list(texts)
        for start in range(0, len(texts), _TEXT_BATCH):
            with self._lock:
                inputs = self.tokenizer(
                    texts[start : start + _TEXT_BATCH],
                    padding=True,
                    truncation=True,
                    max_length=self._max_tokens,
                    return_tensors="pt",
                )
            inputs = {key: value.to(self.device) for key, value in inputs.items()}
            states = self.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out.append(_normalized(pooled))
        return np.concatenate(out)

