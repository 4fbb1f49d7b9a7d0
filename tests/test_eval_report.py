"""``qualiface.eval.report``: line and box plots next to the ROC/EDC plots, file names, errors."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from qualiface.eval import EvaluationError
from qualiface.eval.quality import edc
from qualiface.eval.report import EvalReport, plot_file_name, write_report
from qualiface.eval.verification import roc_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pairs(seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) < n // 2
    scores = rng.normal(0.0, 1.0, n) + 1.5 * labels
    quality = rng.uniform(0.0, 1.0, n)
    return scores, labels, quality


def _base_report(**extra) -> EvalReport:
    scores, labels, quality = _pairs()
    return EvalReport(
        "unit test", {"verification": {"auc": 0.9}},
        rocs={"cosine": roc_curve(scores, labels)},
        edcs={"quality (fmr=0.1)": edc(scores, labels, quality, fmr=0.1)},
        histograms={"pair quality": {"genuine": quality[labels], "impostor": quality[~labels]}},
        **extra)


def _markdown_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_lines_and_boxes_become_pngs_referenced_by_both_reports(tmp_path):
    steps = np.arange(1, 41)
    report = _base_report(
        lines={"Training loss": {"x": "step", "y": "loss", "series": {
            "loss": (steps, 5.0 / steps), "norm loss": (steps.tolist(), [0.1] * 40)}}},
        boxes={"Quality by severity": {"clean": np.linspace(0.6, 0.9, 20),
                                       "severe": [0.1, 0.2, 0.3]}})
    out = write_report(report, tmp_path / "run")
    expected = ["roc.png", "edc.png", "quality_hist.png", "training_loss.png",
                "quality_by_severity.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    assert _markdown_images((out / "report.md").read_text()) == expected
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(expected)
    for name in ("training_loss.png", "quality_by_severity.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert base64.b64encode(data).decode() in html  # the very file, embedded


def test_empty_lines_and_boxes_write_nothing_extra(tmp_path):
    out = write_report(_base_report(lines={}, boxes={}), tmp_path / "run")
    assert sorted(p.name for p in out.glob("*.png")) == ["edc.png", "quality_hist.png", "roc.png"]
    assert _markdown_images((out / "report.md").read_text()) == ["roc.png", "edc.png",
                                                                  "quality_hist.png"]
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3


def test_plots_without_data_are_skipped(tmp_path):
    report = EvalReport("empty", {"n": 1},
                        lines={"nothing": {"x": "a", "y": "b", "series": {"s": ([], [])}}},
                        boxes={"all nan": {"a": [], "b": [float("nan"), None]}})
    out = write_report(report, tmp_path / "run")
    assert list(out.glob("*.png")) == []
    assert "data:image/png" not in (out / "report.html").read_text()


def test_plot_file_names_are_safe_and_unique():
    taken = {"roc.png", "edc.png", "quality_hist.png"}
    assert plot_file_name("Training loss (fp32)", taken) == "training_loss_fp32.png"
    assert plot_file_name("training loss / fp32!", taken) == "training_loss_fp32_2.png"
    assert plot_file_name("ROC", taken) == "roc_2.png"  # never overwrites the built-in plots
    assert plot_file_name("../../etc/passwd", taken) == "etc_passwd.png"
    assert plot_file_name("§§§", taken) == "plot.png"
    long_name = plot_file_name("x" * 300, taken)
    assert long_name == "x" * 60 + ".png"
    assert {"training_loss_fp32.png", "roc_2.png", "plot.png"} <= taken


@pytest.mark.parametrize("report, message", [
    (EvalReport("t", {}, lines={"loss": {"x": "s", "y": "l",
                                         "series": {"a": ([1, 2, 3], [1, 2])}}}),
     "line plot 'loss', series 'a': 3 x values but 2 y values"),
    (EvalReport("t", {}, lines={"loss": {"x": "s", "y": "l", "series": {"a": ([1], ["big"])}}}),
     "line plot 'loss', series 'a' y: values must be numbers"),
    (EvalReport("t", {}, lines={"loss": [1, 2, 3]}), "line plot 'loss': expected"),
    (EvalReport("t", {}, lines={"loss": {"series": {"a": [1, 2, 3]}}}),
     "line plot 'loss', series 'a': expected (x_values, y_values)"),
    (EvalReport("t", {}, boxes={"q": {"clean": ["x"]}}), "box plot 'q', group 'clean'"),
    (EvalReport("t", {}, boxes={"q": [1, 2]}), "box plot 'q': expected"),
])
def test_bad_plot_data_is_a_clear_error(tmp_path, report, message):
    with pytest.raises(EvaluationError, match=re.escape(message)):
        write_report(report, tmp_path / "run")


def test_edc_legend_sits_outside_the_axes(tmp_path, monkeypatch):
    """The EDC legend must not cover curves: its box may not overlap the plotting area."""
    from matplotlib.figure import Figure

    extents = {}  # file name -> (legend box, axes box) in pixels, taken while the figure lives
    original = Figure.savefig

    def recording_savefig(self, fname, *args, **kwargs):
        self.canvas.draw()
        renderer = self.canvas.get_renderer()
        axes = self.axes[0]
        extents[str(fname).rsplit("/", 1)[-1]] = (
            axes.get_legend().get_window_extent(renderer), axes.get_window_extent(renderer))
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    scores, labels, quality = _pairs(1)
    edcs = {f"quality {i} (fmr=0.1)": edc(scores, labels, quality + i, fmr=0.1) for i in range(4)}
    write_report(EvalReport("legend", {}, edcs=edcs), tmp_path / "run")
    legend_box, axes_box = extents["edc.png"]
    assert not legend_box.overlaps(axes_box)
    # bbox_inches="tight" keeps the outside legend in the saved image.
    assert (tmp_path / "run" / "edc.png").read_bytes().startswith(PNG_MAGIC)
