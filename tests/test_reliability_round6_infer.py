"""Round 6 audit of inference, packages and their CLIs against independent computations.

Each test failed on the code before its fix (see docs/RELIABILITY.md for the earlier rounds).
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.io import TableError, read_table, write_table
from qualiface.infer.model import Model, read_model_spec
from qualiface.package.calibration import CalibrationError, QualityCalibration
from test_infer_cli import _write_images
from test_infer_model import make_package, random_images


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)


# -- embed -----------------------------------------------------------------------------------


def test_embed_of_overlapping_inputs_embeds_each_image_once(tmp_path):
    """A file also inside a folder given, or a folder inside another one given: before, those
    images were embedded twice (5 rows with 'alice/1.png' twice from 4 images), so `search
    enrol` weighted them double in their identity's template."""
    make_package(tmp_path / "pkg")
    names = ["alice/1.png", "alice/2.png", "bob/1.png", "bob/2.png"]
    _write_images(tmp_path / "imgs", random_images(4), names)
    for extra in (tmp_path / "imgs" / "alice" / "1.png", tmp_path / "imgs" / "alice"):
        out = tmp_path / f"e-{extra.name}.npz"
        result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), str(extra), "--model",
                                          str(tmp_path / "pkg"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        ids = read_table(out)["ids"].tolist()
        assert len(ids) == 4 and len(set(ids)) == 4, ids


def test_embed_without_rejections_removes_a_stale_rejected_log(tmp_path):
    """A rerun that rejects nothing kept the earlier run's `<out>.rejected.tsv`, which then
    listed 4 faces as rejected that the new table holds."""
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "imgs", random_images(4), [f"{i}.png" for i in range(4)])
    out = tmp_path / "e.npz"
    base = ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"), "--out", str(out)]
    first = CliRunner().invoke(app, [*base, "--min-quality", "1e9"])
    assert first.exit_code == 0, first.output
    log = tmp_path / "e.npz.rejected.tsv"
    assert len(log.read_text().splitlines()) == 4
    second = CliRunner().invoke(app, base)
    assert second.exit_code == 0, second.output
    assert len(read_table(out)["ids"]) == 4
    assert not log.exists()


# -- export calibrate ------------------------------------------------------------------------


def lfw_pairs_text(people: list[str], folds: int) -> str:
    """An LFW-style pairs file: per fold, its share of ``people`` each as one genuine pair
    (images 1 and 2) and one impostor pair with the next person of the fold (image 1 vs 2)."""
    per_fold = len(people) // folds
    lines = [f"{folds}\t{per_fold}"]
    for fold in range(folds):
        group = people[per_fold * fold: per_fold * (fold + 1)]
        lines += [f"{p}\t1\t2" for p in group]
        lines += [f"{group[i]}\t1\t{group[(i + 1) % per_fold]}\t2" for i in range(per_fold)]
    return "\n".join(lines) + "\n"


def _two_fold_calibration_args(tmp_path) -> list[str]:
    """A tiny package and an LFW-style pairs file of 2 folds x (6 genuine + 6 impostor) pairs."""
    make_package(tmp_path / "pkg")
    people = [f"P{i}" for i in range(12)]
    _write_images(tmp_path / "lfw", random_images(24, seed=3),
                  [f"{p}/{p}_{n:04d}.jpg" for p in people for n in (1, 2)])
    (tmp_path / "pairs.txt").write_text(lfw_pairs_text(people, folds=2))
    return ["export", "calibrate", "--model", str(tmp_path / "pkg"), "--pairs", str(tmp_path / "pairs.txt"),
            "--images", str(tmp_path / "lfw"), "--fmr", "0.2"]


def test_calibrate_never_fits_on_its_held_out_folds(tmp_path, monkeypatch):
    """`--holdout-folds 2` alone fitted on all 24 pairs, fold 2 included, and then reported
    rejection thresholds "on folds 2" as if held out; now the fit uses the other folds (12
    pairs), and folds given to both options are refused before any image is embedded."""
    args = _two_fold_calibration_args(tmp_path)
    result = CliRunner().invoke(app, [*args, "--holdout-folds", "2", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert read_model_spec(tmp_path / "c").calibration.n_pairs == 12

    def not_expected(*args, **kwargs):
        raise AssertionError("embedded images although the folds overlap")

    monkeypatch.setattr(Model, "embed", not_expected)
    both = CliRunner().invoke(app, [*args, "--folds", "1,2", "--holdout-folds", "2", "--out",
                                    str(tmp_path / "d")])
    _one_line_error(both, "--holdout-folds", "2")
    alone = CliRunner().invoke(app, [*args, "--holdout-folds", "1,2", "--out", str(tmp_path / "d")])
    _one_line_error(alone, "--holdout-folds")
    assert not (tmp_path / "d").exists()


def test_calibrate_out_holding_another_package_is_refused_before_any_work(tmp_path, monkeypatch):
    """`--out` naming another model's package replaced its weights and model.json, exit 0."""
    args = _two_fold_calibration_args(tmp_path)
    make_package(tmp_path / "other", quality="norm", seed=5)
    before = {name: (tmp_path / "other" / name).read_bytes() for name in ("model.json", "weights.safetensors")}

    def not_expected(*args, **kwargs):
        raise AssertionError("embedded images although --out holds another package")

    with monkeypatch.context() as patch:
        patch.setattr(Model, "embed", not_expected)
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "other")])
    _one_line_error(result, str(tmp_path / "other"), "another model package")
    assert {name: (tmp_path / "other" / name).read_bytes() for name in before} == before
    # An earlier calibrated copy of this very model may be recalibrated in place.
    for _ in range(2):
        again = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "copy")])
        assert again.exit_code == 0, again.output
    assert read_model_spec(tmp_path / "copy").calibration.n_pairs == 24


