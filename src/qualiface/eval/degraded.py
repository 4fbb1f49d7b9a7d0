"""A pair benchmark on degraded copies of its images: accuracy per severity, quality vs. severity.

``degraded_images(bench, severities, seed)`` makes the copies: every image keeps one
degradation kind (fixed by ``seed``) across the levels, so the levels differ only in severity.
The caller embeds each level with the same model and options as the clean images, then
``evaluate_degraded(bench, features, levels, seed=, kinds=)`` scores them: verification metrics
per level, and the rank correlation (Spearman, Kendall) of the model's quality score and of the
feature norm against severity, pooled over the clean images (severity 0) and every level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from qualiface.data.degrade import degraded_copies
from qualiface.eval.benchmarks import PairBenchmark, evaluate_pairs
from qualiface.eval.features import FeatureSet
from qualiface.eval.quality import rank_correlations
from qualiface.scoring.similarity import row_norms

#: The verification metrics reported for each degraded level.
LEVEL_METRICS = ("accuracy", "accuracy_std", "auc", "eer", "tar_at_far")


def degraded_images(bench: PairBenchmark, severities: Sequence[float], seed: int
                    ) -> tuple[dict[float, torch.Tensor], list[str]]:
    """Degraded copies of every image of ``bench`` -> ``({severity: images}, kinds)``.

    ``images`` are uint8 (N, 3, H, W) in the order of ``bench.ids``; ``kinds[i]`` is the
    degradation kind image ``i`` got at every level (see ``data.degrade.degraded_copies``).
    """
    images = torch.stack([bench.images[i] for i in range(len(bench.ids))])
    return degraded_copies(images, severities, seed=seed)


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
    rows = features.rows(bench.ids)
    quality = {0.0: features.quality[rows]}
    norms = {0.0: row_norms(features.features[rows])}
    results = {}
    for severity, level in levels.items():
        verification = evaluate_pairs(bench, level).metrics["verification"]
        results[f"{severity:g}"] = {key: verification[key] for key in LEVEL_METRICS}
        level_rows = level.rows(bench.ids)
        quality[severity] = level.quality[level_rows]
        norms[severity] = row_norms(level.features[level_rows])
    severity_of = np.concatenate([np.full(len(q), s) for s, q in quality.items()])
    metrics = {
        "seed": seed,
        "kinds": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "levels": results,
        "rank_correlation": {
            "model quality": rank_correlations(np.concatenate(list(quality.values())), severity_of),
            "feature norm": rank_correlations(np.concatenate(list(norms.values())), severity_of),
        },
    }
    boxes = {"model quality by severity": {f"severity {s:g}": q for s, q in quality.items()}}
    return metrics, boxes
