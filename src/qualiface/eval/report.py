"""Evaluation reports: ``metrics.json``, ``curves.json``, PNG plots, ``report.md`` and ``report.html``.

Every evaluation run writes into one folder:

- ``metrics.json``: the numbers (NaN written as ``null``);
- ``curves.json``: ROC curves (downsampled to <= 2000 points, log-FAR spaced, with their AUC)
  and EDC curves, so ``compare_runs`` can overlay runs without recomputing anything;
- ``roc.png`` (TAR vs FAR, log FAR axis, AUC in the legend), ``edc.png`` (the quality scores'
  EDCs on one plot, each with its ideal and random-discard references), ``quality_hist.png``
  (genuine vs impostor pair quality, or per degradation level);
- one PNG per ``lines`` entry (line plots, e.g. a training loss curve, optionally with marked
  phase changes) and per ``boxes`` entry (box plots, e.g. quality per degradation-severity bin),
  named after the plot title (``training loss`` -> ``training_loss.png``);
- ``report.md`` (links the PNGs) and ``report.html`` (self-contained, PNGs embedded).

Both documents read top-down in a minute: a short summary (``headlines``: the few numbers that
matter, each with one line on how to read it and what a good value is), then the plots with a
caption each, then every metric in one table (collapsed in the HTML). Quality scores whose whole
quality block is identical (QCFace's quality is a monotone function of the feature norm) are
shown once and said to be the same (``identical_scores``).

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qualiface.eval import EvaluationError
from qualiface.eval.quality import theoretical_best_area, theoretical_best_fnmr
from qualiface.eval.verification import area_under_curve
from qualiface.files import json_ready, read_small_text_as, write_text_atomic


@dataclass
class EvalReport:
    """What one run reports: title, metrics, and curves/histograms keyed by legend label.

    lines: plot title -> ``{"x": x-axis label, "y": y-axis label, "series": {name: (x_values,
        y_values)}}`` and optionally ``"markers": [(x, label), ...]`` (labelled vertical lines,
        e.g. training phase changes); one line plot (PNG) per title, e.g. a training loss curve.
    boxes: plot title -> ``{group label: values}``; one box plot (PNG) per title, groups in
        dict order, e.g. quality per severity bin. A histogram with the same title as a box
        plot is not drawn again.
    captions: plot title -> one line under the plot on how to read it (lines and boxes).
    """

    title: str
    metrics: dict
    rocs: dict = field(default_factory=dict)  # label -> verification.RocCurve
    edcs: dict = field(default_factory=dict)  # label -> quality.EdcCurve
    histograms: dict = field(default_factory=dict)  # plot title -> {series: values}
    lines: dict = field(default_factory=dict)  # plot title -> {"x", "y", "series"}
    boxes: dict = field(default_factory=dict)  # plot title -> {group: values}
    captions: dict = field(default_factory=dict)  # plot title -> caption


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of numbers are skipped (per-fold detail)."""
    flat: dict[str, object] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name + "."))
        elif not isinstance(value, (list, tuple)):
            flat[name] = value
    return flat


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------- summary

#: Discard limit (percent) of the pAUC the summary quotes (an ``edc_summary`` key).
SUMMARY_PAUC_LIMIT = 20
#: Spearman of quality vs severity at or below which a score is said to track degradation.
TRACKS_DEGRADATION = -0.3
#: Names of quality blocks that are not a score's name (IJB: the template quality's EDCs).
_SCORE_NAMES = {"edc": "template quality"}


@dataclass(frozen=True)
class Headline:
    """One summary row: what was measured, its value, and one line on how to read it."""

    name: str
    value: str
    reading: str


def _number(value) -> float | None:
    """``value`` as a finite float, or None (missing, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _same_numbers(first: dict, second: dict) -> bool:
    """Equal nested dicts, floats compared to 1e-9 relative (``None``/NaN equal each other)."""
    a, b = flatten_metrics(json_ready(first)), flatten_metrics(json_ready(second))
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if _number(x) is not None and _number(y) is not None:
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif x != y:
            return False
    return True


def _edc_has_errors(block: dict) -> bool:
    """Whether any EDC in a score's quality block starts above zero error (``fnmr_at_0``)."""
    return any(key.split(".")[-1] == "fnmr_at_0" and (_number(value) or 0) > 0
               for key, value in flatten_metrics(json_ready(block)).items())


