"""Tensor conventions shared by training, evaluation and inference.

Images travel as uint8 tensors, channels first, **RGB** (the one internal channel order). A
model sees them as float in [-1, 1]: ``(x / 255 - 0.5) / 0.5``. Models trained on BGR input
(e.g. AdaFace's releases) are handled by a flag in the model package, never by default.
"""

from __future__ import annotations

import torch

INPUT_MEAN = 0.5
INPUT_STD = 0.5
IMAGE_SIZE = 112


def to_model_input(images: torch.Tensor, *, bgr: bool = False) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) RGB -> float32 in [-1, 1] (optionally channel-flipped)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    x = images.float().div_(255.0).sub_(INPUT_MEAN).div_(INPUT_STD)
    if bgr:
        x = x.flip(-3)
    return x
