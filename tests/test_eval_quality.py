"""EDC, pAUC and rank correlations against brute-force loops, with quality ties."""

from __future__ import annotations

import numpy as np
import pytest

from qualiface.eval import EvaluationError
from qualiface.eval.quality import (edc, edc_pauc, edc_refixed, edc_summary, pair_quality,
                                    rank_correlations, theoretical_best_area, threshold_at_fmr)


def _pairs(seed: int, n: int = 3000):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    q1 = rng.integers(0, 12, n) / 11.0  # few levels: many ties in pair quality
    q2 = rng.integers(0, 12, n) / 11.0
    pq = pair_quality(q1, q2)
    # Low quality makes genuine scores worse, so discarding helps.
    scores = np.where(labels, 0.3 + 0.5 * pq + rng.normal(0, 0.15, n), rng.normal(0, 0.1, n))
    return scores, labels, pq


def _brute_force_edc(scores, labels, pq, threshold):
    """Discard every mated comparison with quality < v, for each distinct v (ties together)."""
    mated_scores, mated_q = scores[labels], pq[labels]
    fractions, errors = [], []
    for v in np.unique(mated_q):
        kept = mated_q >= v
        fractions.append(1 - kept.mean())
        errors.append(np.mean(mated_scores[kept] < threshold))
    return np.array(fractions + [1.0]), np.array(errors + [0.0])


@pytest.mark.parametrize("seed", [0, 1])
def test_edc_equals_brute_force_and_threshold_fixed_beforehand(seed):
    scores, labels, pq = _pairs(seed)
    curve = edc(scores, labels, pq, fmr=1e-2)
    threshold = threshold_at_fmr(scores, labels, 1e-2)
    # The threshold is the lowest one with FMR <= 1e-2 over *all* impostors.
    impostors = scores[~labels]
    assert np.mean(impostors >= threshold) <= 1e-2
    assert np.mean(impostors >= np.nextafter(threshold, -np.inf)) > 1e-2 or threshold == impostors.min()
    fractions, errors = _brute_force_edc(scores, labels, pq, threshold)
    np.testing.assert_allclose(curve.discard_fractions, fractions, atol=1e-12)
    np.testing.assert_allclose(curve.errors, errors, atol=1e-12)
    assert np.all(curve.thresholds == threshold)
    assert curve.errors[-2] < curve.errors[0]  # quality carries information here


def test_pauc_equals_numerical_integral_of_the_step_curve():
    scores, labels, pq = _pairs(2)
    curve = edc(scores, labels, pq, fmr=1e-2)
    grid = np.linspace(0, 0.3, 300_001)[:-1]
    index = np.searchsorted(curve.discard_fractions, grid, side="right") - 1
    for limit in (0.2, 0.3):
        numeric = np.sum(curve.errors[index][grid < limit]) * (0.3 / 300_000)
        assert edc_pauc(curve, limit) == pytest.approx(numeric, abs=2e-5)


@pytest.mark.parametrize("e0", [0.05, 0.25, 0.6])
def test_theoretical_best_areas_match_their_curves(e0):
    x = np.linspace(0, 1, 2_000_001)[:-1]
    dx = 1 / 2_000_000
    for limit in (0.2, 0.3):
        linear = np.sum(np.maximum(0, e0 - x)[x < limit]) * dx
        exact = np.sum((np.maximum(0, e0 - x) / (1 - x))[x < limit]) * dx
        assert theoretical_best_area(e0, limit, "linear") == pytest.approx(linear, abs=1e-5)
        assert theoretical_best_area(e0, limit, "exact") == pytest.approx(exact, abs=1e-5)


def test_a_perfect_quality_measure_reaches_the_exact_best_curve():
    rng = np.random.default_rng(3)
    labels = rng.random(4000) < 0.5
    scores = np.where(labels, rng.normal(0.6, 0.2, 4000), rng.normal(0, 0.1, 4000))
    threshold = threshold_at_fmr(scores, labels, 1e-2)
    oracle = np.where(labels, (scores >= threshold).astype(float) + rng.random(4000), 1.0)
    curve = edc(scores, labels, oracle, fmr=1e-2)
    summary = edc_summary(curve, best="exact")
    assert summary["pauc_20_minus_best"] == pytest.approx(0.0, abs=2e-3)


def test_refixed_edc_equals_brute_force_recomputation():
    scores, labels, pq = _pairs(4, n=6000)
    curve = edc_refixed(scores, labels, pq, fmr=1e-2, fractions=[0.0, 0.1, 0.25])
    for fraction, error, threshold in zip(curve.discard_fractions, curve.errors, curve.thresholds):
        cut = np.sort(pq)[int(round(fraction * len(pq)))] if fraction > 0 else -np.inf
        kept = pq >= cut
        t = threshold_at_fmr(scores[kept], labels[kept], 1e-2)
        assert threshold == t
        assert error == pytest.approx(np.mean(scores[kept & labels] < t))
    # Requested fractions snap down to whole quality levels (ties discarded together).
    sorted_q = np.sort(pq)
    realisable = np.concatenate([[0], np.flatnonzero(sorted_q[1:] != sorted_q[:-1]) + 1]) / len(pq)
    snapped = {realisable[realisable <= r + 1e-12].max() for r in (0.0, 0.1, 0.25)}
    assert set(curve.discard_fractions.tolist()) == snapped


