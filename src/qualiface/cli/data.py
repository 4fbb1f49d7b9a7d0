"""`qualiface data ...`: Data tools: pack an image folder into InsightFace RecordIO, unpack it, inspect datasets."""

from __future__ import annotations

import typer

from qualiface.cli.common import not_built_yet

app = typer.Typer(help="Data tools: pack an image folder into InsightFace RecordIO, unpack it, inspect datasets.", no_args_is_help=True)


@app.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    """Data tools: pack an image folder into InsightFace RecordIO, unpack it, inspect datasets."""
    if ctx.invoked_subcommand is None:
        raise not_built_yet("data", 2)
