"""How many GPUs a replica needs: from the checkpoint's config and the job's settings, checked against the cluster's nodes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError
from loupe.workers.models.devices import USABLE_FRACTION, BatchMemory, batch_memory, prompt_tokens

GB = 10**9
# Memory per GPU by the accelerator type Ray reports for a node ("accelerator_type:<name>").
GPU_MEMORY_GB = {
    "H200": 141,
    "H100": 80,
    "A100-80G": 80,
    "A100-40G": 40,
    "A100": 40,
    "L40S": 48,
    "A6000": 48,
    "A10G": 24,
    "L4": 24,
    "V100": 16,
    "T4": 16,
}
# GPUs before Ampere: bfloat16 is emulated there, so the models run in float16 (devices.native_half).
NO_NATIVE_BF16 = ("V100", "T4", "P100", "P4", "K80")
# A GPU whose type Ray does not report is planned as the commonest data-centre GPU, and said so.
ASSUMED_GPU_GB = 80


@dataclass(frozen=True)
class GpuPlan:
    """The GPUs of one replica, the memory that decided it, and why, in words."""

    gpus: float
    memory: BatchMemory | None
    gpu_bytes: int
    reason: str


def gpus_needed(memory: BatchMemory, gpu_bytes: int) -> int:
    """Whole GPUs that hold the weights and a batch's KV cache split by layers, each keeping room for one layer's activations."""
    room = gpu_bytes * USABLE_FRACTION - memory.activation_bytes
    if room <= 0:
        return 0  # even the activations of one layer do not fit: no count of GPUs helps
    return max(1, math.ceil((memory.weight_bytes + memory.kv_bytes) / room))


def plan_gpus(memory: BatchMemory, *, gpu_bytes: int, node_gpus: int, assumed: bool = False) -> GpuPlan:
    """The GPUs a replica of this memory needs on nodes of `node_gpus` GPUs of `gpu_bytes`; UserError if none fits."""
    need = gpus_needed(memory, gpu_bytes)
    figures = (
        f"{memory.parameters / 1e9:.1f}B parameters = {memory.weight_bytes / GB:.1f} GB of weights, "
        f"{memory.kv_bytes / GB:.1f} GB of KV cache and {memory.activation_bytes / GB:.1f} GB of activations "
        f"for a batch of {memory.batch} x {memory.tokens} tokens"
    )
    size = f"{gpu_bytes / GB:.0f} GB GPUs" + (" (assumed: Ray does not report the type)" if assumed else "")
    if need == 0 or need > node_gpus:
        raise UserError(
            f"the model fits no node: {figures} need {need or 'more than any number of'} {size}, "
            f"the largest node has {node_gpus}; lower --batch-size or --max-new-tokens, or use --quantize"
        )
    return GpuPlan(need, memory, gpu_bytes, f"{need} GPU(s) per replica: {figures}, on {size}")


def check_gpus_per_replica(gpus: float, node_gpus: int, option: str = "--gpus-per-replica") -> None:
    """Refuse at once a GPU count Ray would reject or could never place (it would wait forever)."""
    if gpus > 1 and gpus != int(gpus):
        raise UserError(f"{option} {gpus:g}: a replica takes a fraction of one GPU (at most 1) or whole GPUs")
    if gpus > node_gpus:
        raise UserError(f"{option} {gpus:g}: the largest node of the cluster has {node_gpus} GPU(s)")


def precision(resources: dict[str, float]) -> str:
    """The half precision replicas on a node of these resources run in, in words."""
    kinds = [key.removeprefix("accelerator_type:") for key in resources if key.startswith("accelerator_type:")]
    old = [kind for kind in kinds if kind in NO_NATIVE_BF16]
    if old:
        return f"float16 (the {old[0]} has no native bfloat16)"
    return f"bfloat16 (native on the {kinds[0]})" if kinds else "bfloat16 where native, else float16"


def node_gpu_memory(resources: dict[str, float]) -> tuple[int, bool]:
    """A node's memory per GPU from the accelerator type Ray reports, and whether it was assumed."""
    for key in resources:
        if key.startswith("accelerator_type:"):
            kind = key.removeprefix("accelerator_type:")
            if kind in GPU_MEMORY_GB:
                return GPU_MEMORY_GB[kind] * GB, False
    return ASSUMED_GPU_GB * GB, True


def size_replica_gpus(
    config: JobConfig,
    nodes: list[dict[str, Any]],
    read_model: Callable[[str], tuple[Any, int]],
    *,
    dtype_bytes: int = 2,
) -> GpuPlan | None:
    """The GPUs each captioning replica takes on a cluster of `nodes` (ray.nodes()); None without GPUs.

    --gpus-per-replica is checked against the largest node; without it the count comes from
    the checkpoint (`read_model(model)` -> (config, parameters)) and the largest node's GPUs.
    """
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    largest = max(alive, key=lambda r: r.get("GPU", 0.0), default={})
    node_gpus = int(largest.get("GPU", 0.0))
    if node_gpus == 0:
        return None
    gpu_bytes, assumed = node_gpu_memory(largest)
    if config.moderation_gpus is not None:
        check_gpus_per_replica(config.moderation_gpus, node_gpus, "--moderation-gpus")
    if config.gpus_per_replica is not None:
        check_gpus_per_replica(config.gpus_per_replica, node_gpus)
        said = f"{config.gpus_per_replica:g} GPU(s) per replica, as asked; {precision(largest)}"
        return GpuPlan(config.gpus_per_replica, None, gpu_bytes, said)
    model_config, parameters = read_model(config.model)
    memory = batch_memory(
        model_config,
        parameters,
        batch_size=config.batch_size,
        prompt_tokens=prompt_tokens(config.prompt),
        max_new_tokens=config.max_new_tokens,
        dtype_bytes=dtype_bytes,
        quantize=config.quantize,
    )
    plan = plan_gpus(memory, gpu_bytes=gpu_bytes, node_gpus=node_gpus, assumed=assumed)
    return replace(plan, reason=f"{plan.reason}; {precision(largest)}")


def read_checkpoint(model: str) -> tuple[Any, int]:
    """A checkpoint's config and its parameter count, counted on the meta device (no weights read)."""
    import torch
    from loupe.workers.models.devices import meta_model
    from loupe.workers.models.loading import vlm_config

    config = vlm_config(model)
    return config, sum(p.numel() for p in meta_model(config, torch.bfloat16).parameters())
