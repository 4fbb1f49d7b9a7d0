"""InsightFace RecordIO: byte layout, split records, both dataset layouts, writer, errors, fuzz."""

from __future__ import annotations

import io
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qualiface.data import DATASETS
from qualiface.data.decode import DataError, DecodeError
from qualiface.data.recordio import (
    MAGIC,
    RecordIODataset,
    RecordIOError,
    RecordIOWriter,
    frame_record,
    iter_records,
    pack_record,
    read_frame,
    read_identity_names,
    rebuild_index,
    unpack_record,
)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _piece(cflag: int, data: bytes) -> bytes:
    """One dmlc frame built by hand: magic, cflag<<29|len, data, zero padding to 4 bytes."""
    return struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data + b"\0" * (-len(data) % 4)


def _header(flag: int, label: float, record_id: int, labels=()) -> bytes:
    """mxnet IRHeader 'IfQQ' (+ extra float labels) built by hand."""
    return struct.pack("<IfQQ", flag, label, record_id, 0) + struct.pack(f"<{len(labels)}f",
                                                                         *labels)


def _png(value: int, size: int = 8) -> bytes:
    pixels = np.full((size, size, 3), value, np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _write_raw(folder: Path, records: list[tuple[int, bytes]], prefix: str = "train") -> Path:
    """Write payloads with hand-built frames and a matching .idx; returns the .rec path."""
    folder.mkdir(parents=True, exist_ok=True)
    blob, lines = b"", []
    for key, payload in records:
        lines.append(f"{key}\t{len(blob)}\n")
        blob += _piece(0, payload)
    (folder / f"{prefix}.rec").write_bytes(blob)
    (folder / f"{prefix}.idx").write_text("".join(lines))
    return folder / f"{prefix}.rec"


def test_frame_layout_matches_the_dmlc_format():
    assert frame_record(b"abcde") == _piece(0, b"abcde")
    assert len(frame_record(b"abcd")) == 8 + 4
    # Aligned magic words split the record: start (1), middle (2), end (3); the words vanish.
    payload = b"AAAA" + MAGIC_BYTES + b"BBBBBBBB" + MAGIC_BYTES + b"CC"
    expected = _piece(1, b"AAAA") + _piece(2, b"BBBBBBBB") + _piece(3, b"CC")
    assert frame_record(payload) == expected
    assert read_frame(expected, 0) == (payload, len(expected))
    # Unaligned occurrences are left alone, as in dmlc.
    unaligned = b"X" + MAGIC_BYTES + b"YYY"
    assert frame_record(unaligned) == _piece(0, unaligned)
    # Magic at the very start and end: empty first and last pieces.
    edge = MAGIC_BYTES + b"ZZZZ" + MAGIC_BYTES
    framed = frame_record(edge)
    assert framed == _piece(1, b"") + _piece(2, b"ZZZZ") + _piece(3, b"")
    assert read_frame(framed, 0)[0] == edge


def test_header_pack_and_unpack_match_mxnet_layout():
    assert pack_record(3, b"img", record_id=7) == _header(0, 3.0, 7) + b"img"
    assert pack_record((5.0, 9.0), record_id=1) == _header(2, 0.0, 1, (5.0, 9.0))
    header, image = unpack_record(_header(2, 0.0, 4, (12.0, 1.0)) + b"jpeg")
    assert (header.flag, header.labels, header.label, header.id, image) == (
        2, (12.0, 1.0), 12.0, 4, b"jpeg")
    with pytest.raises(RecordIOError, match="shorter than"):
        unpack_record(b"\0" * 10, source="x.rec", offset=8)
    with pytest.raises(RecordIOError, match="announces 1000 labels"):
        unpack_record(_header(1000, 0.0, 0))


def _insightface_layout(folder: Path) -> tuple[Path, list[tuple[bytes, int]]]:
    """A hand-built train.rec in InsightFace layout: record 0, 5 images, 2 identity headers.

    Image records use both label conventions (scalar flag 0, and flag > 0 with a label vector).
    """
    images = [(_png(10 * i), label) for i, label in enumerate([0, 0, 0, 1, 1])]
    records = [(0, _header(2, 0.0, 0, (6.0, 8.0)))]
    for key, (png, label) in enumerate(images, start=1):
        head = _header(0, float(label), key) if key % 2 else _header(2, 0.0, key,
                                                                     (float(label), 99.0))
        records.append((key, head + png))
    records += [(6, _header(2, 0.0, 6, (1.0, 4.0))), (7, _header(2, 0.0, 7, (4.0, 6.0)))]
    rec = _write_raw(folder, records)
    (folder / "property").write_text("2,8,8\n")
    return rec, images


def test_reads_insightface_layout_with_identity_block(tmp_path):
    rec, images = _insightface_layout(tmp_path / "ds")
    for path in (tmp_path / "ds", tmp_path / "ds" / "train", rec, rec.with_suffix(".idx")):
        dataset = DATASETS.get("recordio")(path=path)
        assert len(dataset) == 5 and dataset.num_classes == 2
    assert dataset.identity_block == (6, 8) and dataset.image_size == (8, 8)
    for index, (png, label) in enumerate(images):
        image, got = dataset[index]
        assert got == label
        assert torch.equal(image, torch.full((3, 8, 8), 10 * index, dtype=torch.uint8))
        assert dataset.read_raw(index)[0] == png
        assert dataset.meta(index)["record"] == index + 1
        assert dataset.meta(index)["id"] == index + 1
    assert dataset.identity_ranges().tolist() == [[1, 4], [4, 6]]


def test_reads_flat_layout_without_header_or_property(tmp_path):
    records = [(key, _header(0, float(label), key) + _png(label)) for key, label in
               enumerate([3, 1, 0])]
    _write_raw(tmp_path, records, prefix="flat")
    dataset = RecordIODataset(tmp_path / "flat.rec")
    assert dataset.identity_block is None and dataset.identity_ranges() is None
    assert len(dataset) == 3 and dataset.num_classes == 4  # scanned: max label + 1
    assert [dataset[i][1] for i in range(3)] == [3, 1, 0]


def test_fingerprint_tells_another_pack_from_a_moved_copy(tmp_path):
    import shutil

    _insightface_layout(tmp_path / "ds")
    first = RecordIODataset(tmp_path / "ds").fingerprint()
    shutil.copytree(tmp_path / "ds", tmp_path / "moved")
    assert RecordIODataset(tmp_path / "moved").fingerprint() == first
    records = [(key, _header(0, float(label), key) + _png(label)) for key, label in enumerate([3, 1, 0])]
    _write_raw(tmp_path / "other", records)
    assert RecordIODataset(tmp_path / "other").fingerprint() != first


def test_split_records_are_reassembled_by_the_dataset(tmp_path):
    # A payload with an aligned magic word, written in dmlc's split form by hand.
    png = _png(77)
    payload = _header(0, 0.0, 0) + png
    payload += b"\0" * (-len(payload) % 4) + MAGIC_BYTES + b"tail"
    header = _header(0, 0.0, 0)
    cut = len(payload) - 8
    blob = _piece(1, payload[:cut]) + _piece(3, payload[cut + 4:])
    (tmp_path / "s.rec").write_bytes(blob)
    (tmp_path / "s.idx").write_text("0\t0\n")
    dataset = RecordIODataset(tmp_path / "s.rec")
    raw, label, _ = dataset.read_raw(0)
    assert raw == payload[len(header):] and label == 0
    assert list(iter_records(tmp_path / "s.rec")) == [(0, payload)]


def test_writer_round_trip_and_insightface_record_zero(tmp_path):
    blobs = [(_png(i), label) for i, label in enumerate([0, 0, 1, 3, 3, 3])]
    with RecordIOWriter(tmp_path / "out" / "train", identity_names=list("abcd")) as writer:
        for png, label in blobs:
            writer.add(png, label)
    folder = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == [
        "identities.txt", "property", "train.idx", "train.rec"]
    assert (folder / "property").read_text() == "4,8,8\n"
    assert (folder / "identities.txt").read_text() == "0\ta\n1\tb\n2\tc\n3\td\n"
    # Record 0, parsed independently: flag 2, labels (first identity record, end).
    raw = (folder / "train.rec").read_bytes()
    magic, word = struct.unpack_from("<II", raw, 0)
    assert magic == MAGIC and word >> 29 == 0
    flag, _, _, _, first, end = struct.unpack_from("<IfQQff", raw, 8)
    assert (flag, first, end) == (2, 7.0, 11.0)
    # .idx offsets point at each record in order.
    offsets = [int(line.split("\t")[1]) for line in
               (folder / "train.idx").read_text().splitlines()]
    assert offsets == [offset for offset, _ in iter_records(folder / "train.rec")]
    dataset = RecordIODataset(folder)
    assert len(dataset) == 6 and dataset.num_classes == 4
    for index, (png, label) in enumerate(blobs):
        data, got, header = dataset.read_raw(index)
        assert (data, got, header.id) == (png, label, index + 1)
    # Label 2 has no image: an empty range, so identity ranges stay contiguous.
    assert dataset.identity_ranges().tolist() == [[1, 3], [3, 4], [4, 4], [4, 7]]


@pytest.mark.parametrize("name", ["a\x0cb", "caf\x85", "x\u2028y", "p\x1cq", "t\x1dr\x1es"])
def test_identity_names_with_unicode_line_separators_read_back(tmp_path, name):
    # Legal folder names that str.splitlines() would split: the pack must read back as written.
    names = ["alice", name, "carol"]
    with RecordIOWriter(tmp_path / "train", identity_names=names) as writer:
        for label in range(3):
            writer.add(_png(label), label)
    assert read_identity_names(tmp_path) == names
    (tmp_path / "identities.txt").write_bytes(b"0\talice\r\n1\tbob\r\n")  # CRLF tolerated
    assert read_identity_names(tmp_path) == ["alice", "bob"]


def test_pack_without_names_removes_a_stale_identities_file(tmp_path):
    with RecordIOWriter(tmp_path / "train", identity_names=["alice", "bob"]) as writer:
        writer.add(_png(1), 0)
        writer.add(_png(2), 1)
    # A new pack at the same place, without names: the old names do not describe it.
    with RecordIOWriter(tmp_path / "train") as writer:
        writer.add(_png(3), 0)
        writer.add(_png(4), 1)
    assert read_identity_names(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["property", "train.idx", "train.rec"]
    # A failed pack leaves the previous one, names included, untouched.
    with RecordIOWriter(tmp_path / "train", identity_names=["x", "y"]) as writer:
        writer.add(_png(1), 0)
        writer.add(_png(2), 1)
    with pytest.raises(RuntimeError, match="boom"):
        with RecordIOWriter(tmp_path / "train") as writer:
            writer.add(_png(1), 0)
            raise RuntimeError("boom")
    assert read_identity_names(tmp_path) == ["x", "y"]


def test_writer_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with RecordIOWriter(tmp_path / "train") as writer:
            writer.add(_png(1), 0)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    writer = RecordIOWriter(tmp_path / "train")
    writer.add(_png(1), 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        writer.add(_png(1), 0)
    with pytest.raises(DecodeError):
        writer.add(b"not an image", 1)
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no images"):
        RecordIOWriter(tmp_path / "empty").commit()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def packed(tmp_path):
    with RecordIOWriter(tmp_path / "train") as writer:
        for label in range(3):
            writer.add(_png(label), label)
    return tmp_path / "train.rec"


def test_bad_magic_names_file_and_offset(packed):
    dataset = RecordIODataset(packed)
    offset = dataset.meta(1)["offset"]
    data = bytearray(packed.read_bytes())
    data[offset:offset + 4] = b"JUNK"
    packed.write_bytes(bytes(data))
    with pytest.raises(RecordIOError) as info:
        RecordIODataset(packed)[1]
    assert str(packed) in str(info.value) and f"byte {offset}" in str(info.value)
    assert "bad magic" in str(info.value)


def test_truncated_file_and_bad_index_are_reported(tmp_path):
    # Without the identity block the last image is the last record, so a cut lands in it.
    with RecordIOWriter(tmp_path / "flat", identity_block=False) as writer:
        for label in range(3):
            writer.add(_png(label), label)
    packed = tmp_path / "flat.rec"
    data = packed.read_bytes()
    last = RecordIODataset(packed).meta(2)["offset"]
    packed.write_bytes(data[:last + 20])  # cut inside the last image record
    with pytest.raises(RecordIOError, match="truncated record"):
        RecordIODataset(packed)[2]
    packed.write_bytes(data[:last])  # cut before it: the index now points past the end
    with pytest.raises(RecordIOError, match="past the end"):
        RecordIODataset(packed)
    packed.write_bytes(data)
    idx = packed.with_suffix(".idx")
    idx.write_text(idx.read_text() + "oops\n")
    with pytest.raises(RecordIOError, match=r"line \d+: expected 'key<TAB>offset'"):
        RecordIODataset(packed)
    idx.unlink()
    with pytest.raises(RecordIOError, match="index file not found"):
        RecordIODataset(packed)
    assert rebuild_index(packed) == idx  # a scan recreates it
    assert len(RecordIODataset(packed)) == 3


def test_label_out_of_range_is_reported(tmp_path):
    # A flat pack: with an identity block, 'property' must agree with it (tested below).
    with RecordIOWriter(tmp_path / "train", identity_block=False) as writer:
        for label in range(3):
            writer.add(_png(label), label)
    (tmp_path / "property").write_text("2,8,8\n")  # claims 2 classes, label 2 exists
    dataset = RecordIODataset(tmp_path / "train.rec")
    assert dataset[1][1] == 1
    with pytest.raises(RecordIOError, match=r"label 2.0 out of range \[0, 2\)"):
        dataset[2]


def test_missing_rec_and_ambiguous_folder(tmp_path):
    with pytest.raises(RecordIOError, match="not found"):
        RecordIODataset(tmp_path / "nothing.rec")
    (tmp_path / "a.rec").write_bytes(b"")
    (tmp_path / "b.rec").write_bytes(b"")
    with pytest.raises(RecordIOError, match="expected one .rec"):
        RecordIODataset(tmp_path)


def test_reopens_per_process_and_pickles_without_the_file_handle(packed):
    dataset = RecordIODataset(packed)
    first = dataset[0][0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._buffer is None and torch.equal(clone[0][0], first)
    dataset._pid = -1  # as seen from a forked worker: the map must be recreated
    old = dataset._buffer
    assert torch.equal(dataset[0][0], first) and dataset._buffer is not old
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)
    assert sorted(int(label) for _, label in loader) == [0, 1, 2]


# ----------------------------------------------------------------------------- fuzzing


def _read_everything(rec_bytes: bytes, idx_text: str | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        rec = Path(folder) / "f.rec"
        rec.write_bytes(rec_bytes)
        if idx_text is None:
            try:
                rebuild_index(rec)
            except RecordIOError:
                return
        else:
            rec.with_suffix(".idx").write_text(idx_text, encoding="utf-8")
        try:
            dataset = RecordIODataset(rec)
            for index in range(len(dataset)):
                dataset[index]
                dataset.meta(index)
            dataset.identity_ranges()
        except (RecordIOError, DecodeError):
            pass  # the only acceptable failures; anything else fails the test


def _valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        with RecordIOWriter(Path(folder) / "v") as writer:
            writer.add(_png(5, size=4), 0)
            writer.add(_png(6, size=4), 1)
        return (Path(folder) / "v.rec").read_bytes()


VALID = _valid_file()
FUZZ = settings(max_examples=150, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300), st.one_of(st.none(), st.text(max_size=60)))
def test_fuzz_arbitrary_bytes_give_only_clean_errors(rec_bytes, idx_text):
    _read_everything(rec_bytes, idx_text)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)))