def test_rank_correlations_and_errors():
    severity = np.repeat(np.arange(5), 20).astype(float)
    quality = -severity + np.linspace(0, 0.1, 100)  # monotone decreasing in severity
    result = rank_correlations(quality, severity)
    from scipy import stats

    assert result["spearman"] == pytest.approx(stats.spearmanr(quality, severity)[0])
    assert result["spearman"] < -0.95 and result["kendall"] < -0.8
    with pytest.raises(EvaluationError, match="constant"):
        rank_correlations(np.ones(10), np.arange(10))
    with pytest.raises(EvaluationError, match="pair qualities"):
        edc([0.1, 0.9], [0, 1], [0.5], fmr=0.5)
    with pytest.raises(EvaluationError, match="not measurable"):
        edc([0.1, 0.2, 0.9], [0, 0, 1], [1, 1, 1], fmr=1e-3)


def test_evaluate_pairs_aligns_severity_with_benchmark_images_not_feature_rows():
    # Severity is given per benchmark image (bench.ids order); a feature set stored in another
    # order must not shuffle it against the qualities (it used to be indexed by feature row).
    from qualiface.eval.benchmarks import PairBenchmark, evaluate_pairs
    from qualiface.eval.features import FeatureSet

    rng = np.random.default_rng(0)
    n = 40
    ids = [f"img{i}" for i in range(n)]
    bench = PairBenchmark("t", None, ids, np.arange(0, n, 2), np.arange(1, n, 2),
                          np.arange(n // 2) % 2 == 0)
    severity = np.repeat([0.0, 0.5, 1.0, 0.25], n // 4)
    quality = 1.0 - severity + rng.normal(0, 0.05, n)
    features = rng.normal(size=(n, 8)).astype(np.float32)
    perm = rng.permutation(n)
    stored = FeatureSet([ids[i] for i in perm], features[perm], quality[perm])
    result = evaluate_pairs(bench, stored, severity=severity, edc_fmrs=(0.1,))
    got = result.metrics["quality"]["model quality"]["vs_severity"]
    expected = rank_correlations(quality.astype(np.float32), severity)
    assert got["spearman"] == pytest.approx(expected["spearman"])
    assert got["spearman"] < -0.9
    by_level = result.histograms["model quality by severity"]
    for level in (0.0, 0.25, 0.5, 1.0):
        np.testing.assert_allclose(np.sort(by_level[f"severity {level:g}"]),
                                   np.sort(quality[severity == level].astype(np.float32)))
    with pytest.raises(EvaluationError, match="one value per benchmark image"):
        evaluate_pairs(bench, stored, severity=severity[:-1], edc_fmrs=(0.1,))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edc_threshold_holds_for_float32_scores_tied_with_the_cut_impostor(dtype):
    # score_pairs returns float32. 10 impostors at FMR 0.1 allow one false match, so the
    # threshold lies just above the 2nd impostor (0.5) and the genuine 0.5 tied with it is a
    # false non-match: FNMR = 2/4 (0.5 and 0.3). The threshold used to be a float64 step above
    # 0.5, which NumPy rounds back to 0.5 when comparing float32 scores: FNMR 1/4, FMR 2/10.
    scores = np.array([0.5, 0.8, 0.95, 0.3, 0.9, 0.5] + [0.1] * 8, dtype=dtype)
    labels = np.array([1, 1, 1, 1] + [0] * 10, dtype=bool)
    quality = np.array([1.0, 2.0, 3.0, 4.0] + [5.0] * 10)
    threshold = threshold_at_fmr(scores, labels, 0.1)
    assert np.sum(scores[~labels] >= threshold) == 1  # in the scores' own dtype
    assert np.sum(scores[~labels].astype(np.float64) >= threshold) == 1
    curve = edc(scores, labels, quality, fmr=0.1)
    # Brute force: discard 0, 1, 2, 3 of the mated by quality; errors are scores <= 0.5.
    np.testing.assert_allclose(curve.errors, [2 / 4, 1 / 3, 1 / 2, 1 / 1, 0.0])
    assert edc_pauc(curve, 0.2) == pytest.approx(0.2 * 0.5)
    refixed = edc_refixed(scores, labels, quality, fmr=0.1, fractions=[0.0])
    assert refixed.errors[0] == pytest.approx(0.5)


def test_one_selected_protocol_fold_says_its_accuracy_is_over_contiguous_sub_folds():
    """``eval lfw --folds 9``: one protocol fold cannot hold itself out, so the accuracy comes
    from 10 contiguous sub-folds of its pairs; the report says so instead of doing it quietly."""
    from qualiface.eval.benchmarks import PairBenchmark, evaluate_pairs
    from qualiface.eval.features import FeatureSet
    from qualiface.eval.verification import kfold_accuracy

    rng = np.random.default_rng(3)
    ids = [f"{k}.jpg" for k in range(80)]
    features = FeatureSet(ids, rng.normal(size=(80, 8)).astype(np.float32), rng.uniform(size=80).astype(np.float32))
    first, second = np.arange(0, 80, 2), np.arange(1, 80, 2)
    labels = rng.random(40) < 0.5

    def bench(folds):
        return PairBenchmark("LFW", None, ids, first, second, labels, folds, "pairs.txt")

    one = evaluate_pairs(bench(np.full(40, 9)), features).metrics["verification"]
    assert "fold (9) selected" in one["accuracy_note"]
    unit = features.features / np.linalg.norm(features.features, axis=1, keepdims=True)
    scores = (unit[first] * unit[second]).sum(axis=1)
    assert one["accuracy"] == pytest.approx(kfold_accuracy(scores, labels, num_folds=10).mean, abs=1e-12)
    two = evaluate_pairs(bench(np.repeat([8, 9], 20)), features).metrics["verification"]
    assert "accuracy_note" not in two and len(two["fold_accuracies"]) == 2
