"""Round 9: bad input a user produces, fed to every CLI command (tables whose columns have the
wrong kind, out-of-range options, an empty output folder).

Each test failed on the code before its fix (see docs/RELIABILITY.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.eval import EvaluationError
from qualiface.eval.features import extract_features
from qualiface.infer.io import TableError, read_table
from test_eval_cli import _write_lfw
from test_infer_cli import _write_images
from test_infer_model import make_package, random_images
from test_reliability_round6_infer import _one_line_error

IDS = np.array(["a/0.png", "a/1.png", "b/2.png", "b/3.png"])
EMB = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
QUALITY = np.array([0.5, 1.0, 0.75, 0.25], np.float32)


# -- search enrol / query: tables whose columns hold the wrong kind of values ------------------

BAD_TABLES = {
    # text embeddings were parsed number by number ("0.5" -> 0.5) and searched, exit 0
    "text-embeddings": ({"embeddings": EMB.astype(str)}, "column 'embeddings' must hold real numbers"),
    # complex embeddings lost their imaginary part (a ComplexWarning), exit 0
    "complex-embeddings": ({"embeddings": EMB.astype(np.complex64)}, "column 'embeddings' must hold real numbers"),
    # boolean embeddings were searched as 0/1 vectors, exit 0
    "bool-embeddings": ({"embeddings": EMB > 0}, "column 'embeddings' must hold real numbers"),
    # enrol: ValueError traceback from the pooling ("could not convert string to float")
    "text-quality": ({"quality": np.array(["x"] * 4)}, "column 'quality' must hold real numbers"),
    # enrol: "aggregation: 4 images but quality of shape (4, 2)", naming no file
    "2d-quality": ({"quality": np.ones((4, 2), np.float32)}, "column 'quality' must be 1-D"),
    # enrol and query: TypeError traceback from pathlib (bytes ids)
    "bytes-ids": ({"ids": np.array([b"a/0", b"a/1", b"b/2", b"b/3"])}, "column 'ids' must hold text"),
    # a 2-D ids column was reported as "columns differ in length: {'ids': 2, ...}"
    "2d-ids": ({"ids": IDS.reshape(2, 2)}, "column 'ids' must be 1-D"),
}


def _table(tmp_path, **changes):
    columns = {"ids": IDS, "embeddings": EMB, "quality": QUALITY, **changes}
    path = tmp_path / "t.npz"
    np.savez(path, **columns)
    return path


@pytest.fixture
def gallery(tmp_path):
    np.savez(tmp_path / "good.npz", ids=IDS, embeddings=EMB, quality=QUALITY)
    result = CliRunner().invoke(app, ["search", "enrol", str(tmp_path / "good.npz"), "-g", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    return tmp_path / "g"


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
@pytest.mark.parametrize("command", ["enrol", "query"])
def test_table_columns_of_the_wrong_kind_are_one_line_naming_file_and_column(tmp_path, gallery, command, case):
    changes, message = BAD_TABLES[case]
    table = _table(tmp_path, **changes)
    if command == "enrol":
        args = ["search", "enrol", str(table), "-g", str(tmp_path / "new")]
    else:
        args = ["search", "query", str(table), "-g", str(gallery), "--out", str(tmp_path / "q.npz")]
    result = CliRunner().invoke(app, args)
    _one_line_error(result, str(table), message)
    assert not (tmp_path / "new").exists() and not (tmp_path / "q.npz").exists()


def test_integer_ids_are_read_as_their_text(tmp_path, gallery):
    """`np.savez(ids=np.arange(n))` gave `TypeError: expected str, bytes or os.PathLike object,
    not int64` in `search enrol`; ids name things, so 7 is the name "7"."""
    table = _table(tmp_path, ids=np.array([10, 11, 12, 13]))
    assert read_table(table)["ids"].tolist() == ["10", "11", "12", "13"]
    result = CliRunner().invoke(app, ["search", "enrol", str(table), "-g", str(tmp_path / "new"),
                                      "--identity", "id"])
    assert result.exit_code == 0, result.output
    assert "enrolled 4 templates" in result.output


def test_read_table_refuses_wrong_column_kinds_as_table_errors(tmp_path):
    with pytest.raises(TableError, match=r"t\.npz: column 'embeddings' must be \(rows, dimension\), got shape \(4, 4, 4\)"):
        read_table(_table(tmp_path, embeddings=EMB.reshape(4, 4, 4)))
    with pytest.raises(TableError, match=r"column 'embeddings' must be \(rows, dimension\), got shape \(4, 0\)"):
        read_table(_table(tmp_path, embeddings=np.zeros((4, 0), np.float32)))
    with pytest.raises(TableError, match="column 'norms' must hold real numbers, got booleans"):
        read_table(_table(tmp_path, norms=np.ones(4, bool)))
    # a single value stays the earlier, clearer message
    with pytest.raises(TableError, match="hold a single value"):
        read_table(_table(tmp_path, quality=np.float32(1)))


# -- eval: batch size and decoding workers ------------------------------------------------------


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--workers", "-1")])
@pytest.mark.parametrize("command", ["lfw", "bin"])
def test_eval_refuses_a_batch_size_below_1_and_negative_workers(tmp_path, monkeypatch, command, option, value):
    """`eval lfw|bin|ijb|tinyface --batch-size 0` (or -1, or `--workers -1`) loaded the model and
    the protocol, then gave torch's `ValueError: batch_size should be a positive integer value`
    traceback from the DataLoader."""
    import qualiface.cli.eval as cli_eval

    def not_expected(*args, **kwargs):
        raise AssertionError("loaded the model although an option is out of range")

    monkeypatch.setattr(cli_eval, "_load_embed_fn", not_expected)
    if command == "lfw":
        _write_lfw(tmp_path / "lfw")
        args = ["eval", "lfw", "--data", str(tmp_path / "lfw")]
    else:
        from qualiface.data.verification_bin import write_verification_bin

        images = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)
        path = write_verification_bin(tmp_path / "t.bin", images, [True, False, True, False])
        args = ["eval", "bin", str(path)]
    result = CliRunner().invoke(app, [*args, "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                                      option, value])
    assert result.exit_code == 2, result.output  # click's usage error: names the option
    assert "Traceback" not in result.output and option in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch size must be a whole number >= 1, got 0"),
    ({"batch_size": 2.5}, "batch size must be a whole number >= 1, got 2.5"),
    ({"num_workers": -1}, "decoding workers must be a whole number >= 0, got -1"),
])
def test_extract_features_refuses_bad_batch_options_as_an_evaluation_error(kwargs, message):
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)

    def embed(batch):
        raise AssertionError("embedded although an option is out of range")

    with pytest.raises(EvaluationError, match=message):
        extract_features(images, embed, progress=False, **kwargs)


# -- demo: --num-pairs and --threads ----------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--num-pairs", "-3"], "--num-pairs must be 0 (the config's val.num_pairs) or >= 2, got -3"),
    (["--num-pairs", "1"], "--num-pairs must be 0 (the config's val.num_pairs) or >= 2, got 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_demo_refuses_bad_pair_counts_and_threads_before_any_work(tmp_path, monkeypatch, args, message):
    """`demo --num-pairs -3` (or 1) made the data and trained the model, then failed in the
    evaluation with `num_pairs must be >= 2` (minutes later, naming no option); `--threads -1`
    silently meant "pick from the load", as 0 does."""
    import qualiface.demo as demo

    def not_expected(*args, **kwargs):
        raise AssertionError("started the demo although an option is out of range")

    monkeypatch.setattr(demo, "check_out_folder", not_expected)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out"), *args])
    _one_line_error(result, message)
    assert not (tmp_path / "out").exists()


# -- train: an empty output folder --------------------------------------------------------------


@pytest.mark.parametrize("value", ["", " "])
def test_train_refuses_an_empty_output_dir_instead_of_writing_into_the_current_folder(
        tmp_path, monkeypatch, value):
    """`train ... train.output_dir=$OUT` with OUT unset trained and wrote checkpoint.pt,
    config.yaml, weights, model/, report/ and tensorboard/ into the current folder (Path("") is
    "."), exit 0."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "demo_nano.yaml"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", str(config), f"train.output_dir={value}", "train.steps=1"])
    _one_line_error(result, "train.output_dir: is empty")
    assert list(tmp_path.iterdir()) == []


