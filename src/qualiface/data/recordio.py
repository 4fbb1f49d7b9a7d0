"""InsightFace RecordIO (``.rec``, ``.idx``, ``property``), read and written in pure Python.

Framing (dmlc RecordIO, little-endian): every record is ``uint32 magic 0xCED7230A``, ``uint32
cflag << 29 | length``, then ``length`` payload bytes padded with zeros to a multiple of 4. A
payload containing the magic word at a 4-byte-aligned position is split there (dmlc's writer
does this so a reader can resynchronise): the pieces are written with cflag 1 (start), 2
(middle), 3 (end) and the magic word itself is dropped; the reader joins the pieces with the
magic word. cflag 0 is a whole record.

Payload (mxnet's ``IRHeader``, struct ``IfQQ``, 24 bytes): ``uint32 flag``, ``float32 label``,
``uint64 id``, ``uint64 id2``; when ``flag > 0``, ``flag`` float32 labels follow and the label
is the first of them. The rest of the payload is the encoded image (JPEG).

InsightFace training layout: record 0 holds no image; its header has ``flag = 2`` and labels
``(first_identity_record, end_record)``. Records ``1 .. first_identity_record - 1`` are the
images; records ``first_identity_record .. end_record - 1`` are one header per identity (in
label order) with labels ``(first_image_record, end_image_record)`` of that identity. Datasets
without this block (record 0 is an ordinary image) are read as a flat list of images.
The ``.idx`` file has ``key<TAB>byte offset`` lines (random access) and ``property`` the line
``num_classes,height,width``. The writer also stores ``identities.txt`` (``label<TAB>name``)
when names are given, so an unpacked folder gets its identity names back.

``RecordIODataset`` (registered as ``recordio``) opens the ``.rec`` lazily and re-opens it
when the process id changes, so one instance can be handed to DataLoader workers (fork or
spawn). ``RecordIOWriter`` writes to temporary files and renames them on success, so a
failure never leaves half a dataset behind. Every format problem raises ``RecordIOError``
naming the file and the byte offset.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qualiface.data import DATASETS
from qualiface.data.decode import DEFAULT_MAX_PIXELS, DataError, decode_image, probe_image
from qualiface.files import create_temp, write_text_atomic

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
#: Largest payload one frame can describe (29-bit length field).
MAX_RECORD_LENGTH = _LENGTH_MASK
# Labels and record indices are stored as float32 in headers: above 2**24 they stop being exact.
_FLOAT32_EXACT = 1 << 24
IDENTITIES_FILE = "identities.txt"
PROPERTY_FILE = "property"
#: Classes a dataset may have beyond its image count (sparse labels); see _check_num_classes.
MAX_CLASSES_WITHOUT_IMAGES = 1 << 16


class RecordIOError(DataError):
    """A malformed RecordIO file: names the file and, where known, the byte offset."""

    def __init__(self, path: str | os.PathLike, offset: int | None, reason: str) -> None:
        super().__init__(str(path), offset, reason)
        self.path = str(path)
        self.offset = offset
        self.reason = reason

    def __str__(self) -> str:
        where = self.path if self.offset is None else f"{self.path} at byte {self.offset}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class IRHeader:
    """mxnet's image-record header. ``labels`` holds all labels (one when ``flag == 0``)."""

    flag: int
    labels: tuple[float, ...]
    id: int
    id2: int

    @property
    def label(self) -> float:
        return self.labels[0]


# ----------------------------------------------------------------------------- payloads


def pack_record(label: float | Sequence[float], image: bytes = b"", *, record_id: int = 0,
                id2: int = 0) -> bytes:
    """IRHeader + image bytes. A sequence ``label`` is stored as ``flag = len`` extra floats."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        head = _IR_HEADER.pack(0, float(label), record_id, id2)
    else:
        values = np.asarray(label, dtype="<f4").reshape(-1)
        head = _IR_HEADER.pack(len(values), 0.0, record_id, id2) + values.tobytes()
    return head + bytes(image)


def unpack_record(payload: bytes, *, source: str = "<record>", offset: int | None = None
                  ) -> tuple[IRHeader, bytes]:
    """Payload -> (IRHeader, image bytes). Raises ``RecordIOError`` when it is too short."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(source, offset, f"record of {len(payload)} bytes is shorter than "
                                            f"the {_IR_HEADER.size}-byte image header")
    flag, label, record_id, id2 = _IR_HEADER.unpack_from(payload, 0)
    rest = _IR_HEADER.size
    if flag > 0:
        if rest + 4 * flag > len(payload):
            raise RecordIOError(source, offset, f"header announces {flag} labels but the "
                                                f"record has only {len(payload)} bytes")
        labels = tuple(float(v) for v in np.frombuffer(payload, "<f4", flag, rest))
        rest += 4 * flag
    else:
        labels = (float(label),)
    return IRHeader(flag, labels, record_id, id2), payload[rest:]


