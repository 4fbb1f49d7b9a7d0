"""Verification metrics against scikit-learn and brute force, on random data with heavy ties."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

from qualiface.eval import EvaluationError
from qualiface.eval.verification import (
    area_under_curve,
    best_accuracy_threshold,
    default_folds,
    equal_error_rate,
    evaluate_verification,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
)


def _random_pairs(seed: int, n: int = 3000, levels: int | None = 40):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(0.0, 1.0, n) + 1.2 * labels
    if levels is not None:  # quantise to force many ties, within and across classes
        scores = np.round(scores * levels / 8) / (levels / 8)
    return scores.astype(np.float32), labels


@pytest.mark.parametrize("seed,levels", [(0, 40), (1, 8), (2, None)])
def test_roc_points_lie_on_sklearn_curve_and_auc_matches(seed, levels):
    scores, labels = _random_pairs(seed, levels=levels)
    roc = roc_curve(scores, labels)
    fpr, tpr, thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    sk_points = set(zip(np.round(fpr, 12), np.round(tpr, 12)))
    ours = set(zip(np.round(roc.far, 12), np.round(roc.tar, 12)))
    assert ours <= sk_points
    assert area_under_curve(roc) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # Thresholds reproduce their own operating points.
    for far, tar, t in zip(roc.far[1:], roc.tar[1:], roc.thresholds[1:]):
        accepted = scores >= t
        assert np.mean(accepted[~labels]) == pytest.approx(far)
        assert np.mean(accepted[labels]) == pytest.approx(tar)


@pytest.mark.parametrize("seed", [3, 4])
def test_tar_at_far_equals_brute_force_threshold_search(seed):
    scores, labels = _random_pairs(seed, n=4000, levels=30)
    roc = roc_curve(scores, labels)
    result = tar_at_far(roc, [1e-3, 1e-2, 1e-1])
    candidates = np.concatenate([np.unique(scores), [np.inf]])
    for far, (tar, threshold) in result.items():
        best = 0.0
        for t in candidates:  # every possible decision rule score >= t
            if np.mean(scores[~labels] >= t) <= far:
                best = max(best, np.mean(scores[labels] >= t))
        assert tar == pytest.approx(best)
        assert np.mean(scores[~labels] >= threshold) <= far
        assert np.mean(scores[labels] >= threshold) == pytest.approx(tar)


def test_tar_at_far_threshold_is_the_highest_reaching_that_tar():
    # Genuine 0.9, 0.5; impostors 0.8, 0.7, 0.5, 0.1. At FAR 0.5 (2 false accepts allowed) the
    # best TAR is 0.5, reached by every threshold in (0.5, 0.9]; the documented threshold is the
    # highest of them (0.9, no false accept), as at FAR 0.25, not one just above 0.5.
    scores = np.array([0.9, 0.5, 0.8, 0.7, 0.5, 0.1])
    labels = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    result = tar_at_far(roc_curve(scores, labels), [0.25, 0.5])
    assert result[0.25] == (0.5, 0.9)
    assert result[0.5] == (0.5, 0.9)
    # Brute force on tied random data: the threshold is the highest candidate with FA within
    # the budget and the reported TAR.
    scores, labels = _random_pairs(10, n=800, levels=12)
    result = tar_at_far(roc_curve(scores, labels), [1e-2, 1e-1])
    candidates = np.concatenate([[np.inf], np.unique(scores), np.nextafter(np.unique(scores), np.inf)])
    for far, (tar, threshold) in result.items():
        allowed = np.floor(far * np.sum(~labels) + 1e-9)
        ok = [t for t in candidates if np.sum(scores[~labels] >= t) <= allowed
              and np.mean(scores[labels] >= t) == tar]
        assert threshold == max(ok)


def test_tar_at_unmeasurable_far_is_nan():
    scores, labels = _random_pairs(5, n=500)
    result = tar_at_far(roc_curve(scores, labels), [1e-4, 1e-1])
    assert np.isnan(result[1e-4][0])
    assert np.isfinite(result[1e-1][0])


def test_eer_matches_sklearn_interpolation_on_continuous_scores():
    scores, labels = _random_pairs(6, n=20000, levels=None)
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    fnr = 1 - tpr
    k = np.argmax(fnr <= fpr)  # first point where the curves crossed
    eer_bounds = sorted([fpr[k - 1], fnr[k - 1], fpr[k], fnr[k]])
    eer = equal_error_rate(roc_curve(scores, labels))
    assert eer_bounds[0] - 1e-12 <= eer <= eer_bounds[-1] + 1e-12
    # Separable scores have zero EER; identical distributions have EER 0.5 in expectation.
    assert equal_error_rate(roc_curve([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])) == 0.0


def test_best_accuracy_threshold_is_optimal_and_between_samples():
    scores, labels = _random_pairs(7, n=600, levels=10)
    threshold, accuracy = best_accuracy_threshold(scores, labels)
    brute = max(np.mean((scores >= t) == labels) for t in np.concatenate([np.unique(scores), [np.inf]]))
    assert accuracy == pytest.approx(brute)
    assert np.mean((scores >= threshold) == labels) == pytest.approx(brute)
    assert threshold not in set(scores.tolist())  # placed between two observed scores


def test_kfold_uses_other_folds_only_and_accepts_protocol_folds():
    scores, labels = _random_pairs(8, n=1200, levels=25)
    folds = np.repeat([8, 9, 10], 400)
    result = kfold_accuracy(scores, labels, folds)
    for fold, accuracy, threshold in zip([8, 9, 10], result.accuracies, result.thresholds):
        train = folds != fold
        expected_threshold, _ = best_accuracy_threshold(scores[train], labels[train])
        assert threshold == expected_threshold
        held = folds == fold
        assert accuracy == pytest.approx(np.mean((scores[held] >= threshold) == labels[held]))
    assert result.mean == pytest.approx(np.mean(result.accuracies))
    assert result.std == pytest.approx(np.std(result.accuracies))
    default = kfold_accuracy(scores, labels, num_folds=3)
    np.testing.assert_allclose(default.accuracies, result.accuracies)  # contiguous == 8,9,10


def _kfold_ids(n: int, k: int = 10) -> np.ndarray:
    """Fold id per pair as sklearn's unshuffled KFold assigns the test folds."""
    ids = np.full(n, -1)
    for fold, (_, test) in enumerate(KFold(n_splits=k, shuffle=False).split(np.zeros(n))):
        ids[test] = fold
    return ids


