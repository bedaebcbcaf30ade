"""The two kinds of error a person sees as one line: a user mistake, and a damaged OUTPUT."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or options; the CLI prints it as one line and exits 2."""

    exit_code = 2


class DamagedOutput(Exception):
    """OUTPUT is not what loupe wrote (a part whose sha256 differs, vectors that changed while an
    index was built, a record that does not parse); one line naming the file, exit 3."""

    exit_code = 3


def one_line(exc: BaseException | None, limit: int = 300) -> str:
    """An exception as one line: its type and message, whitespace folded, at most `limit` characters."""
    if exc is None:
        return "unknown error"
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text[:limit]
