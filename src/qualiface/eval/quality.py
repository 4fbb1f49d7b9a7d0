"""Face image quality assessment: the Error-versus-Discard Characteristic (EDC) and friends.

Standard EDC (Grother & Tabassi; ISO/IEC 29794-1; Schlett et al., "Considerations on the
evaluation of biometric quality assessment algorithms", T-BIOM 2024):

- the quality of a comparison is the *minimum* of its two samples' qualities (higher = better);
- the comparison threshold is fixed *beforehand* on all pairs, at a target FMR (1e-2, 1e-3):
  the lowest threshold whose FMR over all impostor pairs is at most the target;
- the mated comparisons are sorted by pair quality and the lowest-quality fraction is
  discarded; the curve is the FNMR of the remaining mated comparisons against the discarded
  fraction. **Ties**: comparisons with equal pair quality are discarded together (a quality
  threshold cannot split them), so the curve has points only at the realisable fractions;
  between them it is a step function (the value holds until the next realisable fraction),
  and a final point (1, 0) closes it, as in the reference implementation.

``edc_refixed`` is the variant MagFace and CR-FIQA report: all comparisons (mated and
non-mated) are discarded by pair quality and the threshold is re-fixed at the target FMR on the
remaining impostors at every discard level (evaluated on a grid of fractions, snapped to
realisable ones).

**pAUC**: the area under the step curve from 0 up to a discard limit (20 %, 30 %), not
normalised. The area under the *theoretical best* curve can be subtracted: a perfect quality
measure discards exactly the false non-matches first. The EDC literature (Olsen et al., "Finger
image quality assessment features - definitions and evaluation", 2016; Schlett et al.'s
reference code) uses the line ``max(0, FNMR0 - x)`` (``best="linear"``, the default, so values
compare with published ones). The exact best-case FNMR when a fraction ``x`` of the mated
comparisons is gone, all of them errors, is ``max(0, FNMR0 - x) / (1 - x)`` (``best="exact"``),
whose area up to ``L`` is ``m + (1 - FNMR0) ln(1 - m)`` with ``m = min(L, FNMR0)``.

Rank correlations (Spearman, Kendall tau-b) of quality against a known degradation severity
measure how well a score orders images by how damaged they are; a good quality score has a
strongly *negative* correlation with severity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qualiface.eval import EvaluationError
# threshold_at_fmr lives in the shared scoring module (calibration uses it too); still
# importable from here.
from qualiface.scoring.thresholds import check_pairs, count_within, threshold_at_fmr


def pair_quality(quality_first, quality_second) -> np.ndarray:
    """Quality of each comparison: the minimum of its two samples' qualities (P,)."""
    return np.minimum(np.asarray(quality_first, dtype=np.float64),
                      np.asarray(quality_second, dtype=np.float64))


@dataclass
class EdcCurve:
    """One EDC: FNMR (``errors``) after discarding ``discard_fractions`` of the comparisons.

    discard_fractions, errors: (K,) float64, fractions ascending from 0, last point (1, 0).
    thresholds: (K,) the comparison threshold used at each point (constant for the standard
    EDC, re-fixed per point for ``edc_refixed``). fmr: the target FMR the threshold came from.
    num_mated: mated comparisons in the curve.
    """

    discard_fractions: np.ndarray
    errors: np.ndarray
    thresholds: np.ndarray
    fmr: float
    num_mated: int

    @property
    def starting_error(self) -> float:
        return float(self.errors[0])


def _check_quality(pair_qualities, n: int) -> np.ndarray:
    q = np.asarray(pair_qualities, dtype=np.float64)
    if q.shape != (n,):
        raise EvaluationError(f"EDC: {n} comparisons but pair qualities of shape {q.shape}")
    if not np.all(np.isfinite(q)):
        raise EvaluationError("EDC: pair qualities must be finite")
    return q


