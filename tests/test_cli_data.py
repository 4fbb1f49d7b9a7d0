"""`qualiface data pack/unpack/info`: byte-identical round trip, detection, clean errors."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.data.decode import decode_image, encode_jpeg
from qualiface.data.recordio import RecordIODataset

runner = CliRunner()


def _image(value: int, fmt: str) -> bytes:
    y, x = np.mgrid[0:16, 0:16]
    pixels = np.stack([x * 16, y * 16, np.full_like(x, value)], axis=2).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, quality=90)
    return out.getvalue()


@pytest.fixture
def faces(tmp_path):
    """Three identities (one with a PNG that pack must re-encode) and one empty folder."""
    root = tmp_path / "faces"
    content = {
        "Bob Smith": {"1.jpg": _image(1, "JPEG"), "2.JPG": _image(2, "JPEG")},
        "alice": {"a.jpeg": _image(3, "JPEG")},
        "carol": {"x.png": _image(4, "PNG"), "y.jpg": _image(5, "JPEG")},
    }
    for name, files in content.items():
        (root / name).mkdir(parents=True)
        for file_name, data in files.items():
            (root / name / file_name).write_bytes(data)
    (root / "empty").mkdir()
    return root, content


def _run(*args: str):
    result = runner.invoke(app, ["data", *map(str, args)])
    # Rich wraps long lines at the terminal width; join them so paths can be matched whole.
    return result, result.output.replace("\n", "")


def test_pack_then_unpack_is_byte_identical_with_names_and_labels(faces, tmp_path):
    root, content = faces
    result, output = _run("pack", root, tmp_path / "rec" / "train")
    assert result.exit_code == 0, output
    dataset = RecordIODataset(tmp_path / "rec")
    assert len(dataset) == 5 and dataset.num_classes == 3
    # Labels follow sorted identity names; sample order follows sorted file names.
    assert [dataset.read_raw(i)[1] for i in range(5)] == [0, 0, 1, 2, 2]
    result, output = _run("unpack", tmp_path / "rec" / "train.rec", tmp_path / "out")
    assert result.exit_code == 0, output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["Bob Smith", "alice", "carol"]
    for name, files in content.items():
        unpacked = sorted((out / name).iterdir())
        originals = [files[f] for f in sorted(files)]
        assert len(unpacked) == len(originals)
        for path, original in zip(unpacked, originals):
            if original[:2] == b"\xff\xd8":
                assert path.suffix == ".jpg" and path.read_bytes() == original
            else:  # the PNG was re-encoded as JPEG at --quality 95
                assert path.read_bytes() == encode_jpeg(decode_image(original), quality=95)
    assert not list(tmp_path.glob(".out.*"))  # the staging folder was renamed away


def test_reencode_and_overwrite_rules(faces, tmp_path):
    root, content = faces
    prefix = tmp_path / "train"
    assert _run("pack", root, prefix)[0].exit_code == 0
    result, output = _run("pack", root, prefix)
    assert result.exit_code == 1 and "--overwrite" in output
    result, output = _run("pack", root, prefix, "--reencode", "--quality", "50", "--overwrite")
    assert result.exit_code == 0, output
    first = RecordIODataset(prefix).read_raw(0)[0]
    assert first != content["Bob Smith"]["1.jpg"]
    assert first == encode_jpeg(decode_image(content["Bob Smith"]["1.jpg"]), quality=50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result, output = _run("unpack", prefix.with_suffix(".rec"), out)
    assert result.exit_code == 1 and "not empty" in output
    assert (out / "keep.txt").exists()


def test_pack_refuses_a_corrupt_image_and_writes_nothing(faces, tmp_path):
    root, _ = faces
    (root / "alice" / "broken.jpg").write_bytes(_image(9, "JPEG")[:100])
    result, output = _run("pack", root, tmp_path / "o" / "train")
    assert result.exit_code == 1
    assert "broken.jpg" in output and "truncated" in output
    assert not list((tmp_path / "o").iterdir())


def _packed(faces, tmp_path):
    root, _ = faces
    assert _run("pack", root, tmp_path / "train")[0].exit_code == 0
    return tmp_path / "train.rec"


def test_unpack_reports_bad_magic(faces, tmp_path):
    rec = _packed(faces, tmp_path)
    offset = RecordIODataset(rec).meta(2)["offset"]
    data = bytearray(rec.read_bytes())
    data[offset:offset + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    result, output = _run("unpack", rec, tmp_path / "out")
    assert result.exit_code == 1
    assert "bad magic" in output and "train.rec" in output and str(offset) in output
    assert not (tmp_path / "out").exists()


def test_unpack_reports_truncation_and_missing_index(faces, tmp_path):
    rec = _packed(faces, tmp_path)
    data = rec.read_bytes()
    rec.write_bytes(data[: len(data) // 2])
    result, output = _run("unpack", rec, tmp_path / "out")
    assert result.exit_code == 1 and ("truncated" in output or "past the end" in output)
    rec.write_bytes(data)
    rec.with_suffix(".idx").unlink()
    result, output = _run("info", rec)
    assert result.exit_code == 1 and "index file not found" in output


def test_info_detects_each_format(faces, tmp_path, monkeypatch):
    root, _ = faces
    rec = _packed(faces, tmp_path)
    result, output = _run("info", rec)
    assert result.exit_code == 0 and "(rec)" in output and "identities.txt" in output
    result, output = _run("info", root)
    assert result.exit_code == 0 and "(folder)" in output and "skipped empty folders" in output
    listing = tmp_path / "list.txt"
    listing.write_text("faces/alice/a.jpeg 0\nfaces/carol/y.jpg 7\n")
    result, output = _run("info", listing)
    assert result.exit_code == 0 and "(list)" in output
    assert "num_classes (max label + 1)" in output and "│ 8 │" in " ".join(output.split())
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nalice 1 2\nalice 1 carol 1\n")
    result, output = _run("info", pairs)
    assert result.exit_code == 0 and "(pairs)" in output
    result, output = _run("info", pairs, "--image-root", root)
    assert result.exit_code == 1 and "missing" in output
    verification = tmp_path / "v.bin"
    verification.write_bytes(pickle.dumps(([_image(1, "PNG"), _image(2, "PNG")], [True])))
    result, output = _run("info", verification)
    assert result.exit_code == 0 and "(bin)" in output and "16x16" in output
    result, output = _run("info", tmp_path / "nothing")
    assert result.exit_code == 1 and "no such file" in output


def test_info_on_the_shared_training_manifest(shared_data):
    result, output = _run("info", shared_data / "train.txt")
    assert result.exit_code == 0, output
    assert "18,976" in output and "4,735" in output


def test_pack_refuses_a_folder_holding_another_pack_and_keeps_its_names(faces, tmp_path):
    # property and identities.txt are per folder: a second prefix there replaced the first
    # pack's (with --overwrite), and unpacking the first then named its folders wrongly.
    root, _ = faces
    assert _run("pack", root, tmp_path / "p" / "first")[0].exit_code == 0
    names = (tmp_path / "p" / "identities.txt").read_bytes()
    other = tmp_path / "other"
    for index, name in enumerate(["x", "y", "z"]):
        (other / name).mkdir(parents=True)
        (other / name / "1.jpg").write_bytes(_image(index, "JPEG"))
    for extra in ([], ["--overwrite"]):
        result, output = _run("pack", other, tmp_path / "p" / "second", *extra)
        assert result.exit_code == 1 and "first.rec" in output and "of its own" in output
    assert (tmp_path / "p" / "identities.txt").read_bytes() == names
    assert not (tmp_path / "p" / "second.rec").exists()
    result, _ = _run("unpack", tmp_path / "p" / "first.rec", tmp_path / "out")
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Bob Smith", "alice", "carol"]


def test_unpack_overwrite_replaces_an_earlier_unpack_but_never_other_files(faces, tmp_path):
    assert _run("pack", faces[0], tmp_path / "d" / "train")[0].exit_code == 0
    rec = tmp_path / "d" / "train.rec"
    out = tmp_path / "out"
    assert _run("unpack", rec, out)[0].exit_code == 0
    assert _run("unpack", rec, out, "--overwrite")[0].exit_code == 0  # an earlier unpack
    (out / "alice" / "notes.txt").write_text("mine")
    result, output = _run("unpack", rec, out, "--overwrite")
    assert result.exit_code == 1 and "notes.txt" in output
    assert (out / "alice" / "notes.txt").read_text() == "mine"
    # The folder holding the .rec (or one above it) was deleted, the .rec with it.
    for target in (rec.parent, tmp_path):
        before = sorted(p.name for p in target.iterdir())
        result, output = _run("unpack", rec, target, "--overwrite")
        assert result.exit_code == 1 and "unpack wrote" in output
        assert sorted(p.name for p in target.iterdir()) == before and rec.is_file()
    assert not list(tmp_path.glob(".d.*")) and not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))
