"""Evaluation reports: ``metrics.json``, ``curves.json``, PNG plots, ``report.md`` and ``report.html``.

Every evaluation run writes into one folder:

- ``metrics.json``: the numbers (NaN written as ``null``);
- ``curves.json``: ROC curves (downsampled to <= 2000 points, log-FAR spaced) and EDC curves,
  so ``compare_runs`` can overlay runs without recomputing anything;
- ``roc.png`` (TAR vs FAR, log FAR axis), ``edc.png`` (all quality scores' EDCs on one plot),
  ``quality_hist.png`` (genuine vs impostor pair quality, or per degradation level);
- one PNG per ``lines`` entry (line plots, e.g. a training loss curve) and per ``boxes`` entry
  (box plots, e.g. quality per degradation-severity bin), named after the plot title
  (``training loss`` -> ``training_loss.png``);
- ``report.md`` (links the PNGs) and ``report.html`` (self-contained, PNGs embedded).

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


@dataclass
class EvalReport:
    """What one run reports: title, metrics, and curves/histograms keyed by legend label.

    lines: plot title -> ``{"x": x-axis label, "y": y-axis label, "series": {name: (x_values,
        y_values)}}``; one line plot (PNG) per title, e.g. a training loss curve.
    boxes: plot title -> ``{group label: values}``; one box plot (PNG) per title, groups in
        dict order, e.g. quality per severity bin.
    """

    title: str
    metrics: dict
    rocs: dict = field(default_factory=dict)  # label -> verification.RocCurve
    edcs: dict = field(default_factory=dict)  # label -> quality.EdcCurve
    histograms: dict = field(default_factory=dict)  # plot title -> {series: values}
    lines: dict = field(default_factory=dict)  # plot title -> {"x", "y", "series"}
    boxes: dict = field(default_factory=dict)  # plot title -> {group: values}


def _clean(value):
    """JSON-safe copy: numpy scalars -> Python, NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


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


