"""Round 7 audit of inference (gallery, embed, calibrate, ONNX export) for silent wrong
results and lost work, against independent computations.

Each test failed on the code before its fix (see docs/RELIABILITY.md for the earlier rounds).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qualiface.backbones import build_backbone
from qualiface.cli import app
from qualiface.heads.quality import QCFaceQuality
from qualiface.infer.io import read_table, write_table
from qualiface.infer.model import Model, save_model_package
from qualiface.infer.search import Gallery
from test_infer_cli import _calibrate_args, _write_images
from test_infer_model import TINY_KWARGS, make_package, random_images
from test_reliability_round6_infer import _one_line_error


def _never_embed(monkeypatch, why: str) -> None:
    def not_expected(*args, **kwargs):
        raise AssertionError(f"embedded images although {why}")

    monkeypatch.setattr(Model, "embed", not_expected)


def _table(path, names, seed=0, d=8):
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((len(names), d)).astype(np.float32)
    norms = np.linalg.norm(raw, axis=1)
    write_table(path, {"ids": np.array(names), "embeddings": raw / norms[:, None], "norms": norms,
                       "quality": rng.uniform(0.2, 1.0, len(names)).astype(np.float32)})
    return raw


# -- gallery ----------------------------------------------------------------------------------

def test_enrol_into_a_folder_holding_tables_deletes_none_of_them(tmp_path):
    """The clean-up after a save deleted every ``gallery-*.npz`` and ``gallery.npz`` in the
    folder: ``search enrol gallery.npz -g .`` deleted the table it had just enrolled, and
    ``gallery-faces.npz`` beside it."""
    names = ["alice/1.jpg", "alice/2.jpg", "bob/1.jpg"]
    raw = _table(tmp_path / "gallery.npz", names)
    _table(tmp_path / "gallery-faces.npz", names, seed=1)
    before = {name: (tmp_path / name).read_bytes() for name in ("gallery.npz", "gallery-faces.npz")}
    runner = CliRunner()
    for table, extra in (("gallery.npz", []), ("gallery-faces.npz", ["--replace"])):
        result = runner.invoke(app, ["search", "enrol", str(tmp_path / table), "-g", str(tmp_path), *extra])
        assert result.exit_code == 0, result.output
        assert {name: (tmp_path / name).read_bytes() for name in before} == before
    # the replaced gallery's own data file did go: one arrays file, the current one
    own = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("gallery-") and p.name != "gallery-faces.npz")
    assert len(own) == 1
    # and the first enrolment was right: alice = normalised mean of her quality-weighted units
    table = read_table(tmp_path / "gallery.npz")
    result = runner.invoke(app, ["search", "enrol", str(tmp_path / "gallery.npz"), "-g", str(tmp_path / "g2")])
    assert result.exit_code == 0, result.output
    gallery = Gallery.load(tmp_path / "g2")
    units, quality = raw / np.linalg.norm(raw, axis=1, keepdims=True), table["quality"]
    alice = quality[0] * units[0] + quality[1] * units[1]
    row = gallery.ids.tolist().index("alice")
    np.testing.assert_allclose(gallery.embeddings[row], alice / np.linalg.norm(alice), atol=1e-6)


def test_query_and_aggregate_refuse_an_out_naming_their_input(tmp_path):
    """``search query e.npz --out e.npz`` replaced the probe embeddings with the results (ids,
    match_ids, scores), exit 0; ``search aggregate f.npz --out f.npz`` the per-frame table."""
    _table(tmp_path / "e.npz", ["alice/1.jpg", "bob/1.jpg", "carol/1.jpg"])
    rng = np.random.default_rng(4)
    write_table(tmp_path / "f.npz", {"track_ids": np.array([0, 0, 1]),
                                     "embeddings": rng.standard_normal((3, 8)).astype(np.float32),
                                     "quality": np.array([0.5, 0.9, 0.7], np.float32)})
    runner = CliRunner()
    assert runner.invoke(app, ["search", "enrol", str(tmp_path / "e.npz"), "-g", str(tmp_path / "g")]).exit_code == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("e.npz", "f.npz")}
    query = runner.invoke(app, ["search", "query", str(tmp_path / "e.npz"), "-g", str(tmp_path / "g"),
                                "--out", str(tmp_path / "." / "e.npz")])
    _one_line_error(query, "e.npz", "is the probe table being read")
    frames = runner.invoke(app, ["search", "aggregate", str(tmp_path / "f.npz"), "--out", str(tmp_path / "f.npz")])
    _one_line_error(frames, "f.npz", "is the per-frame table being read")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


# -- embed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, message", [("emb.npy", "exists and is not a folder"),
                                          ("e.parquet", "needs pyarrow")])
def test_embed_refuses_an_out_it_cannot_write_before_embedding(tmp_path, monkeypatch, out, message):
    """Two destinations failed only once every image was embedded: a path without .npz /
    .parquet (a folder of .npy columns) that is an existing file (``--out emb.npy``), and a
    .parquet without pyarrow (an optional dependency: an ImportError traceback)."""
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "imgs", random_images(2), ["a.png", "b.png"])
    (tmp_path / "emb.npy").write_bytes(b"someone's array")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    _never_embed(monkeypatch, "the output cannot be written")
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / out)])
    _one_line_error(result, out, message)
    assert (tmp_path / "emb.npy").read_bytes() == b"someone's array"
    assert not (tmp_path / "e.parquet").exists()


def test_embed_refuses_a_nan_min_quality_before_embedding(tmp_path, monkeypatch):
    # Was: every face embedded, then every face rejected ("quality >= nan" is never true).
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "imgs", random_images(2), ["a.png", "b.png"])
    _never_embed(monkeypatch, "--min-quality nan cannot keep any face")
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "e.npz"), "--min-quality", "nan"])
    _one_line_error(result, "--min-quality", "finite number")
    assert not (tmp_path / "e.npz").exists()


# -- calibrate --------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (["--method", "isotonc", "--fmr", "0.1"], "unknown calibration method 'isotonc'"),
    (["--fmr", "2"], "FMR must lie strictly between 0 and 1, got 2"),
    # 12 impostor pairs: an FMR of 1 % allows no false match at all
    (["--fmr", "0.01"], "calibration: FMR 0.01 is not measurable with 12 impostor pairs"),
])
def test_calibrate_refuses_what_the_labels_decide_before_embedding(tmp_path, monkeypatch, options, message):
    """A --method typo, --fmr 2 or an FMR the pairs cannot measure failed only after every
    image was embedded (the last named the EDC, not the calibration)."""
    args = _calibrate_args(tmp_path)
    _never_embed(monkeypatch, "the options cannot be fitted")
    result = CliRunner().invoke(app, [*args, *options, "--out", str(tmp_path / "c")])
    _one_line_error(result, message)
    assert not (tmp_path / "c").exists()


# -- ONNX export ------------------------------------------------------------------------------

def _qcface_package(path, target_norm: float):
    """A tiny package with a QCFace quality whose embeddings have norms near ``target_norm``
    (QCFace's target norms run up to ~100; a trained one exported here has norms ~81)."""
    torch.manual_seed(0)
    backbone = build_backbone("iresnet-nano", **TINY_KWARGS)
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(8, 3, 32, 32))
    backbone.eval()
    x = (random_images(8).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        spread = backbone(x) - backbone.features.bias  # the part the running variance scales
        scale = target_norm / float(spread.norm(dim=1).mean())
        backbone.features.running_var.add_(backbone.features.eps).div_(scale**2).sub_(backbone.features.eps)
        assert bool((backbone.features.running_var > 0).all())
    save_model_package(path, backbone=backbone, backbone_name="iresnet-nano", backbone_kwargs=TINY_KWARGS,
                       quality_estimator=QCFaceQuality(), head_name="qcface")


@pytest.mark.parametrize("broken", ["embedding", "quality"])
def test_fp16_export_holds_each_output_to_its_own_tolerance(tmp_path, monkeypatch, broken):
    """One tolerance, 1 % of the largest output (the norm, ~50 here), was applied to all three:
    a graph whose unit-norm embedding or [0, 1] quality was wrong by ~0.2 passed."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    import qualiface.infer.export as export

    _qcface_package(tmp_path / "pkg", target_norm=50.0)
    model = Model.load(tmp_path / "pkg")
    images = random_images(4, seed=7)
    reference = model.finish(*model.embed(images))
    assert 30 < float(reference.norms.mean()) < 80  # the norm dominates the old single scale
    good = export.export_onnx(model, tmp_path / "good.onnx", fp16=True)  # a faithful graph passes
    assert good.passed

    real_export = export._export

    class Wrong(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            embedding, norm, quality = self.inner(x)
            if broken == "embedding":
                embedding = torch.nn.functional.normalize(embedding + 0.4 * embedding.roll(1, dims=1), dim=1)
            else:
                quality = 0.6 * quality
            return embedding, norm, quality

    monkeypatch.setattr(export, "_export", lambda module, *rest: real_export(Wrong(module), *rest))
    # The broken graph really disagrees with PyTorch: checked here without the exporter's rule.
    wrong = Wrong(export._EmbedOutputs(export._Float16Wrapper(model.module))).eval()
    real_export(wrong, model.preprocess(images), tmp_path / "look.onnx", 17, "torchscript")
    outputs = ort.InferenceSession(str(tmp_path / "look.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": model.preprocess(images).numpy()})
    column = {"embedding": (0, reference.embeddings), "quality": (2, reference.quality)}[broken]
    assert np.abs(outputs[column[0]] - column[1].numpy()).max() > 0.1
    with pytest.raises(export.ExportError, match="disagrees"):
        export.export_onnx(model, tmp_path / "bad.onnx", fp16=True)
    assert not (tmp_path / "bad.onnx").exists()


def test_export_without_onnxruntime_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """The graph was exported, then verification hit ``import onnxruntime``: a traceback."""
    make_package(tmp_path / "pkg")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(tmp_path / "pkg"), "--out",
                                      str(tmp_path / "m.onnx")])
    _one_line_error(result, "needs onnx and onnxruntime", "qualiface[onnx]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_nan_probe_row_is_named_with_its_table_and_row(tmp_path):
    # Was: "query embeddings contains NaN or infinite values": neither the file nor the row.
    rng = np.random.default_rng(0)
    write_table(tmp_path / "g.npz", {"ids": np.array(["a", "b"]), "embeddings": rng.normal(size=(2, 4)).astype(np.float32)})
    probes = rng.normal(size=(3, 4)).astype(np.float32)
    probes[2, 1] = np.nan
    write_table(tmp_path / "p.npz", {"ids": np.array(["x", "y", "z"]), "embeddings": probes})
    runner = CliRunner()
    assert runner.invoke(app, ["search", "enrol", str(tmp_path / "g.npz"), "-g", str(tmp_path / "g"),
                               "--mode", "mean"]).exit_code == 0
    result = runner.invoke(app, ["search", "query", str(tmp_path / "p.npz"), "-g", str(tmp_path / "g")])
    assert result.exit_code != 0
    assert "p.npz" in result.output and "row 2 contains NaN" in result.output


def test_qwfa_with_a_nan_quality_names_the_image_not_a_misleading_minimum():
    # Was: "needs finite qualities >= 0 (min 1)" for qualities [nan, 1] (nanmin skipped the NaN).
    from qualiface.errors import QualifaceError
    from qualiface.scoring.aggregation import aggregate_templates

    with pytest.raises(QualifaceError, match="image 0 has nan"):
        aggregate_templates(np.eye(2), np.array([0, 0]), quality=np.array([np.nan, 1.0]), mode="qwfa")
