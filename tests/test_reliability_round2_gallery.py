"""Reliability round 2, galleries: enrolment appends (or is refused) instead of silently replacing,
concurrent enrolments all land, a failed write keeps the old gallery, and a hostile or mistyped
``gallery.json`` gives one line naming the file and the field."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qualiface.cli import app
from qualiface.infer.io import write_table
from qualiface.infer.search import Gallery, GalleryError


def _embeddings(path: Path, people: list[str], seed: int, dim: int = 8) -> Path:
    """An embed-output table with two images per person (folder name = identity)."""
    rng = np.random.default_rng(seed)
    ids = [f"{person}/{k}.jpg" for person in people for k in range(2)]
    vectors = rng.standard_normal((len(ids), dim)).astype(np.float32)
    write_table(path, {"ids": np.array(ids), "embeddings": vectors,
                       "quality": rng.uniform(0.2, 1.0, len(ids)).astype(np.float32)})
    return path


def _enrol(*args: str):
    return CliRunner().invoke(app, ["search", "enrol", *args])


def _size(gallery: Path) -> int:
    return Gallery.load(gallery).size


def test_enrol_into_an_existing_gallery_adds_and_refuses_duplicates(tmp_path):
    gallery = tmp_path / "g"
    first = _embeddings(tmp_path / "a.npz", ["ann", "bob"], 0)
    second = _embeddings(tmp_path / "b.npz", ["cat", "dan", "eve"], 1)
    assert _enrol(str(first), "--gallery", str(gallery)).exit_code == 0
    result = _enrol(str(second), "--gallery", str(gallery))
    assert result.exit_code == 0, result.output
    assert "added to 2: 5 in all" in result.output.replace("\n", " ")
    loaded = Gallery.load(gallery)
    assert sorted(loaded.ids.tolist()) == ["ann", "bob", "cat", "dan", "eve"]
    assert [e["source"] for e in loaded.metadata["enrolments"]] == [str(first), str(second)]
    # The same identities again: refused, gallery unchanged.
    again = _enrol(str(first), "--gallery", str(gallery))
    assert again.exit_code == 1 and "already enrolled" in again.output and "--replace" in again.output
    assert "Traceback" not in again.output and _size(gallery) == 5
    # --replace starts afresh; exactly one data file is left behind.
    assert _enrol(str(first), "--gallery", str(gallery), "--replace").exit_code == 0
    assert sorted(Gallery.load(gallery).ids.tolist()) == ["ann", "bob"]
    assert len(list(gallery.glob("gallery-*.npz"))) == 1


def _enrol_rounds(gallery: str, files: list[str], barrier) -> None:
    barrier.wait()
    for file in files:
        result = _enrol(file, "--gallery", gallery)
        if result.exit_code != 0:
            raise SystemExit(f"enrol failed: {result.output}")


def test_concurrent_enrolments_into_one_gallery_lose_nothing(tmp_path):
    gallery = tmp_path / "g"
    writers, rounds = 3, 3
    files = [[str(_embeddings(tmp_path / f"w{w}r{r}.npz", [f"w{w}r{r}p{p}" for p in range(3)],
                              10 * w + r)) for r in range(rounds)] for w in range(writers)]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers)
    processes = [context.Process(target=_enrol_rounds, args=(str(gallery), files[w], barrier))
                 for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    loaded = Gallery.load(gallery)
    expected = sorted(f"w{w}r{r}p{p}" for w in range(writers) for r in range(rounds) for p in range(3))
    assert sorted(loaded.ids.tolist()) == expected
    assert len(loaded.metadata["enrolments"]) == writers * rounds
    assert len(list(gallery.glob("gallery-*.npz"))) == 1  # no torn or orphaned data files


def test_a_failed_write_keeps_the_previous_gallery(tmp_path, monkeypatch):
    gallery = tmp_path / "g"
    assert _enrol(str(_embeddings(tmp_path / "a.npz", ["ann"], 0)), "--gallery", str(gallery)).exit_code == 0

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    more = _embeddings(tmp_path / "b.npz", ["bob"], 1)
    monkeypatch.setattr(np, "savez", disk_full)
    result = _enrol(str(more), "--gallery", str(gallery))
    assert result.exit_code == 1 and "disk full" in result.output and "Traceback" not in result.output
    monkeypatch.undo()
    assert Gallery.load(gallery).ids.tolist() == ["ann"]
    left = sorted(p.name for p in gallery.iterdir() if not p.name.startswith("."))
    assert len(left) == 2 and left[1] == "gallery.json"  # no half-written data file left


@pytest.mark.parametrize("key, value, message", [
    ("nlist", "8", "'nlist' must be an integer, got str"),
    ("nprobe", 2.5, "'nprobe' must be an integer, got float"),
    ("nprobe", 0, "'nprobe' must be >= 1"),
    ("metadata", [1, 2], "'metadata' must be an object, got list"),
    ("format_version", "2", "'format_version' must be an integer, got str"),
    ("format_version", True, "'format_version' must be an integer, got bool"),
    ("files", {"arrays": "../../etc/passwd"}, "'files.arrays' must be a file name"),
    ("files", "gallery.npz", "'files' must be an object, got str"),
])
def test_gallery_json_fields_of_the_wrong_type_give_one_line(tmp_path, key, value, message):
    gallery = tmp_path / "g"
    Gallery.build(["a", "b"], np.eye(2, 4, dtype=np.float32)).save(gallery)
    info = json.loads((gallery / "gallery.json").read_text())
    info[key] = value
    (gallery / "gallery.json").write_text(json.dumps(info))
    with pytest.raises(GalleryError, match=message) as caught:
        Gallery.load(gallery)
    assert str(gallery / "gallery.json") in str(caught.value)
    result = CliRunner().invoke(app, ["search", "info", "--gallery", str(gallery)])
    assert result.exit_code == 1 and message.split(" ")[0] in result.output
    assert "Traceback" not in result.output and type(result.exception) is SystemExit


def test_a_device_or_huge_file_as_gallery_json_is_refused_without_reading_it(tmp_path):
    gallery = tmp_path / "g"
    gallery.mkdir()
    os.symlink("/dev/zero", gallery / "gallery.json")
    with pytest.raises(GalleryError, match="gallery.json: a character device, not a regular"):
        Gallery.load(gallery)
    (gallery / "gallery.json").unlink()
    with open(gallery / "gallery.json", "wb") as handle:
        handle.truncate(1 << 30)  # sparse: 1 GiB of size, no disk or memory used
    with pytest.raises(GalleryError, match="too large for a gallery.json"):
        Gallery.load(gallery)


def test_version_1_galleries_still_load(tmp_path):
    gallery = tmp_path / "g"
    gallery.mkdir()
    np.savez(gallery / "gallery.npz", ids=np.array(["a", "b"]), embeddings=np.eye(2, 4, dtype=np.float32))
    (gallery / "gallery.json").write_text(json.dumps(
        {"format": "qualiface-gallery", "format_version": 1, "backend": "exact", "nlist": None,
         "nprobe": None, "metadata": {"source": "old.npz"}}))
    loaded = Gallery.load(gallery)
    assert loaded.ids.tolist() == ["a", "b"] and loaded.metadata == {"source": "old.npz"}
