"""Moderator: the shared image prefix gives the scores of independent full prompts, batched or not, per family."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.schemas.errors import UserError
from loupe.schemas.taxonomy import DEFAULT_TAXONOMY, QUESTION, Category, Taxonomy
from loupe.workers.models.captioner import Captioner
from loupe.workers.models.moderator import Moderator
from loupe.workers.models.random import FAMILIES

# (width, height): in llava-next and llava-onevision every aspect ratio gets its own anyres
# tile grid, so its own prefix length, and a batch needs real left padding.
SIZES = [(40, 30), (30, 90), (120, 50), (200, 150)]
TOLERANCE = 1e-4
PADDED_FAMILIES = ["llava-next", "llava-onevision"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    result = []
    for i, (width, height) in enumerate(SIZES):
        y, x = np.mgrid[0:height, 0:width]
        pattern = np.stack([(x * (i + 1) * 7) % 256, (y * 11 + i * 60) % 256, rng.integers(0, 256, x.shape)], -1)
        result.append(Image.fromarray(pattern.astype(np.uint8)))
    return result


@pytest.fixture(scope="module")
def moderator(tiny_checkpoints):
    loaded = {}

    def get(family: str) -> Moderator:
        if family not in loaded:
            loaded[family] = Moderator(str(tiny_checkpoints[family]), DEFAULT_TAXONOMY, device="cpu", dtype="float32")
        return loaded[family]

    return get


def _matrix(scores: list[dict[str, float]], keys=DEFAULT_TAXONOMY.keys) -> np.ndarray:
    assert all(tuple(s) == keys for s in scores)
    return np.array([[s[k] for k in keys] for s in scores])


class _VisionPasses:
    """Counts forward calls of the vision tower, i.e. image encodings."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.vision_tower.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_equals_independent_prompts(moderator, images, family):
    model = moderator(family)
    with _VisionPasses(model.model) as shared:
        scores = model(images)
    with _VisionPasses(model.model) as independent:
        reference = model.score_independent(images)
    np.testing.assert_allclose(_matrix(scores), _matrix(reference), rtol=0, atol=TOLERANCE)

    # The image is encoded once per batch, not once per image and category.
    assert shared.calls == 1
    assert independent.calls == len(images) * len(DEFAULT_TAXONOMY.categories)

    # Equality must mean something: the scores are probabilities that differ between
    # categories and between images by much more than the tolerance.
    matrix = _matrix(scores)
    assert ((matrix >= 0) & (matrix <= 1)).all()
    assert (matrix.max(axis=1) - matrix.min(axis=1)).min() > 20 * TOLERANCE
    assert (matrix.max(axis=0) - matrix.min(axis=0)).min() > 5 * TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_at_a_time(moderator, images, family):
    model = moderator(family)
    prepared = model.prepare(images)
    if family in PADDED_FAMILIES:
        pads = (prepared["attention_mask"] == 0).sum(dim=1)
        assert len(set(pads.tolist())) >= 3, "test images must need different amounts of padding"
        assert bool((prepared["attention_mask"][:, -1] == 1).all()), "padding must be on the left"
    batched = _matrix(model.score(prepared))
    single = np.concatenate([_matrix(model([image])) for image in images])
    np.testing.assert_allclose(batched, single, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_the_chat_template_split_at_a_token_boundary(moderator, images, family):
    # The reference path runs prefix + suffix ids; they must be exactly the natural prompt.
    model = moderator(family)
    prefix = model.prepare(images[:1])["input_ids"][0].tolist()
    for category, suffix in zip(DEFAULT_TAXONOMY.categories, model.suffix_ids, strict=True):
        conversation = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": images[0]},
                    {"type": "text", "text": QUESTION.format(definition=category.definition)},
                ],
            }
        ]
        whole = model.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        whole = whole[0] if isinstance(whole[0], list) else whole
        assert prefix + model.shared_ids + suffix == list(whole)
    # Only the category text, the end of the turn and the assistant's start are per category.
    assert max(len(s) for s in model.suffix_ids) <= 12


@pytest.mark.parametrize("family", FAMILIES)
def test_yes_and_no_tokens(moderator, family):
    model = moderator(family)
    tokenizer = model.processor.tokenizer
    for ids, word in ((model.yes_ids, "Yes"), (model.no_ids, "No")):
        # both spellings: the bare word and the word after a space
        assert len(ids) == 2, f"{family}: {word} is not two single tokens"
        assert {tokenizer.decode([i]).strip() for i in ids} == {word}
        assert {tokenizer.convert_ids_to_tokens(i).startswith(("▁", "Ġ")) for i in ids} == {True, False}
    assert not set(model.yes_ids) & set(model.no_ids)


