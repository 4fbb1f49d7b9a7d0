"""Bad data: every broken file kind is counted, logged by name and skipped (``data/robust.py``);
too many stop the run; structural RecordIO damage is refused up front; IJB parsers and the
wrapper are fuzzed for clean errors. Also home of ``record_counts`` (reliability_counts.json).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qualiface.data import build_dataset
from qualiface.data.decode import DataError, DecodeError, encode_jpeg
from qualiface.data.folder import ImageFolderDataset
from qualiface.data.ijb import IJBFormatError, load_ijb, read_int_columns, read_template_subjects
from qualiface.data.recordio import RecordIODataset, RecordIOError, RecordIOWriter
from qualiface.data.robust import (
    RobustDataset,
    SkipPolicy,
    TooManyBadSamplesError,
    collate_skipping,
    replacement_index,
)

# Tests must not modify tracked files: the counts go where QUALIFACE_RELIABILITY_COUNTS says
# (docs/RELIABILITY.md gives the command that refreshes bench/results/reliability_counts.json),
# otherwise to a scratch file of this test session.
COUNTS_FILE = Path(os.environ.get("QUALIFACE_RELIABILITY_COUNTS")
                   or Path(tempfile.gettempdir()) / f"qualiface-reliability-counts-{os.getuid()}.json")
COUNT_KINDS = ("files_tried", "faults_injected", "runs_resumed", "runs_compared")


def record_counts(request, **counts: int) -> None:
    """Store this test's counts in ``COUNTS_FILE`` (docs cite them).

    Keyed by test id, so reruns overwrite instead of adding up; the file is locked because
    xdist workers write concurrently. ``totals`` is recomputed on every write.
    """
    unknown = set(counts) - set(COUNT_KINDS)
    assert not unknown, f"unknown count kinds {unknown}"
    COUNTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(COUNTS_FILE, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            data = {}
        tests = data.get("tests", {})
        tests[request.node.nodeid] = {k: int(v) for k, v in counts.items()}
        totals = {kind: sum(t.get(kind, 0) for t in tests.values()) for kind in COUNT_KINDS}
        document = {"updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "totals": totals,
                    "tests": dict(sorted(tests.items()))}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(document, indent=1) + "\n")


# ----------------------------------------------------------------------------- files


def _face(seed: int, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    base = np.stack([x * 2, y * 2, (x + y)], axis=2) + rng.integers(0, 40, 3)
    return np.clip(base, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **kwargs)
    return out.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims width x height RGB pixels (30 GB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b""))


def good_files() -> dict[str, bytes]:
    """Odd but valid images: all must decode to uint8 (3, 112, 112) RGB, none counted bad."""
    face = _face(1)
    gray16 = (face[:, :, 0].astype(np.uint16) * 257)
    return {
        "plain.jpg": encode_jpeg(torch.from_numpy(face).permute(2, 0, 1).contiguous()),
        "gray.png": _save(face[:, :, 0], "PNG"),
        "cmyk.jpg": _save_cmyk(face),
        "sixteen_bit.png": _save_16bit(gray16),
        "rgba.png": _save(np.dstack([face, np.full(face.shape[:2], 128, np.uint8)]), "PNG"),
    }


def _save_cmyk(face: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(face).convert("CMYK").save(out, format="JPEG", quality=95)
    return out.getvalue()


def _save_16bit(gray16: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(gray16.astype(np.uint16)).save(out, format="PNG")  # mode I;16
    return out.getvalue()


def bad_files() -> dict[str, bytes]:
    """Each must be counted as bad and skipped (content -> the reason we expect to see)."""
    jpeg = encode_jpeg(torch.from_numpy(_face(2)).permute(2, 0, 1).contiguous())
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "zero_bytes.jpg": b"",
        "not_an_image.jpg": b"<html><body>404 Not Found</body></html>\n",
        "bomb.png": bomb_png(),
        "wrong_size.png": _save(_face(3, (90, 100)), "PNG"),
    }


EXPECTED_REASON = {
    "truncated.jpg": "truncated",
    "zero_bytes.jpg": "empty",
    "not_an_image.jpg": "not an image",
    "bomb.png": "decompression-bomb",
    "wrong_size.png": "expected 112x112",
    "unreadable.jpg": "Permission denied",
}


@pytest.fixture
def messy_folder(tmp_path, monkeypatch):
    """root/<identity>/<file>: good odd formats, every bad kind, an unreadable file and an
    empty identity folder. Returns (root, names of the bad files, how unreadable was made)."""
    root = tmp_path / "faces"
    for number, (name, data) in enumerate({**good_files(), **bad_files()}.items()):
        folder = root / f"id{number % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (root / "id_empty").mkdir()  # no images: must get no label
    unreadable = root / "id1" / "unreadable.jpg"
    unreadable.write_bytes(good_files()["plain.jpg"])
    unreadable.chmod(0)
    how = "chmod 000"
    try:
        unreadable.read_bytes()
        # Running as root: chmod does not stop reading, so simulate the permission error the
        # way the OS would raise it for that one file.
        real_read = Path.read_bytes

        def read_bytes(self):
            if self == unreadable:
                raise PermissionError(13, "Permission denied", str(self))
            return real_read(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        how = "simulated PermissionError (tests run as root)"
    except PermissionError:
        pass
    yield root, sorted([*bad_files(), "unreadable.jpg"]), how
    unreadable.chmod(0o644)


def test_every_bad_file_kind_is_counted_named_and_skipped(messy_folder, caplog, request):
    root, bad_names, how = messy_folder
    dataset = ImageFolderDataset(root)
    assert dataset.skipped_identities == ["id_empty"]  # an empty identity gets no label
    policy = SkipPolicy(max_bad_fraction=1.0, min_samples=1, image_size=(112, 112))
    robust = RobustDataset(dataset, policy)
    with caplog.at_level(logging.WARNING, logger="qualiface.data.robust"):
        items = [robust[i] for i in range(len(robust))]
    names = [Path(path).name for path, _ in dataset.samples]
    bad_index = {i for i, name in enumerate(names) if name in bad_names}
    assert len(bad_index) == len(bad_names) == 6
    for image, label in items:  # replace mode: every index answers with a valid sample
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 112, 112)
        assert 0 <= label < dataset.num_classes
    for i in set(range(len(names))) - bad_index:  # good odd formats come back unchanged
        image, label = dataset[i]
        assert torch.equal(items[i][0], image) and items[i][1] == label
    stats = robust.stats()
    # every bad file was read once directly; substitutes are good here or counted again
    assert stats.bad >= len(bad_names) and stats.replaced == len(bad_names)
    assert stats.seen == len(names) + stats.replaced + (stats.bad - len(bad_names))
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "qualiface.data.robust"]
    for name in bad_names:  # logged with the file name and the reason
        line = next(message for message in logged if name in message)
        assert EXPECTED_REASON[name].lower() in line.lower(), (name, line, how)
    assert not any("id_empty" in message for message in logged)  # not a sample at all
    # substitutes are a pure function of the index: a second wrapper gives the same samples
    again = RobustDataset(ImageFolderDataset(root), policy)
    for i in bad_index:
        assert torch.equal(again[i][0], items[i][0]) and again[i][1] == items[i][1]
    record_counts(request, files_tried=len(names) + 1)


def test_wrong_size_can_be_resized_instead_and_is_counted(messy_folder):
    root, _, _ = messy_folder
    dataset = ImageFolderDataset(root)
    index = next(i for i, (p, _) in enumerate(dataset.samples) if p.name == "wrong_size.png")
    robust = RobustDataset(dataset, SkipPolicy(image_size=(112, 112), wrong_size="resize",
                                               max_bad_fraction=1.0))
    image, label = robust[index]
    assert tuple(image.shape) == (3, 112, 112) and label == dataset.samples[index][1]
    expected = torch.nn.functional.interpolate(dataset[index][0][None].float(), size=(112, 112),
                                               mode="bilinear", antialias=True)
    assert torch.equal(image, expected.round().clamp(0, 255).to(torch.uint8)[0])
    assert robust.stats().resized == 1 and robust.stats().bad == 0


def test_too_many_bad_samples_stop_with_a_summary(messy_folder):
    root, bad_names, _ = messy_folder
    robust = RobustDataset(ImageFolderDataset(root),
                           SkipPolicy(max_bad_fraction=0.2, min_samples=4,
                                      image_size=(112, 112)))
    with pytest.raises(TooManyBadSamplesError) as caught:
        for i in range(len(robust)):
            robust[i]
    error = caught.value
    assert isinstance(error, DataError) and error.bad / error.seen > 0.2 and error.seen >= 4
    assert "max_bad_fraction" in str(error)
    assert any(name in str(error) for name in bad_names)
    assert error.first_bad and all(any(n in line for n in bad_names) for line in error.first_bad)


def test_train_cli_reports_too_many_bad_samples_without_a_traceback(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from qualiface.cli import app

    for ident in range(2):
        folder = tmp_path / "faces" / f"id{ident}"
        folder.mkdir(parents=True)
        for k in range(4):
            data = _save(_face(k, (16, 16)), "PNG") if k == 0 else b"broken"
            (folder / f"{k}.png").write_bytes(data)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"backbone": "iresnet-nano",
                  "params": {"input_size": 16, "base_width": 2, "embedding_size": 4}},
        "data": {"name": "robust", "num_workers": 0,
                 "params": {"dataset": "folder", "params": {"root": str(tmp_path / "faces")},
                            "min_samples": 4}},
        "train": {"steps": 2, "batch_size": 4, "device": "cpu", "progress": False,
                  "output_dir": str(tmp_path / "out")},
    }))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 1 and "max_bad_fraction" in result.output, result.output
    # CliRunner records every non-zero exit as SystemExit(code); anything else escaped.
    assert "Traceback" not in result.output and type(result.exception) is SystemExit


class _Flaky(torch.utils.data.Dataset):
    """In-memory dataset where the listed indices raise a DecodeError (or give bad labels)."""

    def __init__(self, n: int, bad: set[int], bad_label: set[int] = frozenset()) -> None:
        self.n, self.bad, self.bad_label = n, set(bad), set(bad_label)
        self.num_classes = 5

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            raise DecodeError(f"mem/{i}.jpg", "truncated JPEG")
        label = 99 if i in self.bad_label else i % self.num_classes
        return torch.full((3, 4, 4), i % 256, dtype=torch.uint8), label

    def meta(self, i: int) -> dict:
        return {"path": f"mem/{i}.jpg"}


def test_threshold_fires_exactly_when_the_policy_says(request):
    bad = set(range(7, 200, 10))  # one in ten
    policy = SkipPolicy(max_bad_fraction=0.05, min_samples=30, on_bad="skip")
    robust = RobustDataset(_Flaky(200, bad), policy)
    # independent model: read i in order, stop at the first read where the rule holds
    seen = bad_count = 0
    expected_stop = None
    for i in range(200):
        seen += 1
        bad_count += i in bad
        if i in bad and seen >= 30 and bad_count / seen > 0.05:
            expected_stop = i
            break
    for i in range(expected_stop):
        result = robust[i]
        assert (result is None) == (i in bad)
    with pytest.raises(TooManyBadSamplesError, match=r"4 of 38 samples"):
        robust[expected_stop]
    assert robust.stats().first_bad[0].startswith("mem/7.jpg")
    record_counts(request, faults_injected=len(bad))


def test_labels_out_of_range_are_bad_samples():
    robust = RobustDataset(_Flaky(10, set(), bad_label={3}), SkipPolicy(on_bad="skip",
                                                                       max_bad_fraction=1.0))
    assert robust[3] is None and robust[4] is not None
    assert "label 99 out of range [0, 5)" in robust.stats().first_bad[0]


def test_skip_mode_counts_reads_made_in_dataloader_workers():
    bad = {2, 5, 11, 17}
    robust = RobustDataset(_Flaky(24, bad), SkipPolicy(on_bad="skip", max_bad_fraction=1.0))
    loader = torch.utils.data.DataLoader(robust, batch_size=6, num_workers=2,
                                         collate_fn=collate_skipping)
    kept = torch.cat([labels for batch in loader if batch is not None for _, labels in [batch]])
    assert len(kept) == 24 - len(bad)
    stats = robust.stats()  # the parent sees what the worker processes counted
    assert (stats.seen, stats.bad) == (24, len(bad))
    assert sorted(stats.first_bad) == sorted(f"mem/{i}.jpg: DecodeError: cannot decode image: "
                                             "truncated JPEG" for i in bad)
    assert collate_skipping([None, None]) is None


def test_too_many_bad_raised_in_a_worker_reaches_the_parent_as_itself():
    robust = RobustDataset(_Flaky(40, set(range(0, 40, 2))),
                           SkipPolicy(min_samples=4, max_bad_fraction=0.1))
    loader = torch.utils.data.DataLoader(robust, batch_size=8, num_workers=1)
    with pytest.raises(TooManyBadSamplesError, match="max_bad_fraction"):
        list(loader)


def test_replacement_index_is_deterministic_and_never_itself():
    for n in (2, 3, 10, 1000):
        for i in range(min(n, 50)):
            subs = [replacement_index(i, attempt, n) for attempt in range(5)]
            assert all(0 <= s < n and s != i for s in subs)
            assert subs == [replacement_index(i, attempt, n) for attempt in range(5)]
    with pytest.raises(ValueError):
        replacement_index(0, 0, 1)


def test_policy_validation_and_registry_entry(tmp_path):
    for name in ("ann", "bob"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.png").write_bytes(_save(_face(len(name)), "PNG"))
    with pytest.raises(ValueError, match="max_bad_fraction"):
        SkipPolicy(max_bad_fraction=1.5)
    with pytest.raises(ValueError, match="on_bad"):
        SkipPolicy(on_bad="ignore")
    with pytest.raises(ValueError, match="image_size"):
        SkipPolicy(image_size=(112, 0))
    with pytest.raises(TypeError, match="unknown policy key"):
        build_dataset("robust", dataset="folder", params={"root": str(tmp_path)}, max_bad=0.1)
    wrapped = build_dataset("robust", dataset="folder", params={"root": str(tmp_path)},
                            image_size=[112, 112])
    assert len(wrapped) == 2 and wrapped.num_classes == 2
    assert wrapped.policy.image_size == (112, 112)
    image, label = wrapped[1]
    assert tuple(image.shape) == (3, 112, 112) and label == 1
    assert wrapped.identities == ["ann", "bob"]  # other attributes pass through
    assert wrapped.meta(1)["path"].endswith("bob/0.png")


# ----------------------------------------------------------------------------- RecordIO


def _write_rec(folder: Path, count: int = 8) -> Path:
    prefix = folder / "train"
    with RecordIOWriter(prefix) as writer:
        for k in range(count):
            face = torch.from_numpy(_face(k, (16, 16))).permute(2, 0, 1).contiguous()
            writer.add(encode_jpeg(face), label=k // 2)
    return prefix.with_suffix(".rec")


def _offsets(rec: Path) -> dict[int, int]:
    lines = rec.with_suffix(".idx").read_text().split("\n")
    return {int(k): int(v) for k, v in (line.split("\t") for line in lines if line)}


def test_corrupt_record_in_the_middle_and_bad_label_are_skipped(tmp_path, request):
    rec = _write_rec(tmp_path)
    offsets = _offsets(rec)
    blob = bytearray(rec.read_bytes())
    blob[offsets[4]:offsets[4] + 4] = b"\xde\xad\xbe\xef"  # record 4: magic destroyed
    blob[offsets[6] + 12:offsets[6] + 16] = struct.pack("<f", 999.0)  # record 6: label 999
    rec.write_bytes(bytes(blob))
    robust = RobustDataset(RecordIODataset(rec), SkipPolicy(on_bad="skip", max_bad_fraction=1.0))
    results = [robust[i] for i in range(len(robust))]
    keys = [robust.record_key(i) for i in range(len(robust))]
    assert [keys[i] for i, r in enumerate(results) if r is None] == [4, 6]
    first_bad = robust.stats().first_bad
    assert f"{rec} record 4" in first_bad[0] or f"{rec} at byte {offsets[4]}" in first_bad[0]
    assert "999" in first_bad[1]
    good = [r for r in results if r is not None]
    assert len(good) == 6 and all(tuple(img.shape) == (3, 16, 16) for img, _ in good)
    record_counts(request, files_tried=2)


@pytest.mark.parametrize("damage, message", [
    (lambda idx, size: idx.write_text(idx.read_text() + f"99\t{size + 100}\n"), "past the end"),
    (lambda idx, size: idx.write_text(idx.read_text() + idx.read_text().split("\n")[3] + "\n"),
     "appears twice"),
    (lambda idx, size: idx.write_text("1\tnot-a-number\n"), "expected 'key<TAB>offset'"),
])
def test_structural_index_damage_is_refused_up_front_not_skipped(tmp_path, damage, message):
    # The index defines which samples exist, so a broken index is not a "bad sample": the
    # robust wrapper must not hide it.
    rec = _write_rec(tmp_path)
    damage(rec.with_suffix(".idx"), rec.stat().st_size)
    with pytest.raises(RecordIOError, match=message) as caught:
        build_dataset("robust", dataset="recordio", params={"path": str(rec)})
    assert str(rec.with_suffix(".idx")) in str(caught.value)


# ----------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=120, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
_DIGITS_AND_JUNK = st.sampled_from(list("0123456789 \t\n\r-x,.")
                                   + ["\xff", "\x00", "12345678901234567890"])


def _naive_int_columns(data: bytes, columns: int) -> np.ndarray | None:
    """Reference parse with str.split; None when the file is not valid for ``columns``."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    rows = []
    for line in text.split("\n"):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns or not all(f.isdigit() and len(f) <= 18 for f in fields):
            return None
        rows.append([int(f) for f in fields])
    return np.asarray(rows, dtype=np.int64).reshape(-1, columns) if rows else None


