"""`qualiface search ...`: 1:N gallery search: enrol templates, query top-k (exact or faiss)."""

from __future__ import annotations

import typer

from qualiface.cli.common import not_built_yet

app = typer.Typer(help="1:N gallery search: enrol templates, query top-k (exact or faiss).", no_args_is_help=True)


@app.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    """1:N gallery search: enrol templates, query top-k (exact or faiss)."""
    if ctx.invoked_subcommand is None:
        raise not_built_yet("search", 5)
