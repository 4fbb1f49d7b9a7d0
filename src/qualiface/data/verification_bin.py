"""InsightFace verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``...): read and write.

A ``.bin`` is ``pickle.dump((bins, issame_list))``: ``bins`` a list of 2N encoded images (JPEG),
consecutive images ``2k, 2k+1`` forming pair ``k``, and ``issame_list`` N booleans. The file is
loaded with ``qualiface.data.safe_pickle`` (no code can run from it; see that module for the
accepted encodings: ``issame`` must be Python bools or 0/1 ints, not numpy bools).

``load_verification_bin`` decodes every image into one (2N, 3, H, W) uint8 RGB tensor;
``VerificationBinDataset`` (registered as ``verification_bin`` / ``bin``) decodes lazily and
yields ``(image, pair_index)`` with ``meta(i)`` giving the pair, the side and ``issame``.
``write_verification_bin`` writes the same format (protocol 4), e.g. for tests and round trips.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qualiface.data import DATASETS
from qualiface.data.decode import DEFAULT_MAX_PIXELS, DataError, decode_image, encode_jpeg
from qualiface.data.safe_pickle import safe_load
from qualiface.files import atomic_write


class VerificationBinError(DataError):
    """A ``.bin`` whose content is not ``(list of image bytes, list of bools)`` as expected."""


@dataclass
class VerificationBin:
    """A decoded verification set.

    images: (2N, 3, H, W) uint8 RGB; pair ``k`` is ``images[2k]`` and ``images[2k + 1]``.
    issame: (N,) bool, True where the pair shows the same person.
    """

    images: torch.Tensor
    issame: torch.Tensor
    source: str = ""

    @property
    def num_pairs(self) -> int:
        return int(self.issame.numel())


def _describe_length(value: object) -> str:
    return f"of length {len(value)}" if isinstance(value, (tuple, list)) else ""


def read_bin_entries(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Load and validate a ``.bin`` without decoding: ``(encoded images, issame)``."""
    path = Path(path)
    value = safe_load(path)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise VerificationBinError(f"{path}: expected a pickled (images, issame) pair, got "
                                   f"{type(value).__name__} {_describe_length(value)}")
    bins, issame = value
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise VerificationBinError(f"{path}: images and issame must be lists")
    for index, blob in enumerate(bins):
        if not isinstance(blob, (bytes, bytearray)):
            raise VerificationBinError(f"{path}: image {index} is {type(blob).__name__}, "
                                       "expected encoded bytes")
    flags: list[bool] = []
    for index, flag in enumerate(issame):
        if isinstance(flag, bool) or (type(flag) is int and flag in (0, 1)):
            flags.append(bool(flag))
        else:
            raise VerificationBinError(f"{path}: issame[{index}] = {flag!r} is not a bool")
    if len(bins) != 2 * len(flags):
        raise VerificationBinError(f"{path}: {len(bins)} images for {len(flags)} pairs "
                                   "(expected two images per pair)")
    if not flags:
        raise VerificationBinError(f"{path}: no pairs")
    return [bytes(blob) for blob in bins], flags


def load_verification_bin(path: str | os.PathLike, *,
                          on_progress: Callable[[], None] | None = None,
                          max_pixels: int | None = DEFAULT_MAX_PIXELS) -> VerificationBin:
    """Decode a ``.bin`` -> ``VerificationBin`` (images (2N, 3, H, W) uint8, issame (N,) bool).

    All images must share one size. ``on_progress`` is called once per decoded image (the CLI
    passes a progress bar's advance).
    """
    path = Path(path)
    bins, flags = read_bin_entries(path)
    images: torch.Tensor | None = None
    for index, blob in enumerate(bins):
        image = decode_image(blob, name=f"{path} image {index}", max_pixels=max_pixels)
        if images is None:
            images = torch.empty((len(bins), *image.shape), dtype=torch.uint8)
        elif image.shape != images.shape[1:]:
            raise VerificationBinError(f"{path}: image {index} is {tuple(image.shape)}, "
                                       f"image 0 is {tuple(images.shape[1:])}")
        images[index] = image
        if on_progress is not None:
            on_progress()
    assert images is not None  # read_bin_entries guarantees at least one pair
    return VerificationBin(images, torch.tensor(flags, dtype=torch.bool), str(path))


def write_verification_bin(path: str | os.PathLike,
                           images: Sequence[bytes] | torch.Tensor,
                           issame: Sequence[bool] | torch.Tensor, *, quality: int = 95) -> Path:
    """Write a ``.bin``: ``images`` as 2N encoded blobs or a (2N, 3, H, W) uint8 tensor
    (JPEG-encoded at ``quality``), ``issame`` N booleans. Written atomically
    (``qualiface.files.atomic_write``).
    """
    path = Path(path)
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected a (2N, 3, H, W) uint8 tensor, got {images.dtype} "
                             f"{tuple(images.shape)}")
        blobs = [encode_jpeg(image, quality=quality) for image in images]
    else:
        blobs = [bytes(blob) for blob in images]
    flags = [bool(flag) for flag in (issame.tolist() if isinstance(issame, torch.Tensor)
                                     else issame)]
    if len(blobs) != 2 * len(flags):
        raise ValueError(f"{len(blobs)} images for {len(flags)} pairs (need two per pair)")
    return atomic_write(path, lambda out: pickle.dump((blobs, flags), out, protocol=4))


@DATASETS.register("verification_bin", "bin")
class VerificationBinDataset(torch.utils.data.Dataset):
    """Lazily decoded ``.bin``: item ``i`` is ``(uint8 (3, H, W) RGB, pair index i // 2)``.

    ``num_classes`` is the number of pairs (the label only groups the two sides of a pair);
    ``meta(i)`` gives ``{"pair", "side", "issame"}``; ``issame`` is the (N,) bool tensor.
    """

    def __init__(self, path: str | os.PathLike, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.path = Path(path)
        self.max_pixels = max_pixels
        self._bins, flags = read_bin_entries(self.path)
        self.issame = torch.tensor(flags, dtype=torch.bool)

    @property
    def num_classes(self) -> int:
        return int(self.issame.numel())

    def __len__(self) -> int:
        return len(self._bins)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = decode_image(self._bins[index], name=f"{self.path} image {index}",
                             max_pixels=self.max_pixels)
        return image, index // 2 if index >= 0 else (len(self) + index) // 2

    def meta(self, index: int) -> dict:
        pair = (index if index >= 0 else len(self) + index) // 2
        return {"pair": pair, "side": index % 2, "issame": bool(self.issame[pair])}
