"""Folder and list-file datasets: deterministic labels, path safety, the shared manifest."""

from __future__ import annotations

import io
import logging
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from qualiface.data import DATASETS
from qualiface.data.folder import DatasetError, ImageFolderDataset, ListFileDataset


def _write_png(path, value: int) -> np.ndarray:
    """A 6x5 image whose pixels encode ``value`` (so each file is recognisable)."""
    pixels = np.full((5, 6, 3), value, np.uint8)
    pixels[0, 0] = (value, 255 - value, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    path.write_bytes(out.getvalue())
    return pixels


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "faces"
    # Created out of order and with mixed-case extensions on purpose.
    expected = {
        ("zoe", "b.PNG"): _write_png(root / "zoe" / "b.PNG", 10),
        ("zoe", "a.png"): _write_png(root / "zoe" / "a.png", 20),
        ("adam", "x.Png"): _write_png(root / "adam" / "x.Png", 30),
        ("mia", "1.png"): _write_png(root / "mia" / "1.png", 40),
    }
    (root / "zoe" / "notes.txt").write_text("not an image")
    (root / "empty_person").mkdir()
    (root / "only_text").mkdir()
    (root / "only_text" / "readme.md").write_text("x")
    (root / "stray.png").write_bytes(b"")  # files directly under root are not identities
    return root, expected


def test_folder_labels_follow_sorted_names_and_empty_folders_are_reported(tree, caplog):
    root, expected = tree
    with caplog.at_level(logging.WARNING):
        dataset = DATASETS.get("folder")(root=root)
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.identities == ["adam", "mia", "zoe"]
    assert dataset.num_classes == 3
    assert dataset.skipped_identities == ["empty_person", "only_text"]
    assert "empty_person" in caplog.text
    names = [(p.parent.name, p.name) for p, _ in dataset.samples]
    assert names == [("adam", "x.Png"), ("mia", "1.png"), ("zoe", "a.png"), ("zoe", "b.PNG")]
    assert [label for _, label in dataset.samples] == [0, 1, 2, 2]
    for index, key in enumerate(names):
        image, label = dataset[index]
        assert torch.equal(image, torch.from_numpy(expected[key].transpose(2, 0, 1).copy()))
        assert dataset.meta(index)["path"].endswith(key[1])
        assert dataset.meta(index)["identity"] == key[0]


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="no identity folder with images"):
        ImageFolderDataset(tmp_path)


def test_list_file_resolves_relative_paths_and_reads_images(tree):
    root, expected = tree
    manifest = root.parent / "train.txt"
    manifest.write_text("# comment line\n"
                        "faces/zoe/a.png 4\n"
                        "\n"
                        "faces/adam/x.Png   0\n"
                        "faces/mia/../mia/1.png 2\n")
    dataset = DATASETS.get("list")(list_file=manifest)
    assert len(dataset) == 3 and dataset.labels == [4, 0, 2]
    assert dataset.num_classes == 5  # max label + 1
    image, label = dataset[2]
    assert label == 2 and torch.equal(image, torch.from_numpy(
        expected[("mia", "1.png")].transpose(2, 0, 1).copy()))
    assert dataset.meta(0)["path"] == str(root / "zoe" / "a.png")
    assert dataset.missing_files() == []
    # An explicit root replaces the list file's folder; num_classes may be raised, not lowered.
    other = root.parent / "lists" / "x.txt"
    other.parent.mkdir()
    other.write_text("zoe/b.PNG 1\n")
    dataset = ListFileDataset(other, root=root, num_classes=10)
    assert dataset.num_classes == 10 and dataset[0][1] == 1
    with pytest.raises(DatasetError, match="num_classes=1"):
        ListFileDataset(other, root=root, num_classes=1)


def test_list_file_path_with_spaces(tmp_path):
    _write_png(tmp_path / "John Smith" / "img 1.png", 5)
    manifest = tmp_path / "list.txt"
    manifest.write_text("John Smith/img 1.png 0\n")
    assert ListFileDataset(manifest)[0][0].shape == (3, 5, 6)


@pytest.mark.parametrize("line, message", [
    ("/etc/passwd 0", "absolute path"),
    ("../outside.png 0", "escapes the root"),
    ("a/../../outside.png 0", "escapes the root"),
    ("image.png", "expected 'path label'"),
    ("image.png x", "not an integer"),
    ("image.png 1.5", "not an integer"),
    ("image.png -1", "negative"),
])
def test_list_file_refuses_bad_lines_naming_file_and_line(tmp_path, line, message):
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"ok.png 0\n{line}\n")
    with pytest.raises(DatasetError, match=message) as info:
        ListFileDataset(manifest)
    assert f"{manifest}:2" in str(info.value)


def test_list_file_missing_and_empty(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        ListFileDataset(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(DatasetError, match="no 'path label' lines"):
        ListFileDataset(empty)


def test_shared_training_manifest_loads(shared_data):
    dataset = ListFileDataset(shared_data / "train.txt")
    assert len(dataset) == 18_976
    assert dataset.num_classes == 4_735
    assert len(set(dataset.labels)) == 4_735
    for index in (0, 9_000, len(dataset) - 1):
        image, label = dataset[index]
        assert image.shape == (3, 112, 112) and image.dtype == torch.uint8
        assert 0 <= label < dataset.num_classes


def test_folder_labels_do_not_depend_on_unicode_normalisation(tmp_path):
    # The same identities, named composed (NFC) on one machine and decomposed (NFD, as HFS+
    # stores them) on another, must get the same labels: raw code points put "José" after
    # "Josf" in NFC but before it in NFD.
    orders = []
    for form, names in (("nfc", ["Jos\u00e9", "Josf", "Jos\u00e9e"]),
                        ("nfd", ["Jose\u0301", "Josf", "Jose\u0301e"])):
        for name in names:
            _write_png(tmp_path / form / name / "1.png", 5)
        identities = ImageFolderDataset(tmp_path / form).identities
        orders.append([unicodedata.normalize("NFC", name) for name in identities])
    assert orders[0] == orders[1] == ["Josf", "Jos\u00e9", "Jos\u00e9e"]