def test_fuzz_corrupted_valid_files_give_only_clean_errors(flips, cut):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    _read_everything(bytes(data[:cut]), None)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=40)), min_size=1, max_size=5))
def test_fuzz_random_frame_sequences(pieces):
    rec = b"".join(_piece(cflag, data) for cflag, data in pieces)
    _read_everything(rec, None)
    _read_everything(rec, "0\t0\n")


def test_errors_are_one_family():
    assert issubclass(RecordIOError, DataError) and issubclass(RecordIOError, ValueError)


def test_index_with_keys_sharing_one_offset_is_refused(tmp_path):
    # 16 "images" that are one: every key points at the same record.
    rec = _write_raw(tmp_path, [(0, _header(0, 0.0, 0) + _png(1))], prefix="dup")
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(f"{key}\t0\n" for key in range(16)))
    with pytest.raises(RecordIOError, match="keys 0 and 1 share byte offset 0") as info:
        RecordIODataset(rec)
    assert str(idx) in str(info.value)
    # Offsets 4 bytes apart cannot both start a record (a frame header alone is 8 bytes).
    rec.write_bytes(rec.read_bytes() + _piece(0, _header(0, 0.0, 1) + _png(2)))
    idx.write_text("0\t0\n1\t4\n")
    with pytest.raises(RecordIOError, match="overlapping records"):
        RecordIODataset(rec)


