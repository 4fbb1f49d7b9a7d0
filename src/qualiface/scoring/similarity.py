"""Similarity of feature vectors: row norms, L2 normalisation, cosine and Euclidean pair scores.

All scores are similarities (higher = more alike): the Euclidean score is the *negative*
distance between L2-normalised features, so every metric uses one convention. Shared by
``qualiface.eval`` (benchmarks, QMagFace, template pooling) and ``qualiface.infer``
(calibration); the chunked pair scorer for millions of pairs stays in ``eval.similarity``.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def row_norms(features: np.ndarray) -> np.ndarray:
    """L2 norm of each row (N,), without the (N, D) temporary ``np.linalg.norm`` allocates
    (that temporary costs seconds at IJB-C size)."""
    return np.sqrt(np.einsum("ij,ij->i", features, features))


def l2_normalize(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (unit features (N, D) float32, norms (N,) float32); zero rows stay zero."""
    features = np.asarray(features, dtype=np.float32)
    norms = row_norms(features)
    return features / np.maximum(norms, _EPS)[:, None], norms


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of raw features a (N, D) and b (N, D) -> (N,) float32.

    A zero row stays zero when normalised (``l2_normalize``), so its cosine with anything, a
    zero row included, is 0: the score of orthogonal features, neither alike nor unlike.
    """
    ua, _ = l2_normalize(a)
    ub, _ = l2_normalize(b)
    return np.einsum("ij,ij->i", ua, ub)


def euclidean_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Negative Euclidean distance of the L2-normalised rows (N,) (in [-2, 0], higher = closer).

    A monotone function of the cosine (``d^2 = 2 - 2 cos``): same ROC, different thresholds.
    That holds for zero rows too: a pair with a zero row has cosine 0 (``cosine_scores``), so
    its score is ``-sqrt(2)``, that of orthogonal features (the plain distance of the
    normalised rows would be -1 against a unit row, a cosine of 0.5, and 0, a perfect match,
    for two zero rows).
    """
    ua, norms_a = l2_normalize(a)
    ub, norms_b = l2_normalize(b)
    distance = np.linalg.norm(ua - ub, axis=1)
    degenerate = (norms_a < _EPS) | (norms_b < _EPS)  # rows l2_normalize could not make unit
    if degenerate.any():
        cosine = np.einsum("ij,ij->i", ua[degenerate], ub[degenerate])
        distance[degenerate] = np.sqrt(np.maximum(2 - 2 * cosine, 0))
    return -distance


SIMILARITIES = {"cosine": cosine_scores, "euclidean": euclidean_scores}
