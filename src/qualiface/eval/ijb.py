"""IJB-B / IJB-C evaluation: 1:1 verification (TAR at FAR) and 1:N identification.

Pipeline (all vectorised): image features -> optional detector-score weighting -> template
pooling as one sparse product (``aggregation.aggregate_templates``; default ``norm``: mean of
raw features within a media, sum across media, as MagFace/AdaFace evaluate) -> pair scores for
every protocol pair (``similarity.score_pairs``) -> exact ROC. 1:N searches the probe templates
against each gallery (G1, G2; IJB-B: S1, S2) for rank-1/5/10 and TPIR at FPIR, and reports the
mean over galleries as the published tables do. A TPIR that a gallery cannot measure (fewer
than 1 / FPIR non-mated probes) is left out of its mean, which ``tpir_not_measurable`` and
``tpir_note`` then say (``_tpir_summary``).

Images are aligned with ``qualiface.infer.align.align_face`` from the 5 points of
``<name>_name_5pts_score.txt`` (the InsightFace loose crops are not aligned yet). A detection
whose points cannot be warped (all at one spot) is resized from its loose crop instead, and
every face with odd points (``IJBProtocol.landmark_problems``, checked once per protocol) is
counted in the report: one bad line must not stop an evaluation hours in, nor pass unseen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qualiface.data.alignment import align_face
from qualiface.data.ijb import IJBProtocol
from qualiface.eval import EvaluationError
from qualiface.eval.features import FeatureSet, ImageFiles, resize_to
from qualiface.eval.identification import search, tpir_at_fpir
from qualiface.eval.quality import edc, edc_summary, pair_quality
from qualiface.eval.similarity import score_pairs
from qualiface.eval.verification import (DEFAULT_FARS, RocCurve, area_under_curve,
                                         equal_error_rate, far_key, roc_curve, tar_at_far)
from qualiface.scoring.aggregation import Templates, aggregate_templates
from qualiface.scoring.identification import rank_accuracy
from qualiface.scoring.thresholds import count_within


@dataclass
class IJBOptions:
    """How templates are built and what is reported."""

    aggregation: str = "norm"
    quality_threshold: float | None = None  # s_th for 'qwfaf'
    detector_score_weight: bool = False  # multiply features by the detector score (InsightFace)
    fars: Sequence[float] = DEFAULT_FARS
    fpirs: Sequence[float] = (1e-2, 1e-1)
    ranks: Sequence[int] = (1, 5, 10)
    edc_fmrs: Sequence[float] = (1e-3, 1e-4)
    device: str = "cpu"  # where pair scoring and 1:N search run (e.g. "cuda")


@dataclass
class IJBResult:
    """Metrics (JSON-ready), the ROC, and the pair scores/labels/qualities behind them."""

    metrics: dict
    roc: RocCurve
    scores: np.ndarray
    labels: np.ndarray
    pair_qualities: np.ndarray
    edc_curves: dict = field(default_factory=dict)


def ijb_images(protocol: IJBProtocol) -> ImageFiles:
    """The protocol's images as a dataset of aligned uint8 (3, 112, 112) faces."""
    if protocol.landmarks is None:
        raise EvaluationError(f"{protocol.folder}: {protocol.name.lower()}_name_5pts_score.txt "
                              "is needed to align the loose crops")

    landmarks = protocol.landmarks
    # No warp exists for these (it would blow a few pixels up to the whole face): the loose
    # crop, roughly centred on the face, resized, is the better guess.
    unwarpable = {index for index, problem in protocol.landmark_problems().items()
                  if problem.kind != "mirrored"}
    resize = resize_to(112)

    def align(image, index):
        return resize(image) if index in unwarpable else align_face(image, landmarks[index])

    return ImageFiles(protocol.image_paths(), align, pass_index=True)


def landmark_summary(protocol: IJBProtocol, examples: int = 5) -> dict:
    """The faces whose 5 points look wrong (``protocol.landmark_problems()``, checked once per
    protocol), for the report: how many, how many were resized instead of aligned, and the
    first few image names with the problem."""
    problems = protocol.landmark_problems()
    return {
        "odd": len(problems),
        "resized_unaligned": sum(problem.kind != "mirrored" for problem in problems.values()),
        "examples": [f"{protocol.images[index]}: {problem.message}"
                     for index, problem in list(problems.items())[:examples]],
    }


def template_rows(templates: Templates, ids: np.ndarray, what: str) -> np.ndarray:
    """Row of each template id (P,) in ``templates`` (sorted ids) -> (P,) int64.

    A lookup table when ids are small non-negative integers (IJB ids are < 200k): one gather,
    several times faster than a binary search over 15.7 M pair ends.
    """
    ids = np.asarray(ids)
    known = templates.ids
    if (np.issubdtype(known.dtype, np.integer) and len(known) and known.min() >= 0
            and known.max() < 50_000_000):
        table = np.full(int(known.max()) + 2, -1, dtype=np.int64)
        table[known] = np.arange(len(known))
        rows = table[np.clip(ids, -1, len(table) - 1)]  # -1 and too-large ids hit a -1 slot
        bad = rows < 0
    else:
        rows = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        bad = known[rows] != ids
    if bad.any():
        raise EvaluationError(f"{what}: template {ids[bad][0]} has no images")
    return rows


