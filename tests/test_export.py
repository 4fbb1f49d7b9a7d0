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
    return session.run(["embedding", "norm", "quality"], {"input": x.numpy()})


def test_fp32_export_matches_pytorch_for_any_batch_size(tmp_path):
    make_package(tmp_path / "pkg")
    model = Model.load(tmp_path / "pkg")
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.passed and report.max_abs_diff_embedding <= 1e-3 and report.max_abs_diff_quality <= 1e-3
    # An independent check at a batch size the export never saw (dynamic batch axis).
    images = random_images(7, seed=5)
    embedding, norm, quality = _run(tmp_path / "m.onnx", model.preprocess(images))
    ref = model.finish(*model.embed(images))
    assert embedding.shape == (7, 16) and norm.shape == quality.shape == (7,)
    np.testing.assert_allclose(embedding, ref.embeddings.numpy(), atol=1e-4)
    np.testing.assert_allclose(norm, ref.norms.numpy(), rtol=1e-4)
    np.testing.assert_allclose(quality, ref.quality.numpy(), atol=1e-4)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    stored = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(stored[MODEL_JSON_KEY])["quality"]["kind"] == "eqface"


def test_fp16_export_keeps_float32_io_and_is_close(tmp_path):
    make_package(tmp_path / "pkg", quality="norm")
    model = Model.load(tmp_path / "pkg")
    export_onnx(model, tmp_path / "h.onnx", fp16=True)
    images = random_images(3, seed=9)
    embedding, norm, quality = _run(tmp_path / "h.onnx", model.preprocess(images))
    ref = model.finish(*model.embed(images))
    assert embedding.dtype == np.float32
    np.testing.assert_allclose(embedding, ref.embeddings.numpy(), atol=1e-2)  # unit vectors
    np.testing.assert_allclose(norm, ref.norms.numpy(), rtol=1e-2)
    np.testing.assert_allclose(quality, ref.quality.numpy(), rtol=1e-2)


def test_unknown_exporter_is_rejected(tmp_path):
    make_package(tmp_path / "pkg")
    with pytest.raises(ExportError, match="unknown exporter"):
        export_onnx(Model.load(tmp_path / "pkg"), tmp_path / "m.onnx", exporter="magic")


@pytest.mark.parametrize("target", ["model.json", "weights.safetensors", "folder"])
def test_export_never_replaces_a_package_file_or_a_folder(tmp_path, target):
    """``export onnx --out pkg/model.json`` replaced the package's own file with the graph; a
    folder failed only after the whole export, naming the temporary file."""
    make_package(tmp_path / "pkg")
    out = tmp_path / "pkg" / target if target != "folder" else tmp_path / "pkg"
    before = {p.name: p.read_bytes() for p in (tmp_path / "pkg").iterdir()}
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "pkg"), "--out", str(out)])
    assert result.exit_code == 1
    assert ("is a folder" if target == "folder" else "is not an .onnx file") in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "pkg").iterdir()} == before


@pytest.mark.parametrize("opset", [3, 9, 99])
def test_an_opset_outside_the_supported_range_is_one_line_and_writes_nothing(tmp_path, capfd, opset):
    # opset 9 made torch print its whole IR graph before failing on IResNet's strided slice.
    from qualiface.infer.export import MIN_OPSET, supported_opsets

    make_package(tmp_path / "pkg")
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "m.onnx"), "--opset", str(opset)])
    newest = supported_opsets().stop - 1
    assert result.exit_code == 1
    assert f"opset {opset} is not supported: use {MIN_OPSET} to {newest}" in result.output.replace("\n", " ")
    assert "graph(" not in result.output + capfd.readouterr().err
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))


def test_the_lowest_supported_opset_exports_and_verifies(tmp_path):
    from qualiface.infer.export import MIN_OPSET

    make_package(tmp_path / "pkg")
    report = export_onnx(Model.load(tmp_path / "pkg"), tmp_path / "m.onnx", opset=MIN_OPSET)
    assert report.passed and report.opset == MIN_OPSET


def test_cli_reports_max_abs_diff(tmp_path):
    make_package(tmp_path / "pkg")
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "pkg"), "--out", str(tmp_path / "c.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.onnx").exists()
    missing = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")])
    assert missing.exit_code == 1 and "model.json: missing" in missing.output.replace("\n", "")


def test_onnx_outputs_what_embed_writes(tmp_path):
    import cv2

    from qualiface.infer.io import read_table

    make_package(tmp_path / "pkg", quality="norm")
    images = random_images(4, seed=3)
    (tmp_path / "faces").mkdir()
    for i, image in enumerate(images):
        cv2.imwrite(str(tmp_path / "faces" / f"{i}.png"), image.permute(1, 2, 0).numpy()[:, :, ::-1])
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "faces"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "e.npz")])
    assert result.exit_code == 0, result.output
    table = read_table(tmp_path / "e.npz")
    order = np.argsort(table["ids"])
    model = Model.load(tmp_path / "pkg")
    export_onnx(model, tmp_path / "m.onnx")
    embedding, norm, quality = _run(tmp_path / "m.onnx", model.preprocess(images))
    # embed writes unit-norm embeddings plus the raw norm; the ONNX graph outputs the same three
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedding, table["embeddings"][order], atol=1e-4)
    np.testing.assert_allclose(norm, table["norms"][order], rtol=1e-4)
    np.testing.assert_allclose(quality, table["quality"][order], rtol=1e-4, atol=1e-5)


def test_onnx_metadata_states_the_input_conventions_and_the_cli_prints_them(tmp_path):
    import dataclasses

    from qualiface.infer.model import read_model_spec, write_model_spec

    make_package(tmp_path / "pkg")
    spec = read_model_spec(tmp_path / "pkg")
    write_model_spec(tmp_path / "pkg", dataclasses.replace(spec, channel_order="BGR", mean=(0.4, 0.45, 0.5),
                                                           std=(0.2, 0.25, 0.3)))
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert stored["qualiface.input.channel_order"] == "BGR"
    assert json.loads(stored["qualiface.input.mean"]) == [0.4, 0.45, 0.5]
    assert json.loads(stored["qualiface.input.std"]) == [0.2, 0.25, 0.3]
    assert "(pixel / 255 - mean) / std" in stored["qualiface.input.normalisation"]
    assert "L2-normalised" in stored["qualiface.output.embedding"]
    printed = " ".join(result.output.split())
    assert "qualiface.input.channel_order: BGR" in printed and "qualiface.input.mean: [0.4, 0.45, 0.5]" in printed
    assert "qualiface.output.embedding: float32 (B, 16) L2-normalised" in printed