# ----------------------------------------------------------------------------- framing


def frame_record(payload: bytes) -> bytes:
    """One payload -> framed bytes, split at aligned magic words exactly as dmlc's writer does."""
    if len(payload) > MAX_RECORD_LENGTH:
        raise ValueError(f"record of {len(payload)} bytes exceeds the RecordIO limit of "
                         f"{MAX_RECORD_LENGTH}")
    pieces: list[bytes] = []
    start = 0
    # Find aligned occurrences of the magic word (bytes.find is fast; keep only aligned hits).
    hit = payload.find(_MAGIC_BYTES)
    while hit >= 0:
        if hit % 4 == 0:
            cflag = 1 if start == 0 else 2
            pieces.append(_FRAME.pack(MAGIC, cflag << 29 | (hit - start)))
            pieces.append(payload[start:hit])
            start = hit + 4
            hit = payload.find(_MAGIC_BYTES, start)
        else:
            hit = payload.find(_MAGIC_BYTES, hit + 1)
    cflag = 3 if start > 0 else 0
    tail = payload[start:]
    pieces.append(_FRAME.pack(MAGIC, cflag << 29 | len(tail)))
    pieces.append(tail)
    pieces.append(b"\0" * (-len(payload) % 4))
    return b"".join(pieces)


def read_frame(buffer, offset: int, *, source: str = "<rec>") -> tuple[bytes, int]:
    """Read the (possibly split) record at ``offset`` of a bytes-like/mmap ``buffer``.

    Returns ``(payload, offset_of_next_record)``. Raises ``RecordIOError`` for a bad magic
    word, a record running past the end, or an out-of-order continuation flag.
    """
    size = len(buffer)
    pieces: list[bytes] = []
    pos = offset
    while True:
        if pos < 0 or pos + _FRAME.size > size:
            raise RecordIOError(source, pos, "truncated record (file ends inside a record "
                                             "header)")
        magic, word = _FRAME.unpack_from(buffer, pos)
        if magic != MAGIC:
            raise RecordIOError(source, pos, f"bad magic 0x{magic:08x} (expected "
                                             f"0x{MAGIC:08x}; not a RecordIO record)")
        cflag, length = word >> 29, word & _LENGTH_MASK
        if cflag > 3:
            raise RecordIOError(source, pos, f"invalid continuation flag {cflag}")
        starting = not pieces
        if starting and cflag not in (0, 1):
            raise RecordIOError(source, pos, f"continuation piece (flag {cflag}) where a "
                                             "record should start")
        if not starting and cflag not in (2, 3):
            raise RecordIOError(source, pos, f"split record interrupted by flag {cflag}")
        begin = pos + _FRAME.size
        if begin + length > size:
            raise RecordIOError(source, pos, f"truncated record: needs {length} bytes, "
                                             f"{size - begin} left in the file")
        pieces.append(buffer[begin:begin + length])
        pos = begin + length + (-length % 4)
        if cflag in (0, 3):
            break
    payload = pieces[0] if len(pieces) == 1 else _MAGIC_BYTES.join(pieces)
    return payload, min(pos, size)


