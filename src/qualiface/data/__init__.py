"""Datasets and data formats, all behind one registry: ``build_dataset("folder", root=...)``.

Contract: a dataset has ``__len__`` and ``__getitem__(i) -> (image, label)`` where ``image`` is a
uint8 tensor (3, H, W), RGB, and ``label`` an int in ``[0, num_classes)``; it exposes
``num_classes`` and may implement ``meta(i) -> dict`` for per-sample metadata (source path,
degradation severity, ...).
"""

from __future__ import annotations

from qualiface.registry import Registry

DATASETS: Registry = Registry("dataset")


def build_dataset(name: str, **kwargs):
    _load_all()
    return DATASETS.build(name, **kwargs)


def _load_all() -> None:
    # Importing a format module registers it; lazy so `import qualiface.data` stays cheap.
    # Every module that registers a dataset (lfw/ijb/tinyface only read protocols: not here).
    from qualiface.data import folder, recordio, robust, synthetic, verification_bin  # noqa: F401  # lazy: format modules import torch, and DATASETS from here (cycle)
