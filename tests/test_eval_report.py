"""``qualiface.eval.report``: line and box plots next to the ROC/EDC plots, file names, errors."""

from __future__ import annotations

import base64
import json
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
    # Summary plots first (ROC, EDC, quality per severity), then histograms and training curves.
    expected = ["roc.png", "edc.png", "quality_by_severity.png", "quality_hist.png",
                "training_loss.png"]
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


# --------------------------------------------------------------------------- reading order


def _identical_scores_report(spearman: float = -0.33) -> EvalReport:
    """A QCFace-like report: "feature norm" ranks every pair exactly as "model quality"."""
    from qualiface.eval.quality import edc_summary

    scores, labels, quality = _pairs(2, 400)
    curve = edc(scores, labels, quality, fmr=0.1)
    block = {"fmr_1e-01": edc_summary(curve),
             "vs_severity": {"spearman": spearman, "kendall": spearman * 0.7}}
    metrics = {"verification": {"accuracy": 0.866, "accuracy_std": 0.017, "auc": 0.941,
                                "eer": 0.133, "tar_at_far": {"1e-03": None, "1e-02": 0.475,
                                                             "1e-01": 0.827}},
               "quality": {"model quality": block, "feature norm": dict(block)}}
    return EvalReport(
        "identical", metrics, rocs={"cosine": roc_curve(scores, labels)},
        edcs={"model quality @ FMR 0.1": curve, "feature norm @ FMR 0.1": curve},
        histograms={"pair model quality": {"genuine": quality[labels],
                                           "impostor": quality[~labels]},
                    "pair feature norm": {"genuine": 20 * quality[labels],
                                          "impostor": 20 * quality[~labels]},
                    "model quality by severity": {"clean": quality[:50], "severe": quality[50:]}},
        boxes={"model quality by severity": {"clean": quality[:50], "severe": quality[50:]}})


def test_summary_comes_first_and_the_full_table_is_collapsed(tmp_path):
    out = write_report(_identical_scores_report(), tmp_path / "run")
    html = (out / "report.html").read_text()
    summary, first_image = html.index("<h2>Summary</h2>"), html.index("<img")
    assert summary < first_image
    head = html[summary:first_image]
    for text in ("86.6% ± 1.7%", "0.941", "13.3%", "TAR @ FAR 1e-2", "47.5%",
                 "1 in 100 impostor",
                 "EDC pAUC20", "Spearman", "more negative is better"):
        assert text in head, text
    # Every flattened metric sits in the one table, inside a closed <details> after the plots.
    details = html.index("<details>")
    assert details > html.rindex("<img") and html.count("<table") == 2
    assert html.index('<table class="all">') > details
    assert "verification.tar_at_far.1e-01" in html[details:]
    # Markdown keeps the order: summary, plots, all metrics.
    md = (out / "report.md").read_text()
    assert md.index("## Summary") < md.index("![") < md.index("## All metrics")


def test_identical_quality_scores_are_shown_once(tmp_path):
    from qualiface.eval.report import identical_scores

    report = _identical_scores_report()
    assert identical_scores(report.metrics) == {"feature norm": "model quality"}
    out = write_report(report, tmp_path / "run")
    html = (out / "report.html").read_text()
    summary = html[:html.index("<img")]
    assert "model quality = feature norm" in summary
    assert summary.count("EDC pAUC20") == 1 and summary.count("Spearman") == 1
    assert "so the two are shown once" in summary
    table = html[html.index("<details>"):]
    assert "quality.feature norm.fmr_1e-01" not in table
    assert "identical to quality.model quality" in table
    assert "quality.model quality.fmr_1e-01.pauc_20" in table
    # curves.json keeps both (compare_runs overlays runs by label).
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves["edc"]) == {"model quality @ FMR 0.1", "feature norm @ FMR 0.1"}

    # Different scores keep their own blocks.
    report.metrics["quality"]["feature norm"] = {
        **report.metrics["quality"]["feature norm"], "vs_severity": {"spearman": 0.05}}
    assert identical_scores(report.metrics) == {}


def test_scores_are_not_called_identical_when_no_edc_has_an_error_to_discard():
    """A perfect model at the FMR: every score's EDC is zero everywhere, so equal blocks say
    nothing about how the scores rank; calling them "identical" would be a false claim."""
    from qualiface.eval.quality import edc_summary
    from qualiface.eval.report import identical_scores

    rng = np.random.default_rng(0)
    labels = np.arange(400) % 2 == 0
    scores = np.where(labels, 0.9, 0.1) + rng.normal(0, 0.01, 400)  # separated: no error
    one, other = rng.uniform(size=400), rng.uniform(size=400)  # two unrelated scores
    blocks = {name: {"fmr_1e-01": edc_summary(edc(scores, labels, quality, fmr=0.1))}
              for name, quality in (("model quality", one), ("feature norm", other))}
    assert blocks["model quality"]["fmr_1e-01"]["fnmr_at_0"] == 0
    assert identical_scores({"quality": blocks}) == {}


