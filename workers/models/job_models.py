"""The models a job's tasks need, loaded once per replica, and what they ask of the decoder."""

from __future__ import annotations

from loupe.schemas.config import JobConfig
from loupe.workers.models.captioner import Captioner
from loupe.workers.models.stages import (
    Captioning,
    ImageEmbedding,
    ImageStage,
    Moderating,
    Stage,
    TextEmbedding,
)


def load_job_models(
    config: JobConfig,
    device: str | None,
    captioner: Captioning | None,
    moderator: Moderating | None,
    image_embedder: ImageEmbedding | None,
    text_embedder: TextEmbedding | None,
    gpus: list[int] | None = None,
) -> tuple[Captioning | None, Moderating | None, ImageEmbedding | None, TextEmbedding | None]:
    """The models the job's tasks need, those not passed in loaded here (on the torch thread)."""
    if config.captions and captioner is None:
        captioner = Captioner(
            config.model,
            prompt=config.prompt,
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens,
            device=device,
            gpus=gpus,
            batch_size=config.batch_size,
            quantize=config.quantize,
        )
    if config.moderates and moderator is None:
        from loupe.workers.models.moderator import Moderator

        moderator = Moderator(
            config.judge, config.taxonomy, device=device, share=captioner, gpus=gpus, quantize=config.quantize
        )
    if config.embeds:
        from loupe.workers.models.devices import roomiest_gpu
        from loupe.workers.models.embedder import ImageEmbedder, TextEmbedder
        from loupe.workers.models.loading import resolve_text_model

        # Over several GPUs, the embedders go where the captioner left the most memory.
        device = roomiest_gpu(gpus) if gpus and len(gpus) > 1 else device

        image_embedder = image_embedder or ImageEmbedder(config.image_embedding_model, device=device)
        if text_embedder is None and (config.captions or config.text_column):
            text_embedder = TextEmbedder(resolve_text_model(config.text_embedding_model), device=device)
    return captioner, moderator, image_embedder, text_embedder


def on_cpu(*stages: Stage | None) -> bool:
    """Whether any of the stages runs torch on the CPU in this process."""
    return any(stage is not None and stage.device is not None and stage.device.type == "cpu" for stage in stages)


def models_decode_side(*stages: ImageStage | None) -> int | None:
    """The side images can be decoded down to for every stage that reads them; None: decode in full."""
    sides = []
    for stage in stages:
        if stage is None:
            continue
        if stage.decode_side is None:
            return None
        sides.append(stage.decode_side)
    return max(sides, default=None)
