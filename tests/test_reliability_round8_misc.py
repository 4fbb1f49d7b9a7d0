"""Round 8: the rest of round 7's "noticed, left alone" list (embed's rejection log, pair folds
whose images are absent, zero and repeated gallery templates, pipeline options nobody reads).

Each test failed on the code before its fix (see docs/RELIABILITY.md).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.config import ConfigError, load_config, validate_components
from qualiface.infer.io import read_table
from qualiface.infer.model import Model, read_model_spec
from qualiface.infer.search import Gallery, GalleryError, enrol
from qualiface.train.validate import folder_pairs
from test_infer_cli import _write_images
from test_infer_model import make_package, random_images
from test_reliability_round6_infer import _one_line_error, _two_fold_calibration_args, lfw_pairs_text

# -- embed: the rejection log ----------------------------------------------------------------


def test_embed_refuses_a_folder_where_its_rejection_log_goes_before_embedding(tmp_path, monkeypatch):
    """`<out>.rejected.tsv` being a folder gave an IsADirectoryError traceback after every image
    was embedded and the table written."""
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "imgs", random_images(3), ["0.png", "1.png", "2.png"])
    (tmp_path / "e.npz.rejected.tsv").mkdir()

    def not_expected(*args, **kwargs):
        raise AssertionError("embedded images although the log cannot be written")

    monkeypatch.setattr(Model, "embed", not_expected)
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "e.npz"), "--min-quality", "1e9"])
    _one_line_error(result, "e.npz.rejected.tsv", "folder")
    assert not (tmp_path / "e.npz").exists()


def test_a_failed_rejection_log_write_is_one_line_and_keeps_the_table(tmp_path, monkeypatch):
    """A full disk (or any write error) on the log was a traceback; the table it follows is
    written and stays, and the message says so."""
    import qualiface.files as files

    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "imgs", random_images(3), ["0.png", "1.png", "2.png"])
    real = files.write_text_atomic

    def full_disk(path, text, *args, **kwargs):
        if str(path).endswith(".rejected.tsv"):
            raise files.FileWriteError(path, OSError(28, "No space left on device"))
        return real(path, text, *args, **kwargs)

    monkeypatch.setattr(files, "write_text_atomic", full_disk)
    out = tmp_path / "e.npz"
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(out), "--min-quality", "1e9"])
    _one_line_error(result, "e.npz.rejected.tsv", "rejection log", f"the table {out} was written")
    assert len(read_table(out)["ids"]) == 0


# -- pairs: only the folds used need their images --------------------------------------------


def _drop_fold_one_images(lfw_root) -> None:
    for person in range(6):  # fold 1 of _two_fold_calibration_args: P0..P5
        shutil.rmtree(lfw_root / f"P{person}")


def test_calibrate_on_some_folds_needs_only_their_images(tmp_path):
    """`export calibrate --folds 2` refused to start because fold 1's images were missing,
    although it never reads them."""
    args = _two_fold_calibration_args(tmp_path)
    _drop_fold_one_images(tmp_path / "lfw")
    result = CliRunner().invoke(app, [*args, "--folds", "2", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert read_model_spec(tmp_path / "c").calibration.n_pairs == 12
    # A used fold's missing image is still named, before anything is embedded.
    everything = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d")])
    _one_line_error(everything, "P0/P0_0001.jpg", "missing")


def test_validation_on_some_folds_needs_only_their_images(tmp_path):
    """`val.folds: [2]` refused a folder holding fold 2's images but not fold 1's."""
    rng = np.random.default_rng(0)
    people = [f"P{i}" for i in range(8)]
    for name in people[4:]:  # fold 2's people only
        (tmp_path / "lfw" / name).mkdir(parents=True)
        for k in (1, 2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "lfw" / name / f"{name}_{k:04d}.jpg")
    (tmp_path / "pairs.txt").write_text(lfw_pairs_text(people, folds=2))
    pairs = folder_pairs(str(tmp_path / "lfw"), str(tmp_path / "pairs.txt"), [2])
    assert len(pairs.issame) == 8 and pairs.issame.sum() == 4
    with pytest.raises(Exception, match="P0/P0_0001.jpg"):
        folder_pairs(str(tmp_path / "lfw"), str(tmp_path / "pairs.txt"), [])


# -- galleries: one template per id, and every template a direction ---------------------------


def test_enrol_refuses_an_all_zero_template_naming_its_id(tmp_path):
    """An all-zero row was enrolled: it scored 0 against every probe, so it appeared in result
    lists at cosine 0 and, for probes unlike everything, outranked real templates by position."""
    vectors = np.eye(3, 8, dtype=np.float32)
    vectors[1] = 0
    with pytest.raises(GalleryError, match=r"row 1 \(id 'bob'\) is all zeros"):
        enrol(tmp_path / "g", ["alice", "bob", "carol"], vectors)
    assert not (tmp_path / "g" / "gallery.json").exists()
    gallery = Gallery.build(["a", "b"], np.eye(2, 8, dtype=np.float32))
    with pytest.raises(GalleryError, match="query embeddings: row 0 is all zeros"):
        gallery.search(np.zeros((1, 8), np.float32), k=1)


def test_tiny_but_nonzero_features_are_normalised_not_refused():
    """The zero test is on the values, and the norm is taken in float64: 1e-30 squared
    underflows float32 to a zero norm (a NaN template)."""
    vectors = np.full((2, 4), 1e-30, dtype=np.float32)
    vectors[1, 0] = 3e-30
    gallery = Gallery.build(["a", "b"], vectors)
    result = gallery.search(vectors[:1], k=2)
    assert np.isfinite(result.scores).all()
    assert result.ids[0, 0] == "a" and result.scores[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_a_template_id_given_twice_in_one_enrolment_is_refused(tmp_path):
    """Enrolling an id already in the gallery was refused, but the same id twice in one call was
    enrolled as two templates, so a result's id no longer named one template."""
    vectors = np.eye(3, 8, dtype=np.float32)
    with pytest.raises(GalleryError, match="given more than once: alice"):
        enrol(tmp_path / "g", ["alice", "bob", "alice"], vectors)
    with pytest.raises(GalleryError, match="given more than once"):
        Gallery.build(["x", "x"], vectors[:2])