def identical_scores(metrics: dict) -> dict[str, str]:
    """``{score: earlier score}`` for the quality scores whose whole ``metrics["quality"]``
    block (EDCs, pAUCs, rank correlations) equals an earlier score's: they rank every
    comparison the same, e.g. QCFace's quality, a monotone function of the feature norm."""
    quality = metrics.get("quality")
    if not isinstance(quality, dict):
        return {}
    # A block whose EDCs start at zero error (no false non-match to discard: a perfect model at
    # that FMR) reads the same for every score, however they rank: equal says nothing there.
    blocks = [(name, block) for name, block in quality.items()
              if isinstance(block, dict) and block and _edc_has_errors(block)]
    same: dict[str, str] = {}
    for i, (name, block) in enumerate(blocks):
        for earlier, other in blocks[:i]:
            if earlier not in same and _same_numbers(other, block):
                same[name] = earlier
                break
    return same


def _score_label(name: str, same: dict[str, str]) -> str:
    """``"model quality = feature norm"`` when ``same`` maps the norm onto the model quality."""
    return " = ".join([_SCORE_NAMES.get(name, name), *(b for b, a in same.items() if a == name)])


def identical_notes(same: dict[str, str]) -> list[str]:
    """One sentence per pair of identical scores, for under the summary."""
    return [f"“{dup}” ranks every comparison exactly as “{kept}” does (identical EDCs, pAUCs "
            f"and rank correlations: one is a monotone function of the other), so the two are "
            f"shown once, as “{kept} = {dup}”." for dup, kept in same.items()]


def _far_text(far: float) -> str:
    return f"{far:.0e}".replace("e-0", "e-")  # 0.001 -> "1e-3"


def _verification_headlines(v: dict, prefix: str = "") -> list[Headline]:
    rows = []
    accuracy, std = _number(v.get("accuracy")), _number(v.get("accuracy_std"))
    if accuracy is not None:
        rows.append(Headline(
            f"{prefix}verification accuracy",
            _percent(accuracy) + (f" ± {_percent(std)}" if std is not None else ""),
            "pairs judged right at the best threshold (k-fold); 50% is chance, higher is better"))
    auc = _number(v.get("auc"))
    if auc is not None:
        rows.append(Headline(f"{prefix}ROC AUC", f"{auc:.3f}",
                             "area under the ROC: 1 = perfect, 0.5 = chance"))
    eer = _number(v.get("eer"))
    if eer is not None and not prefix:
        rows.append(Headline("EER", _percent(eer), "error rate where false accepts equal false "
                             "rejects; lower is better, 50% is chance"))
    tar = v.get("tar_at_far")
    if isinstance(tar, dict):
        measured = sorted((float(far), _number(t)) for far, t in tar.items()
                          if _number(t) is not None)
        shown = [(far, t) for far, t in measured if far in (1e-3, 1e-2)] or measured[:1]
        if shown:
            rows.append(Headline(
                f"{prefix}TAR @ FAR " + " / ".join(_far_text(far) for far, _ in shown),
                " / ".join(_percent(t) for _, t in shown),
                "genuine pairs accepted while only " + " / ".join(
                    f"1 in {round(1 / far):,}" for far, _ in shown)
                + " impostor pairs are; higher is better (the operating points systems use)"))
    return rows


def _edc_headlines(label: str, block: dict) -> list[Headline]:
    """pAUC-minus-ideal rows of one score's EDC summaries (``quality.edc_summary`` dicts)."""
    limit = SUMMARY_PAUC_LIMIT / 100
    rows = []
    for summary in block.values():
        if not isinstance(summary, dict):
            continue
        start, fmr = _number(summary.get("fnmr_at_0")), _number(summary.get("fmr"))
        gap = _number(summary.get(f"pauc_{SUMMARY_PAUC_LIMIT}_minus_best"))
        if start is None or fmr is None or gap is None:
            continue
        # A random discard keeps the FNMR at its start: area start * limit.
        random = start * limit - theoretical_best_area(start, limit)
        rows.append(Headline(
            f"EDC pAUC{SUMMARY_PAUC_LIMIT} − ideal: {label}, FMR {_far_text(fmr)}",
            f"{gap:.4f} (random: {random:.4f})",
            f"area between the EDC and the ideal one up to {SUMMARY_PAUC_LIMIT}% of comparisons "
            f"discarded; lower is better: 0 = ideal discard, random = quality ignored "
            f"(FNMR before discarding: {_percent(start)})"))
    return rows