def test_index_pointing_inside_another_record_is_refused_on_read(tmp_path):
    # Record 0's payload hides a complete frame; the index lists it as a second record.
    inner = _piece(0, _header(0, 0.0, 1) + _png(3))
    outer_payload = _header(0, 0.0, 0) + _png(4)
    outer_payload += b"\0" * (-len(outer_payload) % 4)
    inner_offset = 8 + len(outer_payload)
    rec = tmp_path / "nested.rec"
    rec.write_bytes(_piece(0, outer_payload + inner))
    rec.with_suffix(".idx").write_text(f"1\t0\n2\t{inner_offset}\n")  # no key 0: flat
    with pytest.raises(RecordIOError, match=f"past the indexed record at byte {inner_offset}"):
        RecordIODataset(rec)  # the label scan reads every record
    (tmp_path / "property").write_text("1,8,8\n")  # no scan: refused when the record is read
    dataset = RecordIODataset(rec)
    assert dataset[1][1] == 0  # the hidden record itself reads fine on its own...
    with pytest.raises(RecordIOError, match="overlapping records"):
        dataset[0]  # ...but the record around it would read the same bytes again


def test_property_disagreeing_with_the_identity_block_is_refused(packed):
    # The writer's pack holds 3 identities; a 'property' from another pack says otherwise.
    prop = packed.parent / "property"
    for wrong in ("2,8,8\n", "5,8,8\n"):
        prop.write_text(wrong)
        with pytest.raises(RecordIOError) as info:
            RecordIODataset(packed)
        message = str(info.value)
        assert message.startswith(f"{prop}: 'property' says {wrong[0]} classes but record 0 of")
        assert str(packed) in message and "lists 3 identities (records 4..6)" in message
        assert "\n" not in message
    prop.write_text("3,8,8\n")
    assert RecordIODataset(packed).num_classes == 3