# -- pipeline options the method never reads -------------------------------------------------


@pytest.mark.parametrize("config,override", [
    ("arcface_r50", "pipeline.eqface.branch_epochs=8"),
    ("qcface_r50", "pipeline.qgface.lq_preset=none"),
    ("eqface_r50", "pipeline.qcface.warmup_epochs=5"),
])
def test_options_for_a_method_the_head_does_not_train_are_refused(config, override):
    """`pipeline.eqface.branch_epochs=8` beside an ArcFace head was accepted and had no effect."""
    cfg = load_config(config, [override])
    section = override.split(".")[1]
    with pytest.raises(ConfigError, match=f"pipeline.{section}.* but head .* does not read"):
        validate_components(cfg, source=config)
    # The head's own section, and any section left at its defaults, stay accepted.
    validate_components(load_config(config, []), source=config)


# -- a size mismatch's advice ----------------------------------------------------------------


def test_aligned_faces_for_a_smaller_model_are_not_told_to_align():
    """112x112 aligned faces given to a 64-px model (the demo's) were told "align faces first
    (qualiface align)", which makes 112x112 crops again: advice that cannot help."""
    from qualiface.infer.images import ImageSizeError, as_uint8_batch

    aligned = np.zeros((1, 112, 112, 3), np.uint8)
    with pytest.raises(ImageSizeError, match="model expects 64x64; these look like aligned 112x112 faces") as info:
        as_uint8_batch(aligned, (64, 64))
    assert "qualiface align" not in str(info.value)
    with pytest.raises(ImageSizeError, match=r"align faces first \(qualiface align"):
        as_uint8_batch(np.zeros((1, 100, 90, 3), np.uint8), (112, 112))
    with pytest.raises(ImageSizeError, match="then resize them to 64x64"):
        as_uint8_batch(np.zeros((1, 100, 90, 3), np.uint8), (64, 64))


def test_the_exact_gallery_scores_identical_templates_alike_wherever_they_stand():
    """The exact gallery scored with a float32 matrix product, whose rounding depends on the
    row's place in the BLAS blocking: a template at row 0 and an identical copy at the last row
    scored 1 float32 step apart for one query (-0.05205924 and -0.052059237 in a 71-template
    gallery), so `rank_rates` (ties against the probe) missed the tie. Scores now come from
    `scoring.similarity.similarity_blocks`, like the 1:N evaluation's."""
    rng = np.random.default_rng(0)
    for size in (71, 58, 51, 54, 33):
        vectors = rng.standard_normal((size, 512)).astype(np.float32)
        vectors[-1] = vectors[0]
        gallery = Gallery.build([f"t{i}" for i in range(size)], vectors)
        queries = rng.standard_normal((3, 512)).astype(np.float32)
        for batch in (queries[:1], queries):  # one-query and several-query blocks
            result = gallery.search(batch, k=size)
            for row in range(len(batch)):
                score = dict(zip(result.ids[row], result.scores[row]))
                assert score["t0"] == score[f"t{size - 1}"], (size, len(batch), row)
