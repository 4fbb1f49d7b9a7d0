"""ONNX export: onnxruntime reproduces PyTorch (fp32 within 1e-3, fp16 loosely), dynamic batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.export import MODEL_JSON_KEY, ExportError, export_onnx
from qualiface.infer.model import Model
from test_infer_model import make_package, random_images

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _run(path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding", "quality"], {"input": x.numpy()})


def test_fp32_export_matches_pytorch_for_any_batch_size(tmp_path):
    make_package(tmp_path / "pkg")
    model = Model.load(tmp_path / "pkg")
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.passed and report.max_abs_diff_embedding <= 1e-3 and report.max_abs_diff_quality <= 1e-3
    # An independent check at a batch size the export never saw (dynamic batch axis).
    images = random_images(7, seed=5)
    embedding, quality = _run(tmp_path / "m.onnx", model.preprocess(images))
    ref_embedding, ref_quality = model.embed(images)
    assert embedding.shape == (7, 16) and quality.shape == (7,)
    np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-4)
    np.testing.assert_allclose(quality, ref_quality.numpy(), atol=1e-4)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    stored = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(stored[MODEL_JSON_KEY])["quality"]["kind"] == "eqface"


def test_fp16_export_keeps_float32_io_and_is_close(tmp_path):
    make_package(tmp_path / "pkg", quality="norm")
    model = Model.load(tmp_path / "pkg")
    export_onnx(model, tmp_path / "h.onnx", fp16=True)
    images = random_images(3, seed=9)
    embedding, quality = _run(tmp_path / "h.onnx", model.preprocess(images))
    ref_embedding, ref_quality = model.embed(images)
    assert embedding.dtype == np.float32
    scale = float(ref_embedding.abs().max())
    np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-2 * scale)
    np.testing.assert_allclose(quality, ref_quality.numpy(), rtol=1e-2)


def test_unknown_exporter_is_rejected(tmp_path):
    make_package(tmp_path / "pkg")
    with pytest.raises(ExportError, match="unknown exporter"):
        export_onnx(Model.load(tmp_path / "pkg"), tmp_path / "m.onnx", exporter="magic")


def test_cli_reports_max_abs_diff(tmp_path):
    make_package(tmp_path / "pkg")
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "pkg"), "--out", str(tmp_path / "c.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.onnx").exists()
    missing = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")])
    assert missing.exit_code == 1 and "model.json: missing" in missing.output.replace("\n", "")
