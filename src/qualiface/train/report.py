"""The training run's own report: its curves from ``metrics.jsonl`` as PNGs in ``report.html``.

Written by rank 0 at the end of every run into ``<output_dir>/report/`` (the TensorBoard logs
hold the same scalars for live viewing). The loss-curve helpers are shared with the demo, so the
two reports draw the training loss the same way.
"""

from __future__ import annotations

from pathlib import Path

from qualiface.eval.report import EvalReport, write_report
from qualiface.train.logging import read_metrics

LOSS_PLOT_TITLE = "training loss"
#: Loss terms the heads log next to the total (metrics key -> legend label), drawn one line
#: each so that a regulariser switching on does not look like divergence.
LOSS_TERMS = {
    "identity_loss": "identity (margin) loss",
    "classification_loss": "classification loss",
    "norm_loss": "norm regulariser L_g (x lambda_g in the total once on)",
    "magface_g": "MagFace regulariser g (x lambda_g in the total)",
    "contrastive_loss": "contrastive loss (x its weight in the total)",
}
LOSS_CAPTION = ("Total training loss and each logged term against the optimizer step. Dashed "
                "vertical lines mark phase changes (e.g. a regulariser switching on, EQFace's "
                "steps): a jump in the total there is the new term being added, not divergence; "
                "read the identity loss for learning progress.")
#: Labels of EQFace's later steps (the ``stage`` its head logs).
EQFACE_STEPS = {2: "EQFace step 2: quality branch only", 3: "EQFace step 3: fine-tune with quality"}
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


def phase_changes(records: list[dict]) -> list[tuple[int, str]]:
    """``[(step, label)]``: the first logged training step after each phase change: a new
    pipeline phase (EQFace's steps, labelled by the head's ``stage``) and QCFace's norm prior
    switching on (``norm_phase`` 0 -> 1). A run that starts with the prior on has no marker."""
    changes: list[tuple[int, str]] = []
    previous = None
    for record in (r for r in records if r.get("kind") == "train"):
        if previous is not None:
            if record.get("phase") != previous.get("phase"):
                stage = int(record["stage"]) if _numeric(record, "stage") else None
                label = EQFACE_STEPS.get(stage) or f"phase {record.get('phase')}"
                changes.append((record["step"], label))
            if (record.get("norm_phase") or 0) > 0 and not (previous.get("norm_phase") or 0) > 0:
                changes.append((record["step"], "norm regulariser on"))
        previous = record
    return changes


def loss_curve(records: list[dict]) -> dict:
    """``{"step": [...], "loss": [...]}`` of the logged training steps, plus each ``LOSS_TERMS``
    key the run logged at every step (e.g. ``identity_loss``, the margin loss alone, and
    ``norm_loss``), ``phase_changes`` (``[[step, label]]``, see ``phase_changes``) and
    ``norm_prior_from`` (QCFace: first step whose loss includes the norm prior), because a
    term switching on makes the total jump."""
    train = [r for r in records if r.get("kind") == "train" and _numeric(r, "loss")]
    curve = {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train]}
    for key in LOSS_TERMS:
        if train and all(_numeric(r, key) for r in train):
            curve[key] = [r[key] for r in train]
    prior_steps = [r["step"] for r in train if (r.get("norm_phase") or 0) > 0]
    if prior_steps:
        curve["norm_prior_from"] = prior_steps[0]
    curve["phase_changes"] = [[step, label] for step, label in phase_changes(records)]
    return curve


def loss_plot(curve: dict) -> dict:
    """A ``loss_curve`` as one ``EvalReport.lines`` entry: the total and each logged term, with
    the phase changes as markers (older curves: ``norm_prior_from``)."""
    series = {"total loss": (curve["step"], curve["loss"])}
    for key, label in LOSS_TERMS.items():
        if key in curve:
            series[label] = (curve["step"], curve[key])
    markers = [tuple(change) for change in curve.get("phase_changes", ())]
    if not markers and "norm_prior_from" in curve:
        markers = [(curve["norm_prior_from"], "norm regulariser on")]
    return {"x": "optimizer step", "y": "loss", "series": series, "markers": markers}


def training_plots(records: list[dict]) -> dict:
    """Every curve of a run as ``EvalReport.lines``: loss (each term), accuracy, norm, learning
    rate, and held-out verification when the run validated; phase changes marked on each."""
    lines = {}
    curve = loss_curve(records)
    if curve["step"]:
        lines[LOSS_PLOT_TITLE] = loss_plot(curve)
    markers = [tuple(change) for change in curve["phase_changes"]]
    train = [r for r in records if r.get("kind") == "train"]
    for title, label, key in SCALAR_PLOTS:
        points = [(r["step"], r[key]) for r in train if _numeric(r, key)]
        if points:
            steps, values = zip(*points)
            lines[title] = {"x": "optimizer step", "y": label, "series": {key: (steps, values)},
                            "markers": markers}
    val = [r for r in records if r.get("kind") == "val"]
    series = {}
    for key in VALIDATION_KEYS:
        points = [(r["step"], r[key]) for r in val if _numeric(r, key)]
        if points:
            steps, values = zip(*points)
            series[key] = (steps, values)
    if series:
        lines["held-out verification"] = {"x": "optimizer step", "y": "value", "series": series,
                                          "markers": markers}
    return lines


def write_training_report(run_dir: str | Path, *, title: str, summary: dict) -> Path:
    """Write ``<run_dir>/report/report.html`` (+ PNGs, ``metrics.json``) from the run's
    ``metrics.jsonl``; ``summary`` is the table at the top. Returns the HTML path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = run_dir / "report"
    write_report(EvalReport(title, summary, lines=training_plots(records),
                            captions={LOSS_PLOT_TITLE: LOSS_CAPTION}), out)
    return out / "report.html"
