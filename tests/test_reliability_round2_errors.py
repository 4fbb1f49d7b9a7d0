"""Reliability round 2, one-line errors: mistakes that used to end in a traceback now give
``error: <file>: <problem>`` (or, for a wrong-size training image, a skip that is reported)."""

from __future__ import annotations

import errno
import logging
import pathlib

import pytest
import torch
import yaml
from test_eval_cli import _write_lfw, fake_model  # noqa: F401  (fixture shared with the eval CLI tests)
from typer.testing import CliRunner

from qualiface import files
from qualiface.cli import app
from qualiface.data.decode import encode_jpeg


def _one_line_error(result, *fragments: str) -> None:
    """Exit 1 with every fragment in the output and no traceback."""
    output = result.output.replace("\n", " ")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and type(result.exception) is SystemExit
    for fragment in fragments:
        assert fragment in output, result.output



def test_model_given_a_file_instead_of_a_package_folder(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"\0" * 16)
    image = tmp_path / "face.jpg"
    image.write_bytes(encode_jpeg(torch.zeros((3, 16, 16), dtype=torch.uint8)))
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(image), "--model", str(weights), "--out",
                                 str(tmp_path / "e.npz")])
    _one_line_error(result, f"{weights}: is a file, not a model package folder")
    data = tmp_path / "lfw"
    _write_lfw(data)
    result = runner.invoke(app, ["eval", "lfw", "--model", str(weights), "--data", str(data),
                                 "--out", str(tmp_path / "out")])
    _one_line_error(result, f"{weights}: is a file, not a model package folder")


def test_eval_lfw_with_a_fold_the_protocol_lacks(tmp_path, fake_model):
    data = tmp_path / "lfw"
    _write_lfw(data)  # two folds
    result = CliRunner().invoke(app, ["eval", "lfw", "--model", str(fake_model), "--data",
                                      str(data), "--folds", "11", "--out", str(tmp_path / "out")])
    _one_line_error(result, "pairs.txt: no fold(s) [11]; folds are [1, 2]")


def test_disk_full_while_writing_the_report(tmp_path, fake_model, monkeypatch):
    data = tmp_path / "lfw"
    _write_lfw(data)
    original = files.create_temp  # every report file is written through qualiface.files

    def create_temp(path):
        if pathlib.Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path)

    monkeypatch.setattr(files, "create_temp", create_temp)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "lfw", "--model", str(fake_model), "--data",
                                      str(data), "--out", str(out)])
    _one_line_error(result, f"{out / 'metrics.json'}: cannot write the report: disk full")


def test_a_wrong_size_image_in_a_training_folder_is_skipped_and_reported(tmp_path, caplog):
    faces = tmp_path / "faces"
    for ident in range(2):
        (faces / f"id{ident}").mkdir(parents=True)
        for k in range(4):
            value = torch.full((3, 16, 16), 40 * k + 100 * ident, dtype=torch.uint8)
            (faces / f"id{ident}" / f"{k}.png").write_bytes(encode_jpeg(value))
    odd = faces / "id1" / "big.png"
    odd.write_bytes(encode_jpeg(torch.zeros((3, 20, 20), dtype=torch.uint8)))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"backbone": "iresnet-nano",
                  "params": {"input_size": 16, "base_width": 2, "embedding_size": 4}},
        "data": {"name": "folder", "params": {"root": str(faces)}, "num_workers": 0},
        "train": {"steps": 1, "batch_size": 4, "device": "cpu", "progress": False,
                  "output_dir": str(tmp_path / "out")},
    }))
    with caplog.at_level(logging.WARNING, logger="qualiface.data.robust"):
        result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    reported = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert reported and f"{odd}: image is 20x20, expected 16x16" in reported[0]
