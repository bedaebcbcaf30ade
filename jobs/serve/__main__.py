"""`python -m loupe.jobs.serve OUTPUT ...`: the serve command on its own (as the benchmark starts it)."""

import typer

from loupe.jobs.serve.command import serve_command

typer.run(serve_command)