def _plot_rocs(rocs: dict, path: Path, title: str) -> Path | None:
    """rocs: label -> (far, tar) arrays."""
    if not rocs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    lowest = 1.0
    for label, (far, tar) in rocs.items():
        far, tar = np.asarray(far), np.asarray(tar)
        keep = far > 0
        if keep.any():
            lowest = min(lowest, float(far[keep].min()))
            ax.step(far[keep], tar[keep], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlim(max(min(lowest, 1e-1), 1e-6), 1.0)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_edcs(ax, edcs: dict, title: str, ylabel: str = "FNMR", max_discard: float = 0.5) -> None:
    """Draw EDC step curves on a matplotlib axes; edcs: label -> (discard fractions, errors).

    Public so that multi-panel figures (e.g. ``bench/real_faces.py``) draw curves exactly as
    the reports do."""
    for label, (fractions, errors) in edcs.items():
        ax.step(fractions, errors, where="post", label=label)
    ax.set_xlim(0, max_discard)
    ax.set_xlabel("fraction of comparisons discarded (lowest pair quality first)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def _plot_edcs(edcs: dict, path: Path, title: str) -> Path | None:
    """edcs: label -> (discard fractions, errors)."""
    if not edcs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    draw_edcs(ax, edcs, title)
    # Below the axes: EDC curves start at the top left and fall to the right, so every corner
    # inside the axes can hide one of them.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small",
              frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_histograms(histograms: dict, path: Path) -> Path | None:
    if not histograms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_xlabel("quality")
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


def _plot_lines(title: str, spec: dict, path: Path) -> Path | None:
    """One line plot: ``spec = {"x": label, "y": label, "series": {name: (xs, ys)}}``."""
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
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, xs, ys in curves:
        # Markers only for short curves, so few samples still show where they are.
        ax.plot(xs, ys, label=name, marker="o" if len(xs) <= 30 else None, markersize=3)
    ax.set_xlabel(str(spec.get("x", "")))
    ax.set_ylabel(str(spec.get("y", "")))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(data)), 4.4))
    ax.boxplot([values for _, values in data], showmeans=True)
    # Tick labels set separately: boxplot's own keyword for them was renamed in matplotlib 3.9.
    ax.set_xticks(range(1, len(data) + 1), [label for label, _ in data], fontsize="small")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table_markdown(rows: list[tuple[str, list[str]]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([key, *values]) + " |" for key, values in rows]
    return "\n".join(lines)


def _table_html(rows: list[tuple[str, list[str]]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [k, *v]) + "</tr>"
                   for k, v in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
          "font-size:13px}th{background:#eee}td:not(:first-child){text-align:right}"
          "img{max-width:100%}")


def _write_documents(out: Path, title: str, rows, header, images: list[Path]) -> None:
    md = [f"# {title}", "", _table_markdown(rows, header), ""]
    md += [f"![{p.stem}]({p.name})" for p in images]
    (out / "report.md").write_text("\n".join(md) + "\n")
    embedded = "".join(
        f'<h2>{html.escape(p.stem)}</h2><img alt="{html.escape(p.stem)}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images)
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{_table_html(rows, header)}{embedded}</body></html>\n")


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> Path:
    """Write metrics, curves, plots and the Markdown/HTML report into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_clean(report.metrics), indent=2) + "\n")
    rocs = {label: roc.downsample() for label, roc in report.rocs.items()}
    curves = {
        "title": report.title,
        "roc": {label: {"far": r.far, "tar": r.tar} for label, r in rocs.items()},
        "edc": {label: {"discard": c.discard_fractions, "fnmr": c.errors}
                for label, c in report.edcs.items()},
    }
    (out / "curves.json").write_text(json.dumps(_clean(curves)) + "\n")
    images = [p for p in (
        _plot_rocs({k: (r.far, r.tar) for k, r in rocs.items()}, out / "roc.png",
                   f"ROC - {report.title}"),
        _plot_edcs({k: (c.discard_fractions, c.errors) for k, c in report.edcs.items()},
                   out / "edc.png", f"EDC - {report.title}"),
        _plot_histograms(report.histograms, out / "quality_hist.png"),
    ) if p is not None]
    taken = {"roc.png", "edc.png", "quality_hist.png"}
    images += [p for p in (
        *(_plot_lines(str(title), spec, out / plot_file_name(str(title), taken))
          for title, spec in report.lines.items()),
        *(_plot_boxes(str(title), groups, out / plot_file_name(str(title), taken))
          for title, groups in report.boxes.items()),
    ) if p is not None]
    rows = [(key, [_format(value)]) for key, value in flatten_metrics(_clean(report.metrics)).items()]
    _write_documents(out, report.title, rows, ["metric", "value"], images)
    return out


def compare_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Put runs side by side: one table (union of metric keys) and overlaid ROC / EDC plots."""
    if not run_dirs:
        raise EvaluationError("compare: give at least one run folder")
    names, flats, curve_sets = [], [], []
    for run in map(Path, run_dirs):
        metrics_path = run / "metrics.json"
        if not metrics_path.is_file():
            raise EvaluationError(f"{metrics_path}: not found (is {run} an eval output folder?)")
        try:
            flats.append(flatten_metrics(json.loads(metrics_path.read_text())))
            curves_path = run / "curves.json"
            curve_sets.append(json.loads(curves_path.read_text()) if curves_path.is_file() else {})
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{run}: unreadable JSON ({exc})") from None
        base = run.name or str(run)
        names.append(base if base not in names else f"{base} ({len(names)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    rows = [(key, [_format(flat.get(key)) for flat in flats]) for key in keys]
    rocs, edcs = {}, {}
    for name, curves in zip(names, curve_sets):
        for label, c in curves.get("roc", {}).items():
            rocs[f"{name}: {label}"] = (np.asarray(c["far"], float), np.asarray(c["tar"], float))
        for label, c in curves.get("edc", {}).items():
            edcs[f"{name}: {label}"] = (np.asarray(c["discard"], float),
                                        np.asarray(c["fnmr"], float))
    images = [p for p in (_plot_rocs(rocs, out / "roc.png", "ROC comparison"),
                          _plot_edcs(edcs, out / "edc.png", "EDC comparison")) if p is not None]
    (out / "metrics.json").write_text(json.dumps(
        {"runs": {n: {k: v for k, v in f.items()} for n, f in zip(names, flats)}}, indent=2) + "\n")
    _write_documents(out, "Comparison", rows, ["metric", *names], images)
    return out
