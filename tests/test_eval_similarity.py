"""Pair scoring strategies agree with a naive loop; QMagFace fitting helps at low FAR."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qualiface.eval import EvaluationError
from qualiface.eval.similarity import (QMagFace, cosine_scores, euclidean_scores, l2_normalize,
                                       pair_scores_and_quality, score_pairs)
from qualiface.eval.verification import roc_curve, tar_at_far


@pytest.mark.parametrize("strategy", ["auto", "dense", "sparse", "rowwise"])
@pytest.mark.parametrize("sorted_pairs", [False, True])
def test_score_pairs_strategies_equal_naive_loop(strategy, sorted_pairs):
    rng = np.random.default_rng(0)
    unit, _ = l2_normalize(rng.normal(size=(300, 16)))
    first = rng.integers(0, 60, 5000)
    second = rng.integers(60, 300, 5000)
    if sorted_pairs:
        order = np.argsort(first, kind="stable")
        first, second = first[order], second[order]
    naive = np.array([float(np.dot(unit[a], unit[b])) for a, b in zip(first, second)])
    got = score_pairs(unit, first, second, strategy=strategy, chunk=777)
    np.testing.assert_allclose(got, naive, atol=2e-6)


def test_score_pairs_rejects_bad_indices():
    unit = np.eye(4, dtype=np.float32)
    with pytest.raises(EvaluationError, match="out of range"):
        score_pairs(unit, [0, 4], [1, 2])
    with pytest.raises(EvaluationError, match="2 first indices but 1 second"):
        score_pairs(unit, [0, 1], [1])


def test_cosine_and_euclidean_are_consistent():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    cos = cosine_scores(a, b)
    expected = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(cos, expected, atol=1e-6)
    np.testing.assert_allclose(euclidean_scores(a, b), -np.sqrt(2 - 2 * expected), atol=1e-5)


def _norm_reliability_pairs(seed: int, n: int = 40_000):
    """Pairs where the norm (quality) carries reliability: low-quality genuine pairs score low,
    while the impostor tail that sets low-FAR thresholds comes from high-quality pairs."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.25
    q = rng.uniform(0.2, 1.0, n)
    scores = np.where(labels, 0.05 + 0.6 * q + rng.normal(0, 0.06, n),
                      rng.normal(0, 0.02 + 0.1 * q, n))
    return scores, q, labels


def test_qmagface_fit_improves_tar_at_low_far_on_held_out_pairs(tmp_path):
    train_scores, train_q, train_labels = _norm_reliability_pairs(0)
    model = QMagFace.fit(train_scores, train_q, train_labels, fmrs=np.logspace(-4, -2, 12))
    assert model.beta != 0 or model.alpha != 0
    scores, q, labels = _norm_reliability_pairs(1)
    base = tar_at_far(roc_curve(scores, labels), [1e-4, 1e-3])
    aware = tar_at_far(roc_curve(model.score(scores, q), labels), [1e-4, 1e-3])
    for far in (1e-4, 1e-3):
        assert aware[far][0] > base[far][0] + 0.05
    path = tmp_path / "qmagface.json"
    model.save(path)
    again = QMagFace.load(path)
    np.testing.assert_allclose(again.score(scores, q), model.score(scores, q))
    # The formula itself: s' = s + min(beta s - alpha, 0) q.
    s, qq = np.array([0.1, 0.9]), np.array([0.5, 0.7])
    expected = s + np.minimum(model.beta * s - model.alpha, 0) * qq
    np.testing.assert_allclose(model.score(s, qq), expected)


def test_qmagface_inputs_and_bad_files(tmp_path):
    rng = np.random.default_rng(2)
    features = rng.normal(size=(10, 8)) * rng.uniform(0.5, 3, (10, 1))
    s, q = pair_scores_and_quality(features, [0, 1], [2, 3])
    norms = np.linalg.norm(features, axis=1)
    assert q[0] == pytest.approx(min(norms[0], norms[2]), rel=1e-6)
    assert s[1] == pytest.approx(cosine_scores(features[[1]], features[[3]])[0], abs=1e-6)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "other"}))
    with pytest.raises(EvaluationError, match="bad.json: not a QMagFace"):
        QMagFace.load(bad)
    with pytest.raises(EvaluationError, match="not found"):
        QMagFace.load(tmp_path / "missing.json")