def test_merge_identical_edcs_keeps_one_visible_curve_per_score():
    from qualiface.eval.report import merge_identical_edcs

    same = np.array([0.0, 0.5, 1.0]), np.array([0.3, 0.2, 0.0])
    other = np.array([0.0, 0.5, 1.0]), np.array([0.3, 0.25, 0.0])
    edcs = {"model quality @ FMR 0.01": same, "model quality @ FMR 0.001": other,
            "feature norm @ FMR 0.01": same, "feature norm @ FMR 0.001": other}
    merged = merge_identical_edcs(edcs, {"feature norm": "model quality"})
    assert list(merged) == ["model quality = feature norm @ FMR 0.01",
                            "model quality = feature norm @ FMR 0.001"]
    different = {**edcs, "feature norm @ FMR 0.001": same}
    assert len(merge_identical_edcs(different, {"feature norm": "model quality"})) == 3
    assert merge_identical_edcs(edcs, {}) == edcs


def test_edc_plot_draws_ideal_and_random_references():
    from matplotlib.figure import Figure

    from qualiface.eval.quality import theoretical_best_fnmr
    from qualiface.eval.report import IDEAL_LABEL, RANDOM_LABEL, draw_edcs

    fractions, errors = np.array([0.0, 0.1, 0.3, 1.0]), np.array([0.4, 0.35, 0.3, 0.0])
    ax = Figure().subplots()
    draw_edcs(ax, {"q @ FMR 0.01": (fractions, errors)}, "t", references=True)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"q @ FMR 0.01", "_ideal: q @ FMR 0.01", "_random: q @ FMR 0.01",
                          IDEAL_LABEL, RANDOM_LABEL}
    ideal, random = lines["_ideal: q @ FMR 0.01"], lines["_random: q @ FMR 0.01"]
    x = ideal.get_xdata()
    assert x[0] == 0.0 and x[-1] == 0.5
    np.testing.assert_allclose(ideal.get_ydata(), np.maximum(0.4 - x, 0) / (1 - x))
    np.testing.assert_allclose(ideal.get_ydata(), theoretical_best_fnmr(0.4, x))
    np.testing.assert_allclose(random.get_ydata(), [0.4, 0.4])  # random discard: flat
    assert ideal.get_color() == random.get_color() == lines["q @ FMR 0.01"].get_color()
    # The legend lists what one sees: the curve and the two kinds of reference.
    _, legend = ax.get_legend_handles_labels()
    assert legend == ["q @ FMR 0.01", IDEAL_LABEL, RANDOM_LABEL]
    # Without references (multi-panel figures elsewhere): the curves only.
    bare = Figure().subplots()
    draw_edcs(bare, {"q": (fractions, errors)}, "t")
    assert [line.get_label() for line in bare.get_lines()] == ["q"]


