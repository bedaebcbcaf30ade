"""The `loupe serve` command: check the bind, load the catalog, then serve it in this process or on Ray Serve."""

from __future__ import annotations

import logging
import socket
import sys
from typing import Annotated, Optional

import typer

from loupe.jobs.console import one_line_errors
from loupe.schemas.errors import UserError

log = logging.getLogger("loupe.serve")


def serve_command(
    output: Annotated[str, typer.Argument(help="The OUTPUT of a loupe run: a local folder or s3://bucket/prefix/.")],
    host: Annotated[str, typer.Option(help="Address to listen on; any but 127.0.0.1, localhost or ::1 needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    token: Annotated[Optional[str], typer.Option(envvar="LOUPE_TOKEN", help="Require this token on every request (Bearer header, or the login form's cookie).")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint.")] = None,
    replicas: Annotated[Optional[int], typer.Option(min=1, help="Serve with this many Ray Serve replicas instead of this process alone.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help="The Ray cluster for --replicas (default: start a local one).")] = None,
) -> None:
    """Serve OUTPUT's catalog as a web page and a JSON API: search, images, moderation review, job status."""
    with one_line_errors(interrupted=None):  # Ctrl-C is how a server stops
        from loupe.jobs.serve.guard import check_bind

        check_bind(host, token)
        if ray_address and replicas is None:
            raise UserError("--ray-address is where --replicas N run; give --replicas too")
        log_to_stderr()
        if replicas is None:
            serve_here(output, host=host, port=port, token=token, endpoint_url=endpoint_url)
        else:
            from loupe.jobs.serve.deploy import serve_on_ray

            serve_on_ray(
                output, replicas=replicas, host=host, port=port, token=token, endpoint_url=endpoint_url,
                ray_address=ray_address,
            )


def serve_here(output: str, *, host: str, port: int, token: str | None, endpoint_url: str | None) -> None:
    """Serve OUTPUT from this process until interrupted; the port is taken before the catalog loads."""
    import torch
    import uvicorn
    from transformers.utils import logging as hf_logging

    from loupe.jobs.serve.app import create_app

    sock = listen(host, port)
    # Each request embeds its query on one torch thread; concurrent requests use the cores side
    # by side. An OpenMP team per request thread oversubscribes them and every small operator
    # pays a wake-up (workers/torch_thread.py): on 2 busy cores one client's p50/p99 went from
    # 12/160 ms to 4/10 ms, and 8 or 32 clients stayed within the noise.
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # the server log keeps to one line per event
    try:
        app = create_app(output, endpoint_url=endpoint_url, token=token)
        bound = sock.getsockname()[1]
        log.info("serving %s at %s", output, url(host, bound))
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening); a one-line UserError when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def log_to_stderr() -> None:
    """One line per request and per error on stderr, with a timestamp."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s loupe serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
