"""`qualiface demo`: Train QCFace on the embedded synthetic set (or --data), evaluate it and write an HTML report."""

from __future__ import annotations

from qualiface.cli.common import not_built_yet


def command() -> None:
    """Train QCFace on the embedded synthetic set (or --data), evaluate it and write an HTML report."""
    raise not_built_yet("demo", 4)
