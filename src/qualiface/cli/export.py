"""`qualiface export ...`: Export a model package to ONNX (dynamic batch, embedding + quality)."""

from __future__ import annotations

import typer

from qualiface.cli.common import not_built_yet

app = typer.Typer(help="Export a model package to ONNX (dynamic batch, embedding + quality).", no_args_is_help=True)


@app.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    """Export a model package to ONNX (dynamic batch, embedding + quality)."""
    if ctx.invoked_subcommand is None:
        raise not_built_yet("export", 5)