def _severity_headline(label: str, correlations) -> Headline | None:
    rho = _number(correlations.get("spearman")) if isinstance(correlations, dict) else None
    if rho is None:
        return None
    tau = _number(correlations.get("kendall"))
    verdict = ("tracks degradation" if rho <= TRACKS_DEGRADATION else
               "tracks it weakly" if rho < 0.5 * TRACKS_DEGRADATION else "does not track it")
    return Headline(
        f"Spearman: {label} vs degradation severity",
        f"{rho:+.3f}" + (f" (Kendall {tau:+.3f})" if tau is not None else ""),
        f"more negative is better: quality should fall as images get more degraded; at or "
        f"below {TRACKS_DEGRADATION:+.1f} the score tracks degradation, near 0 or positive it "
        f"does not (here: {verdict})")


def headlines(metrics: dict, same: dict[str, str] | None = None) -> list[Headline]:
    """The report's summary: the few numbers that matter in ``metrics`` (verification,
    QMagFace, each distinct quality score's EDC pAUC and rank correlation with severity,
    accuracy per degradation level, rank-1 identification, training accuracy and held-out
    validation), each with one line on how to read it. Unknown layouts give no rows."""
    same = identical_scores(metrics) if same is None else same
    rows: list[Headline] = []
    if isinstance(metrics.get("verification"), dict):
        rows += _verification_headlines(metrics["verification"])
    if isinstance(metrics.get("qmagface"), dict):
        rows += _verification_headlines(metrics["qmagface"], "QMagFace ")
    quality = metrics.get("quality")
    for name, block in (quality.items() if isinstance(quality, dict) else ()):
        if name in same or not isinstance(block, dict):
            continue
        label = _score_label(name, same)
        rows += _edc_headlines(label, block)
        row = _severity_headline(label, block.get("vs_severity"))
        rows += [row] if row else []
    degraded = metrics.get("degraded") if isinstance(metrics.get("degraded"), dict) else {}
    levels = {level: _number(entry.get("accuracy")) for level, entry in
              degraded.get("levels", {}).items() if isinstance(entry, dict)}
    if any(v is not None for v in levels.values()):
        rows.append(Headline("verification accuracy by severity", ", ".join(
            f"{level}: {_percent(v)}" for level, v in levels.items() if v is not None),
            "the same pairs on copies degraded at each severity (0-1); the clean accuracy is "
            "above; a graceful fall is what robustness looks like"))
    for name, correlations in degraded.get("rank_correlation", {}).items():
        if name not in same:
            row = _severity_headline(_score_label(name, same), correlations)
            rows += [row] if row else []
    identification = metrics.get("identification")
    rank1 = _number((identification if isinstance(identification, dict) else metrics).get("rank1"))
    if rank1 is not None:
        rows.append(Headline("rank-1 identification", _percent(rank1), "probes whose best "
                             "gallery match is the right person; higher is better"))
    final = metrics.get("final") if isinstance(metrics.get("final"), dict) else {}
    if _number(final.get("acc")) is not None:
        rows.append(Headline("training accuracy (last logged step)", _percent(final["acc"]),
                             "margin-free argmax on a training batch: near 100% means the "
                             "training identities are learnt, not that unseen faces are"))
    validation = metrics.get("validation") if isinstance(metrics.get("validation"), dict) else {}
    for key, name, reading in (
            ("val_accuracy", "held-out verification accuracy", "pairs of unseen identities "
             "judged right; 50% is chance, higher is better"),
            ("val_auc", "held-out ROC AUC", "1 = perfect, 0.5 = chance")):
        if _number(validation.get(key)) is not None:
            value = validation[key]
            rows.append(Headline(name, _percent(value) if key == "val_accuracy" else
                                 f"{value:.3f}", reading))
    return rows


# --------------------------------------------------------------------------- plots

#: Legend entries of the EDC reference curves (drawn dashed / dotted in each curve's colour).
IDEAL_LABEL = "ideal discard (errors first)"
RANDOM_LABEL = "random discard (flat)"
ROC_CAPTION = ("Share of genuine pairs accepted (TAR) against share of impostor pairs accepted "
               "(FAR, log axis): higher is better, above all on the left; AUC in the legend "
               "(1 = perfect, 0.5 = chance).")