def _map_file(path: Path) -> mmap.mmap | bytes:
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""  # mmap refuses empty files
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def iter_records(rec_path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Scan a ``.rec`` sequentially (no ``.idx`` needed): yields ``(offset, payload)``."""
    rec_path = Path(rec_path)
    buffer = _map_file(rec_path)
    try:
        pos = 0
        while pos < len(buffer):
            payload, following = read_frame(buffer, pos, source=str(rec_path))
            yield pos, payload
            pos = following
    finally:
        if isinstance(buffer, mmap.mmap):
            buffer.close()


# ----------------------------------------------------------------------------- index files


def read_index(idx_path: str | os.PathLike, rec_size: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``.idx`` file -> ``(keys, offsets)`` int64 arrays sorted by key.

    Checks every line is ``int<TAB>int``, keys are unique and >= 0, offsets lie inside the
    ``.rec`` (``0 <= offset < rec_size`` when ``rec_size`` is given), and no two keys share an
    offset or start closer than one record header.
    """
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise RecordIOError(idx_path, None, "index file not found (random access needs the "
                                            ".idx next to the .rec; rebuild it with "
                                            "qualiface.data.recordio.rebuild_index)")
    try:
        text = idx_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordIOError(idx_path, exc.start, "index is not text") from None
    keys: list[int] = []
    offsets: list[int] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise RecordIOError(idx_path, None, f"line {line_number}: expected "
                                                f"'key<TAB>offset', got {line[:80]!r}") from None
        if key < 0 or offset < 0:
            raise RecordIOError(idx_path, None, f"line {line_number}: negative key or offset")
        if rec_size is not None and offset >= rec_size:
            raise RecordIOError(idx_path, None, f"line {line_number}: offset {offset} is past "
                                                f"the end of the .rec ({rec_size} bytes)")
        keys.append(key)
        offsets.append(offset)
    if not keys:
        raise RecordIOError(idx_path, None, "index has no records")
    key_array = np.asarray(keys, dtype=np.int64)
    offset_array = np.asarray(offsets, dtype=np.int64)
    order = np.argsort(key_array, kind="stable")
    key_array, offset_array = key_array[order], offset_array[order]
    duplicate = np.flatnonzero(key_array[1:] == key_array[:-1])
    if duplicate.size:
        raise RecordIOError(idx_path, None, f"key {key_array[duplicate[0]]} appears twice")
    _check_offsets_distinct(idx_path, key_array, offset_array)
    return key_array, offset_array


def _check_offsets_distinct(idx_path: Path, keys: np.ndarray, offsets: np.ndarray) -> None:
    """Refuse two keys at one offset, or offsets closer than one frame header.

    Either way two "records" would read the same bytes: a hostile or broken index could turn one
    image into many (silently duplicated training samples). Records that start far enough apart
    but still overlap are caught on read, where the frame's true length is known (see
    ``RecordIODataset._record``).
    """
    order = np.argsort(offsets, kind="stable")
    gaps = np.diff(offsets[order])
    close = np.flatnonzero(gaps < _FRAME.size)
    if not close.size:
        return
    first, second = order[close[0]], order[close[0] + 1]
    key_a, key_b = int(keys[first]), int(keys[second])
    offset_a, offset_b = int(offsets[first]), int(offsets[second])
    if offset_a == offset_b:
        reason = f"keys {key_a} and {key_b} share byte offset {offset_a} (one record listed twice)"
    else:
        reason = (f"keys {key_a} and {key_b} start at bytes {offset_a} and {offset_b}, closer "
                  f"than one {_FRAME.size}-byte record header (overlapping records)")
    raise RecordIOError(idx_path, None, reason)


def rebuild_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
                  ) -> Path:
    """Scan a ``.rec`` and write its ``.idx`` (keys = record order, as mxnet writes them)."""
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    lines = [f"{key}\t{offset}\n" for key, (offset, _) in enumerate(iter_records(rec_path))]
    write_text_atomic(idx_path, "".join(lines))
    return idx_path


