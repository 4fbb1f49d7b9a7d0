"""Template pooling modes against naive per-template loops; the progressive template."""

from __future__ import annotations

import numpy as np
import pytest

from qualiface.eval import EvaluationError
from qualiface.eval.aggregation import ProgressiveTemplate, aggregate, aggregate_templates


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _naive(features, templates, medias, quality, mode, s_th=None):
    out = {}
    for t in np.unique(templates):
        idx = np.flatnonzero(templates == t)
        f, q, m = features[idx], quality[idx], medias[idx]
        if mode in ("media", "norm"):
            g = _unit(f) if mode == "media" else f
            pooled = sum(g[m == u].mean(0) for u in np.unique(m))
        elif mode == "mean":
            pooled = _unit(f).mean(0)
        elif mode == "qwfa":
            pooled = (q[:, None] * _unit(f)).sum(0) / q.sum()
        else:  # qwfaf
            if q.mean() >= s_th:
                keep = q >= s_th
                pooled = (q[keep, None] * _unit(f[keep])).sum(0) / q[keep].sum()
            else:
                pooled = _unit(f).mean(0)
        out[t] = pooled / np.linalg.norm(pooled)
    return out


@pytest.mark.parametrize("mode", ["mean", "media", "norm", "qwfa", "qwfaf"])
def test_pooling_equals_naive_loop(mode):
    rng = np.random.default_rng(0)
    n = 400
    features = rng.normal(size=(n, 12)) * rng.uniform(0.2, 5, (n, 1))
    templates = rng.integers(100, 140, n)
    medias = rng.integers(0, 5, n)  # media ids shared across templates on purpose
    quality = rng.uniform(0, 1, n)
    pooled = aggregate_templates(features, templates, media_ids=medias, quality=quality,
                                 mode=mode, quality_threshold=0.5)
    naive = _naive(features, templates, medias, quality, mode, 0.5)
    assert list(pooled.ids) == sorted(naive)
    for row, t in enumerate(pooled.ids):
        np.testing.assert_allclose(pooled.features[row], naive[t], atol=1e-5)


def test_single_aggregate_and_errors():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(5, 4))
    np.testing.assert_allclose(aggregate(f), _unit(_unit(f).mean(0)), atol=1e-6)
    with pytest.raises(EvaluationError, match="needs per-image quality"):
        aggregate(f, mode="qwfa")
    with pytest.raises(EvaluationError, match="qualities >= 0"):
        aggregate(f, quality=-np.ones(5), mode="qwfa")
    with pytest.raises(EvaluationError, match="unknown aggregation"):
        aggregate(f, mode="median")


def test_progressive_template_follows_the_update_rule():
    rng = np.random.default_rng(2)
    base = _unit(rng.normal(size=8))
    template = ProgressiveTemplate(feature_threshold=0.5, quality_threshold=0.2)
    assert template.template is None and template.count == 0
    assert not template.update(base * 3, 0.1)  # quality too low: not even the first frame
    assert template.update(base * 3, 0.6)  # first accepted frame initialises
    np.testing.assert_allclose(template.template, base)
    near = _unit(base + 0.2 * _unit(rng.normal(size=8)))
    assert template.update(near, 0.3)
    np.testing.assert_allclose(template.template, (0.6 * base + 0.3 * near) / 0.9)
    assert template.quality_sum == pytest.approx(0.9) and template.count == 2
    assert not template.update(-base, 0.9)  # disagrees with the template: rejected
    assert template.count == 2
    np.testing.assert_allclose(np.linalg.norm(template.embedding), 1.0)
    with pytest.raises(EvaluationError, match="zero"):
        template.update(np.zeros(8), 1.0)


def test_progressive_default_feature_threshold_accepts_even_an_opposite_frame():
    """f_th = -1 (the default) checks nothing: an exactly opposite frame is accepted, while a
    tuned f_th still refuses it."""
    from qualiface.scoring.aggregation import ProgressiveTemplate

    first = np.array([1.0, 0.0, 0.0])
    default = ProgressiveTemplate()
    assert default.update(first, 0.9) and default.update(-3 * first, 0.5)
    assert default.count == 2
    np.testing.assert_allclose(default.template, (0.9 * first - 0.5 * first) / 1.4)
    tuned = ProgressiveTemplate(feature_threshold=-0.99)
    assert tuned.update(first, 0.9) and not tuned.update(-first, 0.5) and tuned.count == 1
