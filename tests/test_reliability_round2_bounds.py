"""Reliability round 2, bounded resources: a hostile or mistaken file fails fast, in little memory.

Class counts from ``.rec`` metadata, backbone size totals, devices / FIFOs / huge files given as
small description files, ``.bin`` pickles that reference one buffer many times, pairs files with
far more lines than a protocol, and foreign files in a model package folder.
"""

from __future__ import annotations

import json
import os
import pickle
import resource

import numpy as np
import pytest
import torch
from test_recordio import _header, _png, _write_raw

from qualiface.data.recordio import RecordIODataset, RecordIOError, RecordIOWriter


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- .rec class counts


def _packed(folder, labels=(0, 0, 1)):
    with RecordIOWriter(folder / "train") as writer:
        for value, label in enumerate(labels):
            writer.add(_png(10 * value), label)
    return folder / "train.rec"


def test_absurd_class_count_in_property_is_refused(tmp_path):
    rec = _packed(tmp_path)
    (tmp_path / "property").write_text("1000000000000,8,8\n")
    with pytest.raises(RecordIOError, match=r"property: 'property' says 1000000000000 classes, "
                                            r"but the \.rec holds only 3 images"):
        RecordIODataset(rec)


def test_a_label_of_3e9_is_refused_not_turned_into_a_head(tmp_path):
    records = [(0, _header(0, 0.0, 0) + _png(1)), (1, _header(0, 3e9, 1) + _png(2))]
    _write_raw(tmp_path, records, prefix="flat")
    with pytest.raises(RecordIOError, match=r"label 3000000000 is not below 2\*\*24"):
        RecordIODataset(tmp_path / "flat.rec")
    # Exact in float32 but far beyond the images: refused by the class-count bound.
    records[1] = (1, _header(0, 4_000_000.0, 1) + _png(2))
    _write_raw(tmp_path, records, prefix="flat")
    with pytest.raises(RecordIOError, match="the largest label implies 4000001 classes"):
        RecordIODataset(tmp_path / "flat.rec")


def test_identity_block_claiming_absent_records_is_refused(tmp_path):
    # Record 0 says identity headers run to record 1e12 (one per class): only one is indexed.
    records = [(0, _header(2, 0.0, 0, (3.0, 1e12))), (1, _header(0, 0.0, 1) + _png(1)),
               (2, _header(0, 0.0, 2) + _png(2)), (3, _header(2, 0.0, 3, (1.0, 3.0)))]
    _write_raw(tmp_path, records)
    with pytest.raises(RecordIOError, match="are identity headers but the index lists 1 of them"):
        RecordIODataset(tmp_path / "train.rec")


def test_sparse_labels_of_a_small_subset_are_still_accepted(tmp_path):
    records = [(0, _header(0, 0.0, 0) + _png(1)), (1, _header(0, 9.0, 1) + _png(2))]
    _write_raw(tmp_path, records, prefix="flat")
    assert RecordIODataset(tmp_path / "flat.rec").num_classes == 10


# ----------------------------------------------------------------------------- backbone totals


# A refusal that read or allocated first would hang for minutes or die of memory: the timeout
# marks such a hang as a failure. It is not a speed target, so it is far above a loaded CI core.
@pytest.mark.timeout(120)
def test_backbone_size_is_bounded_in_total_before_anything_is_allocated():
    from qualiface.backbones import BackboneSizeError, backbone_size, build_backbone

    before = _max_rss_mb()
    # Each argument is within its own limit; together ~44G parameters (hundreds of GB).
    with pytest.raises(BackboneSizeError, match=r"iresnet200 \(base_width=1024, input_size=1024\) "
                                                r"would have 44274M parameters"):
        build_backbone("iresnet200", base_width=1024, input_size=1024)
    with pytest.raises(BackboneSizeError, match="activations per image"):
        build_backbone("iresnet50", input_size=1024)
    assert _max_rss_mb() - before < 500
    # The standard nets stay well inside the limits.
    parameters, activations = backbone_size("iresnet100")
    assert parameters == 65_156_160 and 20e6 < activations < 40e6