def resolve_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``dir``, ``dir/train``, ``dir/train.rec`` or ``.idx`` -> (rec, idx, property) paths.

    A directory must hold exactly one ``.rec`` (or ``train.rec``).
    """
    path = Path(path)
    if path.is_dir():
        recs = sorted(path.glob("*.rec"))
        preferred = [rec for rec in recs if rec.name == "train.rec"]
        if preferred:
            recs = preferred
        if len(recs) != 1:
            found = ", ".join(r.name for r in recs) or "none"
            raise RecordIOError(path, None, f"expected one .rec file in the folder, found "
                                            f"{found}")
        rec = recs[0]
    elif path.suffix in (".rec", ".idx"):
        rec = path.with_suffix(".rec")
    else:
        rec = path.with_name(path.name + ".rec")
    if not rec.is_file():
        raise RecordIOError(rec, None, "RecordIO file not found")
    return rec, rec.with_suffix(".idx"), rec.parent / PROPERTY_FILE


def read_property(property_path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``property`` file -> ``(num_classes, height, width)``, or None when absent."""
    from qualiface.files import read_small_bytes

    property_path = Path(property_path)
    if not property_path.is_file():
        return None
    try:  # one short line: a large file here is not a property file
        data = read_small_bytes(property_path, limit=4096, what="property file")
    except OSError as exc:
        raise RecordIOError(property_path, None, getattr(exc, "problem", None)
                            or f"cannot read ({exc.strerror or exc})") from None
    text = data.decode("utf-8", errors="replace").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(property_path, None, f"expected 'num_classes,height,width', got "
                                                 f"{text[:80]!r}") from None
    return values  # type: ignore[return-value]