def test_theoretical_best_fnmr_reaches_zero_where_the_errors_run_out():
    from qualiface.eval.quality import theoretical_best_fnmr

    np.testing.assert_allclose(theoretical_best_fnmr(0.3, [0.0, 0.1, 0.3, 0.6, 1.0]),
                               [0.3, 0.2 / 0.9, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(theoretical_best_fnmr(1.0, [0.0, 0.5, 1.0]), [1.0, 1.0, 0.0])


@pytest.mark.parametrize("rho, verdict", [(-0.33, "here: tracks degradation"),
                                          (-0.2, "here: tracks it weakly"),
                                          (0.05, "here: does not track it")])
def test_spearman_headline_says_what_good_looks_like(rho, verdict):
    from qualiface.eval.report import headlines

    rows = {h.name: h for h in headlines(_identical_scores_report(rho).metrics)}
    row = rows["Spearman: model quality = feature norm vs degradation severity"]
    assert row.value.startswith(f"{rho:+.3f}")
    assert verdict in row.reading and "more negative is better" in row.reading


def test_headlines_of_other_layouts():
    from qualiface.eval.report import headlines

    assert headlines({"anything": 1}) == []
    names = [h.name for h in headlines({"rank1": 0.61, "rank5": 0.7})]
    assert names == ["rank-1 identification"]
    training = {h.name: h.value for h in headlines(
        {"final": {"acc": 0.9, "loss": 3.0}, "validation": {"val_accuracy": 0.8,
                                                           "val_auc": 0.85}})}
    assert training == {"training accuracy (last logged step)": "90.0%",
                        "held-out verification accuracy": "80.0%",
                        "held-out ROC AUC": "0.850"}
    degraded = headlines({"degraded": {"levels": {"0.5": {"accuracy": 0.9}, "1": {
        "accuracy": 0.7}}, "rank_correlation": {"model quality": {"spearman": -0.5}}}})
    assert [h.value for h in degraded][0] == "0.5: 90.0%, 1: 70.0%"
    assert "tracks degradation" in degraded[1].reading


def test_report_without_summary_or_plots_opens_its_table(tmp_path):
    out = write_report(EvalReport("bare", {"n": 1}), tmp_path / "run")
    html = (out / "report.html").read_text()
    assert "<details open>" in html and "Summary" not in html


def test_roc_legend_carries_the_auc(tmp_path):
    from qualiface.eval.verification import area_under_curve

    report = _base_report()
    out = write_report(report, tmp_path / "run")
    auc = area_under_curve(report.rocs["cosine"])
    curves = json.loads((out / "curves.json").read_text())
    assert curves["roc"]["cosine"]["auc"] == pytest.approx(auc)
    # compare_runs reads it back for its legend.
    from qualiface.eval.report import compare_runs

    compared = compare_runs([out], tmp_path / "compare")
    assert "<details open>" in (compared / "report.html").read_text()


def _figure_recorder(monkeypatch) -> dict:
    """Patch ``Figure.savefig`` to record each saved figure's axes (file name -> axes list)."""
    from matplotlib.figure import Figure

    saved = {}
    original = Figure.savefig

    def recording_savefig(self, fname, *args, **kwargs):
        saved[str(fname).rsplit("/", 1)[-1]] = list(self.axes)
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return saved


def test_line_markers_and_axis_labels(tmp_path, monkeypatch):
    saved = _figure_recorder(monkeypatch)
    steps = np.arange(1, 21)
    write_report(EvalReport(
        "markers", {}, histograms=_identical_scores_report().histograms,
        lines={"training loss": {"x": "step", "y": "loss", "markers": [(10, "norm regulariser on")],
                                 "series": {"total": (steps, 1.0 / steps),
                                            "identity": (steps, 0.5 / steps)}}}),
        tmp_path / "run")
    (ax,) = saved["training_loss.png"]
    assert [t.get_text() for t in ax.texts] == ["norm regulariser on"]
    assert any(list(line.get_xdata()) == [10, 10] for line in ax.get_lines())  # the axvline
    labels = {a.get_title(): a.get_xlabel() for a in saved["quality_hist.png"]}
    pair = "of a pair (the lower of its two images')"
    assert labels == {"pair model quality": f"model quality {pair}",
                      "pair feature norm": f"feature norm {pair}",
                      "model quality by severity": "model quality"}


def test_bad_markers_are_a_clear_error(tmp_path):
    report = EvalReport("t", {}, lines={"loss": {"series": {"a": ([1], [1])},
                                                 "markers": [("x", "label")]}})
    with pytest.raises(EvaluationError, match="markers must be"):
        write_report(report, tmp_path / "run")


def test_training_phase_changes_mark_the_norm_prior_and_eqface_steps():
    from qualiface.train.report import phase_changes

    qcface = [{"kind": "train", "step": s, "loss": 1.0, "phase": "train",
               "norm_phase": float(s >= 6)} for s in (2, 4, 6, 8)]
    assert phase_changes(qcface) == [(6, "norm regulariser on")]
    assert phase_changes(qcface[2:]) == []  # on from the start: nothing switches
    eqface = [{"kind": "train", "step": s, "loss": 1.0, "phase": name, "stage": stage}
              for s, name, stage in ((2, "eqface-1-backbone", 1.0), (4, "eqface-2-branch", 2.0),
                                     (6, "eqface-3-finetune", 3.0))]
    assert phase_changes(eqface) == [(4, "EQFace step 2: quality branch only"),
                                     (6, "EQFace step 3: fine-tune with quality")]
    other = [{"kind": "train", "step": 1, "phase": "a"}, {"kind": "train", "step": 2, "phase": "b"}]
    assert phase_changes(other) == [(2, "phase b")]


def _browser() -> str | None:
    import shutil

    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.mark.skipif(_browser() is None, reason="needs Chromium (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(tmp_path):
    """The documented check (docs/ARCHITECTURE.md): a headless Chromium screenshot."""
    import subprocess

    from PIL import Image

    out = write_report(_identical_scores_report(), tmp_path / "run")
    png = tmp_path / "report.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={png}", "--window-size=1200,1600",
                    (out / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(png).convert("L"))
    assert image.shape == (1600, 1200)
    top = image[:400]  # the title and the summary table: text, not a blank page
    assert (top < 128).mean() > 0.01
