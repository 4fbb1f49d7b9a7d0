"""Pair sets and operating thresholds, shared by evaluation and calibration.

Conventions (the ones every metric in ``qualiface.eval`` uses): a *score* is a similarity
(higher = more likely the same person); a pair is *accepted* at threshold ``t`` when
``score >= t``; labels are ``True``/``1`` for genuine (mated) pairs and ``False``/``0`` for
impostor (non-mated) pairs.

- ``check_pairs``: validate and convert scores and labels (used by every pair metric).
- ``threshold_at_fmr``: the lowest threshold whose false match rate over the impostor pairs is
  at most a target (the EDC's fixed threshold, and the operating point quality calibration
  refers to).
"""

from __future__ import annotations

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


def threshold_at_fmr(scores, labels, fmr: float, what: str = "EDC") -> float:
    """The lowest threshold whose FMR over all impostor pairs is at most ``fmr``.

    ``what`` names the caller in the errors (the EDC's threshold, a quality calibration's).

    With ``k = floor(fmr * impostors)`` false matches allowed, that is the smallest float
    above the (k+1)-th highest impostor score (accept = ``score >= threshold``), taken in the
    scores' own precision: for float32 scores the next float32, so that comparing the float32
    scores with it (NumPy casts a Python float to the array's dtype) still rejects that score.
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
    allowed = int(np.floor(fmr * len(impostor) + 1e-9))
    if allowed < 1:
        raise EvaluationError(f"{what}: FMR {fmr:g} is not measurable with {len(impostor)} "
                              "impostor pairs (need at least 1/FMR)")
    if allowed >= len(impostor):
        return float(impostor[-1])
    return float(np.nextafter(impostor[allowed], np.inf))
