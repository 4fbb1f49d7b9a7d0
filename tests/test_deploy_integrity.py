"""Deployment integrity: what a package or an export says must be what it computes.

- a ``model.json`` whose ``input.size`` disagrees with the backbone is refused (stride-2
  convolutions round, so smaller images would otherwise run through the net without error);
- re-saving a package over an old one never leaves new weights under the old ``model.json``;
- a failed ONNX export or verification leaves the previous file alone and nothing new behind;
- a stored logistic calibration must be increasing, like the isotonic one.
"""

from __future__ import annotations

import json

import pytest
import torch

import qualiface.package.io as package_io
from qualiface.backbones import build_backbone
from qualiface.files import FileWriteError
from qualiface.heads.quality import NormQuality
from qualiface.infer.model import Model, ModelPackageError, save_model_package
from qualiface.package.calibration import CalibrationError, QualityCalibration
from test_infer_model import TINY_KWARGS, make_package, random_images


def test_input_size_that_disagrees_with_the_backbone_is_refused_at_load(tmp_path):
    make_package(tmp_path / "pkg")
    path = tmp_path / "pkg" / "model.json"
    document = json.loads(path.read_text())
    document["input"]["size"] = [28, 28]  # the backbone is built for 32x32
    path.write_text(json.dumps(document))
    with pytest.raises(ModelPackageError, match=r"model\.json: 'input\.size': input size \[28, 28\] disagrees.*32x32"):
        Model.load(tmp_path / "pkg")


def test_save_refuses_an_input_size_the_backbone_was_not_built_for(tmp_path):
    backbone = build_backbone("iresnet-nano", **TINY_KWARGS).eval()
    with pytest.raises(ValueError, match=r"pkg: input size \[28, 28\] disagrees.*32x32"):
        save_model_package(tmp_path / "pkg", backbone=backbone, backbone_name="iresnet-nano",
                           backbone_kwargs=TINY_KWARGS, quality_estimator=NormQuality(),
                           input_size=(28, 28))
    assert not (tmp_path / "pkg" / "model.json").exists()


def test_resaving_over_a_package_never_pairs_new_weights_with_the_old_model_json(tmp_path, monkeypatch):
    calibration = QualityCalibration(method="logistic", fmr=0.01, threshold=0.3, coef=5.0, intercept=-2.0)
    make_package(tmp_path / "pkg", seed=0, calibration=calibration)

    def disk_full(path, text, **kwargs):
        raise FileWriteError(path, OSError(28, "No space left on device"))

    monkeypatch.setattr(package_io, "write_text_atomic", disk_full)
    with pytest.raises(FileWriteError):
        make_package(tmp_path / "pkg", seed=1)  # new weights land, the new model.json does not
    monkeypatch.undo()
    # Before the fix the old model.json (with its calibration) described the new weights and
    # the package loaded silently; now the folder is plainly not a package.
    with pytest.raises(ModelPackageError, match="model.json: missing"):
        Model.load(tmp_path / "pkg")


def test_resaving_when_the_weights_write_fails_keeps_the_old_package(tmp_path, monkeypatch):
    make_package(tmp_path / "pkg", seed=0)
    before = Model.load(tmp_path / "pkg").embed(random_images(2))[0]

    def fail_write(handle, data=None):
        raise OSError(28, "No space left on device")

    real = package_io.atomic_write
    monkeypatch.setattr(package_io, "atomic_write",
                        lambda path, write, **kw: real(path, fail_write, **kw))
    with pytest.raises(FileWriteError):
        make_package(tmp_path / "pkg", seed=1)
    monkeypatch.undo()
    assert torch.equal(Model.load(tmp_path / "pkg").embed(random_images(2))[0], before)


def test_failed_onnx_verification_keeps_the_previous_export_and_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import qualiface.infer.export as export

    make_package(tmp_path / "a", seed=0)
    make_package(tmp_path / "b", seed=1)
    out = tmp_path / "onnx" / "model.onnx"
    export.export_onnx(Model.load(tmp_path / "a"), out)
    verified = out.read_bytes()
    monkeypatch.setattr(export, "compare_with_onnxruntime", lambda *a, **k: (1.0, 1.0, 1.0))
    with pytest.raises(export.ExportError, match="disagrees"):
        export.export_onnx(Model.load(tmp_path / "b"), out)
    assert out.read_bytes() == verified
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]


