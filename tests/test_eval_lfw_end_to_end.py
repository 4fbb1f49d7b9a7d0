"""`qualiface eval lfw` end to end on the real LFW data (skipped without ../shared/data).

A model package is written from a small untrained network (the point is the pipeline: package
loading, decoding the aligned images, feature extraction, protocol folds, metrics, report), and
the command is run exactly as a user would, through the CLI.
"""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from qualiface.backbones import build_backbone
from qualiface.cli import app
from qualiface.heads.quality import NormQuality
from qualiface.infer.model import save_model_package


def test_eval_lfw_runs_end_to_end_on_shared_data(shared_data, tmp_path):
    torch.manual_seed(0)
    kwargs = {"embedding_size": 64, "base_width": 8}
    backbone = build_backbone("iresnet-nano", **kwargs).eval()
    package = save_model_package(tmp_path / "model", backbone=backbone, backbone_name="iresnet-nano",
                                 backbone_kwargs=kwargs, quality_estimator=NormQuality())
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "lfw", "--model", str(package), "--data",
                                      str(shared_data / "lfw"), "--folds", "9,10", "--out", str(out),
                                      "--flip", "none", "--batch-size", "128"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_pairs"] == 1200  # two protocol folds of 300 + 300 pairs
    verification = metrics["verification"]
    assert verification["num_genuine"] == verification["num_impostor"] == 600
    assert 0.0 <= verification["accuracy"] <= 1.0 and 0.0 <= verification["auc"] <= 1.0
    assert len(verification["fold_accuracies"]) == 2  # the protocol's folds, not contiguous ones
    edc = next(iter(metrics["quality"].values()))["fmr_1e-02"]
    assert 0.0 <= edc["pauc_20"] <= 0.2 and edc["num_mated"] == 600
    assert (out / "report.html").stat().st_size > 1000
    assert list(out.glob("*.png")), "the report has no plots"
    html = (out / "report.html").read_text()
    assert "roc" in html.lower()
