"""Pair benchmarks end to end: LFW-style ``pairs.txt`` over a folder and InsightFace ``.bin`` sets.

A ``PairBenchmark`` is a list of unique images (a dataset + ids) and pairs as indices into it,
so every image is embedded once however many pairs use it. ``evaluate_pairs`` turns per-image
features into the full report: k-fold accuracy, ROC / TAR at FAR / EER / AUC (cosine, and
QMagFace when parameters are given), and quality assessment of the model's quality score and of
the feature norm (EDC with the threshold fixed beforehand and re-fixed, pAUC, genuine/impostor
pair-quality histograms).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qualiface.eval import EvaluationError
from qualiface.eval.features import FeatureSet, ImageFiles
from qualiface.eval.quality import edc, edc_refixed, edc_summary, pair_quality, rank_correlations
from qualiface.eval.similarity import QMagFace, score_pairs
from qualiface.eval.verification import DEFAULT_FARS, accuracy_folds, evaluate_verification
from qualiface.files import absent_as
from qualiface.scoring.similarity import l2_normalize
from qualiface.scoring.thresholds import count_within


@dataclass
class PairBenchmark:
    """Unique images and the pairs over them.

    images: dataset of uint8 (3, H, W); ids: (N,) image ids; first, second: (P,) int64 rows;
    labels: (P,) bool genuine; folds: (P,) protocol fold ids or None (10 contiguous folds).
    """

    name: str
    images: object
    ids: list[str]
    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray
    folds: np.ndarray | None = None
    source: str = ""


def lfw_benchmark(data: str | os.PathLike, pairs: str | os.PathLike | None = None, *,
                  folds: Sequence[int] | None = None, name: str = "LFW") -> PairBenchmark:
    """``pairs.txt`` over an image folder (``data`` or ``data/aligned112``).

    ``pairs`` defaults to ``data/pairs.txt``; ``folds`` selects protocol folds (1-based, e.g.
    ``(8, 9, 10)``), whose ids are kept for the k-fold accuracy.
    """
    from qualiface.data.lfw import read_pairs  # lazy: imports torch (data.decode); eval's scoring modules import without it

    data = Path(data)
    if not data.is_dir():
        raise EvaluationError(f"{data}: {absent_as(data, 'image folder')}")
    image_root = data / "aligned112" if (data / "aligned112").is_dir() else data
    pairs_path = Path(pairs) if pairs is not None else data / "pairs.txt"
    if not pairs_path.is_file():
        raise EvaluationError(f"{pairs_path}: {absent_as(pairs_path, 'pairs file')} (pass --pairs)")
    protocol = read_pairs(pairs_path)
    if folds:
        protocol = protocol.select_folds(*folds)
    protocol = protocol.resolve(image_root)  # names every missing image at once
    images, first, second = protocol.unique_images()
    ids = [os.path.relpath(p, image_root) for p in images]
    return PairBenchmark(name, ImageFiles(images), ids, first, second,
                         np.asarray(protocol.issame, dtype=bool), protocol.fold, str(pairs_path))


def bin_benchmark(path: str | os.PathLike) -> PairBenchmark:
    """An InsightFace ``.bin`` (pair k = images 2k, 2k+1), decoded lazily."""
    from qualiface.data.verification_bin import VerificationBinDataset  # lazy: imports torch; eval's scoring modules import without it

    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: .bin file not found")
    dataset = VerificationBinDataset(path)
    n = len(dataset.issame)
    return PairBenchmark(path.stem, dataset, [str(i) for i in range(2 * n)],
                         np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2),
                         dataset.issame.numpy().astype(bool), None, str(path))


@dataclass
class PairResult:
    """Everything ``report.write_report`` needs for a pair benchmark."""

    metrics: dict
    rocs: dict = field(default_factory=dict)
    edcs: dict = field(default_factory=dict)
    histograms: dict = field(default_factory=dict)


def evaluate_pairs(bench: PairBenchmark, features: FeatureSet, *,
                   qmagface: QMagFace | None = None, fars: Sequence[float] = DEFAULT_FARS,
                   edc_fmrs: Sequence[float] = (1e-2, 1e-3),
                   severity: np.ndarray | None = None) -> PairResult:
    """Verification + quality metrics of one pair benchmark from its per-image features.

    ``severity``: optional (N,) known degradation severity per image, in the order of
    ``bench.ids`` (the order every per-image array here has once ``features.rows`` has
    gathered it), for rank correlations of the quality scores and per-level quality histograms.
    """
    rows = features.rows(bench.ids)
    if severity is not None:
        severity = np.asarray(severity, dtype=np.float64)
        if severity.shape != (len(bench.ids),):
            raise EvaluationError(f"severity: expected one value per benchmark image "
                                  f"({len(bench.ids)}), got shape {severity.shape}")
    raw = features.features[rows]
    unit, norms = l2_normalize(raw)
    scores = score_pairs(unit, bench.first, bench.second)
    labels = bench.labels
    folds, accuracy_note = accuracy_folds(bench.folds)
    result = evaluate_verification(scores, labels, folds, fars=fars)
    metrics: dict = {"benchmark": bench.name, "source": bench.source,
                     "num_images": len(bench.ids), "num_pairs": len(labels),
                     "verification": result.metrics()}
    if accuracy_note:
        # One protocol fold cannot hold itself out: said, not done quietly another way.
        metrics["verification"]["accuracy_note"] = accuracy_note
    rocs = {"cosine": result.roc}
    qualities = {"model quality": features.quality[rows].astype(np.float64),
                 "feature norm": norms.astype(np.float64)}
    if qmagface is not None:
        aware = qmagface.score(scores, np.minimum(norms[bench.first], norms[bench.second]))
        aware_result = evaluate_verification(aware, labels, folds, fars=fars)
        metrics["qmagface"] = {"alpha": qmagface.alpha, "beta": qmagface.beta,
                               **aware_result.metrics()}
        rocs["QMagFace"] = aware_result.roc
    edcs, quality_metrics, histograms = {}, {}, {}
    # threshold_at_fmr's own rule (count_within), so a kept FMR never fails inside edc.
    measurable = [f for f in edc_fmrs if count_within(f, result.roc.num_impostor) >= 1]
    if not measurable:  # small sets: the lowest power of ten their impostors can measure
        fallback = 10.0 ** np.ceil(np.log10(1.0 / result.roc.num_impostor))
        measurable = [float(fallback)] if fallback <= 0.1 + 1e-12 else []
    for qname, per_image in qualities.items():
        pq = pair_quality(per_image[bench.first], per_image[bench.second])
        entry: dict = {}
        for fmr in measurable:
            curve = edc(scores, labels, pq, fmr=fmr)
            refixed = edc_refixed(scores, labels, pq, fmr=fmr)
            edcs[f"{qname} @ FMR {fmr:g}"] = curve
            entry[f"fmr_{fmr:.0e}"] = {**edc_summary(curve),
                                       "refixed": edc_summary(refixed)}
        if severity is not None:
            entry["vs_severity"] = rank_correlations(per_image, severity)
        quality_metrics[qname] = entry
        histograms[f"pair {qname}"] = {"genuine": pq[labels], "impostor": pq[~labels]}
        if severity is not None:
            levels = severity
            histograms[f"{qname} by severity"] = {
                f"severity {level:g}": per_image[levels == level] for level in np.unique(levels)}
    metrics["quality"] = quality_metrics
    return PairResult(metrics, rocs, edcs, histograms)