EDC_CAPTION = ("FNMR left after discarding the lowest-quality comparisons (solid), threshold "
               "fixed at the FMR shown. Dashed: the ideal (false non-matches discarded first); "
               "dotted: random discard. The nearer a solid curve falls to its dashed one, the "
               "better the quality score; on the dotted one, quality is no help.")
SEVERITY_CAPTION = ("Quality of each image per degradation-severity bin (box: quartiles, line: "
                    "median, triangle: mean). A good quality score falls from clean to the most "
                    "degraded bin.")
HISTOGRAM_CAPTION = ("Quality of genuine and impostor pairs (a pair's quality is the lower of "
                     "its two images'); genuine pairs should not sit lower than impostors.")


def _plot_rocs(rocs: dict, path: Path, title: str) -> Path | None:
    """rocs: legend label (with its AUC) -> (far, tar) arrays; a dotted chance line."""
    if not rocs:
        return None
    import matplotlib  # lazy: matplotlib (~0.4 s), only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (~0.4 s), only to draw

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    lowest = 1.0
    for label, (far, tar) in rocs.items():
        far, tar = np.asarray(far), np.asarray(tar)
        keep = far > 0
        if keep.any():
            lowest = min(lowest, float(far[keep].min()))
            ax.step(far[keep], tar[keep], where="post", label=label)
    low = max(min(lowest, 1e-1), 1e-6)
    chance = np.logspace(np.log10(low), 0, 50)
    ax.plot(chance, chance, ":", color="0.5", linewidth=1, label="chance (TAR = FAR)")
    ax.set_xscale("log")
    ax.set_xlim(low, 1.0)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_edcs(ax, edcs: dict, title: str, ylabel: str = "FNMR", max_discard: float = 0.5, *,
              references: bool = False) -> None:
    """Draw EDC step curves on a matplotlib axes; edcs: label -> (discard fractions, errors).

    references: also draw each curve's references in its colour: the ideal EDC (dashed,
    ``quality.theoretical_best_fnmr`` from the curve's starting FNMR) and random discard
    (dotted: the FNMR stays where it starts). Their lines are labelled ``_ideal: <label>`` /
    ``_random: <label>`` (kept out of the legend), and two grey legend entries explain them.

    Public so that multi-panel figures (e.g. ``bench/real_faces.py``) draw curves exactly as
    the reports do."""
    grid = np.linspace(0.0, max_discard, 201)
    for label, (fractions, errors) in edcs.items():
        (line,) = ax.step(fractions, errors, where="post", label=label)
        if references and len(errors):
            start = float(errors[0])
            ax.plot(grid, theoretical_best_fnmr(start, grid), "--", color=line.get_color(),
                    linewidth=1, label=f"_ideal: {label}")
            ax.plot([0.0, max_discard], [start, start], ":", color=line.get_color(),
                    linewidth=1.2, label=f"_random: {label}")
    if references and edcs:  # legend keys only (no data)
        ax.plot([], [], "--", color="0.35", linewidth=1, label=IDEAL_LABEL)
        ax.plot([], [], ":", color="0.35", linewidth=1.2, label=RANDOM_LABEL)
    ax.set_xlim(0, max_discard)
    ax.set_xlabel("fraction of comparisons discarded (lowest pair quality first)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def _plot_edcs(edcs: dict, path: Path, title: str) -> Path | None:
    """edcs: label -> (discard fractions, errors); drawn with their references."""
    if not edcs:
        return None
    import matplotlib  # lazy: matplotlib (~0.4 s), only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (~0.4 s), only to draw

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    draw_edcs(ax, edcs, title, references=True)
    # Below the axes: EDC curves start at the top left and fall to the right, so every corner
    # inside the axes can hide one of them.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small",
              frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def merge_identical_edcs(edcs: dict, same: dict[str, str]) -> dict:
    """``edcs`` (label -> (fractions, errors)) without the curves of a score in ``same`` that
    coincide with the kept score's twin curve (same label after the score name); the twin is
    relabelled ``"<kept> = <score> ..."``, so the legend lists only curves one can see."""
    out = dict(edcs)
    for dup, kept in same.items():
        for label in [k for k in out if k.startswith(dup)]:
            rest = label[len(dup):]
            twin = kept + rest
            if twin in out and all(np.array_equal(np.asarray(a), np.asarray(b))
                                   for a, b in zip(out[twin], out[label])):
                del out[label]
                out = {(f"{kept} = {dup}{rest}" if k == twin else k): v for k, v in out.items()}
    return out


def _measured(title: str) -> str:
    """What a histogram or box plot titled ``title`` measures: ``"pair feature norm"`` ->
    ``"feature norm of a pair (the lower of its two images')"``, ``"model quality by
    severity"`` -> ``"model quality"``."""
    if " by " in title:
        return title.split(" by ")[0]
    if title.startswith("pair "):
        return f"{title[5:]} of a pair (the lower of its two images')"
    return title


def _plot_histograms(histograms: dict, path: Path) -> Path | None:
    if not histograms:
        return None
    import matplotlib  # lazy: matplotlib (~0.4 s), only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (~0.4 s), only to draw

    n = len(histograms)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 3.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], histograms.items()):
        values = [np.asarray(v, dtype=float) for v in series.values() if len(v)]
        if not values:
            continue
        low, high = min(v.min() for v in values), max(v.max() for v in values)
        bins = np.linspace(low, high if high > low else low + 1, 40)
        for label, v in series.items():
            if len(v):
                ax.hist(np.asarray(v, dtype=float), bins=bins, alpha=0.5, density=True,
                        label=f"{label} (n={len(v)})")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(_measured(title))
        ax.set_ylabel("density")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_file_name(title: str, taken: set[str]) -> str:
    """``"Training loss (fp32)"`` -> ``"training_loss_fp32.png"``: lower-case letters, digits
    and ``_`` only, at most 60 characters, made unique against ``taken`` (which it joins)."""
    stem = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:60].strip("_") or "plot"
    name, number = f"{stem}.png", 2
    while name in taken:
        name, number = f"{stem}_{number}.png", number + 1
    taken.add(name)
    return name


