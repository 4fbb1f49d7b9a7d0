"""`qualiface embed` and `qualiface export calibrate` end to end on a tiny model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.io import read_table
from qualiface.infer.model import Model, read_model_spec
from test_infer_model import make_package, random_images


def _write_images(folder, images, names):
    for image, name in zip(images, names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), image.permute(1, 2, 0).numpy()[:, :, ::-1])


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ""])
def test_embed_writes_table_and_logs_rejections(tmp_path, suffix):
    make_package(tmp_path / "pkg")
    images = random_images(6)
    names = [f"p{i % 2}/{i}.png" for i in range(6)]
    _write_images(tmp_path / "imgs", images, names)
    (tmp_path / "imgs" / "p0" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    model = Model.load(tmp_path / "pkg")
    _, quality = model.embed(images)
    threshold = float(np.median(quality.numpy()))
    out = tmp_path / f"emb{suffix}"
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(out), "--batch-size", "4", "--min-quality", str(threshold)])
    assert result.exit_code == 0, result.output
    table = read_table(out, required=("ids", "embeddings", "norms", "quality"))
    keep = quality.numpy() >= threshold
    assert sorted(table["ids"].tolist()) == sorted(n for n, k in zip(names, keep) if k)
    np.testing.assert_allclose(np.linalg.norm(table["embeddings"], axis=1), 1.0, atol=1e-5)
    assert np.all(table["quality"] >= threshold)
    log = (tmp_path / f"emb{suffix}.rejected.tsv").read_text().splitlines()
    assert any(line.startswith("p0/broken.jpg\tunreadable") for line in log)
    assert sum("\tlow-quality\t" in line for line in log) == int((~keep).sum())


def test_embed_calibrated_needs_a_calibration(tmp_path):
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "imgs", random_images(1), ["a.png"])
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "e.npz"), "--calibrated", "--min-quality", "0.5"])
    assert result.exit_code == 1 and "no calibration" in result.output.replace("\n", " ")


def _calibrate_args(tmp_path) -> list[str]:
    """A tiny package and a 24-pair set over 12 people: `export calibrate` without --fmr/--out."""
    make_package(tmp_path / "pkg")
    people = [f"Person_{i}" for i in range(12)]
    images = random_images(24, seed=3)
    _write_images(tmp_path / "lfw", images, [f"{p}/{p}_{n:04d}.jpg" for p in people for n in (1, 2)])
    lines = ["1\t12"]
    lines += [f"{p}\t1\t2" for p in people]
    lines += [f"{people[i]}\t1\t{people[(i + 1) % 12]}\t2" for i in range(12)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    return ["export", "calibrate", "--model", str(tmp_path / "pkg"), "--pairs", str(tmp_path / "pairs.txt"),
            "--images", str(tmp_path / "lfw")]


def test_calibrate_cli_stores_calibration_used_by_embed(tmp_path):
    result = CliRunner().invoke(app, [*_calibrate_args(tmp_path), "--fmr", "0.1", "--out",
                                      str(tmp_path / "calibrated")])
    assert result.exit_code == 0, result.output
    calibration = read_model_spec(tmp_path / "calibrated").calibration
    assert calibration is not None and calibration.n_pairs == 24 and calibration.fmr == 0.1
    assert read_model_spec(tmp_path / "pkg").calibration is None  # --out leaves the source alone
    embed = CliRunner().invoke(app, ["embed", str(tmp_path / "lfw"), "--model", str(tmp_path / "calibrated"),
                                     "--out", str(tmp_path / "e.npz")])
    assert embed.exit_code == 0, embed.output
    table = read_table(tmp_path / "e.npz")
    np.testing.assert_allclose(table["quality_calibrated"], calibration.apply(table["quality"]))


def test_embed_with_decoding_workers_matches_inline_decoding(tmp_path):
    make_package(tmp_path / "pkg")
    images = random_images(7)
    names = [f"p{i % 3}/{i}.png" for i in range(7)]
    _write_images(tmp_path / "imgs", images, names)
    (tmp_path / "imgs" / "p1" / "broken.jpg").write_bytes(b"")
    tables = {}
    for workers in ("0", "2"):
        out = tmp_path / f"emb{workers}.npz"
        result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                          "--out", str(out), "--batch-size", "3", "--workers", workers])
        assert result.exit_code == 0, result.output
        tables[workers] = read_table(out, required=("ids", "embeddings", "quality"))
        log = (tmp_path / f"emb{workers}.npz.rejected.tsv").read_text()
        assert "p1/broken.jpg\tunreadable" in log
    assert tables["0"]["ids"].tolist() == tables["2"]["ids"].tolist()
    assert len(tables["0"]["ids"]) == 7
    np.testing.assert_array_equal(tables["0"]["embeddings"], tables["2"]["embeddings"])
    np.testing.assert_array_equal(tables["0"]["quality"], tables["2"]["quality"])


def test_embed_calls_a_wrong_size_image_wrong_size_with_the_sizes(tmp_path):
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "imgs", random_images(2), ["a.png", "b.png"])
    _write_images(tmp_path / "imgs", random_images(1, size=48), ["big.png"])
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "e.npz")])
    assert result.exit_code == 0, result.output
    log = dict(line.split("\t", 1) for line in (tmp_path / "e.npz.rejected.tsv").read_text().splitlines())
    assert log["big.png"].startswith("wrong size\timage size 48x48 (WxH), the model expects 32x32")
    assert log["broken.jpg"].startswith("unreadable\t")
    printed = " ".join(result.output.split())
    assert "1 unreadable, 1 of the wrong size" in printed


def test_rejected_tsv_escapes_names_that_would_forge_columns_or_rows(tmp_path):
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "imgs", random_images(1), ["good.png"])
    forged = "x.jpg\tlow-quality\tforged\nother\\.jpg"  # tab, newline and a backslash
    (tmp_path / "imgs" / forged).write_bytes(b"\xff\xd8 not really")
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "e.npz")])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "e.npz.rejected.tsv").read_text().splitlines()
    assert len(rows) == 1  # one rejected file, one row
    name, reason, _detail = rows[0].split("\t")
    assert name == "x.jpg\\tlow-quality\\tforged\\nother\\\\.jpg" and reason == "unreadable"
    assert name.encode().decode("unicode_escape") == forged  # reversible


def _one_line_error(result, *needles: str) -> None:
    output = result.output.replace("\n", " ")
    assert result.exit_code == 1, result.output
    assert type(result.exception) is SystemExit and "Traceback" not in result.output
    assert "error: " in output, result.output
    for needle in needles:
        assert needle in output, result.output


def test_calibrate_refuses_an_fmr_outside_0_1_and_writes_nothing(tmp_path):
    # `--fmr 2` (meant: 2e-2) fitted a threshold below every impostor and stored it, exit 0.
    result = CliRunner().invoke(app, [*_calibrate_args(tmp_path), "--fmr", "2", "--out",
                                      str(tmp_path / "calibrated")])
    _one_line_error(result, "FMR must lie strictly between 0 and 1, got 2")
    assert not (tmp_path / "calibrated").exists()


def test_calibrate_out_below_a_file_is_one_line(tmp_path):
    # The weights copy and model.json write ran outside the error handling: a traceback after
    # all the embedding work.
    (tmp_path / "taken").write_text("a file\n")
    result = CliRunner().invoke(app, [*_calibrate_args(tmp_path), "--fmr", "0.1", "--out",
                                      str(tmp_path / "taken" / "calibrated")])
    _one_line_error(result, str(tmp_path / "taken" / "calibrated"), f"{tmp_path / 'taken'} is a file, not a folder")


def test_embed_with_a_device_typo_is_one_line(tmp_path):
    # torch.device("gpu") raised a RuntimeError listing twenty device types, as a traceback.
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "faces", random_images(1), ["a/1.jpg"])
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "faces"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "e.npz"), "--device", "gpu"])
    _one_line_error(result, "device 'gpu' is not a device name")


def test_embed_into_the_image_folder_is_refused_before_embedding(tmp_path, monkeypatch):
    # `--out faces/` (a folder: the .npy-folder format) scattered ids.npy, embeddings.npy ...
    # among the input images; the check now runs before any image is embedded.
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "faces", random_images(2), ["a/1.jpg", "b/2.jpg"])
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "faces").rglob("*"))

    def not_expected(*args, **kwargs):
        raise AssertionError("embedded before the output was checked")

    monkeypatch.setattr(Model, "embed", not_expected)
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "faces"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "faces")])
    _one_line_error(result, "faces: is a folder holding other files (a, b)")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "faces").rglob("*")) == before


def test_a_table_folder_of_its_own_columns_is_rewritten(tmp_path):
    from qualiface.infer.io import TableError, write_table

    out = tmp_path / "table"
    write_table(out, {"ids": np.array(["x", "y"]), "quality": np.array([1.0, 2.0])})
    write_table(out, {"ids": np.array(["z"]), "quality": np.array([3.0])})  # same columns: replaced
    assert read_table(out)["ids"].tolist() == ["z"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TableError, match="holding other files \\(notes.txt\\)"):
        write_table(out, {"ids": np.array(["z"]), "quality": np.array([3.0])})


def test_embed_of_several_folders_keeps_same_named_images_apart(tmp_path):
    # `embed alice/ bob/` gave both alice/1.jpg and bob/1.jpg the id "1.jpg".
    make_package(tmp_path / "pkg")
    _write_images(tmp_path / "alice", random_images(1, seed=1), ["1.png"])
    _write_images(tmp_path / "bob", random_images(1, seed=2), ["1.png"])
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "alice"), str(tmp_path / "bob"),
                                      "--model", str(tmp_path / "pkg"), "--out", str(tmp_path / "e.npz")])
    assert result.exit_code == 0, result.output
    assert sorted(read_table(tmp_path / "e.npz")["ids"].tolist()) == ["alice/1.png", "bob/1.png"]
    single = CliRunner().invoke(app, ["embed", str(tmp_path / "alice"), "--model", str(tmp_path / "pkg"),
                                      "--out", str(tmp_path / "one.npz")])
    assert single.exit_code == 0 and read_table(tmp_path / "one.npz")["ids"].tolist() == ["1.png"]
    _write_images(tmp_path / "x" / "alice", random_images(1, seed=3), ["1.png"])
    clash = CliRunner().invoke(app, ["embed", str(tmp_path / "alice"), str(tmp_path / "x" / "alice"),
                                     "--model", str(tmp_path / "pkg"), "--out", str(tmp_path / "c.npz")])
    _one_line_error(clash, "would both get the id 'alice/1.png'")
    assert not (tmp_path / "c.npz").exists()
