"""Periodic held-out verification during training.

Two sources of pairs (``ValidationConfig.kind``):

* ``synthetic``: a synthetic face set built from ``val.params`` (give it a seed / identity
  range disjoint from the training set) and ``num_pairs`` balanced pairs from
  ``data.pairs.make_pairs``;
* ``pairs``: an LFW-style folder ``root`` with a ``pairs.txt`` (``val.pairs``), restricted to
  ``val.folds`` (1-based fold numbers as in the file; empty = all).

The images of the pair set are decoded once into memory; each call embeds the unique images
with the current backbone (eval mode, no flip), scores pairs by cosine and reports k-fold
accuracy (folds of the protocol, else 10 contiguous ones), AUC, EER and TAR at FAR 1e-2/1e-3
through ``qualiface.eval.verification`` (the same code as ``qualiface eval``).

The trainer builds its validator before the first step (``build_validator``), so a validation
set that cannot be built or does not fit the backbone (a bad ``val.params`` key, a fold the
pairs file lacks, images of another size) stops the run at start-up, not after all of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qualiface.data import build_dataset, lfw
from qualiface.data.decode import read_image
from qualiface.data.pairs import PairsError, make_pairs
from qualiface.data.transforms import to_model_input
from qualiface.errors import QualifaceError
from qualiface.eval.verification import accuracy_folds, evaluate_verification
from qualiface.files import absent_as
from qualiface.train.precision import autocast


class ValidationError(QualifaceError, ValueError):
    """A validation set that cannot be built (missing pairs file, images, ...)."""


@dataclass
class PairSet:
    """Unique images plus pairs of indices into them."""

    images: torch.Tensor  # uint8 (M, 3, H, W)
    first: np.ndarray  # (N,) int
    second: np.ndarray  # (N,) int
    issame: np.ndarray  # (N,) bool
    folds: np.ndarray | None  # (N,) fold id per pair, or None for contiguous folds


class PairValidator:
    """Callable ``(backbone, head, device, precision) -> metrics dict`` over a fixed pair set."""

    def __init__(self, pairs: PairSet, batch_size: int = 128) -> None:
        self.pairs = pairs
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, backbone, device: torch.device, precision: str) -> torch.Tensor:
        """(M, D) float32 embeddings of the set's unique images."""
        out = []
        for start in range(0, len(self.pairs.images), self.batch_size):
            x = to_model_input(self.pairs.images[start : start + self.batch_size].to(device))
            with autocast(device, precision):
                out.append(backbone(x).float().cpu())
        return torch.cat(out)

    def __call__(self, backbone, head, device: torch.device, precision: str) -> dict:
        emb = torch.nn.functional.normalize(self.embed(backbone, device, precision), dim=1).numpy()
        p = self.pairs
        scores = np.einsum("nd,nd->n", emb[p.first], emb[p.second])
        result = evaluate_verification(scores, p.issame, p.folds, fars=(1e-3, 1e-2)).metrics()
        metrics = {"val_accuracy": result["accuracy"], "val_accuracy_std": result["accuracy_std"],
                   "val_auc": result["auc"], "val_eer": result["eer"]}
        for far, tar in result["tar_at_far"].items():
            metrics[f"val_tar@far={far}"] = tar
        return metrics


def synthetic_pairs(params: dict, num_pairs: int, seed: int) -> PairSet:
    """Pairs from a (held-out) synthetic face set built with ``params``."""
    try:
        dataset = build_dataset("synthetic", **params)
    except TypeError as exc:  # an unknown key: the constructor's own message names it
        raise ValidationError(f"val.params: {exc}") from None
    try:
        idx1, idx2, issame = (np.asarray(a) for a in make_pairs(dataset, num_pairs, seed))
    except PairsError as exc:  # too few pairs or identities
        raise ValidationError(f"val: {exc}") from None
    unique, inverse = np.unique(np.concatenate([idx1, idx2]), return_inverse=True)
    images = torch.stack([dataset[int(i)][0] for i in unique])
    return PairSet(images, inverse[: len(idx1)], inverse[len(idx1) :], issame.astype(bool), None)


def folder_pairs(root: str, pairs_file: str, folds: list) -> PairSet:
    """Pairs of an LFW-style ``pairs.txt`` over an aligned image folder (1-based ``folds``)."""
    root_path = Path(root)
    pairs_path = Path(pairs_file) if pairs_file else root_path.parent / "pairs.txt"
    if not pairs_path.is_file():
        raise ValidationError(f"{pairs_path}: {absent_as(pairs_path, 'pairs file')} (set val.pairs)")
    protocol = lfw.read_pairs(pairs_path)
    if folds:
        try:
            protocol = protocol.select_folds(*(int(f) for f in folds))
        except ValueError as exc:
            raise ValidationError(f"val.folds: {exc}") from None
    # After the fold selection: only the validated folds' images need to be there.
    protocol = protocol.resolve(root_path)
    paths, first, second = protocol.unique_images()
    decoded = [read_image(path) for path in paths]
    for path, image in zip(paths, decoded):
        if image.shape != decoded[0].shape:  # else torch.stack's traceback names no file
            raise ValidationError(f"{path}: image is {image.shape[2]}x{image.shape[1]}, "
                                  f"{paths[0]} is {decoded[0].shape[2]}x{decoded[0].shape[1]} "
                                  f"(val.root must hold aligned faces of one size)")
    # One selected fold cannot hold itself out: its pairs are scored over contiguous sub-folds,
    # by the rule ``qualiface eval`` uses (``eval.verification.accuracy_folds``), not refused
    # mid-run.
    folds, _ = accuracy_folds(protocol.fold)
    return PairSet(torch.stack(decoded), first, second, np.asarray(protocol.issame), folds)


def build_validator(cfg, input_size: int | None = None) -> PairValidator:
    """The validator described by a ``ValidationConfig``; ``input_size``: the side of the
    images the backbone takes (None: any), checked here so that a mismatch is not a shape
    error inside the backbone at the first validation."""
    if cfg.kind == "synthetic":
        pairs = synthetic_pairs(cfg.params, cfg.num_pairs, cfg.seed)
        where = "val.params.image_size"
    elif cfg.kind == "pairs":
        if not cfg.root:
            raise ValidationError("val.kind=pairs needs val.root (the aligned image folder)")
        pairs = folder_pairs(cfg.root, cfg.pairs, cfg.folds)
        where = f"the images of val.root ({cfg.root})"
    else:
        raise ValidationError(f"unknown validation kind '{cfg.kind}'")
    height, width = pairs.images.shape[-2:]
    if input_size is not None and (height, width) != (input_size, input_size):
        raise ValidationError(f"{where}: validation images are {width}x{height}, the backbone "
                              f"takes {input_size}x{input_size} (model.params.input_size)")
    return PairValidator(pairs, cfg.batch_size)
