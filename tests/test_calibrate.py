"""Calibrated quality: monotone, predicts held-out per-bin accuracy, stored in the package."""

from __future__ import annotations

import numpy as np
import pytest

from qualiface.eval.similarity import cosine_scores
from qualiface.infer.calibrate import (
    CalibrationError,
    QualityCalibration,
    calibrate_from_pairs,
    fit_calibration,
    rejection_threshold_for_fnmr,
)
from qualiface.infer.model import Model, read_model_spec
from test_infer_model import make_package, random_images


def synthetic_pairs(n: int, seed: int, dim: int = 32):
    """Pairs whose embedding noise shrinks with quality: quality carries reliability."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    centre1 = rng.standard_normal((n, dim))
    centre2 = np.where(issame[:, None], centre1, rng.standard_normal((n, dim)))
    q1, q2 = rng.random(n), rng.random(n)
    noise = lambda q: (0.3 + 2.5 * (1 - q))[:, None]  # noqa: E731
    e1 = centre1 + noise(q1) * rng.standard_normal((n, dim))
    e2 = centre2 + noise(q2) * rng.standard_normal((n, dim))
    return e1, e2, q1, q2, issame


@pytest.mark.parametrize("method", ["isotonic", "logistic"])
def test_calibrated_quality_is_monotone_and_matches_held_out_accuracy(method):
    calibration = calibrate_from_pairs(*synthetic_pairs(20000, seed=0), fmr=1e-2, method=method)
    grid = np.linspace(-0.5, 1.5, 201)
    assert np.all(np.diff(calibration.apply(grid)) >= 0)
    e1, e2, q1, q2, issame = synthetic_pairs(20000, seed=1)
    correct = (cosine_scores(e1, e2) >= calibration.threshold) == issame
    quality, outcome = np.r_[q1, q2], np.r_[correct, correct].astype(float)
    predicted = calibration.apply(quality)
    edges = np.quantile(quality, np.linspace(0, 1, 6))
    bins = np.clip(np.searchsorted(edges, quality, side="right") - 1, 0, 4)
    for b in range(5):
        in_bin = bins == b
        assert abs(predicted[in_bin].mean() - outcome[in_bin].mean()) < 0.05, b
    # Quality matters here: the best bin is far more reliable than the worst.
    assert outcome[bins == 4].mean() - outcome[bins == 0].mean() > 0.15


def test_isotonic_fit_equals_pool_adjacent_violators_by_hand():
    # Outcomes 1,0 at q=1,2 violate monotonicity -> pooled to 0.5 at both.
    calibration = fit_calibration([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 1])
    np.testing.assert_allclose(calibration.apply([0.0, 1.0, 2.0, 3.0, 9.0]), [0.0, 0.5, 0.5, 1.0, 1.0])


def test_round_trip_through_json_and_model_package(tmp_path):
    calibration = calibrate_from_pairs(*synthetic_pairs(3000, seed=2), fmr=1e-2)
    again = QualityCalibration.from_dict(calibration.to_dict())
    grid = np.linspace(0, 1, 11)
    np.testing.assert_array_equal(again.apply(grid), calibration.apply(grid))
    make_package(tmp_path / "pkg", calibration=calibration)
    assert read_model_spec(tmp_path / "pkg").calibration.x == calibration.x
    model = Model.load(tmp_path / "pkg")
    full = model.embed_full(random_images(3))
    np.testing.assert_allclose(full.calibrated_quality.numpy(), calibration.apply(full.quality.numpy()))


def test_bad_inputs_raise_calibration_errors():
    e1, e2, q1, q2, issame = synthetic_pairs(50, seed=3)
    with pytest.raises(CalibrationError, match="not measurable"):
        calibrate_from_pairs(e1, e2, q1, q2, issame, fmr=1e-3)  # needs >= 1000 impostors
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        fit_calibration(q1, issame, method="beta")
    with pytest.raises(CalibrationError, match="calibration.x"):
        QualityCalibration.from_dict({"method": "isotonic", "fmr": 0.01, "threshold": 0.3, "x": [1, 0], "y": [0]})


def test_rejection_threshold_for_fnmr_matches_brute_force():
    rng = np.random.default_rng(4)
    n = 400
    issame = rng.random(n) < 0.6
    q1, q2 = rng.random(n), rng.random(n)
    scores = rng.random(n) * 0.5 + 0.5 * np.minimum(q1, q2)
    threshold, target = 0.4, 0.05
    point = rejection_threshold_for_fnmr(q1, q2, scores, issame, threshold, target)
    pair_quality = np.minimum(q1, q2)[issame]
    miss = scores[issame] < threshold
    best = None
    for c in np.sort(np.unique(pair_quality)):
        kept = pair_quality >= c
        if miss[kept].mean() <= target:
            best = c
            break
    assert point.quality_threshold == best
    kept = pair_quality >= best
    assert point.fnmr == pytest.approx(miss[kept].mean())
    assert point.rejected_fraction == pytest.approx(1 - kept.mean())


def test_stored_threshold_rejects_the_cut_impostor_in_float32_comparisons():
    # 10 impostors (0.9, 0.5, 0.1 x 8), FMR 0.1: one false match allowed, so the threshold must
    # reject the impostor at 0.5. Computed one float64 step above float32(0.5), it rounded back
    # to 0.5 when float32 cosines were compared with it: that impostor was accepted (FMR 0.2).
    from qualiface.infer.calibrate import pair_outcomes

    impostor = [0.9, 0.5] + [0.1] * 8
    genuine = [0.5, 0.8, 0.95, 0.3]
    cosines = np.array(impostor + genuine, dtype=np.float32)
    issame = np.array([False] * len(impostor) + [True] * len(genuine))
    emb1 = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (len(cosines), 1))
    emb2 = np.stack([cosines, np.sqrt(1 - cosines.astype(np.float64) ** 2).astype(np.float32)], axis=1)
    outcomes = pair_outcomes(emb1, emb2, issame, fmr=0.1)
    float32_scores = cosine_scores(emb1, emb2).astype(np.float32)
    accepted = float32_scores >= outcomes.threshold
    assert accepted[~issame].sum() == 1  # only the 0.9 impostor: FMR 0.1
    assert np.array_equal(accepted, outcomes.scores >= outcomes.threshold)  # float64 agrees
    assert accepted[issame].tolist() == [False, True, True, False]
