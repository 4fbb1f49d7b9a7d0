"""Calibrated quality: raw quality -> probability that a comparison with this face is correct.

Raw quality scores (an embedding norm, an EQFace sigmoid, ...) are only ordinal. Calibration
turns them into a number a deployer can reason with: the probability that a verification pair
involving a sample of this quality is decided correctly at the operating point.

Procedure (``calibrate_from_pairs``):

1. Score labelled pairs by cosine similarity of their embeddings.
2. Fix the operating threshold at a target false match rate (FMR) on the impostor pairs
   (``qualiface.scoring.thresholds.threshold_at_fmr``); a pair is *accepted* when
   ``score >= threshold`` (the ``qualiface.eval`` convention).
3. A pair is *correct* when accepted == issame. Each of the two samples of a pair inherits the
   pair's outcome, so a sample appearing in several pairs contributes one observation per pair.
4. Fit a monotone increasing map from raw quality to the probability of a correct outcome:
   isotonic regression (default; stored as breakpoints, applied by linear interpolation) or a
   logistic curve (stored as slope + intercept).

The result is a :class:`QualityCalibration`, plain JSON inside the model package (no pickle);
that data class and its (de)serialisation are :mod:`qualiface.package.calibration`, re-exported
here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qualiface.errors import EvaluationError
# The stored form (part of the model.json schema) lives in the package format; re-exported here.
from qualiface.package.calibration import (  # noqa: F401
    CALIBRATION_METHODS,
    CalibrationError,
    QualityCalibration,
)
from qualiface.scoring.similarity import cosine_scores
from qualiface.scoring.thresholds import threshold_at_fmr


def fit_calibration(
    quality, correct, *, method: str = "isotonic", fmr: float = float("nan"), threshold: float = float("nan")
) -> QualityCalibration:
    """Fit the monotone increasing map quality (N,) -> P(correct) from per-sample outcomes (N,)."""
    q = np.asarray(quality, dtype=np.float64).ravel()
    c = np.asarray(correct, dtype=np.float64).ravel()
    if q.shape != c.shape or q.size == 0:
        raise CalibrationError(f"quality and outcomes must be equal-length 1-D, got {q.shape} and {c.shape}")
    if not np.all(np.isfinite(q)):
        raise CalibrationError("quality contains NaN or infinite values")
    # A float32 sigmoid underflows to denormals (sigmoid(-88) = 6e-39); model.json refuses
    # denormal numbers as corruption, so such a breakpoint would make the package unloadable.
    q = np.where(np.abs(q) < np.finfo(np.float32).tiny, 0.0, q)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression  # lazy: scikit-learn (~0.8 s), needed only when fitting

        iso = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(q, c)
        return QualityCalibration(
            method=method,
            fmr=fmr,
            threshold=threshold,
            x=[float(v) for v in iso.X_thresholds_],
            y=[float(v) for v in iso.y_thresholds_],
        )
    if method == "logistic":
        if c.min() == c.max():
            raise CalibrationError("all outcomes are identical; a logistic curve cannot be fitted")
        from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn (~0.8 s), needed only when fitting

        # Fit on standardised quality (well-conditioned for any raw scale), then fold the
        # scaling back so the stored curve applies to raw quality directly.
        mean, std = q.mean(), max(q.std(), 1e-12)
        model = LogisticRegression(C=1e4).fit(((q - mean) / std)[:, None], c.astype(int))
        slope = float(model.coef_[0, 0]) / std
        intercept = float(model.intercept_[0]) - slope * mean
        if slope < 0:  # keep the promise of a monotone increasing map: a flat curve instead
            slope, intercept = 0.0, float(np.log(c.mean() / max(1.0 - c.mean(), 1e-12)))
        return QualityCalibration(
            method=method, fmr=fmr, threshold=threshold, coef=float(slope), intercept=float(intercept)
        )
    raise CalibrationError(f"unknown calibration method {method!r}; known: {', '.join(CALIBRATION_METHODS)}")


@dataclass
class PairOutcomes:
    """Scores and outcomes of a labelled pair set at a fixed operating threshold."""

    scores: np.ndarray  # (N,) cosine similarities
    threshold: float
    correct: np.ndarray  # (N,) bool: (score >= threshold) == issame


def pair_outcomes(emb1, emb2, issame, fmr: float) -> PairOutcomes:
    """Cosine-score the pairs, fix the threshold at ``fmr`` and mark each pair correct or not.

    Needs at least ``1 / fmr`` impostor pairs (else ``CalibrationError``).
    """
    issame = np.asarray(issame, dtype=bool)
    emb1, emb2 = np.asarray(emb1), np.asarray(emb2)
    if emb1.shape != emb2.shape or emb1.ndim != 2 or emb1.shape[0] != issame.shape[0]:
        raise CalibrationError(
            f"pair embeddings must both be (N, D) with N = {issame.shape[0]} labels, got {emb1.shape} and {emb2.shape}"
        )
    raw = cosine_scores(emb1, emb2)
    scores = raw.astype(np.float64)  # exact: every float32 is a float64
    try:
        # From the scores in the precision a user compares later (float32 cosines): a float64
        # step above a float32 score rounds back onto it in a float32 comparison.
        threshold = threshold_at_fmr(raw, issame, fmr, what="calibration")
    except EvaluationError as exc:
        raise CalibrationError(str(exc)) from None
    return PairOutcomes(scores=scores, threshold=threshold, correct=(scores >= threshold) == issame)


def calibration_problem(issame, *, fmr: float, method: str) -> str | None:
    """Why pairs labelled ``issame`` cannot be calibrated at ``fmr`` with ``method``, or None.

    Everything :func:`calibrate_from_pairs` refuses that the labels alone decide (an unknown
    method, an FMR outside (0, 1), no genuine or no impostor pairs, fewer than ``1 / fmr``
    impostor pairs), so a command can say it before embedding the images, not after.
    """
    if method not in CALIBRATION_METHODS:
        return f"unknown calibration method {method!r}; known: {', '.join(CALIBRATION_METHODS)}"
    issame = np.asarray(issame, dtype=bool)
    try:  # the fit's own rule, on stand-in scores: only the labels and the FMR matter to it
        threshold_at_fmr(np.zeros(issame.shape, np.float32), issame, fmr, what="calibration")
    except EvaluationError as exc:
        return str(exc)
    return None


def calibrate_from_pairs(
    emb1, emb2, quality1, quality2, issame, *, fmr: float = 1e-2, method: str = "isotonic"
) -> QualityCalibration:
    """Fit a calibration from a labelled pair set.

    emb1, emb2: (N, D) embeddings of the two images of each pair; quality1, quality2: (N,) raw
    quality; issame: (N,) bool. Returns a :class:`QualityCalibration` at the threshold that gives
    ``fmr`` on the impostor pairs.
    """
    outcomes = pair_outcomes(emb1, emb2, issame, fmr)
    q = np.concatenate([np.asarray(quality1, dtype=np.float64), np.asarray(quality2, dtype=np.float64)])
    if q.shape[0] != 2 * outcomes.correct.shape[0]:
        raise CalibrationError(f"quality arrays must have one value per pair ({outcomes.correct.shape[0]})")
    calibration = fit_calibration(
        q, np.concatenate([outcomes.correct, outcomes.correct]), method=method, fmr=fmr,
        threshold=outcomes.threshold,
    )
    calibration.n_pairs = int(outcomes.correct.shape[0])
    calibration.accuracy = float(outcomes.correct.mean())
    return calibration


@dataclass
class RejectionPoint:
    """A quality threshold and what it buys on genuine pairs at the operating threshold."""

    quality_threshold: float  # reject a sample whose (calibrated) quality is below this
    fnmr: float  # FNMR on the genuine pairs whose two samples are both kept
    rejected_fraction: float  # fraction of genuine pairs dropped (one of its samples rejected)


def rejection_threshold_for_fnmr(
    quality1, quality2, scores, issame, threshold: float, target_fnmr: float
) -> RejectionPoint:
    """The lowest quality threshold whose kept genuine pairs reach ``target_fnmr``.

    A pair is kept when both its samples have quality >= the quality threshold (a pair is as
    good as its worse sample). Use held-out pairs, not the ones the calibration was fitted on.
    Raises ``CalibrationError`` when even the strictest threshold keeping one pair misses it.
    """
    issame = np.asarray(issame, dtype=bool)
    pair_quality = np.minimum(np.asarray(quality1, dtype=np.float64), np.asarray(quality2, dtype=np.float64))[issame]
    genuine_miss = (np.asarray(scores, dtype=np.float64) < threshold)[issame]
    if pair_quality.size == 0:
        raise CalibrationError("no genuine pairs: FNMR is undefined")
    order = np.argsort(pair_quality)
    sorted_quality, sorted_miss = pair_quality[order], genuine_miss[order]
    # Keeping pairs from index i on: misses among them = suffix sum, count = n - i.
    suffix_misses = np.cumsum(sorted_miss[::-1])[::-1]
    kept = np.arange(sorted_quality.size, 0, -1)
    fnmr = suffix_misses / kept
    # Only cut between distinct quality values (ties are kept or dropped together).
    starts = np.r_[True, sorted_quality[1:] > sorted_quality[:-1]]
    ok = np.flatnonzero(starts & (fnmr <= target_fnmr))
    if ok.size == 0:
        raise CalibrationError(f"no quality threshold reaches FNMR <= {target_fnmr} on these pairs")
    i = int(ok[0])
    return RejectionPoint(
        quality_threshold=float(sorted_quality[i]), fnmr=float(fnmr[i]), rejected_fraction=i / sorted_quality.size
    )
