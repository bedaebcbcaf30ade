"""The JSON API through FastAPI's test client: every endpoint, and every refusal as one line."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from loupe.jobs.search import search
from loupe.jobs.serve.app import UPLOAD_LIMIT
from loupe.jobs.status import job_status
from tests.jobs.serve.conftest import NEVER, THRESHOLD, XSS_CAPTION, png_bytes


@pytest.fixture(scope="module")
def client(served_app):
    return TestClient(served_app)


@pytest.fixture(scope="module")
def rows(catalog_output):
    out = Path(catalog_output)
    manifest = json.loads((out / "_manifest.json").read_text())
    return [r for p in manifest["parts"] for r in pq.read_table(out / p["path"]).to_pylist()]


def one_line(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail, response.json()
    return detail


def hits(output, **kwargs):
    return [hit.to_dict() for hit in search(output, **kwargs)]


@pytest.mark.parametrize(
    "params, kwargs",
    [
        ({"q": "a red square", "k": 5}, {"text": "a red square", "k": 5}),
        ({"q": "a red square", "k": 4, "exclude_flagged": "true"}, {"text": "a red square", "k": 4, "exclude_flagged": True}),
        ({"q": "circles", "k": 3, "flagged": "violence_gore"}, {"text": "circles", "k": 3, "flagged": "violence_gore"}),
        ({"q": "a red square", "k": 12}, {"text": "a red square", "k": 12}),
        ({"q": "buss glass", "k": 4, "kind": "caption"}, {"text": "buss glass", "k": 4, "kind": "caption"}),
    ],
)
def test_text_search_equals_loupe_search(client, catalog_output, params, kwargs):
    answer = client.get("/api/search", params=params)
    assert answer.status_code == 200, answer.text
    assert answer.json()["hits"] == hits(catalog_output, **kwargs)


def test_pages_are_slices_of_the_same_ranking(client, catalog_output):
    everything = hits(catalog_output, text="a red square", k=7)
    first = client.get("/api/search", params={"q": "a red square", "k": 4}).json()
    second = client.get("/api/search", params={"q": "a red square", "k": 3, "offset": 4}).json()
    assert first["hits"] + second["hits"] == everything and first["more"]
    assert [h["rank"] for h in second["hits"]] == [5, 6, 7]
    last = client.get("/api/search", params={"q": "a red square", "k": 10, "offset": 10}).json()
    assert len(last["hits"]) == 2 and not last["more"]  # 12 images in all


def test_image_search_equals_loupe_search_by_image(client, catalog_output, rows):
    source = next(r["source_uri"] for r in rows if r["status"] == "ok" and r["source_uri"].endswith(".jpg"))
    data = Path(source).read_bytes()
    answer = client.post("/api/search", params={"k": 4}, files={"image": ("query.jpg", data, "image/jpeg")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["hits"] == hits(catalog_output, image=source, k=4)
    assert answer.json()["hits"][0]["source_uri"] == source
    filtered = client.post(
        "/api/search", params={"k": 2, "exclude_flagged": "true"}, files={"image": ("q.jpg", data, "image/jpeg")}
    )
    assert filtered.json()["hits"] == hits(catalog_output, image=source, k=2, exclude_flagged=True)


def test_neighbours_and_minimum_scores(client, catalog_output, rows):
    ok = [r for r in rows if r["status"] == "ok"]
    like = client.get("/api/search", params={"like": ok[3]["image_id"], "k": 5}).json()["hits"]
    assert len(like) == 5 and ok[3]["image_id"] not in {h["image_id"] for h in like}
    assert [h["score"] for h in like] == sorted((h["score"] for h in like), reverse=True)

    scores = {r["image_id"]: r["moderation"] for r in ok}
    minimum = sorted(s["violence_gore"] for s in scores.values())[6]  # half of them pass
    answer = client.get("/api/search", params={"q": "a red square", "k": 12, "min": f"violence_gore:{minimum}"})
    kept = [h["image_id"] for h in answer.json()["hits"]]
    ranking = [h["image_id"] for h in hits(catalog_output, text="a red square", k=12)]
    assert kept == [i for i in ranking if scores[i]["violence_gore"] >= minimum] and len(kept) == 6


def test_one_image_row(client, rows):
    row = next(r for r in rows if r["caption"] == XSS_CAPTION)
    answer = client.get(f"/api/images/{row['image_id']}")
    assert answer.status_code == 200
    got = answer.json()
    assert "image_embedding" not in got and "caption_embedding" not in got
    expected = {k: v for k, v in row.items() if not k.endswith("_embedding")}
    assert got["moderation"] == pytest.approx(expected.pop("moderation"))
    got.pop("moderation")
    assert got == expected
    missing = client.get("/api/images/0123456789abcdef0123456789abcdef")
    assert missing.status_code == 404 and "no image" in one_line(missing)


def test_thumbnails_only_for_listed_images(client, rows):
    ok = next(r for r in rows if r["status"] == "ok" and (r["width"] or 0) > 300)
    small = client.get(f"/api/images/{ok['image_id']}/thumbnail")
    assert small.status_code == 200 and small.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(small.content))
    assert max(picture.size) == 256 and picture.format == "JPEG"
    large = Image.open(io.BytesIO(client.get(f"/api/images/{ok['image_id']}/thumbnail?size=1024").content))
    assert large.size == (ok["width"], ok["height"])  # never enlarged
    assert client.get(f"/api/images/{ok['image_id']}/thumbnail?size=300").status_code == 400

    error = next(r for r in rows if r["status"] == "error")
    refused = client.get(f"/api/images/{error['image_id']}/thumbnail")
    assert refused.status_code == 404 and "error row" in one_line(refused)
    # A path or URI in place of an id opens nothing: only ids the manifest lists are looked up.
    for probe in (ok["source_uri"], "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "s3://bucket/key.jpg"):
        answer = client.get(f"/api/images/{probe}/thumbnail")
        assert answer.status_code == 404, probe


def test_status_categories_and_review(client, catalog_output, rows):
    status = client.get("/api/status").json()
    assert {k: v for k, v in status.items() if k != "serving"} == job_status(catalog_output).to_dict()
    assert status["complete"] and status["serving"] == {
        "parts": 3, "rows": 14, "manifest_complete": True, "indexes": {"image": 12, "caption": 12},
    }
    categories = client.get("/api/categories").json()
    assert categories["moderated"] and len(categories["categories"]) == 10
    assert {c["key"]: c["threshold"] for c in categories["categories"]}["violence_gore"] == THRESHOLD
    assert all(c["threshold"] == 0.9 for c in categories["categories"] if c["key"] in NEVER)

    review = client.get("/api/review/violence_gore", params={"limit": 5}).json()
    scores = sorted((r["moderation"]["violence_gore"] for r in rows if r["moderation"]), reverse=True)
    assert review["total"] == 12 and [i["score"] for i in review["items"]] == pytest.approx(scores[:5])
    assert all(i["flagged"] == (i["score"] >= THRESHOLD) for i in review["items"])
    rest = client.get("/api/review/violence_gore", params={"offset": 5, "limit": 200}).json()["items"]
    assert [i["score"] for i in rest] == pytest.approx(scores[5:])
    assert client.get("/api/review/nonsense").status_code == 400


@pytest.mark.parametrize(
    "params, status, words",
    [
        ({"q": "x", "k": 0}, 422, "invalid k"),
        ({"q": "x", "k": "many"}, 422, "invalid k"),
        ({}, 400, "exactly one query"),
        ({"q": "x", "like": "y"}, 400, "exactly one query"),
        ({"q": "   "}, 400, "empty"),
        ({"q": "x", "kind": "audio"}, 400, "unknown index kind"),
        ({"q": "x", "exclude_flagged": "true", "flagged": "violence_gore"}, 400, "opposite"),
        ({"q": "x", "flagged": "nonsense"}, 400, "unknown category"),
        ({"q": "x", "min": "violence_gore"}, 400, "CATEGORY:SCORE"),
        ({"q": "x", "min": "violence_gore:2"}, 400, "between 0 and 1"),
        ({"q": "x", "k": 600, "offset": 600}, 400, "at most"),
        ({"like": "not-an-id"}, 404, "no image"),
    ],
)
def test_bad_searches_get_one_line(client, params, status, words):
    answer = client.get("/api/search", params=params)
    assert answer.status_code == status and words in one_line(answer)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_uploads_get_a_4xx_line(client):
    def upload(data, **params):
        return client.post("/api/search", params=params, files={"image": ("evil.png", data, "image/png")})

    assert "not_an_image" in one_line(upload(b"%PDF-1.4 not an image"))
    assert "empty" in one_line(upload(b""))
    assert "truncated" in one_line(upload(png_bytes()[:60]))
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # 144 megapixels in a few KiB
    refused = upload(bomb.getvalue())
    assert refused.status_code == 400 and "decompression_bomb" in one_line(refused)
    assert upload(png_bytes(), kind="caption").status_code == 400
    missing = client.post("/api/search")
    assert missing.status_code == 422 and "image" in one_line(missing)

    too_big = upload(b"\0" * (UPLOAD_LIMIT + (1 << 20)))
    assert too_big.status_code == 413 and "limit" in one_line(too_big)

    def chunks():  # no Content-Length: the limit counts the body as it streams in
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        yield boundary
        for _ in range(UPLOAD_LIMIT // (1 << 20) + 4):
            yield b"\0" * (1 << 20)

    streamed = client.post("/api/search", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and "limit" in one_line(streamed)


def test_every_response_has_the_security_headers(client):
    for path in ("/", "/docs", "/static/app.js", "/api/status", "/api/nothing", "/openapi.json"):
        answer = client.get(path)
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert answer.headers["x-content-type-options"] == "nosniff", path


def test_the_page_has_no_inline_script_and_never_renders_data_as_html():
    static = Path(__file__).parents[3] / "jobs" / "serve" / "static"
    for page in ("index.html", "docs.html"):
        html = (static / page).read_text()
        assert "<script>" not in html and not re.search(r"\s(style|on[a-z]+)=", html), page
    for script in ("app.js", "docs.js"):
        code = (static / script).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in code, (script, sink)


def test_openapi_page_documents_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/api/search", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail",
        "/api/status", "/api/categories", "/api/review/{category}",
    }
    assert set(spec["paths"]["/api/search"]) == {"get", "post"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and '<script src="/static/docs.js"' in docs.text


def test_one_log_line_per_request_and_per_error(client, loaded, caplog, monkeypatch):
    catalog, _ = loaded
    with caplog.at_level(logging.INFO, logger="loupe.serve"):
        client.get("/api/status")
    assert [r.getMessage().split()[:3] for r in caplog.records] == [["GET", "/api/status", "200"]]
    caplog.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(catalog, "full_row", broken)
    with caplog.at_level(logging.INFO, logger="loupe.serve"):
        answer = client.get(f"/api/images/{catalog.rows.column('image_id')[0]}")
    assert answer.status_code == 500 and "disk" not in answer.text
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("error: GET /api/images/") and "RuntimeError: disk on fire second line" in lines[0]
    assert lines[1].split()[2] == "500"