def identity_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an identity name (None when it can).

    ``unpack`` uses each name as a folder under its output directory, so a name must be one
    plain path component: not empty, not ``.`` or ``..``, no ``/``, ``\\`` or NUL (a backslash is
    a separator on Windows), and no tab or line break (they would break ``identities.txt``).
    """
    if not name:
        return "empty identity name"
    if name in (".", ".."):
        return f"identity name {name!r} is not a folder name"
    for character, what in (("/", "'/'"), ("\\", "'\\'"), ("\0", "NUL"), ("\t", "a tab"),
                            ("\r", "a line break"), ("\n", "a line break")):
        if character in name:
            return f"identity name {name[:80]!r} contains {what}"
    return None


def read_identity_names(folder: str | os.PathLike) -> list[str] | None:
    """``identities.txt`` (``label<TAB>name`` lines, labels 0..N-1 in order) or None.

    Raises ``RecordIOError`` naming the file and line for a malformed line or a name that is not
    a single plain folder name (see ``identity_name_problem``): the file may be hostile.
    """
    path = Path(folder) / IDENTITIES_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecordIOError(path, exc.start, "not UTF-8 text") from None
    names: list[str] = []
    for line_number, line in enumerate(text.splitlines(), 1):
        label, sep, name = line.partition("\t")
        if not sep or label != str(len(names)) or not name:
            raise RecordIOError(path, None, f"line {line_number}: expected "
                                            f"'{len(names)}<TAB>name', got {line[:80]!r}")
        problem = identity_name_problem(name)
        if problem is not None:
            raise RecordIOError(path, None, f"line {line_number}: {problem}")
        names.append(name)
    return names


# ----------------------------------------------------------------------------- reader


def _integral_label(value: float, limit: int | None) -> int | None:
    if not math.isfinite(value) or value != int(value) or value < 0:
        return None
    label = int(value)
    if limit is not None and label >= limit:
        return None
    return label


@DATASETS.register("recordio", "rec")
class RecordIODataset(torch.utils.data.Dataset):
    """InsightFace ``.rec`` -> ``(uint8 (3, H, W) RGB, int label)`` with random access via ``.idx``.

    ``path``: the folder, the prefix (``dir/train``) or the ``.rec`` / ``.idx`` path.
    ``num_classes``: from ``property``, else the identity block, else a scan of all headers.
    ``meta(i)``: ``{"record": key, "id": header id, "offset": byte offset, "path": rec}``.
    """

    def __init__(self, path: str | os.PathLike, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.rec_path, self.idx_path, self.property_path = resolve_paths(path)
        self.max_pixels = max_pixels
        self._rec_size = self.rec_path.stat().st_size
        keys, offsets = read_index(self.idx_path, self._rec_size)
        # Where the next indexed record starts, for the overlap check in ``_record``.
        self._sorted_offsets = np.sort(offsets)
        self._buffer: mmap.mmap | bytes | None = None
        self._pid: int | None = None
        self.identity_block: tuple[int, int] | None = None
        self._image_keys, self._image_offsets = keys, offsets
        if keys[0] == 0:
            header, image = self._record(int(offsets[0]))
            if header.flag >= 2 and not image:
                self._use_identity_block(header, keys, offsets)
        if len(self._image_keys) == 0:
            raise RecordIOError(self.rec_path, None, "no image records")
        prop = read_property(self.property_path)
        self.image_size: tuple[int, int] | None = (prop[1], prop[2]) if prop else None
        if prop is not None:
            self._num_classes = prop[0]
        elif self.identity_block is not None:
            self._num_classes = self.identity_block[1] - self.identity_block[0]
        else:
            self._num_classes = self._scan_num_classes()
        self._check_num_classes(prop is not None)

    def _check_num_classes(self, from_property: bool) -> None:
        """Refuse a class count the records cannot back (the head allocates one row per class).

        A real set has at least one image per class; sparse labels (a filtered subset keeping
        its original labels) are allowed up to ``MAX_CLASSES_WITHOUT_IMAGES`` classes, which a
        head holds in a few hundred MB at most. Beyond both, the count is a corrupt or hostile
        header, not a dataset: ``property`` 1e12 or one label 3e9 asked for terabytes.
        """
        limit = max(len(self), MAX_CLASSES_WITHOUT_IMAGES)
        if self._num_classes <= limit:
            return
        source = (self.property_path if from_property
                  else self.rec_path if self.identity_block is None else self.idx_path)
        what = ("'property' says" if from_property
                else "the identity block of record 0 spans" if self.identity_block is not None
                else "the largest label implies")
        raise RecordIOError(source, None, f"{what} {self._num_classes} classes, but the .rec holds "
                                          f"only {len(self)} images; more classes than images "
                                          f"is accepted up to {MAX_CLASSES_WITHOUT_IMAGES} only "
                                          "(a corrupt header?)")

    def _use_identity_block(self, header: IRHeader, keys: np.ndarray, offsets: np.ndarray
                            ) -> None:
        first, end = header.labels[0], header.labels[1]
        if not (math.isfinite(first) and math.isfinite(end) and 1 <= first <= end):
            raise RecordIOError(self.rec_path, int(offsets[0]), f"record 0 has an invalid "
                                                                f"identity range {first}, {end}")
        first, end = int(first), int(end)
        is_image = (keys >= 1) & (keys < first)
        if int(is_image.sum()) != first - 1:
            raise RecordIOError(self.idx_path, None, f"record 0 says records 1..{first - 1} "
                                                     f"are images but the index lists "
                                                     f"{int(is_image.sum())} of them")
        # Every identity header must be indexed: this also bounds the class count (end - first)
        # by the records that exist, so a corrupt record 0 cannot ask for terabytes.
        headers = int(((keys >= first) & (keys < end)).sum())
        if headers != end - first:
            raise RecordIOError(self.idx_path, None, f"record 0 says records {first}..{end - 1} "
                                                     f"are identity headers but the index lists "
                                                     f"{headers} of them")
        self.identity_block = (first, end)
        self._all_keys, self._all_offsets = keys, offsets
        self._image_keys, self._image_offsets = keys[is_image], offsets[is_image]

    def _scan_num_classes(self) -> int:
        largest = -1
        for i in range(len(self)):
            offset = int(self._image_offsets[i])
            label = self._record(offset)[0].label
            checked = _integral_label(label, None)
            if checked is None:
                raise RecordIOError(self.rec_path, offset, f"label {label} is not an int >= 0")
            if checked >= _FLOAT32_EXACT:  # float32 headers cannot store it exactly: corrupt
                raise RecordIOError(self.rec_path, offset, f"label {label:.0f} is not below "
                                                           f"2**24 (float32 labels are exact "
                                                           "only up to there)")
            largest = max(largest, checked)
        return largest + 1

    # Lazily (re)open per process: a memory map inherited through fork is shared state, and
    # one created under spawn does not exist yet, so each worker maps the file itself.
    def _data(self) -> mmap.mmap | bytes:
        pid = os.getpid()
        if self._buffer is None or self._pid != pid:
            self._buffer = _map_file(self.rec_path)
            self._pid = pid
            if len(self._buffer) < self._rec_size:
                raise RecordIOError(self.rec_path, len(self._buffer), "file shrank after the "
                                                                      "index was read")
        return self._buffer

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_buffer"] = None
        state["_pid"] = None
        return state

    def _record(self, offset: int) -> tuple[IRHeader, bytes]:
        payload, following = read_frame(self._data(), offset, source=str(self.rec_path))
        # A record must end where the next indexed one starts (or before): otherwise the index
        # points into the middle of this record and the same bytes would be read twice.
        position = int(np.searchsorted(self._sorted_offsets, offset, side="right"))
        if position < len(self._sorted_offsets) and following > self._sorted_offsets[position]:
            raise RecordIOError(self.idx_path, None, f"the record at byte {offset} runs to byte "
                                                     f"{following}, past the indexed record at "
                                                     f"byte {int(self._sorted_offsets[position])} "
                                                     f"(overlapping records)")
        return unpack_record(payload, source=str(self.rec_path), offset=offset)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return len(self._image_keys)

    def record_key(self, index: int) -> int:
        """The ``.idx`` key (record number) of image ``index``."""
        return int(self._image_keys[index])

    def read_raw(self, index: int) -> tuple[bytes, int, IRHeader]:
        """Image ``index`` without decoding: ``(encoded bytes, label, header)``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        offset = int(self._image_offsets[index])
        header, image = self._record(offset)
        label = _integral_label(header.label, self._num_classes)
        if label is None:
            raise RecordIOError(self.rec_path, offset, f"label {header.label} out of range "
                                                       f"[0, {self._num_classes})")
        return image, label, header

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self.read_raw(index)
        offset = int(self._image_offsets[index])
        name = f"{self.rec_path} record {int(self._image_keys[index])} (byte {offset})"
        return decode_image(image, name=name, max_pixels=self.max_pixels), label

    def meta(self, index: int) -> dict:
        offset = int(self._image_offsets[index])
        header, _ = self._record(offset)
        return {"record": int(self._image_keys[index]), "id": header.id, "offset": offset,
                "path": str(self.rec_path)}

    def identity_ranges(self) -> np.ndarray | None:
        """(num_identities, 2) int64 ``[first_record, end_record)`` per label, or None."""
        if self.identity_block is None:
            return None
        first, end = self.identity_block
        position = np.searchsorted(self._all_keys, np.arange(first, end))
        ranges = np.zeros((end - first, 2), dtype=np.int64)
        for row, pos in enumerate(position):
            key = first + row
            if pos >= len(self._all_keys) or self._all_keys[pos] != key:
                raise RecordIOError(self.idx_path, None, f"identity record {key} is missing")
            offset = int(self._all_offsets[pos])
            header, _ = self._record(offset)
            if header.flag < 2:
                raise RecordIOError(self.rec_path, offset, f"record {key} is not an identity "
                                                           "header")
            ranges[row] = (int(header.labels[0]), int(header.labels[1]))
        return ranges


