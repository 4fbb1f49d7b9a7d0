"""Tiny stand-ins for the trainer tests: a BN-free backbone and class-structured blob images.

Registered under ``test-linear`` / ``test-blobs`` at import, so that processes spawned by the
distributed tests (which re-import the test modules, and this one with them) know them too.
"""

from __future__ import annotations

import torch
from torch import nn

from qualiface.backbones import BACKBONES
from qualiface.data import DATASETS


class LinearBackbone(nn.Module):
    """Flatten + linear, no batch norm (so sample order inside a step is irrelevant), with the
    backbone contract (``embedding_size``, ``feature_dim``, ``return_features``)."""

    def __init__(self, embedding_size: int = 8, input_size: int = 8) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.feature_dim = 3 * input_size * input_size
        self.fc = nn.Linear(self.feature_dim, embedding_size)

    def forward(self, x, return_features: bool = False):
        features = x.flatten(1).to(self.fc.weight.dtype)  # float64 runs: see test_train
        embedding = self.fc(features)
        return (embedding, features) if return_features else embedding


class Blobs(torch.utils.data.Dataset):
    """Tiny class-structured uint8 images: a random prototype per class plus noise."""

    def __init__(self, num: int = 64, classes: int = 4, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(num) % classes
        proto = torch.randint(0, 256, (classes, 3, size, size), generator=g)
        noise = torch.randint(-30, 31, (num, 3, size, size), generator=g)
        self.images = (proto[self.labels] + noise).clamp(0, 255).to(torch.uint8)
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


if "test-linear" not in BACKBONES:
    BACKBONES.register("test-linear")(LinearBackbone)
if "test-blobs" not in DATASETS:
    DATASETS.register("test-blobs")(Blobs)