@pytest.mark.parametrize("n", [10, 11, 13, 19, 1003, 5999, 6000, 7001, 12_005])
def test_default_folds_match_sklearn_kfold(n):
    # .bin sets carry no folds: their split must be the conventional one, where the first
    # n % 10 folds get the extra pairs (an even spread moved pairs between folds).
    folds = default_folds(n)
    np.testing.assert_array_equal(folds, _kfold_ids(n))
    sizes = np.bincount(folds, minlength=10)
    assert sizes.tolist() == [n // 10 + (fold < n % 10) for fold in range(10)]
    assert np.all(np.diff(folds) >= 0)  # contiguous, in file order


def test_default_folds_keep_lfw_6000_and_feed_kfold_accuracy():
    np.testing.assert_array_equal(default_folds(6000), np.repeat(np.arange(10), 600))  # unchanged
    scores, labels = _random_pairs(11, n=1003, levels=25)  # 1003: folds of 101 x 3, 100 x 7
    default = kfold_accuracy(scores, labels)
    np.testing.assert_array_equal(default.fold_ids, _kfold_ids(1003))
    explicit = kfold_accuracy(scores, labels, _kfold_ids(1003))
    np.testing.assert_array_equal(default.accuracies, explicit.accuracies)
    metrics = evaluate_verification(scores, labels).metrics()
    assert metrics["fold_accuracies"] == default.accuracies.tolist()
    with pytest.raises(EvaluationError, match="num_folds must be >= 1, got 0"):
        default_folds(100, 0)


def test_evaluate_verification_metrics_dict_and_bad_input():
    scores, labels = _random_pairs(9, n=2000)
    metrics = evaluate_verification(scores, labels).metrics()
    assert set(metrics["tar_at_far"]) == {"1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"}
    assert 0.5 < metrics["accuracy"] <= 1.0 and len(metrics["fold_accuracies"]) == 10
    with pytest.raises(EvaluationError, match="both genuine and impostor"):
        roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(EvaluationError, match="3 scores but 2 labels"):
        roc_curve([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(EvaluationError, match="not finite"):
        roc_curve([0.1, np.nan], [1, 0])


def test_kfold_midpoint_threshold_is_not_rounded_onto_a_float32_score():
    # Adjacent float32 scores: the midpoint threshold of the training fold (impostor 1.0 <
    # threshold < genuine 1.0000001) is not a float32; compared with float32 scores it used
    # to round onto 1.0 and accept the held-out impostor at 1.0 (accuracy 0.5 per fold, not 1).
    low = np.float32(1.0)
    high = np.nextafter(low, np.float32(2.0))
    scores = np.array([high, low, high, low], dtype=np.float32)
    labels = np.array([True, False, True, False])
    result = kfold_accuracy(scores, labels, folds=[0, 0, 1, 1])
    assert low < result.thresholds[0] < high
    np.testing.assert_array_equal(result.accuracies, [1.0, 1.0])
