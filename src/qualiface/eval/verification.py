"""1:1 verification metrics: exact ROC with ties, TAR at FAR, EER, AUC and k-fold accuracy.

Conventions used everywhere in ``qualiface.eval``: a *score* is a similarity (higher = more
likely the same person); a pair is *accepted* at threshold ``t`` when ``score >= t``; labels are
``True``/``1`` for genuine (mated) pairs and ``False``/``0`` for impostor (non-mated) pairs.

Everything is vectorised around one sort per class: genuine and impostor scores are sorted
separately (``np.sort``, no argsort) and every count "how many scores >= t" is a
``searchsorted``. That is exact with ties (tied scores are accepted or rejected together, as
a threshold does) and scales to the 15.6 M pairs of IJB-C in about a second.

**The ROC** returned by :func:`roc_curve` has one corner pair per distinct *genuine* score
(the threshold just above it, then at it), plus the two ends. Along a stretch of thresholds
where only impostor scores are crossed the curve is a horizontal line, so the points skipped
there are collinear: the polyline is identical to the one through every distinct threshold
(scikit-learn's ``roc_curve(drop_intermediate=False)``), and AUC, EER and TAR at FAR computed
from it are exact.

**TAR at FAR** ``f`` is the largest TAR over operating points whose FAR is at most ``f`` (a
conservative reading: never interpolated past the target). It is reported as NaN when there are
fewer than ``1 / f`` impostor pairs, because then no FAR between 0 and ``f`` can be observed.

**k-fold accuracy** (the LFW protocol): for each fold the threshold that maximises accuracy on
the *other* folds is applied to the held-out fold. The maximising threshold is always a genuine
score (moving the threshold up to the next genuine score can only reject more impostors), and
it is placed halfway between that score and the next lower score so that it does not sit on a
training sample. Ties between equally good thresholds go to the highest one. The mean and the
population standard deviation (``ddof=0``, as InsightFace reports it) over folds are returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qualiface.eval import EvaluationError
# check_pairs lives in the shared scoring module (calibration uses it too); still importable
# from here.
from qualiface.scoring.thresholds import check_pairs, count_within

#: The FAR operating points reported by default (IJB-C style, 1e-6 ... 1e-1).
DEFAULT_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def far_key(far: float) -> str:
    """The JSON key used for a FAR value: ``1e-03`` style (stable, sortable by exponent)."""
    return f"{far:.0e}"


@dataclass(frozen=True)
class RocCurve:
    """An exact ROC polyline, FAR ascending.

    far, tar:     (K,) float64 rates in [0, 1]; the first point is (0, 0), the last (1, 1).
    thresholds:   (K,) accept when ``score >= threshold`` (``+inf`` for the first point).
    false_accepts, true_accepts: (K,) integer counts behind ``far`` and ``tar``.
    num_genuine, num_impostor: pair counts.
    """

    far: np.ndarray
    tar: np.ndarray
    thresholds: np.ndarray
    false_accepts: np.ndarray
    true_accepts: np.ndarray
    num_genuine: int
    num_impostor: int

    def downsample(self, max_points: int = 2000) -> RocCurve:
        """A lighter curve for plotting: points evenly spaced in log FAR, both ends kept."""
        if len(self.far) <= max_points:
            return self
        positive = np.flatnonzero(self.far > 0)
        targets = np.geomspace(self.far[positive[0]], 1.0, max_points - 2)
        picked = np.unique(np.concatenate([
            [0, positive[0], len(self.far) - 1],
            np.searchsorted(self.far, targets, side="right") - 1,
        ]))
        return RocCurve(self.far[picked], self.tar[picked], self.thresholds[picked],
                        self.false_accepts[picked], self.true_accepts[picked],
                        self.num_genuine, self.num_impostor)


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.sort(scores[labels]), np.sort(scores[~labels])


def _accepted(sorted_scores: np.ndarray, thresholds: np.ndarray, *, strict: bool = False) -> np.ndarray:
    """How many of ``sorted_scores`` are >= each threshold (> when ``strict``)."""
    side = "right" if strict else "left"
    return len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side=side)


def roc_curve(scores, labels) -> RocCurve:
    """Exact ROC of similarity ``scores`` (N,) against genuine ``labels`` (N,), ties included."""
    scores, labels = check_pairs(scores, labels)
    genuine, impostor = _split_sorted(scores, labels)
    distinct = np.unique(genuine)[::-1]  # descending
    # Per distinct genuine score t: the corner just above t (score > t) then at t (score >= t).
    above_tp = _accepted(genuine, distinct, strict=True)
    above_fp = _accepted(impostor, distinct, strict=True)
    at_tp = _accepted(genuine, distinct)
    at_fp = _accepted(impostor, distinct)
    above_thr = np.nextafter(distinct, np.inf)  # score >= nextafter(t) <=> score > t
    tp = np.concatenate([[0], np.stack([above_tp, at_tp], 1).ravel(), [len(genuine)]])
    fp = np.concatenate([[0], np.stack([above_fp, at_fp], 1).ravel(), [len(impostor)]])
    lowest = min(genuine[0], impostor[0])
    thr = np.concatenate([[np.inf], np.stack([above_thr, distinct], 1).ravel(), [lowest]])
    thr = thr.astype(np.float64)
    # Drop repeated points (keep the first, i.e. the highest threshold reaching that point).
    keep = np.ones(len(tp), dtype=bool)
    keep[1:] = (tp[1:] != tp[:-1]) | (fp[1:] != fp[:-1])
    tp, fp, thr = tp[keep], fp[keep], thr[keep]
    return RocCurve(
        far=fp / len(impostor), tar=tp / len(genuine), thresholds=thr,
        false_accepts=fp, true_accepts=tp,
        num_genuine=len(genuine), num_impostor=len(impostor),
    )


def tar_at_far(roc: RocCurve, fars: Sequence[float] = DEFAULT_FARS) -> dict[float, tuple[float, float]]:
    """``{far: (tar, threshold)}``: the best TAR whose FAR is <= ``far`` and its threshold
    (the highest threshold reaching that TAR, i.e. the fewest false accepts for it).

    NaN (for both) when fewer than ``1 / far`` impostor pairs exist (not measurable).
    """
    out: dict[float, tuple[float, float]] = {}
    for far in fars:
        if not 0 < far <= 1:
            raise EvaluationError(f"FAR must be in (0, 1], got {far}")
        # Compare counts, not rates, so 1e-3 * 1000 is exactly one false accept: the largest
        # count whose rate count / impostors is <= far (no float tolerance; count_within).
        allowed = count_within(far, roc.num_impostor)
        if allowed < 1:
            out[far] = (float("nan"), float("nan"))
            continue
        index = int(np.searchsorted(roc.false_accepts, allowed, side="right")) - 1
        # The last point within budget may end a horizontal stretch (only impostors crossed
        # since the TAR was reached): go back to the first point with that TAR.
        index = int(np.searchsorted(roc.true_accepts, roc.true_accepts[index], side="left"))
        out[far] = (float(roc.tar[index]), float(roc.thresholds[index]))
    return out


def equal_error_rate(roc: RocCurve) -> float:
    """EER: where the ROC polyline crosses FAR = 1 - TAR (= FRR), linearly interpolated."""
    gap = roc.tar + roc.far - 1.0  # rises from -1 to +1 along the curve
    k = int(np.argmax(gap >= 0))
    if k == 0:
        return float(roc.far[0])
    t = -gap[k - 1] / (gap[k] - gap[k - 1])
    return float(roc.far[k - 1] + t * (roc.far[k] - roc.far[k - 1]))


def area_under_curve(roc: RocCurve) -> float:
    """Trapezoidal area under the ROC (equals the Mann-Whitney AUC with ties counted 1/2)."""
    return float(np.sum(np.diff(roc.far) * (roc.tar[1:] + roc.tar[:-1]) * 0.5))


def best_accuracy_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score >= threshold`` on these pairs."""
    scores, labels = check_pairs(scores, labels)
    genuine, impostor = _split_sorted(scores, labels)
    candidates = np.concatenate([[np.inf], np.unique(genuine)[::-1]])
    correct = _accepted(genuine, candidates) + (len(impostor) - _accepted(impostor, candidates))
    best = int(np.argmax(correct))  # first maximum = highest threshold
    chosen = candidates[best]
    if np.isfinite(chosen):
        below = [s[np.searchsorted(s, chosen, side="left") - 1]
                 for s in (genuine, impostor) if np.searchsorted(s, chosen, side="left") > 0]
        if below:
            highest_below = float(max(below))
            middle = 0.5 * (float(chosen) + highest_below)
            # Between adjacent floats the midpoint rounds onto the lower score, which the
            # threshold would then accept: keep the genuine score itself in that case.
            chosen = middle if middle > highest_below else float(chosen)
    return float(chosen), float(correct[best] / len(scores))