def _float_array(values, what: str) -> np.ndarray:
    """1-D float array of ``values`` (None -> NaN); ``EvaluationError`` naming ``what``."""
    try:
        flat = np.asarray(values, dtype=object).reshape(-1)
        return np.asarray([np.nan if v is None else v for v in flat], dtype=float)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{what}: values must be numbers ({exc})") from None


def _markers(title: str, spec: dict) -> list[tuple[float, str]]:
    """``spec["markers"]`` checked: ``[(x, label), ...]``."""
    markers = []
    for marker in spec.get("markers") or ():
        if (not isinstance(marker, (tuple, list)) or len(marker) != 2
                or _number(marker[0]) is None):
            raise EvaluationError(f"line plot '{title}': markers must be (x, label) pairs, "
                                  f"got {marker!r}")
        markers.append((float(marker[0]), str(marker[1])))
    return markers


def _plot_lines(title: str, spec: dict, path: Path) -> Path | None:
    """One line plot: ``spec = {"x": label, "y": label, "series": {name: (xs, ys)}}``, plus
    optional ``"markers": [(x, label)]`` drawn as labelled vertical lines."""
    if not isinstance(spec, dict) or not isinstance(spec.get("series"), dict):
        raise EvaluationError(f"line plot '{title}': expected {{'x': label, 'y': label, "
                              f"'series': {{name: (x_values, y_values)}}}}")
    curves = []
    for name, pair in spec["series"].items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise EvaluationError(f"line plot '{title}', series '{name}': expected "
                                  "(x_values, y_values)")
        xs = _float_array(pair[0], f"line plot '{title}', series '{name}' x")
        ys = _float_array(pair[1], f"line plot '{title}', series '{name}' y")
        if len(xs) != len(ys):
            raise EvaluationError(f"line plot '{title}', series '{name}': {len(xs)} x values "
                                  f"but {len(ys)} y values")
        if len(xs):
            curves.append((str(name), xs, ys))
    markers = _markers(title, spec)
    if not curves:
        return None
    import matplotlib  # lazy: matplotlib (~0.4 s), only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (~0.4 s), only to draw

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for index, (name, xs, ys) in enumerate(curves):
        # Markers only for short curves, so few samples still show where they are. The first
        # series (e.g. a total loss) is wider, so it shows where a later one equals it.
        ax.plot(xs, ys, label=name, marker="o" if len(xs) <= 30 else None, markersize=3,
                linewidth=2.8 if index == 0 and len(curves) > 1 else 1.5)
    low, high = ax.get_xlim()
    if markers:  # headroom for the marker labels above the curves
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top + 0.1 * min(len(markers), 3) * (top - bottom))
    for number, (x, label) in enumerate(markers):
        ax.axvline(x, color="0.3", linestyle="--", linewidth=1)
        # Beside the line, near the top (staggered when there are several); on its left side
        # in the right third of the plot, so the label stays inside the axes.
        left = x > low + 0.67 * (high - low)
        ax.annotate(label, xy=(x, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(-4 if left else 4, -4 - 14 * (number % 3)),
                    textcoords="offset points", ha="right" if left else "left", va="top",
                    fontsize="small", color="0.15",
                    bbox={"boxstyle": "square,pad=0.15", "facecolor": "white", "alpha": 0.85,
                          "edgecolor": "none"})
    ax.set_xlabel(str(spec.get("x", "")))
    ax.set_ylabel(str(spec.get("y", "")))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:  # below the axes: inside, it would hide a curve or a marker label
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small",
                  frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_boxes(title: str, groups: dict, path: Path) -> Path | None:
    """One box plot: ``groups = {label: values}``, one box per group with finite values."""
    if not isinstance(groups, dict):
        raise EvaluationError(f"box plot '{title}': expected {{group label: values}}")
    data = []
    for label, values in groups.items():
        array = _float_array(values, f"box plot '{title}', group '{label}'")
        array = array[np.isfinite(array)]
        if len(array):
            data.append((f"{label}\n(n={len(array)})", array))
    if not data:
        return None
    import matplotlib  # lazy: matplotlib (~0.4 s), only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (~0.4 s), only to draw

    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(data)), 4.4))
    ax.boxplot([values for _, values in data], showmeans=True)
    # Tick labels set separately: boxplot's own keyword for them was renamed in matplotlib 3.9.
    ax.set_xticks(range(1, len(data) + 1), [label for label, _ in data], fontsize="small")
    ax.set_ylabel(_measured(title))
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Figure:
    """One plot of a report: its PNG, heading and caption."""

    path: Path
    heading: str
    caption: str = ""


