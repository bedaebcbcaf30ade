"""Captioner: batched greedy captions equal one-at-a-time captions for every family; clear load errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.schemas.errors import UserError
from loupe.workers.models.captioner import Captioner
from loupe.workers.models.random import FAMILIES

# (width, height): every aspect ratio gets its own anyres tile grid and so its own number of
# image tokens in llava-next and llava-onevision, which forces real left padding in a batch;
# the two largest also take OneVision's feature pooling path.
SIZES = [(40, 30), (30, 90), (120, 50), (64, 64), (200, 150)]
NEW_TOKENS = 12
PADDED_FAMILIES = ["llava-next", "llava-onevision"]


@pytest.fixture(scope="module")
def images():
    """Images of different sizes and unlike content, so that each gets its own caption."""
    rng = np.random.default_rng(7)
    patterns = [
        lambda x, y, w, h: np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1),
        lambda x, y, w, h: ((x // 8 + y // 8) % 2)[..., None] * np.array([255, 40, 40]),
        lambda x, y, w, h: np.stack(
            [np.sin(x / 3) * 127 + 128, np.full_like(x, 90), np.cos(y / 5) * 127 + 128], -1
        ),
        lambda x, y, w, h: rng.integers(0, 256, (h, w, 3)),
        lambda x, y, w, h: np.array([20, 160, 60]) + (x > w // 2)[..., None] * 80,
    ]
    result = []
    for (width, height), pattern in zip(SIZES, patterns, strict=True):
        y, x = np.mgrid[0:height, 0:width]
        result.append(Image.fromarray(np.clip(pattern(x, y, width, height), 0, 255).astype(np.uint8)))
    return result


@pytest.fixture(scope="module")
def captioner(tiny_checkpoints):
    """Captioner for (family, dtype), loaded once per module."""
    loaded = {}

    def get(family: str, dtype: str = "float64") -> Captioner:
        if (family, dtype) not in loaded:
            loaded[family, dtype] = Captioner(
                str(tiny_checkpoints[family]),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                device="cpu",
                dtype=dtype,
            )
        return loaded[family, dtype]

    return get


def _one_at_a_time(captioner: Captioner, images) -> list[str]:
    return [captioner([image])[0] for image in images]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_captions_equal_one_at_a_time(captioner, images, family):
    # float64 makes batched and unbatched logits bitwise equal on CPU, so token-for-token
    # equality is exact rather than at the mercy of float32 near-ties in random logits.
    model = captioner(family)
    inputs = model.prepare(images)
    if family in PADDED_FAMILIES:
        pads = (inputs["attention_mask"] == 0).sum(dim=1)
        assert len(set(pads.tolist())) > 2, "test images must need different amounts of padding"
        assert bool((inputs["attention_mask"][:, -1] == 1).all()), "padding must be on the left"

    batched = model.generate(inputs)
    assert batched == _one_at_a_time(model, images)

    # Equality must mean something: captions are long, and they depend on the image.
    for caption in batched:
        assert len(model.processor.tokenizer.tokenize(caption)) >= NEW_TOKENS // 2
    assert len(set(batched)) == len(images)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_logits_match_one_at_a_time_in_float32(captioner, images, family):
    # float32 is the CPU default; its batched and unbatched logits differ by rounding only.
    model = captioner(family, "float32")
    with torch.inference_mode():
        batched = model.model(**model.prepare(images)).logits[:, -1]
        for row, image in enumerate(images):
            single = model.model(**model.prepare([image])).logits[0, -1]
            scale = single.abs().max()
            torch.testing.assert_close(batched[row], single, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("family", PADDED_FAMILIES)
def test_padding_mistakes_change_the_captions(captioner, images, family):
    # The equality test above is only worth having if it fails on padding bugs.
    model = captioner(family)
    expected = _one_at_a_time(model, images)

    unmasked = model.prepare(images)
    unmasked["attention_mask"] = torch.ones_like(unmasked["attention_mask"])
    assert model.generate(unmasked) != expected

    tokenizer = model.processor.tokenizer
    tokenizer.padding_side = "right"
    try:
        right_padded = model.prepare(images)
    finally:
        tokenizer.padding_side = "left"
    assert model.generate(right_padded) != expected


def test_prepare_in_a_thread_while_generating(captioner, images):
    model = captioner("llava-onevision")
    expected = model(images[:3]) + model(images[3:])
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = model.prepare(images[:3])
        second = pool.submit(model.prepare, images[3:])
        captions = model.generate(first)
        captions += model.generate(second.result())
    assert captions == expected


def test_captioner_settings(captioner):
    model = captioner("llava")
    assert model.device == torch.device("cpu")
    assert model.model.dtype == torch.float64
    assert model.model.config._attn_implementation == "sdpa"
    assert not model.model.training
    assert model.generation_config.do_sample is False
    assert model.generation_config.num_beams == 1


def test_sampling_generation_config_of_a_checkpoint_is_overridden(captioner, tiny_checkpoints, images, tmp_path):
    import json
    import shutil

    sampling = shutil.copytree(tiny_checkpoints["llava"], tmp_path / "sampling")
    config = json.loads((sampling / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=5.0, top_k=0, num_beams=3)
    (sampling / "generation_config.json").write_text(json.dumps(config))
    model = Captioner(str(sampling), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, dtype="float64")
    assert model(images) == captioner("llava")(images)


def test_captioner_on_a_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as raised:
        Captioner(str(tmp_path / "missing"), device="cpu")
    assert "\n" not in str(raised.value)


def test_captioner_on_a_checkpoint_without_weights_is_a_user_error(tiny_checkpoints, tmp_path):
    import shutil

    broken = shutil.copytree(tiny_checkpoints["llava"], tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="could not be loaded from the local path") as raised:
        Captioner(str(broken), device="cpu")
    assert "\n" not in str(raised.value)


def test_captioner_rejects_an_unknown_dtype(tiny_checkpoints):
    with pytest.raises(UserError, match="unknown dtype"):
        Captioner(str(tiny_checkpoints["llava"]), device="cpu", dtype="float8")


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_match_the_processor(captioner, images, family):
    # The bucketing key: the image tokens of each prompt, from the size alone, as the processor counts them.
    model = captioner(family)
    image_token = model.processor.tokenizer.convert_tokens_to_ids(model.processor.image_token)
    counted = [int((model.prepare([image])["input_ids"] == image_token).sum()) for image in images]
    assert model.image_tokens([image.size for image in images]) == counted
    if family in PADDED_FAMILIES:
        assert len(set(counted)) > 1  # the sizes really give different lengths


def test_spread_over_the_gpus_it_is_handed(tiny_llava, monkeypatch):
    """Over two (simulated) GPUs the model is loaded with a device map over exactly those two, each
    keeping room for a batch; the load itself is stubbed to the CPU, where CUDA would be needed."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForImageTextToText

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda gpu: SimpleNamespace(total_memory=80 * 10**9))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    loads = []
    load = AutoModelForImageTextToText.from_pretrained

    def stubbed(model, **kwargs):
        loads.append(kwargs)
        return load(model, **{**kwargs, "device_map": "cpu", "dtype": torch.float32})

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", stubbed)
    captioner = Captioner(tiny_llava, device="cuda:2", gpus=[2, 3], batch_size=4, max_new_tokens=4)
    device_map = loads[0]["device_map"]
    assert set(device_map.values()) == {2, 3}  # both GPUs, nothing on the CPU or disk
    assert loads[0]["dtype"] == torch.bfloat16 and loads[0]["quantization_config"] is None
    assert captioner.generation_config.disable_compile is True
    # Prepared for a GPU: page-locked, pixels in the model's dtype rather than float32.
    from PIL import Image

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    captioner.device = torch.device("cuda", 2)
    inputs = captioner.prepare([Image.new("RGB", (40, 30))])
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long