def test_model_package_asking_for_a_huge_backbone_is_refused_at_load(tmp_path):
    from test_infer_model import make_package

    from qualiface.infer.model import Model, ModelPackageError

    make_package(tmp_path / "pkg", quality="norm")
    spec = json.loads((tmp_path / "pkg" / "model.json").read_text())
    spec["backbone"]["name"] = "iresnet200"
    spec["backbone"]["kwargs"].update(base_width=1024, input_size=1024)
    (tmp_path / "pkg" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelPackageError, match="model.json: .*parameters.*the limits are"):
        Model.load(tmp_path / "pkg")


# ----------------------------------------------------------------------------- special files


@pytest.fixture
def specials(tmp_path):
    """A character device (symlink to /dev/zero), a FIFO and a 1 GiB sparse file."""
    os.symlink("/dev/zero", tmp_path / "zero")
    os.mkfifo(tmp_path / "fifo")
    with open(tmp_path / "huge", "wb") as handle:
        handle.truncate(1 << 30)  # sparse: no disk or memory used
    return {"zero": tmp_path / "zero", "fifo": tmp_path / "fifo", "huge": tmp_path / "huge"}


EXPECTED = {"zero": "a character device, not a regular", "fifo": "a FIFO",
            "huge": "too large for a"}


@pytest.mark.timeout(120)  # reading /dev/zero or a writerless FIFO would never end
@pytest.mark.parametrize("kind", ["zero", "fifo", "huge"])
def test_devices_fifos_and_huge_files_as_small_files_are_refused_unread(specials, tmp_path, kind):
    from qualiface.config import ConfigError, load_config
    from qualiface.data.folder import DatasetError, parse_list_file
    from qualiface.infer.model import ModelPackageError, read_model_spec

    path = specials[kind]
    with pytest.raises(ConfigError, match=EXPECTED[kind]):
        load_config(path)
    with pytest.raises(DatasetError, match=EXPECTED[kind]):
        parse_list_file(path)
    package = tmp_path / "pkg"
    package.mkdir(exist_ok=True)
    (package / "model.json").unlink(missing_ok=True)
    os.symlink(path, package / "model.json")
    with pytest.raises(ModelPackageError, match=EXPECTED[kind]):
        read_model_spec(package)


def test_pairs_and_bin_files_must_be_regular(specials):
    from qualiface.data.lfw import PairsFormatError, read_pairs
    from qualiface.data.safe_pickle import PickleFormatError
    from qualiface.data.verification_bin import read_bin_entries

    for kind in ("zero", "fifo"):
        with pytest.raises(PairsFormatError, match=EXPECTED[kind]):
            read_pairs(specials[kind])
        with pytest.raises(PickleFormatError, match=EXPECTED[kind]):
            read_bin_entries(specials[kind])


# ----------------------------------------------------------------------------- .bin and pairs


@pytest.mark.timeout(120)  # copying 20 GB would take minutes or die of memory
@pytest.mark.parametrize("kind, protocol", [(bytes, 4), (bytearray, 5)])
def test_bin_referencing_one_buffer_20k_times_is_refused(tmp_path, kind, protocol):
    from qualiface.data.safe_pickle import PickleTooLargeError
    from qualiface.data.verification_bin import read_bin_entries

    blob = kind(1 << 20)
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([blob] * 20_000, [True] * 10_000), protocol=protocol))
    assert path.stat().st_size < 2 << 20  # the pickle memo stores the buffer once
    before = _max_rss_mb()
    with pytest.raises(PickleTooLargeError, match="evil.bin: refused: references more than"):
        read_bin_entries(path)  # would copy 20 GB
    assert _max_rss_mb() - before < 500


def test_pairs_file_with_more_lines_than_its_header_stops_at_the_first_extra(tmp_path):
    from qualiface.data.lfw import PairsFormatError, read_pairs

    path = tmp_path / "pairs.txt"
    path.write_text("1 1\na 1 2\na 1 b 1\n" + "c 1 2\n" * 200_000)
    with pytest.raises(PairsFormatError, match=r"pairs.txt:1: header says 1 fold.*the file has "
                                               r"more \(line 4\)"):
        read_pairs(path)


