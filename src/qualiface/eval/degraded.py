"""A pair benchmark on degraded copies of its images: accuracy per severity, quality vs. severity.

``degraded_images(bench, severities, seed)`` makes the copies: every image keeps one
degradation kind and the same random draws (fixed by ``seed``) across the levels, so the levels
differ only in severity.
The caller embeds each level with the same model and options as the clean images, then
``evaluate_degraded(bench, features, levels, seed=, kinds=)`` scores them: verification metrics
per level, and the rank correlation (Spearman, Kendall) of the model's quality score and of the
feature norm against severity, pooled over the clean images (severity 0) and every level
(``scores_by_severity`` + ``severity_correlations``, which the real-face benchmark uses too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from qualiface.data.degrade import degraded_copies
from qualiface.eval import EvaluationError
from qualiface.eval.benchmarks import PairBenchmark, evaluate_pairs
from qualiface.eval.features import FeatureSet
from qualiface.eval.quality import rank_correlations
from qualiface.scoring.similarity import row_norms

#: The verification metrics reported for each degraded level.
LEVEL_METRICS = ("accuracy", "accuracy_std", "auc", "eer", "tar_at_far")


def degraded_images(bench: PairBenchmark, severities: Sequence[float], seed: int, *,
                    progress: bool = False) -> tuple[dict[float, torch.Tensor], list[str]]:
    """Degraded copies of every image of ``bench`` -> ``({severity: images}, kinds)``.

    ``images`` are uint8 (N, 3, H, W) in the order of ``bench.ids``; ``kinds[i]`` is the
    degradation kind image ``i`` got at every level (see ``data.degrade.degraded_copies``).
    ``progress``: bars over reading the images (decoding, for an image folder) and degrading.
    """
    from qualiface.progress import make_progress  # lazy: rich only when copies are made

    count = len(bench.ids)
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("reading images", total=count)
        decoded = []
        for i in range(count):
            decoded.append(bench.images[i])
            bar.advance(task)
    return degraded_copies(torch.stack(decoded), severities, seed=seed, progress=progress)


def evaluate_degraded(bench: PairBenchmark, features: FeatureSet,
                      levels: Mapping[float, FeatureSet], *, seed: int, kinds: Sequence[str]
                      ) -> tuple[dict, dict]:
    """Score the degraded levels of ``bench`` -> ``(metrics, boxes)``.

    ``features``: the clean images' features (severity 0); ``levels``: severity -> features of
    that level's copies (``degraded_images``), each covering ``bench.ids``. ``seed`` and
    ``kinds`` are recorded in the metrics. ``metrics`` is what an eval report stores as
    ``degraded`` (seed, images per kind, ``LEVEL_METRICS`` per level, rank correlations);
    ``boxes`` the model quality per severity, for the report's box plot.
    """
    if any(not severity > 0 for severity in levels):
        # Severity 0 is the clean features' key: a level there would replace them unseen.
        raise EvaluationError(f"degraded levels must have severities > 0, got "
                              f"{sorted(levels)}")
    results = {}
    for severity, level in levels.items():
        verification = evaluate_pairs(bench, level).metrics["verification"]
        results[f"{severity:g}"] = {key: verification[key] for key in LEVEL_METRICS}
    scores = scores_by_severity({0.0: features, **levels}, bench.ids)
    metrics = {
        "seed": seed,
        "kinds": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "levels": results,
        "rank_correlation": severity_correlations(scores),
    }
    boxes = {"model quality by severity": {f"severity {s:g}": q
                                           for s, q in scores["model quality"].items()}}
    return metrics, boxes


def scores_by_severity(levels: Mapping[float, FeatureSet], ids: Sequence[str]
                       ) -> dict[str, dict[float, np.ndarray]]:
    """Each image's ``model quality`` and ``feature norm`` per severity (0 = clean), in the order
    of ``ids``: ``{score name: {severity: (N,) values}}``."""
    scores: dict[str, dict[float, np.ndarray]] = {"model quality": {}, "feature norm": {}}
    for severity, level in levels.items():
        rows = level.rows(ids)
        scores["model quality"][severity] = level.quality[rows]
        scores["feature norm"][severity] = row_norms(level.features[rows])
    return scores


def severity_correlations(scores: Mapping[str, Mapping[float, np.ndarray]]) -> dict:
    """Rank correlation (Spearman, Kendall) of each score with severity, pooled over every
    image at every level: how well the score orders images by damage (negative = falls)."""
    out = {}
    for name, per_level in scores.items():
        values = np.concatenate([np.asarray(v, dtype=np.float64) for v in per_level.values()])
        severity = np.concatenate([np.full(len(v), s) for s, v in per_level.items()])
        out[name] = rank_correlations(values, severity)
    return out
