"""Comparison scores: cosine, Euclidean, the fast pair scorer, and QMagFace quality-aware scores.

The plain similarity functions (``row_norms``, ``l2_normalize``, ``cosine_scores``,
``euclidean_scores``, ``SIMILARITIES``) live in :mod:`qualiface.scoring.similarity`, shared
with ``infer``, and are re-exported here.

All scores are similarities (higher = more alike), so every metric in ``qualiface.eval`` uses
one convention: the Euclidean score is the *negative* distance between L2-normalised features.

``score_pairs`` computes ``dot(F[first[k]], F[second[k]])`` for millions of pairs without a
Python loop over pairs and without materialising gathered copies of both sides:

- ``dense``: when the templates that occur on each side are few enough that their full cross
  product costs at most ``dense_factor`` times the number of pairs (IJB-B/C pairs enrollment
  templates with probe templates, ~22-42 % of that block is used), one matrix product of the
  two used subsets (BLAS, all torch threads) and a gather of the needed entries.
- ``sparse``: otherwise a sampled dense-dense product (``torch.sparse.sampled_addmm``) over the
  pairs grouped by their first template in CSR form; each first-side row stays in cache while
  its partners stream past.
- ``rowwise``: chunked gather-and-dot, the plain method (kept as a fallback and for checks).

**QMagFace** (Terhörst et al., WACV 2023): with ``s`` the cosine of a pair and ``q`` the smaller
of the two feature norms, the quality-aware score is ``s' = s + min(beta * s - alpha, 0) * q``.
``QMagFace.fit`` follows the published procedure: for each FMR in a log-spaced range, find the
weight ``omega`` (from a grid in ``[-max_ratio / max q, +max_ratio / max q]``) that maximises
the TAR at that FMR for the score ``s + omega * q``, note the threshold ``t`` of that score at
that FMR, then least-squares fit the line ``omega = beta * t - alpha`` through the points. The
reference code fits the line on sigmoid-transformed thresholds; we fit on the raw scores because
``omega`` is evaluated on the raw cosine at test time. Fitted values round-trip through JSON.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qualiface.eval import EvaluationError
from qualiface.eval.verification import roc_curve, tar_at_far
from qualiface.files import read_small_text_as, write_text_atomic
# The plain similarity functions live in the shared scoring module (infer uses them too); they
# stay importable from here.
from qualiface.scoring.similarity import (  # noqa: F401
    SIMILARITIES,
    cosine_scores,
    euclidean_scores,
    l2_normalize,
    row_norms,
)
from qualiface.scoring.thresholds import check_pairs, count_within

_EPS = 1e-12


def _check_indices(index: np.ndarray, size: int, what: str) -> np.ndarray:
    index = np.asarray(index)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise EvaluationError(f"{what}: expected a 1-D integer index array, got {index.dtype} "
                              f"{index.shape}")
    if len(index) and (index.min() < 0 or index.max() >= size):
        raise EvaluationError(f"{what}: index out of range [0, {size})")
    return index.astype(np.int64, copy=False)


def score_pairs(features: np.ndarray, first, second, *, strategy: str = "auto",
                dense_factor: float = 8.0, max_dense_bytes: int = 1 << 30,
                chunk: int = 1 << 16, device="cpu") -> np.ndarray:
    """Dot products ``features[first[k]] . features[second[k]]`` -> (P,) float32.

    features: (T, D) float32, usually L2-normalised templates (then the result is the cosine).
    first, second: (P,) integer row indices. ``strategy``: ``auto``, ``dense``, ``sparse`` or
    ``rowwise`` (see the module docstring); all agree to float32 rounding. ``device``: where
    the products run (e.g. ``"cuda"``; the sparse strategy always runs on the CPU); the result
    is numpy either way.
    """
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise EvaluationError(f"features: expected (T, D), got shape {features.shape}")
    first = _check_indices(first, len(features), "first")
    second = _check_indices(second, len(features), "second")
    if len(first) != len(second):
        raise EvaluationError(f"pairs: {len(first)} first indices but {len(second)} second")
    if strategy not in ("auto", "dense", "sparse", "rowwise"):
        raise EvaluationError(f"unknown pair scoring strategy {strategy!r}")
    num_pairs = len(first)
    if num_pairs == 0:
        return np.zeros(0, dtype=np.float32)
    table = torch.from_numpy(features).to(device)
    used_first = np.flatnonzero(np.bincount(first, minlength=len(features)))
    used_second = np.flatnonzero(np.bincount(second, minlength=len(features)))
    block = len(used_first) * len(used_second)
    if strategy == "auto":
        dense_ok = block <= dense_factor * num_pairs and block * 4 <= max_dense_bytes
        strategy = "dense" if dense_ok else "sparse"
    if strategy == "dense":
        return _score_dense(table, first, second, used_first, used_second)
    if strategy == "sparse":
        try:
            return _score_sparse(table.cpu(), first, second)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - very old torch builds
            pass
    return _score_rowwise(table, first, second, chunk)


def _score_dense(table, first, second, used_first, used_second) -> np.ndarray:
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    # Offset of each used first-side row in the flattened Gram matrix, and column of each
    # used second-side row: the flat index of pair k is one gather from each plus an add.
    row_offset = np.zeros(len(table), dtype=np.int64)
    row_offset[used_first] = np.arange(len(used_first), dtype=np.int64) * len(used_second)
    column = np.zeros(len(table), dtype=np.int64)
    column[used_second] = np.arange(len(used_second))
    left = table[torch.from_numpy(used_first).to(table.device)]
    right = table[torch.from_numpy(used_second).to(table.device)]
    flat = row_offset[first]
    flat += column[second]
    gram = left @ right.T
    if gram.device.type == "cpu":
        return np.take(gram.numpy().ravel(), flat)
    # On an accelerator gather there and bring back only the P scores, not the whole Gram matrix.
    return gram.reshape(-1)[torch.from_numpy(flat).to(gram.device)].cpu().numpy()


def _score_sparse(table, first, second) -> np.ndarray:
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    num_rows = len(table)
    if np.all(first[1:] >= first[:-1]):  # already grouped (pair files usually are)
        order = None
        columns = second
        indptr = np.searchsorted(first, np.arange(num_rows + 1), side="left")
    else:
        import scipy.sparse as sp  # lazy: scipy.sparse (~0.13 s), only for the sparse path

        # A (rows x pairs) CSR with one entry per pair is a counting sort by first index:
        # its column indices are the pair order, its data the second indices.
        grouped = sp.csr_array((second, (first, np.arange(len(first)))),
                               shape=(num_rows, len(first)))
        order, columns, indptr = grouped.indices, grouped.data, grouped.indptr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta" / invariant checks
        mask = torch.sparse_csr_tensor(
            torch.from_numpy(np.asarray(indptr, dtype=np.int64)),
            torch.from_numpy(np.asarray(columns, dtype=np.int64)),
            torch.zeros(len(first), dtype=table.dtype), size=(num_rows, num_rows))
        values = torch.sparse.sampled_addmm(mask, table, table.T, beta=0.0).values().numpy()
    if order is None:
        return values
    out = np.empty(len(first), dtype=np.float32)
    out[order] = values
    return out


def _score_rowwise(table, first, second, chunk: int) -> np.ndarray:
    import torch  # lazy: torch (~1 s): eval's scoring modules import without it

    out = np.empty(len(first), dtype=np.float32)
    for start in range(0, len(first), chunk):
        a = table[torch.from_numpy(first[start:start + chunk]).to(table.device)]
        b = table[torch.from_numpy(second[start:start + chunk]).to(table.device)]
        out[start:start + chunk] = (a * b).sum(1).cpu().numpy()
    return out


def pair_scores_and_quality(features: np.ndarray, first, second) -> tuple[np.ndarray, np.ndarray]:
    """Raw features (N, D) and pair indices -> (cosine (P,), min of the two norms (P,))."""
    unit, norms = l2_normalize(features)
    first = _check_indices(first, len(unit), "first")
    second = _check_indices(second, len(unit), "second")
    return score_pairs(unit, first, second), np.minimum(norms[first], norms[second])


@dataclass
class QMagFace:
    """Quality-aware comparison ``s' = s + min(beta * s - alpha, 0) * q`` (see module doc).

    ``fit_fmrs``, ``fit_omegas``, ``fit_thresholds``: the per-FMR optimum the line was fitted
    to (kept for inspection and plots; empty when constructed by hand).
    """

    alpha: float
    beta: float
    fit_fmrs: list[float] = field(default_factory=list)
    fit_omegas: list[float] = field(default_factory=list)
    fit_thresholds: list[float] = field(default_factory=list)

    def omega(self, scores: np.ndarray) -> np.ndarray:
        """The quality weight for each raw score (P,): ``min(beta * s - alpha, 0)``."""
        return np.minimum(self.beta * np.asarray(scores, dtype=np.float64) - self.alpha, 0.0)

    def score(self, scores, quality) -> np.ndarray:
        """Raw cosine scores (P,) and pair qualities (P,) -> quality-aware scores (P,)."""
        scores = np.asarray(scores, dtype=np.float64)
        quality = np.asarray(quality, dtype=np.float64)
        if scores.shape != quality.shape:
            raise EvaluationError(f"QMagFace: {scores.shape} scores but {quality.shape} qualities")
        return scores + self.omega(scores) * quality

    @classmethod
    def fit(cls, scores, quality, labels, *, fmrs: Sequence[float] | None = None,
            num_omegas: int = 41, max_ratio: float = 0.5) -> QMagFace:
        """Fit alpha and beta on a training pair set (scores (P,), qualities (P,), labels (P,)).

        ``fmrs``: the FMR range (default 50 log-spaced values in [1e-5, 1e-2]; values with
        fewer than ``1 / fmr`` impostor pairs are skipped as not measurable).
        """
        scores, labels = check_pairs(scores, labels, "QMagFace training pairs")
        scores = scores.astype(np.float64)
        quality = np.asarray(quality, dtype=np.float64)
        if quality.shape != scores.shape:
            raise EvaluationError(f"QMagFace: {scores.shape} scores but {quality.shape} qualities")
        fmrs = np.logspace(-5, -2, 50) if fmrs is None else np.asarray(fmrs, dtype=np.float64)
        num_impostor = int((~labels).sum())
        # tar_at_far's rule (count_within): a kept FMR is one it measures, never a NaN.
        fmrs = fmrs[np.array([count_within(f, num_impostor) >= 1 for f in fmrs], dtype=bool)]
        if len(fmrs) < 2:
            raise EvaluationError(f"QMagFace fit: {num_impostor} impostor pairs measure fewer "
                                  "than two FMRs of the range; use more pairs or higher FMRs")
        max_omega = max_ratio / max(float(quality.max()), _EPS)
        omegas = np.linspace(-max_omega, max_omega, num_omegas)
        tars = np.zeros((num_omegas, len(fmrs)))
        thresholds = np.zeros((num_omegas, len(fmrs)))
        for i, omega in enumerate(omegas):
            result = tar_at_far(roc_curve(scores + omega * quality, labels), fmrs.tolist())
            tars[i] = [result[f][0] for f in fmrs]
            thresholds[i] = [result[f][1] for f in fmrs]
        # Best omega per FMR; among equally good ones the smallest |omega| (least change).
        preference = np.argsort(np.abs(omegas), kind="stable")
        best = preference[np.argmax(tars[preference], axis=0)]
        chosen_omegas = omegas[best]
        chosen_thresholds = thresholds[best, np.arange(len(fmrs))]
        finite = np.isfinite(chosen_thresholds)
        if finite.sum() < 2 or np.ptp(chosen_thresholds[finite]) == 0:
            raise EvaluationError("QMagFace fit: thresholds do not vary over the FMR range; "
                                  "cannot fit the omega line")
        beta, intercept = np.polyfit(chosen_thresholds[finite], chosen_omegas[finite], 1)
        return cls(alpha=float(-intercept), beta=float(beta), fit_fmrs=fmrs.tolist(),
                   fit_omegas=chosen_omegas.tolist(), fit_thresholds=chosen_thresholds.tolist())

    def save(self, path: str | Path) -> None:
        """Write the fitted parameters (and fit details) as JSON."""
        write_text_atomic(path, json.dumps({"method": "qmagface", **asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> QMagFace:
        """Read parameters written by ``save``; errors name the file (and the key)."""
        path = Path(path)
        text = read_small_text_as(path, EvaluationError, what="QMagFace parameter file")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("method") != "qmagface":
            raise EvaluationError(f"{path}: not a QMagFace parameter file")
        # JSON allows NaN, Infinity and 1e999 (inf), and json.loads takes them: alpha or beta
        # like that makes every score NaN/-inf, which failed only after all the embedding with
        # an error naming neither the file nor the key. true or "0.5" are not numbers either.
        values = {}
        for key in ("alpha", "beta"):
            value = data.get(key)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not np.isfinite(value)):
                raise EvaluationError(f"{path}: '{key}' must be a finite number, got {value!r}")
            values[key] = float(value)
        fit = {}
        for key in ("fit_fmrs", "fit_omegas", "fit_thresholds"):
            value = data.get(key, [])
            if not isinstance(value, list) or any(
                    v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
                    for v in value):
                raise EvaluationError(f"{path}: '{key}' must be a list of numbers")
            fit[key] = list(value)
        return cls(**values, **fit)
