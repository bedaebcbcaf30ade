"""Placing models on GPUs, on the CPU: device maps of the big shapes on the meta device over simulated GPUs, precision, pinning, fatal device errors."""

import re

import pytest
import torch

from loupe.schemas.errors import UserError
from loupe.workers.models.devices import (
    USABLE_FRACTION,
    batch_memory,
    check_quantize,
    device_lost,
    gpu_budgets,
    meta_model,
    pin_in_dtype,
    plan_device_map,
    quantization_config,
)
from loupe.workers.models.random import random_model_config

GB = 10**9
BATCH = {"batch_size": 8, "prompt_tokens": 48, "max_new_tokens": 64}


@pytest.fixture(scope="module")
def big_models():
    """The 34B (LLaVA-NeXT on Yi-34B) and 72B (OneVision on Qwen2-72B) shapes with empty weights."""
    out = {}
    for family, size in (("llava-next", "34b"), ("llava-onevision", "72b")):
        config = random_model_config(family, size)
        out[size] = (config, meta_model(config, torch.bfloat16))
    return out


@pytest.mark.parametrize("size", ["34b", "72b"])
@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_device_maps_over_simulated_80gb_gpus(big_models, size, gpus):
    from accelerate.utils import compute_module_sizes

    config, model = big_models[size]
    assert all(p.device.type == "meta" for p in model.parameters())  # no memory was taken
    memory = batch_memory(config, sum(p.numel() for p in model.parameters()), **BATCH)
    budgets = gpu_budgets(list(range(gpus)), 80 * GB, memory.activation_bytes + memory.kv_bytes // gpus)
    if size == "72b" and gpus == 2:
        # 146.4 GB of weights in 2 x 72 GB usable: refused in one line, never spilled to CPU or disk.
        with pytest.raises(UserError) as refused:
            plan_device_map(model, budgets, torch.bfloat16)
        assert "does not fit in 2 GPU(s)" in str(refused.value) and "\n" not in str(refused.value)
        return
    device_map = plan_device_map(model, budgets, torch.bfloat16)
    assert set(device_map.values()) == set(range(gpus))  # every GPU used, nothing on CPU or disk
    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    load = dict.fromkeys(range(gpus), 0)
    layers = dict.fromkeys(range(gpus), 0)
    for name, gpu in device_map.items():
        load[gpu] += sizes[name]
        layers[gpu] += bool(re.search(r"language_model\.layers\.\d+$", name))
    text_layers = config.get_text_config().num_hidden_layers
    assert sum(load.values()) == sizes[""] and sum(layers.values()) == text_layers
    # Balanced: no GPU holds much more than an even share of the weights.
    assert max(load.values()) <= 1.2 * sizes[""] / gpus
    for gpu in range(gpus):
        # The limits held: weights, one layer's activations and its layers' KV cache fit the usable memory.
        assert load[gpu] <= budgets[gpu]
        kv = memory.kv_bytes * layers[gpu] / text_layers
        assert load[gpu] + memory.activation_bytes + kv <= 80 * GB * USABLE_FRACTION


def test_a_batch_bigger_than_a_gpu_is_refused():
    with pytest.raises(UserError, match="lower --batch-size"):
        gpu_budgets([0, 1], 16 * GB, 15 * GB)


def test_fp16_where_bf16_is_not_native(monkeypatch):
    from loupe.workers.models.devices import native_half

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100
    assert native_half(torch.device("cuda", 0)) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    assert native_half(torch.device("cuda", 0)) == torch.bfloat16


def test_pixels_are_pinned_in_the_models_dtype(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.dtype) or self)
    inputs = {"pixel_values": torch.zeros(2, 3, 8, 8), "input_ids": torch.ones(2, 4, dtype=torch.long), "image_sizes": [(8, 8)]}
    pin_in_dtype(inputs, torch.bfloat16)
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long
    assert sorted(map(str, pinned)) == ["torch.bfloat16", "torch.int64"]


def test_quantize_is_refused_in_one_line_without_a_gpu_or_bitsandbytes(monkeypatch):
    import importlib.util

    for quantize in ("8bit", "4bit"):
        with pytest.raises(UserError, match=f"--quantize {quantize} needs a CUDA GPU"):
            quantization_config(quantize, torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="needs the bitsandbytes package"):
        check_quantize("4bit", gpu=True)
    check_quantize(None, gpu=False)
    assert quantization_config(None, torch.device("cpu")) is None


def test_an_accelerator_error_is_told_from_out_of_memory_and_other_errors():
    lost = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    assert device_lost(lost)
    try:
        try:
            raise lost
        except RuntimeError as inner:
            raise RuntimeError("the model failed on every image of a batch") from inner
    except RuntimeError as wrapped:
        assert device_lost(wrapped)  # found through the cause
    assert not device_lost(torch.OutOfMemoryError("CUDA out of memory"))
    assert not device_lost(RuntimeError("shape mismatch")) and not device_lost(None)
