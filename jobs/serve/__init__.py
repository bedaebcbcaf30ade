"""`loupe serve`: one OUTPUT's catalog as a web page and a JSON API, in one process or as a Ray Serve deployment."""

from loupe.jobs.serve.command import serve_command

__all__ = ["serve_command"]
