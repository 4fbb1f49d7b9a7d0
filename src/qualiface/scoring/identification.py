"""The outcome of a 1:N search and rank-k accuracy, shared by evaluation and the gallery.

A probe is *mated* when its subject has at least one gallery entry. Its rank is 1 + the number
of non-mated gallery entries scoring at least as high as its best mated entry (ties count
against the probe: a tie is not a success). Rank-k accuracy is the fraction of mated probes with
rank <= k (closed-set CMC over mated probes).

``qualiface.eval.identification`` computes a ``SearchResult`` for benchmarks (and TPIR at FPIR)
and re-exports both names; ``qualiface.infer.search`` reports a gallery's rank-k rates with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qualiface.errors import EvaluationError


@dataclass
class SearchResult:
    """Per-probe outcome of searching a gallery.

    ranks: (P,) rank of the best mated entry (1 = first), 0 for probes without a mate.
    mated_scores: (P,) score of the best mated entry (-inf without a mate).
    top_scores: (P,) highest score over the whole gallery.
    """

    ranks: np.ndarray
    mated_scores: np.ndarray
    top_scores: np.ndarray

    @property
    def has_mate(self) -> np.ndarray:
        return self.ranks > 0


def rank_accuracy(result: SearchResult, ranks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """``{k: fraction of mated probes at rank <= k}``."""
    mated_ranks = result.ranks[result.has_mate]
    if len(mated_ranks) == 0:
        raise EvaluationError("rank accuracy: no probe has a mate in the gallery")
    return {int(k): float(np.mean(mated_ranks <= k)) for k in ranks}
