"""The per-shard pipeline in-process: rows in source order, error rows, model-failure isolation."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from loupe.schemas.config import JobConfig
from loupe.schemas.layout import part_path, stats_path
from loupe.schemas.records import ShardStats
from loupe.schemas.plan import Shard, ShardKind
from loupe.schemas.rows import OUTPUT_SCHEMA
from loupe.schemas.taxonomy import Category, Taxonomy
from loupe.workers.batching import BUCKET_BATCHES
from loupe.workers.decode import decode_image
from loupe.workers.models.stages import Captioning, ImageEmbedding, Moderating, TextEmbedding
from loupe.workers.pipeline import ShardProcessor
from loupe.workers.reader import image_id_for


class SizeCaptioner(Captioning):
    """Captions an image by its size; fails on images of a chosen width (or on all of them)."""

    model_id = "stub"

    def __init__(self, fail_width=None, fail_all=False):
        self.fail_width, self.fail_all, self.calls = fail_width, fail_all, []

    def prepare(self, images):
        return [im.size for im in images]

    def generate(self, sizes):
        self.calls.append(len(sizes))
        if self.fail_all or any(w == self.fail_width for w, _ in sizes):
            raise RuntimeError("CUDA error: simulated")
        return [f"{w}x{h}" for w, h in sizes]


def _shard(folder, names):
    return Shard(3, ShardKind.FILES, tuple(str(folder / n) for n in names))


def _config(folder, out, **kw):
    settings = dict(input=str(folder), output=str(out), model="stub", batch_size=3, tasks="caption")
    return JobConfig(**(settings | kw))


def test_rows_follow_source_order_with_error_rows(sample_images, tmp_path):
    names = sorted(p.name for p in sample_images.iterdir())
    processor = ShardProcessor(_config(sample_images, tmp_path), captioner=SizeCaptioner())
    stats = processor.process(_shard(sample_images, names), node_id="n1")

    table = pq.read_table(tmp_path / part_path(3))
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    assert table["moderation"].null_count == len(table), "no moderation task, no scores"
    rows = table.to_pylist()
    assert [r["source_uri"] for r in rows] == [str(sample_images / n) for n in names]
    assert all(r["image_id"] == image_id_for(r["source_uri"]) for r in rows)
    errors = {r["source_uri"].rsplit("/", 1)[-1]: r["error_code"] for r in rows if r["status"] == "error"}
    assert errors == {"broken-empty.jpg": "empty_file", "broken-truncated.jpg": "truncated"}
    for r in rows:
        if r["status"] == "ok":
            assert r["caption"] == f"{r['width']}x{r['height']}" and len(r["sha256"]) == 64

    recorded = ShardStats.from_json((tmp_path / stats_path(3)).read_bytes())
    assert recorded == stats
    assert (stats.rows, stats.rows_ok, stats.rows_error) == (14, 12, 2)
    assert stats.error_codes == {"empty_file": 1, "truncated": 1}
    assert {"fetch", "decode", "preprocess", "generate", "write"} <= stats.timings.keys()


def test_one_failing_image_becomes_an_error_row(sample_images, tmp_path):
    names = sorted(p.name for p in sample_images.iterdir() if p.name.startswith("scene"))
    captioner = SizeCaptioner(fail_width=200)
    processor = ShardProcessor(_config(sample_images, tmp_path), captioner=captioner)
    stats = processor.process(_shard(sample_images, names))
    rows = pq.read_table(tmp_path / part_path(3)).to_pylist()
    failed = [r for r in rows if r["status"] == "error"]
    assert failed and all(r["width"] is None and r["error_code"] == "model_failed" for r in failed)
    assert "simulated" in failed[0]["error_message"]
    assert stats.rows_ok == len(rows) - len(failed) > 0


def test_a_model_failing_on_everything_fails_the_shard(sample_images, tmp_path):
    processor = ShardProcessor(_config(sample_images, tmp_path), captioner=SizeCaptioner(fail_all=True))
    with pytest.raises(RuntimeError, match="every image"):
        processor.process(_shard(sample_images, ["scene-000.png", "scene-001.jpg"]))
    assert not (tmp_path / stats_path(3)).exists()


def test_real_tiny_model_captions(sample_images, tmp_path, tiny_llava):
    config = JobConfig(
        input=str(sample_images), output=str(tmp_path), model=tiny_llava, max_new_tokens=6, batch_size=4,
        tasks="caption,moderate",
    )
    processor = ShardProcessor(config, device="cpu")
    names = ["scene-000.png", "scene-001.jpg", "scene-002.jpg", "broken-empty.jpg", "scene-003.jpg"]
    vision_passes = []
    hook = processor.captioner.model.model.vision_tower.register_forward_hook(lambda *_: vision_passes.append(1))
    try:
        processor.process(_shard(sample_images, names))
    finally:
        hook.remove()
    # The moderator read the image prefix from the caption's KV cache: the one batch of four
    # images went through the vision tower once, for captions and scores together.
    assert processor.moderation_reads_cache and len(vision_passes) == 1
    rows = pq.read_table(tmp_path / part_path(3)).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error", "ok"]
    assert all(r["caption"] for r in rows if r["status"] == "ok")
    assert {r["model"] for r in rows} == {tiny_llava}
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(set(r["moderation"]) == set(config.taxonomy.keys) for r in ok)
    assert all(0.0 <= v <= 1.0 for r in ok for v in r["moderation"].values())
    assert {r["moderation_model"] for r in ok} == {tiny_llava}
    assert rows[3]["moderation"] is None and rows[3]["flagged"] is None
    # JPEGs were decoded at a reduced scale that still covers the 28-pixel model input; the rows
    # give the full size.
    assert processor.decode_side == 28
    for row in ok:
        with Image.open(sample_images / Path(row["source_uri"]).name) as full:
            assert (row["width"], row["height"]) == full.size
    # and its scores are those of the whole moderation prompt run on its own, per category
    images = [
        decode_image((sample_images / name).read_bytes(), min_side=processor.decode_side)
        for name in names
        if name != "broken-empty.jpg"
    ]
    reference = processor.moderator.score_independent(images)
    for row, expected in zip(ok, reference, strict=True):
        assert row["moderation"] == pytest.approx(expected, abs=1e-4)


def test_poison_corpus_every_file_becomes_a_row(tmp_path):
    """A shard of every hazard: no exception, one row per file, each ok or with its code."""
    from tests.poison import make_poison_corpus

    corpus = make_poison_corpus(tmp_path / "poison")
    names = sorted(corpus)
    processor = ShardProcessor(_config(tmp_path / "poison", tmp_path / "out"), captioner=SizeCaptioner())
    processor.process(_shard(tmp_path / "poison", names))
    rows = {r["source_uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(tmp_path / "out" / part_path(3)).to_pylist()}
    assert sorted(rows) == names
    for name, expect in corpus.items():
        row = rows[name]
        if expect.code is None:
            assert (row["status"], row["width"], row["height"]) == ("ok", *expect.size), name
        else:
            assert (row["status"], row["error_code"]) == ("error", expect.code.value), name
            assert row["error_message"] and "\n" not in row["error_message"]


TWO_CATEGORIES = Taxonomy((Category("violence_gore", "blood or gore", 0.3), Category("self_harm", "self-harm", 0.5)))


class StubModerator(Moderating):
    """Scores violence_gore by the image's width, everything else 0; fails on a chosen width."""

    def __init__(self, fail_width=None):
        self.fail_width = fail_width

    def prepare(self, images):
        return [im.size for im in images]

    def score(self, sizes):
        if any(w == self.fail_width for w, _ in sizes):
            raise RuntimeError("judge failed")
        return [{"violence_gore": w / 1000, "self_harm": 0.0} for w, _ in sizes]


