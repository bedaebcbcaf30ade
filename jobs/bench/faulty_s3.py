"""A misbehaving S3 for tests and `loupe bench chaos`: a loopback proxy in front of a real S3 server that injects faults by a seeded schedule."""

from __future__ import annotations

import http.client
import random
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# What the proxy can do to one request:
SLOWDOWN = "slowdown"  # 503 SlowDown, the request never reaches the server
INTERNAL_ERROR = "internal_error"  # 500 InternalError, the request never reaches the server
RESET_GET = "reset_get"  # a GET's headers and half its body, then the connection closes
DROP_REPLY = "drop_reply"  # a PUT or POST is applied, then the connection closes unanswered
DELAY = "delay"  # the reply comes `delay_s` late
KINDS = (SLOWDOWN, INTERNAL_ERROR, RESET_GET, DROP_REPLY, DELAY)

_ERRORS = {
    SLOWDOWN: (503, "SlowDown", "Please reduce your request rate."),
    INTERNAL_ERROR: (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Counted beside the kinds: the retry of a completed multipart upload answered as S3 answers it.
NO_SUCH_UPLOAD = "no_such_upload"
_NO_SUCH_UPLOAD = (404, "NoSuchUpload", "The specified upload does not exist.")
# Headers that belong to one connection, not to the request or reply forwarded over another.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"}
_PIECE = 64 * 1024


@dataclass(frozen=True)
class Fault:
    """A scripted fault: `kind` done to the next request whose "METHOD /bucket/key?query" contains `match`."""

    kind: str
    match: str = ""


class FaultyS3:
    """An S3 endpoint at `url` that forwards to `upstream` and misbehaves.

    Scripted faults (`script`) come first, each used once by the first request it fits; any
    other request meets each kind with its probability in `rates`, drawn from a generator seeded
    by `seed`. `counts` says how many faults of each kind were done, `requests` how many came.

    A CompleteMultipartUpload whose reply was dropped leaves its upload id answered 404
    NoSuchUpload afterwards, as S3 does (moto would complete it again).
    """

    def __init__(
        self, upstream: str, *, seed: int = 0, rates: dict[str, float] | None = None, delay_s: float = 0.2
    ) -> None:
        unknown = set(rates or ()) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.rates = dict(rates or {})
        self.delay_s = delay_s
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self._random = random.Random(seed)
        self._script: deque[Fault] = deque()
        self._completed: set[str] = set()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.faults = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def script(self, *faults: Fault) -> None:
        """Queue faults to be done, in order, to the requests they match."""
        for fault in faults:
            if fault.kind not in KINDS:
                raise ValueError(f"unknown fault kind {fault.kind!r}")
        with self._lock:
            self._script.extend(faults)

    def start(self) -> FaultyS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop never started
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def choose(self, method: str, target: str) -> str | None:
        """The fault for this request, or None; a fault that fits only some requests skips the rest."""
        request = f"{method} {target}"
        with self._lock:
            self.requests += 1
            for fault in self._script:
                if fault.match in request and _fits(fault.kind, method):
                    self._script.remove(fault)
                    return fault.kind
            # One draw per kind whatever the request, so a seed gives the same schedule for the
            # same sequence of requests.
            drawn = [kind for kind in KINDS if self._random.random() < self.rates.get(kind, 0.0)]
        return next((kind for kind in drawn if _fits(kind, method)), None)

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def completed(self, upload_id: str) -> None:
        with self._lock:
            self._completed.add(upload_id)

    def is_completed(self, upload_id: str) -> bool:
        with self._lock:
            return upload_id in self._completed


def _fits(kind: str, method: str) -> bool:
    if kind == RESET_GET:
        return method == "GET"
    if kind == DROP_REPLY:
        return method in ("PUT", "POST")
    return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that went away (killed, or done waiting for a held reply) is no proxy bug.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _proxy(self) -> None:
        faults: FaultyS3 = self.server.faults
        upload_id = parse_qs(urlsplit(self.path).query).get("uploadId", [""])[0]
        # Every fault is counted before the client can see it, so a test reads final counts.
        if upload_id and faults.is_completed(upload_id):
            faults.count(NO_SUCH_UPLOAD)
            self._drain()
            self._error(*_NO_SUCH_UPLOAD)
            return
        kind = faults.choose(self.command, self.path)
        if kind in _ERRORS:
            faults.count(kind)
            self._drain()
            self._error(*_ERRORS[kind])
            return
        upstream = http.client.HTTPConnection(*faults.upstream, timeout=60)
        try:
            self._forward_request(upstream)
            response = upstream.getresponse()
            if kind == DROP_REPLY:
                response.read()
                if upload_id and self.command == "POST" and response.status == 200:
                    faults.completed(upload_id)
                faults.count(kind)
                self._hang_up()
                return
            if kind == DELAY:
                faults.count(kind)
                time.sleep(faults.delay_s)
            self._forward_response(response, cut=kind == RESET_GET)
        finally:
            upstream.close()

    def _body(self):
        """The request body in pieces, streamed (Content-Length or chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            piece = self.rfile.read(min(left, _PIECE))
            if not piece:
                raise ConnectionError("client closed mid-body")
            left -= len(piece)
            yield piece

    def _drain(self) -> None:
        for _ in self._body():
            pass

    def _forward_request(self, upstream: http.client.HTTPConnection) -> None:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                upstream.putheader(name, value)
        if chunked:
            upstream.putheader("Transfer-Encoding", "chunked")
        upstream.endheaders()
        for piece in self._body():
            upstream.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            upstream.send(b"0\r\n\r\n")

    def _forward_response(self, response: http.client.HTTPResponse, *, cut: bool) -> None:
        body = None
        length = response.getheader("Content-Length")
        if length is None and self.command != "HEAD":
            body = response.read()  # a chunked reply: forwarded with its length
            length = str(len(body))
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if self.command == "HEAD":
            return
        if body is not None:
            self.wfile.write(body)
            return
        left = int(length)
        if cut and response.status in (200, 206) and left >= 2:
            self.wfile.write(response.read(left // 2))
            self.server.faults.count(RESET_GET)
            self._hang_up()
            return
        while left > 0 and (piece := response.read(min(left, _PIECE))):
            self.wfile.write(piece)
            left -= len(piece)

    def _error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>loupe-fault</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _hang_up(self) -> None:
        # The client has what was sent so far, then the end of the stream (not a reset, which
        # could make it drop the bytes it already received).
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