# ----------------------------------------------------------------------------- writer


class RecordIOWriter:
    """Write an InsightFace-layout ``.rec``/``.idx``/``property`` (+ ``identities.txt``).

    Add images grouped by identity with non-decreasing labels (the identity block stores one
    contiguous record range per label). Use as a context manager: on success the temporary files
    are renamed into place, on an exception they are removed::

        with RecordIOWriter("out/train") as writer:
            writer.add(jpeg_bytes, label=0)
    """

    def __init__(self, prefix: str | os.PathLike, *, image_size: tuple[int, int] | None = None,
                 identity_names: Sequence[str] | None = None, identity_block: bool = True,
                 validate_images: bool = True) -> None:
        prefix = Path(prefix)
        self.rec_path, self.idx_path, self.property_path, self.identities_path = (
            self.output_paths(prefix))
        self.image_size = image_size
        self.identity_names = list(identity_names) if identity_names is not None else None
        self.identity_block = identity_block
        self.validate_images = validate_images
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        self._temps: list[Path] = []
        self._rec = self._open_temp(self.rec_path, "wb")
        self._idx = self._open_temp(self.idx_path, "w")
        self._labels: list[int] = []
        self._offset = 0
        self._finished = False
        self._next_key = 0
        if identity_block:
            # Placeholder with the final size: patched with the real range on commit.
            self._write(pack_record((0.0, 0.0)), key=0)

    @staticmethod
    def output_paths(prefix: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
        """The files a writer for ``prefix`` creates: ``.rec``, ``.idx``, property, identities."""
        prefix = Path(prefix)
        if prefix.suffix in (".rec", ".idx"):
            prefix = prefix.with_suffix("")
        return (prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx"),
                prefix.parent / PROPERTY_FILE, prefix.parent / IDENTITIES_FILE)

    def _open_temp(self, final: Path, mode: str):
        handle, temp = create_temp(final)
        self._temps.append(temp)
        return os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"}))

    def _write(self, payload: bytes, key: int) -> None:
        framed = frame_record(payload)
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._offset += len(framed)
        self._next_key = key + 1

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, image: bytes, label: int) -> int:
        """Append one encoded image with its label; returns its record key."""
        if self._finished:
            raise RuntimeError(f"{self.rec_path}: writer already closed")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"{self.rec_path}: label must be an int >= 0, got {label!r}")
        label = int(label)
        if self._labels and label < self._labels[-1]:
            raise ValueError(f"{self.rec_path}: labels must be added in non-decreasing order "
                             f"(got {label} after {self._labels[-1]}); group images by identity")
        key = self._next_key
        if label >= _FLOAT32_EXACT or key >= _FLOAT32_EXACT:
            raise ValueError(f"{self.rec_path}: label/record {max(label, key)} exceeds 2**24, "
                             "which float32 headers cannot store exactly")
        name = f"{self.rec_path} record {key}"
        if self.validate_images or self.image_size is None:
            info = probe_image(image, name=name)
            if self.image_size is None:
                self.image_size = (info.height, info.width)
        self._write(pack_record(float(label), image, record_id=key), key=key)
        self._labels.append(label)
        return key

    def commit(self) -> None:
        """Write identity headers, ``property`` (and names), then move every file into place."""
        if self._finished:
            return
        try:
            if not self._labels:
                raise ValueError(f"{self.rec_path}: no images were added")
            num_classes = self._labels[-1] + 1
            if self.identity_names is not None:
                if len(self.identity_names) != num_classes:
                    raise ValueError(f"{self.rec_path}: {len(self.identity_names)} identity "
                                     f"names for {num_classes} classes")
                for name in self.identity_names:
                    # The same rule read_identity_names applies, so every pack reads back.
                    problem = identity_name_problem(name)
                    if problem is not None:
                        raise ValueError(f"{problem}: cannot be stored in {IDENTITIES_FILE}")
            if self.identity_block:
                self._write_identity_block(num_classes)
            self._rec.flush()
            os.fsync(self._rec.fileno())
            self._rec.close()
            self._idx.close()
            height, width = self.image_size  # type: ignore[misc]
            finals = [self.rec_path, self.idx_path, self.property_path]
            with self._open_temp(self.property_path, "w") as out:
                out.write(f"{num_classes},{height},{width}\n")
            if self.identity_names is not None:
                finals.append(self.identities_path)
                with self._open_temp(self.identities_path, "w") as out:
                    out.write("".join(f"{label}\t{name}\n"
                                      for label, name in enumerate(self.identity_names)))
            # Everything is complete on disk before the first rename.
            for temp, final in zip(self._temps, finals):
                os.replace(temp, final)
            self._finished = True
        except BaseException:
            self.abort()
            raise

    def _write_identity_block(self, num_classes: int) -> None:
        labels = np.asarray(self._labels)
        first_key = 1  # images occupy keys 1..len(labels)
        starts = first_key + np.searchsorted(labels, np.arange(num_classes), side="left")
        ends = first_key + np.searchsorted(labels, np.arange(num_classes), side="right")
        first_identity = self._next_key
        end_identity = first_identity + num_classes
        if end_identity >= _FLOAT32_EXACT:
            raise ValueError(f"{self.rec_path}: {end_identity} records exceed 2**24")
        for label in range(num_classes):
            key = first_identity + label
            self._write(pack_record((float(starts[label]), float(ends[label])), record_id=key),
                        key=key)
        record0 = frame_record(pack_record((float(first_identity), float(end_identity))))
        self._rec.seek(0)
        self._rec.write(record0)  # same length as the placeholder: no magic word can appear
        self._rec.seek(0, os.SEEK_END)

    def abort(self) -> None:
        """Drop everything written so far (temporary files are removed)."""
        self._finished = True
        for handle in (self._rec, self._idx):
            if not handle.closed:
                handle.close()
        for temp in self._temps:
            temp.unlink(missing_ok=True)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self.abort()