def evaluate_ijb(protocol: IJBProtocol, features: FeatureSet,
                 options: IJBOptions | None = None) -> IJBResult:
    """Score an IJB protocol from per-image features (ids = the protocol's image names)."""
    options = options or IJBOptions()
    rows = features.rows(protocol.images)
    image_features = features.features[rows]
    image_quality = features.quality[rows].astype(np.float64)
    detector_weights = None
    if options.detector_score_weight:
        if protocol.detector_scores is None:
            raise EvaluationError("detector-score weighting needs the 5-point/score file")
        # Applied after the mode's per-image normalisation (InsightFace: unit feature * score);
        # scaling the raw features instead is undone by every mode that normalises images.
        detector_weights = protocol.detector_scores
    templates = aggregate_templates(image_features, protocol.template_ids,
                                    media_ids=protocol.media_ids, quality=image_quality,
                                    mode=options.aggregation,
                                    quality_threshold=options.quality_threshold,
                                    image_weights=detector_weights)
    template_row = np.searchsorted(templates.ids, protocol.template_ids)
    counts = np.bincount(template_row, minlength=len(templates.ids))
    template_quality = np.bincount(template_row, weights=image_quality,
                                   minlength=len(templates.ids)) / counts

    first = template_rows(templates, protocol.pair_first, "pairs")
    second = template_rows(templates, protocol.pair_second, "pairs")
    scores = score_pairs(templates.features, first, second, device=options.device)
    labels = protocol.pair_label
    roc = roc_curve(scores, labels)
    tar = tar_at_far(roc, options.fars)
    qualities = pair_quality(template_quality[first], template_quality[second])
    metrics: dict = {
        "benchmark": protocol.name,
        "num_images": len(protocol.images),
        "num_templates": len(templates.ids),
        "landmarks": landmark_summary(protocol),
        "aggregation": options.aggregation,
        "verification": {
            "num_genuine": roc.num_genuine, "num_impostor": roc.num_impostor,
            "tar_at_far": {far_key(f): v[0] for f, v in tar.items()},
            "threshold_at_far": {far_key(f): v[1] for f, v in tar.items()},
            "eer": equal_error_rate(roc), "auc": area_under_curve(roc),
        },
    }
    curves = {}
    quality_metrics = {}
    for fmr in options.edc_fmrs:
        if count_within(fmr, roc.num_impostor) >= 1:  # threshold_at_fmr's own rule
            curve = edc(scores, labels, qualities, fmr=fmr)
            curves[f"template quality @ FMR {fmr:g}"] = curve
            quality_metrics[far_key(fmr)] = edc_summary(curve)
    if quality_metrics:
        metrics["quality"] = {"edc": quality_metrics}
    if protocol.galleries and protocol.probe is not None:
        metrics["identification"] = _identification(protocol, templates, options)
    return IJBResult(metrics, roc, scores, labels, qualities, curves)


def _identification(protocol: IJBProtocol, templates: Templates, options: IJBOptions) -> dict:
    probe_ids, probe_subjects = protocol.probe
    probes = templates.features[template_rows(templates, probe_ids, "1:N probe")]
    per_gallery = {}
    for label, (gallery_ids, gallery_subjects) in protocol.galleries.items():
        gallery = templates.features[template_rows(templates, gallery_ids, f"1:N gallery {label}")]
        result = search(probes, probe_subjects, gallery, gallery_subjects, device=options.device)
        entry = {f"rank{k}": v for k, v in rank_accuracy(result, options.ranks).items()}
        entry["num_mated_probes"] = int(result.has_mate.sum())
        entry["num_nonmated_probes"] = int((~result.has_mate).sum())
        if entry["num_nonmated_probes"]:
            entry["tpir_at_fpir"] = {far_key(f): v[0] for f, v in
                                     tpir_at_fpir(result, options.fpirs).items()}
        per_gallery[label] = entry
    summary: dict = {"galleries": per_gallery}
    for key in [f"rank{k}" for k in options.ranks]:
        summary[key] = float(np.mean([g[key] for g in per_gallery.values()]))
    summary.update(_tpir_summary(per_gallery, options.fpirs))
    return summary


def _tpir_summary(per_gallery: dict, fpirs: Sequence[float]) -> dict:
    """The galleries' TPIR at each FPIR -> ``{"tpir_at_fpir": {key: mean}}``, the mean over the
    galleries where it is measurable, plus, when some gallery cannot measure an FPIR (fewer than
    1 / FPIR non-mated probes, or none), ``"tpir_not_measurable": {key: [galleries]}`` and a
    ``"tpir_note"`` saying which mean covers which galleries. NaN only where no gallery measures it.

    A plain mean over the galleries turned the summary into NaN as soon as one gallery could
    not measure an FPIR, although the other gallery's value was a number; a gallery without
    non-mated probes was left out of the mean without a word.
    """
    if not any("tpir_at_fpir" in g for g in per_gallery.values()):
        return {}
    means, missing, notes = {}, {}, []
    for key in (far_key(f) for f in fpirs):
        measured, unmeasured = [], []
        for label, entry in per_gallery.items():
            value = entry.get("tpir_at_fpir", {}).get(key, float("nan"))
            (unmeasured if np.isnan(value) else measured).append((label, value))
        means[key] = float(np.mean([v for _, v in measured])) if measured else float("nan")
        if unmeasured:
            missing[key] = [label for label, _ in unmeasured]
            why = ", ".join(f"{label} ({per_gallery[label]['num_nonmated_probes']} non-mated "
                            "probes)" for label, _ in unmeasured)
            over = (f"the mean over {', '.join(label for label, _ in measured)} only"
                    if measured else "not measurable on any gallery")
            notes.append(f"TPIR at FPIR {key}: {over}; {why} cannot measure it "
                         "(fewer than 1/FPIR non-mated probes)")
    out: dict = {"tpir_at_fpir": means}
    if missing:
        out["tpir_not_measurable"] = missing
        out["tpir_note"] = "; ".join(notes)
    return out