def test_moderation_columns_thresholds_and_counts(sample_images, tmp_path):
    taxonomy = TWO_CATEGORIES
    config = _config(sample_images, tmp_path, tasks="caption,moderate", taxonomy=taxonomy, moderation_model="judge")
    processor = ShardProcessor(config, captioner=SizeCaptioner(), moderator=StubModerator(fail_width=640))
    names = sorted(p.name for p in sample_images.iterdir())
    stats = processor.process(_shard(sample_images, names))
    table = pq.read_table(tmp_path / part_path(3))
    assert table.schema.field("moderation").type.names == ["violence_gore", "self_harm"]
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok
    for r in ok:
        assert r["flagged"] == (r["width"] >= 300)
        assert r["flagged_categories"] == (["violence_gore"] if r["width"] >= 300 else [])
        assert r["moderation_model"] == "judge" and r["taxonomy_sha256"] == taxonomy.content_hash()
    failed = [r for r in rows if r["error_code"] == "model_failed"]
    assert failed and all(r["moderation"] is None and "judge failed" in r["error_message"] for r in failed)
    assert stats.rows_flagged == sum(r["flagged"] for r in ok) == stats.flagged["violence_gore"]
    assert "self_harm" not in stats.flagged and "moderate" in stats.timings


def test_moderate_only_leaves_captions_null(sample_images, tmp_path):
    config = _config(sample_images, tmp_path, tasks="moderate", moderation_model="judge", taxonomy=TWO_CATEGORIES)
    processor = ShardProcessor(config, moderator=StubModerator())
    processor.process(_shard(sample_images, ["scene-000.png", "scene-001.jpg"]))
    rows = pq.read_table(tmp_path / part_path(3)).to_pylist()
    assert [r["caption"] for r in rows] == [None, None]
    assert all(r["moderation"] is not None for r in rows)


