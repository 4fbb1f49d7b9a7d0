"""The dmlc RecordIO record format, in pure Python: framing and mxnet's image-record header.

Framing (dmlc RecordIO, little-endian): every record is ``uint32 magic 0xCED7230A``, ``uint32
cflag << 29 | length``, then ``length`` payload bytes padded with zeros to a multiple of 4. A
payload containing the magic word at a 4-byte-aligned position is split there (dmlc's writer
does this so a reader can resynchronise): the pieces are written with cflag 1 (start), 2
(middle), 3 (end) and the magic word itself is dropped; the reader joins the pieces with the
magic word. cflag 0 is a whole record.

Payload (mxnet's ``IRHeader``, struct ``IfQQ``, 24 bytes): ``uint32 flag``, ``float32 label``,
``uint64 id``, ``uint64 id2``; when ``flag > 0``, ``flag`` float32 labels follow and the label
is the first of them. The rest of the payload is the encoded image (JPEG).

Every format problem raises ``RecordIOError`` naming the file and the byte offset.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qualiface.data.decode import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
#: Bytes of one frame header (magic word + flag/length word).
FRAME_HEADER_SIZE = _FRAME.size
#: Largest payload one frame can describe (29-bit length field).
MAX_RECORD_LENGTH = _LENGTH_MASK
#: Labels and record indices are stored as float32 in headers: from here on they stop being exact.
FLOAT32_EXACT = 1 << 24


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


def map_file(path: Path) -> mmap.mmap | bytes:
    """A read-only memory map of ``path`` (``b""`` for an empty file, which mmap refuses)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""  # mmap refuses empty files
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def iter_records(rec_path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Scan a ``.rec`` sequentially (no ``.idx`` needed): yields ``(offset, payload)``."""
    rec_path = Path(rec_path)
    buffer = map_file(rec_path)
    try:
        pos = 0
        while pos < len(buffer):
            payload, following = read_frame(buffer, pos, source=str(rec_path))
            yield pos, payload
            pos = following
    finally:
        if isinstance(buffer, mmap.mmap):
            buffer.close()