def test_records_after_the_identity_block_are_ignored_with_a_warning(packed, caplog):
    idx = packed.with_suffix(".idx")
    with caplog.at_level("WARNING", logger="qualiface.data.recordio.dataset"):
        assert RecordIODataset(packed).identity_block == (4, 7)
    assert not caplog.records  # the writer's own pack reads silently
    # Two images appended after the block (keys 7 and 8): the block does not cover them.
    data = packed.read_bytes()
    lines = idx.read_text()
    for key in (7, 8):
        lines += f"{key}\t{len(data)}\n"
        data += frame_record(pack_record(0.0, _png(key), record_id=key))
    packed.write_bytes(data)
    idx.write_text(lines)
    with caplog.at_level("WARNING", logger="qualiface.data.recordio.dataset"):
        dataset = RecordIODataset(packed)
    assert len(dataset) == 3 and dataset.num_classes == 3
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{packed}: ignoring 2 record(s) after the identity block "
                              "(keys 7..8)")


@pytest.mark.parametrize("first, end", [(2.0, 2.0), (2.5, 3.0), (2.0, 3.5)])
def test_identity_range_that_is_empty_or_fractional_is_refused(tmp_path, first, end):
    # (2, 2) once opened with num_classes 0 and failed only when each image was read; 2.5 was
    # truncated to record 2 without a word.
    records = [(0, _header(2, 0.0, 0, (first, end))), (1, _header(0, 0.0, 1) + _png(1)),
               (2, _header(2, 0.0, 2, (1.0, 2.0))), (3, _header(2, 0.0, 3, (2.0, 2.0)))]
    rec = _write_raw(tmp_path, records)
    with pytest.raises(RecordIOError, match="record 0 has an invalid identity range") as info:
        RecordIODataset(rec)
    assert f"{rec} at byte 0" in str(info.value)