class StubImageEmbedder(ImageEmbedding):
    """Embeds an image as its normalized (width, height, 1, 0)."""

    dim = 4

    def prepare(self, images):
        return [im.size for im in images]

    def embed(self, sizes):
        import numpy as np

        vectors = np.array([[w, h, 1.0, 0.0] for w, h in sizes], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class StubTextEmbedder(TextEmbedding):
    dim = 2

    def __init__(self):
        self.seen = []

    def embed_texts(self, texts):
        import numpy as np

        self.seen += texts
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


@pytest.mark.parametrize("text_column", [None, "txt"])
def test_embedding_columns(sample_images, tmp_path, text_column):
    import numpy as np

    from loupe.schemas.plan import ShardKind

    tar = tmp_path / "shard.tar"
    import io
    import tarfile

    with tarfile.open(tar, "w") as archive:
        for i, name in enumerate(["scene-000.png", "scene-001.jpg", "broken-empty.jpg"]):
            archive.add(sample_images / name, arcname=f"{i}.{name.rsplit('.', 1)[1]}")
            if i != 1:
                data = f"alt text {i}".encode()
                info = tarfile.TarInfo(f"{i}.txt")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    texts = StubTextEmbedder()
    config = _config(tmp_path, tmp_path / "out", tasks="caption,embed", text_column=text_column)
    processor = ShardProcessor(
        config, captioner=SizeCaptioner(), image_embedder=StubImageEmbedder(), text_embedder=texts
    )
    processor.process(Shard(0, ShardKind.TAR, (str(tar),)))
    table = pq.read_table(tmp_path / "out" / part_path(0))
    import pyarrow as pa

    text = "text_embedding" if text_column else "caption_embedding"  # the name says what was embedded
    assert table.schema.field("image_embedding").type == pa.list_(pa.float32(), 4)
    assert table.schema.field(text).type == pa.list_(pa.float32(), 2)
    assert ({"caption_embedding", "text_embedding"} - {text}).isdisjoint(table.schema.names)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert rows[2]["image_embedding"] is None and rows[2][text] is None
    assert np.allclose(np.linalg.norm(rows[0]["image_embedding"]), 1.0)
    if text_column:  # the sidecar text, and nothing for the image without one
        assert texts.seen == ["alt text 0"] and rows[1][text] is None
    else:
        assert texts.seen == [rows[0]["caption"], rows[1]["caption"]]
        assert rows[1][text] == [len(rows[1]["caption"]), 1.0]


class LengthCaptioner(SizeCaptioner):
    """A SizeCaptioner whose prompt length is the image's width, as anyres makes it depend on size."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def image_tokens(self, sizes):
        return [w for w, _ in sizes]

    def generate(self, sizes):
        self.batches.append([w for w, _ in sizes])
        return super().generate(sizes)


def test_batches_are_bucketed_by_prompt_length_and_rows_keep_source_order(tmp_path):
    widths = [40, 90, 40, 90, 60, 40, 90, 60, 60, 40, 90, 60, 50]
    for i, width in enumerate(widths):
        Image.new("RGB", (width, 30), "blue").save(tmp_path / f"img-{i:02d}.png")
    names = [f"img-{i:02d}.png" for i in range(len(widths))]
    captioner = LengthCaptioner()
    out = tmp_path / "out"
    processor = ShardProcessor(_config(tmp_path, out, batch_size=4), captioner=captioner)
    processor.process(_shard(tmp_path, names))
    window = BUCKET_BATCHES * 4  # 16 > 13 images: one window, sorted by length
    assert window >= len(widths)
    assert captioner.batches == [[40, 40, 40, 40], [50, 60, 60, 60], [60, 90, 90, 90], [90]]
    rows = pq.read_table(out / part_path(3)).to_pylist()
    assert [r["caption"] for r in rows] == [f"{w}x30" for w in widths]


@pytest.mark.timeout(60)
def test_a_model_failing_on_everything_fails_a_long_shard_promptly(tmp_path):
    """The model fails while more batches wait: the shard raises and its producer does not stay blocked."""
    import threading

    names = [f"img-{i:02d}.png" for i in range(30)]
    for i, name in enumerate(names):
        Image.new("RGB", (40 + i, 30), "red").save(tmp_path / name)
    processor = ShardProcessor(_config(tmp_path, tmp_path / "out", batch_size=2), captioner=SizeCaptioner(fail_all=True))
    with pytest.raises(RuntimeError, match="every image"):
        processor.process(_shard(tmp_path, names))
    assert not [t for t in threading.enumerate() if t.name.startswith("loupe-shard")]
    assert not (tmp_path / "out" / stats_path(3)).exists()
