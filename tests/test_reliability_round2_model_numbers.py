"""Model package numbers: non-finite / denormal / out-of-range model.json values, relabelled
safetensors dtypes and NaN weights are refused at load; `embed` and `export` refuse NaN outputs.

Each case once made `embed` write NaN (or identical) embeddings and exit 0.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.model import FORMAT_NAME, Model, ModelPackageError, NonFiniteOutputError
from test_infer_cli import _write_images
from test_infer_model import make_package, random_images


def _edit_json_text(package, old: str, new: str) -> None:
    """Replace text in model.json (NaN / Infinity cannot be produced by json.dumps edits)."""
    spec = package / "model.json"
    text = spec.read_text()
    assert old in text
    spec.write_text(text.replace(old, new, 1))


def _one_line(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize("value, field", [
    ("Infinity", "input.std[1]"),
    ("NaN", "input.std[1]"),
    ("-Infinity", "input.std[1]"),
    ("1e999", "input.std[1]"),       # parses to inf
    ("1e-310", "input.std[1]"),      # denormal
    ("1e-30", "input.std"),          # tiny but normal: out of range, still Inf pixels
    ("127.5", "input.std"),
])
def test_bad_input_std_is_refused_naming_file_and_field(tmp_path, value, field):
    make_package(tmp_path / "pkg", quality="norm")
    _edit_json_text(tmp_path / "pkg", '"std": [\n      0.5,\n      0.5', f'"std": [\n      0.5,\n      {value}')
    with pytest.raises(ModelPackageError, match="model.json") as info:
        Model.load(tmp_path / "pkg")
    assert f"'{field}" in str(info.value)


@pytest.mark.parametrize("value, field", [
    ("NaN", "input.mean[0]"), ("Infinity", "input.mean[0]"), ("1e-320", "input.mean[0]"),
    ("127.5", "input.mean"), ("-0.5", "input.mean"),
])
def test_bad_input_mean_is_refused_naming_file_and_field(tmp_path, value, field):
    make_package(tmp_path / "pkg", quality="norm")
    _edit_json_text(tmp_path / "pkg", '"mean": [\n      0.5', f'"mean": [\n      {value}')
    with pytest.raises(ModelPackageError, match="model.json") as info:
        Model.load(tmp_path / "pkg")
    assert f"'{field}" in str(info.value)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["quality"].update(range=[0.0, "__NAN__"]), "quality.range[1]"),
    (lambda d: d["quality"].update(range=[1.0, 0.0]), "quality.range"),
    (lambda d: d["quality"]["config"].update(hidden="__INF__"), "quality.config.hidden"),
    (lambda d: d["metadata"].update(epochs="__NAN__"), "metadata.epochs"),
    (lambda d: d["backbone"]["kwargs"].update(base_width=10**30), "backbone.kwargs.base_width"),
    (lambda d: d["metadata"].update(seed=2**70), "metadata.seed"),
])
def test_any_other_non_finite_or_out_of_range_number_is_refused(tmp_path, edit, field):
    make_package(tmp_path / "pkg")
    spec = tmp_path / "pkg" / "model.json"
    data = json.loads(spec.read_text())
    edit(data)
    text = json.dumps(data).replace('"__NAN__"', "NaN").replace('"__INF__"', "Infinity")
    spec.write_text(text)
    with pytest.raises(ModelPackageError, match="model.json") as info:
        Model.load(tmp_path / "pkg")
    assert f"'{field}'" in str(info.value)


def test_calibration_numbers_must_be_finite(tmp_path):
    make_package(tmp_path / "pkg")
    spec = tmp_path / "pkg" / "model.json"
    data = json.loads(spec.read_text())
    data["calibration"] = {"method": "logistic", "threshold": "__NAN__"}
    spec.write_text(json.dumps(data).replace('"__NAN__"', "NaN"))
    with pytest.raises(ModelPackageError, match=r"model.json: 'calibration.threshold' must be a finite"):
        Model.load(tmp_path / "pkg")


def test_embed_cli_refuses_infinite_std_in_one_line(tmp_path):
    make_package(tmp_path / "pkg", quality="norm")
    _edit_json_text(tmp_path / "pkg", '"std": [\n      0.5', '"std": [\n      Infinity')
    _write_images(tmp_path / "imgs", random_images(2), ["a.png", "b.png"])
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "out.npz")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "model.json: 'input.std[0]' must be a finite number" in _one_line(result.output)
    assert not (tmp_path / "out.npz").exists()


def _relabel(weights, name: str, old: str, new: str) -> None:
    """Change one tensor's dtype in the safetensors header, leaving the bytes (same size) alone."""
    blob = weights.read_bytes()
    size = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + size])
    assert header[name]["dtype"] == old
    header[name]["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (size - len(text))
    assert len(text) == size
    weights.write_bytes(blob[:8] + text + blob[8 + size :])


@pytest.mark.parametrize("name, old, new, expects", [
    ("backbone.fc.weight", "F32", "I32", "float32"),
    ("quality.layers.0.weight", "F32", "I32", "float32"),
    ("backbone.bn1.num_batches_tracked", "I64", "F64", "int64"),
])
def test_relabelled_safetensors_dtype_is_refused(tmp_path, name, old, new, expects):
    make_package(tmp_path / "pkg")
    weights = tmp_path / "pkg" / "weights.safetensors"
    if name not in load_file(str(weights)):
        pytest.skip(f"{name} not in this architecture")
    _relabel(weights, name, old, new)
    with pytest.raises(ModelPackageError, match="weights.safetensors") as info:
        Model.load(tmp_path / "pkg")
    message = str(info.value)
    assert f"'{name}'" in message and "dtype" in message and expects in message


def _scale_tensor(package, name: str, factor: float) -> None:
    weights = package / "weights.safetensors"
    tensors = load_file(str(weights))
    tensors[name] = tensors[name] * factor
    save_file(tensors, str(weights), metadata={"format": FORMAT_NAME})


def test_nan_weights_are_refused_at_load_naming_the_tensor(tmp_path):
    make_package(tmp_path / "pkg")
    _scale_tensor(tmp_path / "pkg", "backbone.fc.weight", float("nan"))
    with pytest.raises(ModelPackageError, match=r"weights.safetensors: tensor 'backbone.fc.weight' holds NaN"):
        Model.load(tmp_path / "pkg")


def test_embed_refuses_non_finite_outputs(tmp_path):
    """Finite but huge weights overflow float32 at run time: an error, never NaN rows."""
    make_package(tmp_path / "pkg", quality="norm")
    _scale_tensor(tmp_path / "pkg", "backbone.fc.weight", 1e38)
    model = Model.load(tmp_path / "pkg")
    with pytest.raises(NonFiniteOutputError, match="non-finite") as info:
        model.embed(random_images(3))
    assert info.value.index == 0 and "image 0" in str(info.value)

    _write_images(tmp_path / "imgs", random_images(2), ["a.png", "b.png"])
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "out.npz")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = _one_line(result.output)
    assert "error: a.png: model" in line and "non-finite" in line and "pkg" in line
    assert not (tmp_path / "out.npz").exists()


def test_export_refuses_non_finite_outputs_and_writes_nothing(tmp_path):
    pytest.importorskip("onnx")
    make_package(tmp_path / "pkg", quality="norm")
    _scale_tensor(tmp_path / "pkg", "backbone.fc.weight", 1e38)
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = _one_line(result.output)
    assert "error:" in line and "pkg" in line and "non-finite" in line and "refusing to export" in line
    assert not (tmp_path / "m.onnx").exists()
