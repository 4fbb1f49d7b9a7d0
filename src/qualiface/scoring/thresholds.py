"""Pair sets and operating thresholds, shared by evaluation and calibration.

Conventions (the ones every metric in ``qualiface.eval`` uses): a *score* is a similarity
(higher = more likely the same person); a pair is *accepted* at threshold ``t`` when
``score >= t``; labels are ``True``/``1`` for genuine (mated) pairs and ``False``/``0`` for
impostor (non-mated) pairs.

- ``check_pairs``: validate and convert scores and labels (used by every pair metric).
- ``count_within``: how many of ``total`` items a target rate allows (FMR, FAR, FPIR, a discard
  fraction), by one exact rule shared by every metric.
- ``threshold_at_fmr``: the lowest threshold whose false match rate over the impostor pairs is
  at most a target (the EDC's fixed threshold, and the operating point quality calibration
  refers to).
"""

from __future__ import annotations

import math

import numpy as np

from qualiface.errors import EvaluationError


def check_pairs(scores, labels, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert pair scores and labels -> (float array (N,), bool array (N,)).

    Raises ``EvaluationError`` for mismatched lengths, non-finite scores, labels other than
    0/1, or a set without genuine or without impostor pairs.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise EvaluationError(f"{what}: expected 1-D scores and labels, got shapes "
                              f"{scores.shape} and {labels.shape}")
    if len(scores) != len(labels):
        raise EvaluationError(f"{what}: {len(scores)} scores but {len(labels)} labels")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise EvaluationError(f"{what}: score {bad} is not finite ({scores[bad]})")
    if labels.dtype != np.bool_:
        if not np.all((labels == 0) | (labels == 1)):
            raise EvaluationError(f"{what}: labels must be 0/1 (impostor/genuine), got values "
                                  f"{np.unique(labels)[:5].tolist()}")
        labels = labels.astype(bool)
    n_genuine = int(labels.sum())
    if n_genuine == 0 or n_genuine == len(labels):
        raise EvaluationError(f"{what}: need both genuine and impostor pairs, got {n_genuine} "
                              f"genuine of {len(labels)}")
    return scores, labels


def count_within(rate: float, total: int) -> int:
    """The most of ``total`` items that a target ``rate`` allows: the largest ``k`` in
    ``[0, total]`` with ``k / total <= rate``, the quotient taken as float64 division computes
    it (correctly rounded; Python's ``int / int`` is).

    That quotient is the rate every report prints (``false_accepts / impostors``), so an
    operating point meets its target exactly when its printed rate does, and a decimal target
    means what it says: FMR 0.29 over 100 impostors allows 29 (although ``0.29 * 100`` is
    28.999999999999996), FMR 1e-3 over 1,000 allows 1. The rule is monotone in ``k``, so
    "measurable" (``count_within(rate, total) >= 1``) is simply ``1 / total <= rate``.

    It replaces ``floor(rate * total + 1e-9)``, whose tolerance allowed one item too many for a
    rate just below ``k / total`` (FMR 0.9999999999999999 over 10 impostors allowed all 10, an
    FMR of 1.0; 0.29999999999999993 allowed 3 of 10) and one too few once ``rate * total``
    passes about 1e8 (its rounding error then exceeds 1e-9).
    """
    total = int(total)
    rate = float(rate)
    if total <= 0 or not rate >= 0:  # NaN allows nothing
        return 0
    if rate >= 1:
        return total
    # rate * total is within a rounding or two of the answer; step onto the exact one.
    k = min(total, int(math.floor(rate * total)))
    while k < total and (k + 1) / total <= rate:
        k += 1
    while k > 0 and k / total > rate:
        k -= 1
    return k


def threshold_at_fmr(scores, labels, fmr: float, what: str = "EDC") -> float:
    """The lowest threshold whose FMR over all impostor pairs is at most ``fmr``.

    ``what`` names the caller in the errors (the EDC's threshold, a quality calibration's).

    With ``k = count_within(fmr, impostors)`` false matches allowed (the largest ``k`` with
    ``k / impostors <= fmr``), that is the smallest float above the (k+1)-th highest impostor
    score (accept = ``score >= threshold``), taken in the scores' own precision: for float32
    scores the next float32, so that comparing the float32 scores with it (NumPy casts a
    Python float to the array's dtype) still rejects that score.
    """
    # NaN, 0 or `--fmr 2` (a typo for 2e-2) would give a threshold that accepts every impostor,
    # which a calibration would then store without a word.
    if not 0.0 < fmr < 1.0:
        raise EvaluationError(f"FMR must lie strictly between 0 and 1, got {fmr:g}")
    scores, labels = check_pairs(scores, labels, what)
    # Kept in the scores' dtype: a float64 step above a float32 score rounds back onto it
    # when float32 scores are compared with the threshold, accepting that impostor and every
    # genuine score tied with it (FMR above the target, FNMR too low).
    impostor = np.sort(scores[~labels])[::-1]
    allowed = count_within(fmr, len(impostor))
    if allowed < 1:
        raise EvaluationError(f"{what}: FMR {fmr:g} is not measurable with {len(impostor)} "
                              "impostor pairs (need at least 1/FMR)")
    # fmr < 1 (checked above), so allowed < len(impostor): n / n = 1 > fmr.
    return float(np.nextafter(impostor[allowed], np.inf))