def edc(scores, labels, pair_qualities, *, fmr: float = 1e-3,
        threshold: float | None = None) -> EdcCurve:
    """Standard FNMR-EDC (threshold fixed beforehand at ``fmr`` unless ``threshold`` is given).

    scores, labels, pair_qualities: (P,) over all comparisons (mated and non-mated).
    """
    scores, labels = check_pairs(scores, labels, "EDC")
    q = _check_quality(pair_qualities, len(scores))
    if threshold is None:
        threshold = threshold_at_fmr(scores, labels, fmr)
    elif np.isnan(threshold):
        # NaN compares false with every score: no mated comparison would count as an error,
        # and the curve would read FNMR 0 everywhere.
        raise EvaluationError("EDC: the comparison threshold is NaN")
    mated_q = q[labels]
    order = np.argsort(mated_q, kind="stable")
    sorted_q = mated_q[order]
    # In float64: NumPy rounds a Python-float threshold to float32 when comparing it with
    # float32 scores, so a given threshold of 0.7 (float32(0.7) = 0.699999988) counted a mated
    # score of 0.699999988 as a match. threshold_at_fmr's thresholds are float32 values, which
    # compare the same way in either precision.
    is_error = scores[labels][order].astype(np.float64) < float(threshold)
    num = len(sorted_q)
    # remaining_errors[k]: errors left after discarding the k lowest-quality comparisons.
    remaining_errors = np.concatenate([np.cumsum(is_error[::-1])[::-1], [0]])
    cuts = np.concatenate([[0], np.flatnonzero(sorted_q[1:] != sorted_q[:-1]) + 1])
    fractions = np.concatenate([cuts / num, [1.0]])
    errors = np.concatenate([remaining_errors[cuts] / (num - cuts), [0.0]])
    return EdcCurve(fractions, errors, np.full(len(fractions), float(threshold)), fmr, num)


def edc_refixed(scores, labels, pair_qualities, *, fmr: float = 1e-3,
                fractions: Sequence[float] | None = None) -> EdcCurve:
    """EDC with the threshold re-fixed at ``fmr`` after each discard (MagFace / CR-FIQA style).

    All comparisons are discarded by pair quality (ties together); ``fractions``: the grid of
    requested discard fractions (default 0, 0.01, ..., 0.95), each snapped down to the largest
    realisable fraction; a point is skipped when the remaining impostors cannot measure ``fmr``.
    The grid is taken in ascending order and always holds 0, so the curve starts at 0 whatever
    order or points are given.
    """
    scores, labels = check_pairs(scores, labels, "EDC")
    q = _check_quality(pair_qualities, len(scores))
    grid = np.arange(0, 0.951, 0.01) if fractions is None else np.asarray(fractions, dtype=float)
    # A fraction below 0 (or NaN, or above 1) was snapped to the *largest* realisable discard;
    # a grid in another order, or without 0, gave a curve in that order or starting later, so
    # edc_pauc integrated the wrong steps and starting_error was not the FNMR at 0 discarded.
    if not np.all(np.isfinite(grid)) or np.any((grid < 0) | (grid > 1)):
        raise EvaluationError(f"EDC: every discard fraction must lie in [0, 1], got "
                              f"{grid[~(np.isfinite(grid) & (grid >= 0) & (grid <= 1))][0]:g}")
    grid = np.unique(np.concatenate([[0.0], grid.ravel()]))
    order = np.argsort(q, kind="stable")
    sorted_q, sorted_scores, sorted_labels = q[order], scores[order], labels[order]
    total = len(scores)
    starts = np.concatenate([[0], np.flatnonzero(sorted_q[1:] != sorted_q[:-1]) + 1])
    out_f, out_e, out_t = [], [], []
    seen: set[int] = set()
    for fraction in grid:
        # The largest realisable cut whose fraction cut / total is <= the requested one
        # (count_within: exact, no float tolerance).
        within = count_within(fraction, total)
        cut = int(starts[np.searchsorted(starts, within, side="right") - 1])
        if cut in seen:
            continue
        seen.add(cut)
        kept_scores, kept_labels = sorted_scores[cut:], sorted_labels[cut:]
        n_impostor = int((~kept_labels).sum())
        if kept_labels.sum() == 0 or count_within(fmr, n_impostor) < 1:  # threshold_at_fmr's rule
            continue
        threshold = threshold_at_fmr(kept_scores, kept_labels, fmr)
        out_f.append(cut / total)
        out_e.append(float(np.mean(kept_scores[kept_labels] < threshold)))
        out_t.append(threshold)
    if not out_f:
        raise EvaluationError(f"EDC: FMR {fmr:g} is not measurable on these pairs")
    return EdcCurve(np.array(out_f), np.array(out_e), np.array(out_t), fmr,
                    int(labels.sum()))


