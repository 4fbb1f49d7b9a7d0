"""`qualiface eval ...`: Evaluate recognition (LFW, .bin sets, IJB-B/C, TinyFace) and quality (EDC), write reports."""

from __future__ import annotations

import typer

from qualiface.cli.common import not_built_yet

app = typer.Typer(help="Evaluate recognition (LFW, .bin sets, IJB-B/C, TinyFace) and quality (EDC), write reports.", no_args_is_help=True)


@app.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    """Evaluate recognition (LFW, .bin sets, IJB-B/C, TinyFace) and quality (EDC), write reports."""
    if ctx.invoked_subcommand is None:
        raise not_built_yet("eval", 8)