def _table_markdown(rows: list[tuple[str, list[str]]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([key, *values]) + " |" for key, values in rows]
    return "\n".join(lines)


def _table_html(rows: list[tuple[str, list[str]]], header: list[str], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [k, *v]) + "</tr>"
                   for k, v in rows)
    css = f' class="{css}"' if css else ""
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = ("body{font-family:sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;"
          "color:#222}h1{font-size:1.5em}h2{font-size:1.15em;margin:1.2em 0 .4em}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
          "font-size:13px;vertical-align:top}th{background:#eee;text-align:left}"
          "table.all td:not(:first-child){text-align:right}"
          "table.summary td:nth-child(2){text-align:right;white-space:nowrap;font-weight:bold}"
          "table.summary td:nth-child(3){color:#444}"
          ".note{background:#f3f5fa;border-left:3px solid #7a8cc0;padding:.4em .8em;"
          "font-size:13px;margin:.6em 0}"
          ".plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));"
          "gap:1.2em 1.5em}figure{margin:0}figure.wide{grid-column:1/-1}"
          "figure h3{font-size:1em;margin:0 0 .3em}img{max-width:100%}"
          "figcaption{font-size:13px;color:#444}"
          "details summary{cursor:pointer;font-weight:bold;margin:1.2em 0 .4em}")
SUMMARY_HEADER = ["measure", "value", "how to read it"]


def _png_width(data: bytes) -> int:
    return int.from_bytes(data[16:20], "big")  # the IHDR chunk's width


