"""Small helpers shared by the CLI modules: one clean error line instead of a traceback."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print a clear one-line error (no traceback) and return an Exit to raise."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)
