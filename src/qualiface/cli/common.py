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


# Backslash first, so the escapes added for the others are not escaped again.
_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def tsv_field(value: object) -> str:
    """``value`` as one TSV field: backslash, tab, line feed and carriage return become ``\\\\``,
    ``\\t``, ``\\n`` and ``\\r``; other control characters become ``\\xNN``.

    File names may contain any of these, so without escaping a name such as
    ``"a.jpg\\tlow-quality\\n..."`` would forge columns or whole rows of a report that tools
    split on tabs and lines. The escaping is reversible (``unescape`` as in Python's
    ``unicode_escape`` for these sequences).
    """
    return "".join(_TSV_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c)
                   for c in str(value))
