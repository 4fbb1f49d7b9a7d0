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


# ------------------------------------------------------------------- round 5: output below a file


def _enrol_input(tmp_path) -> pathlib.Path:
    import numpy as np

    from qualiface.infer.io import write_table

    embeddings = np.eye(4, 8, dtype=np.float32)
    return write_table(tmp_path / "e.npz", {"ids": np.array([f"p{i}/1.jpg" for i in range(4)]),
                                            "embeddings": embeddings, "quality": np.ones(4)})


def _rec(tmp_path) -> pathlib.Path:
    from qualiface.data.recordio import RecordIOWriter

    with RecordIOWriter(tmp_path / "rec" / "train", identity_names=["a", "b"]) as writer:
        for label in (0, 1):
            writer.add(encode_jpeg(torch.full((3, 16, 16), 60 * label, dtype=torch.uint8)), label)
    return tmp_path / "rec"


def _face_and_landmarks(tmp_path) -> list[str]:
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "1.jpg").write_bytes(encode_jpeg(torch.zeros((3, 64, 64), dtype=torch.uint8)))
    (tmp_path / "lm.txt").write_text("1.jpg 20 25 44 25 32 35 22 45 42 45\n")
    return [str(tmp_path / "faces")]


# Each command with an output below the file tmp/taken: a NotADirectoryError / FileExistsError
# traceback from mkdir before; now `error: <output>: could not write: <tmp/taken> is a file`.
@pytest.mark.parametrize("command", ["search enrol", "search query", "data unpack", "data pack",
                                     "align", "demo"])
def test_an_output_below_a_file_is_one_line_naming_it(tmp_path, command):
    (tmp_path / "taken").write_text("a file\n")
    out = tmp_path / "taken" / "out"
    if command == "search enrol":
        args = ["search", "enrol", str(_enrol_input(tmp_path)), "--gallery", str(out)]
    elif command == "search query":
        table = _enrol_input(tmp_path)
        assert CliRunner().invoke(app, ["search", "enrol", str(table), "--gallery",
                                        str(tmp_path / "g")]).exit_code == 0
        out = tmp_path / "taken" / "q.npz"
        args = ["search", "query", str(table), "--gallery", str(tmp_path / "g"), "--out", str(out)]
    elif command == "data unpack":
        args = ["data", "unpack", str(_rec(tmp_path)), str(out)]
    elif command == "data pack":  # was "[Errno 20] Not a directory: <folder>", no output named
        (tmp_path / "src" / "person").mkdir(parents=True)
        (tmp_path / "src" / "person" / "1.jpg").write_bytes(
            encode_jpeg(torch.zeros((3, 64, 64), dtype=torch.uint8)))
        args = ["data", "pack", str(tmp_path / "src"), str(out / "train")]
    elif command == "align":
        args = ["align", *_face_and_landmarks(tmp_path), str(out), "--landmarks", str(tmp_path / "lm.txt")]
    else:
        args = ["demo", "--out", str(out), "--steps", "1", "--no-progress"]
    result = CliRunner().invoke(app, args)
    _one_line_error(result, str(out), f"{tmp_path / 'taken'} is a file, not a folder")


def test_unpack_onto_an_existing_file_is_refused_and_keeps_it(tmp_path):
    (tmp_path / "taken").write_text("a file\n")
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, ["data", "unpack", str(_rec(tmp_path)), str(tmp_path / "taken"),
                                          *extra])
        _one_line_error(result, f"{tmp_path / 'taken'}: exists and is a file, not a folder")
    assert (tmp_path / "taken").read_text() == "a file\n"