@FUZZ
@given(st.lists(_DIGITS_AND_JUNK, max_size=80).map("".join), st.integers(1, 4),
       st.integers(1, 64))
def test_fuzz_ijb_int_reader_clean_errors_or_the_naive_result(text, columns, chunk):
    data = text.encode("latin-1")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.txt"
        path.write_bytes(data)
        expected = _naive_int_columns(data, columns)
        try:
            got = read_int_columns(path, columns, chunk_bytes=chunk)
        except IJBFormatError as exc:
            assert str(path) in str(exc)
            assert expected is None, f"valid file refused: {exc}"
            return
        if expected is None and not data.strip():
            # whitespace-only: an empty table is acceptable as well as an "empty file" error
            assert got.shape == (0, columns)
            return
        assert expected is not None and np.array_equal(got, expected)


_CSV_CELLS = st.sampled_from(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME", "1", "2", "17", "x",
                              "", "-3", " 4", "1.5", '"', "\xe9", "\r"])


@FUZZ
@given(st.lists(st.lists(_CSV_CELLS, max_size=4).map(",".join), max_size=6).map("\n".join))
def test_fuzz_ijb_csv_reader_gives_only_clean_errors(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ijbc_1N_probe_mixed.csv"
        path.write_bytes(text.encode("utf-8"))
        try:
            ids, subjects = read_template_subjects(path)
        except IJBFormatError as exc:
            assert str(path) in str(exc)
            return
        assert len(ids) == len(subjects) == len(set(ids.tolist())) > 0


_META_TEXT = st.lists(st.sampled_from(["a.jpg", "b.jpg", "1", "2", "0", "7", "0.5", "x",
                                       " ", "\n", "\t", "-1", "nan", "1e400", "\xe9"]),
                      max_size=40).map("".join)


@settings(FUZZ, max_examples=60)
@given(_META_TEXT, _META_TEXT, st.one_of(st.none(), _META_TEXT))
def test_fuzz_ijb_protocol_loader_gives_only_clean_errors(faces, pairs, landmarks):
    with tempfile.TemporaryDirectory() as folder:
        meta = Path(folder) / "IJBC" / "meta"
        meta.mkdir(parents=True)
        (meta / "ijbc_face_tid_mid.txt").write_text(faces, encoding="utf-8")
        (meta / "ijbc_template_pair_label.txt").write_text(pairs, encoding="utf-8")
        if landmarks is not None:
            (meta / "ijbc_name_5pts_score.txt").write_text(landmarks, encoding="utf-8")
        try:
            protocol = load_ijb(folder, "IJBC")
        except IJBFormatError as exc:
            assert str(meta) in str(exc), exc  # names the offending file
            return
        assert len(protocol.images) == len(protocol.template_ids) > 0
        assert set(protocol.pair_first.tolist()) <= set(protocol.template_ids.tolist())


@pytest.mark.parametrize("which", ["ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt",
                                   "ijbc_1N_probe_mixed.csv"])
def test_non_utf8_ijb_files_give_a_clean_error(tmp_path, which):
    meta = tmp_path / "IJBC" / "meta"
    meta.mkdir(parents=True)
    (meta / "ijbc_face_tid_mid.txt").write_text("a.jpg 1 1\nb.jpg 2 2\n")
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 0\n")
    (meta / "ijbc_1N_gallery_G1.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n1,1\n")
    (meta / which).write_bytes(b"\xff\xfe junk 1 2\n")
    with pytest.raises(IJBFormatError, match=which):
        load_ijb(tmp_path, "IJBC")


@FUZZ
@given(st.integers(2, 60), st.sets(st.integers(0, 59)), st.floats(0.0, 1.0),
       st.integers(1, 30), st.sampled_from(["replace", "skip"]))
def test_fuzz_robust_wrapper_counts_match_an_independent_model(n, bad, fraction, minimum,
                                                               on_bad):
    bad = {i for i in bad if i < n}
    robust = RobustDataset(_Flaky(n, bad), SkipPolicy(max_bad_fraction=fraction,
                                                      min_samples=minimum, on_bad=on_bad,
                                                      max_replacement_tries=4))
    seen = bad_count = 0

    def over() -> bool:
        return seen >= minimum and bad_count / seen > fraction

    for i in range(n):
        # the model: read i; if bad and replacing, read substitutes until one is good
        reads = [i]
        if i in bad and on_bad == "replace":
            reads += [replacement_index(i, a, n) for a in range(4)]
        stopped = False
        outcome = None
        for position, j in enumerate(reads):
            seen += 1
            if j not in bad:
                outcome = j
                break
            bad_count += 1
            if over():
                stopped = True
                break
        if stopped or (outcome is None and on_bad == "replace"):
            with pytest.raises(TooManyBadSamplesError):
                robust[i]
            return
        result = robust[i]
        if outcome is None:
            assert result is None
        else:
            assert int(result[0][0, 0, 0]) == outcome % 256 and result[1] == outcome % 5
        assert (robust.stats().seen, robust.stats().bad) == (seen, bad_count)
