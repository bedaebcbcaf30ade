"""The `loupe serve` web app over one OUTPUT: the JSON API (with its OpenAPI page) and the static page."""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from loupe.jobs.indexing import KINDS
from loupe.jobs.search import Hit
from loupe.jobs.serve.catalog import Catalog
from loupe.jobs.serve.guard import COOKIE, BodyLimit, guard, log, session_value
from loupe.jobs.serve.query import Filters, Searcher, load_searchers
from loupe.jobs.serve.thumbs import SIZES, NoThumbnail, Thumbnails
from loupe.jobs.status import job_status
from loupe.schemas.errors import DamagedOutput, UserError

STATIC = Path(__file__).with_name("static")
UPLOAD_LIMIT = 20 << 20  # bytes of one uploaded query image
MAX_RESULTS = 1000  # offset + k of one search
REVIEW_PAGE = 200
STATUS_SECONDS = 5.0  # job status is re-read at most this often (a running job's stats change)


class SearchOut(BaseModel):
    """One page of results; each hit exactly as `loupe search --json` prints it."""

    hits: list[Hit]
    offset: int
    k: int
    more: bool


class CategoryOut(BaseModel):
    key: str
    definition: str
    threshold: float


class CategoriesOut(BaseModel):
    moderated: bool
    categories: list[CategoryOut]


class ReviewItem(BaseModel):
    image_id: str
    score: float
    flagged: bool
    caption: str | None


class ReviewOut(BaseModel):
    category: str
    threshold: float
    total: int
    offset: int
    items: list[ReviewItem]


@dataclass(frozen=True)
class SearchParams:
    kind: str
    k: int
    offset: int
    filters: Filters


def search_params(
    kind: Annotated[str, Query(description="image (CLIP vectors) or caption (sentence vectors) index.")] = "image",
    k: Annotated[int, Query(ge=1, le=MAX_RESULTS, description="How many results (a page).")] = 10,
    offset: Annotated[int, Query(ge=0, description="Results to skip first: the next page starts at offset + k.")] = 0,
    exclude_flagged: Annotated[bool, Query(description="Leave out images flagged by moderation.")] = False,
    flagged: Annotated[str | None, Query(description="Only images flagged for this category.")] = None,
    min_scores: Annotated[
        list[str], Query(alias="min", description="CATEGORY:SCORE, repeatable: only images scoring at least this.")
    ] = [],  # noqa: B006 - FastAPI copies defaults
    all_duplicates: Annotated[
        bool, Query(description="Every near-duplicate, not one hit per group (after loupe dedup).")
    ] = False,
) -> SearchParams:
    minimums: dict[str, float] = {}
    for item in min_scores:
        category, _, value = item.partition(":")
        try:
            minimums[category] = float(value)
        except ValueError:
            raise UserError(f"min must be CATEGORY:SCORE, got {item!r}") from None
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if offset + k > MAX_RESULTS:
        raise UserError(f"offset + k must be at most {MAX_RESULTS}")
    return SearchParams(kind, k, offset, Filters(exclude_flagged, flagged, minimums, all_duplicates))


def create_app(output: str, *, endpoint_url: str | None = None, token: str | None = None) -> FastAPI:
    """The app over OUTPUT, its catalog and indexes loaded now; a damaged OUTPUT or index raises here."""
    catalog = Catalog.open(output, endpoint_url)
    searchers = load_searchers(catalog)
    indexes = ", ".join(f"{kind} ({s.record.vectors} vectors)" for kind, s in searchers.items()) or "none"
    state = "complete" if catalog.complete else "partial"
    log.info(
        "loaded %s: %d rows from %d parts, %s job; indexes: %s",
        output, catalog.rows.num_rows, len(catalog.parts), state, indexes,
    )
    return build_app(catalog, searchers, token=token)


