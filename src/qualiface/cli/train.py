"""`qualiface train`: Train a model from a YAML config with key=value overrides."""

from __future__ import annotations

from qualiface.cli.common import not_built_yet


def command() -> None:
    """Train a model from a YAML config with key=value overrides."""
    raise not_built_yet("train", 4)