# -- the wrong kind of path, and probe counts below 1 -----------------------------------------


def test_eval_lfw_says_what_is_there_when_data_or_pairs_are_the_wrong_kind(tmp_path):
    """`eval lfw --data pairs.txt` said "image folder not found" of a file that exists, and
    `--pairs <a folder>` "pairs file not found"."""
    from qualiface.eval.benchmarks import lfw_benchmark

    (tmp_path / "pairs.txt").write_text("1\t1\n")
    (tmp_path / "faces").mkdir()
    with pytest.raises(EvaluationError, match="pairs.txt: is a file, not the image folder expected"):
        lfw_benchmark(tmp_path / "pairs.txt")
    with pytest.raises(EvaluationError, match="faces: is a directory, not the pairs file expected"):
        lfw_benchmark(tmp_path, pairs=tmp_path / "faces")
    with pytest.raises(EvaluationError, match="nowhere: image folder not found"):
        lfw_benchmark(tmp_path / "nowhere")


@pytest.mark.parametrize("command", ["enrol", "query"])
def test_search_refuses_a_probe_count_below_one_by_name(tmp_path, command):
    """`--nprobe -1` on an exact gallery was accepted and ignored."""
    args = ["search", command, str(tmp_path / "e.npz"), "-g", str(tmp_path / "g"), "--nprobe", "-1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--nprobe" in result.output, result.output