@dataclass
class KFoldAccuracy:
    """Per-fold accuracies and thresholds of the k-fold protocol, with mean and std."""

    accuracies: np.ndarray
    thresholds: np.ndarray
    fold_ids: np.ndarray = field(repr=False)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


def default_folds(num_pairs: int, num_folds: int = 10) -> np.ndarray:
    """Contiguous, near-equal folds in file order: fold id (N,) in ``[0, num_folds)``.

    The split of ``sklearn.model_selection.KFold(num_folds, shuffle=False)``, which InsightFace's
    ``.bin`` evaluation uses: the first ``num_pairs % num_folds`` folds hold one pair more, so
    accuracies stay comparable with published ones when the count is not a multiple of 10.
    """
    if num_folds < 1:
        raise EvaluationError(f"num_folds must be >= 1, got {num_folds}")
    sizes = np.full(num_folds, num_pairs // num_folds)
    sizes[: num_pairs % num_folds] += 1
    return np.repeat(np.arange(num_folds), sizes)


def accuracy_folds(folds) -> tuple[np.ndarray | None, str | None]:
    """The folds a pair set's k-fold accuracy uses, from its protocol fold id per pair (or None)
    -> (folds for ``kfold_accuracy`` / ``evaluate_verification``, note or None).

    Two or more protocol folds: those folds, no note. One protocol fold cannot hold itself out:
    None (``default_folds``: 10 contiguous sub-folds of its pairs) with a note saying so, for
    the report; it is not refused (a training run's validator must not stop mid-run). No
    folds, or no pairs: None, no note.
    """
    if folds is None:
        return None, None
    folds = np.asarray(folds)
    unique = np.unique(folds)
    if len(unique) > 1:
        return folds, None
    if not len(unique):
        return None, None
    return None, (f"one protocol fold ({int(unique[0])}) selected: the accuracy is over "
                  "10 contiguous sub-folds of its pairs, not over protocol folds")


def kfold_accuracy(scores, labels, folds=None, num_folds: int = 10) -> KFoldAccuracy:
    """LFW-style accuracy: threshold fitted on the other folds, applied to each held-out fold.

    ``folds``: the protocol's fold id per pair (N,) (any hashable integers); default contiguous
    ``num_folds`` folds in order, which is the LFW ``pairs.txt`` layout.
    """
    scores, labels = check_pairs(scores, labels)
    fold_ids = default_folds(len(scores), num_folds) if folds is None else np.asarray(folds)
    if fold_ids.shape != scores.shape:
        raise EvaluationError(f"fold ids: expected {len(scores)} values, got shape {fold_ids.shape}")
    if fold_ids.dtype.kind == "f" and not np.all(np.isfinite(fold_ids)):
        # NaN != NaN: every NaN pair was its own empty "held-out fold", a NaN accuracy.
        raise EvaluationError("fold ids must be finite numbers")
    unique_folds = np.unique(fold_ids)
    if len(unique_folds) < 2:
        raise EvaluationError(f"k-fold accuracy needs at least 2 folds, got {len(unique_folds)}")
    accuracies, thresholds = [], []
    for fold in unique_folds:
        held_out = fold_ids == fold
        threshold, _ = best_accuracy_threshold(scores[~held_out], labels[~held_out])
        # In float64: the midpoint threshold is not representable in float32, and NumPy would
        # round it onto a float32 training score when comparing float32 scores with it.
        predicted = scores[held_out].astype(np.float64) >= threshold
        accuracies.append(float(np.mean(predicted == labels[held_out])))
        thresholds.append(threshold)
    return KFoldAccuracy(np.array(accuracies), np.array(thresholds), fold_ids)


@dataclass
class VerificationResult:
    """Everything a pair benchmark reports; ``metrics()`` is the JSON-ready part."""

    roc: RocCurve
    tar: dict[float, tuple[float, float]]
    eer: float
    auc: float
    kfold: KFoldAccuracy | None

    def metrics(self) -> dict:
        out = {
            "num_genuine": self.roc.num_genuine,
            "num_impostor": self.roc.num_impostor,
            "auc": self.auc,
            "eer": self.eer,
            "tar_at_far": {far_key(f): v[0] for f, v in self.tar.items()},
            "threshold_at_far": {far_key(f): v[1] for f, v in self.tar.items()},
        }
        if self.kfold is not None:
            out.update({
                "accuracy": self.kfold.mean,
                "accuracy_std": self.kfold.std,
                "fold_accuracies": self.kfold.accuracies.tolist(),
                "fold_thresholds": self.kfold.thresholds.tolist(),
            })
        return out


def evaluate_verification(scores, labels, folds=None, *, num_folds: int | None = 10,
                          fars: Sequence[float] = DEFAULT_FARS) -> VerificationResult:
    """ROC, TAR at each FAR, EER, AUC and (unless ``num_folds`` is None and no ``folds``) k-fold
    accuracy for one set of pair scores (N,) and labels (N,)."""
    scores, labels = check_pairs(scores, labels)
    roc = roc_curve(scores, labels)
    kfold = None
    if folds is not None or num_folds is not None:
        kfold = kfold_accuracy(scores, labels, folds, num_folds or 10)
    return VerificationResult(roc, tar_at_far(roc, fars), equal_error_rate(roc),
                              area_under_curve(roc), kfold)
