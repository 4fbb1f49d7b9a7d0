"""Backbones, picked by name: ``build_backbone("iresnet50")``.

Contract: a backbone maps float input (B, 3, 112, 112) in [-1, 1] to a (B, embedding_size)
embedding; ``forward(x, return_features=True)`` returns ``(embedding, features)`` where
``features`` is the flattened pre-embedding feature map (B, feature_dim) that the EQFace quality
branch taps. Attributes: ``embedding_size``, ``feature_dim``.
"""

from __future__ import annotations

from qualiface.registry import Registry

BACKBONES: Registry = Registry("backbone")


def build_backbone(name: str, **kwargs):
    _load_all()
    return BACKBONES.build(name, **kwargs)


def _load_all() -> None:
    # Importing the modules registers them; done lazily so `import qualiface` stays cheap.
    from qualiface.backbones import iresnet, mobilefacenet  # noqa: F401