def test_headerless_pairs_file_is_bounded_and_lines_are_capped(tmp_path, monkeypatch):
    import qualiface.data.lfw as lfw

    monkeypatch.setattr(lfw, "MAX_PAIRS", 1000)
    path = tmp_path / "pairs.txt"
    path.write_text("a 1 2\n" * 5000)
    with pytest.raises(lfw.PairsFormatError, match=r"pairs.txt:1001: more than 1,000 pairs"):
        lfw.read_pairs(path)
    path.write_bytes(b"a" * (10 << 20))  # one 10 MB line, no newline
    with pytest.raises(lfw.PairsFormatError, match="pairs.txt:1: line longer than 4096 bytes"):
        lfw.read_pairs(path)


def test_unknown_fold_is_a_data_error():
    from qualiface.data.decode import DataError
    from qualiface.data.lfw import parse_pairs_text

    pairs = parse_pairs_text("2 1\na 1 2\na 1 b 1\nc 1 2\nc 1 d 1\n", source="p.txt")
    with pytest.raises(DataError, match=r"p.txt: no fold\(s\) \[11\]; folds are \[1, 2\]"):
        pairs.select_folds(11)


# ----------------------------------------------------------------------------- package hash


def test_package_hash_covers_only_the_package_files(tmp_path):
    from qualiface.infer.model import ModelPackageError, package_identity

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "model.json").write_text("{}")
    (package / "weights.safetensors").write_bytes(b"\0" * 64)
    key = package_identity(package)
    (package / "notes.txt").write_text("trained on a Tuesday")
    with open(tmp_path / "sparse", "wb") as handle:
        handle.truncate(64 << 20)
    os.symlink(tmp_path / "sparse", package / "big.bin")
    os.symlink("/dev/zero", package / "zero")
    assert package_identity(package) == key
    (package / "weights.safetensors").write_bytes(b"\1" * 64)
    assert package_identity(package) != key  # the weights are part of the key
    (package / "weights.safetensors").unlink()
    os.symlink("/dev/zero", package / "weights.safetensors")
    with pytest.raises(ModelPackageError, match="weights.safetensors: a character device"):
        package_identity(package)


def test_small_file_helper_reads_regular_files_and_refuses_the_rest(tmp_path):
    from qualiface.files import FileReadError, read_small_bytes, read_small_text

    (tmp_path / "ok.txt").write_text("héllo")
    assert read_small_text(tmp_path / "ok.txt", limit=6) == "héllo"
    with pytest.raises(FileReadError, match=r"ok.txt: 6 bytes is too large for a note \(limit 5"):
        read_small_bytes(tmp_path / "ok.txt", limit=5, what="note")
    with pytest.raises(FileReadError, match="a directory, not a regular file"):
        read_small_bytes(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_small_bytes(tmp_path / "absent")
    assert isinstance(FileReadError("x", "y"), OSError) and np.isscalar(1) and torch.is_tensor(torch.zeros(1))


class _NoteError(Exception):
    """Stands for a reader's own error class (ConfigError, DatasetError...)."""


@pytest.mark.parametrize("case, problem", [
    ("missing", "note not found"),
    ("directory", "a directory, not a regular note"),
    ("latin1", r"not UTF-8 text \(invalid continuation byte at byte 1\)"),
    ("large", r"7 bytes is too large for a note \(limit 6 bytes\)"),
])
def test_small_text_as_raises_the_callers_class_naming_the_file(tmp_path, case, problem):
    from qualiface.files import read_small_text_as

    (tmp_path / "directory").mkdir()
    (tmp_path / "latin1").write_bytes("héllo".encode("latin-1"))
    (tmp_path / "large").write_text("seven b")
    path = tmp_path / case
    with pytest.raises(_NoteError, match=problem) as info:
        read_small_text_as(path, _NoteError, what="note", limit=6)
    assert str(info.value).startswith(f"{path}: ")  # the file first, then the problem
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_small_text_as_returns_the_text_and_takes_a_missing_message(tmp_path):
    from qualiface.files import read_small_text_as

    (tmp_path / "ok.txt").write_text("héllo")
    assert read_small_text_as(tmp_path / "ok.txt", _NoteError, limit=6) == "héllo"
    with pytest.raises(_NoteError, match=r"absent: missing \(is it a note\?\)$"):
        read_small_text_as(tmp_path / "absent", _NoteError, missing="missing (is it a note?)")
