"""`qualiface embed`: Embed images with a model package: embeddings, raw and calibrated quality."""

from __future__ import annotations

from qualiface.cli.common import not_built_yet


def command() -> None:
    """Embed images with a model package: embeddings, raw and calibrated quality."""
    raise not_built_yet("embed", 5)