def test_calibrate_out_naming_the_model_itself_updates_it_in_place(tmp_path):
    """`--out` = `--model` embedded every image and then failed ("... are the same file"),
    losing the calibration."""
    args = _two_fold_calibration_args(tmp_path)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "pkg")])
    assert result.exit_code == 0, result.output
    assert read_model_spec(tmp_path / "pkg").calibration.n_pairs == 24
    Model.load(tmp_path / "pkg")


# -- tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ""])
def test_a_table_with_a_scalar_column_is_one_line_naming_it(tmp_path, suffix):
    """`np.savez('emb.npz', ids=..., embeddings=..., dim=4)`: `search enrol` crashed with
    `TypeError: len() of unsized object`."""
    path = tmp_path / f"t{suffix}"
    arrays = {"ids": np.array(["a/1.jpg"]), "embeddings": np.ones((1, 4), np.float32), "dim": np.array(4)}
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        path.mkdir()
        for name, array in arrays.items():
            np.save(path / f"{name}.npy", array)
    with pytest.raises(TableError, match="'dim'"):
        read_table(path)
    result = CliRunner().invoke(app, ["search", "enrol", str(path), "-g", str(tmp_path / "g")])
    _one_line_error(result, str(path), "'dim'")
    with pytest.raises(TableError, match="'dim'"):
        write_table(tmp_path / "w.npz", arrays)


def test_parquet_nulls_are_refused_not_read_as_the_text_none(tmp_path):
    """A parquet written by another tool with a missing id read back as the id 'None' (and a
    missing quality or embedding value as NaN), silently."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cases = {
        "ids": pa.table({"ids": pa.array(["a", None]), "quality": pa.array([1.0, 2.0])}),
        "quality": pa.table({"ids": pa.array(["a", "b"]), "quality": pa.array([1.0, None])}),
        "embeddings": pa.table({"ids": pa.array(["a", "b"]), "embeddings": pa.FixedSizeListArray.from_arrays(
            pa.array([1.0, None, 3.0, 4.0], type=pa.float32()), 2)}),
    }
    for column, table in cases.items():
        path = tmp_path / f"{column}.parquet"
        pq.write_table(table, path)
        with pytest.raises(TableError, match=f"'{column}'.*missing"):
            read_table(path)


# -- stored calibration ----------------------------------------------------------------------


def test_stored_isotonic_calibration_must_give_probabilities():
    """A calibration whose breakpoints say 1.5 loaded and wrote quality_calibrated = 1.5 for a
    'probability'."""
    good = {"method": "isotonic", "fmr": 0.01, "threshold": 0.3, "x": [0.0, 1.0], "y": [0.2, 1.0]}
    assert QualityCalibration.from_dict(good).apply([0.5])[0] == pytest.approx(0.6)
    for y in ([0.2, 1.5], [-0.1, 0.5]):
        with pytest.raises(CalibrationError, match=r"calibration\.y"):
            QualityCalibration.from_dict({**good, "y": y})


def test_a_failed_rewrite_of_a_npy_folder_table_leaves_the_earlier_table_whole(tmp_path, monkeypatch):
    """Columns were renamed into place one by one as written: a failure (or kill) after the
    first left new ``ids`` beside old ``embeddings`` of the same length, read back as one table."""
    old = {"ids": np.array(["a", "b"]), "embeddings": np.zeros((2, 3), dtype=np.float32)}
    write_table(tmp_path / "t", old)
    calls = []
    real_save = np.save

    def failing_save(handle, array, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(handle, array, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_table(tmp_path / "t", {"ids": np.array(["c", "d"]), "embeddings": np.ones((2, 3), dtype=np.float32)})
    monkeypatch.undo()
    back = read_table(tmp_path / "t")
    assert back["ids"].tolist() == ["a", "b"] and not back["embeddings"].any()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["embeddings.npy", "ids.npy"]