def edc_pauc(curve: EdcCurve, limit: float) -> float:
    """Area under the EDC step function from 0 to discard fraction ``limit`` (not normalised)."""
    if not 0 <= limit <= 1:
        raise EvaluationError(f"pAUC discard limit must be in [0, 1], got {limit}")
    starts = curve.discard_fractions
    ends = np.concatenate([starts[1:], [1.0]])
    widths = np.clip(np.minimum(ends, limit) - starts, 0, None)
    return float(np.sum(curve.errors * widths))


def theoretical_best_area(starting_error: float, limit: float, best: str = "linear") -> float:
    """Area under the theoretical-best EDC up to ``limit`` (see the module docstring)."""
    e0 = float(starting_error)
    if best == "linear":
        return e0 * e0 / 2 - max(0.0, e0 - limit) ** 2 / 2
    if best == "exact":
        m = min(limit, e0)
        if e0 >= 1.0:
            return float(m)
        return float(m + (1 - e0) * np.log1p(-m))
    raise EvaluationError(f"unknown theoretical best {best!r}; use 'linear' or 'exact'")


def theoretical_best_fnmr(starting_error: float, fractions) -> np.ndarray:
    """The exact theoretical-best EDC: FNMR ``max(0, FNMR0 - x) / (1 - x)`` left once a fraction
    ``x`` of the mated comparisons is discarded, all of them false non-matches first (0 at
    ``x = 1``); the curve whose area ``theoretical_best_area(..., best="exact")`` is.

    A random discard, the other reference, keeps the FNMR at ``FNMR0`` (in expectation)."""
    x = np.asarray(fractions, dtype=np.float64)
    remaining = np.clip(float(starting_error) - x, 0.0, None)
    return np.where(x < 1.0, remaining / np.where(x < 1.0, 1.0 - x, 1.0), 0.0)


def edc_summary(curve: EdcCurve, limits: Sequence[float] = (0.2, 0.3),
                best: str = "linear") -> dict:
    """JSON-ready numbers: starting FNMR, pAUC at each limit, and pAUC minus the best's area."""
    out: dict = {"fmr": curve.fmr, "fnmr_at_0": curve.starting_error,
                 "threshold": float(curve.thresholds[0]), "num_mated": curve.num_mated}
    for limit in limits:
        key = f"{round(limit * 100):d}"
        pauc = edc_pauc(curve, limit)
        out[f"pauc_{key}"] = pauc
        out[f"pauc_{key}_minus_best"] = pauc - theoretical_best_area(curve.starting_error,
                                                                     limit, best)
    return out


def rank_correlations(quality, severity) -> dict[str, float]:
    """Spearman rho and Kendall tau-b of quality (N,) against degradation severity (N,)."""
    from scipy import stats  # lazy: scipy.stats (~0.6 s), needed only for rank correlations

    quality = np.asarray(quality, dtype=np.float64)
    severity = np.asarray(severity, dtype=np.float64)
    if quality.shape != severity.shape or quality.ndim != 1 or len(quality) < 3:
        raise EvaluationError(f"rank correlation: need matching 1-D arrays of >= 3 values, got "
                              f"{quality.shape} and {severity.shape}")
    # NaN gave a NaN correlation (null in metrics.json) and Inf a constant-looking one.
    if not (np.all(np.isfinite(quality)) and np.all(np.isfinite(severity))):
        raise EvaluationError("rank correlation: quality and severity must be finite numbers")
    if np.ptp(quality) == 0 or np.ptp(severity) == 0:
        raise EvaluationError("rank correlation: quality or severity is constant")
    return {"spearman": float(stats.spearmanr(quality, severity).statistic),
            "kendall": float(stats.kendalltau(quality, severity).statistic)}