def build_app(catalog: Catalog, searchers: dict[str, Searcher], *, token: str | None = None) -> FastAPI:
    app = FastAPI(
        title="loupe serve",
        summary="Search and browse one loupe catalog.",
        description="JSON API of `loupe serve`. Search results equal `loupe search --json` for the same query.",
        docs_url=None,  # FastAPI's pages load script from a CDN; /docs is written here instead
        redoc_url=None,
    )
    thumbnails = Thumbnails(catalog)
    status = _StatusCache(catalog)
    app.add_middleware(BodyLimit, limit=UPLOAD_LIMIT + (64 << 10))
    app.middleware("http")(guard(token))
    _errors(app)

    def searcher(kind: str) -> Searcher:
        if kind not in searchers:
            extra = "" if kind == "image" else f" --kind {kind}"
            raise UserError(f"no {kind} index in {catalog.output}; run loupe index {catalog.output}{extra}")
        return searchers[kind]

    def respond(params: SearchParams, searcher_: Searcher, vector, skip_row: int | None = None) -> SearchOut:
        filters = replace(params.filters, skip_row=skip_row)
        hits = searcher_.search(vector, params.offset + params.k, filters)
        return SearchOut(
            hits=hits[params.offset :], offset=params.offset, k=params.k, more=len(hits) == params.offset + params.k
        )

    @app.get("/api/search", response_model=SearchOut, tags=["search"])
    def search_text(
        params: Annotated[SearchParams, Depends(search_params)],
        q: Annotated[str | None, Query(description="Text to search for.")] = None,
        like: Annotated[str | None, Query(description="Or: an image id of this catalog, for its nearest neighbours.")] = None,
    ) -> SearchOut:
        """Search by text (or by a catalog image's stored vector); the same ranking and filters as `loupe search`."""
        if (q is None) == (like is None):
            raise UserError("give exactly one query: q (a text) or like (an image id)")
        chosen = searcher(params.kind)
        if q is not None:
            return respond(params, chosen, chosen.text_vector(q))
        row = catalog.locate(like)
        if row is None:
            raise HTTPException(404, f"no image {like} in this catalog")
        return respond(params, chosen, chosen.stored_vector(row), skip_row=row)

    @app.post("/api/search", response_model=SearchOut, tags=["search"])
    def search_image(
        image: Annotated[UploadFile, File(description=f"The query image (at most {UPLOAD_LIMIT >> 20} MiB).")],
        params: Annotated[SearchParams, Depends(search_params)],
    ) -> SearchOut:
        """Search by an uploaded image, through the same safe decoder and CLIP image tower as `loupe search --image`."""
        if params.kind != "image":
            raise UserError("an image query searches the image index; use kind=image")
        chosen = searcher("image")
        data = image.file.read(UPLOAD_LIMIT + 1)
        if len(data) > UPLOAD_LIMIT:
            raise HTTPException(413, f"the image is over the limit of {UPLOAD_LIMIT >> 20} MiB")
        return respond(params, chosen, chosen.image_vector(data, " ".join((image.filename or "upload").split())))

    @app.get("/api/images/{image_id}", tags=["images"])
    def image_row(image_id: Annotated[str, PathParam(description="The row's image_id.")]) -> dict[str, Any]:
        """One image's row as its part stores it, without the embedding vectors."""
        row = catalog.locate(image_id)
        if row is None:
            raise HTTPException(404, f"no image {image_id} in this catalog")
        return catalog.full_row(row)

    @app.get(
        "/api/images/{image_id}/thumbnail",
        tags=["images"],
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG no larger than size x size."}},
    )
    def thumbnail(
        image_id: Annotated[str, PathParam(description="The row's image_id.")],
        size: Annotated[int, Query(description=f"Longest side: one of {', '.join(map(str, SIZES))}.")] = SIZES[0],
    ) -> Response:
        """A thumbnail made from the image's source object by the safe decoder (cached)."""
        data = thumbnails.get(image_id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/status", tags=["job"])
    def job() -> dict[str, Any]:
        """The job's status as `loupe status --json` reports it, and what this server holds."""
        return status.get() | {
            "serving": {
                "parts": len(catalog.parts),
                "rows": catalog.rows.num_rows,
                "manifest_complete": catalog.complete,
                "indexes": {kind: s.record.vectors for kind, s in searchers.items()},
            }
        }

    @app.get("/api/categories", response_model=CategoriesOut, tags=["job"])
    def categories() -> CategoriesOut:
        """The job's moderation categories and their thresholds."""
        return CategoriesOut(
            moderated=bool(catalog.categories),
            categories=[CategoryOut(key=c.key, definition=c.definition, threshold=c.threshold) for c in catalog.categories],
        )

    @app.get("/api/review/{category}", response_model=ReviewOut, tags=["job"])
    def review(
        category: Annotated[str, PathParam(description="A moderation category key.")],
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=REVIEW_PAGE)] = 50,
    ) -> ReviewOut:
        """Images by their score for one category, highest first."""
        order = catalog.review_order(category)
        threshold = next(c.threshold for c in catalog.categories if c.key == category)
        scores = catalog.scores(category)
        items = []
        for row in order[offset : offset + limit]:
            held = catalog.held(int(row))
            score = float(scores[row])
            items.append(ReviewItem(image_id=held["image_id"], score=score, flagged=score >= threshold, caption=held["caption"]))
        return ReviewOut(category=category, threshold=threshold, total=len(order), offset=offset, items=items)

    _pages(app, token)
    return app


def _pages(app: FastAPI, token: str | None) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html")

    @app.get("/login", include_in_schema=False)
    def login_form() -> Response:
        return RedirectResponse("/", 303) if not token else HTMLResponse(_login_page(""))

    @app.post("/login", include_in_schema=False)
    def login(given: Annotated[str, Form(alias="token")] = "") -> Response:
        if not token:
            return RedirectResponse("/", 303)
        if not hmac.compare_digest(given.encode(), token.encode()):
            return HTMLResponse(_login_page("That token is not the one this server was started with."), 401)
        response = RedirectResponse("/", 303)
        response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="strict", path="/")
        return response


def _login_page(message: str) -> str:
    # Built from constants only: nothing a client sent is ever put in a page.
    note = f'<p class="error" role="alert">{message}</p>' if message else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>loupe: log in</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/static/app.css"></head><body class="login">'
        '<form method="post" action="/login" class="login-form"><h1>loupe</h1>'
        "<p>This catalog needs the token its server was started with.</p>"
        f'{note}<label>Token <input type="password" name="token" id="token" autocomplete="current-password" autofocus></label>'
        '<button type="submit" id="login">Log in</button></form></body></html>'
    )


def _errors(app: FastAPI) -> None:
    """Every refusal is one line: {"detail": "..."}."""

    @app.exception_handler(UserError)
    def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(DamagedOutput)
    def damaged(request: Request, exc: DamagedOutput) -> JSONResponse:
        return JSONResponse({"detail": f"damaged output: {exc}"}, status_code=500)

    @app.exception_handler(NoThumbnail)
    def no_thumbnail(request: Request, exc: NoThumbnail) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": " ".join(f"invalid {where}: {error.get('msg')}".split())[:300]}, status_code=422)


class _StatusCache:
    """job_status, re-read at most every STATUS_SECONDS (it lists and reads OUTPUT's stats records)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._value: dict[str, Any] | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._value is None or time.monotonic() - self._read_at > STATUS_SECONDS:
                self._value = job_status(self.catalog.output, self.catalog.endpoint_url).to_dict()
                self._read_at = time.monotonic()
            return self._value
