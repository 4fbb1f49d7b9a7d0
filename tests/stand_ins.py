"""Tiny stand-ins for the tests: a BN-free backbone, class-structured blob images (for the
trainer tests) and a file handle on a full disk (for the write-failure tests).

The backbone and the images are registered under ``test-linear`` / ``test-blobs`` at import, so
that processes spawned by the distributed tests (which re-import the test modules, and this one
with them) know them too.
"""

from __future__ import annotations

import errno
import os

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


class DiskFull:
    """Wraps an open file: its writes fail with ENOSPC once ``budget`` bytes were written
    (``budget=0``: the first non-empty write fails); everything else goes to the real file,
    which leaving the ``with`` block closes."""

    def __init__(self, handle, budget: int = 0) -> None:
        self._handle, self._budget = handle, budget

    def write(self, data) -> int:
        self._budget -= len(data)
        if self._budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


if "test-linear" not in BACKBONES:
    BACKBONES.register("test-linear")(LinearBackbone)
if "test-blobs" not in DATASETS:
    DATASETS.register("test-blobs")(Blobs)
