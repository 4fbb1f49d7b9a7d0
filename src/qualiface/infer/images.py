"""Turning what users hand to inference (paths, numpy arrays, tensors) into uint8 RGB batches.

The internal image convention (``qualiface.data.transforms``) is a uint8 tensor, channels first,
RGB. Users more often hold numpy ``(H, W, 3)`` arrays (OpenCV / PIL style, channels last) or
file paths (decoded by ``qualiface.data.decode``), so everything funnels through :func:`as_uint8_batch`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from qualiface.data.decode import DecodeError as ImageDecodeError
from qualiface.data.decode import read_image  # noqa: F401  (re-exported: the infer image API)
from qualiface.errors import QualifaceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (searched recursively, sorted) into a list of image paths.

    Explicitly named files are kept whatever their extension (so that an undecodable one is
    reported rather than silently skipped); folders contribute files with image extensions.
    Each file is listed once, where it first appears: a file also inside a folder given, or a
    folder inside another one given, would otherwise be embedded twice and count double in its
    identity's template (same path after ``normpath``; symbolic links are not followed).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    paths: list[Path] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.normpath(path.absolute())
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for item in inputs:
        item = Path(item)
        if item.is_dir():
            for path in sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
                add(path)
        elif item.exists():
            add(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return paths


class ImageSizeError(QualifaceError, ValueError):
    """An image whose size is not the model's input size (the message gives both)."""


def hwc_to_chw(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` array -> uint8 ``(3, H, W)`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def as_uint8_batch(images, size: Sequence[int] | None = None) -> torch.Tensor:
    """Normalise an image batch to a uint8 ``(B, 3, H, W)`` RGB tensor.

    ``images`` may be a uint8 tensor ``(B, 3, H, W)`` / ``(3, H, W)``, a uint8 numpy array
    ``(B, H, W, 3)`` / ``(H, W, 3)``, or a sequence of file paths / HWC arrays / CHW tensors.
    When ``size`` (H, W) is given every image must have it (faces must be aligned first; see
    ``qualiface align``); a mismatch raises :class:`ImageSizeError` (a ``ValueError``) naming
    the offending item.
    """
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
        if batch.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images (0..255), got {batch.dtype}")
    elif isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 3 else images
        if array.ndim != 4 or array.shape[3] != 3:
            raise ValueError(f"expected a (B, H, W, 3) array, got shape {images.shape}")
        if array.dtype != np.uint8:
            raise TypeError(f"expected uint8 images (0..255), got {array.dtype}")
        batch = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
    elif isinstance(images, (str, Path)):
        batch = as_uint8_batch([images], size)
    else:
        items = []
        for item in images:
            name = str(item) if isinstance(item, (str, Path)) else f"item {len(items)}"
            if isinstance(item, (str, Path)):
                item = read_image(item)
            try:
                one = as_uint8_batch(item, size)
                if one.shape[0] != 1:  # a batch inside the sequence: [0] would drop the rest
                    raise ValueError(f"holds {one.shape[0]} images; a sequence takes one image "
                                     "per item (pass a batch as one array or tensor)")
                items.append(one[0])
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{name}: {exc}") from None
        if not items:
            raise ValueError("no images given")
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) > 1:
            raise ValueError(f"images differ in size: {sorted(shapes)}")
        batch = torch.stack(items)
    if batch.shape[0] == 0:  # as for an empty list, not a torch.cat traceback further on
        raise ValueError("no images given")
    if size is not None and tuple(batch.shape[2:]) != tuple(size):
        h, w = size
        if tuple(batch.shape[2:]) == (112, 112):
            # Already the aligned size: `qualiface align` (always 112x112) would not help.
            hint = (f"these look like aligned 112x112 faces, but this model was built for {w}x{h} "
                    f"inputs: resize them to {w}x{h}, or use a model that takes 112x112")
        elif (h, w) == (112, 112):
            hint = "align faces first (qualiface align makes 112x112 crops)"
        else:
            hint = f"align faces (qualiface align makes 112x112 crops), then resize them to {w}x{h}"
        raise ImageSizeError(
            f"image size {batch.shape[3]}x{batch.shape[2]} (WxH), the model expects {w}x{h}; {hint}"
        )
    return batch


class ImageFileBatches(torch.utils.data.Dataset):
    """Decodes image files for a DataLoader (workers decode in parallel with the forward pass).

    Item ``i`` is ``(image uint8 (3, H, W) or None, (reason, message) or None)``: a file that
    cannot be decoded (reason ``unreadable``) or has the wrong size (``wrong size``; the message
    gives both sizes) is reported rather than raised, so one bad file never stops a long
    embedding run. Use with ``collate_fn=ImageFileBatches.collate``.
    """

    def __init__(self, paths: Sequence[str | Path], size: Sequence[int] | None = None) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return as_uint8_batch(read_image(self.paths[index]), self.size)[0], None
        except ImageSizeError as exc:
            return None, ("wrong size", str(exc))
        except (ImageDecodeError, ValueError) as exc:
            return None, ("unreadable", str(exc))

    @staticmethod
    def collate(items):
        """-> (stacked images of the good items or None, their positions, {position: (reason, message)})."""
        good = [k for k, (image, _) in enumerate(items) if image is not None]
        errors = {k: error for k, (image, error) in enumerate(items) if image is None}
        images = torch.stack([items[k][0] for k in good]) if good else None
        return images, good, errors