def _write_documents(out: Path, title: str, rows, header, figures: list[Figure], *,
                     summary: list[Headline] = (), notes: list[str] = (),
                     table_open: bool = False) -> None:
    """``report.md`` and ``report.html``: summary and notes, plots, then the full table
    (collapsed in the HTML unless ``table_open`` or there is nothing above it)."""
    summary_rows = [(h.name, [h.value, h.reading]) for h in summary]
    md = [f"# {title}", ""]
    if summary_rows:
        md += ["## Summary", "", _table_markdown(summary_rows, SUMMARY_HEADER), ""]
    md += [f"> {note}\n" for note in notes]
    for figure in figures:
        md += [f"## {figure.heading}", "", f"![{figure.heading}]({figure.path.name})", ""]
        md += [figure.caption, ""] if figure.caption else []
    md += ["## All metrics", "", _table_markdown(rows, header)]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")

    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary_rows:
        parts.append(f"<h2>Summary</h2>{_table_html(summary_rows, SUMMARY_HEADER, 'summary')}")
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    if figures:
        parts.append('<h2>Plots</h2><div class="plots">')
        for figure in figures:
            data = figure.path.read_bytes()
            wide = ' class="wide"' if _png_width(data) > 1000 else ""
            caption = (f"<figcaption>{html.escape(figure.caption)}</figcaption>"
                       if figure.caption else "")
            parts.append(f"<figure{wide}><h3>{html.escape(figure.heading)}</h3>"
                         f'<img alt="{html.escape(figure.heading)}" '
                         f'src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                         f"{caption}</figure>")
        parts.append("</div>")
    opened = " open" if table_open or not (summary_rows or figures) else ""
    parts.append(f"<details{opened}><summary>All metrics ({len(rows)} rows)</summary>"
                 f"{_table_html(rows, header, 'all')}</details>")
    write_text_atomic(
        out / "report.html",
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def _metric_rows(metrics: dict, same: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The full table: every flattened metric, one ``identical to`` row per identical score."""
    rows, noted = [], set()
    for key, value in flatten_metrics(json_ready(metrics)).items():
        dup = next((d for d in same if key.startswith(f"quality.{d}.")), None)
        if dup is None:
            rows.append((key, [_format(value)]))
        elif dup not in noted:
            noted.add(dup)
            rows.append((f"quality.{dup}", [f"identical to quality.{same[dup]}"]))
    return rows


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> Path:
    """Write metrics, curves, plots and the Markdown/HTML report into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(json_ready(report.metrics), indent=2) + "\n")
    aucs = {label: area_under_curve(roc) for label, roc in report.rocs.items()}
    rocs = {label: roc.downsample() for label, roc in report.rocs.items()}
    curves = {
        "title": report.title,
        "roc": {label: {"far": r.far, "tar": r.tar, "auc": aucs[label]}
                for label, r in rocs.items()},
        "edc": {label: {"discard": c.discard_fractions, "fnmr": c.errors}
                for label, c in report.edcs.items()},
    }
    write_text_atomic(out / "curves.json", json.dumps(json_ready(curves)) + "\n")
    same = identical_scores(report.metrics)
    edcs = merge_identical_edcs({k: (c.discard_fractions, c.errors)
                                 for k, c in report.edcs.items()}, same)
    # Drawn once: a histogram that repeats a box plot, or an identical score's histogram.
    histograms = {title: series for title, series in report.histograms.items()
                  if title not in report.boxes and not any(
                      dup in title and title.replace(dup, kept) in report.histograms
                      for dup, kept in same.items())}
    figures = [
        Figure(path, heading, caption) for path, heading, caption in (
            (_plot_rocs({f"{k} (AUC {aucs[k]:.3f})": (r.far, r.tar) for k, r in rocs.items()},
                        out / "roc.png", f"ROC - {report.title}"), "ROC", ROC_CAPTION),
            (_plot_edcs(edcs, out / "edc.png", f"EDC - {report.title}"),
             "Error-versus-discard (EDC)", EDC_CAPTION),
        ) if path is not None]
    taken = {"roc.png", "edc.png", "quality_hist.png"}
    boxes = [Figure(path, str(title), str(report.captions.get(title, ""))) for title, path in (
        (title, _plot_boxes(str(title), groups, out / plot_file_name(str(title), taken)))
        for title, groups in report.boxes.items()) if path is not None]
    hist = _plot_histograms(histograms, out / "quality_hist.png")
    lines = [Figure(path, str(title), str(report.captions.get(title, ""))) for title, path in (
        (title, _plot_lines(str(title), spec, out / plot_file_name(str(title), taken)))
        for title, spec in report.lines.items()) if path is not None]
    figures += boxes + ([Figure(hist, "Quality histograms", HISTOGRAM_CAPTION)] if hist else [])
    figures += lines
    _write_documents(out, report.title, _metric_rows(report.metrics, same), ["metric", "value"],
                     figures, summary=headlines(report.metrics, same),
                     notes=identical_notes(same))
    return out


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON object from ``path``; every way it fails is one ``EvaluationError`` naming it."""
    text = read_small_text_as(path, EvaluationError, what=what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_curves(path: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``curves.json`` as written by ``write_report`` -> ``{"roc": {label: {"far", "tar",
    "auc"}}, "edc": {label: {"discard", "fnmr"}}}`` with float arrays; {} when absent. A curve
    that lacks a key, or whose arrays are not numbers of one length, names the file and key."""
    if not path.is_file():
        return {}
    data = _read_json_object(path, "curves.json")
    out: dict = {"roc": {}, "edc": {}}
    for kind, (x, y) in (("roc", ("far", "tar")), ("edc", ("discard", "fnmr"))):
        curves = data.get(kind, {})
        if not isinstance(curves, dict):
            raise EvaluationError(f"{path}: '{kind}' must be an object of curves")
        for label, curve in curves.items():
            where = f"{path}: '{kind}.{label}"
            if not isinstance(curve, dict) or x not in curve or y not in curve:
                raise EvaluationError(f"{where}' must hold '{x}' and '{y}'")
            xs = _float_array(curve[x], f"{where}.{x}'")
            ys = _float_array(curve[y], f"{where}.{y}'")
            if len(xs) != len(ys):
                raise EvaluationError(f"{where}': {len(xs)} {x} values but {len(ys)} {y} values")
            out[kind][label] = {x: xs, y: ys, "auc": curve.get("auc")}
    return out


def _is_comparison(metrics_path: Path) -> bool:
    """Whether ``metrics_path`` is a comparison's own ``metrics.json`` (only ``runs``)."""
    try:
        return set(_read_json_object(metrics_path, "metrics.json")) == {"runs"}
    except EvaluationError:
        return False


def compare_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Put runs side by side: one table (union of metric keys) and overlaid ROC / EDC plots."""
    if not run_dirs:
        raise EvaluationError("compare: give at least one run folder")
    out = Path(out_dir)
    # The comparison writes metrics.json, report.md/html, roc.png and edc.png: into a run's
    # folder (one of those compared, or any other) it would replace that run's own files.
    # Checked before anything is read or written; an earlier comparison may be replaced.
    if (out / "metrics.json").exists() and not _is_comparison(out / "metrics.json"):
        raise EvaluationError(f"{out}: holds an eval run (metrics.json), which the comparison "
                              "would overwrite; choose another --out")
    names, flats, curve_sets = [], [], []
    for run in map(Path, run_dirs):
        metrics_path = run / "metrics.json"
        if not metrics_path.is_file():
            raise EvaluationError(f"{metrics_path}: not found (is {run} an eval output folder?)")
        flats.append(flatten_metrics(_read_json_object(metrics_path, "metrics.json")))
        curve_sets.append(_read_curves(run / "curves.json"))
        # Column names must be unique: they key the runs in metrics.json and the curve labels,
        # where a repeated name would keep only one of the runs.
        base = run.name or str(run)
        name, number = base, len(names)
        while name in names:
            name, number = f"{base} ({number})", number + 1
        names.append(name)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    rows = [(key, [_format(flat.get(key)) for flat in flats]) for key in keys]
    rocs, edcs = {}, {}
    for name, curves in zip(names, curve_sets):
        for label, c in curves.get("roc", {}).items():
            auc = f" (AUC {c['auc']:.3f})" if _number(c.get("auc")) is not None else ""
            rocs[f"{name}: {label}{auc}"] = (c["far"], c["tar"])
        for label, c in curves.get("edc", {}).items():
            edcs[f"{name}: {label}"] = (c["discard"], c["fnmr"])
    figures = [Figure(path, heading, caption) for path, heading, caption in (
        (_plot_rocs(rocs, out / "roc.png", "ROC comparison"), "ROC", ROC_CAPTION),
        (_plot_edcs(edcs, out / "edc.png", "EDC comparison"), "Error-versus-discard (EDC)",
         EDC_CAPTION)) if path is not None]
    write_text_atomic(out / "metrics.json", json.dumps(
        {"runs": {n: {k: v for k, v in f.items()} for n, f in zip(names, flats)}}, indent=2) + "\n")
    _write_documents(out, "Comparison", rows, ["metric", *names], figures, table_open=True)
    return out