def test_custom_taxonomy(tiny_checkpoints, moderator, images):
    violence = DEFAULT_TAXONOMY.categories[2]
    taxonomy = Taxonomy((Category("red_cars", "a red car", 0.7), Category("gore", violence.definition)))
    model = Moderator(str(tiny_checkpoints["llava-next"]), taxonomy, device="cpu", dtype="float32")
    scores = model(images)
    assert all(tuple(s) == ("red_cars", "gore") for s in scores)
    np.testing.assert_allclose(
        _matrix(scores, taxonomy.keys), _matrix(model.score_independent(images), taxonomy.keys), atol=TOLERANCE
    )
    # A category's score depends on its own question alone, not on its neighbours or position.
    defaults = moderator("llava-next")(images)
    for custom, default in zip(scores, defaults, strict=True):
        assert custom["gore"] == pytest.approx(default[violence.key], abs=TOLERANCE)


def test_prepare_in_a_thread_while_scoring(moderator, images):
    model = moderator("llava-onevision")
    expected = _matrix(model(images[:2]) + model(images[2:]))
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = model.prepare(images[:2])
        second = pool.submit(model.prepare, images[2:])
        scores = model.score(first)
        scores += model.score(second.result())
    np.testing.assert_array_equal(_matrix(scores), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_read_from_the_captions_cache_equal_independent_prompts(tiny_checkpoints, moderator, images, family):
    # Caption then moderation as the pipeline runs them: the image is encoded once, by the
    # caption's prefill, and the categories read its keys and values from the generation cache.
    captioner = Captioner(str(tiny_checkpoints[family]), device="cpu", dtype="float32", max_new_tokens=3)
    shared = Moderator(str(tiny_checkpoints[family]), DEFAULT_TAXONOMY, share=captioner)
    assert shared.reads_prefix_of(captioner) and not shared.reads_prefix_of(None)
    # The prefix ends before the caption prompt's text, so the instruction is a shared segment.
    assert len(shared.shared_ids) >= 5
    prepared = captioner.prepare(images)
    if family in PADDED_FAMILIES:
        assert len(set((prepared["attention_mask"] == 0).sum(dim=1).tolist())) >= 3
    with _VisionPasses(captioner.model) as passes:
        captions, encoded = captioner.generate_encoded(prepared)
        scores = shared.score_encoded(encoded)
    assert passes.calls == 1
    assert captions == captioner.generate(prepared)
    reference = moderator(family).score_independent(images)
    np.testing.assert_allclose(_matrix(scores), _matrix(reference), rtol=0, atol=TOLERANCE)
    matrix = _matrix(scores)
    assert (matrix.max(axis=1) - matrix.min(axis=1)).min() > 20 * TOLERANCE

    # Inputs the captioner did not prepare (another prompt) are refused, not misread.
    other = Captioner(str(tiny_checkpoints[family]), prompt="Name the main object.", device="cpu", dtype="float32", max_new_tokens=1)
    with pytest.raises(RuntimeError):
        shared.score_encoded(other.generate_encoded(other.prepare(images[:1]))[1])


def test_shares_a_captioners_weights(tiny_checkpoints, moderator, images):
    captioner = Captioner(str(tiny_checkpoints["llava"]), device="cpu", dtype="float32", max_new_tokens=4)
    shared = Moderator(str(tiny_checkpoints["llava"]), DEFAULT_TAXONOMY, share=captioner)
    assert shared.model is captioner.model and shared.model_id == str(tiny_checkpoints["llava"])
    np.testing.assert_allclose(_matrix(shared(images)), _matrix(moderator("llava")(images)), atol=TOLERANCE)
    assert captioner(images[:1])  # and the captioner still works

    # Another checkpoint, or another dtype, loads its own weights.
    other = Moderator(str(tiny_checkpoints["llava"]), DEFAULT_TAXONOMY, dtype="float64", share=captioner)
    assert other.model is not captioner.model and other.model.dtype == torch.float64


def test_a_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as raised:
        Moderator(str(tmp_path / "missing"), DEFAULT_TAXONOMY, device="cpu")
    assert "\n" not in str(raised.value)


def test_forwards_build_no_kv_cache(moderator, images, monkeypatch):
    """Nothing reads a scoring forward's keys and values again: no cache of every layer is built."""
    model = moderator("llava")
    seen = []
    language = model.model.model.language_model
    forward = language.forward

    def recording(*args, **kwargs):
        output = forward(*args, **kwargs)
        seen.append((kwargs.get("use_cache"), output.past_key_values))
        return output

    monkeypatch.setattr(language, "forward", recording)
    model(images[:2])
    model.score_independent(images[:1])
    assert seen and all(use_cache is False and cache is None for use_cache, cache in seen)
