"""`qualiface align`: Detect faces and landmarks and warp them to the 112x112 five-point template."""

from __future__ import annotations

from qualiface.cli.common import not_built_yet


def command() -> None:
    """Detect faces and landmarks and warp them to the 112x112 five-point template."""
    raise not_built_yet("align", 5)
