"""The training run's own report: its curves from ``metrics.jsonl`` as PNGs in ``report.html``.

Written by rank 0 at the end of every run into ``<output_dir>/report/`` (the TensorBoard logs
hold the same scalars for live viewing). The loss-curve helpers are shared with the demo, so the
two reports draw the training loss the same way.
"""

from __future__ import annotations

from pathlib import Path

from qualiface.train.logging import read_metrics

LOSS_PLOT_TITLE = "training loss"
#: Other training scalars worth a plot of their own: (plot title, y label, metrics key).
SCALAR_PLOTS = (
    ("training accuracy", "accuracy (margin-free argmax)", "acc"),
    ("mean feature norm", "||x||", "norm"),
    ("learning rate", "lr", "lr"),
)
#: Held-out verification scalars logged during training.
VALIDATION_KEYS = ("val_accuracy", "val_auc")


def _numeric(record: dict, key: str) -> bool:
    value = record.get(key)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def loss_curve(records: list[dict]) -> dict:
    """``{"step": [...], "loss": [...]}`` of the logged training steps, plus ``identity_loss``
    (the margin loss alone) and ``norm_prior_from`` (QCFace: first step whose loss includes the
    norm prior) when the run logged them, because switching the prior on makes the total jump."""
    train = [r for r in records if r.get("kind") == "train" and _numeric(r, "loss")]
    curve = {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train]}
    if train and all(_numeric(r, "identity_loss") for r in train):
        curve["identity_loss"] = [r["identity_loss"] for r in train]
    prior_steps = [r["step"] for r in train if (r.get("norm_phase") or 0) > 0]
    if prior_steps:
        curve["norm_prior_from"] = prior_steps[0]
    return curve


def loss_plot(curve: dict) -> dict:
    """A ``loss_curve`` as one ``EvalReport.lines`` entry (total, and identity loss if any)."""
    total = "total loss"
    if "norm_prior_from" in curve:  # say why the total jumps
        total += f" (norm prior from step {curve['norm_prior_from']})"
    series = {total: (curve["step"], curve["loss"])}
    if "identity_loss" in curve:
        series["identity (margin) loss"] = (curve["step"], curve["identity_loss"])
    return {"x": "optimizer step", "y": "loss", "series": series}


def training_plots(records: list[dict]) -> dict:
    """Every curve of a run as ``EvalReport.lines``: loss, accuracy, norm, learning rate, and
    held-out verification when the run validated."""
    lines = {}
    curve = loss_curve(records)
    if curve["step"]:
        lines[LOSS_PLOT_TITLE] = loss_plot(curve)
    train = [r for r in records if r.get("kind") == "train"]
    for title, label, key in SCALAR_PLOTS:
        points = [(r["step"], r[key]) for r in train if _numeric(r, key)]
        if points:
            steps, values = zip(*points)
            lines[title] = {"x": "optimizer step", "y": label, "series": {key: (steps, values)}}
    val = [r for r in records if r.get("kind") == "val"]
    series = {}
    for key in VALIDATION_KEYS:
        points = [(r["step"], r[key]) for r in val if _numeric(r, key)]
        if points:
            steps, values = zip(*points)
            series[key] = (steps, values)
    if series:
        lines["held-out verification"] = {"x": "optimizer step", "y": "value", "series": series}
    return lines


def write_training_report(run_dir: str | Path, *, title: str, summary: dict) -> Path:
    """Write ``<run_dir>/report/report.html`` (+ PNGs, ``metrics.json``) from the run's
    ``metrics.jsonl``; ``summary`` is the table at the top. Returns the HTML path."""
    from qualiface.eval.report import EvalReport, write_report

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = run_dir / "report"
    write_report(EvalReport(title, summary, lines=training_plots(records)), out)
    return out / "report.html"
