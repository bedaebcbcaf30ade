"""Random-weight checkpoints: built offline, loaded through the real from_pretrained path, reproducible."""

from __future__ import annotations

import hashlib

import pytest
from loupe.schemas.errors import UserError
from loupe.workers.models.random import FAMILIES, build_random_model
from PIL import Image

EXPECTED = {
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor", "USER: <image>\nDescribe it. ASSISTANT:"),
    "llava-next": (
        "LlavaNextForConditionalGeneration",
        "LlavaNextProcessor",
        "[INST] <image>\nDescribe it. [/INST]",
    ),
    "llava-onevision": (
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionProcessor",
        "<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n",
    ),
}


def _digests(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_like_a_real_one(tiny_checkpoints, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_class, processor_class, prompt = EXPECTED[family]
    processor = AutoProcessor.from_pretrained(tiny_checkpoints[family])
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[family])
    assert type(model).__name__ == model_class
    assert type(processor).__name__ == processor_class

    tokenizer = processor.tokenizer
    assert 1000 <= len(tokenizer) <= 2000
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    # The trained vocabulary covers ordinary English with word pieces, not single characters.
    assert len(tokenizer.tokenize("A photo of a red car in the street.")) <= 10

    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == prompt


@pytest.mark.parametrize("family", ["llava-next", "llava-onevision"])
def test_anyres_tiling_depends_on_aspect_ratio(tiny_checkpoints, family):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoints[family])
    counts = []
    for width, height in [(40, 30), (30, 90), (120, 50)]:
        inputs = processor(images=Image.new("RGB", (width, height)), text="<image>", return_tensors="pt")
        assert inputs["pixel_values"].shape[1] > 1  # base image plus high-resolution tiles
        counts.append(int((inputs["input_ids"] == processor.image_token_id).sum()))
    assert len(set(counts)) == 3


def test_same_seed_same_files_other_seed_other_weights(tiny_checkpoints, tmp_path):
    again = _digests(build_random_model(tmp_path / "again", "llava-onevision", "tiny", seed=0))
    assert again == _digests(tiny_checkpoints["llava-onevision"])

    other = _digests(build_random_model(tmp_path / "other", "llava-onevision", "tiny", seed=1))
    assert other["model.safetensors"] != again["model.safetensors"]
    assert other["tokenizer.json"] == again["tokenizer.json"]


def test_same_seed_same_captions(tiny_checkpoints, tmp_path):
    from loupe.workers.models.captioner import Captioner

    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 90), "blue")]
    rebuilt = build_random_model(tmp_path / "again", "llava", "tiny", seed=0)
    captions = [
        Captioner(str(path), max_new_tokens=8, min_new_tokens=8)(images)
        for path in (tiny_checkpoints["llava"], rebuilt)
    ]
    assert captions[0] == captions[1]
    assert all(captions[0])


@pytest.mark.parametrize(("family", "size"), [("llava-2", "tiny"), ("llava", "huge")])
def test_unknown_family_or_size_is_a_user_error(tmp_path, family, size):
    with pytest.raises(UserError) as raised:
        build_random_model(tmp_path / "model", family, size)
    message = str(raised.value)
    assert "\n" not in message
    assert repr(family if family not in FAMILIES else size) in message
    assert not (tmp_path / "model").exists()


# Published sizes of the public tiny_checkpoints the 7b shapes copy (llava-hf model cards).
FULL_SIZE_PARAMETERS = {"llava": 7.06e9, "llava-next": 7.57e9, "llava-onevision": 8.03e9}


@pytest.mark.parametrize("family", FAMILIES)
def test_7b_shapes_are_the_public_checkpoints_counted_on_the_meta_device(family):
    from loupe.workers.models.random import parameter_count, random_model_config

    count = parameter_count(family, "7b")
    assert count == pytest.approx(FULL_SIZE_PARAMETERS[family], rel=0.005)
    config = random_model_config(family, "7b")
    vision, text = config.vision_config, config.text_config
    if family == "llava-onevision":  # SigLIP so400m/14-384 without its head, Qwen2-7B
        assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size) == (1152, 26, 384)
        assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (3584, 28, 4, 152128)
    else:  # CLIP ViT-L/14-336, Llama-2-7B or Mistral-7B
        assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (1024, 24, 4096)
        assert (vision.image_size, vision.patch_size) == (336, 14)
        assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (4096, 32, 32064)
        assert text.num_key_value_heads == (32 if family == "llava" else 8)
    if family == "llava":
        assert (text.intermediate_size, config.projector_hidden_act, config.image_seq_length) == (11008, "gelu", 576)


def test_7b_is_never_built_on_the_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError) as raised:
        build_random_model(tmp_path / "model", "llava", "7b")
    assert "GPU" in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "model").exists()


def test_parameter_count_matches_the_built_checkpoint(tiny_checkpoints):
    from loupe.workers.models.random import parameter_count
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["llava-next"])
    assert parameter_count("llava-next", "tiny") == sum(p.numel() for p in model.parameters())


# The public checkpoints the big shapes copy, as their Hugging Face model cards round them (0.1B):
# llava-hf/llava-1.5-13b-hf 13.4B, llava-hf/llava-v1.6-34b-hf 34.8B (its bf16 shards total 69.5 GB),
# llava-hf/llava-onevision-qwen2-72b-ov-hf 73.2B. The exact counts are not known offline, so the
# tolerance is the rounding: the count must round to the published figure.
BIG_PARAMETERS = {("llava", "13b"): 13.4, ("llava-next", "34b"): 34.8, ("llava-onevision", "72b"): 73.2}


@pytest.mark.parametrize(("family", "size"), list(BIG_PARAMETERS))
def test_big_shapes_are_the_public_checkpoints_on_the_meta_device(family, size):
    from loupe.workers.models.random import meta_model

    model = meta_model(family, size)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e9, 1) == BIG_PARAMETERS[(family, size)]
    text = model.config.get_text_config()
    if size == "34b":  # Yi-34B: grouped-query attention, 64k vocabulary
        assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (7168, 60, 8, 64064)


def test_big_sizes_belong_to_one_family_and_are_never_built_on_the_cpu(tmp_path):
    import torch

    with pytest.raises(UserError, match="the 34b size is llava-next's only"):
        build_random_model(tmp_path / "model", "llava", "34b")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="GPU"):
            build_random_model(tmp_path / "model", "llava", "13b")
    assert not (tmp_path / "model").exists()
