"""Exceptions that carry a message meant for the user, not a traceback."""


class UserError(Exception):
    """A mistake in the user's input or options; the CLI prints it as one line and exits 2."""
