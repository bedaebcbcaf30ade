"""What every request of `loupe serve` passes through: the token, a body limit, security headers, one log line."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loupe.schemas.errors import UserError, one_line

log = logging.getLogger("loupe.serve")

# Only the default bind names count as loopback: any other address, 127.0.0.2 included, may be
# forwarded or shared (containers, tunnels), so it needs a token.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
COOKIE = "loupe_session"
# No inline script or style anywhere; images only from this server (and blob: for the dropped query's preview).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Reachable without the token: the login form and the style sheet it uses.
OPEN_PATHS = ("/login", "/static/app.css")


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (one line)."""
    if host in LOOPBACK_HOSTS or token:
        return
    raise UserError(
        f"--host {host} would serve the catalog beyond this machine without a token; "
        "pass --token (or bind 127.0.0.1)"
    )


def session_value(token: str) -> str:
    """The login cookie's value: derived from the token, so the cookie never holds the token itself."""
    return hmac.new(token.encode(), b"loupe serve session", hashlib.sha256).hexdigest()


def authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return hmac.compare_digest(cookie.encode(), session_value(token).encode())


def guard(token: str | None) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """The HTTP middleware: token check, security headers, one log line per request (and per error)."""

    async def middleware(request: Request, call_next) -> Response:
        started = time.perf_counter()
        path = request.url.path
        if token and path not in OPEN_PATHS and not authorized(request, token):
            response: Response = _unauthorized(request)
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # a bug, not a user mistake: one line in the log, none of it in the reply
                log.error("error: %s %s: %s", request.method, path, one_line(exc))
                response = JSONResponse({"detail": "internal error (see the server log)"}, status_code=500)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers.setdefault("Cache-Control", "no-store")
        log.info("%s %s %d %.1f ms", request.method, path, response.status_code, 1000 * (time.perf_counter() - started))
        return response

    return middleware


def _unauthorized(request: Request) -> Response:
    if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/login", status_code=303)
    return JSONResponse(
        {"detail": "a token is required: send Authorization: Bearer TOKEN, or log in at /login"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413 before it is read whole (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # An HTTPException, so the app's own handler answers it while the body is being parsed.
                raise HTTPException(413, self._reason())
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse({"detail": self._reason()}, status_code=413)(scope, receive, send)

    def _reason(self) -> str:
        return f"the request body is over the limit of {self.limit / (1 << 20):g} MiB"
