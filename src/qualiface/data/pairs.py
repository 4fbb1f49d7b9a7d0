"""Verification pairs from any labelled dataset: ``make_pairs``.

Used for held-out validation during training (``qualiface.train.validate``) and by the demo, on
the synthetic test split or any dataset whose samples carry identity labels.
"""

from __future__ import annotations

import numpy as np

from qualiface.errors import DataError


class PairsError(DataError):
    """No balanced pair list can be built: too few pairs asked for, or a dataset with fewer than
    two identities or no identity with two samples (a ``DataError``, so a ``ValueError``)."""


def _dataset_labels(dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if callable(labels):
        return np.asarray(labels(), dtype=np.int64)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    # Generic datasets: read labels one by one (renders/loads each sample once).
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def make_pairs(dataset, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced verification pairs from a labelled dataset.

    Genuine pairs: an identity with >= 2 samples (uniform over such identities), two distinct
    samples of it. Impostor pairs: two distinct identities (uniform), one sample of each.
    ``num_pairs // 2`` genuine pairs (rounded up) and the rest impostors, shuffled together.
    Uses ``dataset.labels()`` when available.

    Returns (idx1, idx2, issame): int64 (num_pairs,), int64 (num_pairs,), bool (num_pairs,).
    """
    if num_pairs < 2:
        raise PairsError(f"num_pairs must be >= 2, got {num_pairs}")
    labels = _dataset_labels(dataset)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise PairsError("impostor pairs need at least two identities in the dataset")
    if counts.max() < 2:
        raise PairsError("genuine pairs need an identity with at least two samples")
    members = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng([seed, 0xFACE])

    n_genuine = (num_pairs + 1) // 2
    n_impostor = num_pairs - n_genuine
    eligible = np.flatnonzero(counts >= 2)
    g_class = eligible[rng.integers(len(eligible), size=n_genuine)]
    first = rng.integers(counts[g_class])
    # Second pick among the other count-1 members: shift past the first to keep them distinct.
    second = rng.integers(counts[g_class] - 1)
    second = second + (second >= first)
    g1 = members[starts[g_class] + first]
    g2 = members[starts[g_class] + second]

    a_class = rng.integers(len(classes), size=n_impostor)
    b_class = rng.integers(len(classes) - 1, size=n_impostor)
    b_class = b_class + (b_class >= a_class)
    i1 = members[starts[a_class] + rng.integers(counts[a_class])]
    i2 = members[starts[b_class] + rng.integers(counts[b_class])]

    idx1 = np.concatenate([g1, i1]).astype(np.int64)
    idx2 = np.concatenate([g2, i2]).astype(np.int64)
    issame = np.concatenate([np.ones(n_genuine, bool), np.zeros(n_impostor, bool)])
    order = rng.permutation(num_pairs)
    return idx1[order], idx2[order], issame[order]
