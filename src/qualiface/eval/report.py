"""Evaluation reports: ``metrics.json``, ``curves.json``, PNG plots, ``report.md`` and ``report.html``.

Every evaluation run writes into one folder:

- ``metrics.json``: the numbers (NaN written as ``null``);
- ``curves.json``: ROC curves (downsampled to <= 2000 points, log-FAR spaced) and EDC curves,
  so ``compare_runs`` can overlay runs without recomputing anything;
- ``roc.png`` (TAR vs FAR, log FAR axis), ``edc.png`` (all quality scores' EDCs on one plot),
  ``quality_hist.png`` (genuine vs impostor pair quality, or per degradation level);
- ``report.md`` (links the PNGs) and ``report.html`` (self-contained, PNGs embedded).

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qualiface.eval import EvaluationError


@dataclass
class EvalReport:
    """What one run reports: title, metrics, and curves/histograms keyed by legend label."""

    title: str
    metrics: dict
    rocs: dict = field(default_factory=dict)  # label -> verification.RocCurve
    edcs: dict = field(default_factory=dict)  # label -> quality.EdcCurve
    histograms: dict = field(default_factory=dict)  # plot title -> {series: values}


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


def _plot_edcs(edcs: dict, path: Path, title: str) -> Path | None:
    """edcs: label -> (discard fractions, errors)."""
    if not edcs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, (fractions, errors) in edcs.items():
        ax.step(fractions, errors, where="post", label=label)
    ax.set_xlim(0, 0.5)
    ax.set_xlabel("fraction of comparisons discarded (lowest pair quality first)")
    ax.set_ylabel("FNMR")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