def test_crashing_exporter_leaves_no_half_written_file(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    import qualiface.infer.export as export

    make_package(tmp_path / "pkg")

    def crash(module, example, path, opset, exporter):
        path.write_bytes(b"half an onnx file")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export, "_export", crash)
    with pytest.raises(export.ExportError, match="exporter crashed"):
        export.export_onnx(Model.load(tmp_path / "pkg"), tmp_path / "out" / "m.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_decreasing_logistic_calibration_is_refused():
    stored = {"method": "logistic", "fmr": 0.01, "threshold": 0.3, "coef": -5.0, "intercept": 2.0}
    with pytest.raises(CalibrationError, match="coef must be >= 0"):
        QualityCalibration.from_dict(stored)
    flat = QualityCalibration.from_dict({**stored, "coef": 0.0})
    assert flat.apply([0.0, 1.0])[0] == flat.apply([0.0, 1.0])[1]


def test_npy_folder_table_never_keeps_a_stale_column_from_an_earlier_table(tmp_path):
    import numpy as np

    from qualiface.infer.io import TableError, read_table, write_table

    ids = np.array(["a", "b", "c"])
    write_table(tmp_path / "out", {"ids": ids, "quality": np.array([1.0, 2.0, 3.0]),
                                   "quality_calibrated": np.array([0.1, 0.2, 0.3])})
    # The same images embedded again by a model without calibration: before the fix the old
    # quality_calibrated.npy stayed and was read back next to the new quality.
    with pytest.raises(TableError, match="quality_calibrated.npy"):
        write_table(tmp_path / "out", {"ids": ids, "quality": np.array([7.0, 8.0, 9.0])})
    assert read_table(tmp_path / "out")["quality"].tolist() == [1.0, 2.0, 3.0]  # left as it was
    # Rewriting the same columns still replaces them.
    write_table(tmp_path / "out", {"ids": ids, "quality": np.array([4.0, 5.0, 6.0]),
                                   "quality_calibrated": np.array([0.4, 0.5, 0.6])})
    assert read_table(tmp_path / "out")["quality"].tolist() == [4.0, 5.0, 6.0]


def test_calibrating_on_an_underflowed_quality_keeps_the_package_loadable(tmp_path):
    import numpy as np

    from qualiface.infer.calibrate import calibrate_from_pairs
    from qualiface.package.io import write_model_spec

    make_package(tmp_path / "pkg")
    model = Model.load(tmp_path / "pkg")
    rng = np.random.default_rng(0)
    n = 400
    issame = np.arange(n) % 2 == 0
    e1 = rng.normal(size=(n, 8))
    e2 = np.where(issame[:, None], e1 + 0.5 * rng.normal(size=(n, 8)), rng.normal(size=(n, 8)))
    q1 = rng.uniform(0, 1, n).astype(np.float32)
    q2 = rng.uniform(0, 1, n).astype(np.float32)
    q1[0] = torch.sigmoid(torch.tensor(-88.0)).item()  # an EQFace score that underflowed: 6e-39
    assert 0 < q1[0] < np.finfo(np.float32).tiny
    model.spec.calibration = calibrate_from_pairs(e1, e2, q1, q2, issame, fmr=0.01)
    write_model_spec(tmp_path / "pkg", model.spec)  # what 'export calibrate' does in place
    assert Model.load(tmp_path / "pkg").calibration is not None  # before the fix: "denormal ... corrupt"


def test_write_model_spec_never_replaces_model_json_by_one_it_cannot_read(tmp_path):
    from qualiface.package.io import write_model_spec

    make_package(tmp_path / "pkg")
    before = (tmp_path / "pkg" / "model.json").read_text()
    spec = Model.load(tmp_path / "pkg").spec
    spec.calibration = QualityCalibration(method="isotonic", fmr=0.01, threshold=0.3,
                                          x=[6e-39, 0.5], y=[0.2, 0.9])
    with pytest.raises(ModelPackageError, match="denormal"):
        write_model_spec(tmp_path / "pkg", spec)
    assert (tmp_path / "pkg" / "model.json").read_text() == before
    Model.load(tmp_path / "pkg")
