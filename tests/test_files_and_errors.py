"""The one atomic write (``qualiface.files``) and the one error root (``qualiface.errors``)."""

from __future__ import annotations

import errno
import math
import os

import pytest
from stand_ins import DiskFull

from qualiface import files
from qualiface.errors import DataError, EvaluationError, QualifaceError


def test_text_and_bytes_are_written_whole_and_replace_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.json"  # the folder is created
    assert files.write_text_atomic(path, "first\n") == path
    files.write_bytes_atomic(path, b"second\n")
    assert path.read_bytes() == b"second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temp file left


def test_new_files_get_the_umask_permissions_not_private_ones(tmp_path):
    mask = os.umask(0o022)
    try:
        path = files.write_text_atomic(tmp_path / "model.json", "{}\n")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_full_disk_names_the_file_and_keeps_the_previous_content(tmp_path):
    path = files.write_text_atomic(tmp_path / "gallery.json", "old\n")

    def fill(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.FileWriteError) as caught:
        files.atomic_write(path, fill)
    assert str(caught.value).startswith(f"{path}: could not write: disk full")
    assert isinstance(caught.value, OSError) and isinstance(caught.value, QualifaceError)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.json"]


def test_a_swallowed_write_error_is_still_reported(tmp_path, monkeypatch):
    """A writer that catches the OS error and raises its own (torch's "unexpected pos")."""
    real_fdopen = os.fdopen

    def hide(handle):
        try:
            handle.write(b"x")
        except OSError:
            raise RuntimeError("unexpected pos") from None

    monkeypatch.setattr(os, "fdopen",
                        lambda fd, *args, **kwargs: DiskFull(real_fdopen(fd, *args, **kwargs)))
    with pytest.raises(files.FileWriteError, match="disk full"):
        files.atomic_write(tmp_path / "checkpoint.pt", hide)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_other_errors_propagate_unchanged_and_leave_no_temp_file(tmp_path):
    def broken(handle):
        handle.write(b"half")
        raise ValueError("not JSON-able")

    with pytest.raises(ValueError, match="not JSON-able"):
        files.atomic_write(tmp_path / "x.json", broken)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_only_after_the_block_succeeds(tmp_path):
    out = tmp_path / "onnx" / "model.onnx"  # the folder is created
    with files.atomic_path(out) as temp:
        assert temp.parent == out.parent and temp.exists() and temp != out
        temp.write_bytes(b"first")
    assert out.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="check failed"):
        with files.atomic_path(out) as temp:
            temp.write_bytes(b"unverified")
            raise RuntimeError("check failed")
    assert out.read_bytes() == b"first"  # the previous file is kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temp file


def test_atomic_path_reports_a_full_disk_as_a_write_error_naming_the_file(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(files.FileWriteError, match=r"model\.onnx: could not write: disk full"):
        with files.atomic_path(out):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_one_data_error_under_one_root():
    from qualiface.data.decode import DataError as data_error
    from qualiface.data.recordio import RecordIOError
    from qualiface.eval import EvaluationError as eval_error
    from qualiface.train.data import DataError as train_error

    assert data_error is train_error is DataError
    assert eval_error is EvaluationError
    assert issubclass(RecordIOError, DataError) and issubclass(DataError, ValueError)


@pytest.mark.parametrize("where, name, builtin", [
    ("qualiface.config", "ConfigError", ValueError),
    ("qualiface.registry", "RegistryError", KeyError),
    ("qualiface.infer.model", "ModelPackageError", ValueError),
    ("qualiface.infer.search", "GalleryError", ValueError),
    ("qualiface.train.checkpoint", "CheckpointError", RuntimeError),
    ("qualiface.train.loop", "TrainingError", RuntimeError),
    ("qualiface.train.pipelines", "PipelineError", ValueError),
    ("qualiface.train.precision", "PrecisionError", ValueError),
    ("qualiface.data.recordio", "RecordIOError", ValueError),
    ("qualiface.files", "FileReadError", OSError),
])
def test_family_errors_derive_from_the_root_and_keep_their_builtin(where, name, builtin):
    import importlib

    error = getattr(importlib.import_module(where), name)
    assert issubclass(error, QualifaceError) and issubclass(error, builtin)


def test_json_ready_holds_undefined_metrics_as_null_and_numpy_as_python(tmp_path):
    import json

    import numpy as np

    from qualiface.files import json_ready

    value = {"tar": float("nan"), "upper": float("inf"), 3: np.float32(0.5),
             "folds": np.array([1, 2]), "rows": (np.int64(7), -math.inf), "where": tmp_path}
    ready = json_ready(value)
    assert ready == {"tar": None, "upper": None, "3": 0.5, "folds": [1, 2], "rows": [7, None],
                     "where": str(tmp_path)}
    assert isinstance(ready["rows"][0], int) and isinstance(ready["3"], float)
    assert json.loads(json.dumps(ready, allow_nan=False)) == ready  # strict JSON round trip
