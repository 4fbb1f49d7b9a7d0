"""Reliability round 7, evaluation metrics: each test compares a metric with an independent,
plain numpy / Python computation on a tiny input, or checks that an input the metric cannot
score is refused instead of turned into a number. Each failed on the code before its fix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qualiface.eval import EvaluationError
from qualiface.eval.aggregation import ProgressiveTemplate, aggregate_templates
from qualiface.eval.identification import search, tpir_at_fpir
from qualiface.eval.quality import edc, edc_pauc, edc_refixed, rank_correlations

# ----------------------------------------------------------------------------- independent maths


def lowest_threshold_at_fmr(scores: list[float], genuine: list[bool], fmr: float) -> float:
    """The lowest threshold t (a score or the float just above one) with FMR(t) <= fmr."""
    impostor = [s for s, g in zip(scores, genuine) if not g]
    candidates = sorted({c for s in scores for c in (s, math.nextafter(s, math.inf))})
    for t in candidates:
        if sum(s >= t for s in impostor) <= fmr * len(impostor) + 1e-12:
            return t
    raise AssertionError("unreachable: above the highest score nothing is accepted")


def refixed_edc_by_hand(scores, genuine, quality, fmr, grid):
    """(fraction, FNMR) of the re-fixed EDC at each requested fraction, brute force: a fraction
    is snapped down to the largest realisable discard (all comparisons below some quality)."""
    n = len(scores)
    realisable = sorted({sum(q < v for q in quality) for v in quality})
    points, seen = [], set()
    for fraction in sorted(set(grid) | {0.0}):
        cut = max(c for c in realisable if c <= fraction * n + 1e-9)
        if cut in seen:
            continue
        seen.add(cut)
        floor = sorted(quality)[cut]
        kept = [(s, g) for s, g, q in zip(scores, genuine, quality) if q >= floor]
        mated = [s for s, g in kept if g]
        impostors = sum(not g for _, g in kept)
        if not mated or math.floor(fmr * impostors + 1e-9) < 1:
            continue
        t = lowest_threshold_at_fmr([s for s, _ in kept], [g for _, g in kept], fmr)
        points.append((cut / n, sum(s < t for s in mated) / len(mated)))
    return points


def step_area(points, limit):
    """Area under a step curve (value holds until the next fraction, the last until 1)."""
    area = 0.0
    for (x, y), nxt in zip(points, [p[0] for p in points[1:]] + [1.0]):
        area += y * max(0.0, min(nxt, limit) - x)
    return area


# ------------------------------------------------------------------------------- quality / EDC

pair_sets = st.integers(4, 14).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 4), min_size=n, max_size=n),           # scores (ties on purpose)
    st.lists(st.booleans(), min_size=n, max_size=n),               # genuine
    st.lists(st.integers(0, 3), min_size=n, max_size=n),           # quality (ties on purpose)
))


@settings(max_examples=50, deadline=None)
@given(pair_sets, st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0]),
                           min_size=1, max_size=5))
def test_refixed_edc_of_any_grid_is_the_ascending_curve_from_0_and_its_pauc(data, grid):
    """A grid in any order (or without 0) gave a curve in that order (or starting later):
    ``edc_pauc`` then integrated the wrong steps and ``starting_error`` was not the FNMR at 0."""
    scores, genuine, quality = data
    impostors = genuine.count(False)
    if not any(genuine) or impostors < 4:
        return
    curve = edc_refixed(np.array(scores, float), np.array(genuine), np.array(quality, float),
                        fmr=0.25, fractions=grid)
    want = refixed_edc_by_hand([float(s) for s in scores], genuine, quality, 0.25, grid)
    assert curve.discard_fractions.tolist() == pytest.approx([x for x, _ in want])
    assert curve.errors.tolist() == pytest.approx([y for _, y in want])
    assert curve.discard_fractions[0] == 0.0
    for limit in (0.2, 0.3, 1.0):
        assert edc_pauc(curve, limit) == pytest.approx(step_area(want, limit))


def test_refixed_edc_grid_in_descending_order_keeps_the_pauc():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.5
    scores = rng.normal(size=200) + labels
    quality = rng.random(200)
    ascending = edc_refixed(scores, labels, quality, fmr=0.1, fractions=[0, 0.2, 0.5])
    descending = edc_refixed(scores, labels, quality, fmr=0.1, fractions=[0.5, 0.2, 0])
    np.testing.assert_array_equal(descending.discard_fractions, ascending.discard_fractions)
    assert edc_pauc(descending, 0.3) == edc_pauc(ascending, 0.3)  # 0.2045 where 0.2099 is right


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_refixed_edc_refuses_a_discard_fraction_outside_0_1(bad):
    # -0.1 was snapped to the *largest* realisable discard, NaN and 1.5 to it as well.
    rng = np.random.default_rng(1)
    labels = rng.random(50) < 0.5
    with pytest.raises(EvaluationError, match="discard fraction"):
        edc_refixed(rng.normal(size=50), labels, rng.random(50), fmr=0.1, fractions=[0, bad])


def test_edc_refuses_a_nan_threshold():
    # NaN compares false with every score: no mated comparison was an error, FNMR 0 everywhere.
    scores = np.array([0.1, 0.2, 0.9, 0.3])
    labels = np.array([True, True, True, False])
    quality = [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(EvaluationError, match="threshold"):
        edc(scores, labels, quality, threshold=float("nan"))
    # A real threshold still works, and +inf (reject all) is a threshold: FNMR 1 at 0.
    assert edc(scores, labels, quality, threshold=0.5).errors[0] == pytest.approx(2 / 3)
    assert edc(scores, labels, quality, threshold=float("inf")).errors[0] == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["quality", "severity"])
def test_rank_correlations_refuse_non_finite_values(which, bad):
    # A NaN quality gave {'spearman': nan, 'kendall': nan}, written to metrics.json as null.
    quality = np.array([0.9, 0.7, 0.5, 0.3, 0.1])
    severity = np.array([0.0, 0.2, 0.4, 0.6, 0.8])
    (quality if which == "quality" else severity)[2] = bad
    with pytest.raises(EvaluationError, match="finite"):
        rank_correlations(quality, severity)


# ----------------------------------------------------------------------------- identification


@pytest.mark.parametrize("fpir", [0.0, -0.1, 1.5, float("nan")])
def test_tpir_refuses_an_fpir_outside_0_1(fpir):
    # 1.5 gave the rank-1 rate as "TPIR at FPIR 1.5", -0.1 a NaN read as "not measurable",
    # NaN a bare ValueError; tar_at_far already refuses such FARs.
    unit = np.eye(3, dtype=np.float32)
    result = search(unit, [0, 1, 7], unit, [0, 1, 2])
    with pytest.raises(EvaluationError, match="FPIR"):
        tpir_at_fpir(result, [fpir])
    assert tpir_at_fpir(result, [1.0])[1.0][0] == 1.0


def test_search_refuses_subject_ids_that_are_not_whole_numbers():
    # Subject ids went through int64: probe 1.5 became subject 1 and found a "mate".
    unit = np.eye(3, dtype=np.float32)
    with pytest.raises(EvaluationError, match="probe subject"):
        search(unit, [0.0, 1.5, 2.0], unit, [0, 1, 2])
    with pytest.raises(EvaluationError, match="gallery subject"):
        search(unit, [0, 1, 2], unit, [0.0, float("nan"), 2.0])
    # Whole numbers stored as floats are subject ids like any other.
    as_float = search(unit, [0.0, 1.0, 2.0], unit, np.array([0, 1, 2], dtype=np.float32))
    as_int = search(unit, [0, 1, 2], unit, [0, 1, 2])
    np.testing.assert_array_equal(as_float.ranks, as_int.ranks)


# ---------------------------------------------------------------------------- aggregation


def test_qwfaf_refuses_a_nan_quality_threshold():
    # mean quality >= NaN is False for every template: all fell back to the plain mean.
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(EvaluationError, match="quality_threshold"):
        aggregate_templates(features, [0, 0, 0], quality=[0.9, 0.1, 0.2], mode="qwfaf",
                            quality_threshold=float("nan"))


@pytest.mark.parametrize("kwargs", [{"quality_threshold": float("nan")},
                                    {"feature_threshold": float("nan")},
                                    {"quality_threshold": -1.0}])
def test_progressive_template_refuses_thresholds_that_break_the_weighted_mean(kwargs):
    # s_th NaN accepted every frame (quality -1 too); f_th NaN switched the agreement check off;
    # s_th -1 accepted negative qualities as weights: frames of quality 0.5 then -0.5 divided
    # by 0 (a NaN template), 0.5 then -0.25 moved the template *away* from the second frame.
    with pytest.raises(EvaluationError, match="threshold"):
        ProgressiveTemplate(**kwargs)


def test_best_accuracy_threshold_between_adjacent_floats_accepts_what_it_counted():
    # Was: the midpoint of 0.5 and nextafter(0.5) rounds to 0.5, so the returned threshold
    # accepted the impostor at 0.5 while reporting accuracy 1.0 (its true accuracy is 0.75).
    from qualiface.eval.verification import best_accuracy_threshold

    genuine_low = np.nextafter(0.5, 1.0)
    scores = np.array([0.5, genuine_low, 0.1, 0.9])
    labels = np.array([False, True, False, True])
    threshold, accuracy = best_accuracy_threshold(scores, labels)
    assert accuracy == 1.0
    assert np.mean((scores >= threshold) == labels) == accuracy
    # Well-separated scores keep the midpoint.
    assert best_accuracy_threshold(np.array([0.2, 0.6]), np.array([False, True])) == (0.4, 1.0)


def test_kfold_accuracy_refuses_nan_fold_ids():
    # Was: each NaN pair became its own empty held-out fold and the accuracy came out NaN.
    from qualiface.eval.verification import kfold_accuracy

    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    labels = np.array([True, False, True, False, True, False])
    with pytest.raises(EvaluationError, match="fold ids must be finite"):
        kfold_accuracy(scores, labels, np.array([0.0, 0.0, 1.0, 1.0, np.nan, np.nan]))
    assert kfold_accuracy(scores, labels, np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])).mean == 1.0


def test_negative_image_weights_are_refused():
    # Was: a negative detector score subtracted its image from the template.
    features = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(EvaluationError, match="image weights must be >= 0"):
        aggregate_templates(features, np.array([0, 0]), mode="mean", image_weights=np.array([1.0, -0.5]))
    pooled = aggregate_templates(features, np.array([0, 0]), mode="mean", image_weights=np.array([1.0, 0.0]))
    np.testing.assert_allclose(pooled.features[0], [1.0, 0.0], atol=1e-6)


def test_degraded_level_at_severity_zero_is_refused():
    # Was: {0.0: clean, **levels} let a level keyed 0 replace the clean features unseen.
    from qualiface.eval.degraded import evaluate_degraded

    with pytest.raises(EvaluationError, match="severities > 0"):
        evaluate_degraded(None, None, {0.0: None, 0.5: None}, seed=0, kinds=[])
